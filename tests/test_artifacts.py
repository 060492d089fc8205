"""Prefect artifacts are keyed by build (two builds never share a key), the parent run carries a
build-level progress artifact, and every work pool forwards pab_build's log lines."""

from __future__ import annotations

import re

import pytest
import yaml

from flows.artifacts import build_artifact_key
from pab_build.config import REPO_ROOT


def test_keys_name_the_build_and_follow_prefects_rule():
    a, b = build_artifact_key("build-summary", "s3://bucket/PAB_v2/"), build_artifact_key("build-summary", "/data/pab_v2")
    assert a.startswith("build-summary-pab-v2-") and b.startswith("build-summary-pab-v2-") and a != b
    for key in (a, b, build_artifact_key("progress-train_shards", "out/smoke")):
        assert re.fullmatch(r"[a-z0-9-]+", key), key
    assert build_artifact_key("progress-train_shards", "out/smoke").startswith("progress-train-shards-smoke-")


def test_every_work_pool_forwards_pab_build_logs():
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        env = dep["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "pab_build", dep["name"]


@pytest.mark.slow
def test_a_build_run_keys_its_artifacts_and_reports_build_progress(sample_oops_root, models_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_pab import build_pab

    out = str(tmp_path / "out")
    overrides = [f"fixtures.models_dir={models_dir}", "fixtures.build_tiny_models=false", f"oops.root={sample_oops_root}"]
    with prefect_test_harness(server_startup_timeout=120):
        build_pab(profile="smoke", out=out, overrides=overrides, until="frames")

        async def latest(key: str):
            async with get_client() as client:
                found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                return found

        import asyncio

        summary = asyncio.run(latest(build_artifact_key("build-summary", out)))
        progress = asyncio.run(latest(build_artifact_key("build-progress", out)))
        stage = asyncio.run(latest(build_artifact_key("progress-frames", out)))
    assert len(summary) == 1 and "frames" in summary[0].data
    assert len(progress) == 1 and progress[0].type == "progress" and float(progress[0].data) == 100.0
    assert len(stage) == 1 and float(stage[0].data) == 100.0
    assert progress[0].flow_run_id != stage[0].flow_run_id  # on the parent run, not the stage's


@pytest.mark.parametrize("entrypoint", ["flows/build_pab.py:build_pab", "flows/train_cmp.py:train_cmp_flow"])
def test_a_worker_started_flow_forwards_pab_build_info_lines(entrypoint):
    """As a worker's flow-run process does (the pool's env, the flow loaded from its entrypoint,
    no `pab` CLI): pab_build's INFO lines (model loads, CMP metrics) pass the logger's level and
    reach Prefect's API handler. Prefect's root logger is at WARNING, so without the flows'
    own level only warnings would reach the UI."""
    import os
    import subprocess
    import sys

    code = ("import logging\n"
            "from prefect.flows import load_flow_from_entrypoint\n"
            f"load_flow_from_entrypoint({entrypoint!r})\n"
            "for name in ('pab_build.models.loading', 'pab_build.cmp.evaluate'):\n"
            "    assert logging.getLogger(name).isEnabledFor(logging.INFO), name\n"
            "handlers = [type(h).__name__ for h in logging.getLogger('pab_build').handlers]\n"
            "assert 'APILogHandler' in handlers, handlers\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_LOGGING_EXTRA_LOGGERS"] = "pab_build"  # the work pools' job variables (test above)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
