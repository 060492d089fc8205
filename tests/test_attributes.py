"""Stages test_attributes and attributes: questions, answers and their normalisation."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pab_build.models import attributes, vlm
from pab_build.models.answer_labels import answer_label
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.stages import test_attributes as test_attributes_stage
from pab_build.stages import train_attributes as train_attributes_stage
from pab_build.engine.units import Context, run_stage


def _write_jpeg(store, rel: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 48 + 8 * seed, 3), dtype=np.uint8)).save(buf, format="JPEG")
    store.write_bytes(rel, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture
def attr_ctx(ctx, tiny_model):
    tiny_model("qwen2_vl")
    ctx.cfg.attributes.generation.batch_size = 16
    ctx.cfg.attributes.generation.max_new_tokens = 4
    return ctx


class Recording:
    """A real backend whose batches are recorded (and, optionally, whose answers are replaced)."""

    def __init__(self, inner, answer=None):
        self.inner, self.model_id, self.answer = inner, inner.model_id, answer
        self.batches: list[list[vlm.VLMRequest]] = []

    def prompt_length(self, r, s):
        return self.inner.prompt_length(r, s)

    def generate_batch(self, reqs, s):
        self.batches.append(list(reqs))
        if self.answer is not None:
            return [vlm.VLMAnswer(self.answer(r), True) for r in reqs]
        return self.inner.generate_batch(reqs, s)


def _record(monkeypatch, ctx, answer=None) -> Recording:
    rec = Recording(vlm.load_backend(ctx.cfg, ctx.cfg.attributes.generation), answer)
    monkeypatch.setattr(attributes, "load_backend", lambda cfg, settings: rec)
    return rec


# -- normalisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Falling.", "falling"),
    ("The answer is Losing balance.", "losing balance"),
    ('"Parking lot"', "parking lot"),
    ("A skateboard park", "skateboard park"),
    ("the lawn", "lawn"),
    ("Scene: an outdoor church.", "outdoor church"),
    ("Answer: the scene is: lawn", "lawn"),
    ("falling, slipping", "falling"),
    ("Ski slope\nThe man is skiing down a slope.", "ski slope"),
    ("\u201cPlay-ground\u201d!", "play-ground"),
    ("answering phone", "answering phone"),
    ("one two three four five six seven eight", "one two three four five six"),
    ("...", None),
    ("  ", None),
    ("\ufffd\ufffd", None),
    ("The person is skateboarding.", "skateboarding"),
])
def test_answer_label_of_short_answers(raw, expected):
    assert answer_label("action", raw, max_words=6) == expected


def test_questions_follow_behavior():
    assert attributes.attribute_questions("normal") == ("action", "scene")
    assert attributes.attribute_questions("anomaly") == ("anomaly", "scene")
    with pytest.raises(ValueError, match="unknown behavior"):
        attributes.attribute_questions("weird")


# -- test set --------------------------------------------------------------------------------------
def _test_inputs(ctx: Context) -> dict[str, dict]:
    frames, caps = [], []
    for c in range(2):
        for j, behavior in enumerate(("normal", "anomaly")):
            key = f"c{c:010d}-{behavior}"
            rel = f"frames/{key}.jpg"
            src = f"Clip {c}: the person {'rides a bike' if behavior == 'normal' else 'falls off the bike'}."
            frames.append({"sample_key": key, "status": OK, "reason": None, "behavior": behavior,
                           "source_caption": src, "image_path": rel,
                           "image_sha256": _write_jpeg(ctx.store, rel, 2 * c + j)})
            caps.append({"sample_key": key, "status": OK, "reason": None, "caption": f"A person {c}."})
    # a frame whose clip has no caption, and a rejected caption (not asked about)
    frames.append({"sample_key": "c0000000009-normal", "status": OK, "reason": None, "behavior": "normal",
                   "source_caption": None, "image_path": "frames/c0000000009-normal.jpg",
                   "image_sha256": _write_jpeg(ctx.store, "frames/c0000000009-normal.jpg", 9)})
    caps.append({"sample_key": "c0000000009-normal", "status": OK, "reason": None, "caption": "A person."})
    caps.append({"sample_key": "c0000000001-normal-x", "status": REJECTED, "reason": "empty caption"})
    write_manifest(ctx.store, "frames", frames)
    write_manifest(ctx.store, "test_captions", caps)
    return {f["sample_key"]: f for f in frames}


def test_test_attributes_ask_the_papers_questions_with_the_source_caption(attr_ctx, monkeypatch):
    ctx = attr_ctx
    frames = _test_inputs(ctx)
    rec = _record(monkeypatch, ctx)
    run_stage(ctx, test_attributes_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_attributes")}
    assert sorted(rows) == sorted(frames)  # one row per captioned image, the rejected caption left out
    assert rows["c0000000009-normal"]["status"] == REJECTED
    assert rows["c0000000009-normal"]["reason"] == "no source caption C to put into the attribute instructions"

    # every question of the unit went to the model in one length-sorted batch
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 8
    sent = {r.key: r for r in rec.batches[0]}
    assert sorted(sent) == sorted(f"{k}/{q}" for k, f in frames.items() if f["source_caption"]
                                  for q in attributes.QUESTIONS[f["behavior"]])
    scene = vlm.load_prompt("attr_scene_v1")
    assert sent["c0000000000-anomaly/scene"].prompt == scene.replace(
        "{caption}", "Clip 0: the person falls off the bike")
    assert sent["c0000000001-anomaly/anomaly"].prompt.startswith(
        "Below is the image caption of the image. In the image, someone fails to do something.")
    assert sent["c0000000001-normal/action"].prompt.endswith("Image caption: Clip 1: the person rides a bike.")

    backend = rec.inner
    for key, f in frames.items():
        if not f["source_caption"]:
            continue
        r = rows[key]
        questions = attributes.QUESTIONS[f["behavior"]]
        other = ({"action", "anomaly"} - set(questions)).pop()
        assert r[other] is None and r[f"{other}_raw"] is None
        assert r["behavior"] == f["behavior"]
        assert r["prompt_version"] == ",".join(attributes.ATTRIBUTE_PROMPTS[q] for q in questions)
        for q in questions:
            (alone,) = vlm.generate_answers(backend, [sent[f"{key}/{q}"]], ctx.cfg.attributes.generation)
            assert r[f"{q}_raw"] == alone
        labels = {q: answer_label(q, r[f"{q}_raw"], ctx.cfg.attributes.max_words) for q in questions}
        if all(labels.values()):
            assert r["status"] == OK and all(r[q] == labels[q] for q in questions)
        else:
            assert r["status"] == REJECTED and r["reason"].startswith("unreadable answer: ")


def test_an_unreadable_answer_rejects_the_row_with_the_raw_answer(attr_ctx, monkeypatch):
    ctx = attr_ctx
    _test_inputs(ctx)
    refusal = "I cannot determine the scene from this image."
    _record(monkeypatch, ctx, answer=lambda r: refusal if r.key.endswith("/scene") else "The man falls off his bike.")
    run_stage(ctx, test_attributes_stage.STAGE)
    row = next(r for r in read_manifest(ctx.store, "test_attributes") if r["sample_key"] == "c0000000000-anomaly")
    assert row["status"] == REJECTED
    assert row["reason"] == f"unreadable answer: scene={refusal!r}"
    assert row["anomaly"] == "falling off his bike" and row["scene"] is None and row["scene_raw"] == refusal


def test_sentence_answers_become_labels_in_the_manifest(attr_ctx, monkeypatch):
    ctx = attr_ctx
    _test_inputs(ctx)
    answers = {"action": "The person is skateboarding.", "anomaly": "Based on the caption and image, the man falls.",
               "scene": "The scene or background is a gym."}
    _record(monkeypatch, ctx, answer=lambda r: answers[r.key.split("/")[1]])
    run_stage(ctx, test_attributes_stage.STAGE)
    ok = [r for r in read_manifest(ctx.store, "test_attributes") if r["status"] == OK]
    assert ok and all(r["scene"] == "gym" for r in ok)
    assert {r["action"] or r["anomaly"] for r in ok} <= {"skateboarding", "falling"}


# -- training set ----------------------------------------------------------------------------------
def test_train_attributes_use_the_generation_prompt_as_c(attr_ctx, monkeypatch):
    ctx = attr_ctx
    clip = "c0000000007"
    prompts = {f"{clip}-n": ("n", "A man rides a skateboard."), f"{clip}-a": ("a", "A man falls off the board."),
               f"{clip}-ap": ("a+", "A man rides a skateboard and falls off the board.")}
    write_manifest(ctx.store, "prompts", [
        {"sample_key": k, "status": OK, "reason": None, "clip_key": clip, "kind": kind, "prompt": text}
        for k, (kind, text) in prompts.items()])
    gen, caps = [], []
    for n, (pk, (kind, _)) in enumerate(prompts.items()):
        key = f"{pk}-000"
        rel = f"generate/{pk}/{key}.jpg"
        gen.append({"sample_key": key, "status": OK, "reason": None, "prompt_key": pk, "clip_key": clip,
                    "kind": kind, "index": 0, "image_path": rel, "image_sha256": _write_jpeg(ctx.store, rel, n)})
        caps.append({"sample_key": key, "status": OK, "reason": None, "caption": "A man."})
    write_manifest(ctx.store, "generate", gen)
    write_manifest(ctx.store, "train_captions", caps)

    rec = _record(monkeypatch, ctx, answer=lambda r: f"Answer: {r.key.split('/')[1]} {r.key.split('/')[0]}.")
    run_stage(ctx, train_attributes_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "train_attributes")}
    assert sorted(rows) == sorted(g["sample_key"] for g in gen)
    sent = {r.key: r.prompt for b in rec.batches for r in b}
    assert sorted(sent) == sorted([f"{clip}-n-000/action", f"{clip}-n-000/scene", f"{clip}-a-000/anomaly",
                                   f"{clip}-a-000/scene", f"{clip}-ap-000/anomaly", f"{clip}-ap-000/scene"])
    assert sent[f"{clip}-ap-000/anomaly"].endswith(
        "Image caption: A man rides a skateboard and falls off the board.")
    n, ap = rows[f"{clip}-n-000"], rows[f"{clip}-ap-000"]
    assert n["status"] == OK and n["behavior"] == "normal" and n["action"] == f"action {clip}-n-000"
    assert n["scene"] == f"scene {clip}-n-000" and n["anomaly"] is None
    assert ap["behavior"] == "anomaly" and ap["anomaly"] == f"anomaly {clip}-ap-000" and ap["action"] is None
    assert ap["prompt_version"] == "attr_anomaly_v1,attr_scene_v1"
