"""One build per OUT: a live owner makes a second build refuse; a dead or silent owner is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pab_build.build_lock import LOCK_NAME, BuildLock, BuildLocked, hold_build_lock, read_lock


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
