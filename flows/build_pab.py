"""Prefect orchestration of a PAB build: the parent flow ``build-pab`` and one subflow per stage.

Only orchestration lives here: retries, fan-out over units, logging, pause for human review,
artifacts. The work itself is ``pab_build.units.execute_unit`` over a stage from
``pab_build.pipeline``; markers on disk, not Prefect's cache, decide what is already done.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.artifacts import build_artifact_key
from flows.dispatch import Progress, dispatch_units, quiet_task_logs, unit_submitter, window_size
from pab_build.config import PABConfig, load_config
from pab_build.pipeline import get_stage, stages_until
from pab_build.prepare import prepare_build
from pab_build.progress import StageReporter
from pab_build.redact import redact, redact_url, secret_overrides_from_env
from pab_build.units import (
    Context,
    Unit,
    execute_unit,
    finalize_stage,
    record_failed_unit,
    status_counts,
)

# the library logs through `logging` (model loads, ...); Prefect forwards the `pab_build` logger into
# run logs when PREFECT_LOGGING_EXTRA_LOGGERS=pab_build (the `pab` CLI sets it)
logging.getLogger("pab_build").setLevel(logging.INFO)


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(cfg: PABConfig, out: str) -> None:
    prepare_build(cfg, out)


@task(name="unit", cache_policy=NO_CACHE)
def run_unit_task(cfg: PABConfig, out: str, stage_name: str, unit: Unit) -> str:
    """One unit of one stage; Prefect retries it (config: run.unit_retries) when it raises."""
    return execute_unit(Context.create(cfg, out), get_stage(stage_name), unit)


def _task_runner(cfg: PABConfig):
    if cfg.run.task_runner == "ray":
        from prefect_ray import (
            RayTaskRunner,  # optional extra: pip install 'pab-build[ray]'
        )

        init_kwargs = {"address": cfg.run.ray_address} if cfg.run.ray_address else {}
        return RayTaskRunner(init_kwargs=init_kwargs)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=cfg.run.max_workers)


def _ray_resources(cfg: PABConfig, uses_gpu: bool):
    """On Ray, units of GPU stages ask for ``run.gpus_per_unit`` GPUs when the build runs on CUDA
    (on a CPU build a GPU request could never be met and the units would wait forever); every unit
    asks for ``run.cpus_per_unit`` CPUs."""
    if cfg.run.task_runner != "ray":
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    wants_gpu = uses_gpu and cfg.run.device.startswith("cuda")
    return remote_options(num_cpus=cfg.run.cpus_per_unit, num_gpus=cfg.run.gpus_per_unit if wants_gpu else 0)


def run_stage_units(cfg: PABConfig, out: str, stage_name: str) -> dict[str, int]:
    """Plan a stage's units, fan them out as tasks, record units that failed after their retries,
    then write the stage manifest. Runs inside a (sub)flow."""
    logger = get_run_logger()
    ctx = Context.create(cfg, out)
    stage = get_stage(stage_name)
    units = stage.plan_units(ctx)
    logger.info("%s: %d units", stage_name, len(units))
    progress = create_progress_artifact(0.0, key=build_artifact_key(f"progress-{stage_name}", out),
                                        description=f"{stage_name}: units finished (%) of {out}")
    reporter = StageReporter(ctx.store, stage_name, len(units))  # the CLI's live display listens
    unit_task = run_unit_task.with_options(
        name=f"{stage_name}-unit",
        retries=cfg.run.unit_retries,
        retry_delay_seconds=cfg.run.retry_delay_s,
        tags=["gpu"] if stage.uses_gpu else ["cpu"],
    )
    counts = {"done": 0, "skipped": 0, "failed": 0}
    tracker = Progress(stage_name, len(units), logger.info,
                       on_update=lambda done, total: update_progress_artifact(progress, 100.0 * done / total))

    def on_done(unit: Unit, fut) -> None:
        if fut.state.is_completed():
            outcome = fut.result()
        else:
            err = fut.result(raise_on_failure=False)
            logger.warning("%s unit %s failed after retries: %s", stage_name, unit.unit_id, err)
            record_failed_unit(ctx, stage, unit, err if isinstance(err, BaseException) else str(err))
            outcome = "failed"
        counts[outcome] += 1
        reporter.unit_finished(unit.unit_id, outcome)
        tracker.advance(str(counts))

    with _ray_resources(cfg, stage.uses_gpu), quiet_task_logs(not cfg.run.log_unit_runs), \
            unit_submitter(cfg, out, stage_name, stage.uses_gpu, unit_task, logger.info) as submit:
        dispatch_units(submit, units, window_size(cfg.run.max_workers), on_done)
    rows = finalize_stage(ctx, stage, units)
    reporter.stage_finished()
    result = {**counts, **status_counts(rows)}
    logger.info("%s finished: %s", stage_name, result)
    return result


@flow(name="stage", log_prints=True)
def stage_flow(cfg: PABConfig, out: str, stage_name: str) -> dict[str, int]:
    return run_stage_units(cfg, out, stage_name)


def _wait_for_review(cfg: PABConfig, out: str) -> PABConfig:
    """``review.policy = wait``: write the review sheet, pause until reviewers' decision files are
    given through the Prefect UI/API, then continue with them."""
    from prefect.flow_runs import pause_flow_run
    from prefect.input import RunInput

    from pab_build.stages import review

    class ReviewDecisions(RunInput):
        decisions_files: list[str]

    ctx = Context.create(cfg, out)
    if review.decisions_ready(cfg.review.decisions_files):
        return cfg
    sheet, template = review.export_review_sheet(ctx, review.plan_review_items(ctx))
    get_run_logger().info("review page: open %s/%s in a browser and download the decisions (or fill in %s); "
                          "resume the flow run with the file paths", out, sheet, template)
    given = pause_flow_run(wait_for_input=ReviewDecisions, timeout=cfg.review.wait_timeout_s)
    # model_copy, not a JSON round trip: the JSON form of the config has its credentials redacted
    return cfg.model_copy(update={"review": cfg.review.model_copy(update={"decisions_files": given.decisions_files})})


@flow(name="build-pab", log_prints=True)
def build_pab(
    profile: str = "smoke",
    out: str = "out/smoke",
    overrides: list[str] | None = None,
    until: str | None = None,
    publish_url: str | None = None,
    train_cmp: bool | None = None,
) -> dict[str, Any]:
    """Build PAB: test set, training set, release; optionally publish and train CMP after.

    ``overrides`` are ``dotted.key=value`` strings; ``until`` stops after that stage. Parameters are
    stored by Prefect: ``publish_url`` must hold no credential (use the environment or
    ``publish.credentials_block``; ``pab run --publish`` passes its URL through the environment).
    """
    if publish_url and redact_url(publish_url) != publish_url:
        raise ValueError("publish_url holds a password: flow-run parameters are stored in Prefect's database; "
                         "give credentials through the environment or publish.credentials_block")
    # overrides that may hold credentials come from the environment (`pab run` puts them there)
    cfg = load_config(profile, (overrides or []) + secret_overrides_from_env())
    logger = get_run_logger()
    prepare_task(cfg, out)
    summary: dict[str, Any] = {}
    stages = stages_until(until)
    build_progress = create_progress_artifact(0.0, key=build_artifact_key("build-progress", out),
                                              description=f"stages finished (%) of {out}")
    for name in stages:
        if name == "review" and cfg.review.policy == "wait":
            cfg = _wait_for_review(cfg, out)
        summary[name] = stage_flow.with_options(name=f"stage-{name}", task_runner=_task_runner(cfg))(
            cfg, out, name
        )
        update_progress_artifact(build_progress, 100.0 * len(summary) / len(stages))
    create_table_artifact(
        [{"stage": k, **v} for k, v in summary.items()], key=build_artifact_key("build-summary", out),
        description=f"units and rows per stage of {out}",
    )
    if until is None:
        summary["release"] = release_task(cfg, out)
        if publish_url or cfg.publish.url:
            summary["publish"] = publish_task(cfg, out, publish_url or cfg.publish.url)
        if cfg.cmp.train_after_build if train_cmp is None else train_cmp:
            from flows.train_cmp import train_cmp_flow

            summary["cmp"] = train_cmp_flow(profile=profile, build_out=out, overrides=overrides or [])
    logger.info("build summary: %s", redact(summary))
    return summary


@task(name="release", cache_policy=NO_CACHE)
def release_task(cfg: PABConfig, out: str) -> dict[str, Any]:
    from pab_build.release.card import write_dataset_card

    return {"card": write_dataset_card(out)}


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(cfg: PABConfig, out: str, url: str) -> dict[str, Any]:
    from pab_build.release.publish import publish

    options = dict(cfg.publish.storage_options)
    if cfg.publish.credentials_block:
        # a Prefect Secret block holding a JSON object of fsspec storage options, e.g. {"key": .., "secret": ..}
        from prefect.blocks.system import Secret

        options.update(Secret.load(cfg.publish.credentials_block).get())
    report = publish(out, url, storage_options=options, force=cfg.publish.force, delete=cfg.publish.delete)
    ok = bool(getattr(report, "ok", True))
    if ok:  # downstream training (train-cmp/full's deployment trigger) starts on this event
        from flows.events import emit_shards_published
        from pab_build.shard_index import INDEX_REL
        from pab_build.store import Store

        emit_shards_published(report.url, Store(out).read_bytes(INDEX_REL), out, cfg.profile)
    return {"url": report.url, "ok": ok}  # report.url: credentials scrubbed
