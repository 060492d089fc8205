"""OpenPose (controlnet-aux): keypoints, person checks, body-structure rule, pose maps.

Shared by the stages ``pose`` (test frames) and ``gen_pose`` (generated images). Paper 3.1: test frames
"that do not contain people or where people occupy a small proportion of the image area" are dropped
with OpenPose. Paper 3.2: generated images "with unreasonable human structures" are dropped with
OpenPose (the rule is :func:`body_structure_problem`). Every kept image gets the OpenPose map CMP's
pose-aware encoder reads, rendered as controlnet-aux renders it.

Keypoints are OpenPose's 18 body parts (:data:`BODY_PARTS`), as ``(x, y, score)`` with x and y in
[0, 1] of the image OpenPose saw, or None when the part was not found.
"""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..manifests import keep, reject
from .pose_rules import NECK, Keypoint, Person, measurements, person_height  # noqa: F401 (re-exported)
from .loading import cached_model, inference, is_oom, resolve_device
from ..engine.units import Context

BODY_FILE = "body_pose_model.pth"  # file names in the lllyasviel/Annotators repository


HAND_FILE = "hand_pose_model.pth"


FACE_FILE = "facenet.pth"


BODY_PARTS = (
    "nose", "neck", "right shoulder", "right elbow", "right wrist", "left shoulder", "left elbow",
    "left wrist", "right hip", "right knee", "right ankle", "left hip", "left knee", "left ankle",
    "right eye", "left eye", "right ear", "left ear",
)


@dataclass
class PoseResult:
    """What OpenPose found in one image."""

    people: list[Person]
    n_people: int
    main_person: Person | None  # the tallest person (estimated body height), preferring one with a neck
    main_person_area: float  # that person's keypoint box / image area (0 when nobody is found)
    n_keypoints: int  # body parts found for the main person
    aspect_ratio: float  # width / height of the image the keypoints are normalised to
    pose_map: Image.Image  # RGB, rendered like controlnet-aux's OpenposeDetector.__call__
    person_height: float | None = None  # the main person's estimated body height / image height


# -- loading --------------------------------------------------------------------------------------
def annotator_file(path: str, filename: str, revision: str | None = None) -> str:
    """A checkpoint from a local annotators folder or a hub repository (``lllyasviel/Annotators``),
    found the way controlnet-aux's ``OpenposeDetector.from_pretrained`` finds it."""
    if os.path.isdir(path):
        found = os.path.join(path, filename)
        if not os.path.isfile(found):
            raise FileNotFoundError(f"OpenPose annotators folder {path} has no {filename}")
        return found
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"OpenPose annotators folder {path!r} does not exist (and it is not a hub id)")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename, revision=revision)



def import_open_pose():
    """controlnet-aux's package import pulls in timm, torch.jit and mediapipe helpers that warn about
    their own deprecations (a dozen lines at the top of every build log): imported once, quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        import controlnet_aux.open_pose
    return controlnet_aux.open_pose

def load_pose_detector(path: str, device: str, hand_and_face: bool = False, revision: str | None = None):
    """controlnet-aux's ``OpenposeDetector`` over the checkpoints in ``path`` (folder or hub id),
    loaded once per process.

    It is assembled from controlnet-aux's ``Body`` (and ``Hand`` / ``Face`` with ``hand_and_face``)
    rather than by ``from_pretrained``, which always loads the hand and face networks (~300 MB
    more) and cannot pin a hub revision; the checkpoint files and loaders are the same.
    """
    dev = resolve_device(device)

    def load():
        import_open_pose()
        from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector

        from ..fixtures.synthetic_openpose import is_synthetic_folder, load_synthetic_body

        if os.path.isdir(path) and is_synthetic_folder(path):  # a fixture: synthetic network, real post-processing
            body = load_synthetic_body(path).to(dev)
        else:
            body = Body(annotator_file(path, BODY_FILE, revision)).to(dev)
        if not hand_and_face:
            return OpenposeDetector(body)
        hand = Hand(annotator_file(path, HAND_FILE, revision)).to(dev)
        face = Face(annotator_file(path, FACE_FILE, revision)).to(dev)
        return OpenposeDetector(body, hand, face)

    return cached_model(("openpose", path, revision, str(dev), hand_and_face), load)


# -- detection ------------------------------------------------------------------------------------
NETWORK_HEIGHT = 184  # controlnet-aux's body.py: scale_search [0.5] x boxsize 368, whatever the image size


class _NetworkInput:
    """controlnet-aux's ``body.py`` resizes the image to the network's input with ``util.smart_resize_k``
    by a factor fixed inside ``Body.__call__`` (the image to 184 rows). This stands in for its ``util``
    during one call and makes that one resize (of ``image`` itself) give ``height`` rows; every later step
    (padding, output resizing back to the image, peaks, limbs) is body.py's own, for any input size."""

    def __init__(self, util, image, height: int):
        self._util, self._image, self._height = util, image, height

    def __getattr__(self, name):
        return getattr(self._util, name)

    def smart_resize_k(self, x, fx, fy):
        if x is self._image:
            fx = fy = self._height / x.shape[0]
        return self._util.smart_resize_k(x, fx=fx, fy=fy)


_BODY_LOCK = threading.Lock()


def run_body(detector, bgr: np.ndarray, network_height: int = NETWORK_HEIGHT):
    """``detector.body_estimation(bgr)`` (candidates, subsets) with the network input ``network_height``
    rows high; at controlnet-aux's own 184 it is exactly that call."""
    if network_height == NETWORK_HEIGHT:
        return detector.body_estimation(bgr)
    import controlnet_aux.open_pose.body as body_module

    # one patch at a time (the module is shared by threads); other threads' calls resize other images,
    # which the stand-in passes through unchanged
    with _BODY_LOCK:
        real = body_module.util
        body_module.util = _NetworkInput(real, bgr, network_height)
        try:
            return detector.body_estimation(bgr)
        finally:
            body_module.util = real


def keypoint_box_area(person: Person) -> float:
    """Area of the box around a person's found keypoints, as a fraction of the image."""
    pts = [k for k in person if k is not None]
    if len(pts) < 2:
        return 0.0
    xs, ys = [k[0] for k in pts], [k[1] for k in pts]
    return (max(xs) - min(xs)) * (max(ys) - min(ys))


def pose_result(people: list[Person], pose_map: Image.Image, aspect_ratio: float) -> PoseResult:
    """Summarise detected people: the main person is the tallest (pose_rules.person_height); a group of
    parts without a neck (often parts attached to no body) is main only when nobody has a neck."""
    heights = [person_height(p, aspect_ratio) for p in people]
    best = max(range(len(people)), default=None, key=lambda i: (
        people[i][NECK] is not None, heights[i] or 0.0, keypoint_box_area(people[i])))
    main = people[best] if best is not None else None
    return PoseResult(
        people=people,
        n_people=len(people),
        main_person=main,
        main_person_area=keypoint_box_area(main) if main else 0.0,
        n_keypoints=sum(k is not None for k in main) if main else 0,
        aspect_ratio=aspect_ratio,
        pose_map=pose_map,
        person_height=heights[best] if best is not None else None,
    )


def _detect_input(image: Image.Image, detect_resolution: int) -> np.ndarray:
    from controlnet_aux.util import HWC3, resize_image

    return resize_image(HWC3(np.asarray(image.convert("RGB"), dtype=np.uint8)), detect_resolution)


def _detect_one(image: Image.Image, detector, detect_resolution: int, image_resolution: int,
                hand_and_face: bool, network_height: int = NETWORK_HEIGHT, found: tuple | None = None) -> PoseResult:
    """``OpenposeDetector.__call__``'s steps, keeping the keypoints (and their scores) it drops;
    ``found``: (the detect-size image, the body's ``candidate``, ``subset``) when already computed by
    :mod:`.pose_postprocess` (None: controlnet-aux's ``Body`` computes them, at ``network_height``)."""
    import cv2
    import torch
    import_open_pose()
    from controlnet_aux.open_pose import PoseResult as DrawnPose
    from controlnet_aux.open_pose import draw_poses
    from controlnet_aux.open_pose.body import BodyResult
    from controlnet_aux.open_pose.body import Keypoint as AuxKeypoint
    from controlnet_aux.util import HWC3, resize_image

    rgb = found[0] if found is not None else _detect_input(image, detect_resolution)
    height, width = rgb.shape[:2]
    bgr = rgb[:, :, ::-1].copy()  # controlnet-aux feeds its networks BGR, as the original Caffe models
    drawn = []
    with inference(detector), torch.no_grad():
        candidate, subset = found[1:] if found is not None else run_body(detector, bgr, network_height)
        for body in detector.body_estimation.format_body_result(candidate, subset):
            left_hand, right_hand = detector.detect_hands(body, bgr) if hand_and_face else (None, None)
            face = detector.detect_face(body, bgr) if hand_and_face else None
            keypoints = [AuxKeypoint(k.x / width, k.y / height, k.score, k.id) if k is not None else None
                         for k in body.keypoints]
            drawn.append(DrawnPose(BodyResult(keypoints, body.total_score, body.total_parts),
                                   left_hand, right_hand, face))
    canvas = HWC3(draw_poses(drawn, height, width, draw_body=True, draw_hand=hand_and_face, draw_face=hand_and_face))
    out_h, out_w = resize_image(rgb, image_resolution).shape[:2]
    pose_map = Image.fromarray(cv2.resize(canvas, (out_w, out_h), interpolation=cv2.INTER_LINEAR))
    people = [[(float(k.x), float(k.y), float(k.score)) if k is not None else None for k in p.body.keypoints]
              for p in drawn]
    return pose_result(people, pose_map, width / height)


def detect_poses(images: list[Image.Image], detector, detect_resolution: int, image_resolution: int,
                 hand_and_face: bool = False, network_height: int = NETWORK_HEIGHT,
                 postprocess: str = "torch") -> list[PoseResult]:
    """OpenPose over a batch of images. ``postprocess="torch"``: the body network over the batch and
    :mod:`.pose_postprocess` on its device; ``"controlnet_aux"``: its ``Body`` image by image. The
    network sees each image ``network_height`` rows high (184: controlnet-aux's own)."""
    import torch

    found: list = [None] * len(images)
    if postprocess == "torch":
        from .pose_postprocess import body_poses

        rgbs = [_detect_input(im, detect_resolution) for im in images]
        with inference(detector), torch.no_grad():
            bodies = body_poses(detector.body_estimation, [rgb[:, :, ::-1].copy() for rgb in rgbs], network_height)
        found = [(rgb, *body) for rgb, body in zip(rgbs, bodies)]
    return [_detect_one(im, detector, detect_resolution, image_resolution, hand_and_face, network_height, f)
            for im, f in zip(images, found)]


# -- stage helpers --------------------------------------------------------------------------------
def encode_png(image: Image.Image) -> bytes:
    """PNG with fixed settings (PIL writes no timestamps), so the same map gives the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def keypoints_json(people: list[Person]) -> str:
    rounded = [[[round(v, 5) for v in k] if k is not None else None for k in p] for p in people]
    return json.dumps(rounded, separators=(",", ":"))


def pose_fields(result: PoseResult) -> dict:
    return {
        **measurements(result),
        "main_person_area": round(result.main_person_area, 6),
        "keypoints_json": keypoints_json(result.people),
    }


def detect_items(ctx: Context, items: list[dict], detector, detect_resolution: int, image_resolution: int,
                 batch_size: int, hand_and_face: bool = False,
                 network_height: int = NETWORK_HEIGHT, postprocess: str = "torch") -> dict[str, PoseResult | str]:
    """sample_key -> PoseResult, or the reason the item could not be posed (unreadable image, or
    OpenPose failing on that image alone). Images are read one batch at a time."""
    out: dict[str, PoseResult | str] = {}
    for start in range(0, len(items), batch_size):
        loaded: list[tuple[str, Image.Image]] = []
        for it in items[start : start + batch_size]:
            try:
                loaded.append((it["sample_key"], ctx.store.read_image(it["image_path"])))
            except Exception as e:  # noqa: BLE001 - a missing or corrupt file rejects this item only
                out[it["sample_key"]] = f"image unreadable: {it['image_path']}: {type(e).__name__}"

        def detect(batch: list[tuple[str, Image.Image]]) -> list[PoseResult]:
            return detect_poses([im for _, im in batch], detector, detect_resolution, image_resolution, hand_and_face,
                                network_height, postprocess)

        try:
            out.update(zip([k for k, _ in loaded], detect(loaded)))
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                raise  # per-unit trouble: the runner retries the unit
            for key, im in loaded:  # find the image(s) OpenPose fails on; the others are kept
                try:
                    out[key] = detect([(key, im)])[0]
                except Exception as err:  # noqa: BLE001
                    if is_oom(err):
                        raise
                    out[key] = f"pose detection failed: {type(err).__name__}: {str(err)[:200]}"
    return out


def pose_row(item: dict, reason: str | None, result: PoseResult | str, pose_rel: str | None,
              pose_sha: str | None, **extra) -> dict:
    fields = {"image_path": item["image_path"], "image_sha256": item["image_sha256"], **extra}
    if isinstance(result, PoseResult):
        fields.update(pose_fields(result))
    if reason is not None:
        return reject(item, reason, **fields)
    return keep(item, **fields, pose_path=pose_rel, pose_sha256=pose_sha)


def write_pose_map(ctx: Context, rel: str, result: PoseResult) -> str:
    return ctx.store.write_bytes(rel, encode_png(result.pose_map))
