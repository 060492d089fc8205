"""OpenPose's real post-processing on people it can see: the body network's raw output is replaced by
synthetic outputs for known skeletons (pab_build/fixtures/synthetic_openpose.py); everything after the
network (peaks, PAF scoring, person assembly, drawing) is controlnet-aux's own, then the project's rules."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.fixtures import synthetic_openpose as so
from pab_build.config import GenPoseConfig
from pab_build.models import openpose, pose_rules

W, H = 640, 360  # a 16:9 frame
ASPECT = W / H


def _detector():
    """controlnet-aux's detector with its real ``Body``; the body network is installed per test (the
    checkpoint's weights would be replaced anyway, so none is loaded)."""
    openpose.import_open_pose()
    from controlnet_aux.open_pose import Body, OpenposeDetector

    body = Body.__new__(Body)
    body.model = torch.nn.Linear(1, 1)  # only its device is read before install() replaces it
    return OpenposeDetector(body)


def _image(seed: int = 0, size=(W, H)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def detect(people, size=(W, H), detect_resolution=256, **kw) -> openpose.PoseResult:
    det = _detector()
    so.install(det, people)
    return openpose.detect_poses([_image(size=size)], det, detect_resolution, detect_resolution, **kw)[0]


def _max_error(want: so.Skeleton, got: openpose.Person) -> float:
    assert [w is None for w in want] == [g is None for g in got]
    return max(max(abs(w[0] - g[0]), abs(w[1] - g[1])) for w, g in zip(want, got) if w is not None)


def test_a_person_is_detected_through_the_real_post_processing():
    person = so.front(0.6, (0.5, 0.95), ASPECT)
    result = detect([person])
    assert result.n_people == 1 and result.n_keypoints == 18
    assert _max_error(person, result.main_person) < 0.01  # a pixel or two of the 256-px detect image


def test_pose_map_equals_controlnet_aux_rendering_byte_for_byte():
    people = [so.front(0.47, (0.3, 0.95), ASPECT), so.profile(0.78, (0.7, 0.9), ASPECT)]
    det = _detector()
    so.install(det, people)
    ours = openpose.detect_poses([_image()], det, 256, 384)[0]
    theirs = det(np.asarray(_image()), detect_resolution=256, image_resolution=384, output_type="pil")
    assert ours.n_people == 2
    assert ours.pose_map.size == theirs.size
    assert ours.pose_map.tobytes() == theirs.tobytes()
    assert np.asarray(ours.pose_map).any()  # something was drawn


# -- the rules on people OpenPose found (issue 19) ---------------------------------------------------
STRICT = GenPoseConfig(min_keypoints=8, require_neck_and_hips=True, max_limb_ratio=2.5, min_person_height=0.2)


def _verdicts(result: openpose.PoseResult) -> tuple[str | None, str | None]:
    """(the test-set rule's verdict at min_person_height 0.25, the generated-image rule's)."""
    return pose_rules.person_problem(result, True, 0.25), pose_rules.generated_image_problem(result, STRICT)


def test_front_person_at_47_percent_is_kept_and_measured():
    result = detect([so.front(0.47, (0.5, 0.95), ASPECT)])
    assert _verdicts(result) == (None, None)
    m = pose_rules.measurements(result)
    assert m["person_height"] == pytest.approx(0.47, abs=0.03)
    assert (m["person_count"], m["keypoint_count"]) == (1, 18) and m["limb_ratio_max"] < 1.3


def test_profile_at_78_percent_of_a_16_9_frame_is_kept():
    result = detect([so.profile(0.78, (0.5, 0.92), ASPECT)])
    assert result.main_person_area < 0.05  # the keypoint box the old rule measured: "too small"
    assert result.person_height == pytest.approx(0.78, abs=0.03)
    assert _verdicts(result) == (None, None)


def test_small_far_person_is_rejected_as_too_small():
    result = detect([so.front(0.10, (0.8, 0.9), ASPECT)])
    assert result.n_people == 1 and result.person_height == pytest.approx(0.10, abs=0.02)
    pose_why, gen_why = _verdicts(result)
    assert pose_why.startswith("person too small: the tallest person is 0.1") and "min_person_height=0.25" in pose_why
    assert gen_why.startswith("person too small") and "min_person_height=0.2" in gen_why


def test_two_people_the_tallest_is_judged():
    result = detect([so.front(0.12, (0.2, 0.95), ASPECT), so.profile(0.6, (0.7, 0.95), ASPECT)])
    assert result.n_people == 2 and result.person_height == pytest.approx(0.6, abs=0.03)
    assert result.main_person[17] is not None and result.main_person[16] is None  # the profile's visible ear
    assert _verdicts(result) == (None, None)


def test_person_partly_out_of_frame_is_measured_by_what_is_visible():
    visible = so.in_frame(so.front(0.9, (0.5, 1.3), ASPECT))  # knees and feet below the frame
    assert visible[10] is None and visible[9] is None
    result = detect([visible])
    assert result.n_keypoints == 14 and result.person_height == pytest.approx(0.9, abs=0.05)
    assert _verdicts(result) == (None, None)


def test_a_fall_lying_on_the_ground_is_kept():
    result = detect([so.lying(0.5, (0.75, 0.85), ASPECT)])
    assert result.n_keypoints == 18
    xs, ys = [k[0] * ASPECT for k in result.main_person if k], [k[1] for k in result.main_person if k]
    assert max(xs) - min(xs) > 1.5 * (max(ys) - min(ys))  # lying down
    assert result.person_height == pytest.approx(0.5, abs=0.08)  # its body length
    assert _verdicts(result) == (None, None)


def test_a_foreshortened_arm_is_kept():
    result = detect([so.foreshortened_arm(0.6, (0.5, 0.95), ASPECT)])
    person = result.main_person
    right = math.dist(person[2][:2], person[3][:2])
    left = math.dist(person[5][:2], person[6][:2])
    assert left / right > 4  # the old left/right rule's "broken body"
    assert _verdicts(result) == (None, None)
    assert pose_rules.measurements(result)["limb_ratio_max"] < 1.3


def test_an_arm_longer_than_the_body_allows_is_rejected():
    body = list(so.FRONT)
    body[7] = (0.19, 0.37 + 4 * 0.146)  # left forearm four times its length
    result = detect([so.place(body, 0.5, (0.5, 0.8), ASPECT)])
    assert result.n_keypoints == 18
    why = pose_rules.generated_image_problem(result, STRICT)
    assert why.startswith("broken body: left forearm is ") and "above max_limb_ratio=2.5" in why
    assert pose_rules.measurements(result)["limb_ratio_max"] > 3.5  # recorded on the rejected row too


def test_a_second_head_is_a_part_attached_to_no_body():
    person = so.front(0.6, (0.5, 0.95), ASPECT)
    head = [None] * 18
    for part in (0, 14, 15, 16, 17):  # nose, eyes, ears: moved beside the first head
        head[part] = (person[part][0] + 0.06, person[part][1] + 0.02)
    result = detect([person, head])
    assert result.n_people == 2 and result.main_person[1] is not None  # the body is main, the head apart
    assert pose_rules.body_structure_problem(result.main_person, STRICT, ASPECT) is None
    why = pose_rules.generated_image_problem(result, STRICT)
    assert why == "broken body: 5 body parts in 1 group(s) attached to no body (no neck) on the person"
    assert pose_rules.generated_image_problem(result, STRICT.model_copy(update={"reject_detached_parts": False})) is None


def test_legs_attached_to_no_body_leave_it_without_hips():
    person = so.front(0.6, (0.5, 0.95), ASPECT)
    legs = [None] * 8 + person[8:14] + [None] * 4
    torso = person[:8] + [None] * 6 + person[14:]
    # the legs are drawn but no limb joins them to the neck: OpenPose drops groups under 4 parts
    result = detect([torso, so.scaled(legs, 1.0, shift=(0.2, 0.0))])
    assert result.n_people == 1 and result.main_person[8] is None and result.main_person[11] is None
    assert pose_rules.generated_image_problem(result, STRICT) == "broken body: no hip keypoint"


def test_network_height_sets_the_network_input_and_keeps_the_geometry():
    person = so.front(0.3, (0.3, 0.9), ASPECT)
    det = _detector()
    net = so.install(det, [person])
    at_184 = openpose.detect_poses([_image()], det, 256, 256)[0]
    at_368 = openpose.detect_poses([_image()], det, 256, 256, network_height=368)[0]
    assert [s[2] for s in net.input_shapes] == [184, 368]  # rows (padded to a multiple of 8)
    assert _max_error(person, at_184.main_person) < 0.01 and _max_error(person, at_368.main_person) < 0.01
    from controlnet_aux.open_pose import body

    assert not isinstance(body.util, openpose._NetworkInput)  # controlnet-aux's module is given back


# -- the synthetic model folder (smoke calibration data) ------------------------------------------
def test_the_synthetic_folder_loads_through_the_ordinary_loader_and_draws_varied_scenes(tmp_path):
    from pab_build.fixtures import build_tiny_models

    folder = build_tiny_models(str(tmp_path), only=["openpose-synthetic"])["openpose-synthetic"]
    assert sorted(os.listdir(folder)) == [".pab-fixture", so.MARKER_FILE]  # no checkpoint: nothing to fake
    det = openpose.load_pose_detector(folder, "cpu")
    assert isinstance(det.body_estimation.model, so.SyntheticBodyNetwork)
    images = [_image(seed, (160, 120)) for seed in range(10)]
    results = openpose.detect_poses(images, det, 128, 64)
    again = openpose.detect_poses(images[:3], det, 128, 64)
    assert [r.people for r in again] == [r.people for r in results[:3]]  # the image decides its scene
    verdicts = [pose_rules.generated_image_problem(r, STRICT) for r in results]
    assert len({r.n_people for r in results}) > 1 and len({r.n_keypoints for r in results}) > 1
    assert any(v is None for v in verdicts) and any(v is not None for v in verdicts)  # some kept, some rejected
