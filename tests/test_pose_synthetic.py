"""OpenPose's real post-processing on people it can see: the body network's raw output is replaced by
synthetic outputs for known skeletons (pab_build/fixtures/synthetic_openpose.py); everything after the
network (peaks, PAF scoring, person assembly, drawing) is controlnet-aux's own, then the project's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.fixtures import synthetic_openpose as so
from pab_build.models import openpose

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


def detect(people, size=(W, H), detect_resolution=512, **kw) -> openpose.PoseResult:
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
    assert _max_error(person, result.main_person) < 0.01  # a few pixels of the 512-px detect image


def test_pose_map_equals_controlnet_aux_rendering_byte_for_byte():
    people = [so.front(0.47, (0.3, 0.95), ASPECT), so.profile(0.78, (0.7, 0.9), ASPECT)]
    det = _detector()
    so.install(det, people)
    ours = openpose.detect_poses([_image()], det, 512, 384)[0]
    theirs = det(np.asarray(_image()), detect_resolution=512, image_resolution=384, output_type="pil")
    assert ours.n_people == 2
    assert ours.pose_map.size == theirs.size
    assert ours.pose_map.tobytes() == theirs.tobytes()
    assert np.asarray(ours.pose_map).any()  # something was drawn
