"""Crash-proof resumption: SIGKILL the whole build (process group: flow, tasks, Prefect server) at
seeded random points inside generation, captioning, attributes and sharding, rerun it each time,
and compare the final manifests and shards with an uninterrupted build: same keys, no duplicates,
no loss, identical bytes."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pab_build.manifests import read_manifest
from pab_build.engine.pipeline import STAGE_ORDER
from pab_build.store import Store

pytestmark = pytest.mark.slow

# (stage, what must exist before the kill timer starts)
KILL_POINTS = [
    ("generate", "marker"),  # between / inside generation units
    ("generate", "marker"),
    ("train_captions", "cache"),  # a unit half answered: its answer cache has a batch
    ("train_attributes", "cache"),
    ("train_shards", "unit"),  # while shards are written
]


def _pab_run(out: str, overrides: list[str], log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", out, "--no-cmp"]
    for o in overrides:
        cmd += ["--set", o]
    # Prefect's temporary server gets 20 s to start by default: too few on a loaded 2-core CI machine
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _tail(log_path, n: int = 3000) -> str:
    return open(log_path, "rb").read()[-n:].decode(errors="replace")


def _reached(out: str, stage: str, what: str) -> bool:
    folder = {"marker": f"_markers/{stage}", "cache": f"_cache/{stage}", "unit": f"_units/{stage}"}[what]
    path = os.path.join(out, folder)
    if not os.path.isdir(path):
        return False
    return any(files for _, _, files in os.walk(path))


def _content(out: str) -> dict[str, bytes]:
    found = {}
    for sub in ("manifests", "shards"):
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                if not f.startswith("."):
                    p = os.path.join(dirpath, f)
                    found[os.path.relpath(p, out)] = open(p, "rb").read()
    return found


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, tiny_models_dir, sample_oops_root):
    overrides = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
                 f"oops.root={sample_oops_root}"]
    ref = str(tmp_path / "ref")
    proc = _pab_run(ref, overrides, tmp_path / "ref.log")
    assert proc.wait(timeout=900) == 0, _tail(tmp_path / "ref.log")
    assert os.path.exists(os.path.join(ref, "shards", "index.json"))

    out = str(tmp_path / "killed")
    rng = random.Random(20261129)
    kills = 0
    for i, (stage, what) in enumerate(KILL_POINTS):
        log = tmp_path / f"run-{i}.log"
        proc = _pab_run(out, overrides, log)
        deadline = time.time() + 600
        while not _reached(out, stage, what) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        else:  # a run that ends by itself before its kill point must at least have succeeded
            assert proc.returncode == 0, \
                f"the run meant to die in {stage} failed on its own (rc={proc.returncode}):\n{_tail(log)}"
    assert kills >= 5, f"only {kills} kills landed before the build finished"
    proc = _pab_run(out, overrides, tmp_path / "resume.log")
    assert proc.wait(timeout=900) == 0, _tail(tmp_path / "resume.log")

    a, b = _content(ref), _content(out)
    assert sorted(a) == sorted(b)
    for stage in STAGE_ORDER:
        keys = [r["sample_key"] for r in read_manifest(Store(out), stage)]
        assert len(keys) == len(set(keys)), stage
    assert [k for k in a if a[k] != b[k]] == []
