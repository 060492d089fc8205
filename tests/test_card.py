"""The dataset card: its numbers are the manifests', its figures are real PNGs."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import pyarrow as pa
import pytest
import yaml
from PIL import Image
from test_official import build_release_tree

from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.release.card import reason_pattern, size_category, write_dataset_card


@pytest.fixture
def built(tmp_path):
    root = str(tmp_path / "out")
    info = build_release_tree(root)
    path = write_dataset_card(root)
    assert path == f"{root}/README.md"
    info.update(root=root, text=open(path, encoding="utf-8").read())
    return info


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[start + 2:end]]


def test_table2_and_funnel_equal_the_manifests(built):
    store, text = built["store"], built["text"]
    meta = _front_matter(text)
    assert meta["license"] and meta["language"] == ["en"] and meta["pretty_name"].endswith("tiny-release-test")
    assert meta["size_categories"] == ["n<1K"] and "text-retrieval" in meta["task_categories"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "shards/train/*.tar"},
                                                {"split": "test", "path": "shards/test/*.tar"}]

    table2 = {r[0]: r for r in _table_rows(text, "## Statistics")}
    for split, title, captions_stage in (("train", "Training set", "train_captions"), ("test", "Test set", "test_captions")):
        shipped = [r for r in read_manifest(store, f"{split}_shards") if r["status"] == OK]
        captions = {r["sample_key"]: r["caption"] for r in read_manifest(store, captions_stage)}
        words = [len(captions[r["sample_key"]].split()) for r in shipped]
        normal = sum(r["behavior"] == "normal" for r in shipped)
        row = table2[title]
        assert int(row[2]) == len(shipped) == len(built[f"{split}_keys"])
        assert float(row[3]) == pytest.approx(sum(words) / len(words), abs=0.05)
        assert row[4].endswith(f"({normal} / {len(shipped) - normal})")
    assert table2["Training set"][4] == "3:5 (6 / 10)" and table2["Test set"][4] == "1:1 (2 / 2)"

    funnel = {r[0]: r for r in _table_rows(text, "## Build funnel")}
    assert list(funnel) == ["frames", "pose", "pairs", "test_captions", "test_attributes", "test_shards",
                            "prompts", "generate", "gen_pose", "train_captions", "train_attributes", "train_shards"]
    for stage, row in funnel.items():
        rows = read_manifest(store, stage)
        kept = sum(r["status"] == OK for r in rows)
        assert [int(x) for x in row[1:4]] == [len(rows), kept, len(rows) - kept], stage
    assert funnel["gen_pose"][4] == "broken body: limb ratio # > # (4)"
    assert "- 2 × no counterpart image of the same identity" in text

    assert hashlib.sha256(store.read_bytes("config.yaml")).hexdigest() in text
    models = _table_rows(text, "## Models")
    assert ["generate", "`org/realvis`", "v4", "22"] in models
    assert ["train_captions", "`org/qwen2-vl`", "rev1", "18"] in models


def test_class_counts_are_the_shipped_samples_attributes(built):
    store, text = built["store"], built["text"]
    shipped = {r["sample_key"]: r for r in read_manifest(store, "train_shards") if r["status"] == OK}
    attrs = {r["sample_key"]: r for r in read_manifest(store, "train_attributes")}
    counts = text.split("### Training set", 1)[1].split("### Test set", 1)[0]
    listed = {(a, c): int(n) for a, c, n in re.findall(r"^\| (action|anomaly|scene) \| (.+?) \| (\d+) \|$", counts, re.M)}
    want = {}
    for attr, behavior in (("action", "normal"), ("anomaly", "anomaly"), ("scene", None)):
        c = Counter(attrs[k][attr] for k, r in shipped.items() if behavior in (None, r["behavior"]))
        want.update({(attr, name): n for name, n in c.items()})
    assert listed == want


def test_figures_are_valid_pngs_and_the_card_is_deterministic(built):
    store, text = built["store"], built["text"]
    linked = re.findall(r"!\[[^\]]*\]\((card/[^)]+\.png)\)", text)
    assert sorted(linked) == sorted([f"card/{s}_{a}.png" for s in ("train", "test") for a in ("action", "anomaly", "scene")]
                                    + ["card/examples_train.png", "card/examples_test.png"])
    first = {rel: store.read_bytes(rel) for rel in linked}
    for rel in linked:
        with Image.open(store.local_path(rel)) as im:
            im.verify()
        with Image.open(store.local_path(rel)) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 150
            assert len(set(im.convert("L").getdata())) > 10  # something was drawn
    write_dataset_card(built["root"])
    assert store.read_text("README.md") == text
    assert {rel: store.read_bytes(rel) for rel in linked} == first


def test_card_follows_the_manifests_when_they_change(built):
    store = built["store"]
    rows = read_manifest(store, "train_shards")
    victim = next(r for r in rows if r["status"] == OK and r["behavior"] == "normal")
    victim.update(status=REJECTED, reason="removed by a reviewer")
    write_manifest(store, "train_shards", rows)
    store.remove("config.yaml")
    text = open(write_dataset_card(built["root"]), encoding="utf-8").read()
    train = {r[0]: r for r in _table_rows(text, "## Statistics")}["Training set"]
    assert train[2] == "15" and train[4] == "1:2 (5 / 10)"
    assert "(no config.yaml in this build)" in text
    assert "removed by a reviewer (1)" in {r[0]: r for r in _table_rows(text, "## Build funnel")}["train_shards"][4]


def test_reason_patterns_and_size_bins():
    assert reason_pattern("broken body: limb ratio 2.61 > 2.5") == reason_pattern("broken body: limb ratio 3 > 2.5")
    assert reason_pattern("counterpart c0123456789-anomaly was rejected") == "counterpart <key> was rejected"
    assert size_category(999) == "n<1K" and size_category(1_013_605) == "1M<n<10M" and size_category(5_000) == "1K<n<10K"


def test_the_cards_snippet_loads_every_field_of_both_splits(built):
    from hf_snippets import assert_loads_every_field, python_blocks, ran_blocks

    blocks = python_blocks(built["text"], after="## Shards")
    assert len(blocks) == 1
    with ran_blocks(blocks, cwd=built["root"]) as namespace:
        assert_loads_every_field(namespace, built["root"], "pab", "train", "train")
        assert sorted(s["__key__"] for s in namespace["shards"]) == sorted(built["train_keys"])
    meta = _front_matter(built["text"])
    assert {i["config_name"]: [s["num_examples"] for s in i["splits"]] for i in meta["dataset_info"]} == {
        "default": [16, 4], "train": [16], "test": [4]}


def test_the_card_states_the_sampler_and_the_content_filter_deviation():
    from pab_build.release.card import generation_notes, stage_funnel

    rows = [{"status": OK, "reason": None}] * 3 + [{"status": REJECTED, "reason": "content filter: nsfw"}] * 2
    funnel = [stage_funnel("generate", pa.Table.from_pylist(rows))]  # the card counts in Arrow
    on = generation_notes({"scheduler": "dpmpp_2m_karras", "steps": 30, "guidance_scale": 7.0,
                           "content_filter": True}, funnel)
    assert "`generate.scheduler: dpmpp_2m_karras`, 30 steps" in on
    assert "Deviation from the paper: content filter" in on and "2 flagged image(s) were rejected" in on
    off = generation_notes({"scheduler": "default", "content_filter": False}, funnel)
    assert "No content filter" in off and "Deviation" not in off
    assert generation_notes({}, funnel) == ""
