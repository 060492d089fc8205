"""Stage ``gen_pose``: OpenPose on the generated images; unreasonable bodies are rejected (paper 3.2)."""

from __future__ import annotations

from ..config import model_path
from ..manifests import read_manifest_table, sorted_by_key
from ..models.openpose import detect_items, load_pose_detector, pose_row, write_pose_map
from ..models.pose_rules import generated_image_problem
from ..engine.units import Context, Stage, Unit, chunk_table_units


# -- stage: gen_pose (generated training images) --------------------------------------------------
def plan_gen_pose_units(ctx: Context) -> list[Unit]:
    columns = ["sample_key", "prompt_key", "image_path", "image_sha256"]
    items = sorted_by_key(read_manifest_table(ctx.store, "generate", columns, ok_only=True))
    return chunk_table_units("gen_pose", items, ctx.cfg.gen_pose.images_per_unit)


def run_gen_pose_unit(ctx: Context, unit: Unit) -> list[dict]:
    sec, cfg = ctx.cfg.gen_pose, ctx.cfg
    detector = load_pose_detector(model_path(cfg, "openpose"), cfg.run.device, False, cfg.models.openpose.revision)
    results = detect_items(ctx, list(unit.items), detector, sec.detect_resolution, sec.image_resolution,
                           sec.batch_size, network_height=sec.network_height, postprocess=sec.postprocess)
    rows = []
    for it in unit.items:
        res = results[it["sample_key"]]
        reason = res if isinstance(res, str) else generated_image_problem(res, sec)
        pose_rel = pose_sha = None
        if reason is None:
            pose_rel = f"gen_pose/{it['prompt_key']}/{it['sample_key']}.png"
            pose_sha = write_pose_map(ctx, pose_rel, res)
        rows.append(pose_row(it, reason, res, pose_rel, pose_sha))
    return rows


STAGE = Stage(
    name="gen_pose",
    version="2",  # 2: body height and segment stretch rules, detached parts; the measurements recorded
    plan_units=plan_gen_pose_units,
    run_unit=run_gen_pose_unit,
    config_keys=("gen_pose", "models.openpose"),
    uses_gpu=True,
)
