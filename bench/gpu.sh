#!/usr/bin/env bash
# The GPU benchmarks on one GPU: SDXL, SDXL + torch.compile, Qwen2-VL, OpenPose; each benchmark in its
# own process and timeout, each phase written to $RESULTS/<benchmark>.json as soon as it is measured.
#   bench/gpu.sh [--wheelhouse DIR] [--only sdxl,sdxl_compile,vlm,openpose]
# Results: $OUT when set (the device tool's output folder), else bench/results/<date-time>/; gpu.log
# there is this console log. Exit status: 0 when every benchmark ran all its phases, 1 when any
# failed (its measured phases are kept), 2 without CUDA, 3 when the environment check failed.
# Estimated on one H200 with the defaults (not measured yet): checks 0.5 min, SDXL 2, compile 2.5,
# Qwen2-VL-7B 2, OpenPose 0.5: about 7.5 minutes; the timeouts below cap each benchmark. The device
# tool allows 10 minutes a command: run `--only sdxl,openpose`, then `--only sdxl_compile,vlm`.
#
# --wheelhouse DIR: pip install --no-index DIR/bench-requirements.txt (made by `make wheelhouse`) into
# a throw-away folder put first on PYTHONPATH, for a machine that has torch and transformers but not
# pydantic, diffusers, qwen-vl-utils or controlnet-aux, and no registry.
# Environment: PYTHON (default .venv/bin/python, else python3); BENCH_DEVICE (cuda; cpu runs the same
# code paths, for tests); SDXL_IMAGES (8), SDXL_FP32_IMAGES (2), SDXL_STEPS (30), VLM_SIZE (7b, the
# full profile's), CAPTIONS (32), ATTRIBUTES (64), POSE_IMAGES (32); SDXL_ARGS, COMPILE_ARGS, VLM_ARGS,
# POSE_ARGS: extra flags per benchmark; T_SDXL (180), T_COMPILE (240), T_VLM (240), T_POSE (90): timeouts, s.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELHOUSE= ONLY=sdxl,sdxl_compile,vlm,openpose
while [ $# -gt 0 ]; do
  case $1 in
    --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd) || exit 3; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)" >&2; exit 3 ;;
  esac
done
for name in ${ONLY//,/ }; do
  case $name in sdxl|sdxl_compile|vlm|openpose) ;; *) echo "gpu.sh: unknown benchmark $name in --only" >&2; exit 3 ;; esac
done
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || echo python3)}
DEVICE=${BENCH_DEVICE:-cuda}
RESULTS=${OUT:-bench/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
exec > >(tee -a "$RESULTS/gpu.log") 2>&1  # the console log, kept with the results
TEE_PID=$!
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"; exec >&- 2>&-; wait $TEE_PID' EXIT  # the log is complete when gpu.sh returns
echo "gpu.sh $(date -u +%FT%TZ): results in $RESULTS, device $DEVICE, benchmarks $ONLY"

if [ -n "$WHEELHOUSE" ]; then
  echo "== installing $WHEELHOUSE/bench-requirements.txt (no index) into a throw-away folder =="
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELHOUSE" --target "$TMP/site" \
    -r "$WHEELHOUSE/bench-requirements.txt" || { echo "gpu.sh: installing the wheelhouse failed" >&2; exit 3; }
  export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

selected() { [[ ",$ONLY," == *",$1,"* ]]; }
SCRIPTS=()
{ selected sdxl || selected sdxl_compile; } && SCRIPTS+=(bench/bench_sdxl_gpu.py)
selected vlm && SCRIPTS+=(bench/bench_vlm_gpu.py)
selected openpose && SCRIPTS+=(bench/bench_openpose_gpu.py)
# before any model is built: the packages the benchmarks import lazily, then each script's own
# imports (pab_build's modules among them), in one process
"$PYTHON" - "${SCRIPTS[@]}" <<'EOF' || { echo "gpu.sh: an import failed (see above; --wheelhouse DIR?)" >&2; exit 3; }
import importlib, importlib.util, os, sys
names = ("torch", "transformers", "diffusers", "pydantic", "qwen_vl_utils", "controlnet_aux", "yaml", "cv2")
versions = {}
for name in names:
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        sys.exit(f"cannot import {name}: {type(e).__name__}: {e}")
print("python", sys.version.split()[0], "|", ", ".join(f"{k} {v}" for k, v in versions.items()))
sys.path.insert(0, "bench")
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # imports only: main() is not run
print("imports ok:", " ".join(sys.argv[1:]))
EOF
if [ "$DEVICE" = cuda ]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)'; then
    echo "gpu.sh: no CUDA device; run bench/run_all.py for the CPU benchmarks (or BENCH_DEVICE=cpu)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
SDXL=(bench/bench_sdxl_gpu.py --device "$DEVICE" --images "${SDXL_IMAGES:-8}" --steps "${SDXL_STEPS:-30}"
      --json "$RESULTS/sdxl.json")
VLM=(bench/bench_vlm_gpu.py --device "$DEVICE" --size "${VLM_SIZE:-7b}" --captions "${CAPTIONS:-32}"
     --attributes "${ATTRIBUTES:-64}" --workdir "$TMP" --json "$RESULTS/qwen2_vl.json")
POSE=(bench/bench_openpose_gpu.py --device "$DEVICE" --images "${POSE_IMAGES:-32}" --json "$RESULTS/openpose.json")
FAILED=()
bench() {  # bench NAME TIMEOUT_S COMMAND...: run one benchmark, remember a failure, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s) =="
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "-- $name: rc=$rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')"
  [ $rc = 0 ] || FAILED+=("$name")
}
# shellcheck disable=SC2086
{
selected sdxl && bench sdxl "${T_SDXL:-180}" "$PYTHON" "${SDXL[@]}" --fp32-images "${SDXL_FP32_IMAGES:-2}" ${SDXL_ARGS:-}
selected sdxl_compile && bench sdxl_compile "${T_COMPILE:-240}" "$PYTHON" "${SDXL[@]}" --phases compile \
  ${SDXL_ARGS:-} ${COMPILE_ARGS:-}
selected vlm && bench vlm "${T_VLM:-240}" "$PYTHON" "${VLM[@]}" ${VLM_ARGS:-}
selected openpose && bench openpose "${T_POSE:-90}" "$PYTHON" "${POSE[@]}" ${POSE_ARGS:-}
}

FAILED_LIST=$(IFS=,; echo "${FAILED[*]:-}")
"$PYTHON" bench/run_all.py --combine "$RESULTS"/{sdxl,qwen2_vl,openpose}.json --failed "$FAILED_LIST" \
  --json "$RESULTS/gpu_bench.json" || FAILED+=(combine)
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: FAILED: ${FAILED[*]}; the phases they measured are kept in $RESULTS" >&2
  exit 1
fi
echo "gpu.sh: all benchmarks ran; results in $RESULTS"
