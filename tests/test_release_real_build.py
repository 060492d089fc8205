"""The release steps (official export, dataset card, publish) on a build made by the real stages
(the session's ``real_build``: every stage on the tiny models and the bundled sample), so their
inputs are what the shard stages really write, not a hand-made tree."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from pab_build.manifests import OK, read_manifest
from pab_build.release.official import export_official
from pab_build.release.publish import publish
from pab_build.shards.index import verify_shards
from pab_build.shards.writer import iter_shard_samples
from pab_build.store import Store

pytestmark = pytest.mark.slow


def _shipped(store: Store, split: str) -> dict[str, dict]:
    return {r["sample_key"]: r for r in read_manifest(store, f"{split}_shards") if r["status"] == OK}


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_official_export_ships_every_shard_sample_and_resolves_every_hard_negative(real_build, tmp_path):
    store = Store(real_build)
    train, test = _shipped(store, "train"), _shipped(store, "test")
    assert train and test
    dest = str(tmp_path / "PAB")
    summary = export_official(real_build, dest)
    assert summary["skipped"] == []
    assert summary["train_images"] == len(train) and summary["test_images"] == len(test)
    keys = json.load(open(f"{dest}/annotation/pab_keys.json", encoding="utf-8"))
    records = [r for k in summary["generation_indices"] for r in _jsonl(f"{dest}/annotation/train/attr_{k}.json")]
    by_id = {r["image_id"]: r for r in records}
    assert sorted(keys["train"][i] for i in by_id) == sorted(train)
    for r in records:
        key = keys["train"][r["image_id"]]
        assert keys["train"][r["hard_i_id"]] == train[key]["hard_negative_key"]  # the shard stage's link
        assert by_id[r["hard_i_id"]]["caption"] == r["hard_c"]
        for rel in (r["image"], "pose/" + r["image"]):
            with Image.open(f"{dest}/{rel}") as im:
                im.verify()
    tests = _jsonl(f"{dest}/annotation/test/attr.json")
    assert sorted(keys["test"][str(t["image_id"])] for t in tests) == sorted(test)


def test_card_numbers_are_the_real_manifests(real_build):
    store = Store(real_build)
    text = store.read_text("README.md")
    for split, title in (("train", "Training set"), ("test", "Test set")):
        line = next(ln for ln in text.split("## Statistics", 1)[1].splitlines() if ln.startswith(f"| {title} |"))
        assert line.split(" | ")[2].strip() == str(len(_shipped(store, split))), line
    funnel = text.split("## Build funnel", 1)[1]
    for stage in ("frames", "pose", "pairs", "prompts", "generate", "gen_pose", "train_shards", "test_shards"):
        rows = read_manifest(store, stage)
        kept = sum(r["status"] == OK for r in rows)
        assert f"| {stage} | {len(rows)} | {kept} | {len(rows) - kept} |" in funnel, stage
    assert json.loads(store.read_text("shards/index.json"))["splits"]["train"]["totals"]["samples"] == len(
        _shipped(store, "train"))


def test_publish_to_a_folder_copies_what_verifies_and_a_rerun_uploads_nothing(real_build, tmp_path):
    out = str(tmp_path / "build")
    shutil.copytree(real_build, out)  # publishing may write beside the build; the fixture is shared
    dest = str(tmp_path / "published")
    first = publish(out, dest)
    assert first.ok and first.uploaded, str(first)
    assert verify_shards(dest).ok
    tars = sorted(os.path.join(dirpath, f) for dirpath, _, files in os.walk(os.path.join(dest, "shards"))
                  for f in files if f.endswith(".tar") and "/train/" in os.path.join(dirpath, f))
    assert sorted(s["__key__"] for s in iter_shard_samples(tars)) == sorted(_shipped(Store(out), "train"))
    again = publish(out, dest)
    assert again.ok and again.uploaded == [] and again.skipped, str(again)
