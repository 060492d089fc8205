"""One build per OUT: ``OUT/_build.lock`` names its owner (user, host, pid) and carries a heartbeat.

A second ``pab run`` on the same OUT refuses with :class:`BuildLocked`, naming the holder. A lock is
stale, and taken over, when its owner is a dead process on this host or its heartbeat is older than
four periods (a lost machine). The lock file is created with O_EXCL, so two builds starting at once
cannot both win; a takeover renames the stale file away first, so only one taker wins. Local OUT
only: on an object store there is no atomic create, so the lock is not enforced there (logged).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = "_build.lock"
MISSED_BEATS = 4  # heartbeat older than this many periods: the owner is gone


class BuildLocked(RuntimeError):
    """Another build holds OUT."""


@dataclass
class LockInfo:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    heartbeat_s: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"{self.owner}@{self.host} pid {self.pid}, started {time.ctime(self.started)}, "
                f"last heartbeat {age:.0f} s ago")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str) -> LockInfo | None:
    try:
        with open(path, encoding="utf-8") as f:
            return LockInfo(**json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written by a writer killed mid-way: treat as stale
        return LockInfo("?", "?", -1, 0.0, 0.0, 1.0)


def stale_reason(info: LockInfo, now: float | None = None) -> str | None:
    """Why the lock no longer holds (None: its owner is alive)."""
    now = time.time() if now is None else now
    if info.host == socket.gethostname() and not _pid_alive(info.pid):
        return f"its owner pid {info.pid} on this host is gone"
    if now - info.heartbeat > MISSED_BEATS * info.heartbeat_s:
        return f"its heartbeat is {now - info.heartbeat:.0f} s old (limit {MISSED_BEATS * info.heartbeat_s:.0f} s)"
    return None


class BuildLock:
    def __init__(self, out: str, heartbeat_s: float = 30.0):
        self.out = out
        self.path = os.path.join(out, LOCK_NAME)
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: LockInfo | None = None

    def _write_new(self) -> bool:
        now = time.time()
        info = LockInfo(getpass.getuser(), socket.gethostname(), os.getpid(), now, now, self.heartbeat_s)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(info), f)
        self.info = info
        return True

    def acquire(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        for _ in range(3):
            if self._write_new():
                break
            held = read_lock(self.path)
            if held is None:
                continue  # released in between
            if held.host == socket.gethostname() and held.pid == os.getpid():
                self.info = held  # this process already holds it (`pab run` took it before the flow)
                return
            why = stale_reason(held)
            if why is None:
                raise BuildLocked(f"{self.out} is being built by {held.describe()}; wait for it to finish, or "
                                  f"stop it (if that owner is gone for good, the lock is taken over once "
                                  f"its heartbeat is {MISSED_BEATS * held.heartbeat_s:.0f} s old)")
            aside = f"{self.path}.stale-{os.getpid()}"
            try:
                os.rename(self.path, aside)  # only one taker wins the rename
            except FileNotFoundError:
                continue
            os.remove(aside)
            log.warning("took over the build lock of %s: %s", held.describe(), why)
        else:
            raise BuildLocked(f"could not take the build lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="pab-build-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            assert self.info is not None
            self.info.heartbeat = time.time()
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(asdict(self.info), f)
            os.replace(tmp, self.path)  # atomic: a reader never sees half a lock

    def release(self) -> None:
        if self._thread is None:
            return  # not ours (re-entered, or never taken)
        self._stop.set()
        self._thread.join(timeout=5)
        held = read_lock(self.path)
        if held is not None and held.pid == os.getpid() and held.host == socket.gethostname():
            os.remove(self.path)
        self._thread = None


@contextlib.contextmanager
def hold_build_lock(out: str, heartbeat_s: float = 30.0) -> Iterator[BuildLock | None]:
    """Hold OUT's lock for the duration of the block (a no-op for a non-local OUT)."""
    if "://" in out and not out.startswith("file://"):
        log.warning("OUT %s is not a local folder: the one-build-per-OUT lock is not enforced there", out)
        yield None
        return
    lock = BuildLock(out.removeprefix("file://"), heartbeat_s)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
