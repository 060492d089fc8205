"""Stage ``review`` (human verification of the test pairs) and the caption QC files.

Paper 3.1: "we conduct manual verification by three professionals [...], retaining only those
image pairs of certain normal and anomaly behaviors", and the generated test captions are
corrected by people. Both go through files people fill in:

- ``review/index.html`` (self-contained page to click through; it downloads the decisions file)
  and ``review/decisions_template.csv`` (``pair_key`` = clip_key, ``clip_name``, ``decision``
  accept|reject, ``reason``, ``reviewer``).
  Each reviewer returns one CSV or JSONL file; ``review.decisions_files`` lists them. A pair is
  kept only if every reviewer who decided it accepted; a pair nobody decided is rejected. When a
  reviewer decides the same pair twice, the later line wins (files in the given order).
- ``review/captions.html`` (the same kind of page) and ``review/captions_template.csv`` (``sample_key``,
  ``caption_generated``, ``caption_corrected``, ``reviewer``); an empty correction keeps the
  generated caption. Read back by :func:`load_caption_corrections` (the captions stage).

A key that is not in the build (a typo) or a decision other than accept/reject is an error naming
the file, the line and the closest known key: a silently ignored line would ship a pair a
reviewer rejected.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass

import fsspec

from ..manifests import OK, keep, manifest_rel, read_manifest, reject
from ..shards.pairing import pair_problem
from ..review_page import image_data_uri, render_page
from ..engine.units import Context, Stage, Unit, chunk_units

REVIEW = "review"
CLIPS_PER_UNIT = 256
DECISIONS = ("accept", "reject")
AUTO_REVIEWER = "auto"
SHEET_REL = "review/index.html"
TEMPLATE_REL = "review/decisions_template.csv"
CAPTION_SHEET_REL = "review/captions.html"
CAPTION_TEMPLATE_REL = "review/captions_template.csv"
DECISION_COLUMNS = ("pair_key", "clip_name", "decision", "reason", "reviewer")
CAPTION_COLUMNS = ("sample_key", "caption_generated", "caption_corrected", "reviewer")


class ReviewFileError(ValueError):
    """A reviewer's file that cannot be used as it is; the message names the file and line."""


@dataclass(frozen=True)
class Decision:
    pair_key: str  # the clip_key of the pair
    decision: str  # "accept" | "reject"
    reason: str
    reviewer: str
    source: str  # "file:line", for messages


@dataclass(frozen=True)
class Verdict:
    kept: bool
    decision: str | None  # merged decision; None when nobody decided
    reviewers: str | None  # comma-separated, sorted
    reason: str | None  # why the pair is not kept


# -- reading reviewers' files ---------------------------------------------------------------------
def _read_text(path: str) -> str:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"review file {path} does not exist")
    try:
        return fs.cat_file(p).decode("utf-8-sig")  # spreadsheet programs often write a BOM
    except UnicodeDecodeError as e:
        raise ReviewFileError(f"review file {path} is not UTF-8 text (byte {e.start}): save it as CSV UTF-8") from None


def read_records(path: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) for each record of a CSV or JSON Lines file."""
    text = _read_text(path)
    out: list[tuple[int, dict]] = []
    if path.lower().endswith((".jsonl", ".json", ".ndjson")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReviewFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ReviewFileError(f"{path}:{n}: expected a JSON object with {', '.join(required)}")
            out.append((n, {k: "" if v is None else str(v) for k, v in rec.items()}))
        return out
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise ReviewFileError(f"{path}: missing column(s) {missing}; the header must include {', '.join(required)}")
    for rec in reader:
        out.append((reader.line_num, {k: (v or "") for k, v in rec.items() if k is not None}))
    return out


def _check_key(key: str, known: set[str], where: str, what: str) -> None:
    if key in known:
        return
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ReviewFileError(f"{where}: unknown {what} {key!r} (not in this build){hint}")


def load_decisions(paths: list[str], known_pair_keys: set[str]) -> dict[str, list[Decision]]:
    """pair_key -> the reviewers' decisions, in file and line order. Rows with an empty decision
    are not decided yet and are skipped; the reviewer defaults to the file's name."""
    known = set(known_pair_keys)
    out: dict[str, list[Decision]] = {}
    for path in paths:
        default_reviewer = os.path.splitext(os.path.basename(path))[0]
        for line, rec in read_records(path, ("pair_key", "decision")):
            key, raw = rec.get("pair_key", "").strip(), rec.get("decision", "").strip()
            if not key and not raw:
                continue
            where = f"{path}:{line}"
            if not key:
                raise ReviewFileError(f"{where}: decision {raw!r} has no pair_key")
            _check_key(key, known, where, "pair_key")
            if not raw:
                continue
            if raw.lower() not in DECISIONS:
                raise ReviewFileError(f"{where}: decision {raw!r} for {key} must be 'accept' or 'reject'")
            reviewer = rec.get("reviewer", "").strip() or default_reviewer
            out.setdefault(key, []).append(
                Decision(key, raw.lower(), " ".join(rec.get("reason", "").split()), reviewer, where))
    return out


def merge_decisions(decisions: list[Decision]) -> Verdict:
    """Every reviewer who decided must accept (a reviewer's later decision replaces the earlier)."""
    latest = {d.reviewer: d for d in decisions}
    if not latest:
        return Verdict(False, None, None, "no reviewer decision")
    reviewers = ",".join(sorted(latest))
    refusals = [latest[r] for r in sorted(latest) if latest[r].decision == "reject"]
    if not refusals:
        return Verdict(True, "accept", reviewers, None)
    why = "; ".join(f"reviewer {d.reviewer}: {d.reason or 'no reason given'}" for d in refusals)
    return Verdict(False, "reject", reviewers, f"rejected by {why}")


def decisions_ready(paths: list[str]) -> bool:
    """Whether the reviewers' files are there (the flow's ``wait`` policy pauses until they are)."""
    if not paths:
        return False
    for path in paths:
        fs, p = fsspec.core.url_to_fs(path)
        if not fs.exists(p):
            return False
    return True


def load_caption_corrections(paths: list[str], known_keys: set[str]) -> dict[str, str]:
    """sample_key -> corrected caption. An empty correction keeps the generated caption; two
    different corrections of one caption are an error (someone must choose)."""
    known = set(known_keys)
    out: dict[str, tuple[str, str]] = {}
    for path in paths:
        for line, rec in read_records(path, ("sample_key", "caption_corrected")):
            key, text = rec.get("sample_key", "").strip(), " ".join(rec.get("caption_corrected", "").split())
            where = f"{path}:{line}"
            if not key:
                if text:
                    raise ReviewFileError(f"{where}: correction {text[:40]!r} has no sample_key")
                continue
            _check_key(key, known, where, "sample_key")
            if not text:
                continue
            if key in out and out[key][0] != text:
                raise ReviewFileError(f"{where}: caption of {key} corrected differently at {out[key][1]}; keep one")
            out.setdefault(key, (text, where))
    return {k: v[0] for k, v in sorted(out.items())}


# -- the stage ------------------------------------------------------------------------------------
def plan_review_items(ctx: Context) -> list[dict]:
    """Kept pairs' images with their frame and the reviewers' decisions so far (the decisions are
    part of the items, so a new decision redoes only its own unit)."""
    pairs = read_manifest(ctx.store, "pairs")
    frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames") if r["status"] == OK}
    decisions: dict[str, list[Decision]] = {}
    if ctx.cfg.review.policy != "accept_all":
        known = {r["clip_key"] for r in pairs if r.get("clip_key")}
        decisions = load_decisions(list(ctx.cfg.review.decisions_files), known)
    items = []
    for r in sorted((r for r in pairs if r["status"] == OK), key=lambda r: r["sample_key"]):
        f = frames.get(r["sample_key"], {})
        items.append({
            "sample_key": r["sample_key"], "clip_key": r["clip_key"], "behavior": r["behavior"],
            "pair_key": r["pair_key"], "cosine": r["cosine"],
            "clip_name": f.get("clip_name"), "time_s": f.get("time_s"),
            "image_path": f.get("image_path"), "image_sha256": f.get("image_sha256"),
            "decisions": [[d.reviewer, d.decision, d.reason] for d in decisions.get(r["clip_key"], [])],
        })
    return items


def plan_review_units(ctx: Context) -> list[Unit]:
    return chunk_units(REVIEW, plan_review_items(ctx), CLIPS_PER_UNIT, group_key="clip_key")


def _pair_problem(frames: list[dict]) -> str | None:
    if problem := pair_problem(frames[0]["clip_key"], (it["behavior"] for it in frames), "pair incomplete: pairs kept"):
        return problem
    for it in frames:
        if not it.get("image_path"):
            return f"no frame image for {it['sample_key']} in the frames manifest"
    return None


def run_review_unit(ctx: Context, unit: Unit) -> list[dict]:
    by_clip: dict[str, list[dict]] = {}
    for it in unit.items:
        by_clip.setdefault(it["clip_key"], []).append(it)
    rows = {}
    for clip_key, frames in by_clip.items():
        problem = _pair_problem(frames)
        if problem is None and ctx.cfg.review.policy == "accept_all":
            verdict = Verdict(True, "accept", AUTO_REVIEWER, None)
        elif problem is None:
            verdict = merge_decisions([Decision(clip_key, d, why, who, "") for who, d, why in frames[0]["decisions"]])
        else:
            verdict = Verdict(False, None, None, problem)
        for it in frames:  # both images of a pair share the pair's fate
            fields = {"clip_key": clip_key, "decision": verdict.decision, "reviewers": verdict.reviewers}
            rows[it["sample_key"]] = keep(it, **fields) if verdict.kept else reject(it, verdict.reason, **fields)
    return [rows[k] for k in unit.sample_keys]


def write_review_sheet_after(ctx: Context, table) -> None:
    del table  # the sheet is built from the planned items, which hold the decisions so far
    export_review_sheet(ctx, plan_review_items(ctx))


STAGE = Stage(
    name=REVIEW,
    plan_units=plan_review_units,
    run_unit=run_review_unit,
    config_keys=("review.policy",),  # the decisions themselves ride in the items
    version="1",
    finalize=write_review_sheet_after,
)


# -- pages people click through (pab_build/review_page.py) -----------------------------------------
def _so_far(decisions) -> str:
    return "; ".join(f"{who}: {d}" + (f" ({why})" if why else "") for who, d, why in decisions or [])


def _csv_text(columns: tuple[str, ...], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _frames(ctx: Context) -> dict[str, dict]:
    if not ctx.store.exists(manifest_rel("frames")):
        return {}
    return {r["sample_key"]: r for r in read_manifest(ctx.store, "frames") if r["status"] == OK}


def export_review_sheet(ctx: Context, items: list[dict]) -> tuple[str, str]:
    """Write ``review/index.html`` (the page reviewers click through) and
    ``review/decisions_template.csv`` (the same columns, for a spreadsheet); return their paths
    (relative to the output root)."""
    frames = _frames(ctx)  # the OOPS! goal / went-wrong captions say which frame should be normal
    by_clip: dict[str, dict[str, dict]] = {}
    for it in items:
        by_clip.setdefault(it["clip_key"], {})[it["behavior"]] = it
    page_items, template = [], []
    for clip_key in sorted(by_clip):
        pair = by_clip[clip_key]
        first = pair.get("normal") or pair.get("anomaly") or {}
        entry = {"key": clip_key, "clip_name": first.get("clip_name") or "", "cosine": first.get("cosine"),
                 "so_far": _so_far(first.get("decisions"))}
        for behavior in ("normal", "anomaly"):
            it = pair.get(behavior) or {}
            entry[behavior] = {"image": image_data_uri(ctx.store, it.get("image_path")), "time_s": it.get("time_s"),
                               "caption": frames.get(it.get("sample_key"), {}).get("source_caption")}
        page_items.append(entry)
        template.append([clip_key, entry["clip_name"], "", "", ""])
    help_text = (f"{len(page_items)} pairs. Keep a pair only if the left frame shows the OOPS! goal (normal behavior) "
                 "and the right one what went wrong (the anomaly), of the same person. Accept: click or A. Reject: "
                 "type a reason, then Enter, click or R. Arrows move. Decisions stay in this browser; Download "
                 "decisions saves the CSV to list in review.decisions_files.")
    page = render_page(kind="pairs", title="PAB test pairs: human verification", help_text=help_text,
                       columns=DECISION_COLUMNS, file_stem="decisions", items=page_items)
    ctx.store.write_text(SHEET_REL, page)
    ctx.store.write_text(TEMPLATE_REL, _csv_text(DECISION_COLUMNS, template))
    return SHEET_REL, TEMPLATE_REL


def export_caption_sheet(ctx: Context, rows: list[dict]) -> tuple[str, str]:
    """Write ``review/captions.html`` (image beside its generated caption, corrected in place) and
    ``review/captions_template.csv`` for caption QC; return their paths. ``rows`` are caption
    manifest rows; the images come from the frames manifest."""
    frames = _frames(ctx)
    page_items, template = [], []
    for r in sorted(rows, key=lambda r: r["sample_key"]):
        key = r["sample_key"]
        generated = r.get("caption_generated") or ""
        page_items.append({"key": key, "caption_generated": generated,
                           "image": image_data_uri(ctx.store, frames.get(key, {}).get("image_path")),
                           "status": "ok" if r.get("status") == OK else f"rejected: {r.get('reason')}"})
        template.append([key, generated, "", ""])
    help_text = (f"{len(rows)} captions. Where a caption is wrong, type the corrected caption (both texts are kept: "
                 "the file holds the generated and the corrected one); leave it empty when it is right. Caption "
                 "checked: click or Ctrl+Enter. Download decisions saves the CSV to list in qc.files (or to give to the paused caption-qc-wait run when qc.policy is wait).")
    page = render_page(kind="captions", title="PAB test captions: quality control", help_text=help_text,
                       columns=CAPTION_COLUMNS, file_stem="captions-qc", items=page_items)
    ctx.store.write_text(CAPTION_SHEET_REL, page)
    ctx.store.write_text(CAPTION_TEMPLATE_REL, _csv_text(CAPTION_COLUMNS, template))
    return CAPTION_SHEET_REL, CAPTION_TEMPLATE_REL
