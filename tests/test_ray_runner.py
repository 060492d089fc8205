"""Builds on a real multi-node Ray cluster (Ray's own ``cluster_utils.Cluster``: a head without CPUs
and two worker nodes, one raylet each, shared by the tests of this module):

- preflight runs on every node and names the node whose cache lacks a model, in seconds;
- the smoke build joins the cluster once, runs both branches at once (generate finishes while the
  review waits, paused), records its unit task runs under the build's flow run on the flow's server,
  starts no Prefect server in a worker, loads each model once per actor, sends no secret through
  Ray, and gives the threads build's manifests and shards byte for byte;
- SIGTERM stops a Ray build with rc 130 and one line, and ends the actors it started (the cluster
  stays up).
"""

from __future__ import annotations

import csv
import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import psutil
import pytest

pytestmark = pytest.mark.slow
PLANTED = "planted-Secret-7f3a9c"
# on a loaded CI machine the build's temporary Prefect server may take longer than Prefect's default
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    homes = tmp_path_factory.mktemp("homes")
    home_a, home_b = homes / "a", homes / "b"  # each node's own HOME: its own model folder (~/models)
    (home_a / "models").mkdir(parents=True)
    home_b.mkdir()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": {"HOME": str(home_a)}})
    a = c.add_node(num_cpus=1, env_vars={"HOME": str(home_a)})
    b = c.add_node(num_cpus=1, env_vars={"HOME": str(home_b)})
    c.wait_for_nodes()
    try:
        yield SimpleNamespace(cluster=c, address=c.address, a=a, b=b, home_a=home_a,
                              session_dir=c.head_node.get_session_dir_path())
    finally:
        c.shutdown()


def _cli(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "RAY_DEDUP_LOGS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _content(out: str) -> dict[str, bytes]:
    found = {}
    for sub in ("manifests", "shards"):
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                p = os.path.join(dirpath, f)
                found[os.path.relpath(p, out)] = open(p, "rb").read()
    return found


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _session_text(session_dir: str) -> str:
    parts = []
    for p in glob.glob(os.path.join(session_dir, "**", "*"), recursive=True):
        if os.path.isfile(p) and not os.path.islink(p) and not p.endswith(".sock"):
            try:
                parts.append(open(p, "rb").read().decode("utf-8", "replace"))
            except OSError:
                pass
    return "\n".join(parts)


def test_preflight_names_the_node_whose_cache_lacks_a_model(cluster, tiny_models_dir, sample_oops_root):
    import shutil

    shutil.copytree(os.path.join(tiny_models_dir, "openpose"), cluster.home_a / "models" / "openpose")
    start = time.monotonic()
    r = _cli(["preflight", "smoke", "--out", str(cluster.home_a / "out"), "--oops-root", sample_oops_root,
              "--set", "run.task_runner=ray", "--set", f"run.ray_address={cluster.address}",
              "--set", f"fixtures.models_dir={tiny_models_dir}", "--set", "fixtures.build_tiny_models=false",
              "--set", "models.openpose.path=~/models/openpose"], env={"HOME": str(cluster.home_a)}, timeout=300)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stdout + r.stderr
    problems = [ln for ln in r.stderr.splitlines() if "PROBLEM" in ln]
    assert len(problems) == 1, r.stderr
    assert f"node {cluster.b.node_ip_address} {cluster.b.node_id[:8]}: model openpose" in problems[0], r.stderr
    assert "no such folder" in problems[0]
    for node in (cluster.a, cluster.cluster.head_node):  # the other nodes were checked and pass
        assert re.search(rf"node \S+ {node.node_id[:8]}: model openpose\s+ok", r.stderr), r.stderr
    assert took < 90, took  # seconds (Ray's start and the driver's imports included), not a failed unit hours later


def _wait_paused(client, deadline: float):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    while time.time() < deadline:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        if runs:
            return runs[0]
        time.sleep(0.5)
    return None


def _accept_all(template: str, path) -> str:
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "decision": "accept", "reason": "", "reviewer": "alice"})
    return str(path)


@pytest.mark.timeout(2400)  # ~12 min on a 2-core machine at load 16, 24 min at load 30
def test_ray_build_on_two_nodes(cluster, tmp_path, monkeypatch, tiny_models_dir, sample_oops_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.flow_runs import resume_flow_run
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_pab import build_pab

    # credentials on the driver only: none may reach Ray's metadata, logs or runtime_env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED + "-aws")
    monkeypatch.setenv("PAB_SECRET_OVERRIDES", f'["publish.storage_options.secret={PLANTED}-opt"]')
    base = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
            f"oops.root={sample_oops_root}"]
    out = str(tmp_path / "ray")
    overrides = base + ["run.task_runner=ray", f"run.ray_address={cluster.address}", "review.policy=wait",
                        "review.wait_timeout_s=900"]
    result: dict = {}
    with prefect_test_harness(server_startup_timeout=120):
        build = threading.Thread(target=lambda: result.setdefault(
            "summary", build_pab(profile="smoke", out=out, overrides=overrides, train_cmp=False)), daemon=True)
        build.start()
        with get_client(sync_client=True) as client:
            paused = _wait_paused(client, time.time() + 400)
            assert paused is not None and paused.name == "review-wait", "the build did not pause for review"
            generate = os.path.join(out, "manifests", "generate.parquet")
            deadline = time.time() + 600
            while not os.path.exists(generate) and time.time() < deadline and build.is_alive():
                time.sleep(1)
            assert os.path.exists(generate), "generate did not finish while the review waited"
            assert client.read_flow_run(paused.id).state.is_paused()
            decisions = _accept_all(os.path.join(out, "review", "decisions_template.csv"), tmp_path / "alice.csv")
            resume_flow_run(paused.id, run_input={"files": [decisions]})
            build.join(timeout=900)
            assert "summary" in result, "the build did not finish after resuming"
            # the unit task runs are on the flow's server, under the build's flow run
            stage = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["stage-generate"])))
            assert len(stage) == 1 and stage[0].parent_task_run_id is not None
            build_run = client.read_flow_run(client.read_task_run(stage[0].parent_task_run_id).flow_run_id)
            assert client.read_flow(build_run.flow_id).name == "build-pab"
            units = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[stage[0].id])))
            assert units and all(t.name.startswith("generate-unit") for t in units)
            assert all(t.state.is_completed() for t in units)

    monkeypatch.delenv("PAB_SECRET_OVERRIDES")
    threads = str(tmp_path / "threads")
    r = _cli(["run", "smoke", "--out", threads, "--no-cmp", "--runner", "threads",
              *[a for o in base + ["review.policy=wait", f"review.decisions_files=[{decisions}]"]
                for a in ("--set", o)]])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _content(threads), _content(out)
    assert sorted(a) == sorted(b) and any(k.startswith("manifests/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []

    logs = _session_text(cluster.session_dir)
    assert "UnitWorker" in logs  # the actors' logs are there
    assert "Starting temporary server" not in logs  # no worker started a Prefect server
    assert PLANTED not in logs
    loads = Counter(re.findall(r"loaded model (\w+) in process (\d+)", logs))
    assert loads and max(loads.values()) == 1, loads  # each actor (a process) loads its model once


def test_sigterm_stops_a_ray_build_with_rc_130(cluster, tmp_path, tiny_models_dir, sample_oops_root):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", str(out), "--no-cmp", "--runner", "ray",
           "--until", "frames"]
    for o in (f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
              f"oops.root={sample_oops_root}", f"run.ray_address={cluster.address}", "frames.clips_per_unit=1"):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    while not glob.glob(str(out / "_markers" / "frames" / "*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)  # GRACE_S (15 s) after the signal at most, on a loaded machine slower
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("still running 120 s after SIGTERM:\n" + proc.communicate()[1][-4000:])
    assert proc.returncode == 130, err[-3000:]
    assert "pab: stopped; finished units are kept" in err and "SystemExit" not in err, err[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the build's actors end with its Ray job
        actors = [p for p in psutil.process_iter() if "ray::UnitWorker" in _cmdline(p)]
        if not actors:
            break
        time.sleep(1)
    assert not actors
    assert cluster.cluster.remaining_processes_alive()  # the cluster it joined stays up


@pytest.mark.timeout(900)
def test_a_node_lost_mid_stage_changes_no_byte(cluster, tmp_path, tiny_models_dir, sample_oops_root):
    """A third node joins; its raylet and workers are SIGKILLed while one of its actors runs a unit:
    the unit runs again on the nodes left and the stage's manifest is the threads build's."""
    from ray._private import ray_constants

    node_c = cluster.cluster.add_node(num_cpus=1)
    cluster.cluster.wait_for_nodes()
    raylet = psutil.Process(node_c.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    sets = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
            f"oops.root={sample_oops_root}", "frames.clips_per_unit=1"]
    args = ["run", "smoke", "--no-cmp", "--until", "frames", *[a for o in sets for a in ("--set", o)]]
    ray_out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "flows.cli", *args, "--out", str(ray_out), "--runner", "ray",
           "--set", f"run.ray_address={cluster.address}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    busy = []
    while not busy:  # an actor of node C in the middle of a unit
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        busy = [p for p in raylet.children(recursive=True) if "ray::UnitWorker.run" in _cmdline(p)]
        time.sleep(0.05)
    cluster.cluster.remove_node(node_c, allow_graceful=False)  # SIGKILL: raylet, its workers, its actors
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "its Ray actor is gone" in err, err[-3000:]
    threads_out = tmp_path / "threads"
    r = _cli([*args, "--out", str(threads_out), "--runner", "threads"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _content(str(threads_out)), _content(str(ray_out))
    assert sorted(a) == sorted(b) == ["manifests/frames.parquet"]
    assert a == b
