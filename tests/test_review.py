"""Human verification of the test pairs (stage review) and the caption QC files."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from PIL import Image

from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.oops import clip_key
from pab_build.stages import review
from pab_build.stages.review import STAGE as REVIEW_STAGE
from pab_build.stages.review import (
    Decision,
    load_caption_corrections,
    load_decisions,
    merge_decisions,
)
from pab_build.engine.units import run_stage

CLIPS = ["Girl falls off trampoline", "Man slips on ice", "Waiter trips"]


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_test_pairs(ctx, clips=CLIPS) -> list[str]:
    """frames + pairs manifests (and the frame images) for these clips; returns the clip keys."""
    frames, pairs = [], []
    for n, name in enumerate(clips):
        ck = clip_key(name)
        for b, behavior in enumerate(("normal", "anomaly")):
            key, rel = f"{ck}-{behavior}", f"frames/{ck}-{behavior}.jpg"
            ctx.store.write_bytes(rel, _jpeg((40 * n, 100 * b, 90)))
            frames.append({"sample_key": key, "status": OK, "reason": None, "clip_name": name, "clip_key": ck,
                           "behavior": behavior, "time_s": 1.0 + 2 * b, "image_path": rel,
                           "source_caption": f"{name}: {'what they wanted to do' if b == 0 else 'what went wrong'}",
                           "image_sha256": f"sha-{key}"})
            pairs.append({"sample_key": key, "status": OK, "reason": None, "clip_key": ck, "behavior": behavior,
                          "pair_key": f"{ck}-{'anomaly' if b == 0 else 'normal'}", "cosine": 0.5 + 0.1 * n})
    write_manifest(ctx.store, "frames", frames)
    write_manifest(ctx.store, "pairs", pairs)
    return [clip_key(c) for c in clips]


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _csv(rows: list[list[str]], header=review.DECISION_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _use_decisions(ctx, paths: list[str]) -> None:
    ctx.cfg.review.policy = "decisions_file"
    ctx.cfg.review.decisions_files = paths


# -- reading and merging decisions ----------------------------------------------------------------
def test_a_typo_in_a_pair_key_names_the_file_line_and_the_closest_key(tmp_path):
    known = {clip_key(c) for c in CLIPS}
    good = clip_key(CLIPS[1])
    typo = good[:-1] + ("0" if good[-1] != "0" else "1")
    path = _write(tmp_path / "ann.csv", _csv([[clip_key(CLIPS[0]), "", "accept", "", ""],
                                             [typo, "", "reject", "x", ""]]))
    with pytest.raises(ValueError, match=re.escape(f"ann.csv:3: unknown pair_key {typo!r}")) as err:
        load_decisions([path], known)
    assert f"did you mean {good!r}?" in str(err.value)

    jsonl = _write(tmp_path / "bob.jsonl", json.dumps({"pair_key": good, "decision": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"bob.jsonl:1: decision 'maybe' .* must be 'accept' or 'reject'"):
        load_decisions([jsonl], known)
    with pytest.raises(ValueError, match="missing column"):
        load_decisions([_write(tmp_path / "bad.csv", "key,decision\nx,accept\n")], known)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_decisions([str(tmp_path / "nobody.csv")], known)


def test_decisions_from_csv_and_jsonl_with_default_reviewer_names(tmp_path):
    a, b = clip_key(CLIPS[0]), clip_key(CLIPS[1])
    ann = _write(tmp_path / "ann.csv", _csv([[a, "x", " Accept ", "", ""], [b, "y", "", "", ""]]))  # b: not decided yet
    bob = _write(tmp_path / "bob.jsonl", "\n" + json.dumps({"pair_key": a, "decision": "reject", "reason": "blurry",
                                                             "reviewer": "Bob"}) + "\n")
    got = load_decisions([ann, bob], {a, b})
    assert list(got) == [a]
    assert [(d.reviewer, d.decision, d.reason) for d in got[a]] == [("ann", "accept", ""), ("Bob", "reject", "blurry")]
    assert got[a][1].source == f"{bob}:2"


def test_merge_rule_every_reviewer_must_accept():
    def d(who, decision, why=""):
        return Decision("k", decision, why, who, "")

    kept = merge_decisions([d("r1", "accept"), d("r2", "accept"), d("r3", "accept")])
    assert kept.kept and kept.decision == "accept" and kept.reviewers == "r1,r2,r3"
    one_no = merge_decisions([d("r1", "accept"), d("r2", "reject", "not an anomaly"), d("r3", "accept")])
    assert not one_no.kept and one_no.decision == "reject"
    assert one_no.reason == "rejected by reviewer r2: not an anomaly"
    nobody = merge_decisions([])
    assert not nobody.kept and nobody.reason == "no reviewer decision"
    changed_mind = merge_decisions([d("r1", "reject", "oops"), d("r1", "accept")])  # the later line wins
    assert changed_mind.kept


# -- the stage ------------------------------------------------------------------------------------
def test_accept_all_keeps_every_pair(ctx):
    keys = write_test_pairs(ctx)
    run_stage(ctx, REVIEW_STAGE)
    rows = read_manifest(ctx.store, "review")
    assert len(rows) == 2 * len(keys)
    assert {(r["status"], r["decision"], r["reviewers"]) for r in rows} == {(OK, "accept", "auto")}


def test_a_rejecting_reviewer_removes_exactly_that_pair(ctx, tmp_path):
    keys = write_test_pairs(ctx)
    r1 = _write(tmp_path / "r1.csv", _csv([[k, "", "accept", "", "r1"] for k in keys]))
    r2 = _write(tmp_path / "r2.csv", _csv([[k, "", "accept", "", ""] for k in keys[:2]]))
    r3 = _write(tmp_path / "r3.csv", _csv([[keys[0], "", "accept", "", ""],
                                           [keys[1], "", "reject", "both normal", ""]]))
    _use_decisions(ctx, [r1, r2, r3])
    run_stage(ctx, REVIEW_STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "review")}
    assert {k for k, r in rows.items() if r["status"] == OK} == {f"{k}-{b}" for k in (keys[0], keys[2])
                                                                 for b in ("normal", "anomaly")}
    assert len(rows) == 6
    for b in ("normal", "anomaly"):
        refused = rows[f"{keys[1]}-{b}"]
        assert refused["status"] == REJECTED and refused["reason"] == "rejected by reviewer r3: both normal"
        assert refused["decision"] == "reject" and refused["reviewers"] == "r1,r2,r3"
    assert rows[f"{keys[2]}-normal"]["reviewers"] == "r1"  # decided by one reviewer only


def test_an_unreviewed_pair_and_a_pair_without_its_frame_are_rejected(ctx, tmp_path):
    keys = write_test_pairs(ctx)
    frames = [r for r in read_manifest(ctx.store, "frames") if r["sample_key"] != f"{keys[2]}-anomaly"]
    write_manifest(ctx.store, "frames", frames)
    _use_decisions(ctx, [_write(tmp_path / "r1.csv", _csv([[keys[0], "", "accept", "", ""],
                                                           [keys[2], "", "accept", "", ""]]))])
    run_stage(ctx, REVIEW_STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "review")}
    assert rows[f"{keys[0]}-normal"]["status"] == OK
    assert {rows[f"{keys[1]}-{b}"]["reason"] for b in ("normal", "anomaly")} == {"no reviewer decision"}
    assert {rows[f"{keys[2]}-{b}"]["reason"] for b in ("normal", "anomaly")} == {
        f"no frame image for {keys[2]}-anomaly in the frames manifest"}


def test_a_new_decision_redoes_only_its_own_unit(ctx, tmp_path, monkeypatch):
    keys = write_test_pairs(ctx)
    monkeypatch.setattr(review, "CLIPS_PER_UNIT", 1)
    path = tmp_path / "r1.csv"
    _use_decisions(ctx, [_write(path, _csv([[k, "", "accept", "", ""] for k in keys]))])
    assert run_stage(ctx, REVIEW_STAGE)["done"] == 3
    _write(path, _csv([[k, "", "accept" if k != keys[0] else "reject", "", ""] for k in keys]))
    assert run_stage(ctx, REVIEW_STAGE) == {"done": 1, "skipped": 2, "failed": 0}


# -- sheets ---------------------------------------------------------------------------------------
def _page_data(page: str) -> dict:
    """The data a review page embeds (what its script shows)."""
    return json.loads(re.search(r'<script id="pab-data" type="application/json">(.*?)</script>', page, re.S).group(1))


def test_review_sheet_is_self_contained_and_lists_every_pair(ctx, tmp_path):
    keys = write_test_pairs(ctx)
    _use_decisions(ctx, [_write(tmp_path / "r1.csv", _csv([[keys[0], "", "reject", "</script><b>blurry</b>", ""]]))])
    sheet, template = review.export_review_sheet(ctx, review.plan_review_items(ctx))
    assert (sheet, template) == ("review/index.html", "review/decisions_template.csv")
    page = ctx.store.read_text(sheet)
    assert "<link" not in page and " src=\"http" not in page and "url(" not in page  # opens from disk
    data = _page_data(page)
    assert data["kind"] == "pairs" and list(data["columns"]) == list(review.DECISION_COLUMNS)
    assert [it["key"] for it in data["items"]] == sorted(keys)
    frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames")}
    for it in data["items"]:
        assert it["clip_name"] == dict(zip(keys, CLIPS))[it["key"]]
        for behavior in ("normal", "anomaly"):
            assert it[behavior]["image"].startswith("data:image/jpeg;base64,")
            assert it[behavior]["caption"] == frames[f"{it['key']}-{behavior}"]["source_caption"]
    first = next(it for it in data["items"] if it["key"] == keys[0])
    assert first["so_far"] == "r1: reject (</script><b>blurry</b>)"  # kept whole, escaped in the page
    assert "</script><b>" not in page.split('id="pab-data"', 1)[1].split("</script>", 1)[0]
    assert first["cosine"] == pytest.approx(0.5) and first["anomaly"]["time_s"] == pytest.approx(3.0)

    rows = list(csv.DictReader(io.StringIO(ctx.store.read_text(template))))
    assert [r["pair_key"] for r in rows] == sorted(keys)  # one row per pair, in key order
    assert {r["pair_key"]: r["clip_name"] for r in rows} == dict(zip(keys, CLIPS))
    assert tuple(rows[0]) == review.DECISION_COLUMNS
    for r in rows:  # a reviewer fills in the template; it reads back
        r.update(decision="accept", reviewer="ann")
    filled = _write(tmp_path / "filled.csv", _csv([list(r.values()) for r in rows]))
    assert sorted(load_decisions([filled], set(keys))) == sorted(keys)


def test_the_stage_writes_the_sheet_after_its_manifest(ctx):
    write_test_pairs(ctx)
    run_stage(ctx, REVIEW_STAGE)
    assert ctx.store.exists(review.SHEET_REL) and ctx.store.exists(review.TEMPLATE_REL)


def test_decisions_ready(tmp_path):
    assert not review.decisions_ready([])
    path = tmp_path / "r1.csv"
    assert not review.decisions_ready([str(path)])
    path.write_text("pair_key,decision\n")
    assert review.decisions_ready([str(path)])


# -- caption QC -----------------------------------------------------------------------------------
def test_caption_sheet_and_corrections(ctx, tmp_path):
    keys = write_test_pairs(ctx)
    rows = [{"sample_key": f"{k}-normal", "status": OK, "caption_generated": f"a person & {k}",
             "caption": f"a person {k}"} for k in keys]
    rows.append({"sample_key": f"{keys[0]}-anomaly", "status": REJECTED, "reason": "empty caption: 0 words",
                 "caption_generated": "", "caption": None})
    sheet, template = review.export_caption_sheet(ctx, rows)
    assert (sheet, template) == ("review/captions.html", "review/captions_template.csv")
    items = {it["key"]: it for it in _page_data(ctx.store.read_text(sheet))["items"]}
    assert sorted(items) == sorted(r["sample_key"] for r in rows)
    assert all(it["image"].startswith("data:image/jpeg;base64,") for it in items.values())
    assert items[f"{keys[0]}-normal"]["caption_generated"] == f"a person & {keys[0]}"
    assert items[f"{keys[0]}-anomaly"]["status"] == "rejected: empty caption: 0 words"
    filled = list(csv.DictReader(io.StringIO(ctx.store.read_text(template))))
    assert [r["sample_key"] for r in filled] == sorted(r["sample_key"] for r in rows)
    assert tuple(filled[0]) == review.CAPTION_COLUMNS
    filled[0]["caption_corrected"] = "  A woman in a red   coat falls. "
    path = _write(tmp_path / "qc.csv", _csv([list(r.values()) for r in filled], review.CAPTION_COLUMNS))
    known = {r["sample_key"] for r in rows}
    assert load_caption_corrections([path], known) == {filled[0]["sample_key"]: "A woman in a red coat falls."}

    typo = _write(tmp_path / "typo.jsonl", json.dumps({"sample_key": f"{keys[1]}-normall", "caption_corrected": "x"}))
    with pytest.raises(ValueError, match=re.escape(f"typo.jsonl:1: unknown sample_key '{keys[1]}-normall'")) as err:
        load_caption_corrections([typo], known)
    assert f"did you mean '{keys[1]}-normal'?" in str(err.value)
    other = _write(tmp_path / "other.jsonl", json.dumps({"sample_key": filled[0]["sample_key"],
                                                         "caption_corrected": "a man falls"}))
    with pytest.raises(ValueError, match="corrected differently"):
        load_caption_corrections([path, other], known)
