"""One build per OUT: ``OUT/_build.lock`` names its owner (user, host, pid) and carries a heartbeat.

A second ``pab run`` on the same OUT refuses with :class:`BuildLocked`, naming the holder. A lock is
stale, and taken over, when its owner is a dead process on this host or its heartbeat is older than
four periods (a lost machine). Creating the lock is exclusive, so two builds starting at once cannot
both win: ``O_EXCL`` on a local OUT, a conditional PUT (``If-None-Match: *``, fsspec's
``mode="create"``) on S3. A local takeover renames the stale file away first, so only one taker
wins; on S3 a taker deletes the stale object and creates its own, and a build that finds another
owner's lock at a heartbeat says so in an error. Object stores without exclusive create (other
fsspec protocols) are not locked (logged).
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


def parse_lock(data: bytes) -> LockInfo:
    try:
        return LockInfo(**json.loads(data))
    except (ValueError, TypeError):  # half-written by a writer killed mid-way: treat as stale
        return LockInfo("?", "?", -1, 0.0, 0.0, 1.0)


def read_lock(path: str) -> LockInfo | None:
    try:
        with open(path, "rb") as f:
            return parse_lock(f.read())
    except FileNotFoundError:
        return None


def stale_reason(info: LockInfo, now: float | None = None) -> str | None:
    """Why the lock no longer holds (None: its owner is alive)."""
    now = time.time() if now is None else now
    if info.host == socket.gethostname() and not _pid_alive(info.pid):
        return f"its owner pid {info.pid} on this host is gone"
    if now - info.heartbeat > MISSED_BEATS * info.heartbeat_s:
        return f"its heartbeat is {now - info.heartbeat:.0f} s old (limit {MISSED_BEATS * info.heartbeat_s:.0f} s)"
    return None


class LocalLockFile:
    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> LockInfo | None:
        return read_lock(self.path)

    def replace(self, data: bytes) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)  # atomic: a reader never sees half a lock

    def take_aside(self) -> bool:
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)  # only one taker wins the rename
        except FileNotFoundError:
            return False
        os.remove(aside)
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class ObjectLockFile:
    """The lock as an object: created with a conditional PUT, so only one creator wins."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self) -> LockInfo | None:
        try:
            return parse_lock(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)  # one PUT: readers see the old object or the new one

    def take_aside(self) -> bool:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            return False
        return True

    def remove(self) -> None:
        self.take_aside()


# object stores whose fsspec implementation makes ``mode="create"`` an exclusive create
EXCLUSIVE_CREATE_PROTOCOLS = ("s3", "s3a", "memory")


def lock_file(out: str, storage_options: dict | None = None) -> LocalLockFile | ObjectLockFile | None:
    """OUT's lock file; None when OUT is on a store that cannot create a file exclusively."""
    if "://" not in out or out.startswith("file://"):
        return LocalLockFile(os.path.join(out.removeprefix("file://"), LOCK_NAME))
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not set(protocols) & set(EXCLUSIVE_CREATE_PROTOCOLS):
        return None
    return ObjectLockFile(fs, f"{root.rstrip('/')}/{LOCK_NAME}")


class BuildLock:
    def __init__(self, out: str, heartbeat_s: float = 30.0, storage_options: dict | None = None,
                 file: LocalLockFile | ObjectLockFile | None = None):
        self.out = out
        file = file or lock_file(out, storage_options)
        if file is None:
            raise ValueError(f"{out}: this store cannot create a file exclusively, so it cannot hold a build lock")
        self.file = file
        self.path = self.file.path
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: LockInfo | None = None

    def _write_new(self) -> bool:
        now = time.time()
        info = LockInfo(getpass.getuser(), socket.gethostname(), os.getpid(), now, now, self.heartbeat_s)
        if not self.file.create(json.dumps(asdict(info)).encode("utf-8")):
            return False
        self.info = info
        return True

    def acquire(self) -> None:
        if isinstance(self.file, LocalLockFile):  # an object store has no folders to make
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            if self._write_new():
                break
            held = self.file.read()
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
            if not self.file.take_aside():
                continue
            log.warning("took over the build lock of %s: %s", held.describe(), why)
        else:
            raise BuildLocked(f"could not take the build lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="pab-build-lock", daemon=True)
        self._thread.start()

    def _mine(self, held: LockInfo | None) -> bool:
        return held is not None and held.pid == os.getpid() and held.host == socket.gethostname()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            assert self.info is not None
            held = self.file.read()
            if not self._mine(held):  # taken over while this build lived (a long pause, a partition)
                log.error("the build lock of %s is now held by %s: two builds may be writing it", self.out,
                          held.describe() if held else "nobody")
                if held is not None:
                    continue
            self.info.heartbeat = time.time()
            try:
                self.file.replace(json.dumps(asdict(self.info)).encode("utf-8"))
            except OSError as e:  # an object store hiccup: the next beat tries again
                log.warning("build lock heartbeat failed: %s", e)

    def release(self) -> None:
        if self._thread is None:
            return  # not ours (re-entered, or never taken)
        self._stop.set()
        self._thread.join(timeout=5)
        if self._mine(self.file.read()):
            self.file.remove()
        self._thread = None


@contextlib.contextmanager
def hold_build_lock(out: str, heartbeat_s: float = 30.0,
                    storage_options: dict | None = None) -> Iterator[BuildLock | None]:
    """Hold OUT's lock for the duration of the block (a no-op on a store without exclusive create)."""
    file = lock_file(out, storage_options)
    if file is None:
        log.warning("OUT %s is on a store without exclusive create: the one-build-per-OUT lock is not "
                    "enforced there", out)
        yield None
        return
    lock = BuildLock(out, heartbeat_s, file=file)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
