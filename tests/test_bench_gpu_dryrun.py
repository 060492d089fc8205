"""The GPU benchmarks on the CPU: --dry-run builds the full-size architectures on the meta device
(no memory) and must give the published parameter counts; without CUDA a real run exits 2; the
result file keeps every measured phase; the projection uses measured figures only.
(tests/test_bench_gpu_wheelhouse.py runs bench/gpu.sh end to end on the CPU.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU, so the guard is what is tested


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=NO_CUDA,
                          capture_output=True, text=True, timeout=120)


def millions(output: str, name: str) -> float:
    match = re.search(rf"^{name}\s+([\d.]+) M parameters$", output, re.MULTILINE)
    assert match, f"no parameter count for {name} in:\n{output}"
    return float(match.group(1))


def test_sdxl_dry_run_builds_sdxl_base_sizes():
    done = run_bench("bench_sdxl_gpu.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    # SDXL base 1.0's published sizes: UNet 2,567,463,684; VAE 83,653,863; CLIP-L 123,060,480; bigG 694,659,840
    assert millions(done.stdout, "unet") == pytest.approx(2567.5, abs=0.1)
    assert millions(done.stdout, "vae") == pytest.approx(83.7, abs=0.1)
    assert millions(done.stdout, "text_encoder") == pytest.approx(123.1, abs=0.1)
    assert millions(done.stdout, "text_encoder_2") == pytest.approx(694.7, abs=0.1)
    assert "float16, batch 4, 30 steps, 1024x1024" in done.stdout  # configs/full.yaml's generate section


def test_vlm_dry_run_builds_qwen2vl_2b_sizes():
    done = run_bench("bench_vlm_gpu.py", "--dry-run", "--size", "2b")
    assert done.returncode == 0, done.stderr
    assert millions(done.stdout, "total") == pytest.approx(2209.0, abs=0.1)  # Qwen2-VL-2B: 2,208,985,600
    assert millions(done.stdout, "vision") == pytest.approx(665.3, abs=0.1)
    assert "1024x1024 image -> 1024 tokens" in done.stdout


def test_vlm_default_size_is_the_full_profiles_7b():
    done = run_bench("bench_vlm_gpu.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert millions(done.stdout, "total") == pytest.approx(8291.4, abs=0.1)  # Qwen2-VL-7B: 8,291,375,616
    assert "Qwen2-VL-7B" in done.stdout


def test_openpose_dry_run_builds_the_body_network():
    done = run_bench("bench_openpose_gpu.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert millions(done.stdout, "body") == pytest.approx(52.3, abs=0.1)  # controlnet-aux's bodypose_model
    assert "32 images per phase, batches of 16" in done.stdout  # configs/full.yaml's gen_pose batch size


@pytest.mark.parametrize("script", ["bench_sdxl_gpu.py", "bench_vlm_gpu.py", "bench_openpose_gpu.py"])
def test_real_run_without_cuda_exits_2(script):
    done = run_bench(script)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr


def import_bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def write_results(path: Path, benchmark: str, **rates: float) -> None:
    phases = {name: {"per_s": value, "unit": "items/s"} for name, value in rates.items()}
    path.write_text(json.dumps({"benchmark": benchmark, "phases": phases}))


def test_projection_uses_measured_phases_and_names_missing_ones(tmp_path):
    run_all = import_bench("run_all")
    write_results(tmp_path / "sdxl.json", "sdxl", fp32_default=0.5, fp16_plain=1.0, channels_last=2.0)
    write_results(tmp_path / "vlm.json", "qwen2_vl", caption_batch1=1.0, caption_batched=10.0,
                  attribute_batched=40.0)
    out = tmp_path / "gpu_bench.json"
    run_all.combine([str(tmp_path / n) for n in ("sdxl.json", "vlm.json", "openpose.json")], str(out), ["openpose"])
    merged = json.loads(out.read_text())
    projection = merged["projection"]
    assert projection["generate_gpu_hours"] == pytest.approx(20387 * 75 / 2.0 / 3600)
    assert projection["captions_gpu_hours"] == pytest.approx(1_013_605 / 10.0 / 3600)
    assert projection["attributes_gpu_hours"] == pytest.approx(2 * 1_013_605 / 40.0 / 3600)
    assert "gen_pose_gpu_hours" not in projection and "openpose" in projection["missing"]["gen_pose_gpu_hours"]
    assert merged["ratios"]["sdxl.fp16_plain_vs_fp32_default"] == pytest.approx(2.0)
    assert merged["ratios"]["sdxl.channels_last_vs_fp16_plain"] == pytest.approx(2.0)
    assert merged["ratios"]["qwen2_vl.caption_batched_vs_caption_batch1"] == pytest.approx(10.0)
    assert "sdxl.batched_vs_fp16_plain" not in merged["ratios"]  # batched was not measured
    assert merged["failed"] == ["openpose"]


def test_results_keep_each_phase_as_measured_and_record_failures(tmp_path):
    gpu_common = import_bench("gpu_common")
    path = tmp_path / "sdxl.json"
    results = gpu_common.Results(str(path), "sdxl", steps=30)
    results.phase("fp32_default", "baseline", lambda: gpu_common.rate(2, 4.0, "images/s"))
    assert json.loads(path.read_text())["phases"]["fp32_default"]["per_s"] == 0.5  # on disk before the next phase

    def broken() -> dict:
        raise RuntimeError("CUDA out of memory")

    assert results.phase("batched", "batches", broken) is None
    results.phase("channels_last", "after the failure", lambda: gpu_common.rate(4, 2.0, "images/s"))
    assert results.exit_code() == gpu_common.FAILED_EXIT
    # a second process (the compile variant) adds its phase to the same file
    gpu_common.Results(str(path), "sdxl").phase("compile", "compiled", lambda: gpu_common.rate(8, 2.0, "images/s"))
    phases = json.loads(path.read_text())["phases"]
    assert phases["batched"]["error"] == "RuntimeError: CUDA out of memory"
    assert [phases[p]["per_s"] for p in ("fp32_default", "channels_last", "compile")] == [0.5, 2.0, 4.0]


def test_round_up_to_whole_batches():
    gpu_common = import_bench("gpu_common")
    assert [gpu_common.round_up(n, 4) for n in (1, 4, 5, 8, 0)] == [4, 4, 8, 8, 4]
