import json
import os
import shutil

import pytest

from pab_build.config import load_config
from pab_build.manifests import read_manifest
from pab_build.stages import frames
from pab_build.engine.units import Context, run_stage

SHARED_VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata", "videos")


def test_transition_times_are_segment_middles():
    assert frames.transition_times(4.0, 10.0) == (2.0, 7.0)
    assert frames.frame_index(2.0, 15.0, 125) == 30
    assert frames.frame_index(99.0, 15.0, 125) == 124


def _rows(ctx):
    return {(r["clip_name"], r["behavior"]): r for r in read_manifest(ctx.store, "frames")}


def test_sample_root_rows_and_reasons(ctx):
    counts = run_stage(ctx, frames.STAGE)
    assert counts["failed"] == 0
    rows = _rows(ctx)
    assert len(rows) == 20  # 10 clips x (normal, anomaly): every input appears exactly once
    ok = {name for (name, b), r in rows.items() if r["status"] == "ok"}
    assert ok == {
        "Girl falls off trampoline (FailArmy)0",
        "Man slips on ice - FailArmy Hall Of Fame (May 2017)12",
        "Café fail – waiter trips",  # stored as mojibake in the annotations, repaired
        "Skateboarder bails at the park",
        "Kid stands still by the pool",
    }
    reasons = {name: r["reason"] for (name, b), r in rows.items() if r["status"] == "rejected"}
    assert "no failure time" in reasons["Nobody fails here"]
    assert "clip length 2.50s" in reasons["Too short clip"]
    assert "relative failure time" in reasons["Failure at the very end"]
    assert "truncated" in reasons["Truncated video of a biker"]
    assert "video missing" in reasons["Lost video of a surfer"]
    girl_n = rows[("Girl falls off trampoline (FailArmy)0", "normal")]
    girl_a = rows[("Girl falls off trampoline (FailArmy)0", "anomaly")]
    # t = median(2.1, 2.0, 1.9) = 2.0, len 4.0 at 10 fps -> frames at 1.0 s and 3.0 s
    assert (girl_n["time_s"], girl_a["time_s"]) == (1.0, 3.0)
    assert girl_n["sample_key"].endswith("-normal") and girl_n["image_path"].startswith("frames/")
    assert ctx.store.exists(girl_a["image_path"])


def test_rerun_rewrites_no_finished_frame(ctx):
    run_stage(ctx, frames.STAGE)
    folder = ctx.store.local_path("frames")
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    counts = run_stage(ctx, frames.STAGE)
    assert counts["done"] == 0 and counts["skipped"] > 0
    after = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    assert before == after


@pytest.mark.skipif(not os.path.isdir(SHARED_VIDEOS), reason="../shared/testdata is not beside this clone")
def test_real_videos_including_a_corrupted_one(tmp_path):
    root = tmp_path / "oops"
    vdir = root / "oops_video" / "val"
    vdir.mkdir(parents=True)
    clips = {  # name -> (file, annotator times, len)
        "andrea falling": ("andrea_falling.mp4", [4.0, 4.2, 3.8], 125 / 15),
        "fall": ("fall.mp4", [3.0, 3.1, 2.9], 90 / 15),
        "pancake": ("flipping_a_pancake.mkv", [5.0, 5.0, 5.2], None),  # held-out style: no len
        "corrupted": ("corrupted.mp4", [3.0, 3.0, 3.0], 5.0),  # frames from 26 (2.6 s) on are broken
        "missing": (None, [2.0, 2.0, 2.0], 5.0),
    }
    times = {}
    for name, (fn, t, length) in clips.items():
        if fn:
            ext = os.path.splitext(fn)[1]
            shutil.copy(os.path.join(SHARED_VIDEOS, fn), vdir / f"{name}{ext}")
        times[name] = {"t": t, "n_notfound": 0, **({"len": length, "rel_t": [x / length for x in t]} if length else {})}
    (root / "annotations").mkdir()
    (root / "annotations" / "transition_times.json").write_text(json.dumps(times))
    (root / "svos").mkdir()
    (root / "svos" / "val.json").write_text(json.dumps({n: [{"goal": "g", "wentwrong": "w"}] for n in clips}))
    cfg = load_config("smoke", {"oops.root": str(root), "oops.splits": ["val"]})
    ctx = Context.create(cfg, str(tmp_path / "out"))
    assert run_stage(ctx, frames.STAGE)["failed"] == 0
    rows = _rows(ctx)
    assert rows[("andrea falling", "normal")]["time_s"] == pytest.approx(2.0)  # t=4.0 -> 2.0 s, frame 30
    assert rows[("andrea falling", "anomaly")]["frame_index"] == int((4.0 + 125 / 15) / 2 * 15)
    assert rows[("fall", "anomaly")]["status"] == "ok"
    pancake = rows[("pancake", "anomaly")]
    assert pancake["status"] == "ok" and pancake["duration_s"] == pytest.approx(310 / 30, rel=1e-3)
    assert rows[("corrupted", "normal")]["status"] == "rejected"
    assert "undecodable" in rows[("corrupted", "anomaly")]["reason"]
    assert "video missing" in rows[("missing", "normal")]["reason"]
    before = {f: os.path.getmtime(os.path.join(ctx.store.local_path("frames"), f))
              for f in os.listdir(ctx.store.local_path("frames"))}
    assert run_stage(ctx, frames.STAGE)["done"] == 0
    assert before == {f: os.path.getmtime(os.path.join(ctx.store.local_path("frames"), f)) for f in before}
