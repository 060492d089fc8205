"""Prefect's overhead on a build: the smoke build through the `build-pab` flow vs. the same stage
functions called in a plain loop (`pab_build.engine.units.run_stage`), both from scratch, same config.

    python bench/bench_prefect_overhead.py [--until STAGE]
    python bench/bench_prefect_overhead.py --units 10000 [--workers 2]

Prints both wall times, the ratio, and the overhead per unit, which is what decides the unit size
of the full build (see README, "Unit sizes and Prefect overhead").

``--units N``: a no-op stage of N one-item units (each writes its rows file and marker, as every
unit does) through the real stage subflow (``flows.build_pab.stage_flow``: bounded submission
window, progress lines, finalize) vs. the plain loop; prints the per-unit overhead and the flow
process's peak RSS. The last line is ``units=N per_unit_ms=X peak_rss_mib=M``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 2 busy cores start it slowly


def noop_stage(n_units: int):
    """A stage named ``pairs`` (any stage's schema takes rows of the common columns) whose units
    do nothing but return their one ok row."""
    from pab_build.engine.units import Stage, Unit

    def plan(ctx):
        return [Unit("pairs", f"{i:06d}", ({"sample_key": f"k{i:06d}"},)) for i in range(n_units)]

    def run(ctx, unit):
        return [{"sample_key": k, "status": "ok", "reason": None} for k in unit.sample_keys]

    return Stage(name="pairs", plan_units=plan, run_unit=run, config_keys=())


def bench_noop_units(n_units: int, workers: int) -> None:
    import flows.build_pab as build_pab
    from bench.bench_scale import PeakRSS
    from pab_build.config import load_config
    from pab_build.engine.units import Context, run_stage

    cfg = load_config("smoke", [f"run.max_workers={workers}"])
    stage = noop_stage(n_units)
    d = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        run_stage(Context.create(cfg, os.path.join(d, "loop")), stage)
        t_loop = time.perf_counter() - t0
        build_pab.get_stage = lambda name: stage  # the unit tasks look the stage up by name
        flow = build_pab.stage_flow.with_options(name="stage-noop", task_runner=build_pab._task_runner(cfg))
        with PeakRSS() as rss:
            flow(cfg, os.path.join(d, "flow"), "pairs")
        t_flow = rss.seconds
    finally:
        shutil.rmtree(d, ignore_errors=True)
    per_unit_ms = 1000 * (t_flow - t_loop) / n_units
    print(f"plain loop : {t_loop:7.1f} s  ({n_units} no-op units)")
    print(f"prefect    : {t_flow:7.1f} s  (stage subflow, {workers} worker threads)")
    print(f"units={n_units} per_unit_ms={per_unit_ms:.1f} peak_rss_mib={rss.mib}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--until", default="train_shards")
    ap.add_argument("--units", type=int, help="no-op units through the stage subflow instead of the smoke build")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.units:
        return bench_noop_units(args.units, args.workers)
    from pab_build.config import load_config
    from pab_build.engine.pipeline import get_stage, stages_until
    from pab_build.engine.prepare import prepare_build
    from pab_build.engine.units import Context, run_stage

    overrides = ["cmp.train_after_build=false"]
    cfg = load_config("smoke", overrides)
    prepare_build(cfg, tempfile.mkdtemp())  # fixtures built once, outside both timings
    stages = stages_until(args.until)
    for s in stages:
        get_stage(s)  # import every stage module before timing

    d = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        ctx = Context.create(cfg, os.path.join(d, "loop"))
        prepare_build(cfg, ctx.store.url_root)
        n_units = 0
        for s in stages:
            counts = run_stage(ctx, get_stage(s))
            n_units += sum(counts.values())
        t_loop = time.perf_counter() - t0

        from flows.build_pab import build_pab

        t0 = time.perf_counter()
        build_pab(profile="smoke", out=os.path.join(d, "flow"), overrides=overrides, until=args.until)
        t_flow = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"plain loop : {t_loop:7.1f} s  ({len(stages)} stages, {n_units} units)")
    print(f"prefect    : {t_flow:7.1f} s  (includes the ephemeral API server start)")
    print(f"ratio prefect / loop = {t_flow / t_loop:.2f}x; overhead {t_flow - t_loop:.1f} s "
          f"= {(t_flow - t_loop) / max(n_units, 1):.2f} s per unit (upper bound: start-up included)")


if __name__ == "__main__":
    main()
