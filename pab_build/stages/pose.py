"""Stage ``pose``: OpenPose on the test frames; a pair is kept only when both frames show a person."""

from __future__ import annotations

from ..config import model_path
from ..manifests import OK, read_manifest
from ..models.openpose import PoseResult, detect_items, load_pose_detector, pose_row, write_pose_map
from ..models.pose_rules import person_problem
from ..engine.units import Context, Stage, Unit, chunk_units
from .frames import sample_key as frame_sample_key


# -- stage: pose (test frames) --------------------------------------------------------------------
def _counterpart_behavior(behavior: str) -> str:
    return "anomaly" if behavior == "normal" else "normal"


def plan_pose_units(ctx: Context) -> list[Unit]:
    """Kept frames, a clip's two frames in the same unit. A frame whose counterpart frames did not
    keep carries that reason, so it is rejected without running OpenPose."""
    columns = ["sample_key", "status", "reason", "clip_key", "behavior", "image_path", "image_sha256"]
    frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames", columns)}
    items = []
    for key in sorted(k for k, r in frames.items() if r["status"] == OK):
        r = frames[key]
        other_key = frame_sample_key(r["clip_key"], _counterpart_behavior(r["behavior"]))
        other = frames.get(other_key)
        problem = None
        if other is None:
            problem = f"counterpart {other_key} is not in the frames manifest"
        elif other["status"] != OK:
            problem = f"counterpart {other_key} was rejected by frames: {other['reason']}"
        items.append({
            "sample_key": key, "clip_key": r["clip_key"], "behavior": r["behavior"],
            "image_path": r["image_path"], "image_sha256": r["image_sha256"],
            "counterpart_key": other_key, "counterpart_problem": problem,
        })
    return chunk_units("pose", items, ctx.cfg.pose.clips_per_unit, group_key="clip_key")


def run_pose_unit(ctx: Context, unit: Unit) -> list[dict]:
    """A pair is kept only when both frames are: a frame whose counterpart fails is rejected too."""
    sec, cfg = ctx.cfg.pose, ctx.cfg
    items = list(unit.items)
    todo = [it for it in items if not it["counterpart_problem"]]
    results: dict[str, PoseResult | str] = {}
    if todo:
        detector = load_pose_detector(model_path(cfg, "openpose"), cfg.run.device, sec.hand_and_face,
                                      cfg.models.openpose.revision)
        results = detect_items(ctx, todo, detector, sec.detect_resolution, sec.image_resolution,
                               sec.batch_size, sec.hand_and_face, sec.network_height, sec.postprocess)
    own: dict[str, str | None] = {}
    for it in items:
        key, res = it["sample_key"], results.get(it["sample_key"], "")
        if it["counterpart_problem"]:
            own[key] = it["counterpart_problem"]
        else:
            own[key] = res if isinstance(res, str) else person_problem(res, sec.require_person, sec.min_person_height)
    rows = []
    for it in items:
        key, res = it["sample_key"], results.get(it["sample_key"], "")
        reason = own[key]
        if reason is None and own.get(it["counterpart_key"]):
            reason = f"counterpart {it['counterpart_key']} was rejected by pose: {own[it['counterpart_key']]}"
        pose_rel = pose_sha = None
        if reason is None:
            pose_rel = f"pose/{key}.png"
            pose_sha = write_pose_map(ctx, pose_rel, res)
        rows.append(pose_row(it, reason, res, pose_rel, pose_sha, clip_key=it["clip_key"], behavior=it["behavior"]))
    return rows


STAGE = Stage(
    name="pose",
    version="2",  # 2: the person rule measures body height; person_height, limb_ratio_max, renamed counts
    plan_units=plan_pose_units,
    run_unit=run_pose_unit,
    config_keys=("pose", "models.openpose"),
    uses_gpu=True,
)
