"""OpenPose stages (pose, gen_pose) with the tiny random OpenPose, and the person / body rules."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.fixtures import synthetic_openpose as so
from pab_build.models import openpose, pose_rules
from pab_build.config import GenPoseConfig
from pab_build.fixtures.tiny_openpose import build_tiny_openpose
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.models.loading import LOAD_COUNTS, release_models
from pab_build.stages import gen_pose as gen_pose_stage
from pab_build.stages import pose as pose_stage
from pab_build.engine.units import Context, execute_unit, run_stage


def _jpeg(seed: int, size=(96, 64)) -> bytes:
    """A small picture: a coloured background with a bright rectangle somewhere."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), rng.integers(0, 120, 3), dtype=np.uint8)
    x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    arr[y : y + h // 2, x : x + w // 3] = rng.integers(150, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_image(store, rel: str, data: bytes) -> str:
    store.write_bytes(rel, data)
    return hashlib.sha256(data).hexdigest()


# -- the tiny model and loading -------------------------------------------------------------------
def test_tiny_openpose_is_a_plain_float16_state_dict_in_the_annotators_layout(tiny_model):
    folder = tiny_model("openpose")
    state = torch.load(os.path.join(folder, openpose.BODY_FILE), weights_only=True)
    from controlnet_aux.open_pose.model import bodypose_model

    wanted = {k.split(".", 1)[1] for k in bodypose_model().state_dict()}  # first module name dropped
    assert set(state) == wanted and "conv1_1.weight" in state
    assert {t.dtype for t in state.values()} == {torch.float16}


def test_load_pose_detector_is_cached_and_paths_are_checked(tiny_model, tmp_path):
    folder = tiny_model("openpose")
    release_models()  # an earlier test may have loaded it (and a stage end released it)
    key = ("openpose", folder, None, "cpu", False)
    before = LOAD_COUNTS.get(key, 0)
    first = openpose.load_pose_detector(folder, "cpu")
    assert openpose.load_pose_detector(folder, "cpu") is first
    assert LOAD_COUNTS[key] == before + 1
    assert next(first.body_estimation.model.parameters()).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="has no body_pose_model.pth"):
        openpose.load_pose_detector(str(tmp_path), "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        openpose.load_pose_detector(str(tmp_path / "nowhere"), "cpu")


def test_hand_and_face_checkpoints_load_through_controlnet_aux(tmp_path):
    from controlnet_aux.open_pose import OpenposeDetector

    folder = str(tmp_path / "annotators")
    build_tiny_openpose(folder, seed=0, hand_and_face=True)
    assert sorted(os.listdir(folder)) == ["body_pose_model.pth", "facenet.pth", "hand_pose_model.pth"]
    OpenposeDetector.from_pretrained(folder)  # the library's own loader accepts the layout
    detector = openpose.load_pose_detector(folder, "cpu", hand_and_face=True)
    assert detector.hand_estimation is not None and detector.face_estimation is not None
    image = Image.open(io.BytesIO(_jpeg(0, (64, 64))))
    (result,) = openpose.detect_poses([image], detector, 64, 64, hand_and_face=True)
    assert result.pose_map.size == (64, 64)


# -- detection ------------------------------------------------------------------------------------
def test_detect_poses_matches_controlnet_aux_output_size_and_finds_nobody(tiny_model):
    detector = openpose.load_pose_detector(tiny_model("openpose"), "cpu")
    images = [Image.open(io.BytesIO(_jpeg(1, (96, 64)))), Image.open(io.BytesIO(_jpeg(2, (64, 64))))]
    results = openpose.detect_poses(images, detector, detect_resolution=128, image_resolution=64)
    assert len(results) == 2
    for image, result in zip(images, results):
        reference = detector(image, detect_resolution=128, image_resolution=64)  # controlnet-aux's own map
        assert result.pose_map.mode == "RGB" and result.pose_map.size == reference.size
        assert np.array_equal(np.asarray(result.pose_map), np.asarray(reference))
        assert result.n_people == 0 and result.main_person is None  # random weights find nobody
        assert result.main_person_area == 0.0 and result.n_keypoints == 0
    # detected at 192x128; controlnet-aux rounds the 96x64 map to multiples of 64 -> 128x64
    assert results[0].pose_map.size == (128, 64) and results[0].aspect_ratio == 1.5


def _body(**moves) -> list:
    """A plausible standing body in [0, 1] coordinates; ``moves`` replaces parts by index name."""
    parts = {
        0: (0.50, 0.10), 1: (0.50, 0.20), 2: (0.42, 0.20), 3: (0.40, 0.32), 4: (0.39, 0.44),
        5: (0.58, 0.20), 6: (0.60, 0.32), 7: (0.61, 0.44), 8: (0.45, 0.50), 9: (0.45, 0.68),
        10: (0.45, 0.86), 11: (0.55, 0.50), 12: (0.55, 0.68), 13: (0.55, 0.86),
        14: (0.48, 0.08), 15: (0.52, 0.08), 16: (0.46, 0.09), 17: (0.54, 0.09),
    }
    for name, value in moves.items():
        parts[int(name[1:])] = value
    return [(p[0], p[1], 0.9) if p is not None else None for p in (parts[i] for i in range(18))]


def test_pose_result_picks_the_tallest_person_with_a_neck():
    small = [(0.1, 0.1, 0.9), (0.1, 0.15, 0.8)] + [None] * 16  # a nose and neck: 0.05 of body height 0.11
    big = _body()
    no_neck = [None] * 8 + [(0.0, 0.0, 0.9), (0.0, 0.9, 0.9), (0.0, 1.0, 0.9)] + [None] * 7  # a tall leg alone
    result = openpose.pose_result([small, big, no_neck], Image.new("RGB", (8, 8)), 1.0)
    assert result.n_people == 3 and result.main_person is big and result.n_keypoints == 18
    assert result.person_height == pytest.approx(0.304 / 0.30, abs=0.01)  # its torso: the best-kept segment
    assert result.main_person_area == pytest.approx((0.61 - 0.39) * (0.86 - 0.08))
    assert json.loads(openpose.keypoints_json(result.people))[0][:3] == [[0.1, 0.1, 0.9], [0.1, 0.15, 0.8], None]
    alone = openpose.pose_result([no_neck], Image.new("RGB", (8, 8)), 1.0)
    assert alone.main_person is no_neck  # main only when nobody has a neck


def test_person_height_is_measured_in_pixels_of_the_body_not_its_box():
    lying = [(x, y, 1.0) if (x, y) else None for x, y in
             (p or (0, 0) for p in so.place(so.FRONT, 0.5, (0.75, 0.8), aspect=2.0, angle_deg=-90.0))]
    assert pose_rules.person_height(lying, 2.0) == pytest.approx(0.5, abs=0.03)  # its length, in a 2:1 frame
    assert pose_rules.person_height(lying, 4.0) == pytest.approx(1.0, abs=0.06)  # the same points, a 4:1 frame
    assert pose_rules.person_height([None] * 18, 1.0) is None and pose_rules.person_height(None, 1.0) is None


# -- rules ----------------------------------------------------------------------------------------
def test_person_problem_names_the_numbers():
    nobody = openpose.pose_result([], Image.new("RGB", (8, 8)), 1.0)
    assert pose_rules.person_problem(nobody, require_person=True, min_person_height=0.25) == "no person detected"
    assert pose_rules.person_problem(nobody, require_person=False, min_person_height=0.25) is None
    tiny = openpose.pose_result([[(0.1, 0.1, 1.0), (0.1, 0.122, 1.0)] + [None] * 16], Image.new("RGB", (8, 8)), 1.0)
    why = pose_rules.person_problem(tiny, require_person=True, min_person_height=0.25)
    assert why == "person too small: the tallest person is 0.200 of the image height (below min_person_height=0.25)"
    assert pose_rules.person_problem(tiny, require_person=True, min_person_height=0.19) is None


STRICT = GenPoseConfig(min_keypoints=8, require_neck_and_hips=True, max_limb_ratio=2.5)


def test_plausible_body_passes():
    assert pose_rules.body_structure_problem(_body(), STRICT) is None
    assert pose_rules.body_structure_problem(_body(k11=None), STRICT) is None  # one hip is enough
    # the right thigh foreshortened to 0.036 (the left is 0.18): a knee raised at the camera, not a broken body
    assert pose_rules.body_structure_problem(_body(k9=(0.45, 0.536)), STRICT) is None


def test_broken_bodies_fail_with_the_right_reason():
    assert pose_rules.body_structure_problem(_body(k1=None), STRICT) == "broken body: no neck keypoint"
    assert pose_rules.body_structure_problem(_body(k8=None, k11=None), STRICT) == "broken body: no hip keypoint"
    # right thigh 0.7 long on a body whose torso says it is ~1.0 tall: 2.86 body heights' worth of thigh
    why = pose_rules.body_structure_problem(_body(k9=(0.45, 1.2), k10=(0.45, 1.38)), STRICT)
    assert why == "broken body: right thigh is 2.82x as long as the body's height allows (above max_limb_ratio=2.5)"
    few = [k if i in (0, 1, 2, 5, 8) else None for i, k in enumerate(_body())]
    why = pose_rules.body_structure_problem(few, STRICT)
    assert why == "broken body: 5 body keypoints found (fewer than min_keypoints=8)"
    assert pose_rules.body_structure_problem(None, STRICT).startswith("broken body: 0 body keypoints")
    lenient = GenPoseConfig(min_keypoints=0, require_neck_and_hips=False)
    assert pose_rules.body_structure_problem(None, lenient) is None


def test_generated_image_problem_applies_person_rule_first():
    cfg = GenPoseConfig(require_person=True, min_keypoints=8)
    nobody = openpose.pose_result([], Image.new("RGB", (8, 8)), 1.0)
    assert pose_rules.generated_image_problem(nobody, cfg) == "no person detected"
    # without require_person an image with nobody is kept: the body rules judge bodies, not empty images
    assert pose_rules.generated_image_problem(nobody, cfg.model_copy(update={"require_person": False})) is None
    broken = openpose.pose_result([_body(k1=None)], Image.new("RGB", (8, 8)), 1.0)
    assert pose_rules.generated_image_problem(broken, cfg) == "broken body: no neck keypoint"
    assert pose_rules.generated_image_problem(openpose.pose_result([_body()], Image.new("RGB", (8, 8)), 1.0), cfg) is None
    measured = pose_rules.measurements(broken)  # no neck: the forearms are its best-kept segments
    assert measured == {"person_height": pytest.approx(0.82, abs=0.01), "person_count": 1, "keypoint_count": 17,
                        "limb_ratio_max": pytest.approx(1.0, abs=0.15)}


# -- stage: pose ----------------------------------------------------------------------------------
def _frames_manifest(ctx: Context) -> None:
    """Clip a: two good frames. Clip b: frames rejected its anomaly frame. Clip c: the anomaly
    frame's file is corrupt."""
    rows = []
    for n, (clip, behavior) in enumerate([("ca", "normal"), ("ca", "anomaly"), ("cb", "normal"),
                                          ("cc", "normal"), ("cc", "anomaly")]):
        key = f"{clip}-{behavior}"
        rel = f"frames/{key}.jpg"
        data = b"not a jpeg" if key == "cc-anomaly" else _jpeg(n)
        rows.append({"sample_key": key, "status": OK, "reason": None, "clip_key": clip, "behavior": behavior,
                     "image_path": rel, "image_sha256": _write_image(ctx.store, rel, data)})
    rows.append({"sample_key": "cb-anomaly", "status": REJECTED, "reason": "video truncated", "clip_key": "cb",
                 "behavior": "anomaly"})
    write_manifest(ctx.store, "frames", rows)


def test_pose_stage_keeps_pairs_together_and_reruns_nothing(ctx, tiny_model):
    tiny_model("openpose")
    _frames_manifest(ctx)
    counts = run_stage(ctx, pose_stage.STAGE)
    assert counts["failed"] == 0
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "pose")}
    assert sorted(rows) == ["ca-anomaly", "ca-normal", "cb-normal", "cc-anomaly", "cc-normal"]
    for key in ("ca-normal", "ca-anomaly"):
        r = rows[key]
        assert r["status"] == OK and r["pose_path"] == f"pose/{key}.png" and r["clip_key"] == "ca"
        data = ctx.store.read_bytes(r["pose_path"])
        assert hashlib.sha256(data).hexdigest() == r["pose_sha256"]
        assert Image.open(io.BytesIO(data)).size == (192, 128)  # smoke: image_resolution 128, 96x64 input
        assert r["person_count"] == 0 and json.loads(r["keypoints_json"]) == []
        assert r["image_path"] == f"frames/{key}.jpg"
    assert rows["cb-normal"]["reason"] == "counterpart cb-anomaly was rejected by frames: video truncated"
    assert rows["cc-anomaly"]["reason"].startswith("image unreadable: frames/cc-anomaly.jpg")
    assert rows["cc-normal"]["reason"].startswith("counterpart cc-anomaly was rejected by pose: image unreadable")
    assert rows["cc-normal"]["pose_path"] is None and rows["cc-normal"]["person_count"] == 0
    assert not ctx.store.exists("pose/cc-normal.png") and not ctx.store.exists("pose/cb-normal.png")

    units = pose_stage.STAGE.plan_units(ctx)
    assert [sorted({it["clip_key"] for it in u.items}) for u in units] == [["ca", "cb"], ["cc"]]  # 2 clips a unit
    assert [execute_unit(ctx, pose_stage.STAGE, u) for u in units] == ["skipped", "skipped"]


def test_pose_stage_rejects_frames_without_a_person(ctx, tiny_model):
    tiny_model("openpose")
    ctx.cfg.pose.require_person = True
    _frames_manifest(ctx)
    run_stage(ctx, pose_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "pose")}
    assert rows["ca-normal"]["reason"] == rows["ca-anomaly"]["reason"] == "no person detected"
    assert rows["ca-normal"]["person_count"] == 0 and rows["ca-normal"]["pose_path"] is None


# -- stage: gen_pose ------------------------------------------------------------------------------
def _generate_manifest(ctx: Context) -> None:
    rows = []
    for n, (prompt_key, index) in enumerate([("cx-n", 0), ("cx-n", 1), ("cx-a", 0)]):
        key = f"{prompt_key}-{index:03d}"
        rel = f"generate/{prompt_key}/{key}.jpg"
        rows.append({"sample_key": key, "status": OK, "reason": None, "prompt_key": prompt_key, "clip_key": "cx",
                     "kind": prompt_key[3:], "index": index, "seed": n, "image_path": rel,
                     "image_sha256": _write_image(ctx.store, rel, _jpeg(10 + n, (64, 64)))})
    rows.append({"sample_key": "cx-a-001", "status": REJECTED, "reason": "black image", "prompt_key": "cx-a"})
    write_manifest(ctx.store, "generate", rows)


def test_gen_pose_stage_writes_maps_per_prompt_and_reruns_nothing(ctx, tiny_model):
    tiny_model("openpose")
    _generate_manifest(ctx)
    run_stage(ctx, gen_pose_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "gen_pose")}
    assert sorted(rows) == ["cx-a-000", "cx-n-000", "cx-n-001"]  # the rejected image is not posed
    for key, r in rows.items():
        assert r["status"] == OK and r["pose_path"] == f"gen_pose/{key[:4]}/{key}.png"
        assert hashlib.sha256(ctx.store.read_bytes(r["pose_path"])).hexdigest() == r["pose_sha256"]
        assert r["image_path"] == f"generate/{key[:4]}/{key}.jpg"
    (unit,) = gen_pose_stage.STAGE.plan_units(ctx)
    assert execute_unit(ctx, gen_pose_stage.STAGE, unit) == "skipped"


def test_gen_pose_stage_rejects_images_by_the_rule_and_keeps_the_measurements(ctx, tiny_model):
    tiny_model("openpose")
    ctx.cfg.gen_pose.require_person = True
    _generate_manifest(ctx)
    run_stage(ctx, gen_pose_stage.STAGE)
    rows = read_manifest(ctx.store, "gen_pose")
    assert {r["reason"] for r in rows} == {"no person detected"}  # the tiny random OpenPose finds nobody
    assert {(r["person_count"], r["keypoint_count"], r["person_height"], r["limb_ratio_max"]) for r in rows} == {
        (0, 0, None, None)}


def test_an_image_openpose_fails_on_is_rejected_alone(ctx, tiny_model, monkeypatch):
    tiny_model("openpose")
    _generate_manifest(ctx)
    rows = read_manifest(ctx.store, "generate")
    odd = next(r for r in rows if r["sample_key"] == "cx-n-001")
    odd["image_sha256"] = _write_image(ctx.store, odd["image_path"], _jpeg(99, (72, 64)))
    write_manifest(ctx.store, "generate", rows)
    real = openpose._detect_one

    def fails_on_72_px(image, *args):
        if image.width == 72:
            raise ValueError("cannot pose this one")
        return real(image, *args)

    monkeypatch.setattr(openpose, "_detect_one", fails_on_72_px)
    run_stage(ctx, gen_pose_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "gen_pose")}
    assert rows["cx-n-001"]["reason"] == "pose detection failed: ValueError: cannot pose this one"
    assert rows["cx-n-000"]["status"] == rows["cx-a-000"]["status"] == OK  # same batch, kept
