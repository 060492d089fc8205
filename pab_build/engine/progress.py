"""Progress events of a build: one record per finished unit on the ``pab_build.engine.progress`` logger.

Whoever wants a live display (the ``pab`` CLI: ``flows/progress.py``) attaches a handler to that
logger; the events carry numbers, not text. The flow's own progress lines (run logs, the UI's
progress artifact) are made from the same events (``StageReporter(listener=...)``), so the two
never disagree. The logger does not propagate, so Prefect's log
forwarding (``PREFECT_LOGGING_EXTRA_LOGGERS=pab_build``) never ships one record per unit to the
API; the per-stage summary lines and progress artifacts stay in the flows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

PROGRESS_LOGGER = "pab_build.engine.progress"
# marks the flow's progress log lines (made from these events): a live display, fed by the same
# events, keeps them off the terminal, so each figure shows once
PROGRESS_LINE = "pab_progress_line"
log = logging.getLogger(PROGRESS_LOGGER)
log.propagate = False
log.setLevel(logging.INFO)


@dataclass(frozen=True)
class StageProgress:
    """Where one stage stands: units finished (done + skipped + failed) of ``total``, and the
    manifest rows of the finished units (ok / rejected)."""

    stage: str
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    ok: int = 0
    rejected: int = 0
    finished: bool = False  # the stage's manifest is written
    at: float = 0.0  # time.time() of the event

    @property
    def units_finished(self) -> int:
        return self.done + self.skipped + self.failed


def stage_line(p: StageProgress, started: float) -> str:
    """``frames: 3/5 units, rows 6 ok / 4 rejected, 0 failed, 0.40 units/s, ETA 5s``."""
    from .status import duration_text

    elapsed = max(p.at - started, 1e-6)
    worked = p.done + p.failed  # skipped units cost nothing: they would inflate the rate
    rate = worked / elapsed if worked else None
    left = p.total - p.units_finished
    eta = "done" if p.finished else (duration_text(left / rate) if rate else "-")
    skipped = f" ({p.skipped} skipped)" if p.skipped else ""
    return (f"{p.stage}: {p.units_finished}/{p.total} units{skipped}, rows {p.ok} ok / {p.rejected} rejected, "
            f"{p.failed} failed, {'-' if rate is None else f'{rate:.2f}'} units/s, ETA {eta}")


def report(progress: StageProgress) -> None:
    log.info("%s: %d/%d units", progress.stage, progress.units_finished, progress.total,
             extra={"pab_progress": asdict(progress)})


def unit_rows(store, stage: str, unit_id: str) -> tuple[int, int]:
    """(ok, rejected) rows of a finished unit, from its marker; the unit's rows are read only for
    a marker of an earlier version, which holds no ``ok`` count."""
    from ..manifests import read_table
    from .units import status_counts

    marker = store.read_marker(stage, unit_id)
    if marker is None:
        return 0, 0
    if marker.status == "failed":
        return 0, marker.rows
    if marker.ok is None:
        counts = status_counts(read_table(store, store.unit_rows_rel(stage, unit_id)))  # Arrow, no row dicts
        return counts["ok"], counts["rejected"]
    return marker.ok, marker.rows - marker.ok


class StageReporter:
    """Counts one stage's finished units and reports after each (used by the flow's unit loop);
    ``listener`` gets every event too (the flow's log lines and progress artifact)."""

    def __init__(self, store, stage: str, total: int, listener: Callable[[StageProgress], None] | None = None):
        self.store, self.listener = store, listener
        self._set(StageProgress(stage, total, at=time.time()))

    def _set(self, state: StageProgress) -> None:
        self.state = state
        report(state)
        if self.listener is not None:
            self.listener(state)

    def unit_finished(self, unit_id: str, outcome: str) -> None:
        ok, rejected = unit_rows(self.store, self.state.stage, unit_id)
        s = self.state
        counts = {k: getattr(s, k) + (outcome == k) for k in ("done", "skipped", "failed")}
        self._set(StageProgress(s.stage, s.total, **counts, ok=s.ok + ok, rejected=s.rejected + rejected,
                                at=time.time()))

    def stage_finished(self) -> None:
        s = self.state
        self._set(StageProgress(**{**asdict(s), "finished": True, "at": time.time()}))
