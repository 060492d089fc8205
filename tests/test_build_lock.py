"""One build per OUT: a live owner makes a second build refuse; a dead or silent owner is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pab_build.engine.build_lock import LOCK_NAME, BuildLock, BuildLocked, hold_build_lock, lock_file, read_lock
from test_publish import BUCKET, s3  # noqa: F401 - fixture (moto's S3 server)


def _write(out, **fields):
    info = {"owner": "x", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), "heartbeat_s": 30.0, **fields}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(info, f)


def test_second_build_on_live_lock_refuses_and_lock_goes_away(tmp_path):
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write(out, pid=holder.pid)
        with pytest.raises(BuildLocked, match=f"pid {holder.pid}"):
            BuildLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and taken over; released at the end of the block
    with hold_build_lock(out, heartbeat_s=0.05) as lock:
        assert read_lock(lock.path).pid == os.getpid()
        time.sleep(0.2)
        assert time.time() - read_lock(lock.path).heartbeat < 0.2  # heartbeats keep it fresh
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


def test_expired_heartbeat_from_another_host_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    _write(out, host="gone-node", pid=1, heartbeat=time.time() - 1000, heartbeat_s=10.0)
    lock = BuildLock(out, heartbeat_s=5)
    lock.acquire()
    assert read_lock(lock.path).host == socket.gethostname()
    lock.release()
    _write(out, host="busy-node", pid=1)  # another machine, fresh heartbeat: it holds OUT
    with pytest.raises(BuildLocked, match="busy-node"):
        BuildLock(out).acquire()


def test_an_s3_out_is_locked_by_a_conditional_put(s3):  # noqa: F811
    _, options, requests = s3
    out = f"s3://{BUCKET}/builds/full"
    first = BuildLock(out, heartbeat_s=0.05, storage_options=options)
    first.acquire()
    try:
        held = lock_file(out, options).read()
        assert held.pid == os.getpid() and held.host == socket.gethostname()
        # a second build (another host: the same pid here would count as re-entering) refuses
        info = {**json.loads(first.file.fs.cat_file(first.path)), "host": "other-node", "pid": 1,
                "heartbeat": time.time(), "heartbeat_s": 30.0}
        first._stop.set()
        first._thread.join()
        first.file.replace(json.dumps(info).encode())
        with pytest.raises(BuildLocked, match="other-node"):
            BuildLock(out, storage_options=options).acquire()
        assert any("PUT" in ln and LOCK_NAME in ln and " 412 " in ln for ln in requests.lines)  # If-None-Match
    finally:
        first._thread = None
    # that owner goes silent: its lock is taken over, then released with the block
    info["heartbeat"] = time.time() - 1000
    first.file.replace(json.dumps(info).encode())
    with hold_build_lock(out, heartbeat_s=0.05, storage_options=options) as lock:
        time.sleep(0.2)
        assert lock_file(out, options).read().host == socket.gethostname()
        assert time.time() - lock_file(out, options).read().heartbeat < 0.2
    assert lock_file(out, options).read() is None


def test_two_builds_racing_for_one_s3_out_leave_exactly_one_winner(s3):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    _, options, _ = s3
    out = f"s3://{BUCKET}/builds/race"

    def create_as(pid: int) -> bool:  # one build's first step, as four processes starting at once
        info = {"owner": "x", "host": "node", "pid": pid, "started": time.time(), "heartbeat": time.time(),
                "heartbeat_s": 60.0}
        return lock_file(out, options).create(json.dumps(info).encode())

    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(create_as, range(10_000, 10_004)))
    assert won.count(True) == 1
    assert lock_file(out, options).read().pid == 10_000 + won.index(True)
