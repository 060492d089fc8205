"""What must hold before a build may replace a published release (``pab publish`` refuses
otherwise, unless ``--force``): no failed units, no empty split, no split smaller than the
published one. Checked before anything remote is touched."""

from __future__ import annotations

from ..store import Store


def failed_units(src: Store) -> dict[str, int]:
    """Stage -> units whose marker says failed (after their retries)."""
    failed = {}
    for stage in src.listdir("_markers"):
        n = 0
        for name in src.listdir(f"_markers/{stage}"):
            marker = src.read_marker(stage, name.removesuffix(".json")) if name.endswith(".json") else None
            n += marker is not None and marker.status == "failed"
        if n:
            failed[stage] = n
    return failed


def _split_samples(index: dict | None) -> dict[str, int]:
    splits = (index or {}).get("splits", {})
    return {s: int(splits.get(s, {}).get("totals", {}).get("samples", 0)) for s in ("test", "train")}


def release_problems(src: Store, index: dict, remote_index: dict | None) -> list[str]:
    """Why this build must not replace what is published (empty when it may)."""
    problems = [f"stage {stage} has {n} failed unit(s)" for stage, n in sorted(failed_units(src).items())]
    local, remote = _split_samples(index), _split_samples(remote_index)
    problems += [f"split {s} has 0 samples" for s, n in local.items() if n == 0]
    if remote_index is not None:
        problems += [f"split {s} has {local[s]} samples, fewer than the {remote[s]} of the published release"
                     for s in local if local[s] < remote[s]]
    return problems
