#!/usr/bin/env bash
# The GPU benchmarks (issue 7 item 4) on one GPU, in well under 8 minutes; installs nothing.
#   bench/gpu.sh            -> $OUT/gpu_bench.json, or bench/results/gpu_bench.json when $OUT is unset
# Environment: PYTHON (default .venv/bin/python, else python3), SDXL_IMAGES (8), SDXL_STEPS (30),
# CAPTIONS (32), ATTRIBUTES (64), VLM_SIZE (2b), SDXL_ARGS (extra flags, e.g. --compile).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)'; then
  echo "gpu.sh: no CUDA device; run bench/run_all.py for the CPU benchmarks" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== SDXL (full size, random weights): baseline vs. optimised =="
timeout 300 "$PYTHON" bench/bench_sdxl_gpu.py --images "${SDXL_IMAGES:-8}" --steps "${SDXL_STEPS:-30}" \
  ${SDXL_ARGS:-} --json "$TMP/sdxl.json" || echo "gpu.sh: SDXL benchmark failed (rc=$?)" >&2
echo "== Qwen2-VL-${VLM_SIZE:-2b} (full size, random weights): captions and attributes =="
timeout 180 "$PYTHON" bench/bench_vlm_gpu.py --size "${VLM_SIZE:-2b}" --captions "${CAPTIONS:-32}" \
  --attributes "${ATTRIBUTES:-64}" --workdir "$TMP" --json "$TMP/vlm.json" \
  || echo "gpu.sh: Qwen2-VL benchmark failed (rc=$?)" >&2

"$PYTHON" bench/run_all.py --combine "$TMP/sdxl.json" "$TMP/vlm.json" --json "$RESULTS/gpu_bench.json"
