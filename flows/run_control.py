"""Stopping ``pab run`` when asked: SIGTERM and Ctrl-C end the process within seconds, whatever it
is doing (a unit on the GPU, a review pause, the temporary Prefect server).

The first signal raises KeyboardInterrupt in the main thread, so the flow run is marked and the
OUT lock released by the normal ``finally`` paths; a watchdog then ends the process (and its
child processes) after ``grace_s`` even if a worker thread is deep in a model call. Nothing
half-written becomes visible: every output is written to a temporary name and renamed, and a
unit's marker comes last, so the rerun redoes exactly the units that had no marker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

GRACE_S = 15.0
_stopping = threading.Event()


def terminate_children(timeout_s: float = 3.0) -> None:
    """End this process's child processes (the temporary Prefect server, Ray, dataloader workers)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for c in children:
        try:
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for c in alive:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass


def hard_exit(code: int) -> None:
    """Leave now: no waiting for worker threads (a unit may run for minutes) or atexit hooks."""
    try:
        terminate_children()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _watchdog(code: int, grace_s: float) -> None:
    time.sleep(grace_s)
    print(f"pab: still stopping after {grace_s:.0f} s; ending the process", file=sys.stderr)
    hard_exit(code)


def stop_on_signals(grace_s: float = GRACE_S) -> None:
    """Install SIGTERM / SIGINT handlers for the run path (main thread only)."""

    def handler(signum: int, frame) -> None:
        code = 128 + signum
        if _stopping.is_set():
            hard_exit(code)  # a second signal: no more grace
        _stopping.set()
        print(f"pab: {signal.Signals(signum).name} received, stopping (the rerun resumes)", file=sys.stderr)
        threading.Thread(target=_watchdog, args=(code, grace_s), daemon=True, name="pab-stop").start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def exit_with_parent() -> bool:
    """In a flow-run process a worker started: ask Linux to SIGKILL it when the worker dies, so no
    orphan keeps writing to OUT. SIGKILL, not SIGTERM: a unit blocked in I/O or a model call keeps
    a terminated interpreter alive. Outputs are written atomically and markers last, so nothing
    half-written is visible; the run then stops heartbeating and the crash automation (flows/
    automations.py) marks it Crashed, ready for `prefect flow-run retry`. Returns whether it was set."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the worker died before the request: act on it now
        os.kill(os.getpid(), signal.SIGKILL)
    return True
