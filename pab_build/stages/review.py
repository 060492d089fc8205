"""Stage ``review`` (human verification of the test pairs) and the caption QC files.

Paper 3.1: "we conduct manual verification by three professionals [...], retaining only those
image pairs of certain normal and anomaly behaviors", and the generated test captions are
corrected by people. Both go through files people fill in:

- ``review/sheet.html`` (self-contained: images embedded) and ``review/decisions_template.csv``
  (``pair_key`` = clip_key, ``clip_name``, ``decision`` accept|reject, ``reason``, ``reviewer``).
  Each reviewer returns one CSV or JSONL file; ``review.decisions_files`` lists them. A pair is
  kept only if every reviewer who decided it accepted; a pair nobody decided is rejected. When a
  reviewer decides the same pair twice, the later line wins (files in the given order).
- ``review/captions.html`` and ``review/captions_template.csv`` (``sample_key``,
  ``caption_generated``, ``caption_corrected``, ``reviewer``); an empty correction keeps the
  generated caption. Read back by :func:`load_caption_corrections` (the captions stage).

A key that is not in the build (a typo) or a decision other than accept/reject is an error naming
the file, the line and the closest known key: a silently ignored line would ship a pair a
reviewer rejected.
"""

from __future__ import annotations

import base64
import csv
import difflib
import html
import io
import json
import os
from dataclasses import dataclass

import fsspec

from ..manifests import OK, manifest_rel, read_manifest, reject
from ..units import Context, Stage, Unit, chunk_units

REVIEW = "review"
CLIPS_PER_UNIT = 256
DECISIONS = ("accept", "reject")
AUTO_REVIEWER = "auto"
SHEET_REL = "review/sheet.html"
TEMPLATE_REL = "review/decisions_template.csv"
CAPTION_SHEET_REL = "review/captions.html"
CAPTION_TEMPLATE_REL = "review/captions_template.csv"
DECISION_COLUMNS = ("pair_key", "clip_name", "decision", "reason", "reviewer")
CAPTION_COLUMNS = ("sample_key", "caption_generated", "caption_corrected", "reviewer")
THUMBNAIL_SIDE = 512  # the sheet embeds every image: keep it loadable for ~2000 images


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
    return fs.cat_file(p).decode("utf-8-sig")  # spreadsheet programs often write a BOM


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
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object with {', '.join(required)}")
            out.append((n, {k: "" if v is None else str(v) for k, v in rec.items()}))
        return out
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the header must include {', '.join(required)}")
    for rec in reader:
        out.append((reader.line_num, {k: (v or "") for k, v in rec.items() if k is not None}))
    return out


def _check_key(key: str, known: set[str], where: str, what: str) -> None:
    if key in known:
        return
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{where}: unknown {what} {key!r} (not in this build){hint}")


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
                raise ValueError(f"{where}: decision {raw!r} has no pair_key")
            _check_key(key, known, where, "pair_key")
            if not raw:
                continue
            if raw.lower() not in DECISIONS:
                raise ValueError(f"{where}: decision {raw!r} for {key} must be 'accept' or 'reject'")
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
                    raise ValueError(f"{where}: correction {text[:40]!r} has no sample_key")
                continue
            _check_key(key, known, where, "sample_key")
            if not text:
                continue
            if key in out and out[key][0] != text:
                raise ValueError(f"{where}: caption of {key} corrected differently at {out[key][1]}; keep one")
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
    behaviors = sorted(it["behavior"] for it in frames)
    if behaviors != ["anomaly", "normal"]:
        return f"pair incomplete: pairs kept {behaviors} of clip {frames[0]['clip_key']}"
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
            rows[it["sample_key"]] = ({"sample_key": it["sample_key"], "status": OK, "reason": None, **fields}
                                      if verdict.kept else reject(it, verdict.reason, **fields))
    return [rows[k] for k in unit.sample_keys]


def write_review_sheet_after(ctx: Context, rows: list[dict]) -> None:
    del rows  # the sheet is built from the planned items, which hold the decisions so far
    export_review_sheet(ctx, plan_review_items(ctx))


STAGE = Stage(
    name=REVIEW,
    plan_units=plan_review_units,
    run_unit=run_review_unit,
    config_keys=("review.policy",),  # the decisions themselves ride in the items
    version="1",
    finalize=write_review_sheet_after,
)


# -- sheets people read ---------------------------------------------------------------------------
_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:6px;vertical-align:top}img{max-width:360px;display:block}
.missing{color:#b00}.key{font-family:monospace}"""


def _image_html(ctx: Context, rel: str | None, alt: str) -> str:
    if not rel:
        return '<p class="missing">no image</p>'
    try:
        image = ctx.store.read_image(rel)
    except Exception as e:  # noqa: BLE001 - one unreadable image must not stop the sheet
        return f'<p class="missing">image unreadable: {html.escape(rel)} ({type(e).__name__})</p>'
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt)}">'


def _page(title: str, intro: str, header: list[str], body: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>{intro}</p>\n"
            f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>\n</body></html>\n")


def _csv_text(columns: tuple[str, ...], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def export_review_sheet(ctx: Context, items: list[dict]) -> tuple[str, str]:
    """Write ``review/sheet.html`` and ``review/decisions_template.csv``; return their paths
    (relative to the output root)."""
    by_clip: dict[str, dict[str, dict]] = {}
    for it in items:
        by_clip.setdefault(it["clip_key"], {})[it["behavior"]] = it
    body, template = [], []
    for clip_key in sorted(by_clip):
        pair = by_clip[clip_key]
        first = pair.get("normal") or pair.get("anomaly") or {}
        cells = []
        for behavior in ("normal", "anomaly"):
            it = pair.get(behavior)
            time = f"{it['time_s']:.2f} s" if it and it.get("time_s") is not None else "?"
            cells.append(f"<td>{_image_html(ctx, it and it.get('image_path'), f'{clip_key} {behavior}')}"
                         f"{behavior} at {time}</td>")
        so_far = "<br>".join(html.escape(f"{who}: {d}" + (f" ({why})" if why else ""))
                             for who, d, why in first.get("decisions") or []) or "none yet"
        cosine = f"{first['cosine']:.4f}" if first.get("cosine") is not None else "?"
        body.append(f'<tr id="{html.escape(clip_key)}"><td class="key">{html.escape(clip_key)}<br>'
                    f"{html.escape(first.get('clip_name') or '')}</td>{''.join(cells)}"
                    f"<td>{cosine}</td><td>{so_far}</td></tr>")
        template.append([clip_key, first.get("clip_name") or "", "", "", ""])
    intro = (f"{len(by_clip)} pairs. Keep a pair only if the left image shows normal behavior and the right "
             f"one the anomaly. Fill in {html.escape(TEMPLATE_REL)} (decision: accept or reject, a reason when "
             "rejecting, your name) and list it in review.decisions_files.")
    page = _page("PAB test pairs: human verification", intro,
                 ["pair_key / clip", "normal", "anomaly", "cosine", "decisions so far"], body)
    ctx.store.write_text(SHEET_REL, page)
    ctx.store.write_text(TEMPLATE_REL, _csv_text(DECISION_COLUMNS, template))
    return SHEET_REL, TEMPLATE_REL


def export_caption_sheet(ctx: Context, rows: list[dict]) -> tuple[str, str]:
    """Write ``review/captions.html`` (image beside its generated caption) and
    ``review/captions_template.csv`` for caption QC; return their paths. ``rows`` are caption
    manifest rows; the images come from the frames manifest."""
    frames = {}
    if ctx.store.exists(manifest_rel("frames")):
        frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames") if r["status"] == OK}
    body, template = [], []
    for r in sorted(rows, key=lambda r: r["sample_key"]):
        key = r["sample_key"]
        generated = r.get("caption_generated") or ""
        state = "ok" if r.get("status") == OK else f"rejected: {r.get('reason')}"
        body.append(f'<tr id="{html.escape(key)}"><td class="key">{html.escape(key)}</td>'
                    f"<td>{_image_html(ctx, frames.get(key, {}).get('image_path'), key)}</td>"
                    f"<td>{html.escape(generated)}</td><td>{html.escape(r.get('caption') or '')}</td>"
                    f"<td>{html.escape(state)}</td></tr>")
        template.append([key, generated, "", ""])
    intro = (f"{len(rows)} captions. Where a caption is wrong, write the corrected caption in "
             f"{html.escape(CAPTION_TEMPLATE_REL)} (leave it empty to keep the generated one) and list the "
             "file in qc.files (or give it to the paused caption-qc-wait run when qc.policy is wait).")
    page = _page("PAB test captions: quality control", intro,
                 ["sample_key", "image", "generated caption", "caption now", "status"], body)
    ctx.store.write_text(CAPTION_SHEET_REL, page)
    ctx.store.write_text(CAPTION_TEMPLATE_REL, _csv_text(CAPTION_COLUMNS, template))
    return CAPTION_SHEET_REL, CAPTION_TEMPLATE_REL
