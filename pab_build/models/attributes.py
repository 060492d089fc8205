"""Attribute questions (appendix A.1) shared by ``test_attributes`` and ``train_attributes``.

Each image is asked two questions with its source caption C substituted into the instruction:
a normal image its action type and scene, an anomaly image its anomaly behaviour class and scene.
For a test image C is the OOPS! caption of its clip (C_n or C_a); for a training image C is the
prompt it was generated from (C_n, C_a or C_a+). All questions of a unit go to the model in one
length-sorted queue. Each answer's label is read from its sentence (:mod:`.answer_labels`); an answer
with no readable label rejects its row ("unreadable answer: ..."), the raw answers are kept.
"""

from __future__ import annotations

from .answer_labels import answer_label
from .captions import load_unit_images
from ..config import model_id
from ..manifests import keep, reject
from ..engine.units import Context, Unit
from .vlm import (
    VLMRequest,
    answer_requests,
    fill_prompt,
    load_backend,
    load_prompt,
    prompts_fingerprint,
)

TEST_ATTRIBUTES = "test_attributes"


TRAIN_ATTRIBUTES = "train_attributes"


ATTRIBUTE_PROMPTS = {"action": "attr_action_v1", "anomaly": "attr_anomaly_v1", "scene": "attr_scene_v1"}


QUESTIONS = {"normal": ("action", "scene"), "anomaly": ("anomaly", "scene")}




def attribute_questions(behavior: str) -> tuple[str, ...]:
    try:
        return QUESTIONS[behavior]
    except KeyError:
        raise ValueError(f"unknown behavior {behavior!r}; expected one of {sorted(QUESTIONS)}") from None


def prompt_versions(behavior: str) -> str:
    return ",".join(ATTRIBUTE_PROMPTS[q] for q in attribute_questions(behavior))


# -- running --------------------------------------------------------------------------------------
def item_problem(item: dict) -> str | None:
    if item.get("behavior") not in QUESTIONS:
        return f"unknown behavior {item.get('behavior')!r} (no normal/anomaly label upstream)"
    if not (item.get("source_caption") or "").strip():
        return "no source caption C to put into the attribute instructions"
    return None


def attribute_row(item: dict, raw: dict[str, str], max_words: int, model: str) -> dict:
    """One manifest row from an item's raw answers (question -> text)."""
    row: dict = {"behavior": item["behavior"], "prompt_version": prompt_versions(item["behavior"]),
                 "model_id": model}
    unreadable = []
    for q in ("action", "anomaly", "scene"):
        if q not in raw:
            row[q] = row[f"{q}_raw"] = None
            continue
        row[f"{q}_raw"] = raw[q]
        row[q] = answer_label(q, raw[q], max_words)
        if row[q] is None:
            unreadable.append(q)
    if unreadable:  # never a sentence stored as a label: the raw answer goes into the reason
        shown = "; ".join(f"{q}={raw[q][:120]!r}" for q in unreadable)
        return reject(item, f"unreadable answer: {shown}", **row)
    return keep(item, **row)


def run_attribute_unit(ctx: Context, unit: Unit) -> list[dict]:
    sec = ctx.cfg.attributes
    usable = []
    rows: dict[str, dict] = {}
    for it in unit.items:
        why = item_problem(it)
        if why:
            rows[it["sample_key"]] = reject(it, why, behavior=it.get("behavior"))
        else:
            usable.append(it)
    images, rejected = load_unit_images(ctx, usable, "no image for this sample upstream")
    rows.update(rejected)
    requests, asked = [], []
    templates = {q: load_prompt(v) for q, v in ATTRIBUTE_PROMPTS.items()}
    for it in usable:
        if it["sample_key"] not in images:
            continue
        for q in attribute_questions(it["behavior"]):
            prompt = fill_prompt(templates[q], it["source_caption"])
            requests.append(VLMRequest(f"{it['sample_key']}/{q}", images[it["sample_key"]], prompt,
                                       it.get("image_sha256")))
            asked.append((it, q))
    raw: dict[str, dict[str, str]] = {}
    if requests:
        backend = load_backend(ctx.cfg, sec.generation)
        answers = answer_requests(ctx.store, unit.stage, unit.unit_id, backend, requests, sec.generation)
        for (it, q), a in zip(asked, answers):
            raw.setdefault(it["sample_key"], {})[q] = a.text
    model = model_id(ctx.cfg, "qwen2_vl")
    for it in usable:
        if it["sample_key"] in raw:
            rows[it["sample_key"]] = attribute_row(it, raw[it["sample_key"]], sec.max_words, model)
    return [rows[k] for k in unit.sample_keys]


ATTRIBUTE_STAGE_VERSION = f"2+{prompts_fingerprint(*ATTRIBUTE_PROMPTS.values())}"
