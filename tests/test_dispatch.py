"""The bounded submission window and progress lines of flows/dispatch.py (no Prefect server: the
futures are concurrent.futures wrapped the way Prefect's thread runner wraps them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prefect.futures import PrefectConcurrentFuture

from flows.dispatch import ProgressLog, dispatch_units, window_size
from pab_build.engine.units import Unit


class _Future(PrefectConcurrentFuture):
    """A finished-or-running concurrent future, without a task run behind it."""

    def __init__(self, wrapped):
        super().__init__(task_run_id=None, wrapped_future=wrapped)

    def wait(self, timeout=None):
        self._wrapped_future.result(timeout)
        self._final_state = True

    def add_done_callback(self, fn):
        self._wrapped_future.add_done_callback(lambda _: fn(self))


def test_at_most_window_units_are_in_flight_and_every_unit_finishes_once():
    units = [Unit("s", f"{i:06d}", ({"sample_key": f"k{i}"},)) for i in range(60)]
    in_flight, peak, lock, done = 0, 0, threading.Lock(), []

    def work(unit):
        time.sleep(0.002 * (int(unit.unit_id) % 3))
        return unit.unit_id

    with ThreadPoolExecutor(4) as pool:
        def submit(unit):
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            return _Future(pool.submit(work, unit))

        def on_done(unit, fut):
            nonlocal in_flight
            with lock:
                in_flight -= 1
            done.append(fut._wrapped_future.result())

        dispatch_units(submit, units, window=8, on_done=on_done)
    assert sorted(done) == [u.unit_id for u in units]
    assert peak == 8
    assert window_size(2) == 8 and window_size(16) == 64


def test_progress_log_lines_come_from_the_progress_events():
    """The run's progress lines (and artifact updates) are made from the same events the CLI's
    display shows: at the start, every 10 % here, at a new failure, when the stage ends; each record marked."""
    import logging

    from pab_build.engine.progress import PROGRESS_LINE, StageProgress

    records, updates = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test.progress_log")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    log = ProgressLog(logger, log_every=0.1, on_update=updates.append)
    log(StageProgress("generate", 100, at=0.0))
    for n in range(1, 101):
        log(StageProgress("generate", 100, done=n - (n >= 55), failed=int(n >= 55), ok=2 * n, at=n / 10))
    log(StageProgress("generate", 100, done=99, failed=1, ok=200, finished=True, at=10.0))
    lines = [r.getMessage() for r in records]
    assert updates == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 55.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert lines[0] == "generate: 0/100 units, rows 0 ok / 0 rejected, 0 failed, - units/s, ETA -"  # started
    assert lines[1] == "generate: 10/100 units, rows 20 ok / 0 rejected, 0 failed, 10.00 units/s, ETA 9s"
    assert lines[6].startswith("generate: 55/100 units, rows 110 ok / 0 rejected, 1 failed")  # the failure, at once
    assert lines[-1].endswith("ETA done") and all(getattr(r, PROGRESS_LINE) for r in records)