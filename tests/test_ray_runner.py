"""The smoke build on a local Ray cluster (prefect-ray) gives the same manifests and shards as the
default thread runner, and each model loads at most once per Ray worker process."""

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = pytest.mark.slow


def _build(out: str, runner: str, overrides: list[str]) -> str:
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", out, "--no-cmp", "--runner", runner]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _content(out: str) -> dict[str, bytes]:
    found = {}
    for sub in ("manifests", "shards"):
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                p = os.path.join(dirpath, f)
                found[os.path.relpath(p, out)] = open(p, "rb").read()
    return found


def test_ray_runner_matches_thread_runner(tmp_path, tiny_models_dir, sample_oops_root):
    pytest.importorskip("prefect_ray")
    overrides = [f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false",
                 f"oops.root={sample_oops_root}"]
    threads = str(tmp_path / "threads")
    ray_out = str(tmp_path / "ray")
    _build(threads, "threads", overrides)
    log = _build(ray_out, "ray", overrides)
    a, b = _content(threads), _content(ray_out)
    assert sorted(a) == sorted(b) and any(k.startswith("manifests/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    # "loaded model <name> in process <pid>" is logged once per load; Ray workers are reused
    loads = Counter(re.findall(r"loaded model (\w+) in process (\d+)", log))
    assert loads, "no model loads were logged from the Ray workers"
    assert max(loads.values()) == 1, loads
