"""The bounded submission window and progress lines of flows/dispatch.py (no Prefect server: the
futures are concurrent.futures wrapped the way Prefect's thread runner wraps them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prefect.futures import PrefectConcurrentFuture

from flows.dispatch import Progress, dispatch_units, window_size
from pab_build.units import Unit


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


def test_progress_logs_every_few_percent_with_rate_and_eta():
    lines, updates = [], []
    p = Progress("generate", 100, lines.append, log_every=0.1, on_update=lambda d, t: updates.append(d))
    for _ in range(100):
        p.advance()
    assert updates == list(range(10, 101, 10))
    assert lines[0].startswith("generate: 10/100 units (10%), ") and "units/s, ETA " in lines[0]
    assert "ETA 00:00:00" in lines[-1]
