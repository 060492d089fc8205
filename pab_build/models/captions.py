"""Qwen2-VL captioning shared by the stages ``test_captions`` and ``train_captions``.

Paper 3.1: each real test image is captioned by Qwen2-VL with the instruction in
``prompts/caption_v1.txt``, then checked by people (quality control: corrected captions replace
the generated ones). Paper 3.2: each synthetic training image is re-captioned the same way and
the generated caption is used as is.

Per image: the caption is the generated text with whitespace normalised; it is rejected as empty
(fewer than ``min_words`` words) or runaway (more than ``max_words`` words). A caption cut at
``max_new_tokens`` (no end token) is trimmed to its last whole sentence when at least
``trim_min_words`` words of whole sentences remain, so a long but good caption does not cost its
test pair; only when it cannot be trimmed, and the config asks for it, is it rejected as runaway.
``caption_end`` records which: finished / trimmed / unfinished.
"""

from __future__ import annotations

import re

from ..config import CaptionsConfig, model_id
from ..manifests import keep, reject
from ..engine.units import Context, Unit
from .vlm import (
    VLMRequest,
    answer_requests,
    load_backend,
    load_prompt,
    prompts_fingerprint,
)

TEST_CAPTIONS = "test_captions"


TRAIN_CAPTIONS = "train_captions"


CAPTION_PROMPT = "caption_v1"  # prompt file stem, recorded as prompt_version


def normalise_caption(text: str) -> str:
    """One line, single spaces (newlines, tabs and runs of spaces become one space)."""
    return " ".join(text.split())


# a sentence ends at . ! ? (and a closing quote or bracket) before a space or the end, but not after an
# abbreviation ("Mr.", "e.g.") or an initial ("J."), nor inside a number ("3.5")
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])(?<!\b(?i:mr|ms|dr|st|vs|jr|sr|no))(?<!\b(?i:mrs|etc|e\.g|i\.e))"
                           r"(?<!\b(?i:prof))(?<!\d(?=\.\d))[.!?][\"')\]\u201d\u2019]*(?=\s|$)")
CAPTION_ENDS = ("finished", "trimmed", "unfinished")


def trim_unfinished(caption: str, min_words: int) -> str | None:
    """A caption cut mid-sentence, trimmed to its last whole sentence; None when the whole sentences
    before the cut hold fewer than ``min_words`` words (then the cut caption is not usable)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(caption)]
    if not ends:
        return None
    trimmed = caption[:ends[-1]].strip()
    return trimmed if len(trimmed.split()) >= min_words else None


def caption_problem(caption: str, *, finished: bool, min_words: int, max_words: int, max_new_tokens: int,
                    reject_unfinished: bool) -> str | None:
    """Why a generated caption is unusable, or None when it is fine."""
    n = len(caption.split())
    if n < min_words or n == 0:
        return f"empty caption: {n} words (fewer than min_words={min_words})"
    if n > max_words:
        return f"runaway caption: {n} words (more than max_words={max_words})"
    if reject_unfinished and not finished:
        return f"runaway caption: generation stopped at max_new_tokens={max_new_tokens} without an end token"
    return None


# -- planning -------------------------------------------------------------------------------------
def image_item(key: str, image_row: dict | None) -> dict:
    return {
        "sample_key": key,
        "image_path": image_row.get("image_path") if image_row else None,
        "image_sha256": image_row.get("image_sha256") if image_row else None,
    }


# -- running --------------------------------------------------------------------------------------
def caption_rows(items: list[dict], answers: dict[str, tuple[str, bool]], sec: CaptionsConfig,
                 model: str) -> list[dict]:
    """Manifest rows for captioned items: ``answers`` maps sample_key -> (generated text, finished)."""
    gen = sec.generation
    # config field expected from the lead (smoke: false, as a random model never stops by itself)
    reject_unfinished = sec.reject_unfinished
    rows = []
    for it in items:
        raw, finished = answers[it["sample_key"]]
        generated, end = normalise_caption(raw), "finished" if finished else "unfinished"
        if not finished and (trimmed := trim_unfinished(generated, sec.trim_min_words)) is not None:
            generated, finished, end = trimmed, True, "trimmed"  # whole sentences: nothing runaway left
        base = {"caption_generated": raw, "prompt_version": CAPTION_PROMPT, "model_id": model,
                "finished": end == "finished", "caption_end": end}
        correction = normalise_caption(it.get("caption_correction") or "")
        if correction:  # a person's caption wins over the model's, whatever the model wrote
            rows.append(keep(it, **base, caption=correction, caption_corrected=correction != generated))
            continue
        why = caption_problem(generated, finished=finished, min_words=sec.min_words, max_words=sec.max_words,
                              max_new_tokens=gen.max_new_tokens, reject_unfinished=reject_unfinished)
        if why:
            rows.append(reject(it, why, **base, caption=None, caption_corrected=False))
        else:
            rows.append(keep(it, **base, caption=generated, caption_corrected=False))
    return rows


def load_unit_images(ctx: Context, items: list[dict], missing_reason: str) -> tuple[dict, dict]:
    """(sample_key -> PIL image, sample_key -> rejected row) for a unit's items."""
    images, rejected = {}, {}
    for it in items:
        if not it.get("image_path"):
            rejected[it["sample_key"]] = reject(it, missing_reason)
            continue
        try:
            images[it["sample_key"]] = ctx.store.read_image(it["image_path"])
        except Exception as e:  # noqa: BLE001 - missing or corrupt file: this item only
            rejected[it["sample_key"]] = reject(it, f"image unreadable: {it['image_path']}: {type(e).__name__}")
    return images, rejected


def caption_unit(ctx: Context, unit: Unit, sec: CaptionsConfig, missing_reason: str) -> list[dict]:
    images, rejected = load_unit_images(ctx, list(unit.items), missing_reason)
    todo = [it for it in unit.items if it["sample_key"] in images]
    answers: dict[str, tuple[str, bool]] = {}
    if todo:
        prompt = load_prompt(CAPTION_PROMPT)
        requests = [VLMRequest(it["sample_key"], images[it["sample_key"]], prompt, it.get("image_sha256"))
                    for it in todo]
        backend = load_backend(ctx.cfg, sec.generation)
        got = answer_requests(ctx.store, unit.stage, unit.unit_id, backend, requests, sec.generation)
        answers = {r.key: (a.text, a.finished) for r, a in zip(requests, got)}
    rows = {r["sample_key"]: r for r in caption_rows(todo, answers, sec, model_id(ctx.cfg, "qwen2_vl"))}
    rows.update(rejected)
    return [rows[k] for k in unit.sample_keys]


CAPTION_STAGE_VERSION = f"2+{prompts_fingerprint(CAPTION_PROMPT)}"
