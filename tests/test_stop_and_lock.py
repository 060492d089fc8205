"""`pab run` stops when asked and owns its OUT: SIGTERM during a review pause (training branch
generating meanwhile) and Ctrl-C during generation each end the process within 30 s, leaving no
child process, no lock and nothing half-written; a second `pab run` on a busy OUT refuses; the
rerun resumes to a build whose shards verify."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pab_build.engine.build_lock import LOCK_NAME
from pab_build.manifests import read_manifest
from pab_build.engine.pipeline import STAGE_ORDER
from pab_build.store import Store

pytestmark = pytest.mark.slow


def _cmd(out: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", out, "--no-cmp"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _env() -> dict:
    return {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PYTHONUNBUFFERED": "1"}


def _start(out: str, overrides: list[str], log) -> subprocess.Popen:
    # own process group, default SIGINT (a background job would ignore it): as a terminal's Ctrl-C sees it
    return subprocess.Popen(_cmd(out, overrides), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, proc, timeout=600):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the build ended before the point to interrupt"
        assert time.time() < deadline, "timed out waiting for the point to interrupt"
        time.sleep(0.2)


def _markers(out: str, stage: str) -> int:
    d = os.path.join(out, "_markers", stage)
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def _all_markers(out: str) -> int:
    return sum(_markers(out, stage) for stage in STAGE_ORDER)


def _stop(proc: subprocess.Popen, sig: int, group: bool) -> float:
    members = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    start = time.time()
    os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    took = time.time() - start
    time.sleep(1)
    assert [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    return took


def test_sigterm_in_review_pause_and_ctrl_c_in_generation_then_resume(tmp_path, tiny_models_dir, sample_oops_root):
    out = str(tmp_path / "out")
    base = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false", f"oops.root={sample_oops_root}"]
    log = open(tmp_path / "run.log", "w")
    proc = _start(out, base + ["review.policy=wait"], log)
    _wait_for(lambda: os.path.exists(os.path.join(out, "review", "decisions_template.csv"))
              and _markers(out, "generate") > 0, proc)
    second = subprocess.run(_cmd(out, base), env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "is being built by" in second.stderr, second.stderr[-2000:]
    assert _stop(proc, signal.SIGTERM, group=False) < 30
    assert proc.returncode != 0 and not os.path.exists(os.path.join(out, LOCK_NAME))

    # Ctrl-C as soon as this run finishes a unit: in generation when units of it are left (the first
    # run went on generating through the review pause and may have finished them all), else in
    # whatever stage is running; either way mid-build
    proc = _start(out, base, log)
    before = _all_markers(out)
    _wait_for(lambda: _all_markers(out) > before, proc)
    assert _stop(proc, signal.SIGINT, group=True) < 30
    assert proc.returncode != 0

    proc = _start(out, base, log)
    assert proc.wait(timeout=1200) == 0, open(tmp_path / "run.log").read()[-3000:]
    verify = subprocess.run([sys.executable, "-m", "flows.cli", "verify", out], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
    for stage in STAGE_ORDER:
        keys = [r["sample_key"] for r in read_manifest(Store(out), stage)]
        assert len(keys) == len(set(keys)), stage
    # a write cut short leaves only a hidden `.<name>.tmp-*` file, never a partial file under its real name
    assert [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f and not f.startswith(".")] == []
