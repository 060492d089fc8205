"""A lost machine is noticed, on a real Prefect server (127.0.0.1, the stack of test_deployment):
with flow-run heartbeats on and `pab automations install`, a deployment run whose worker is
SIGKILLed loses its flow process too (killed with it: no orphan writing to OUT); with both gone and
nobody to report, the run becomes Crashed within a few heartbeat periods, and `prefect flow-run
retry` finishes it from its markers."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import time

import psutil
import pytest

from test_deployment import CPU_POOL, EXTRA_OVERRIDES, GPU_POOL, PrefectStack, _free_port, is_flow_run_process

pytestmark = pytest.mark.slow
HEARTBEAT_S = 30  # Prefect's minimum


def _markers(out) -> int:
    return len(glob.glob(str(out / "_markers" / "frames" / "*.json")))


def _busy_engine(stack, run_id: str, worker, out) -> psutil.Process:
    """The flow-run process of ``run_id``, frozen (SIGSTOP) mid-stage as soon as its first unit
    finished: busy when its machine goes. Its first heartbeat went out when the run started."""
    deadline = time.monotonic() + 180
    engines: list = []
    while not engines or _markers(out) < 1:
        assert time.monotonic() < deadline, stack.log_tail("worker")
        time.sleep(0.01)
        engines = [p for p in psutil.Process(worker.pid).children(recursive=True) if is_flow_run_process(p)]
    engines[0].suspend()
    assert stack.flow_run(run_id)["state_type"] == "RUNNING"
    return engines[0]


@pytest.mark.timeout(900)
def test_killed_worker_and_flow_process_become_crashed_then_retry_finishes(tmp_path):
    from pab_build.fixtures.sample_oops import write_sample_oops

    stack = PrefectStack(tmp_path / "home", _free_port())
    (tmp_path / "home").mkdir()
    try:
        server = stack.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(stack.port))
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, stack.log_tail("server")
            try:
                if stack.get("/health") is True:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, stack.log_tail("server")
            time.sleep(0.5)
        for pool in (CPU_POOL, GPU_POOL):
            assert stack.cli("work-pool", "create", pool, "--type", "process").returncode == 0
        r = stack.cli("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([sys.executable, "-m", "flows.cli", "automations", "install", "--heartbeat-s",
                            str(HEARTBEAT_S)], env=stack.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        worker = stack.start("worker", "worker", "start", "--pool", CPU_POOL, "--type", "process")

        oops_root, out = tmp_path / "oops", tmp_path / "out"
        write_sample_oops(str(oops_root), seed=0)
        params = {"out": str(out), "until": "frames", "overrides": EXTRA_OVERRIDES + [
            f"oops.root={oops_root}", "frames.clips_per_unit=1", "run.max_workers=1"]}
        env = json.dumps({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)})
        r = stack.cli("deployment", "run", "build-pab/smoke", "--params", json.dumps(params),
                      "--job-variable", f"env={env}", timeout=120)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)
        engine = _busy_engine(stack, run_id, worker, out)
        worker.kill()  # the worker dies: its flow process must not live on as an orphan writing to OUT
        gone, _ = psutil.wait_procs([engine], timeout=30)
        assert gone, "the flow process outlived its worker"
        # nobody is left to report (as when the machine goes): the heartbeat automation marks it Crashed
        start = time.monotonic()
        run = stack.wait_state(run_id, {"CRASHED", "FAILED", "COMPLETED", "CANCELLED"}, timeout=8 * HEARTBEAT_S)
        assert run["state_type"] == "CRASHED", run["state"]
        assert time.monotonic() - start < 8 * HEARTBEAT_S
        stack.wait_settled(run_id, quiet_s=5, timeout=60)

        stack.start("worker2", "worker", "start", "--pool", CPU_POOL, "--type", "process")
        r = stack.cli("flow-run", "retry", run_id)  # the documented retry works after the crash
        assert r.returncode == 0, r.stdout + r.stderr
        done = stack.wait_state(run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=240)
        assert done["state_type"] == "COMPLETED", stack.log_tail("worker2")
        assert (out / "manifests" / "frames.parquet").exists()
        assert not (out / "_build.lock").exists()
    finally:
        stack.stop_all()
