"""Stages test_captions and train_captions with the tiny Qwen2-VL."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from pab_build.models import captions, vlm
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.stages import test_captions as test_captions_stage
from pab_build.stages import train_captions as train_captions_stage
from pab_build.engine.units import Context, execute_unit, run_stage


DATA = os.path.join(os.path.dirname(__file__), "data")


def _write_jpeg(store, rel: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48 + 8 * seed, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    store.write_bytes(rel, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _test_inputs(ctx: Context, n_clips: int = 3) -> list[str]:
    """frames + review manifests for n clips (two images each); returns the image keys."""
    frames, review = [], []
    for c in range(n_clips):
        for j, behavior in enumerate(("normal", "anomaly")):
            key = f"c{c:010d}-{behavior}"
            rel = f"frames/{key}.jpg"
            frames.append({"sample_key": key, "status": OK, "reason": None, "clip_key": f"c{c:010d}",
                           "behavior": behavior, "source_caption": f"caption {c} {behavior}",
                           "image_path": rel, "image_sha256": _write_jpeg(ctx.store, rel, 2 * c + j)})
            review.append({"sample_key": key, "status": OK, "reason": None, "clip_key": f"c{c:010d}",
                           "decision": "accept"})
    write_manifest(ctx.store, "frames", frames)
    write_manifest(ctx.store, "review", review)
    return sorted(r["sample_key"] for r in frames)


@pytest.fixture
def cap_ctx(ctx, tiny_model):
    tiny_model("qwen2_vl")
    ctx.cfg.test_captions.images_per_unit = 4
    ctx.cfg.test_captions.generation.max_new_tokens = 6
    ctx.cfg.test_captions.generation.batch_size = 2
    ctx.cfg.train_captions.generation.max_new_tokens = 6
    return ctx


def _direct_captions(ctx: Context, keys: list[str], sec) -> dict[str, vlm.VLMAnswer]:
    backend = vlm.load_backend(ctx.cfg, sec.generation)
    prompt = vlm.load_prompt("caption_v1")
    reqs = [vlm.VLMRequest(k, vlm.image_from_bytes(ctx.store.read_bytes(p)), prompt) for k, p in keys]
    return {r.key: a for r, a in zip(reqs, vlm.generate_answer_records(backend, reqs, sec.generation))}


# -- pure rules ------------------------------------------------------------------------------------
def test_caption_whitespace_is_normalised():
    assert captions.normalise_caption("  A man\n in a  red\tshirt. ") == "A man in a red shirt."


@pytest.mark.parametrize("text, finished, reject_unfinished, reason", [
    ("", True, False, "empty caption: 0 words"),
    ("A man", True, False, "empty caption: 2 words (fewer than min_words=3)"),
    ("word " * 9, True, False, "runaway caption: 9 words (more than max_words=8)"),
    ("A man runs fast.", False, True, "runaway caption: generation stopped at max_new_tokens=96"),
    ("A man runs fast.", False, False, None),
    ("A man runs fast.", True, True, None),
])
def test_caption_problems(text, finished, reject_unfinished, reason):
    why = captions.caption_problem(captions.normalise_caption(text), finished=finished, min_words=3, max_words=8,
                                   max_new_tokens=96, reject_unfinished=reject_unfinished)
    if reason is None:
        assert why is None
    else:
        assert why.startswith(reason)


@pytest.mark.parametrize("text, trimmed", [
    ("A man in a red shirt rides a bike down a hill. He loses control and falls onto the",
     "A man in a red shirt rides a bike down a hill."),
    ("A man rides a bike. He loses control and falls onto the", None),  # 5 whole words: not enough
    ("A woman in a blue coat walks her dog along the icy road and the", None),  # no whole sentence
    ("Mr. Smith in a grey suit walks into the office with a coffee. He", "Mr. Smith in a grey suit walks into the "
     "office with a coffee."),
    ("A 3.5 m wall stands in a park where J. Doe tries to climb it with a rope! The", "A 3.5 m wall stands in a "
     "park where J. Doe tries to climb it with a rope!"),
    ('The man shouts "stop!" as the dog runs off with his shoe in its mouth. Then', 'The man shouts "stop!" as '
     'the dog runs off with his shoe in its mouth.'),
])
def test_a_cut_caption_is_trimmed_to_its_last_whole_sentence(text, trimmed):
    assert captions.trim_unfinished(text, min_words=8) == trimmed


def test_caption_end_finished_trimmed_unfinished(smoke_cfg):
    sec = smoke_cfg.test_captions.model_copy(update={"reject_unfinished": True, "min_words": 3, "max_words": 80})
    items = [{"sample_key": k} for k in "abc"]
    answers = {"a": ("A man rides a bike.", True),
               "b": ("A man in a red shirt rides a bike down a hill. He loses control and falls onto the", False),
               "c": ("A man rides a bike. He loses control and", False)}
    rows = {r["sample_key"]: r for r in captions.caption_rows(items, answers, sec, "m")}
    assert [rows[k]["caption_end"] for k in "abc"] == ["finished", "trimmed", "unfinished"]
    assert rows["b"]["status"] == OK and rows["b"]["caption"] == "A man in a red shirt rides a bike down a hill."
    assert rows["b"]["finished"] is False and rows["b"]["caption_generated"] == answers["b"][0]
    assert rows["c"]["status"] == REJECTED and rows["c"]["reason"].startswith("runaway caption: generation stopped")


def test_long_realistic_captions_keep_their_test_pair():
    """tests/data/long_captions.txt cut at ~96 tokens (72 words): before trimming every cut caption was
    rejected (20 of 28 with reject_unfinished); now 16 are trimmed and kept, 4 run-ons are rejected."""
    rows = [ln.strip() for ln in open(os.path.join(DATA, "long_captions.txt"), encoding="utf-8")
            if ln.strip() and not ln.startswith("#")]
    counts = {"finished": 0, "trimmed": 0, "unfinished": 0}
    for text in rows:
        words = text.split()
        if len(words) <= 72:
            counts["finished"] += 1
            continue
        trimmed = captions.trim_unfinished(" ".join(words[:72]), min_words=8)
        counts["trimmed" if trimmed else "unfinished"] += 1
        assert trimmed is None or trimmed[-1] in ".!?" and len(trimmed.split()) >= 8
    assert counts == {"finished": 8, "trimmed": 16, "unfinished": 4}, counts


# -- test captions ---------------------------------------------------------------------------------
def test_test_captions_stage_one_row_per_reviewed_image(cap_ctx):
    ctx = cap_ctx
    keys = _test_inputs(ctx)
    # one image lost on disk, one reviewed image without a frame
    ctx.store.remove(f"frames/{keys[1]}.jpg")
    review = read_manifest(ctx.store, "review") + [
        {"sample_key": "cffffffffff-normal", "status": OK, "reason": None, "clip_key": "cffffffffff"}]
    write_manifest(ctx.store, "review", review)

    counts = run_stage(ctx, test_captions_stage.STAGE)
    assert counts == {"done": 2, "skipped": 0, "failed": 0}
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_captions")}
    assert sorted(rows) == sorted(keys + ["cffffffffff-normal"])
    assert rows[keys[1]]["status"] == REJECTED and rows[keys[1]]["reason"].startswith("image unreadable")
    assert rows["cffffffffff-normal"]["reason"] == "no frame image for this sample in the frames manifest"

    good = [k for k in keys if k != keys[1]]
    direct = _direct_captions(ctx, [(k, f"frames/{k}.jpg") for k in good], ctx.cfg.test_captions)
    for k in good:
        r = rows[k]
        assert r["status"] == OK, r
        assert r["caption_generated"] == direct[k].text
        whole = " ".join(direct[k].text.split())
        trimmed = captions.trim_unfinished(whole, ctx.cfg.test_captions.trim_min_words)
        end = "finished" if direct[k].finished else "trimmed" if trimmed else "unfinished"
        assert r["caption_end"] == end and r["finished"] == direct[k].finished
        assert r["caption"] == (trimmed if end == "trimmed" else whole)
        assert r["caption_corrected"] is False
        assert r["prompt_version"] == "caption_v1" and r["model_id"] == "{models_dir}/qwen2_vl"

    # rerun: every unit is skipped (markers), and the manifest is byte-identical
    before = ctx.store.read_bytes("manifests/test_captions.parquet")
    assert run_stage(ctx, test_captions_stage.STAGE)["skipped"] == 2
    assert ctx.store.read_bytes("manifests/test_captions.parquet") == before


def test_short_captions_are_rejected_as_empty(cap_ctx):
    ctx = cap_ctx
    keys = _test_inputs(ctx, n_clips=1)
    ctx.cfg.test_captions.min_words = 1000
    run_stage(ctx, test_captions_stage.STAGE)
    rows = read_manifest(ctx.store, "test_captions")
    assert [r["sample_key"] for r in rows] == keys
    for r in rows:
        assert r["status"] == REJECTED and r["reason"].startswith("empty caption")
        assert r["caption"] is None and r["caption_generated"] is not None  # kept for people to see


def test_qc_corrections_replace_the_generated_caption(cap_ctx, tmp_path):
    ctx = cap_ctx
    keys = _test_inputs(ctx, n_clips=2)
    qc = tmp_path / "alice.csv"
    qc.write_text(f'sample_key,caption_corrected\n{keys[0]},"A man in a red  shirt\nfalls off a bike."\n'
                  f"{keys[1]},\n", encoding="utf-8")  # an empty correction keeps the generated caption
    ctx.cfg.test_captions.qc_policy = "decisions_file"
    ctx.cfg.test_captions.qc_files = [str(qc)]
    ctx.cfg.test_captions.min_words = 1000  # every generated caption fails; the correction still wins
    run_stage(ctx, test_captions_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_captions")}
    fixed = rows[keys[0]]
    assert fixed["status"] == OK and fixed["caption_corrected"] is True
    assert fixed["caption"] == "A man in a red shirt falls off a bike."
    assert fixed["caption_generated"] and fixed["caption_generated"] != fixed["caption"]
    assert all(rows[k]["status"] == REJECTED for k in keys[1:])


def test_qc_corrections_for_unknown_keys_stop_the_stage(cap_ctx, tmp_path):
    ctx = cap_ctx
    _test_inputs(ctx, n_clips=1)
    qc = tmp_path / "alice.csv"
    qc.write_text("sample_key,caption_corrected\ncXXX-normal,a man falls\n", encoding="utf-8")
    ctx.cfg.test_captions.qc_policy = "decisions_file"
    ctx.cfg.test_captions.qc_files = [str(qc)]
    with pytest.raises(ValueError, match="cXXX-normal"):  # the real loader, on a real file
        test_captions_stage.STAGE.plan_units(ctx)


def test_finalize_exports_the_caption_sheet(cap_ctx, monkeypatch):
    ctx = cap_ctx
    keys = _test_inputs(ctx, n_clips=1)
    exported = []
    monkeypatch.setattr(test_captions_stage, "export_caption_sheet", lambda c, rows: exported.append(rows))
    run_stage(ctx, test_captions_stage.STAGE)
    assert [sorted(r["sample_key"] for r in rows) for rows in exported] == [keys]


def test_a_unit_that_died_midway_resumes_from_the_answer_cache(cap_ctx, monkeypatch):
    ctx = cap_ctx
    keys = _test_inputs(ctx, n_clips=2)  # 4 images = 1 unit = 2 batches of 2
    real = vlm.load_backend(ctx.cfg, ctx.cfg.test_captions.generation)
    calls: list[list[str]] = []

    class Flaky:
        model_id = real.model_id
        fail_second = True

        def prompt_length(self, r, s):
            return real.prompt_length(r, s)

        def generate_batch(self, reqs, s):
            calls.append([r.key for r in reqs])
            if self.fail_second and len(calls) == 2:
                raise RuntimeError("worker died")
            return real.generate_batch(reqs, s)

    flaky = Flaky()
    monkeypatch.setattr(captions, "load_backend", lambda cfg, settings: flaky)
    (unit,) = test_captions_stage.STAGE.plan_units(ctx)
    with pytest.raises(RuntimeError, match="worker died"):
        execute_unit(ctx, test_captions_stage.STAGE, unit)
    assert ctx.store.read_marker("test_captions", unit.unit_id) is None
    flaky.fail_second = False
    calls.clear()
    assert execute_unit(ctx, test_captions_stage.STAGE, unit) == "done"
    assert sum(len(c) for c in calls) == 2  # the first batch was not asked again
    rows = test_captions_stage.run_test_caption_unit(ctx, unit)  # everything cached now
    assert sum(len(c) for c in calls) == 2
    direct = _direct_captions(ctx, [(k, f"frames/{k}.jpg") for k in keys], ctx.cfg.test_captions)
    assert {r["sample_key"]: r["caption_generated"] for r in rows} == {k: a.text for k, a in direct.items()}


# -- train captions --------------------------------------------------------------------------------
def test_train_captions_caption_every_posed_image(cap_ctx):
    ctx = cap_ctx
    rows = []
    for i in range(3):
        key = f"c0000000001-a-{i:03d}"
        rel = f"generate/c0000000001-a/{key}.jpg"
        rows.append({"sample_key": key, "status": OK, "reason": None, "image_path": rel,
                     "image_sha256": _write_jpeg(ctx.store, rel, i)})
    rows.append({"sample_key": "c0000000001-a-009", "status": REJECTED, "reason": "broken body"})
    write_manifest(ctx.store, "gen_pose", rows)
    run_stage(ctx, train_captions_stage.STAGE)
    out = read_manifest(ctx.store, "train_captions")
    assert [r["sample_key"] for r in out] == [f"c0000000001-a-{i:03d}" for i in range(3)]
    direct = _direct_captions(ctx, [(r["sample_key"], r["image_path"]) for r in rows[:3]], ctx.cfg.train_captions)
    for r in out:
        assert r["status"] == OK and r["caption_generated"] == direct[r["sample_key"]].text
        assert r["prompt_version"] == "caption_v1"
