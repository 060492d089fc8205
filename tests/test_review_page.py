"""The review pages in a real headless browser (Debian's chromium driven by Playwright): a reviewer
clicks through, the page's decisions file goes back into the build, the rejected pair is gone.

Playwright's download event does not fire in headless chromium here (file:// or loopback), so
the test reads the file the Download button would save from ``window.pabExportDecisions()``,
which the button itself calls.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time

import pytest
from test_review import CLIPS, _use_decisions, _write, write_test_pairs

from pab_build.manifests import ok_rows, read_manifest
from pab_build.stages import review
from pab_build.stages.review import STAGE as REVIEW_STAGE
from pab_build.stages.review import load_caption_corrections, load_decisions
from pab_build.engine.units import run_stage

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def _chromium() -> str | None:
    found = os.environ.get("PAB_CHROMIUM") or next((p for p in CHROMIUM_PATHS if os.path.exists(p)), None)
    return found or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    path = _chromium()
    if path is None:
        pytest.skip("no chromium on this machine: `apt-get install -y chromium` (.ci/run installs it where apt works)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # the page's script ran without an exception


def _exported(pg) -> tuple[str, list[dict]]:
    out = pg.evaluate("window.pabExportDecisions()")
    return out["filename"], list(csv.DictReader(io.StringIO(out["text"])))


def test_a_reviewer_clicks_through_and_the_rejected_pair_leaves_the_build(ctx, page, tmp_path):
    keys = write_test_pairs(ctx)
    sheet, _ = review.export_review_sheet(ctx, review.plan_review_items(ctx))
    url = "file://" + ctx.store.local_path(sheet)
    page.goto(url)
    assert page.inner_text("#progress").startswith("0 of 3 decided")
    shown = sorted(keys)  # the page shows pairs in key order
    assert CLIPS[keys.index(shown[0])] in page.inner_text("#item")
    assert "what they wanted to do" in page.inner_text("#item") and "what went wrong" in page.inner_text("#item")

    page.click("#accept")  # no reviewer name yet: refused, with a message
    assert "name" in page.inner_text("#message") and page.inner_text("#progress").startswith("0 of 3")
    page.fill("#reviewer", "ann")
    page.click("#accept")  # pair 1 accepted by click
    page.click("#reject")  # pair 2: rejecting needs a reason
    assert "reason" in page.inner_text("#message") and page.inner_text("#progress").startswith("1 of 3")
    page.fill("#reason", "anomaly frame shows, another person")
    page.press("#reason", "Enter")
    page.evaluate("document.activeElement.blur()")  # keys act when no text box has the focus
    page.keyboard.press("a")  # pair 3 accepted by key
    assert page.inner_text("#progress").startswith("3 of 3 decided")

    # localStorage reaches the browser's store asynchronously, and a reload may read it from another
    # renderer (once, on a loaded machine, it read nothing): first a second tab sees the decisions
    other = page.context.new_page()
    deadline = time.monotonic() + 15
    while True:
        other.goto(url)
        if other.inner_text("#progress").startswith("3 of 3 decided") or time.monotonic() > deadline:
            break
        other.wait_for_timeout(200)
    assert other.inner_text("#progress").startswith("3 of 3 decided")
    other.close()
    page.reload()  # decisions and the reviewer's name survive a reload (localStorage)
    assert page.inner_text("#progress").startswith("3 of 3 decided")
    assert page.input_value("#reviewer") == "ann"
    page.goto(url)
    page.keyboard.press("ArrowRight")

    filename, rows = _exported(page)
    assert filename == "decisions-ann.csv"
    assert [(r["pair_key"], r["decision"], r["reviewer"]) for r in rows] == [
        (shown[0], "accept", "ann"), (shown[1], "reject", "ann"), (shown[2], "accept", "ann")]
    assert rows[1]["reason"] == "anomaly frame shows, another person"
    assert {r["pair_key"]: r["clip_name"] for r in rows} == dict(zip(keys, CLIPS))
    page.click("#download")  # the button works (builds its link) without a page error

    path = _write(tmp_path / filename, pg_text := page.evaluate("window.pabExportDecisions().text"))
    assert pg_text.splitlines()[0] == ",".join(review.DECISION_COLUMNS)
    assert sorted(load_decisions([path], set(keys))) == sorted(keys)
    _use_decisions(ctx, [path])
    run_stage(ctx, REVIEW_STAGE)
    kept = {r["clip_key"] for r in ok_rows(ctx.store, "review")}
    assert kept == {shown[0], shown[2]}
    gone = [r for r in read_manifest(ctx.store, "review") if r["clip_key"] == shown[1]]
    assert len(gone) == 2 and all("anomaly frame shows, another person" in r["reason"] for r in gone)
    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)


def test_caption_qc_keeps_the_generated_and_the_corrected_caption(ctx, page, tmp_path):
    keys = write_test_pairs(ctx)
    rows = [{"sample_key": f"{k}-{b}", "status": "ok", "caption_generated": f"a person {b} in {k}",
             "caption": f"a person {b} in {k}"} for k in keys for b in ("normal", "anomaly")]
    sheet, _ = review.export_caption_sheet(ctx, rows)
    page.goto("file://" + ctx.store.local_path(sheet))
    page.fill("#reviewer", "bo")
    first = sorted(r["sample_key"] for r in rows)[0]
    assert first in page.inner_text("#item")
    page.fill("#correction", "A man in a  red coat   slips on ice.")
    page.click("#confirm")
    page.press("#correction", "Control+Enter")  # the second caption is right as generated
    assert page.inner_text("#progress").startswith("2 of 6 checked")
    page.reload()
    assert page.inner_text("#progress").startswith("2 of 6 checked")

    filename, exported = _exported(page)
    assert filename == "captions-qc-bo.csv" and len(exported) == 2
    assert exported[0] == {"sample_key": first, "caption_generated": f"a person {first.split('-')[1]} in {first.split('-')[0]}",
                           "caption_corrected": "A man in a red coat slips on ice.", "reviewer": "bo"}
    assert exported[1]["caption_corrected"] == "" and exported[1]["caption_generated"]
    path = _write(tmp_path / filename, page.evaluate("window.pabExportDecisions().text"))
    assert load_caption_corrections([path], {r["sample_key"] for r in rows}) == {
        first: "A man in a red coat slips on ice."}
