"""Test pairs: a clip's normal and anomaly frame travel together ("both images of a pair or neither")."""

from __future__ import annotations

from typing import Iterable

BEHAVIORS = ("normal", "anomaly")


def other_behavior(behavior: str) -> str:
    return BEHAVIORS[1 - BEHAVIORS.index(behavior)]


def pair_problem(clip_key: str, behaviors: Iterable[str], upstream_said: str) -> str | None:
    """None when a clip's items are exactly one normal and one anomaly; otherwise the reason, e.g.
    ``upstream_said="no counterpart: pose kept only"`` -> "no counterpart: pose kept only ['normal'] of clip c.."."""
    kept = sorted(behaviors)
    if kept == sorted(BEHAVIORS):
        return None
    return f"{upstream_said} {kept} of clip {clip_key}"
