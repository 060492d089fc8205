"""The deployments in prefect.yaml on a real Prefect server (127.0.0.1, a free port, its own
PREFECT_HOME): create the work pools, `prefect deploy`, start a process worker, run
`prefect deployment run build-pab/smoke --watch`, check the outputs; a rerun skips finished units;
a crashed run, retried with `prefect flow-run retry`, resumes from its markers.

Every process started here (server, worker, the flow runs it spawns) is killed on teardown.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pab_build.config import REPO_ROOT, load_config
from pab_build.manifests import read_manifest
from pab_build.store import Store

PREFECT = str(Path(sys.executable).with_name("prefect")) if Path(sys.executable).with_name("prefect").exists() \
    else shutil.which("prefect") or "prefect"
CPU_POOL, GPU_POOL = "pab-process", "pab-gpu"
DEPLOYMENTS = {"build-pab/smoke": CPU_POOL, "build-pab/full": GPU_POOL, "train-cmp/smoke": CPU_POOL,
               "train-cmp/full": GPU_POOL}
# frames needs no model, so the tiny models are not built (minutes on 2 cores); drop this override
# (or add stages to `until`) once a test should exercise them.
EXTRA_OVERRIDES = ["fixtures.build_tiny_models=false"]
UNTIL = "frames"


def _deployments() -> list[dict]:
    with open(REPO_ROOT / "prefect.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)["deployments"]


@pytest.mark.parametrize("dep", _deployments(), ids=lambda d: f"{d['entrypoint'].split(':')[1]}/{d['name']}")
def test_prefect_yaml_parameters_are_flow_parameters(dep):
    """A misspelt parameter in prefect.yaml is not caught by `prefect deploy`; catch it here."""
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    path, _ = dep["entrypoint"].split(":")
    if not (REPO_ROOT / path).exists():
        pytest.skip(f"{path} is not written yet")
    flow = load_flow_from_entrypoint(str(REPO_ROOT / dep["entrypoint"]))
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(dep["parameters"]) <= accepted, set(dep["parameters"]) - accepted
    assert dep["work_pool"]["name"] in (CPU_POOL, GPU_POOL)
    assert f"{flow.name}/{dep['name']}" in DEPLOYMENTS


def test_containers_run_workers_of_the_deployments_pools():
    """compose.yaml and the images start workers on the pools prefect.yaml deploys to, from the
    folder the pull step will point at (compose registers the deployments inside the image)."""
    with open(REPO_ROOT / "docker" / "compose.yaml", encoding="utf-8") as f:
        services = yaml.safe_load(f)["services"]
    pools = {d["work_pool"]["name"] for d in _deployments()}
    worker_pools = {c[c.index("--pool") + 1] for c in (s["command"] for s in services.values()) if "worker" in c}
    assert worker_pools == pools
    register = " ".join(services["register"]["command"])
    assert all(f"work-pool create {p} --type process" in register for p in pools)
    assert "deploy --all" in register
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (REPO_ROOT / "docker" / name).read_text()
        assert "WORKDIR /opt/pab-build" in text and 'pip install -e ".[${EXTRAS}]"' in text
        assert re.search(r'CMD \["prefect", "worker", "start", "--pool", "(%s)"' % "|".join(pools), text)


# --- a real server, pools, deployments and a worker ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session: its group and every descendant (flow runs
    start in sessions of their own, so the group alone would miss them)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            continue
        _, family = psutil.wait_procs(family, timeout=5)
        if not family:
            return


class PrefectStack:
    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_URL=self.api,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs_open: list = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "wb")
        self.logs_open.append(log)
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO_ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, n: int = 3000) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")[-n:]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def get(self, path: str):
        with urllib.request.urlopen(self.api + path, timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.api + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def wait_state(self, run_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in states:
                return run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} still {run['state_type']}; worker log:\n{self.log_tail('worker')}")

    def wait_settled(self, run_id: str, quiet_s: float, timeout: float) -> list[dict]:
        """Wait until no new state has been recorded for ``quiet_s``; returns the state history."""
        deadline = time.monotonic() + timeout
        states, since = self.get(f"/flow_run_states/?flow_run_id={run_id}"), time.monotonic()
        while time.monotonic() - since < quiet_s:
            assert time.monotonic() < deadline, states
            time.sleep(0.5)
            now = self.get(f"/flow_run_states/?flow_run_id={run_id}")
            if len(now) != len(states):
                states, since = now, time.monotonic()
        return states

    def logs(self, run_id: str) -> list[str]:
        """The run's latest log messages, newest first."""
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 200}
        return [entry["message"] for entry in self.post("/logs/filter", body)]

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # worker (and its flow runs) before the server
            _stop(self.procs[name])
        for log in self.logs_open:
            log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    s = PrefectStack(home, _free_port())
    try:
        server = s.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(s.port))
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"prefect server exited:\n{s.log_tail('server')}"
            try:
                if s.get("/health") is True:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /api/health after 120 s:\n{s.log_tail('server')}"
            time.sleep(0.5)
        for pool in (CPU_POOL, GPU_POOL):
            r = s.cli("work-pool", "create", pool, "--type", "process")
            assert r.returncode == 0, r.stdout + r.stderr
        r = s.cli("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        s.start("worker", "worker", "start", "--pool", CPU_POOL, "--type", "process")
        yield s
    finally:
        s.stop_all()


def _run_deployment(stack: PrefectStack, params: dict, watch: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    args = ["deployment", "run", "build-pab/smoke", "--params", json.dumps(params)]
    if watch:
        args += ["--watch", "--watch-timeout", "150"]
    r = stack.cli(*args, timeout=180)
    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1), r


def _summary(stack: PrefectStack, run_id: str, timeout: float = 30) -> dict:
    """The build's summary line from the run's logs (logs reach the server in batches, possibly
    after the run's final state)."""
    deadline = time.monotonic() + timeout
    while not (lines := [m for m in stack.logs(run_id) if m.startswith("build summary: ")]):
        assert time.monotonic() < deadline, stack.logs(run_id)
        time.sleep(0.5)
    return ast.literal_eval(lines[0].removeprefix("build summary: "))


def _mtimes(out: Path, pattern: str) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in sorted(glob.glob(str(out / pattern)))}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deployments_registered_with_pools_and_pull_step(stack):
    for name, pool in DEPLOYMENTS.items():
        dep = stack.get(f"/deployments/name/{name}")
        assert dep["work_pool_name"] == pool
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
        ]
        assert set(dep["parameters"]) <= set(dep["parameter_openapi_schema"]["properties"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_deployment_run_then_rerun_skips_finished_units(stack, tmp_path):
    out, oops_dir = tmp_path / "out", tmp_path / "sample-oops"
    # the smoke profile writes the bundled sample OOPS! root itself: here, into tmp
    params = {"out": str(out), "until": UNTIL,
              "overrides": EXTRA_OVERRIDES + [f"fixtures.sample_oops_dir={oops_dir}"]}
    run_id, r = _run_deployment(stack, params)
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + stack.log_tail("worker")
    assert stack.flow_run(run_id)["state_type"] == "COMPLETED"

    assert (out / "manifests" / "frames.parquet").exists()
    rows = read_manifest(Store(str(out)), "frames")
    ok = [x for x in rows if x["status"] == "ok"]
    rejected = [x for x in rows if x["status"] == "rejected"]
    assert ok and rejected
    assert all(x["reason"] for x in rejected)
    assert all((out / x["image_path"]).is_file() for x in ok)
    units = len(_mtimes(out, "_markers/frames/*.json"))
    assert units > 1
    assert _summary(stack, run_id)["frames"] == {"done": units, "skipped": 0, "failed": 0,
                                                 "ok": len(ok), "rejected": len(rejected)}

    before = _mtimes(out, "frames/*.jpg") | _mtimes(out, "_markers/frames/*.json")
    rerun_id, r = _run_deployment(stack, params)
    assert r.returncode == 0 and rerun_id != run_id, r.stdout + r.stderr
    assert _summary(stack, rerun_id)["frames"]["skipped"] == units
    assert _summary(stack, rerun_id)["frames"]["done"] == 0
    assert _mtimes(out, "frames/*.jpg") | _mtimes(out, "_markers/frames/*.json") == before


def is_flow_run_process(proc: psutil.Process) -> bool:
    try:
        return "prefect.engine" in " ".join(proc.cmdline())
    except psutil.Error:  # a short-lived child of the worker that just exited (a zombie) or is gone
        return False


def _flow_run_processes(stack: PrefectStack) -> list[psutil.Process]:
    worker = psutil.Process(stack.procs["worker"].pid)
    return [p for p in worker.children(recursive=True) if is_flow_run_process(p)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crashed_run_resumes_from_markers_when_retried(stack, tmp_path):
    """The flow-run process is killed mid-stage (an OOM kill, a preempted machine): Prefect marks the
    run Crashed, and `prefect flow-run retry` runs the same flow run again: the finished units are
    skipped, the rest are done, and the manifest equals an uninterrupted build's byte for byte.
    (The process is frozen with SIGSTOP as soon as the first unit's marker appears, so the kill
    lands mid-stage; a FIFO posing as a video no longer hangs a unit: frames rejects it.)"""
    from pab_build.fixtures.sample_oops import write_sample_oops
    from pab_build.engine.pipeline import get_stage
    from pab_build.engine.units import Context, run_stage

    oops_root = tmp_path / "oops"
    write_sample_oops(str(oops_root), seed=0)
    overrides = EXTRA_OVERRIDES + [f"oops.root={oops_root}", "frames.clips_per_unit=1", "run.max_workers=1"]

    ref = tmp_path / "reference"  # the same build, uninterrupted, in-process
    run_stage(Context.create(load_config("smoke", overrides), str(ref)), get_stage("frames"))
    units = len(_mtimes(ref, "_markers/frames/*.json"))
    assert units >= 3

    out = tmp_path / "out"
    run_id, r = _run_deployment(stack, {"out": str(out), "until": UNTIL, "overrides": overrides}, watch=False)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 180
    while not _mtimes(out, "_markers/frames/*.json"):
        assert time.monotonic() < deadline, stack.log_tail("worker")
        assert stack.flow_run(run_id)["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), stack.log_tail("worker")
        time.sleep(0.01)
    engines = _flow_run_processes(stack)
    assert len(engines) == 1, engines
    engines[0].suspend()  # frozen mid-stage: no unit finishes from here on
    markers_before = _mtimes(out, "_markers/frames/*.json")
    assert 1 <= len(markers_before) < units, (len(markers_before), units)
    assert not (out / "manifests" / "frames.parquet").exists()
    engines[0].kill()
    stack.wait_state(run_id, {"CRASHED", "FAILED"}, timeout=60)
    # the runner and the worker each report the crash (Prefect 3.9), about 1.5 s apart: a retry
    # in between would be overwritten by the second report
    stack.wait_settled(run_id, quiet_s=5, timeout=60)
    crashed = stack.flow_run(run_id)
    assert crashed["state_type"] == "CRASHED", crashed["state"]

    r = stack.cli("flow-run", "retry", run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    done = stack.wait_state(run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=150)
    assert done["state_type"] == "COMPLETED" and done["run_count"] == 2, stack.log_tail("worker")

    assert _summary(stack, run_id)["frames"]["skipped"] == len(markers_before)
    assert _summary(stack, run_id)["frames"]["done"] == units - len(markers_before)
    markers_after = _mtimes(out, "_markers/frames/*.json")
    assert len(markers_after) == units
    assert {k: markers_after[k] for k in markers_before} == markers_before  # finished units untouched
    assert (out / "manifests/frames.parquet").read_bytes() == (ref / "manifests/frames.parquet").read_bytes()


def _training_runs(stack: PrefectStack, out: str) -> dict[str, list[dict]]:
    """train-cmp runs for the build ``out``, by deployment."""
    runs = {}
    for name in ("train-cmp/smoke", "train-cmp/full"):
        dep = stack.get(f"/deployments/name/{name}")
        runs[name] = [run for run in stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
                      if run["parameters"].get("build_out") == out]
    return runs


def _emit_published(stack: PrefectStack, url: str, out: str, profile: str) -> None:
    emit = ("from flows.events import emit_shards_published\n"
            "from prefect.events.worker import EventsWorker\n"
            f"event = emit_shards_published({url!r}, b'{{\"splits\": {{}}}}', {out!r}, {profile!r})\n"
            "assert event is not None, 'no events client'\n"
            "EventsWorker.drain_all()\n")
    r = subprocess.run([sys.executable, "-c", emit], cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_publish_starts_train_cmp_full_only_on_the_gpu_pool(stack, tmp_path):
    """The event build-pab's publish step emits (flows/events.py) for a full build fires train-cmp/full's
    deployment trigger, and only that one: a train-cmp run with the build's profile, OUT and shards URL,
    in the GPU pool."""
    url, out = f"s3://bucket/pab-{tmp_path.name}", str(tmp_path / "out")
    _emit_published(stack, url, out, "full")
    deadline = time.monotonic() + 120
    while not (runs := _training_runs(stack, out))["train-cmp/full"]:
        assert time.monotonic() < deadline, f"no train-cmp run for {url}:\n{stack.log_tail('server')}"
        time.sleep(1)
    (run,) = runs["train-cmp/full"]
    assert run["parameters"] == {"profile": "full", "build_out": out, "shards": url, "out": out, "overrides": []}
    assert run["work_pool_name"] == GPU_POOL
    import hashlib

    while not (payloads := [e["payload"] for e in stack.post("/events/filter", {
            "filter": {"event": {"name": ["pab.shards.published"]}}})["events"] if e["payload"]["url"] == url]):
        assert time.monotonic() < deadline, "the event was not stored"  # the server persists events in batches
        time.sleep(1)
    (payload,) = payloads
    assert payload["index_sha256"] == hashlib.sha256(b'{"splits": {}}').hexdigest()
    time.sleep(3)  # triggers act within a second or so: the smoke trigger had its chance
    assert _training_runs(stack, out)["train-cmp/smoke"] == []
    # the trigger `prefect deploy` made is what a publishing full build sees: it then trains no CMP itself
    for profile, name in (("full", "train-cmp/full"), ("smoke", "train-cmp/smoke")):
        r = subprocess.run([sys.executable, "-c", f"from flows.events import downstream_training as d; print(d({profile!r}))"],
                           cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() not in ("", "None"), r.stdout + r.stderr
        (automation,) = [a for a in stack.post("/automations/filter", {}) if a["name"] == r.stdout.strip()]
        assert automation["actions"][0]["deployment_id"] == stack.get(f"/deployments/name/{name}")["id"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_smoke_build_that_publishes_trains_smoke_cmp_once_on_the_cpu_pool(stack, real_build, tiny_models_dir,
                                                                          sample_oops_root, tmp_path):
    """With every deployment of prefect.yaml and its triggers installed, a smoke build with publish_url
    starts exactly one training run: train-cmp/smoke, profile smoke, the build's OUT and overrides, on
    the CPU pool, where it completes. train-cmp/full is never started. (The build is a copy of the
    session's finished smoke build with the same configuration, so its stages skip their units.)"""
    out, dest = tmp_path / "out", tmp_path / "published"
    shutil.copytree(real_build, out)
    overrides = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
                 "fixtures.build_sample_oops=false", f"oops.root={sample_oops_root}"]
    params = {"out": str(out), "overrides": overrides, "publish_url": str(dest)}
    r = stack.cli("deployment", "run", "build-pab/smoke", "--params", json.dumps(params), "--watch",
                  "--watch-timeout", "420", timeout=450)
    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert m and r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + stack.log_tail("worker")
    summary = _summary(stack, m.group(1))
    assert summary["publish"]["ok"] and summary["cmp"] == {"trained_by": "smoke__automation_1"}, summary

    deadline = time.monotonic() + 120
    while not (runs := _training_runs(stack, str(out)))["train-cmp/smoke"]:
        assert time.monotonic() < deadline, f"no train-cmp/smoke run:\n{stack.log_tail('server')}"
        time.sleep(1)
    (run,) = runs["train-cmp/smoke"]
    assert run["parameters"] == {"profile": "smoke", "build_out": str(out), "shards": str(dest), "out": str(out),
                                 "overrides": overrides}
    assert run["work_pool_name"] == CPU_POOL
    done = stack.wait_state(run["id"], {"COMPLETED", "FAILED", "CRASHED"}, timeout=400)
    assert done["state_type"] == "COMPLETED", stack.log_tail("worker")
    assert (out / "cmp" / "eval.json").is_file()
    runs = _training_runs(stack, str(out))
    assert len(runs["train-cmp/smoke"]) == 1 and runs["train-cmp/full"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pab_build_log_lines_reach_the_runs_logs_on_the_server(stack, tiny_model, models_dir, tmp_path):
    """A deployment run's flow process is a worker's subprocess, not `pab`: only the work pool's job
    variables (PREFECT_LOGGING_EXTRA_LOGGERS) and the flows' own logger level bring pab_build's
    lines (here the pose stage's model load) into the run's logs, which the UI shows."""
    tiny_model("openpose")
    params = {"out": str(tmp_path / "out"), "until": "pose",
              "overrides": [f"fixtures.models_dir={models_dir}", "fixtures.build_tiny_models=false",
                            f"fixtures.sample_oops_dir={tmp_path / 'sample-oops'}"]}
    run_id, r = _run_deployment(stack, params)
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + stack.log_tail("worker")
    # the model loads in a unit task of the stage-pose subflow: its logs carry the subflow's id
    runs = [run_id] + [run["id"] for run in stack.post("/flow_runs/filter", {
        "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})]
    assert len(runs) == 3, runs  # stage-frames and stage-pose
    body = {"logs": {"flow_run_id": {"any_": runs}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    deadline = time.monotonic() + 30  # logs reach the server in batches, possibly after the final state
    while not (loads := [e for e in stack.post("/logs/filter", body) if e["name"] == "pab_build.models.loading"
                         and e["message"].startswith("loaded model ")]):
        assert time.monotonic() < deadline, [(e["name"], e["message"][:80]) for e in stack.post("/logs/filter", body)]
        time.sleep(0.5)
    assert loads[0]["level"] == logging.INFO and loads[0]["flow_run_id"] != run_id
    # the stage's progress lines (the CLI keeps them off its terminal) are in the UI's logs
    lines = [e["message"] for e in stack.post("/logs/filter", body)]
    assert any(re.fullmatch(r"pose: (\d+)/\1 units, rows \d+ ok / \d+ rejected, 0 failed, .* ETA done", m)
               for m in lines), lines
