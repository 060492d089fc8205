"""CMP training is a resumable unit: a finished training is skipped, an interrupted one resumes
from its last checkpoint to the same weights, changed inputs move old checkpoints aside; an
unchanged evaluation is reused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pab_build.cmp.evaluate import evaluate_cmp
from pab_build.cmp.train import train_cmp
from pab_build.config import load_config
from pab_build.fixtures.tiny_cmp import write_synthetic_cmp_build


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_cmp_build(str(tmp_path_factory.mktemp("cmp-resume-build")), test_identities=4)


@pytest.fixture
def make_cfg(tiny_model, models_dir):
    tiny_model("swin"), tiny_model("bert")

    def make(**extra):
        return load_config("smoke", {"fixtures.models_dir": models_dir, "cmp.image_size": 32, "cmp.batch_size": 8,
                                     "cmp.epochs": 1000, "cmp.pose_heads": 4, "cmp.pose_stem_width": 8,
                                     "cmp.max_steps": 4, "cmp.checkpoint_every": 2, "cmp.warmup_steps": 2,
                                     "cmp.rerank_k": 4, **{f"cmp.{k}": v for k, v in extra.items()}})
    return make


def weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(f"{summary['checkpoint']}/model.safetensors")


def test_interrupted_training_resumes_to_the_same_weights_and_a_finished_one_is_skipped(make_cfg, shards, tmp_path):
    cfg = make_cfg()
    straight = train_cmp(cfg, shards, str(tmp_path / "a"))
    assert straight["steps"] == 4 and not straight["skipped"]

    # interrupted after 3 steps: the checkpoint of step 2 is the last one; step 3 is lost
    out = str(tmp_path / "b")
    cut = train_cmp(cfg, shards, out, stop_after=3)
    assert cut["steps"] == 3 and not (tmp_path / "b" / "cmp" / "train_summary.json").exists()
    resumed = train_cmp(cfg, shards, out)  # a plain rerun
    assert resumed["resumed_from"].endswith("step-00000002") and sorted(resumed["losses"]) == [3, 4]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)

    again = train_cmp(cfg, shards, out)  # finished, same shards and config: nothing trains
    assert again["skipped"] and again["steps"] == 4 and again["checkpoint"] == resumed["checkpoint"]
    # an evaluation-only setting is not part of the training's identity
    assert train_cmp(make_cfg(rerank_k=2, eval_combination="official_4gpu"), shards, out)["skipped"]


def test_changed_inputs_retrain_and_keep_the_old_checkpoints(make_cfg, shards, tmp_path):
    out = tmp_path / "out"
    first = train_cmp(make_cfg(max_steps=2), shards, str(out))
    second = train_cmp(make_cfg(max_steps=2, itc_label_smoothing=0.0), shards, str(out))
    assert not second["skipped"] and second["train_key"] != first["train_key"] and second["resumed_from"] is None
    moved = list((out / "cmp" / "superseded").glob("*/step-00000002/state.json"))
    assert len(moved) == 1 and first["train_key"].startswith(moved[0].parent.parent.name)


def test_an_unchanged_evaluation_is_reused(make_cfg, shards, tmp_path):
    cfg = make_cfg(max_steps=2)
    trained = train_cmp(cfg, shards, str(tmp_path))
    first = evaluate_cmp(cfg, trained["checkpoint"], shards, str(tmp_path))
    again = evaluate_cmp(cfg, trained["checkpoint"], shards, str(tmp_path))
    assert not first["reused"] and again["reused"] and again["behavior"] == first["behavior"]
    changed = evaluate_cmp(make_cfg(max_steps=2, eval_combination="official_4gpu"), trained["checkpoint"], shards,
                           str(tmp_path))
    assert not changed["reused"] and changed["inputs_hash"] != first["inputs_hash"]


def test_the_training_key_follows_the_train_shards_in_the_index_only(tmp_path):
    import json

    from pab_build.cmp.checkpoints import train_key

    cfg = load_config("smoke")
    index = {"format": "pab-shards", "format_version": 1, "splits": {
        "train": {"shards": [{"path": "train/train-000000.tar", "samples": 2, "bytes": 10, "sha256": "a" * 64}]},
        "test": {"shards": [{"path": "test/test-000000.tar", "samples": 2, "bytes": 10, "sha256": "b" * 64}]}}}
    (tmp_path / "shards").mkdir()
    path = tmp_path / "shards" / "index.json"
    path.write_text(json.dumps(index))
    key = train_key(cfg, str(tmp_path))
    index["splits"]["test"]["shards"][0]["sha256"] = "c" * 64  # a new test set: same training
    path.write_text(json.dumps(index))
    assert train_key(cfg, str(tmp_path)) == key
    index["splits"]["train"]["shards"][0]["sha256"] = "d" * 64  # new training shards: a new training
    path.write_text(json.dumps(index))
    assert train_key(cfg, str(tmp_path)) != key
    cfg.cmp.rerank_k = 3  # evaluation-only
    assert train_key(cfg, str(tmp_path)) == train_key(load_config("smoke"), str(tmp_path))
