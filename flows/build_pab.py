"""Prefect orchestration of a PAB build: the parent flow ``build-pab`` and one subflow per stage.

Only orchestration lives here: retries, fan-out over units, logging, pause for human review,
artifacts. The work itself is ``pab_build.engine.units.execute_unit`` over a stage from
``pab_build.engine.pipeline``; markers on disk, not Prefect's cache, decide what is already done.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.artifacts import build_artifact_key
from flows.dispatch import ProgressLog, dispatch_units, quiet_task_logs, unit_submitter, window_size
from pab_build.engine.build_lock import hold_build_lock
from pab_build.engine.build_outcome import BuildFailed, StageFailed, StageFailures, stage_failures
from pab_build.config import PABConfig, qc_settings
from pab_build.model_lock import locked_config
from pab_build.engine.pipeline import TEST_BRANCH, TRAINING_BRANCH, get_stage, stages_until
from pab_build.engine.prepare import prepare_build
from pab_build.engine.progress import StageReporter
from pab_build.redact import redact, refuse_stored_credentials, secret_overrides_from_env
from pab_build.engine.units import (
    Context,
    Unit,
    execute_unit,
    finalize_stage,
    record_failed_unit,
    status_counts,
)

@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(cfg: PABConfig, out: str) -> None:
    prepare_build(cfg, out)


@task(name="unit", cache_policy=NO_CACHE)
def run_unit_task(cfg: PABConfig, out: str, stage_name: str, unit: Unit) -> str:
    """One unit of one stage; Prefect retries it (config: run.unit_retries) when it raises."""
    return execute_unit(Context.create(cfg, out), get_stage(stage_name), unit)


def _workers(cfg: PABConfig) -> int:
    """Unit task runs in flight at once: ``run.max_workers`` threads, or on Ray as many as the
    cluster holds actors (each of those threads only waits on its actor)."""
    if cfg.run.task_runner == "ray":
        from pab_build.engine.ray_cluster import cluster_slots

        return max(cfg.run.max_workers, cluster_slots(cfg))
    return cfg.run.max_workers


def _task_runner(cfg: PABConfig):
    """Threads on the driver, also with Ray: a unit's task run is recorded here, on the flow's
    server, and hands the unit to the stage's Ray actors (flows.dispatch.unit_submitter)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=_workers(cfg))


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
    unit_task = run_unit_task.with_options(
        name=f"{stage_name}-unit",
        retries=cfg.run.unit_retries,
        retry_delay_seconds=cfg.run.retry_delay_s,
        tags=["gpu"] if stage.uses_gpu else ["cpu"],
    )
    counts = {"done": 0, "skipped": 0, "failed": 0}
    # one stream of progress events: the CLI's live display listens on its logger, the run's log
    # lines and progress artifact (the UI) are made from it here
    reporter = StageReporter(ctx.store, stage_name, len(units),
                             listener=ProgressLog(_BUILD_LOG.get() or logger,
                                                  on_update=lambda pct: update_progress_artifact(progress, pct)))

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

    with quiet_task_logs(not cfg.run.log_unit_runs), \
            unit_submitter(cfg, out, stage_name, stage.uses_gpu, unit_task, logger.info) as submit:
        dispatch_units(submit, units, window_size(_workers(cfg)), on_done)
    rows = finalize_stage(ctx, stage, units)
    reporter.stage_finished()
    result = {**counts, **status_counts(rows)}
    logger.info("%s finished: %s", stage_name, result)
    return result


@flow(name="stage", log_prints=True)
def stage_flow(cfg: PABConfig, out: str, stage_name: str) -> dict[str, int]:
    """One stage; ends Failed (raising :class:`StageFailed`) when more units failed after their
    retries than ``run.max_failed_units`` allows."""
    counts = run_stage_units(cfg, out, stage_name)
    failures = stage_failures(Context.create(cfg, out).store, stage_name, counts, cfg.run.max_failed_units)
    if failures.over_limit:
        raise StageFailed(failures)
    if failures.failed:
        get_run_logger().warning("%s (accepted)", failures.line())
    return counts


@flow(name="wait-for-files")
def wait_for_files_flow(what: str, timeout_s: int) -> list[str]:
    """Pause (this subflow only: the rest of the build goes on) until people give file paths
    through the Prefect UI/API (``resume_flow_run(id, run_input={"files": [...]})``)."""
    from prefect.flow_runs import pause_flow_run
    from prefect.input import RunInput

    class GivenFiles(RunInput):
        files: list[str]

    get_run_logger().info("waiting for %s: resume this flow run with their paths", what)
    return pause_flow_run(wait_for_input=GivenFiles, timeout=timeout_s).files


def _wait_for_review(cfg: PABConfig, out: str) -> PABConfig:
    """``review.policy = wait``: write the review sheet, pause until reviewers' decision files are
    given, then continue with them. Nothing to review: no pause."""
    from pab_build.stages import review

    ctx = Context.create(cfg, out)
    if review.decisions_ready(cfg.review.decisions_files):
        return cfg
    items = review.plan_review_items(ctx)
    if not items:
        get_run_logger().info("review: no pair survived the automatic filters, nothing to review")
        return cfg
    sheet, template = review.export_review_sheet(ctx, items)
    get_run_logger().info("review page: open %s/%s in a browser and download the decisions (or fill in %s); "
                          "resume the paused review-wait run with the file paths", out, sheet, template)
    files = wait_for_files_flow.with_options(flow_run_name="review-wait")("reviewers' decision files",
                                                                 cfg.review.wait_timeout_s)
    return _with(cfg, {"review.decisions_files": files})


def _wait_for_caption_qc(cfg: PABConfig, out: str) -> PABConfig | None:
    """After ``test_captions`` with ``qc.policy = wait``: pause for caption correction files, then
    return the config to rerun the stage with (None: nothing to wait for)."""
    from pab_build.manifests import read_manifest

    policy, files = qc_settings(cfg)
    if policy != "wait" or (files and review_files_ready(files)):
        return None
    if not any(r["status"] == "ok" for r in read_manifest(Context.create(cfg, out).store, "test_captions")):
        return None
    get_run_logger().info("caption QC: page %s/review/captions.html; resume the paused caption-qc-wait run "
                          "with the correction files", out)
    given = wait_for_files_flow.with_options(flow_run_name="caption-qc-wait")("caption correction files",
                                                                     cfg.qc.wait_timeout_s)
    return _with(cfg, {"qc.files": given})


def review_files_ready(paths: list[str]) -> bool:
    from pab_build.stages.review import decisions_ready

    return decisions_ready(paths)


def _with(cfg: PABConfig, changes: dict[str, Any]) -> PABConfig:
    """``cfg`` with ``section.field`` values changed; model_copy, not a JSON round trip: the JSON form
    of the config has its credentials redacted."""
    for key, value in changes.items():
        section, name = key.split(".")
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={name: value})})
    return cfg


# the parent run's logger: the stages' progress lines go there, so the build run's page and
# `prefect deployment run --watch` (which follows that run's own logs, no subflow's) show them
_BUILD_LOG: contextvars.ContextVar = contextvars.ContextVar("pab_build_log", default=None)
# called with a stage's name when it finished (the build-level progress artifact); set per build
_STAGE_FINISHED: contextvars.ContextVar = contextvars.ContextVar("pab_stage_finished", default=None)


def _run_stage(cfg: PABConfig, out: str, name: str) -> dict[str, int]:
    result = stage_flow.with_options(name=f"stage-{name}", task_runner=_task_runner(cfg))(cfg, out, name)
    if (finished := _STAGE_FINISHED.get()) is not None:
        finished(name)
    return result


def _test_branch(cfg: PABConfig, out: str, names: list[str], outcome: BranchOutcome, pairs_done: threading.Event):
    """frames .. test_shards. Sets ``pairs_done`` once the training branch may plan its prompts
    (pairs finished, or the branch stopped before: then the training branch stops too)."""
    try:
        for name in names:
            if name == "review" and cfg.review.policy == "wait":
                cfg = _wait_for_review(cfg, out)
            if name == "test_captions":
                get_run_logger().info("test-caption QC policy: %s", qc_settings(cfg)[0])
            outcome.summary[name] = _run_stage(cfg, out, name)
            if name == "test_captions" and (qc_cfg := _wait_for_caption_qc(cfg, out)) is not None:
                cfg = qc_cfg
                outcome.summary[name] = _run_stage(cfg, out, name)
            if name == "pairs":
                outcome.pairs_ok = True
                pairs_done.set()
    except StageFailed as e:
        outcome.failures.append(e.failures)
    finally:
        pairs_done.set()


def _training_branch(cfg: PABConfig, out: str, names: list[str], outcome: BranchOutcome,
                     test: BranchOutcome, pairs_done: threading.Event):
    """prompts .. train_shards; ``prompts`` excludes the test candidates that survived the automatic
    filters, so with ``prompts.exclude_test_clips`` it starts once ``pairs`` is done, never after review."""
    if names and cfg.prompts.exclude_test_clips:
        pairs_done.wait()
        if not test.pairs_ok:
            outcome.other.append("training branch not started: prompts needs the pairs stage, which did not finish")
            return
    try:
        for name in names:
            outcome.summary[name] = _run_stage(cfg, out, name)
    except StageFailed as e:
        outcome.failures.append(e.failures)


@dataclass
class BranchOutcome:
    summary: dict[str, Any] = field(default_factory=dict)
    failures: list[StageFailures] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    pairs_ok: bool = False


def _run_branches(cfg: PABConfig, out: str, until: str | None,
                  build_progress=None) -> tuple[dict[str, Any], BuildFailed | None]:
    """The test and training branches at once, each stage a subflow of this flow run; the build's
    progress artifact (on this parent run) follows the stages that finished."""
    planned = stages_until(until)
    test_names = [n for n in TEST_BRANCH if n in planned]
    train_names = [n for n in TRAINING_BRANCH if n in planned]
    test, train, pairs_done = BranchOutcome(), BranchOutcome(), threading.Event()
    if "pairs" not in test_names:
        pairs_done.set()
        test.pairs_ok = True  # the training branch reads pairs from an earlier run, or not at all
    if build_progress is not None:
        finished: set[str] = set()
        guard = threading.Lock()

        def stage_finished(name: str) -> None:
            with guard:
                finished.add(name)
                update_progress_artifact(build_progress, 100.0 * len(finished) / max(1, len(planned)))

        _STAGE_FINISHED.set(stage_finished)
    # on Ray too: one Ray connection serves both branches (each stage has its own actors)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pab-branch")
    try:
        # each thread runs in a copy of this flow run's context, so the stages are its subflows
        futures = [pool.submit(contextvars.copy_context().run, _test_branch, cfg, out, test_names, test,
                               pairs_done),
                   pool.submit(contextvars.copy_context().run, _training_branch, cfg, out, train_names, train,
                               test, pairs_done)]
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C: never wait for a paused branch
    summary = {n: (test.summary | train.summary)[n] for n in planned if n in test.summary or n in train.summary}
    failures, other = test.failures + train.failures, test.other + train.other
    return summary, (BuildFailed(failures, other) if failures or other else None)


@flow(name="build-pab", log_prints=True)
def build_pab(
    profile: str = "smoke",
    out: str = "out/smoke",
    overrides: list[str] | None = None,
    until: str | None = None,
    publish_url: str | None = None,
    train_cmp: bool | None = None,
    skip_preflight: bool = False,
) -> dict[str, Any]:
    """Build PAB: test set and training set (two branches at once), release; optionally publish
    and train CMP after. Ends Failed, naming the stages, when units failed beyond
    ``run.max_failed_units``.

    ``overrides`` are ``dotted.key=value`` strings; ``until`` stops after that stage. Parameters are
    stored by Prefect: ``publish_url`` must hold no credential (use the environment or
    ``publish.credentials_block``; ``pab run --publish`` passes its URL through the environment).
    """
    refuse_stored_credentials(overrides, publish_url=publish_url)
    # overrides that may hold credentials come from the environment (`pab run` puts them there)
    cfg = locked_config(profile, (overrides or []) + secret_overrides_from_env())
    logger = get_run_logger()
    _BUILD_LOG.set(logger)
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # started by a worker: end with it, never as an orphan
        from flows.run_control import exit_with_parent

        exit_with_parent()
    with _ray_connection(cfg):
        return _build(cfg, profile, out, overrides, until, publish_url, train_cmp, skip_preflight)


@contextlib.contextmanager
def _ray_connection(cfg: PABConfig):
    """With ``task_runner: ray``: Ray started or joined once for the whole build (preflight and
    every stage reuse it); at the end this build's Ray job ends (its actors and workers with it)."""
    if cfg.run.task_runner != "ray":
        yield
        return
    from pab_build.engine.ray_cluster import connect, disconnect

    connect(cfg)
    try:
        yield
    finally:
        disconnect()


def _build(cfg: PABConfig, profile: str, out: str, overrides: list[str] | None, until: str | None,
           publish_url: str | None, train_cmp: bool | None, skip_preflight: bool) -> dict[str, Any]:
    logger = get_run_logger()
    if not skip_preflight:
        from pab_build.engine.preflight import PreflightFailed, format_table, run_checks

        wants_cmp = cfg.cmp.train_after_build if train_cmp is None else train_cmp
        rows = run_checks(_with(cfg, {"cmp.train_after_build": wants_cmp}), out, publish_url, until)
        logger.info("preflight:\n%s", format_table(rows))
        if any(r.problem for r in rows):
            raise PreflightFailed(rows)
    with hold_build_lock(out, heartbeat_s=cfg.run.lock_heartbeat_s, storage_options=cfg.publish.storage_options):
        prepare_task(cfg, out)
        build_progress = create_progress_artifact(0.0, key=build_artifact_key("build-progress", out),
                                                  description=f"stages finished (%) of {out}")
        summary, failed = _run_branches(cfg, out, until, build_progress)
        create_table_artifact(
            [{"stage": k, **v} for k, v in summary.items()], key=build_artifact_key("build-summary", out),
            description=f"units and rows per stage of {out}",
        )
        if failed is not None:
            logger.error("%s", failed)
            raise failed
        if until is None:
            summary["release"] = release_task(cfg, out)
            if publish_url or cfg.publish.url:
                summary["publish"] = publish_task(cfg, out, publish_url or cfg.publish.url, profile, overrides or [])
            if cfg.cmp.train_after_build if train_cmp is None else train_cmp:
                summary["cmp"] = _train_cmp_once(profile, out, overrides or [], summary.get("publish"), cfg.profile)
    logger.info("build summary: %s", redact(summary))
    return summary


def _train_cmp_once(profile: str, out: str, overrides: list[str], published: dict | None,
                    name: str | None = None) -> dict[str, Any]:
    """CMP is trained once per build: when the build published and an automation on this server
    reacts to this profile's publish event (train-cmp/<profile>'s deployment trigger), training is
    left to it. ``name``: the profile's name, the label the event carries (``profile`` may be a path);
    the flow passes its config's, other callers get it from the profile."""
    from flows.events import downstream_training

    if name is None:
        from pab_build.config import load_config

        name = load_config(profile, overrides).profile
    trigger = downstream_training(name) if published and published.get("ok") else None
    if trigger is not None:
        get_run_logger().info("CMP: not trained in this run: the publish event starts it (automation %r)", trigger)
        return {"trained_by": trigger}
    from flows.train_cmp import train_cmp_flow

    return train_cmp_flow(profile=profile, build_out=out, overrides=overrides)


@task(name="release", cache_policy=NO_CACHE)
def release_task(cfg: PABConfig, out: str) -> dict[str, Any]:
    from pab_build.release.card import write_dataset_card

    return {"card": write_dataset_card(out, cfg.publish.storage_options)}


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(cfg: PABConfig, out: str, url: str, profile: str | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    from pab_build.release.publish import publish

    options = dict(cfg.publish.storage_options)
    if cfg.publish.credentials_block:
        # a Prefect Secret block holding a JSON object of fsspec storage options, e.g. {"key": .., "secret": ..}
        from prefect.blocks.system import Secret

        options.update(Secret.load(cfg.publish.credentials_block).get())
    report = publish(out, url, storage_options=options, force=cfg.publish.force, delete=cfg.publish.delete,
                     out_options=cfg.publish.storage_options)
    ok = bool(getattr(report, "ok", True))
    if ok:  # downstream training (train-cmp/<profile>'s deployment trigger) starts on this event
        from flows.events import emit_shards_published
        from pab_build.shards.index import INDEX_REL
        from pab_build.store import out_store

        emit_shards_published(report.url, out_store(out, cfg.publish.storage_options).read_bytes(INDEX_REL), out, profile or cfg.profile,
                              cfg.profile, overrides)
    return {"url": report.url, "ok": ok}  # report.url: credentials scrubbed
