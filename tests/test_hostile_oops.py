"""Hostile but realistic OOPS! roots: every malformed record, clashing file and odd file costs only
itself (a rejected row naming the file and the field); the good clips beside them are ok, and no
video file under the root is left without a row."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from pab_build.manifests import read_manifest
from pab_build.stages import frames
from pab_build.engine.units import Context, run_stage

GOOD = "Girl falls off trampoline (FailArmy)0"
CAFE = "Café fail – waiter trips"
TT = "annotations/transition_times.json"
MALFORMED = {  # clip -> (record, fragment the reason must hold)
    "t as a numeric string": ({"t": ["2.0", "2.0", "2.0"], "len": 4.0}, "field 't'[0] is '2.0' (str)"),
    "t as a word": ({"t": "abc", "len": 4.0}, "field 't' is 'abc' (str)"),
    "len as a word": ({"t": [2.0, 2.0, 2.0], "len": "four"}, "field 'len' is 'four' (str)"),
    "t with a null": ({"t": [2.0, None, 2.0], "len": 4.0}, "field 't'[1] is None (null)"),
    "t with a nested list": ({"t": [[2.0], 2.0, 2.0], "len": 4.0}, "field 't'[0] is [2.0] (list)"),
    "record is a list": ([2.0, 4.0], "is a list, expected an object"),
    "record is a string": ("2.0", "is a str, expected an object"),
    "t is NaN": ({"t": [float("nan"), 2.0, 2.0], "len": 4.0}, "field 't'[0] is nan, expected a finite number"),
}


@pytest.fixture
def hostile(tmp_path, sample_oops_root, smoke_cfg):
    root = tmp_path / "oops"
    shutil.copytree(sample_oops_root, root)
    val, train = root / "oops_video" / "val", root / "oops_video" / "train"
    good_video = val / f"{GOOD}.mp4"
    times = json.loads((root / TT).read_text(encoding="utf-8"))
    for name, (record, _) in MALFORMED.items():
        shutil.copy(good_video, val / f"{name}.mp4")
        times[name] = record
    # two files, one clip: same stem, mojibake twin, same name in two splits
    shutil.copy(good_video, val / "samestem.mp4")
    shutil.copy(good_video, val / "samestem.mkv")
    times["samestem"] = times[GOOD]
    shutil.copy(good_video, val / f"{CAFE.encode('utf-8').decode('cp1252')}.mp4")
    shutil.copy(train / "Dog steals the ball.mp4", val / "Dog steals the ball.mp4")
    # a file name that is not UTF-8, and a named pipe posing as a video
    shutil.copy(good_video, os.path.join(os.fsencode(val), b"caf\xe9 latin-1 name.mp4"))
    os.mkfifo(val / "pipe posing as a video.mp4")
    times["pipe posing as a video"] = times[GOOD]
    (root / TT).write_text(json.dumps(times), encoding="utf-8")  # json.dumps writes NaN as NaN
    # a truncated annotation file beside the good one
    shutil.copy(good_video, val / "Held-out clip.mp4")  # its times were in the truncated file
    (root / "annotations" / "heldout_transition_times.json").write_text('{"Held-out clip": {"t": [1.0, ')
    cfg = smoke_cfg.model_copy(deep=True)
    cfg.oops.root = str(root)
    cfg.oops.splits = ["train", "val"]
    return Context.create(cfg, str(tmp_path / "out")), root


def test_bad_records_and_clashing_files_cost_only_themselves(hostile):
    ctx, root = hostile
    start = time.monotonic()
    counts = run_stage(ctx, frames.STAGE)
    assert time.monotonic() - start < 120  # the pipe was not opened (it would block forever)
    assert counts["failed"] == 0
    rows = read_manifest(ctx.store, "frames")
    by_clip: dict[str, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["clip_name"], []).append(r)
    assert all(len(rs) == 2 for rs in by_clip.values())  # normal + anomaly, each clip once

    def reason(name: str) -> str:
        rs = by_clip[name]
        assert {r["status"] for r in rs} == {"rejected"}, (name, rs)
        return rs[0]["reason"]

    for name, (_, fragment) in MALFORMED.items():
        assert TT in reason(name) and fragment in reason(name), (name, reason(name))
    assert "oops_video/val/samestem.mkv" in reason("samestem") and "oops_video/val/samestem.mp4" in reason("samestem")
    cafe = reason(CAFE)
    assert f"oops_video/val/{CAFE}.mp4" in cafe and f"oops_video/val/{CAFE.encode('utf-8').decode('cp1252')}.mp4" in cafe
    dog = reason("Dog steals the ball")
    assert "oops_video/train/Dog steals the ball.mp4" in dog and "oops_video/val/Dog steals the ball.mp4" in dog
    assert "not valid UTF-8" in reason("caf\\xe9 latin-1 name")
    assert "not a regular file" in reason("pipe posing as a video")
    # the truncated file is named with its position in the reason of a clip that needed it
    assert "heldout_transition_times.json is unreadable" in reason("Held-out clip")
    assert "line 1 column" in reason("Held-out clip")

    ok = {name for name, rs in by_clip.items() if {r["status"] for r in rs} == {"ok"}}
    assert {GOOD, "Man slips on ice - FailArmy Hall Of Fame (May 2017)12", "Skateboarder bails at the park",
            "Kid stands still by the pool"} <= ok

    # every video file under the root ends in a row: its own clip's, or one naming it among clashing files
    reasons = " | ".join(r["reason"] or "" for r in rows)
    for split in ("train", "val"):
        for fn in os.listdir(os.fsencode(root / "oops_video" / split)):
            stem = os.path.splitext(fn)[0].decode("utf-8", "backslashreplace")
            rel = f"oops_video/{split}/{fn.decode('utf-8', 'backslashreplace')}"
            assert stem in by_clip or rel in reasons, rel


def test_a_clip_that_raises_is_retried_then_rejected_alone(ctx, monkeypatch):
    real = frames.extract_transition_frames
    calls: dict[str, int] = {}

    def flaky(c, items):
        name = items[0]["clip_name"]
        calls[name] = calls.get(name, 0) + 1
        if name == GOOD:
            raise ValueError("cannot convert float NaN to integer")
        return real(c, items)

    monkeypatch.setattr(frames, "extract_transition_frames", flaky)
    assert run_stage(ctx, frames.STAGE)["failed"] == 0
    rows = read_manifest(ctx.store, "frames")
    assert calls[GOOD] == 2
    bad = [r for r in rows if r["clip_name"] == GOOD]
    assert len(bad) == 2 and all("NaN" in r["reason"] for r in bad)
    assert any(r["status"] == "ok" for r in rows)  # its unit's neighbours are untouched


def test_a_decode_that_hangs_is_abandoned_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        frames.with_deadline(time.sleep, 0.2, 30)
    assert time.monotonic() - start < 5
    assert frames.with_deadline(lambda x: x + 1, 5, 1) == 2
    with pytest.raises(KeyError):
        frames.with_deadline(lambda: {}["x"], 5)


@pytest.mark.slow  # a Prefect test server and a flow run
def test_pab_run_until_frames_on_the_hostile_root_exits_0(hostile, models_dir, tmp_path, capsys):
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import main

    ctx, root = hostile
    out = tmp_path / "cli-out"
    with prefect_test_harness(server_startup_timeout=120), pytest.raises(SystemExit) as code:
        main(["run", "smoke", "--out", str(out), "--until", "frames", "--oops-root", str(root),
              "--set", "oops.splits=[train,val]", "--set", f"fixtures.models_dir={models_dir}",
              "--set", "fixtures.build_tiny_models=false", "--set", "fixtures.build_sample_oops=false"])
    assert code.value.code == 0
    summary = capsys.readouterr().out
    assert '"failed": 0' in summary
    rows = read_manifest(Context.create(ctx.cfg, str(out)).store, "frames")
    by_clip = {r["clip_name"]: r for r in rows}
    for name in MALFORMED:
        assert by_clip[name]["status"] == "rejected" and TT in by_clip[name]["reason"]
    assert by_clip[GOOD]["status"] == "ok"
