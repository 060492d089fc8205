"""Builds on a real multi-node Ray cluster (Ray's own ``cluster_utils.Cluster``: a head without CPUs
and two worker nodes, one raylet each, shared by the tests of this module), with moto's S3 server
as the object store. Every node is started with its own S3 credentials and endpoint in its
environment, as a cluster's nodes would be; the driver's credentials are not the nodes'.

- preflight runs on every node and names, in seconds, the node whose cache lacks a model and the
  node that has no credentials for OUT;
- the smoke build with OUT on S3 joins the cluster once, runs both branches at once (generate
  finishes while the review waits, paused), records its unit task runs under the build's flow run
  on the flow's server, starts no Prefect server in a worker, loads each model once per actor,
  sends none of the driver's credentials through Ray, and gives the threads build's manifests and
  shards byte for byte;
- SIGTERM stops a Ray build with rc 130 and one line, and ends the actors it started (the cluster
  stays up);
- a node lost mid-stage, or the driver killed (and the build rerun), changes no byte.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
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
BUCKET = "pab-ray"
NODE_SECRET = "node-own-secret"  # what each node's environment holds; moto accepts any credentials
# on a loaded CI machine the build's temporary Prefect server may take longer than Prefect's default
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _s3_env(endpoint: str) -> dict[str, str]:
    """Where S3 is, for any process of the cluster (no credential: see NODE_CREDENTIALS)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


NODE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": NODE_SECRET}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in this process (its state too), with an empty bucket."""
    pytest.importorskip("moto")
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    s3fs.S3FileSystem(key="admin", secret="admin", client_kwargs={"endpoint_url": endpoint},
                      skip_instance_cache=True).mkdir(BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def ray_auth_off():
    """Token authentication off, said explicitly: Ray 2.60 turns it on for a new local cluster
    (test_ray_config's) by setting RAY_AUTH_MODE in this process, and keeps the mode it first read
    in this process's cached config; nodes started with another HOME would find no token. A real
    cluster's token: docs/DEPLOY.md."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint, ray_auth_off):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    homes = tmp_path_factory.mktemp("homes")
    home_a, home_b = homes / "a", homes / "b"  # each node's own HOME: its own model folder (~/models)
    (home_a / "models").mkdir(parents=True)
    home_b.mkdir()
    node_env = {**_s3_env(s3_endpoint), **NODE_CREDENTIALS}  # the nodes' own: never the driver's
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": {**node_env, "HOME": str(home_a)}})
    a = c.add_node(num_cpus=1, env_vars={**node_env, "HOME": str(home_a)})
    b = c.add_node(num_cpus=1, env_vars={**node_env, "HOME": str(home_b)})
    c.wait_for_nodes()
    try:
        yield SimpleNamespace(cluster=c, address=c.address, a=a, b=b, home_a=home_a, s3_endpoint=s3_endpoint,
                              session_dir=c.head_node.get_session_dir_path())
    finally:
        c.shutdown()


def _s3_fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key="reader", secret="reader", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


def _s3_content(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    found = {}
    for sub in ("manifests", "shards"):
        for p in fs.find(f"{root}/{sub}"):
            found[p[len(root) + 1:]] = fs.cat_file(p)
    return found


FRAMES_SETS = ["fixtures.build_tiny_models=false", "frames.clips_per_unit=1"]


def _frames_cmd(out, runner: str, tiny_models_dir: str, oops_root: str, address: str | None = None) -> list[str]:
    """`pab run smoke --until frames`, one clip per unit (many short units to stop in the middle of)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", str(out), "--no-cmp", "--runner", runner,
           "--until", "frames"]
    sets = [f"fixtures.models_dir={tiny_models_dir}", f"oops.root={oops_root}", *FRAMES_SETS]
    if address:
        sets.append(f"run.ray_address={address}")
    return cmd + [a for o in sets for a in ("--set", o)]


@pytest.fixture(scope="module")
def frames_by_threads(tmp_path_factory, tiny_models_dir, sample_oops_root) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("frames-threads") / "out"
    r = subprocess.run(_frames_cmd(out, "threads", tiny_models_dir, sample_oops_root), capture_output=True,
                       text=True, timeout=600, env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    found = _content(str(out))
    assert sorted(found) == ["manifests/frames.parquet"]
    return found


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


def test_preflight_names_the_nodes_that_lack_a_model_or_credentials(cluster, tiny_models_dir, sample_oops_root):
    import shutil

    shutil.copytree(os.path.join(tiny_models_dir, "openpose"), cluster.home_a / "models" / "openpose")
    # a third node with the model but no S3 credentials in its environment
    node_c = cluster.cluster.add_node(num_cpus=0, env_vars={**_s3_env(cluster.s3_endpoint), "HOME": str(cluster.home_a)})
    cluster.cluster.wait_for_nodes()
    try:
        start = time.monotonic()
        r = _cli(["preflight", "smoke", "--out", f"s3://{BUCKET}/preflight", "--oops-root", sample_oops_root,
                  "--set", "run.task_runner=ray", "--set", f"run.ray_address={cluster.address}",
                  "--set", f"fixtures.models_dir={tiny_models_dir}", "--set", "fixtures.build_tiny_models=false",
                  "--set", "models.openpose.path=~/models/openpose"],
                 env={"HOME": str(cluster.home_a), **_s3_env(cluster.s3_endpoint), **NODE_CREDENTIALS}, timeout=300)
        took = time.monotonic() - start
    finally:
        cluster.cluster.remove_node(node_c)
        cluster.cluster.wait_for_nodes(timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    problems = [ln for ln in r.stderr.splitlines() if "PROBLEM" in ln]
    assert len(problems) == 2, r.stderr
    (model,) = [ln for ln in problems if f"node {cluster.b.node_ip_address} {cluster.b.node_id[:8]}: model openpose" in ln]
    assert "no such folder" in model, r.stderr
    (creds,) = [ln for ln in problems if f"node {node_c.node_ip_address} {node_c.node_id[:8]}: OUT writable" in ln]
    assert "NoCredentialsError" in creds, r.stderr
    for node in (cluster.a, cluster.cluster.head_node):  # the other nodes were checked and pass
        assert re.search(rf"node \S+ {node.node_id[:8]}: model openpose\s+ok", r.stderr), r.stderr
        assert re.search(rf"node \S+ {node.node_id[:8]}: OUT writable\s+ok .*probe file written and removed",
                         r.stderr), r.stderr
    assert not _s3_fs(cluster.s3_endpoint).find(f"{BUCKET}/preflight")  # the probes were removed
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
def test_ray_build_on_two_nodes_with_out_on_s3(cluster, tmp_path, monkeypatch, tiny_models_dir, sample_oops_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.flow_runs import resume_flow_run
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_pab import build_pab

    # the driver's own credentials (its environment, and storage options as a Prefect block would
    # give them): none may reach Ray's metadata, logs or runtime_env; the workers use their node's
    for k, v in _s3_env(cluster.s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED + "-aws")
    monkeypatch.setenv("PAB_SECRET_OVERRIDES", json.dumps(["publish.storage_options.key=driver-key",
                                                           f"publish.storage_options.secret={PLANTED}-opt"]))
    base = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
            f"oops.root={sample_oops_root}"]
    fs, root = _s3_fs(cluster.s3_endpoint), f"{BUCKET}/ray"
    out = f"s3://{root}"
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
            generate = f"{root}/manifests/generate.parquet"
            deadline = time.time() + 600
            while time.time() < deadline and build.is_alive():
                fs.invalidate_cache()
                if fs.exists(generate):
                    break
                time.sleep(1)
            assert fs.exists(generate), "generate did not finish while the review waited"
            assert client.read_flow_run(paused.id).state.is_paused()
            fs.get_file(f"{root}/review/decisions_template.csv", str(tmp_path / "template.csv"))
            decisions = _accept_all(str(tmp_path / "template.csv"), tmp_path / "alice.csv")
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
    a, b = _content(threads), _s3_content(fs, root)
    assert sorted(a) == sorted(b) and any(k.startswith("manifests/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []

    logs = _session_text(cluster.session_dir)
    assert "UnitWorker" in logs  # the actors' logs are there
    assert "Starting temporary server" not in logs  # no worker started a Prefect server
    assert PLANTED not in logs and "driver-key" not in logs
    loads = Counter(re.findall(r"loaded model (\w+) in process (\d+)", logs))
    assert loads and max(loads.values()) == 1, loads  # each actor (a process) loads its model once


def test_sigterm_stops_a_ray_build_with_rc_130(cluster, tmp_path, tiny_models_dir, sample_oops_root):
    out = tmp_path / "out"
    proc = subprocess.Popen(_frames_cmd(out, "ray", tiny_models_dir, sample_oops_root, cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
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
    _assert_no_unit_actors()
    assert cluster.cluster.remaining_processes_alive()  # the cluster it joined stays up


def _assert_no_unit_actors(within_s: float = 30) -> None:
    """The build's actors end with its Ray job."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        actors = [p for p in psutil.process_iter() if "ray::UnitWorker" in _cmdline(p)]
        if not actors:
            return
        time.sleep(1)
    assert not actors


@pytest.mark.timeout(900)
def test_a_node_lost_mid_stage_changes_no_byte(cluster, tmp_path, tiny_models_dir, sample_oops_root,
                                               frames_by_threads):
    """A third node joins; its raylet and workers are SIGKILLed while one of its actors runs a unit:
    the unit runs again on the nodes left and the stage's manifest is the threads build's."""
    from ray._private import ray_constants

    node_c = cluster.cluster.add_node(num_cpus=1)
    cluster.cluster.wait_for_nodes()
    raylet = psutil.Process(node_c.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    ray_out = tmp_path / "ray"
    proc = subprocess.Popen(_frames_cmd(ray_out, "ray", tiny_models_dir, sample_oops_root, cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
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
    assert _content(str(ray_out)) == frames_by_threads
    # until Ray's health checks mark node C dead, the next build's preflight would (rightly) name it
    cluster.cluster.wait_for_nodes(timeout=120)


@pytest.mark.timeout(900)
def test_a_killed_driver_leaves_an_out_that_a_rerun_finishes_identically(cluster, tmp_path, tiny_models_dir,
                                                                         sample_oops_root, frames_by_threads):
    """The head's driver (``pab run``) is SIGKILLed mid-stage: no handler runs, its lock and Ray job
    are left behind. Ray ends the job's actors; a rerun on the same OUT takes the lock over, keeps
    the units already finished and gives the threads build's bytes."""
    out = tmp_path / "ray"
    cmd = _frames_cmd(out, "ray", tiny_models_dir, sample_oops_root, cluster.address)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **ENV})
    markers = out / "_markers" / "frames"
    deadline = time.monotonic() + 300
    while not glob.glob(str(markers / "*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    log.close()
    # what a SIGKILL leaves that is not ours to end: Prefect's temporary server (a child of `pab run`
    # without PREFECT_API_URL) outlives it; end it so the test leaves nothing running
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    done = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(markers / "*.json"))}
    assert not (out / "manifests" / "frames.parquet").exists()  # killed mid-stage
    _assert_no_unit_actors(within_s=60)  # Ray ended the dead driver's actors
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: os.stat(p).st_mtime_ns for p in done} == done  # finished units were not run again
    assert len(glob.glob(str(markers / "*.json"))) > len(done)
    assert _content(str(out)) == frames_by_threads
    assert cluster.cluster.remaining_processes_alive()
