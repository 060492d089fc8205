"""Stage ``prompts``: C_n / C_a / C_a+ prompts of the training set from person-subject captions.

Paper 3.2: "for cases where both C_n and C_a are retained, we concatenate them to form a new C_a+."
The subject filter itself is :mod:`pab_build.text.subjects`.
"""

from __future__ import annotations

import json
import os

from .. import oops
from ..config import oops_root
from ..manifests import decide, manifest_rel, ok_rows
from ..text import wordnet
from ..text.subjects import analyse_subject
from ..text.words import LEXICON_PATH
from ..engine.units import Context, Stage, Unit, chunk_units

PROMPTS = "prompts"


CLIPS_PER_UNIT = 256  # prompt building is cheap: a unit only bounds what a rerun redoes


KIND_SUFFIX = {"n": "n", "a": "a", "a+": "ap"}


# -- stage prompts --------------------------------------------------------------------------------
def prompt_key(clip_key: str, kind: str, annotation_index: int | None = None) -> str:
    """``{clip_key}-n`` / ``-a`` / ``-ap``; with every annotation, ``{clip_key}-{index}-n``."""
    middle = "" if annotation_index is None else f"-{annotation_index}"
    return f"{clip_key}{middle}-{KIND_SUFFIX[kind]}"


def join_prompts(goal: str, wentwrong: str) -> str:
    """C_a+: C_n and C_a concatenated into one sentence."""
    return f"{goal.rstrip(' .,;!?')}, {wentwrong}"


def _test_set_clip_keys(ctx: Context) -> set[str]:
    """Every test candidate that survived the automatic filters (``pairs``): a small superset of the
    clips in the finished test shards (review and caption QC only remove clips), so the training
    branch never waits for people. The cost: clips people later reject are lost to training too."""
    rel = manifest_rel("pairs")
    if not ctx.store.exists(rel):
        raise FileNotFoundError(
            f"prompts.exclude_test_clips is on but {rel} is missing: run the test branch up to pairs first "
            "(stages frames .. pairs), or set prompts.exclude_test_clips=false"
        )
    return {r["clip_key"] for r in ok_rows(ctx.store, "pairs", ["clip_key"]) if r.get("clip_key")}


def plan_prompt_units(ctx: Context) -> list[Unit]:
    """One item per (clip, annotation, kind); a clip's items share a unit (a+ and the counterpart
    links need the whole clip). The training branch reads the captions of both OOPS! splits."""
    sec = ctx.cfg.prompts
    test_clips = _test_set_clip_keys(ctx) if sec.exclude_test_clips else set()
    root = os.path.expanduser(oops_root(ctx.cfg))
    items = []
    for clip in oops.load_captions(root, ["train", "val"]):
        indices = range(len(clip.captions)) if sec.annotation_index == "all" else [sec.annotation_index]
        for index in indices:
            cap = clip.captions[index] if index < len(clip.captions) else None
            for kind in KIND_SUFFIX:
                items.append({
                    "sample_key": prompt_key(clip.clip_key, kind, index if sec.annotation_index == "all" else None),
                    "clip_name": clip.clip_name, "clip_key": clip.clip_key, "split": clip.split, "kind": kind,
                    "annotation_index": index, "annotations": len(clip.captions),
                    "goal": cap.goal if cap else None, "wentwrong": cap.wentwrong if cap else None,
                    "goal_svos": cap.goal_svos if cap else [], "wentwrong_svos": cap.wentwrong_svos if cap else [],
                    "in_test_set": clip.clip_key in test_clips,
                })
    return chunk_units(PROMPTS, items, CLIPS_PER_UNIT, group_key="clip_key")


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _annotation_rows(items: dict[str, dict], extra: tuple[list[str], list[str]]) -> dict[str, tuple[dict, str | None]]:
    """kind -> (row fields, problem) for one clip annotation's n / a / a+ items."""
    first = next(iter(items.values()))
    shared_problem = None
    if first["in_test_set"]:
        shared_problem = "clip is a test-set candidate (kept by pairs)"
    elif first["goal"] is None:
        shared_problem = (f"clip has {first['annotations']} caption annotation(s); "
                          f"annotation_index={first['annotation_index']} is out of range")
    found = {
        "n": analyse_subject(first["goal"] or "", first["goal_svos"], *extra),
        "a": analyse_subject(first["wentwrong"] or "", first["wentwrong_svos"], *extra),
    }
    prompts = {"n": _clean(first["goal"]), "a": _clean(first["wentwrong"])}
    prompts["a+"] = join_prompts(prompts["n"], prompts["a"]) if prompts["n"] and prompts["a"] else ""
    out = {}
    for kind in items:
        if shared_problem:
            problem = shared_problem
        elif kind == "a+":
            failed = [f"C_{k}: {found[k].problem}" for k in ("n", "a") if found[k].problem]
            problem = f"a+ needs both C_n and C_a kept ({'; '.join(failed)})" if failed else None
        else:
            problem = found[kind].problem
        subject = found["n" if kind == "a+" else kind].subject
        out[kind] = ({"prompt": prompts[kind] or None, "subject": subject}, problem)
    return out


def run_prompt_unit(ctx: Context, unit: Unit) -> list[dict]:
    sec = ctx.cfg.prompts
    extra = (list(sec.extra_person_words), list(sec.extra_non_person_words))
    groups: dict[tuple[str, int], dict[str, dict]] = {}
    for it in unit.items:
        groups.setdefault((it["clip_key"], it["annotation_index"]), {})[it["kind"]] = it
    decided: dict[str, tuple[dict, dict, str | None]] = {}  # sample_key -> (item, fields, problem)
    for group in groups.values():
        for kind, (fields, problem) in _annotation_rows(group, extra).items():
            decided[group[kind]["sample_key"]] = (group[kind], fields, problem)
    ok_by_clip: dict[tuple[str, str], list[str]] = {}  # (clip_key, behavior) -> ok prompt keys
    for key, (it, _, problem) in sorted(decided.items()):
        if problem is None:
            ok_by_clip.setdefault((it["clip_key"], "normal" if it["kind"] == "n" else "anomaly"), []).append(key)
    rows = []
    for it in unit.items:
        _, fields, problem = decided[it["sample_key"]]
        other = "anomaly" if it["kind"] == "n" else "normal"
        row = {k: it[k] for k in ("clip_name", "clip_key", "split", "kind", "annotation_index")}
        row |= fields | {"counterpart_keys": json.dumps(ok_by_clip.get((it["clip_key"], other), []))}
        rows.append(decide(it, problem, **row))
    return rows


STAGE = Stage(
    name=PROMPTS,
    plan_units=plan_prompt_units,
    run_unit=run_prompt_unit,
    config_keys=("prompts", "oops"),
    version="2",
    data_files=(LEXICON_PATH, wordnet.fingerprint),
)
