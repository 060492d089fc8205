"""The OpenPose rules: is there a person big enough (paper 3.1), is the body possible (paper 3.2).

Both rules measure the *person*, not the keypoint box. A 2-D photograph can only shorten a body
segment (a limb pointing at the camera, a body seen from the side, a fall), never lengthen it. So:

- **Body height.** Each found segment (torso, thigh, shin, upper arm, forearm, shoulder, neck-nose)
  gives an estimate of the body's height: its length divided by its usual share of body height
  (:data:`SEGMENTS`, from anthropometric tables). Foreshortened segments give estimates that are too
  low; the body height is the second-largest estimate (the largest when fewer than three segments are
  found), so one stretched or misplaced segment cannot inflate it and missing parts (out of frame,
  hidden) do not shrink it. Lengths are in units of the image height. A person lying on the ground gets
  their body length; a close-up whose legs are out of frame can exceed 1.
- **Structure.** Each segment's estimate divided by that body height is its *stretch*: about 1 for a
  segment seen side-on, below 1 when foreshortened, and far above 1 only when the segment is longer than
  the rest of the body allows (an arm as long as the body, a shin reaching past the frame). Left/right
  length ratios are not used: an arm pointing at the camera makes them arbitrary (6.51x in issue 19).
- **Detached parts.** OpenPose assembles people from limbs; a group of >= 4 parts with no neck (a
  duplicated head, a pair of legs attached to nobody) is reported as a separate "person". In a generated
  image such a group lying on the main person's body is a broken body.

Every threshold is a profile setting (``pose.min_person_height``, ``gen_pose.*``); the examples in
tests/test_pose_synthetic.py run through controlnet-aux's real post-processing.
"""

from __future__ import annotations

import math
from typing import Protocol

from ..config import GenPoseConfig

Keypoint = tuple[float, float, float]  # x, y in [0, 1] of the image; OpenPose's confidence
Person = list[Keypoint | None]  # 18 entries, in OpenPose's order (openpose.BODY_PARTS)


class PoseResult(Protocol):
    """What the rules read of ``openpose.PoseResult``."""

    people: list[Person]
    n_people: int
    main_person: Person | None
    aspect_ratio: float  # image width / height
    person_height: float | None


NECK, RIGHT_HIP, LEFT_HIP = 1, 8, 11

# (name, from, to, usual length / body height): body segments between OpenPose keypoints, from the
# anthropometric segment tables (Drillis & Contini via Winter, "Biomechanics and Motor Control of Human
# Movement"); the face's tiny segments are left out (a few pixels, too noisy to scale a body by).
SEGMENTS = (
    ("right torso", 1, 8, 0.30), ("left torso", 1, 11, 0.30),
    ("right shoulder", 1, 2, 0.13), ("left shoulder", 1, 5, 0.13),
    ("right upper arm", 2, 3, 0.186), ("left upper arm", 5, 6, 0.186),
    ("right forearm", 3, 4, 0.146), ("left forearm", 6, 7, 0.146),
    ("right thigh", 8, 9, 0.245), ("left thigh", 11, 12, 0.245),
    ("right shin", 9, 10, 0.246), ("left shin", 12, 13, 0.246),
    ("neck", 1, 0, 0.11),
)


def keypoint_count(person: Person | None) -> int:
    return sum(k is not None for k in person) if person else 0


def segment_heights(person: Person, aspect_ratio: float) -> list[tuple[str, float]]:
    """(segment, the body height it implies) for each segment whose both ends were found; lengths in
    units of the image height (``aspect_ratio`` = image width / height undoes the [0, 1] x scale)."""
    out = []
    for name, a, b, share in SEGMENTS:
        pa, pb = person[a], person[b]
        if pa is not None and pb is not None:
            out.append((name, math.hypot((pa[0] - pb[0]) * aspect_ratio, pa[1] - pb[1]) / share))
    return out


def person_height(person: Person | None, aspect_ratio: float) -> float | None:
    """Estimated body height (head to feet) / image height; None with no segment found."""
    estimates = sorted((h for _, h in segment_heights(person, aspect_ratio)), reverse=True) if person else []
    if not estimates:
        return None
    return estimates[1] if len(estimates) >= 3 else estimates[0]


def stretch(person: Person | None, aspect_ratio: float) -> tuple[float, str] | None:
    """(the largest segment stretch, that segment), judged with >= 3 segments found; else None."""
    found = segment_heights(person, aspect_ratio) if person else []
    height = person_height(person, aspect_ratio)
    if len(found) < 3 or not height:
        return None
    name, longest = max(found, key=lambda s: s[1])
    return longest / height, name


def detached_parts(result: PoseResult) -> list[Person]:
    """Groups of parts OpenPose assembled without a neck whose parts mostly lie inside the main person's
    keypoint box (grown by a quarter of its height): parts attached to no body."""
    main = result.main_person
    if main is None:
        return []
    pts = [k for k in main if k is not None]
    xs, ys = [k[0] for k in pts], [k[1] for k in pts]
    grow = 0.25 * (person_height(main, result.aspect_ratio) or (max(ys) - min(ys)))
    box = (min(xs) - grow / result.aspect_ratio, min(ys) - grow, max(xs) + grow / result.aspect_ratio, max(ys) + grow)
    out = []
    for other in result.people:
        if other is main or other[NECK] is not None:
            continue
        found = [k for k in other if k is not None]
        inside = sum(box[0] <= k[0] <= box[2] and box[1] <= k[1] <= box[3] for k in found)
        if found and inside * 2 > len(found):
            out.append(other)
    return out


# -- the rules ------------------------------------------------------------------------------------
def person_problem(result: PoseResult, require_person: bool, min_person_height: float) -> str | None:
    """Test-set rule (paper 3.1): reject an image with nobody in it (when ``require_person``), or whose
    main (tallest) person's estimated body height is below ``min_person_height`` of the image height."""
    if result.n_people == 0:
        return "no person detected" if require_person else None
    height = result.person_height or 0.0
    if height < min_person_height:
        return (f"person too small: the tallest person is {height:.3f} of the image height "
                f"(below min_person_height={min_person_height})")
    return None


def body_structure_problem(keypoints: Person | None, cfg: GenPoseConfig, aspect_ratio: float = 1.0) -> str | None:
    """Training-set rule for broken bodies (paper 3.2, "unreasonable human structures"), on one person.

    A body is broken when:
    1. fewer than ``cfg.min_keypoints`` of the 18 body parts are found; or
    2. with ``cfg.require_neck_and_hips``, the neck is missing, or both hips are missing; or
    3. a segment is more than ``cfg.max_limb_ratio`` times as long as the body's height allows (its
       stretch, see the module docstring). Foreshortened segments are never a problem.
    ``keypoints`` None (nobody found) counts as no part found.
    """
    found = keypoint_count(keypoints)
    if found < cfg.min_keypoints:
        return f"broken body: {found} body keypoints found (fewer than min_keypoints={cfg.min_keypoints})"
    if keypoints is None:
        return None
    if cfg.require_neck_and_hips:
        if keypoints[NECK] is None:
            return "broken body: no neck keypoint"
        if keypoints[RIGHT_HIP] is None and keypoints[LEFT_HIP] is None:
            return "broken body: no hip keypoint"
    worst = stretch(keypoints, aspect_ratio)
    if worst is not None and worst[0] > cfg.max_limb_ratio:
        return (f"broken body: {worst[1]} is {worst[0]:.2f}x as long as the body's height allows "
                f"(above max_limb_ratio={cfg.max_limb_ratio})")
    return None


def generated_image_problem(result: PoseResult, cfg: GenPoseConfig) -> str | None:
    """gen_pose's rule: the person rule, then :func:`body_structure_problem` on the main person, then
    (with ``cfg.reject_detached_parts``) parts attached to no body on it. Nobody found is judged by the
    person rule alone (``require_person``)."""
    problem = person_problem(result, cfg.require_person, cfg.min_person_height)
    if problem or result.n_people == 0 and not cfg.require_person:
        return problem
    problem = body_structure_problem(result.main_person, cfg, result.aspect_ratio)
    if problem or not cfg.reject_detached_parts:
        return problem
    detached = detached_parts(result)
    if detached:
        parts = sum(keypoint_count(p) for p in detached)
        return f"broken body: {parts} body parts in {len(detached)} group(s) attached to no body (no neck) on the person"
    return None


def measurements(result: PoseResult) -> dict:
    """What the rules measured, for the manifests (kept and rejected rows alike)."""
    worst = stretch(result.main_person, result.aspect_ratio)
    return {
        "person_height": result.person_height,
        "person_count": result.n_people,
        "keypoint_count": keypoint_count(result.main_person),
        "limb_ratio_max": worst[0] if worst else None,
    }
