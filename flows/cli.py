"""``pab``: run a build, show its status, verify / export / publish its release.

The CLI never imports Prefect until a flow is run, so ``pab status`` and ``pab verify`` are quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from pab_build.engine.status import require_build

# failures a person fixes by changing what they typed or set up, not by reading a traceback;
# errors whose class lives in an optional dependency are matched by name
USER_ERROR_NAMES = {"ConfigError", "NotABuildError", "ReviewFileError", "PublishError", "NoCredentialsError",
                    "PartialCredentialsError", "LocalTokenNotFoundError"}


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (itself or a cause), or None for a defect."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)) or \
                any(c.__name__ in USER_ERROR_NAMES for c in type(exc).__mro__):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _run_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set or [])
    if args.oops_root:
        overrides.append(f"oops.root={args.oops_root}")
    if getattr(args, "runner", None):
        overrides.append(f"run.task_runner={args.runner}")
    return overrides


def _default_out(args: argparse.Namespace) -> str:
    return args.out or os.path.join("out", os.path.splitext(os.path.basename(args.profile))[0])


def _preflight(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the preflight table; 0 when every check passed, else 2."""
    from pab_build.model_lock import locked_config
    from pab_build.engine.preflight import format_table, run_checks

    if getattr(args, "no_cmp", False):
        overrides = overrides + ["cmp.train_after_build=false"]  # CMP's models are not needed
    rows = run_checks(locked_config(args.profile, overrides), _default_out(args), getattr(args, "publish", None),
                      getattr(args, "until", None))
    print(format_table(rows), file=sys.stderr if any(r.problem for r in rows) else sys.stdout)
    problems = sum(r.problem for r in rows)
    if problems:
        print(f"pab: preflight found {problems} problem(s); nothing was started", file=sys.stderr)
    return 2 if problems else 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    return _preflight(args, _run_overrides(args))


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = _run_overrides(args)
    if args.verbose:  # Prefect's line per task run: the flow keeps them off unless asked
        overrides.append("run.log_unit_runs=true")
    from pab_build.model_lock import locked_config

    cfg = locked_config(args.profile, overrides)  # fail fast, before Prefect starts, on a bad key or value
    from pab_build.engine.pipeline import stages_until

    planned = stages_until(args.until)
    if not args.skip_preflight and (code := _preflight(args, overrides)):
        return code
    from flows.run_control import hard_exit, stop_on_signals
    from pab_build.engine.build_lock import BuildLocked, hold_build_lock
    from pab_build.engine.build_outcome import BuildFailed

    from flows.progress import ProgressDisplay

    out = _default_out(args)
    # anything that may hold a credential reaches the flow through the environment, never as a
    # flow-run parameter (Prefect stores those in its database)
    from pab_build.redact import export_secret_overrides, split_secret_overrides

    public, secret = split_secret_overrides(overrides + ([f"publish.url={args.publish}"] if args.publish else []))
    export_secret_overrides(secret)
    stop_on_signals()
    try:
        with hold_build_lock(out, heartbeat_s=cfg.run.lock_heartbeat_s,
                             storage_options=cfg.publish.storage_options), \
                ProgressDisplay(verbose=args.verbose, planned=planned) as display:
            # shown at once: importing Prefect and starting its temporary server take seconds
            display.note("starting Prefect")
            from flows.build_pab import (
                build_pab,  # Prefect starts here (an ephemeral server without PREFECT_API_URL)
            )

            display.attach_prefect()
            summary = build_pab(
                profile=args.profile, out=out, overrides=public, until=args.until,
                train_cmp=False if args.no_cmp else None, skip_preflight=True,
            )
    except BuildLocked as e:
        print(f"pab: {e}", file=sys.stderr)
        return 2
    except BuildFailed as e:
        print(str(e), file=sys.stderr)
        print(f"outputs (partial): {out}; `pab status {out}` lists the failed units", file=sys.stderr)
        return 1
    except BaseException as e:  # Ctrl-C, or SIGTERM as Prefect's TerminationSignal while a flow runs
        if not isinstance(e, KeyboardInterrupt) and type(e).__name__ != "TerminationSignal":
            raise
        print(f"pab: stopped; finished units are kept, rerun the same command to resume ({out})", file=sys.stderr)
        hard_exit(130)
    print(json.dumps(summary, indent=2, default=str))
    print(f"outputs: {out}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pab_build.engine.build_lock import BuildLocked, hold_build_lock
    from pab_build.release.calibrate import calibration_config, run_calibration

    cfg = calibration_config(args.profile, args.samples, _run_overrides(args))
    out = args.out or os.path.join("out", "calibrate-" + os.path.splitext(os.path.basename(args.profile))[0])
    try:
        with hold_build_lock(out, heartbeat_s=cfg.run.lock_heartbeat_s, storage_options=cfg.publish.storage_options):
            summary = run_calibration(cfg, out)
    except BuildLocked as e:
        print(f"pab: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"gen_pose_kept": summary["gen_pose_kept"], "test_pairs": summary["test_pairs"]}, indent=2))
    print(f"calibration page: {os.path.join(out, 'calibration', 'index.html')}")
    failed = {stage: c["failed"] for stage, c in summary["units"].items() if c["failed"]}
    if failed:  # the page shows what was measured; a pilot that lost units is still a failed run
        print(f"pab: calibration lost units: {failed}; `pab status {out}` lists them", file=sys.stderr)
    return 1 if failed else 0


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from pab_build.model_lock import fetch_profile, locked_config

    cache = os.path.expanduser(args.cache) if args.cache else None
    if cache:  # the nodes then use HF_HUB_CACHE=<DIR>/huggingface/hub and TORCH_HOME=<DIR>/torch
        os.environ["TORCH_HOME"] = os.path.join(cache, "torch")
    cfg = locked_config(args.profile, list(args.set or []))
    lock = args.lock or cfg.run.models_lock
    entries = fetch_profile(cfg, lock, os.path.join(cache, "huggingface", "hub") if cache else None)
    for model, entry in entries.items():
        print(f"{model}@{entry['revision']}  ({len(entry['files'])} files)")
    print(f"lock: {lock}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pab_build.engine.status import build_status, format_status

    print(format_status(build_status(args.out), as_json=args.json))
    if args.json:
        return 0
    from pab_build.engine.build_lock import LOCK_NAME, read_lock, stale_reason
    from pab_build.engine.build_outcome import failure_report

    for line in failure_report(args.out):
        print(line)
    held = read_lock(os.path.join(args.out, LOCK_NAME)) if "://" not in args.out else None
    if held is not None:
        why = stale_reason(held)
        print(f"lock: {held.describe()}" + (f" (stale: {why})" if why else " (building now)"))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pab_build.shards.index import verify_shards

    if "://" not in args.target:
        require_build(args.target)
    report = verify_shards(args.target, deep=args.deep)
    print(report)
    return 0 if report.ok else 1


def _cmd_export_official(args: argparse.Namespace) -> int:
    from pab_build.release.official import export_official

    require_build(args.out)
    print(json.dumps(export_official(args.out, args.dest, link=not args.copy), indent=2, default=str))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from pab_build.release.publish import publish

    require_build(args.out)
    report = publish(args.out, args.url, force=args.force, delete=args.delete)
    print(report)  # credentials scrubbed by publish()
    return 0 if getattr(report, "ok", True) else 1


def _cmd_card(args: argparse.Namespace) -> int:
    from pab_build.release.card import write_dataset_card

    require_build(args.out)
    print(write_dataset_card(args.out))
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from pab_build.fixtures import build_tiny_models

    from pab_build.fixtures.sample_oops import write_sample_oops

    print(json.dumps(build_tiny_models(os.path.expanduser(args.models_dir)), indent=2))
    print(write_sample_oops(os.path.expanduser(args.sample_oops_dir)))
    return 0


def _cmd_cmp_eval(args: argparse.Namespace) -> int:
    from pab_build.cmp.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.build, args.out, allow_partial=args.allow_partial,
                                 profile=args.profile, overrides=args.set)
    print(json.dumps({k: result[k] for k in ("behavior", "identity", "num_queries", "eval_json")}, indent=2))
    return 0


def _cmd_automations_install(args: argparse.Namespace) -> int:
    from flows.automations import AUTOMATION_NAME, install_crash_automation

    print(f"{AUTOMATION_NAME}: {install_crash_automation(args.heartbeat_s)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pab", description="Build the PAB benchmark and train/evaluate CMP.")
    p.add_argument("--debug", action="store_true", help="on an error, print the whole traceback, not one line")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the build-pab flow locally (Prefect, no server needed)")
    r.add_argument("profile", help="profile name (configs/<name>.yaml) or a YAML path, e.g. smoke, full")
    r.add_argument("--out", help="output folder or fsspec URL (default: out/<profile>)")
    r.add_argument("--oops-root", help="OOPS!-format root (default: the profile's oops.root)")
    r.add_argument("--until", help="stop after this stage (e.g. frames)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    r.add_argument("--runner", choices=["threads", "ray"], help="task runner (run.task_runner)")
    r.add_argument("--publish", metavar="URL", help="publish the release to this fsspec URL at the end")
    r.add_argument("--no-cmp", action="store_true", help="do not train CMP after the build")
    r.add_argument("--verbose", action="store_true", help="also print Prefect's line for every task run")
    r.add_argument("--skip-preflight", action="store_true", help="start without the preflight checks (experts)")
    r.set_defaults(func=_cmd_run)

    cb = sub.add_parser("calibrate", help="pilot run on a sample: histograms of every filter beside its threshold")
    cb.add_argument("profile", help="profile name (configs/<name>.yaml) or a YAML path, e.g. smoke, full")
    cb.add_argument("--samples", type=int, help="OOPS! clips to sample (default: the profile's calibrate.samples)")
    cb.add_argument("--out", help="output folder (default: out/calibrate-<profile>); the page is OUT/calibration/")
    cb.add_argument("--oops-root", help="OOPS!-format root (default: the profile's oops.root)")
    cb.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    cb.set_defaults(func=_cmd_calibrate)

    pf = sub.add_parser("preflight", help="check device, models, OOPS! root, OUT, credentials; exit 2 on problems")
    pf.add_argument("profile", help="profile name (configs/<name>.yaml) or a YAML path, e.g. smoke, full")
    pf.add_argument("--oops-root", help="OOPS!-format root (default: the profile's oops.root)")
    pf.add_argument("--out", help="output folder or fsspec URL the build will write")
    pf.add_argument("--publish", metavar="URL", help="publish URL whose credentials to check")
    pf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    pf.set_defaults(func=_cmd_preflight)

    m = sub.add_parser("models", help="models of a profile: fetch them and lock their revisions")
    msub = m.add_subparsers(dest="models_command", required=True, help="what to do with the models")
    mf = msub.add_parser("fetch", help="download every model of PROFILE and write models.lock.json")
    mf.add_argument("profile", help="profile name (configs/<name>.yaml) or a YAML path, e.g. full")
    mf.add_argument("--cache", metavar="DIR", help="download into DIR/huggingface/hub and DIR/torch")
    mf.add_argument("--lock", metavar="PATH", help="lock file (default: models.lock.json beside the profile)")
    mf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    mf.set_defaults(func=_cmd_models_fetch)

    a = sub.add_parser("automations", help="Prefect automations a deployment needs (on PREFECT_API_URL)")
    asub = a.add_subparsers(dest="automations_command", required=True, help="what to do with the automations")
    ai = asub.add_parser("install", help="mark flow runs Crashed when their heartbeats stop (lost machine)")
    ai.add_argument("--heartbeat-s", type=int, default=60,
                    help="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers (prefect.yaml sets 60)")
    ai.set_defaults(func=_cmd_automations_install)

    s = sub.add_parser("status", help="per stage: units done/failed/pending, rows ok/rejected")
    s.add_argument("out", help="the build's output folder (the --out of `pab run`)")
    s.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    s.set_defaults(func=_cmd_status)

    v = sub.add_parser("verify", help="re-hash the shards against shards/index.json")
    v.add_argument("target", help="a build's output folder or a published URL")
    v.add_argument("--deep", action="store_true", help="also read and decode every member of every shard")
    v.set_defaults(func=_cmd_verify)

    e = sub.add_parser("export-official", help="write the layout the official CMP code reads")
    e.add_argument("out", help="the build's output folder (the --out of `pab run`)")
    e.add_argument("dest", help="folder to write the official PAB layout into")
    e.add_argument("--copy", action="store_true",
                   help="copy every file (default: JPEGs are hard-linked when OUT and DEST share a local file system)")
    e.set_defaults(func=_cmd_export_official)

    pb = sub.add_parser("publish", help="upload shards, index and card to an fsspec URL, then verify")
    pb.add_argument("out", help="the build's output folder (the --out of `pab run`)")
    pb.add_argument("url", help="fsspec URL to publish to: a folder, s3://bucket/prefix, hf://datasets/org/name")
    pb.add_argument("--force", action="store_true",
                    help="publish even with failed units, an empty split, or fewer samples than the published release")
    pb.add_argument("--delete", action="store_true",
                    help="remove remote shards the new index does not list, once the new release verified")
    pb.set_defaults(func=_cmd_publish)

    c = sub.add_parser("card", help="(re)write OUT/README.md, the dataset card")
    c.add_argument("out", help="the build's output folder (the --out of `pab run`)")
    c.set_defaults(func=_cmd_card)

    ce = sub.add_parser("cmp-eval", help="evaluate a CMP checkpoint (ours or an official cmp.pth) on a build's test shards")
    ce.add_argument("--checkpoint", required=True, help="a training checkpoint folder or an official .pth")
    ce.add_argument("--build", required=True, help="the build's output folder (its shards/test)")
    ce.add_argument("--out", help="where cmp/eval.json goes (default: BUILD/cmp_eval/<checkpoint name>)")
    ce.add_argument("--allow-partial", action="store_true", help="evaluate even if parameters were not loaded")
    ce.add_argument("--profile", help="config for a .pth (default full); a checkpoint folder carries its own")
    ce.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    ce.set_defaults(func=_cmd_cmp_eval)

    f = sub.add_parser("fixtures", help="build the tiny models and the sample OOPS! root")
    f.add_argument("--models-dir", default="~/.cache/pab-build/tiny-models",
                   help="where to write the tiny models (default: %(default)s)")
    f.add_argument("--sample-oops-dir", default="~/.cache/pab-build/sample-oops",
                   help="where to write the sample OOPS!-format clips (default: %(default)s)")
    f.set_defaults(func=_cmd_fixtures)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # builds run on machines with restricted networks: no usage telemetry from Prefect or Ray
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the library logs through `logging`; Prefect forwards these loggers into run logs
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pab_build")
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - print it, then leave through the same exit path
        cause = user_error(e)
        if args.debug or cause is None:
            traceback.print_exc()
        if cause is not None:
            print(f"pab: error: {' '.join(str(cause).split()) or type(cause).__name__}", file=sys.stderr)
            code = 2
        else:
            code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
