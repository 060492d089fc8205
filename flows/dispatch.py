"""Submitting a stage's unit tasks: a bounded window, quiet task logs, progress with a rate and ETA.

``generate`` alone has 61,161 units. Submitting them all at once (``Task.map``) creates every
task run and its future up front, and Prefect logs a few lines per task run. Here at most
``window`` units are in flight (a few times the workers, so no worker waits for work); each
finished one is handed to ``on_done`` and replaced by the next; the stage logs a progress line
every ``log_every`` of the units (and at least once a minute): done/total, rows, rate, ETA, from
the same progress events the CLI's live display shows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from pab_build.config import PABConfig
from pab_build.engine.devices import DevicePool, resolve_devices, wants_device_workers
from pab_build.model_lock import STAGE_MODELS
from pab_build.models.loading import models_held_for_stage
from pab_build.engine.progress import PROGRESS_LINE, StageProgress, stage_line
from pab_build.engine.units import Unit

WINDOW_PER_WORKER = 4
# Prefect's per-task-run lines ("Finished in state Completed()", ...) come through these loggers
TASK_RUN_LOGGERS = ("prefect.task_runs", "prefect.task_engine")


def window_size(workers: int) -> int:
    return max(8, WINDOW_PER_WORKER * workers)


@contextlib.contextmanager
def quiet_task_logs(quiet: bool = True) -> Iterator[None]:
    """Per-task-run INFO lines off (warnings and errors still show) while the block runs."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(n) for n in TASK_RUN_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class ProgressLog:
    """A stage's progress in the run's logs and progress artifact (what the UI shows), made from
    the ``pab_build.engine.progress`` events (``StageReporter(listener=ProgressLog(...))``): a line every
    ``log_every`` of the units, at least every ``min_interval_s``, at a new failure, when the
    stage starts and when it ends; ``on_update(percent)`` with each line."""

    def __init__(self, logger, log_every: float = 0.05, min_interval_s: float = 60.0,
                 on_update: Callable[[float], None] | None = None):
        self.logger, self.log_every, self.min_interval_s, self.on_update = logger, log_every, min_interval_s, on_update
        self.started: float | None = None
        self.next_at, self.last_log, self.failed_seen = 0, 0.0, 0

    def __call__(self, p: StageProgress) -> None:
        step = max(1, int(p.total * self.log_every))
        first = self.started is None
        if first:
            self.started, self.last_log, self.next_at = p.at, p.at, step
        due = (first or p.finished or p.units_finished >= self.next_at or p.failed > self.failed_seen
               or (p.units_finished and p.at - self.last_log >= self.min_interval_s))
        if not due or (p.units_finished == p.total and not p.finished and p.failed <= self.failed_seen):
            return  # (the last unit's line: the stage's finished line follows at once)
        self.next_at = (p.units_finished // step + 1) * step
        self.last_log, self.failed_seen = p.at, p.failed
        self.logger.info("%s", stage_line(p, self.started), extra={PROGRESS_LINE: True})
        if self.on_update is not None:
            self.on_update(100.0 * p.units_finished / p.total if p.total else 100.0)


def dispatch_units(submit: Callable[[Unit], PrefectFuture], units: Sequence[Unit], window: int,
                   on_done: Callable[[Unit, PrefectFuture], Any]) -> None:
    """Submit ``units`` with at most ``window`` in flight; call ``on_done(unit, future)`` for each
    as it finishes (in completion order), submitting the next unit in its place."""
    pending = iter(units)
    inflight: dict[PrefectFuture, Unit] = {}

    def fill() -> None:
        while len(inflight) < window:
            unit = next(pending, None)
            if unit is None:
                return
            inflight[submit(unit)] = unit

    fill()
    while inflight:
        for fut in as_completed(list(inflight)):
            unit = inflight.pop(fut)
            fut.wait()
            on_done(unit, fut)
            break
        fill()


# -- GPU stages: one worker process per device (without Ray) ----------------------------------------
_POOLS: dict[str, DevicePool] = {}  # the running stages' device pools (the thread runner shares the process)


@task(name="unit", cache_policy=NO_CACHE)
def run_unit_on_device_task(pool_key: str, out: str, stage_name: str, unit: Unit) -> str:
    """One unit of a GPU stage, run by the next free device's worker process."""
    return _POOLS[pool_key].run(out, stage_name, unit)


@contextlib.contextmanager
def unit_submitter(cfg: PABConfig, out: str, stage_name: str, uses_gpu: bool, unit_task,
                   log: Callable[[str], None]) -> Iterator[Callable[[Unit], PrefectFuture]]:
    """``submit(unit)`` for the stage's units: the plain unit task, or, for a GPU stage over
    several devices (``run.devices`` / every visible GPU), a task that hands the unit to a
    per-device worker process. When the stage ends its models are released: the device workers
    exit, and the stage's models cached in this process are dropped (CUDA cache emptied) unless a
    stage of the other branch still uses them."""
    with models_held_for_stage(STAGE_MODELS.get(stage_name, ())):
        on_ray = cfg.run.task_runner == "ray"
        if not on_ray and not wants_device_workers(cfg, uses_gpu):
            yield lambda u: unit_task.submit(cfg, out, stage_name, u)
            return
        pool_key = f"{out}/{stage_name}"
        if on_ray:  # the stage's Ray actors (one per GPU, or per run.cpus_per_unit CPUs), across the cluster
            from pab_build.engine.ray_cluster import RayActorPool

            _POOLS[pool_key] = pool = RayActorPool(cfg, out, stage_name, uses_gpu)
        else:
            devices = resolve_devices(cfg)
            if cfg.run.max_workers < len(devices):
                log(f"{stage_name}: run.max_workers={cfg.run.max_workers} threads keep only that many of "
                    f"{len(devices)} devices busy; set it to at least {len(devices)}")
            _POOLS[pool_key] = pool = DevicePool(cfg, devices)
        task_ = run_unit_on_device_task.with_options(
            name=unit_task.name, retries=unit_task.retries, retry_delay_seconds=unit_task.retry_delay_seconds,
            tags=unit_task.tags)
        try:
            yield lambda u: task_.submit(pool_key, out, stage_name, u)
        finally:
            pool.close()
            _POOLS.pop(pool_key, None)
            log(f"{stage_name}: units per {'Ray actor' if on_ray else 'device worker'} "
                f"{dict(pool.units_per_worker)}")

