"""Did a stage (and so the build) succeed? Units still failing after their retries are counted
against ``run.max_failed_units``; above it the stage fails, and the summary names the stage, how
many units failed and their first distinct errors.

No Prefect here: ``flows/build_pab.py`` raises :class:`StageFailed` / :class:`BuildFailed` so the
Prefect run ends Failed, and ``pab run`` exits 1 printing :func:`format_failures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store import Store

MAX_ERRORS_SHOWN = 3


@dataclass
class StageFailures:
    stage: str
    failed: int  # units failed after their retries
    units: int  # units the stage planned
    allowed: int  # what run.max_failed_units allows for this stage
    errors: list[str] = field(default_factory=list)  # first distinct errors

    @property
    def over_limit(self) -> bool:
        return self.failed > self.allowed

    def line(self) -> str:
        errs = "; ".join(self.errors) if self.errors else "(no error text recorded)"
        return (f"stage {self.stage}: {self.failed} of {self.units} units failed after retries "
                f"(run.max_failed_units allows {self.allowed}); first errors: {errs}")


class StageFailed(RuntimeError):
    """A stage ended with more failed units than ``run.max_failed_units`` allows."""

    def __init__(self, failures: StageFailures):
        super().__init__(failures.line())
        self.failures = failures


class BuildFailed(RuntimeError):
    """The build ended with failed stages (or a branch stopped by one); the message names each."""

    def __init__(self, failures: list[StageFailures], other: list[str] | None = None):
        self.failures = failures
        self.other = other or []
        super().__init__(format_failures(failures, self.other))


def allowed_failures(max_failed_units: int | float, units: int) -> int:
    """``run.max_failed_units`` for a stage of ``units`` units: an int is a count, a float in
    [0, 1] a fraction of the stage's units (rounded down)."""
    if isinstance(max_failed_units, float):
        if max_failed_units > 1:
            raise ValueError(f"run.max_failed_units={max_failed_units}: a fraction must be in [0, 1]")
        return int(max_failed_units * units)
    return int(max_failed_units)


def failed_unit_errors(store: Store, stage: str, limit: int = MAX_ERRORS_SHOWN) -> list[str]:
    """The first ``limit`` distinct error texts of the stage's failed units (from their markers)."""
    seen: list[str] = []
    for name in sorted(store.listdir(f"_markers/{stage}")):
        marker = store.read_marker(stage, name[: -len(".json")])
        if marker is None or marker.status != "failed":
            continue
        text = (marker.reason or "").split(" failed after retries: ", 1)[-1].strip()
        if text and text not in seen:
            seen.append(text[:200])
            if len(seen) >= limit:
                break
    return seen


def stage_failures(store: Store, stage: str, counts: dict[str, int], max_failed_units: int | float) -> StageFailures:
    """From a stage's unit counts (``run_stage_units``' result: done / skipped / failed)."""
    units = sum(counts.get(k, 0) for k in ("done", "skipped", "failed"))
    failed = counts.get("failed", 0)
    return StageFailures(stage, failed, units, allowed_failures(max_failed_units, units),
                         failed_unit_errors(store, stage) if failed else [])


def format_failures(failures: list[StageFailures], other: list[str] | None = None) -> str:
    lines = ["build FAILED:"] + [f"  {f.line()}" for f in failures] + [f"  {o}" for o in other or []]
    lines.append("  rerun the same command to retry the failed units; raise run.max_failed_units to accept "
                 "a partial build")
    return "\n".join(lines)


def failure_report(out: str) -> list[str]:
    """``pab status``: per stage with failed units, their count and first distinct errors."""
    from .pipeline import STAGE_ORDER

    store = Store(out)
    lines = []
    for stage in STAGE_ORDER:
        failed = [n for n in store.listdir(f"_markers/{stage}")
                  if (m := store.read_marker(stage, n[: -len(".json")])) is not None and m.status == "failed"]
        if failed:
            lines.append(f"{stage}: {len(failed)} unit(s) failed after retries; first errors: "
                         + "; ".join(failed_unit_errors(store, stage)))
    return lines
