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
import logging
import math
import os
import stat
import statistics
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

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
    problem: str | None = None  # why this clip cannot be used (malformed record, clashing files)

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


class RecordError(ValueError):
    """One annotation record is malformed; the message names the file, the clip and the field."""


def _number(value, where: str) -> float:
    # bool is an int in Python but never a time; strings ("2.0") are rejected, not guessed at
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "null" if value is None else type(value).__name__
        raise RecordError(f"{where} is {value!r} ({kind}), expected a number")
    if not math.isfinite(value):
        raise RecordError(f"{where} is {value!r}, expected a finite number")
    return float(value)


def _numbers(value, where: str) -> tuple[float, ...]:
    """A number or a flat list of numbers (annotator times); null means none."""
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(_number(x, f"{where}[{i}]") for i, x in enumerate(value))
    return (_number(value, where),)


def parse_times_record(rec, where: str) -> tuple[tuple[float, ...], float | None, tuple[float, ...] | None]:
    """(times, length_s, rel_t) of one transition-times record, or :class:`RecordError`."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where} is a {type(rec).__name__}, expected an object with t, len, rel_t")
    times = _numbers(rec.get("t"), f"{where}: field 't'")
    length = None
    if rec.get("len") is not None:
        length = _number(rec["len"], f"{where}: field 'len'")
        if length <= 0:
            raise RecordError(f"{where}: field 'len' is {length:g}, expected a positive length")
    rel_t = _numbers(rec.get("rel_t"), f"{where}: field 'rel_t'") or None
    return times, length, rel_t


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{where} is a {type(value).__name__}, expected text")
    return value.strip()


def _svos(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, list) and all(isinstance(w, str) for w in t)
                                              for t in value):
        raise RecordError(f"{where} is not a list of [subject, verb, object] word lists")
    return list(value)


def _parse_captions(entries, where: str) -> tuple[Caption, ...]:
    if entries is None:
        return ()
    if isinstance(entries, dict):  # some dumps store one annotation, not a list
        entries = [entries]
    if not isinstance(entries, list):
        raise RecordError(f"{where} is a {type(entries).__name__}, expected a list of caption objects")
    out = []
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise RecordError(f"{at} is a {type(e).__name__}, expected an object with goal and wentwrong")
        out.append(Caption(goal=_text(e.get("goal"), f"{at}: field 'goal'"),
                           wentwrong=_text(e.get("wentwrong"), f"{at}: field 'wentwrong'"),
                           goal_svos=_svos(e.get("kgoalsvos"), f"{at}: field 'kgoalsvos'"),
                           wentwrong_svos=_svos(e.get("kwentwrongsvos"), f"{at}: field 'kwentwrongsvos'")))
    return tuple(out)


@dataclass
class AnnotationFile:
    """One annotation file: its records by repaired clip name, or why it could not be read."""

    rel: str  # path relative to the OOPS! root, as named in reasons
    records: dict = field(default_factory=dict)
    error: str | None = None  # the file exists but is unreadable: names the position
    twins: dict = field(default_factory=dict)  # repaired name -> the raw keys that map to it (> 1)


def load_annotation_file(root: str, rel: str) -> AnnotationFile:
    """Read one annotation JSON file. A missing file has no records; an unreadable one (truncated,
    not UTF-8, not an object) has no records and an error naming the file and the position, which
    is logged once and becomes the reason of every clip that needed a record from it."""
    out = AnnotationFile(rel)
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return out
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the build forever
            raise OSError(0, "not a regular file")
        with open(path, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        out.error = f"{rel} is unreadable: not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        out.error = f"{rel} is unreadable: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
    except OSError as e:
        out.error = f"{rel} is unreadable: {e.strerror}"
    else:
        if not isinstance(data, dict):
            out.error = f"{rel} is unreadable: top level is a {type(data).__name__}, expected an object of clips"
        else:
            keys: dict[str, list[str]] = {}
            for k, v in data.items():
                keys.setdefault(repair_mojibake(k), []).append(k)
                out.records[repair_mojibake(k)] = v
            out.twins = {name: raw_keys for name, raw_keys in keys.items() if len(raw_keys) > 1}
    if out.error:
        log.error("OOPS! annotations: %s", out.error)
    return out


def _file_name(fn: str) -> tuple[str, str | None]:
    """(stem as text, problem): a name that is not valid UTF-8 is shown with \\x escapes."""
    stem = os.path.splitext(fn)[0]
    try:
        stem.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(stem).decode("utf-8", "backslashreplace")
        return shown, f"video file name {shown!r} is not valid UTF-8: rename the file"
    return stem, None


def video_files(root: str, splits: list[str]) -> dict[str, list[tuple[str, str, str | None]]]:
    """Repaired clip name -> [(split, path, name problem)] for every video file of the splits.
    More than one entry means two files claim one clip."""
    found: dict[str, list[tuple[str, str, str | None]]] = {}
    for split in splits:
        vdir = os.path.join(root, "oops_video", split)
        if not os.path.isdir(vdir):
            continue
        for fn in sorted(os.listdir(vdir)):
            if os.path.splitext(fn)[1].lower() in VIDEO_EXTENSIONS:
                stem, problem = _file_name(fn)
                found.setdefault(repair_mojibake(stem), []).append((split, os.path.join(vdir, fn), problem))
    return found


def _times_for(name: str, files: list[AnnotationFile]):
    """(times, length, rel_t, problem) of a clip from the first file that has it."""
    for f in files:
        if name in f.records:
            if name in f.twins:
                return (), None, None, (f"{f.rel} has {len(f.twins[name])} records for this clip "
                                        f"({', '.join(map(repr, f.twins[name]))}): which one is meant is unknown")
            try:
                return (*parse_times_record(f.records[name], f"{f.rel}: clip {name!r}"), None)
            except RecordError as e:
                return (), None, None, str(e)
    unreadable = [f.error for f in files if f.error]
    if unreadable:
        return (), None, None, "no transition times: " + "; ".join(unreadable)
    return (), None, None, None


def load_clips(root: str, splits: list[str]) -> list[ClipRecord]:
    """Every clip that has a video file or captions in the given splits, sorted by name; never raises
    on bad input.

    A clip is listed under the split whose video folder holds it (or whose svos file names it);
    clips that are in the annotations but have no video keep ``video_path=None`` so the frames stage
    can reject them with a reason instead of losing them silently. A clip whose annotation record is
    malformed, or that two video files claim (same stem with two extensions, mojibake twins, one
    name in two splits), carries a ``problem`` naming the file, the field or every video file.
    """
    times_files = [load_annotation_file(root, f"annotations/{n}")
                   for n in ("transition_times.json", "heldout_transition_times.json")]
    on_disk = video_files(root, splits)
    clips: dict[str, ClipRecord] = {}
    for split in splits:
        caps = load_annotation_file(root, f"svos/{split}.json")
        here = {n for n, files in on_disk.items() if files[0][0] == split}
        for name in sorted(here | set(caps.records)):
            if name in clips:  # captioned in two splits' svos files: the first split keeps it
                continue
            files = on_disk.get(name, [])
            times, length, rel_t, problem = _times_for(name, times_files)
            captions: tuple[Caption, ...] = ()
            try:
                captions = _parse_captions(caps.records.get(name), f"{caps.rel}: clip {name!r}")
            except RecordError as e:
                problem = problem or str(e)
            if len(files) > 1:
                named = ", ".join(os.path.relpath(p, root) for _, p, _ in files)
                problem = f"{len(files)} video files claim this clip (same name after mojibake repair): {named}"
            elif files and files[0][2]:
                problem = files[0][2]
            clips[name] = ClipRecord(
                clip_name=name, clip_key=clip_key(name), split=files[0][0] if files else split,
                video_path=files[0][1] if len(files) == 1 and not files[0][2] else None,
                times=times, length_s=length, rel_t=rel_t, captions=captions, problem=problem,
            )
    return [clips[k] for k in sorted(clips)]


def load_captions(root: str, splits: list[str]) -> list[ClipRecord]:
    """Clips with at least one caption annotation (the training branch's input)."""
    return [c for c in load_clips(root, splits) if c.captions]
