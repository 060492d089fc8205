"""frames -> pose -> pairs on the sample clips: with a strict similarity threshold (a `--set`
override), the clip whose two frames are identical is rejected by `pairs`, the rest flows on."""

import pytest

from pab_build.config import load_config
from pab_build.manifests import read_manifest
from pab_build.stages import frames as frames_stage
from pab_build.stages import pairs as pairs_stage
from pab_build.stages import pose as pose_stage
from pab_build.engine.units import Context, run_stage

pytestmark = pytest.mark.slow


def test_identical_frames_are_rejected_by_pairs_and_the_rest_flows_on(tmp_path, models_dir, tiny_model, sample_oops_root):
    tiny_model("openpose"), tiny_model("resnet50")
    cfg = load_config("smoke", {"fixtures.models_dir": models_dir, "oops.root": sample_oops_root,
                                "pairs.max_cosine": 0.9999})
    ctx = Context.create(cfg, str(tmp_path / "out"))
    for stage in (frames_stage.STAGE, pose_stage.STAGE, pairs_stage.STAGE):
        assert run_stage(ctx, stage)["failed"] == 0
    rows = {(r["sample_key"]): r for r in read_manifest(ctx.store, "pairs")}
    names = {r["sample_key"]: r["clip_name"] for r in read_manifest(ctx.store, "frames")}
    rejected = {names[k] for k, r in rows.items() if r["status"] == "rejected"}
    assert rejected == {"Kid stands still by the pool"}
    static = [r for k, r in rows.items() if names[k] == "Kid stands still by the pool"]
    assert len(static) == 2 and all(r["cosine"] > 0.9999 and "cosine" in r["reason"] for r in static)
    assert sum(r["status"] == "ok" for r in rows.values()) == 8
