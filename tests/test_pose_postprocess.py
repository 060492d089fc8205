"""pab_build/models/pose_postprocess.py against controlnet-aux's own post-processing (``Body.__call__``):
on synthetic network outputs of known skeletons (pab_build/fixtures/synthetic_openpose.py) and on the
tiny random network's real outputs. Speed is measured in bench/bench_pose_postprocess.py, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.fixtures import synthetic_openpose as so
from pab_build.models import openpose
from pab_build.models import pose_postprocess as pp


def _detector(people=None, tiny_folder: str | None = None):
    openpose.import_open_pose()
    from controlnet_aux.open_pose import Body, OpenposeDetector

    if tiny_folder is not None:
        return OpenposeDetector(Body(f"{tiny_folder}/{openpose.BODY_FILE}"))
    body = Body.__new__(Body)  # the synthetic network replaces the weights: none loaded
    body.model = torch.nn.Linear(1, 1)
    det = OpenposeDetector(body)
    so.install(det, people)
    return det


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _both(det, images, detect_resolution: int, image_resolution: int | None = None):
    res = image_resolution or detect_resolution
    ours = openpose.detect_poses(images, det, detect_resolution, res, postprocess="torch")
    theirs = openpose.detect_poses(images, det, detect_resolution, res, postprocess="controlnet_aux")
    return ours, theirs


def _assert_same(ours: openpose.PoseResult, theirs: openpose.PoseResult, width: int, height: int):
    assert ours.n_people == theirs.n_people
    for a, b in zip(ours.people, theirs.people):
        assert [k is None for k in a] == [k is None for k in b]
        for ka, kb in zip(a, b):
            if ka is not None:  # within 1 px of the detect image; scores to float rounding
                assert abs(ka[0] - kb[0]) * width <= 1 and abs(ka[1] - kb[1]) * height <= 1
                assert ka[2] == pytest.approx(kb[2], abs=1e-5)
    assert ours.pose_map.size == theirs.pose_map.size
    assert ours.pose_map.tobytes() == theirs.pose_map.tobytes()


W, H = 480, 320  # 3:2; detected at 256 px (the shorter side), so 384 x 256
ASPECT = W / H
SCENES = {
    "one person": [so.front(0.7, (0.5, 0.95), ASPECT)],
    "several": [so.front(0.5, (0.15, 0.9), ASPECT), so.profile(0.6, (0.35, 0.95), ASPECT),
                so.lying(0.4, (0.55, 0.8), ASPECT)],
    "overlapping": [so.front(0.7, (0.45, 0.95), ASPECT), so.front(0.6, (0.55, 0.85), ASPECT)],
    "none": [],
    "partial": [so.in_frame(so.front(1.4, (0.5, 1.6), ASPECT)),  # legs out of the frame
                so.in_frame(so.front(0.6, (0.97, 0.95), ASPECT))],  # cut by the right edge
}


@pytest.mark.parametrize("scene", list(SCENES))
def test_same_people_keypoints_and_pose_map_as_controlnet_aux(scene):
    people = SCENES[scene]
    ours, theirs = _both(_detector(people), [_image(W, H)], 256, 192)
    _assert_same(ours[0], theirs[0], 384, 256)
    # the scenes are clear enough for OpenPose to find each person with its visible parts (a profile's
    # far wrist may sit on its near arm's limb and be lost: by both post-processings alike)
    found = sorted(sum(k is not None for k in p) for p in ours[0].people)
    drawn = sorted(sum(k is not None for k in p) for p in people)
    assert len(found) == len(drawn) and all(0 <= d - f <= 1 for f, d in zip(found, drawn)), (found, drawn)


def test_candidates_and_subsets_equal_controlnet_aux_at_512():
    """The raw outputs too: every peak (x, y exact), its score, and the people's part indices."""
    det = _detector(SCENES["several"] + SCENES["overlapping"])
    bgr = np.asarray(_image(768, 512))[:, :, ::-1].copy()
    cand, subset = det.body_estimation(bgr)
    (ours_cand, ours_subset), = pp.body_poses(det.body_estimation, [bgr])
    assert ours_cand.shape == cand.shape and len(cand) > 50
    assert (ours_cand[:, [0, 1, 3]] == cand[:, [0, 1, 3]]).all()
    np.testing.assert_allclose(ours_cand[:, 2], cand[:, 2], atol=1e-6)
    assert (ours_subset[:, :18] == subset[:, :18]).all() and (ours_subset[:, 19] == subset[:, 19]).all()
    np.testing.assert_allclose(ours_subset[:, 18], subset[:, 18], atol=1e-5)


def test_a_batch_gives_what_each_image_gives_alone():
    """Images of two sizes in one call: grouped by shape, each group one network call and one batched
    post-processing; results in the callers' order."""
    def scene(x: np.ndarray):  # people depend on the image (its mean), so a mix-up would show
        return [so.front(0.6 + 0.2 * float(x.mean() > 0.2), (0.5, 0.95), 1.5)]

    det = _detector(scene)
    images = [_image(W, H, 0), Image.new("RGB", (W, H), (250, 250, 250)), _image(H, W, 2), _image(W, H, 3)]
    batched = openpose.detect_poses(images, det, 256, 256, postprocess="torch")
    alone = [openpose.detect_poses([im], det, 256, 256, postprocess="torch")[0] for im in images]
    assert [r.people for r in batched] == [r.people for r in alone]
    assert [r.pose_map.tobytes() for r in batched] == [r.pose_map.tobytes() for r in alone]
    assert batched[0].main_person_area != batched[1].main_person_area  # the scene did differ


def test_resize_matrices_reproduce_controlnet_aux_resize_chain():
    rng = np.random.default_rng(0)
    for out_hw in ((256, 384), (64, 64)):
        data, resized_hw = pp.network_input(np.zeros((*out_hw, 3), np.uint8))
        x = rng.standard_normal(data.shape[2:]).astype(np.float32)
        ry, rx = pp.resize_matrices(data.shape[2:], resized_hw, out_hw)
        np.testing.assert_allclose(ry @ x @ rx.T, pp.aux_upsample(x, resized_hw, out_hw), atol=1e-5)


def test_tiny_random_network_real_outputs_agree(tiny_model):
    """Whatever the tiny random network finds, both find it: the same people (none: its maps are
    nearly flat), pose maps and peaks. On those flat maps neighbours differ by ~1e-7 and controlnet-aux's
    float32 resizes by ~1e-8, so where a plateau's top is a near-tie the two may pick pixels a few
    apart (the synthetic tests above show peaks equal wherever a map has a real peak)."""
    det = _detector(tiny_folder=tiny_model("openpose"))
    for size, res in (((W, H), 256), ((128, 128), 128)):
        image = _image(*size, seed=5)
        rgb = openpose._detect_input(image, res)
        bgr = rgb[:, :, ::-1].copy()
        cand, subset = det.body_estimation(bgr)
        (ours_cand, ours_subset), = pp.body_poses(det.body_estimation, [bgr])
        assert ours_subset.shape == subset.shape and (ours_subset == subset).all()
        assert len(cand) > 10 and abs(len(ours_cand) - len(cand)) <= 2
        for x, y, _, _ in ours_cand:  # each peak of ours is within 4 px of one of controlnet-aux's
            assert np.abs(cand[:, :2] - (x, y)).max(1).min() <= 4
        # most peaks are the very same pixel (counted per peak, so one near-tie does not shift the rest)
        same = np.mean([(cand[:, :2] == (x, y)).all(1).any() for x, y, _, _ in ours_cand])
        assert same >= 0.85, same
        ours, theirs = _both(det, [image], res)
        _assert_same(ours[0], theirs[0], rgb.shape[1], rgb.shape[0])
