"""OOPS! annotations -> typed clip records.

Layout of an OOPS!-format root::

    oops_video/{train,val}/<clip>.mp4
    annotations/transition_times.json   clip -> {t: [3 annotator times, -1 = none], len, rel_t, n_notfound, ...}
    annotations/heldout_transition_times.json   (optional; no len/rel_t: the video's duration is used)
    svos/{train,val}.json                clip -> [{goal, wentwrong, kgoalsvos, kwentwrongsvos}, ...]

The failure time follows the official loader: the median of the annotators' ``t``; a clip is
dropped when that median is negative, its median ``rel_t`` is outside [min_rel_t, max_rel_t], or
its length is outside [min_len_s, max_len_s].
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass, field

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")


def repair_mojibake(name: str) -> str:
    """Undo UTF-8 text that was decoded as cp1252 (``"Ã©"`` -> ``"é"``); leave clean text alone."""
    try:
        fixed = name.encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name
    return fixed


def clip_key(clip_name: str) -> str:
    """Stable, filename-safe identity of a clip: ``c`` + 10 hex chars of sha1(repaired name)."""
    return "c" + hashlib.sha1(repair_mojibake(clip_name).encode("utf-8")).hexdigest()[:10]


@dataclass(frozen=True)
class Caption:
    goal: str  # C_n: what the person intended (normal)
    wentwrong: str  # C_a: what went wrong (anomaly)
    goal_svos: list = field(default_factory=list)  # [[subject, verb, object], ...]
    wentwrong_svos: list = field(default_factory=list)


@dataclass(frozen=True)
class ClipRecord:
    clip_name: str  # repaired name
    clip_key: str
    split: str  # "train" | "val"
    video_path: str | None  # absolute path of the video, None when missing
    times: tuple[float, ...]  # annotator failure times (s), -1 = no failure seen
    length_s: float | None  # clip length from the annotations (None in the held-out file)
    rel_t: tuple[float, ...] | None
    captions: tuple[Caption, ...]

    @property
    def failure_time_s(self) -> float:
        return float(statistics.median(self.times)) if self.times else -1.0

    @property
    def median_rel_t(self) -> float | None:
        return float(statistics.median(self.rel_t)) if self.rel_t else None


def filter_reason(clip: ClipRecord, duration_s: float | None, *, min_rel_t: float, max_rel_t: float,
                  min_len_s: float, max_len_s: float) -> str | None:
    """Why the official rule drops this clip, or None to keep it. ``duration_s`` is the clip length
    (annotated ``len``, else the video's own duration)."""
    t = clip.failure_time_s
    if t < 0:
        return f"no failure time: median of annotator times {list(clip.times)} is {t:g} (< 0)"
    if duration_s is None:
        return "clip length unknown: no annotated len and the video could not be read"
    if not (min_len_s <= duration_s <= max_len_s):
        return f"clip length {duration_s:.2f}s outside [{min_len_s:g}, {max_len_s:g}]s"
    rel = clip.median_rel_t if clip.median_rel_t is not None else t / duration_s
    if not (min_rel_t <= rel <= max_rel_t):
        return f"relative failure time {rel:.3f} outside [{min_rel_t:g}, {max_rel_t:g}]"
    return None


def _as_floats(v) -> tuple[float, ...]:
    if v is None:
        return ()
    if isinstance(v, (int, float)):
        return (float(v),)
    return tuple(float(x) for x in v)


def _load_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping clip names to records")
    return {repair_mojibake(k): v for k, v in data.items()}


def _parse_captions(entries) -> tuple[Caption, ...]:
    if isinstance(entries, dict):  # some dumps store one annotation, not a list
        entries = [entries]
    out = []
    for e in entries or []:
        if not isinstance(e, dict):
            continue
        out.append(Caption(
            goal=str(e.get("goal") or "").strip(),
            wentwrong=str(e.get("wentwrong") or "").strip(),
            goal_svos=list(e.get("kgoalsvos") or []),
            wentwrong_svos=list(e.get("kwentwrongsvos") or []),
        ))
    return tuple(out)


def load_clips(root: str, splits: list[str]) -> list[ClipRecord]:
    """Every clip that has transition times or captions in the given splits, sorted by name.

    A clip is listed under the split whose video folder holds it (or whose svos file names it);
    clips that are in the annotations but have no video keep ``video_path=None`` so the frames stage
    can reject them with a reason instead of losing them silently.
    """
    ann = os.path.join(root, "annotations")
    times = _load_json(os.path.join(ann, "transition_times.json"))
    heldout = _load_json(os.path.join(ann, "heldout_transition_times.json"))
    clips: dict[str, ClipRecord] = {}
    for split in splits:
        caps = _load_json(os.path.join(root, "svos", f"{split}.json"))
        vdir = os.path.join(root, "oops_video", split)
        on_disk = {}
        if os.path.isdir(vdir):
            for fn in os.listdir(vdir):
                stem, ext = os.path.splitext(fn)
                if ext.lower() in VIDEO_EXTENSIONS:
                    on_disk[repair_mojibake(stem)] = os.path.join(vdir, fn)
        for name in sorted(set(on_disk) | set(caps)):
            rec = times.get(name) or heldout.get(name) or {}
            clips[name] = ClipRecord(
                clip_name=name,
                clip_key=clip_key(name),
                split=split,
                video_path=on_disk.get(name),
                times=_as_floats(rec.get("t")),
                length_s=float(rec["len"]) if rec.get("len") is not None else None,
                rel_t=_as_floats(rec.get("rel_t")) or None,
                captions=_parse_captions(caps.get(name)),
            )
    return [clips[k] for k in sorted(clips)]


def load_captions(root: str, splits: list[str]) -> list[ClipRecord]:
    """Clips with at least one caption annotation (the training branch's input)."""
    return [c for c in load_clips(root, splits) if c.captions]
