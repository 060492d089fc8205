"""What a calibration measures: each filter's quantity (a manifest column), its threshold and the
config key that sets it, read back from the manifests a pilot's stages wrote (``calibrate.py`` runs
the pilot, ``calibration_page.py`` draws the page); the paper's figures they are set beside.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from ..config import PABConfig, oops_root
from ..manifests import OK, manifest_rel, read_manifest_table
from ..oops import load_clips
from ..store import Store

UNREADABLE_PREFIX = "unreadable answer:"

# the paper's figures (beyond-walking-paper.txt, sections 3.1-3.3) the pilot is set beside
PAPER = {
    "test_pairs": 989,  # after pose, similarity and human review
    "prompts": {"n": 6739, "a": 6979, "a+": 6669},  # 20,387 prompts, x 75 = 1,529,025 images
    "images_per_prompt": 75,
    "kept_images": 1013605,  # after the OpenPose structural filter, normal:anomaly about 2:3
    # 2:3 of 1,013,605 over 6,739 x 75 normal and 13,648 x 75 anomaly images
    "gen_pose_kept": {"normal": round(0.4 * 1013605 / (6739 * 75), 3),
                      "anomaly": round(0.6 * 1013605 / (13648 * 75), 3)},
    "top_classes": {"action": ["jumping", "skateboarding", "running", "walking", "sitting"],
                    "anomaly": ["falling (~40% of train, ~50% of test)"],
                    "scene": ["lawn", "gym", "parking lot"]},
}


@dataclass(frozen=True)
class Measure:
    """One filter's measured quantity: a manifest column, the threshold it is judged by and the
    config key that sets it (``passes(value, threshold)`` says which side is kept)."""

    name: str
    stage: str
    column: str
    key: str | None  # dotted config key of the threshold
    passes: Callable[[float, float], bool] | None = None
    hint: str = ""
    threshold: Callable[[PABConfig], float | None] | None = None  # when not the key's own value
    upper_key: str | None = None  # a second threshold drawn on the histogram (an upper bound)

    def threshold_value(self, cfg: PABConfig) -> float | None:
        if self.threshold is not None:
            return self.threshold(cfg)
        value = config_value(cfg, self.key) if self.key else None
        return None if isinstance(value, bool) else value


def _at_least(v: float, t: float) -> bool:
    return v >= t


def _at_most(v: float, t: float) -> bool:
    return v <= t


def _words(text: str | None) -> int:
    return len((text or "").split())


MEASURES = [
    Measure("person size, test frames", "pose", "person_height", "pose.min_person_height", _at_least,
            "raise to drop small, far people; lower when people the paper would keep are rejected"),
    Measure("people found, test frames", "pose", "person_count", "pose.require_person", _at_least,
            "require_person rejects frames where OpenPose finds nobody",
            threshold=lambda cfg: 1 if cfg.pose.require_person else None),
    Measure("keypoints, test frames", "pose", "keypoint_count", None, None, "no threshold in the pose stage"),
    Measure("pair cosine similarity", "pairs", "cosine", "pairs.max_cosine", _at_most,
            "the paper drops pairs above 0.95; lower it to drop more near-identical pairs"),
    Measure("person size, generated images", "gen_pose", "person_height", "gen_pose.min_person_height", _at_least,
            "raise to drop images whose person is small"),
    Measure("people found, generated images", "gen_pose", "person_count", "gen_pose.require_person", _at_least,
            "require_person rejects images where OpenPose finds nobody",
            threshold=lambda cfg: 1 if cfg.gen_pose.require_person else None),
    Measure("keypoints, generated images", "gen_pose", "keypoint_count", "gen_pose.min_keypoints", _at_least,
            "fewer body keypoints than this = broken body"),
    Measure("limb ratio, generated images", "gen_pose", "limb_ratio_max", "gen_pose.max_limb_ratio", _at_most,
            "a limb ratio above this = broken body; raise it when foreshortened limbs are rejected"),
    Measure("caption length (words), test", "test_captions", "caption_words", "test_captions.min_words", _at_least,
            "test_captions.min_words / max_words bound a caption's length", upper_key="test_captions.max_words"),
    Measure("caption length (words), train", "train_captions", "caption_words", "train_captions.min_words",
            _at_least, "train_captions.min_words / max_words bound a caption's length",
            upper_key="train_captions.max_words"),
]
CAPTION_END_STAGES = ["test_captions", "train_captions"]
ATTRIBUTE_STAGES = ["test_attributes", "train_attributes"]


def config_value(cfg: PABConfig, key: str, missing=None):
    """The value at dotted ``key`` of ``cfg``, or ``missing`` when this build's config has no such key."""
    cur = cfg.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return missing
        cur = cur[part]
    return cur


# -- reading the manifests back ------------------------------------------------------------------
def _manifest(store: Store, stage: str) -> pa.Table | None:
    return read_manifest_table(store, stage) if store.exists(manifest_rel(stage)) else None


def measured_rows(store: Store, m: Measure) -> list[dict] | None:
    """(value, status, reason, sample_key, image_path) rows of a measure; None when the stage's
    manifest has no such column (this build does not measure it)."""
    table = _manifest(store, m.stage)
    if table is None:
        return None
    texts = None
    if m.column == "caption_words":
        if "caption_generated" not in table.column_names:
            return None
        texts = table["caption_generated"].to_pylist()
        values = [_words(t) for t in texts]
    elif m.column in table.column_names:
        values = table[m.column].to_pylist()
    else:
        return None
    rows = []
    for i, r in enumerate(table.select([c for c in ("sample_key", "status", "reason", "behavior", "image_path",
                                                   "pair_key") if c in table.column_names]).to_pylist()):
        if m.stage == "pairs" and r.get("behavior") != "normal":
            continue  # one cosine per pair, shown on its normal frame
        if values[i] is not None:
            rows.append({**r, "value": float(values[i]), **({"text": texts[i]} if texts else {})})
    return rows


def near_threshold(rows: list[dict], m: Measure, threshold: float, per_side: int = 6) -> dict[str, list[dict]]:
    """The rows nearest ``threshold`` on its kept and its rejected side (by value, whatever else
    the stage rejected the row for)."""
    kept = sorted((r for r in rows if m.passes(r["value"], threshold)), key=lambda r: abs(r["value"] - threshold))
    dropped = sorted((r for r in rows if not m.passes(r["value"], threshold)),
                     key=lambda r: abs(r["value"] - threshold))
    return {"kept": kept[:per_side], "rejected": dropped[:per_side]}


def share(counter: Counter) -> dict:
    total = sum(counter.values())
    return {"total": total, "counts": dict(sorted(counter.items())),
            "shares": {k: round(v / total, 4) for k, v in sorted(counter.items())} if total else {}}


def caption_ends(store: Store, stage: str) -> dict | None:
    """How captions ended: ``caption_end`` when the build records it, else its ``finished`` flag."""
    table = _manifest(store, stage)
    if table is None:
        return None
    if "caption_end" in table.column_names:
        column, source = table["caption_end"].to_pylist(), "caption_end"
    elif "finished" in table.column_names:
        column = [None if f is None else ("finished" if f else "unfinished") for f in table["finished"].to_pylist()]
        source = "finished"
    else:
        return None
    return {**share(Counter(v for v in column if v is not None)), "source": source}


def attribute_answers(store: Store, stage: str) -> dict | None:
    """Readable vs unreadable attribute answers (rejected rows whose reason starts "unreadable answer:")."""
    table = _manifest(store, stage)
    if table is None:
        return None
    reasons = table["reason"].to_pylist()
    counts = Counter("unreadable" if (r or "").startswith(UNREADABLE_PREFIX) else "readable" for r in reasons)
    examples = [r for r in reasons if (r or "").startswith(UNREADABLE_PREFIX)][:8]
    return {**share(counts), "examples": examples}


def label_distribution(store: Store, stage: str, top: int = 10) -> dict[str, list[tuple[str, int]]]:
    table = _manifest(store, stage)
    if table is None:
        return {}
    ok = [r for r in table.to_pylist() if r["status"] == OK]
    return {field: Counter(r[field] for r in ok if r.get(field)).most_common(top)
            for field in ("action", "anomaly", "scene")}


def gen_pose_kept(store: Store) -> dict:
    """Kept fraction of generated images by behavior (prompt kind n = normal; a, a+ = anomaly)."""
    gen, pose = _manifest(store, "generate"), _manifest(store, "gen_pose")
    if gen is None or pose is None:
        return {}
    kind = dict(zip(gen["sample_key"].to_pylist(), gen["kind"].to_pylist()))
    counts: dict[str, Counter] = {"normal": Counter(), "anomaly": Counter()}
    for key, status in zip(pose["sample_key"].to_pylist(), pose["status"].to_pylist()):
        counts["normal" if kind.get(key) == "n" else "anomaly"][status] += 1
    return {b: {"images": sum(c.values()), "kept": c[OK],
                "kept_fraction": round(c[OK] / sum(c.values()), 4) if c else None,
                "paper": PAPER["gen_pose_kept"][b]} for b, c in counts.items()}


def test_pair_yield(store: Store, cfg: PABConfig) -> dict:
    """Pairs kept by pose and similarity, scaled to the whole OOPS! root by the sampled fraction
    (clips sampled / clips in the configured splits), beside the paper's 989 (which also passed review)."""
    pairs = _manifest(store, "pairs")
    frames = _manifest(store, "frames")
    sampled = len(set(frames["clip_key"].to_pylist())) if frames is not None else 0
    total = len(load_clips(oops_root(cfg), list(cfg.oops.splits)))
    kept = 0
    if pairs is not None:
        kept = sum(1 for b, s in zip(pairs["behavior"].to_pylist(), pairs["status"].to_pylist())
                   if b == "normal" and s == OK)
    scale = total / sampled if sampled else None
    return {"clips_sampled": sampled, "clips_in_root": total, "pairs_kept": kept,
            "projected_pairs": round(kept * scale) if scale else None, "scale": round(scale, 3) if scale else None,
            "paper": PAPER["test_pairs"],
            "how": "pairs kept in the sample x (clips in the OOPS! root's configured splits / clips sampled); "
                   "the paper's 989 also passed human review, which the pilot does not run"}


def rejection_reasons(store: Store, stages: list[str], top: int = 6) -> dict[str, list[tuple[str, int]]]:
    """Per stage, the commonest rejection reasons up to their first colon (the rule, not the value)."""
    out = {}
    for stage in stages:
        table = _manifest(store, stage)
        if table is not None:
            reasons = (r.split(":")[0] for r in table["reason"].to_pylist() if r)
            out[stage] = Counter(reasons).most_common(top)
    return out


def summarise(store: Store, cfg: PABConfig) -> dict:
    """Every number the page shows, JSON-ready (``calibration/summary.json``)."""
    filters = {}
    for m in MEASURES:
        rows = measured_rows(store, m)
        threshold = m.threshold_value(cfg)
        entry = {"stage": m.stage, "column": m.column, "threshold_key": m.key, "threshold": threshold,
                 "upper_threshold": config_value(cfg, m.upper_key) if m.upper_key else None,
                 "hint": m.hint, "measured": rows is not None}
        if rows is not None:
            values = sorted(r["value"] for r in rows)
            entry.update(count=len(values), min=values[0] if values else None, max=values[-1] if values else None,
                         median=values[len(values) // 2] if values else None,
                         stage_kept=sum(r["status"] == OK for r in rows))
            if threshold is not None and m.passes is not None:
                entry["pass_threshold"] = sum(m.passes(v, threshold) for v in values)
        filters[m.name] = entry
    return {
        "profile": cfg.profile,
        "samples": cfg.oops.limit,
        "images_per_prompt": cfg.generate.images_per_caption,
        "filters": filters,
        "caption_ends": {s: caption_ends(store, s) for s in CAPTION_END_STAGES},
        "attribute_answers": {s: attribute_answers(store, s) for s in ATTRIBUTE_STAGES},
        "gen_pose_kept": gen_pose_kept(store),
        "test_pairs": test_pair_yield(store, cfg),
        "labels": {s: label_distribution(store, s) for s in ATTRIBUTE_STAGES},
        "rejections": rejection_reasons(store, ["frames", "pose", "pairs", "gen_pose", *CAPTION_END_STAGES,
                                                *ATTRIBUTE_STAGES]),
        "paper": PAPER,
    }
