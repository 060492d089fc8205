"""``pab calibrate``: numbers read back from manifests with known values, the page they make (in
headless Chromium: loads without errors, every section, images decode), and the pilot end to end on
the smoke profile (slow)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pab_build.config import load_config
from pab_build.manifests import manifest_rel
from pab_build.release.calibrate import calibration_config
from pab_build.release.calibration import MEASURES, measured_rows, near_threshold, summarise
from pab_build.release.calibration_page import NOT_MEASURED, render_calibration_page
from pab_build.store import Store
from test_review_page import browser, page  # noqa: F401 - the headless Chromium fixtures

GEN_KINDS = ["n", "n", "n", "n", "a", "a", "ap", "ap", "ap", "ap"]  # 4 normal, 6 anomaly images


def _write(store: Store, stage: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(store.local_path(manifest_rel(stage))), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), store.local_path(manifest_rel(stage)))


def _image(store: Store, rel: str, shade: int) -> str:
    path = store.local_path(rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (48, 64), (shade, 90, 255 - shade)).save(path)
    return rel


def _row(key: str, ok: bool, reason: str = "too small", **fields) -> dict:
    return {"sample_key": key, "status": "ok" if ok else "rejected", "reason": None if ok else reason, **fields}


def write_manifests(store: Store, with_pose_columns: bool = True) -> None:
    """Manifests of a small pilot with known values: 5 clips (10 frames), 10 generated images."""
    frames, pose, pairs = [], [], []
    for c in range(5):
        for b, shade in (("normal", 40 * c), ("anomaly", 40 * c + 20)):
            key = f"c{c:010d}-{b}"
            frames.append(_row(key, True, clip_key=f"c{c:010d}", behavior=b,
                               image_path=_image(store, f"frames/{key}.jpg", shade)))
            height = 0.1 + 0.2 * c  # 0.1 .. 0.9: the first clip's person is too small
            nobody = c == 0 and b == "anomaly"
            extra = {"person_height": None if nobody else height, "person_count": 0 if nobody else 1,
                     "keypoint_count": 0 if nobody else 10 + c} if with_pose_columns else {}
            pose.append(_row(key, height >= 0.2, clip_key=f"c{c:010d}", behavior=b,
                             image_path=f"frames/{key}.jpg", **extra))
        if c:  # pairs of the clips pose kept; cosine 0.5 .. 0.98
            cos = [0.5, 0.9, 0.96, 0.98][c - 1]
            for b, other in (("normal", "anomaly"), ("anomaly", "normal")):
                pairs.append(_row(f"c{c:010d}-{b}", cos <= 0.95, "too similar", clip_key=f"c{c:010d}", behavior=b,
                                  pair_key=f"c{c:010d}-{other}", cosine=cos))
    _write(store, "frames", frames)
    _write(store, "pose", pose)
    _write(store, "pairs", pairs)
    gen, gen_pose = [], []
    for i, kind in enumerate(GEN_KINDS):
        key = f"p{i}-000"
        gen.append(_row(key, True, kind=kind.replace("ap", "a+"),
                        image_path=_image(store, f"generate/p{i}/{key}.jpg", 20 * i)))
        ratio = 1.0 + 0.4 * i  # 1.0 .. 4.6: above 2.5 is a broken body
        nobody = i == 9
        extra = {"person_height": None if nobody else 0.02 + 0.05 * i, "person_count": 0 if nobody else 1,
                 "keypoint_count": 0 if nobody else 6 + i, "limb_ratio_max": None if nobody else ratio} \
            if with_pose_columns else {}
        gen_pose.append(_row(key, ratio <= 2.5, "broken body", image_path=f"generate/p{i}/{key}.jpg", **extra))
    _write(store, "generate", gen)
    _write(store, "gen_pose", gen_pose)
    ends = ["finished", "finished", "trimmed", "unfinished"]
    _write(store, "test_captions", [_row(f"c{c:010d}-normal", c != 4, "runaway",
                                         caption_generated=" ".join(["word"] * (5 * c + 3)), caption_end=ends[c - 1])
                                    for c in range(1, 5)])
    _write(store, "train_captions", [_row(f"p{i}-000", True, caption_generated=" ".join(["w"] * (i + 1)),
                                          caption_end="finished")
                                     for i in range(10)])
    attrs = [_row(f"p{i}-000", i != 3, "unreadable answer: I cannot tell", action="jumping" if i < 5 else None,
                  anomaly=None if i < 5 else "falling", scene="lawn") for i in range(10)]
    _write(store, "train_attributes", attrs)
    _write(store, "test_attributes", attrs[:4])


@pytest.fixture
def pilot(tmp_path, sample_oops_root):
    cfg = load_config("smoke", {"oops.root": sample_oops_root, "pairs.max_cosine": 0.95, "gen_pose.min_keypoints": 8,
                                "pose.require_person": True, "gen_pose.require_person": True,
                                "test_captions.min_words": 10, "train_captions.min_words": 3})
    store = Store(str(tmp_path / "out"))
    write_manifests(store)
    return cfg, store


def test_summary_reads_each_filter_and_the_paper_comparison(pilot):
    cfg, store = pilot
    s = summarise(store, cfg)
    f = s["filters"]
    assert all(f[m.name]["measured"] for m in MEASURES), [m.name for m in MEASURES if not f[m.name]["measured"]]
    assert f["pair cosine similarity"]["count"] == 4  # one value per pair, not per frame
    assert f["pair cosine similarity"]["pass_threshold"] == 2  # 0.5 and 0.9 pass max_cosine 0.95
    assert f["limb ratio, generated images"]["pass_threshold"] == 4  # 1.0 1.4 1.8 2.2 <= 2.5 (nobody in #9)
    assert f["limb ratio, generated images"]["count"] == 9
    assert (f["person size, test frames"]["min"], f["person size, test frames"]["stage_kept"]) == \
        (pytest.approx(0.1), 8)
    # gen_pose: 4 normal images (all kept), 6 anomaly images (ratios 2.6 .. 4.6: none kept)
    assert s["gen_pose_kept"]["normal"] == {"images": 4, "kept": 4, "kept_fraction": 1.0, "paper": 0.802}
    assert s["gen_pose_kept"]["anomaly"]["kept"] == 0 and s["gen_pose_kept"]["anomaly"]["paper"] == 0.594
    tp = s["test_pairs"]  # 2 pairs kept from 5 sampled clips of the sample root's 10
    assert (tp["clips_sampled"], tp["pairs_kept"], tp["clips_in_root"]) == (5, 2, 10)
    assert tp["projected_pairs"] == 4 and tp["paper"] == 989
    assert s["caption_ends"]["test_captions"]["counts"] == {"finished": 2, "trimmed": 1, "unfinished": 1}
    assert s["attribute_answers"]["train_attributes"]["counts"] == {"readable": 9, "unreadable": 1}
    assert s["attribute_answers"]["train_attributes"]["examples"] == ["unreadable answer: I cannot tell"]
    assert s["labels"]["train_attributes"]["anomaly"] == [("falling", 5)]
    assert s["rejections"]["gen_pose"] == [("broken body", 6)] and s["rejections"]["pairs"] == [("too similar", 4)]
    json.dumps(s)  # summary.json must serialise


def test_contact_sheet_picks_the_items_nearest_the_threshold_on_each_side(pilot):
    cfg, store = pilot
    m = next(m for m in MEASURES if m.column == "limb_ratio_max")
    near = near_threshold(measured_rows(store, m), m, 2.5, per_side=2)
    assert [r["value"] for r in near["kept"]] == pytest.approx([2.2, 1.8])
    assert [r["value"] for r in near["rejected"]] == pytest.approx([2.6, 3.0])


def test_an_unmeasured_column_says_so_instead_of_an_empty_plot(pilot, tmp_path):
    cfg, _ = pilot
    store = Store(str(tmp_path / "older"))
    write_manifests(store, with_pose_columns=False)
    s = summarise(store, cfg)
    assert not s["filters"]["limb ratio, generated images"]["measured"]
    assert s["filters"]["pair cosine similarity"]["measured"]
    s["units"] = {"pose": {"done": 1, "skipped": 0, "failed": 1}, "pairs": {"done": 1, "skipped": 0, "failed": 0}}
    page = render_calibration_page(store, cfg, s)
    assert NOT_MEASURED in page and "Units failed: pose 1<" in page


def test_calibration_config_samples_and_lets_set_win(sample_oops_root):
    cfg = calibration_config("smoke", 40, [f"oops.root={sample_oops_root}", "calibrate.images_per_prompt=4",
                                           "generate.images_per_caption=5"])
    assert cfg.oops.limit == 40 and cfg.generate.max_prompts == 10  # ceil(40 / 4)
    assert cfg.generate.images_per_caption == 5  # --set wins over the pilot's own settings
    assert cfg.review.policy == "accept_all" and cfg.cmp.train_after_build is False
    assert calibration_config("full").oops.limit == 300  # calibrate.samples' default


# -- the page in a real browser --------------------------------------------------------------------
def test_page_in_headless_chromium_has_every_section_and_its_images_decode(pilot, page):
    cfg, store = pilot
    s = summarise(store, cfg)
    store.write_text("calibration/index.html", render_calibration_page(store, cfg, s))
    page.goto("file://" + store.local_path("calibration/index.html"))
    titles = page.eval_on_selector_all("section.measure h2", "els => els.map(e => e.textContent)")
    assert titles == [m.name for m in MEASURES]
    for section in page.query_selector_all("section.measure"):
        name = section.query_selector("h2").inner_text()
        assert section.query_selector("img.plot"), f"{name}: no histogram"
        assert NOT_MEASURED not in section.inner_text(), name
        if s["filters"][name]["threshold"] is not None and name != "keypoints, test frames":
            assert section.query_selector(".sheet figure.kept") and section.query_selector(".sheet figure.rejected"), \
                f"{name}: no contact sheet on both sides"
        assert "What to change" in section.inner_text()
    assert "broken body" in page.inner_text("#rejections")
    for anchor in ("yields", "caption-ends", "attribute-answers", "labels"):
        assert page.query_selector(f"#{anchor} img.plot") or anchor == "yields", anchor
    assert "989" in page.inner_text("#yields") and "80.2%" in page.inner_text("#yields")
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || !i.naturalWidth)"
                                   ".map(i => i.alt)")
    assert not broken, broken
    assert page.evaluate("document.images.length") > 30


# -- the pilot end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_pab_calibrate_smoke_end_to_end(tmp_path, tiny_models_dir, sample_oops_root):
    """The smoke profile's own calibrate section: the whole sample root, 2 images per prompt, and the
    synthetic OpenPose network so there are people to measure."""
    from flows.cli import main

    out = str(tmp_path / "cal")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "smoke", "--out", out, "--oops-root", sample_oops_root,
              "--set", f"fixtures.models_dir={tiny_models_dir}", "--set", "fixtures.build_tiny_models=false"])
    assert e.value.code == 0
    summary = json.load(open(os.path.join(out, "calibration", "summary.json")))
    assert summary["test_pairs"]["clips_sampled"] == 10
    assert sum(v["images"] for v in summary["gen_pose_kept"].values()) == 10  # ceil(10 / 2) prompts x 2 images
    empty = [n for n, f in summary["filters"].items() if not f.get("count")]
    assert not empty, f"no values for {empty}"
    for m in MEASURES:  # the synthetic people fall on both sides of the person thresholds
        f = summary["filters"][m.name]
        if m.column in ("person_count",) or m.name == "keypoints, generated images":
            assert 0 < f["pass_threshold"] < f["count"], (m.name, f)
    assert all(summary["caption_ends"][s]["total"] for s in ("test_captions", "train_captions"))
    page = open(os.path.join(out, "calibration", "index.html"), encoding="utf-8").read()
    assert page.count('<section id="m-') == len(MEASURES) and page.count('<img class="plot"') >= len(MEASURES)
    assert NOT_MEASURED not in page
