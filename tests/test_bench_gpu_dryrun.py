"""The GPU benchmarks on the CPU: --dry-run builds the full-size architectures on the meta device
(no memory) and must give the published parameter counts; without CUDA a real run exits 2."""

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
    done = run_bench("bench_vlm_gpu.py", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert millions(done.stdout, "total") == pytest.approx(2209.0, abs=0.1)  # Qwen2-VL-2B: 2,208,985,600
    assert millions(done.stdout, "vision") == pytest.approx(665.3, abs=0.1)
    assert "1024x1024 image -> 1024 tokens" in done.stdout


@pytest.mark.parametrize("script", ["bench_sdxl_gpu.py", "bench_vlm_gpu.py"])
def test_real_run_without_cuda_exits_2(script):
    done = run_bench(script, "--images" if "sdxl" in script else "--captions", "1")
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr


def test_projection_arithmetic(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "bench"))
    (tmp_path / "sdxl.json").write_text(json.dumps({"benchmark": "sdxl", "optimised_images_per_s": 2.0}))
    (tmp_path / "vlm.json").write_text(json.dumps({"benchmark": "qwen2_vl", "transformers_captions_per_s": 10.0,
                                                   "transformers_attributes_per_s": 40.0}))
    out = tmp_path / "gpu_bench.json"
    run_all.combine([str(tmp_path / "sdxl.json"), str(tmp_path / "vlm.json")], str(out))
    projection = json.loads(out.read_text())["projection"]
    assert projection["generated_images"] == 20387 * 75
    assert projection["generate_gpu_hours"] == pytest.approx(20387 * 75 / 2.0 / 3600)
    assert projection["captions_gpu_hours"] == pytest.approx(1_013_605 / 10.0 / 3600)
    assert projection["attributes_gpu_hours"] == pytest.approx(2 * 1_013_605 / 40.0 / 3600)
    assert projection["vlm_backend"] == "transformers"
