"""Run the benchmarks one after another, each in its own process, and print their output.

    python bench/run_all.py              # the CPU benchmarks, small settings
    python bench/run_all.py --gpu        # ... then bench/gpu.sh when CUDA is available

``--combine A.json B.json --json OUT`` (used by gpu.sh) merges the GPU results and adds the
projected GPU-hours of the full build, computed by :func:`project_gpu_hours`.
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
    ["bench_prefect_overhead.py"],
]

# The paper (3.2): 6,739 C_n + 6,979 C_a + 6,669 C_a+ prompts, 75 images each; 1,013,605 images kept
# after the pose filter, each asked for 1 caption and 2 attributes (action or anomaly, and scene).
PAPER_PROMPTS = 6739 + 6979 + 6669
IMAGES_PER_PROMPT = 75
KEPT_IMAGES = 1_013_605
ATTRIBUTE_QUESTIONS_PER_IMAGE = 2


def project_gpu_hours(sdxl_images_per_s: float | None, captions_per_s: float | None,
                      attributes_per_s: float | None) -> dict:
    """GPU-hours of the full build's generation and Qwen2-VL stages on one GPU like the measured one
    (the test set's few thousand images are left out: under 1% of the requests)."""
    images = PAPER_PROMPTS * IMAGES_PER_PROMPT
    attributes = KEPT_IMAGES * ATTRIBUTE_QUESTIONS_PER_IMAGE
    out: dict = {"generated_images": images, "captions": KEPT_IMAGES, "attribute_requests": attributes,
                 "arithmetic": (f"generate: {PAPER_PROMPTS} prompts x {IMAGES_PER_PROMPT} = {images} images; "
                                f"VLM: {KEPT_IMAGES} kept images x (1 caption + {ATTRIBUTE_QUESTIONS_PER_IMAGE} "
                                f"attributes) = {KEPT_IMAGES * (1 + ATTRIBUTE_QUESTIONS_PER_IMAGE)} requests; "
                                "hours = count / measured rate / 3600")}
    if sdxl_images_per_s:
        out["generate_gpu_hours"] = images / sdxl_images_per_s / 3600
    if captions_per_s:
        out["captions_gpu_hours"] = KEPT_IMAGES / captions_per_s / 3600
    if attributes_per_s:
        out["attributes_gpu_hours"] = attributes / attributes_per_s / 3600
    return out


def combine(paths: list[str], dest: str) -> dict:
    results: dict = {}
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            results[data["benchmark"]] = data
        else:
            print(f"run_all: no result file {path} (that benchmark failed)", file=sys.stderr)
    sdxl, vlm = results.get("sdxl", {}), results.get("qwen2_vl", {})
    backend = "vllm" if "vllm_captions_per_s" in vlm else "transformers"
    projection = project_gpu_hours(sdxl.get("optimised_images_per_s"), vlm.get(f"{backend}_captions_per_s"),
                                   vlm.get(f"{backend}_attributes_per_s"))
    projection["vlm_backend"] = backend
    results["projection"] = projection
    print(f"\nprojected full build on one {sdxl.get('gpu') or vlm.get('gpu') or 'GPU'}: {projection['arithmetic']}")
    for key in ("generate_gpu_hours", "captions_gpu_hours", "attributes_gpu_hours"):
        if key in projection:
            print(f"  {key:22s} {projection[key]:10.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(f"wrote {dest}")
    return results


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
    args = ap.parse_args()
    if args.combine:
        if not args.json:
            ap.error("--combine needs --json")
        combine(args.combine, args.json)
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
