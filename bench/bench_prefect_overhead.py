"""Prefect's overhead on a build: the smoke build through the `build-pab` flow vs. the same stage
functions called in a plain loop (`pab_build.units.run_stage`), both from scratch, same config.

    python bench/bench_prefect_overhead.py [--until STAGE]

Prints both wall times, the ratio, and the overhead per unit, which is what decides the unit size
of the full build (see README, "Unit sizes and Prefect overhead").
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--until", default="train_shards")
    args = ap.parse_args()
    from pab_build.config import load_config
    from pab_build.pipeline import get_stage, stages_until
    from pab_build.prepare import prepare_build
    from pab_build.units import Context, run_stage

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
