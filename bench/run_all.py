"""Run the benchmarks one after another, each in its own process, and print their output.

    python bench/run_all.py              # the CPU benchmarks, small settings
    python bench/run_all.py --gpu        # ... then bench/gpu.sh when CUDA is available

``--combine A.json B.json --json OUT`` (used by gpu.sh) merges the GPU results and adds the named
ratios (:data:`RATIOS`) and the projected GPU-hours of the full build (:func:`project_gpu_hours`),
from measured figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

CPU_BENCHMARKS = [
    ["bench_frames.py", "--clips", "4", "--repeat", "1"],
    ["bench_shards.py", "--samples", "100", "--repeat", "1"],
    ["bench_pose_similarity.py", "--images", "4", "--size", "128", "--batch-sizes", "1,4"],
    ["bench_pose_postprocess.py", "--images", "2", "--sizes", "512"],
    ["bench_prefect_overhead.py"],
]

# The paper (3.2): 6,739 C_n + 6,979 C_a + 6,669 C_a+ prompts, 75 images each; 1,013,605 images kept
# after the pose filter, each asked for 1 caption and 2 attributes (action or anomaly, and scene).
PAPER_PROMPTS = 6739 + 6979 + 6669
IMAGES_PER_PROMPT = 75
KEPT_IMAGES = 1_013_605
ATTRIBUTE_QUESTIONS_PER_IMAGE = 2


# Named ratios: (benchmark, phase, baseline phase) -> "<phase>_vs_<baseline>" = rate / baseline's rate.
# One change at a time first, then the project's path against each plain baseline.
RATIOS = (
    ("sdxl", "fp16_plain", "fp32_default"),
    ("sdxl", "batched", "fp16_plain"),
    ("sdxl", "channels_last", "batched"),
    ("sdxl", "compile", "channels_last"),
    ("sdxl", "channels_last", "fp16_plain"),
    ("sdxl", "channels_last", "fp32_default"),
    ("sdxl", "compile", "fp16_plain"),
    ("qwen2_vl", "caption_batched", "caption_batch1"),
    ("qwen2_vl", "attribute_batched", "attribute_batch1"),
    ("qwen2_vl", "vllm_caption_batched", "caption_batched"),
    ("qwen2_vl", "vllm_attribute_batched", "attribute_batched"),
    ("openpose", "network_batched", "network_per_image"),
)


def projection_inputs() -> tuple[tuple[str, str, str, int], ...]:
    """(figure, benchmark, phase whose rate it uses, requests in the full build). The phases are
    the paths configs/full.yaml runs: generate's batched fp16 channels-last call (no compile),
    transformers in the profile's batches, gen_pose's per-image detection."""
    images = PAPER_PROMPTS * IMAGES_PER_PROMPT
    return (
        ("generate_gpu_hours", "sdxl", "channels_last", images),
        ("gen_pose_gpu_hours", "openpose", "detect_per_image", images),
        ("captions_gpu_hours", "qwen2_vl", "caption_batched", KEPT_IMAGES),
        ("attributes_gpu_hours", "qwen2_vl", "attribute_batched", KEPT_IMAGES * ATTRIBUTE_QUESTIONS_PER_IMAGE),
    )


def phase_rate(results: dict, benchmark: str, phase: str) -> float | None:
    return results.get(benchmark, {}).get("phases", {}).get(phase, {}).get("per_s")


def ratios(results: dict) -> dict[str, float]:
    out = {}
    for benchmark, phase, baseline in RATIOS:
        a, b = phase_rate(results, benchmark, phase), phase_rate(results, benchmark, baseline)
        if a and b:
            out[f"{benchmark}.{phase}_vs_{baseline}"] = a / b
    return out


def project_gpu_hours(results: dict) -> dict:
    """GPU-hours of the full build's generate, gen_pose and Qwen2-VL stages on one GPU like the
    measured one, from measured rates only; a figure whose rate is missing is named, with why
    (the test set's few thousand images are left out: under 1% of the requests)."""
    out: dict = {"arithmetic": (f"generate and gen_pose: {PAPER_PROMPTS} prompts x {IMAGES_PER_PROMPT} = "
                                f"{PAPER_PROMPTS * IMAGES_PER_PROMPT} images; VLM: {KEPT_IMAGES} kept images x "
                                f"(1 caption + {ATTRIBUTE_QUESTIONS_PER_IMAGE} attributes); "
                                "hours = count / measured rate / 3600"),
                 "missing": {}}
    for figure, benchmark, phase, count in projection_inputs():
        rate = phase_rate(results, benchmark, phase)
        if rate:
            out[figure] = count / rate / 3600
            out[f"{figure}_from"] = f"{benchmark}.{phase}: {rate:.4g} per s x {count} requests"
        elif benchmark not in results:
            out["missing"][figure] = f"no {benchmark} results (that benchmark failed or was not run)"
        else:
            error = results[benchmark].get("phases", {}).get(phase, {}).get("error")
            out["missing"][figure] = f"{benchmark}.{phase} " + (f"failed: {error}" if error else "was not measured")
    return out


def combine(paths: list[str], dest: str, failed: list[str] | None = None) -> dict:
    """Merge the benchmarks' result files, add named ratios and the projection, write ``dest``."""
    results: dict = {}
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            results[data["benchmark"]] = data
        else:
            print(f"run_all: no result file {path} (that benchmark failed before measuring, or was not run)",
                  file=sys.stderr)
    merged = {**results, "failed": failed or [], "ratios": ratios(results), "projection": project_gpu_hours(results)}
    print("\nratios (rate / baseline's rate):")
    for name, value in merged["ratios"].items():
        print(f"  {name:50s} {value:8.2f}x")
    projection = merged["projection"]
    gpus = sorted({r.get("gpu", "?") for r in results.values()})
    not_gpu = any(r.get("toy") or r.get("size") == "toy" or "not a GPU" in r.get("gpu", "") for r in results.values())
    print(f"\nprojected full build on one {' / '.join(gpus) or 'GPU'}"
          f"{' (TOY SIZES OR CPU: these figures project nothing)' if not_gpu else ''}: {projection['arithmetic']}")
    for figure, *_ in projection_inputs():
        if figure in projection:
            print(f"  {figure:22s} {projection[figure]:10.1f}   ({projection[figure + '_from']})")
        else:
            print(f"  {figure:22s}    missing   ({projection['missing'][figure]})")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
    print(f"wrote {dest}")
    return merged


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run(cmd: list[str]) -> int:
    print(f"\n== {' '.join(cmd)} ==", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"-- rc={rc} in {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="also run bench/gpu.sh when CUDA is available")
    ap.add_argument("--combine", nargs="+", help="GPU result files to merge (gpu.sh)")
    ap.add_argument("--json", help="with --combine: where to write the merged results")
    ap.add_argument("--failed", default="", help="with --combine: comma-separated benchmarks that failed")
    args = ap.parse_args()
    if args.combine:
        if not args.json:
            ap.error("--combine needs --json")
        combine(args.combine, args.json, [f for f in args.failed.split(",") if f])
        return 0
    failed = [c[0] for c in CPU_BENCHMARKS if run([sys.executable, os.path.join(BENCH, c[0]), *c[1:]]) != 0]
    if args.gpu:
        if cuda_available():
            if run(["bash", os.path.join(BENCH, "gpu.sh")]) != 0:
                failed.append("gpu.sh")
        else:
            print("\nno CUDA device: the GPU benchmarks (bench/gpu.sh) are skipped")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
