"""Prefect flow ``train-cmp``: train CMP on a build's shards, evaluate it on the test shards, and
publish the metrics (table artifact) and the top-5 figure (markdown artifact). Orchestration
only: the work is :func:`pab_build.cmp.train.train_cmp` and :func:`pab_build.cmp.evaluate.evaluate_cmp`."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.artifacts import build_artifact_key
from pab_build.config import PABConfig
from pab_build.model_lock import locked_config
from pab_build.redact import refuse_stored_credentials


@task(name="train-cmp-model", cache_policy=NO_CACHE)
def train_task(cfg: PABConfig, shards: str, out: str, resume: bool | str) -> dict[str, Any]:
    # the training is its own resumable unit (skipped when finished, resumed when interrupted)
    from pab_build.cmp.train import train_cmp

    return train_cmp(cfg, shards, out, resume=resume)


@task(name="evaluate-cmp", cache_policy=NO_CACHE)
def evaluate_task(cfg: PABConfig, checkpoint: str | None, shards: str, out: str) -> dict[str, Any]:
    from pab_build.cmp.evaluate import evaluate_cmp

    return evaluate_cmp(cfg, checkpoint, shards, out)


@flow(name="train-cmp", log_prints=True)
def train_cmp_flow(
    profile: str = "smoke",
    build_out: str | None = None,
    shards: str | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
    resume: bool | str = "auto",
) -> dict[str, Any]:
    """``shards``: a build's OUT dir or a published URL (default ``build_out``); ``out``: where
    ``cmp/`` goes (default ``build_out``); ``resume``: "auto" = skip a finished training of the same
    shards and config, resume an interrupted one; False = from step 0; or a checkpoint folder.
    The evaluation reruns only when its inputs (weights, test shards, config) changed."""
    refuse_stored_credentials(overrides, shards=shards)
    shards, out = shards or build_out, out or build_out
    if not shards or not out:
        raise ValueError("train-cmp needs build_out, or both shards and out")
    cfg = locked_config(profile, overrides or [])
    logger = get_run_logger()
    trained = train_task(cfg, shards, out, resume)
    logger.info("%s %d steps; checkpoint %s", "skipped (already trained)" if trained.get("skipped") else "trained",
                trained["steps"], trained["checkpoint"])
    metrics = evaluate_task(cfg, trained["checkpoint"], shards, out)
    rows = [{"setting": s, **{k: round(v, 2) for k, v in metrics[s].items()}} for s in ("behavior", "identity")]
    create_table_artifact(rows, key=build_artifact_key("cmp-eval", out),
                          description=f"CMP text-to-image retrieval on the PAB test shards of {out} (%)")
    figure = metrics.get("figure")
    create_markdown_artifact(
        f"# CMP evaluation\n\ncheckpoint: `{trained['checkpoint']}`\n\n"
        f"metrics: `{metrics['eval_json']}`\n\ntop-5 results (green = exact image, blue = same identity, "
        f"red = other): [{figure}]({figure})\n",
        key=build_artifact_key("cmp-figure", out), description=f"CMP top-5 retrieval examples of {out}")
    return {"train": {k: v for k, v in trained.items() if k != "losses"},
            "eval": {s: metrics[s] for s in ("behavior", "identity")}}
