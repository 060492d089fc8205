"""bench/gpu.sh end to end on the CPU, in a stand-in for the GPU image, installing from a wheelhouse.

The stand-in is a fresh venv holding only the packages bench/target-base.txt says the GPU image has
(torch, transformers, numpy, ...: symlinked from this test's own environment, so nothing is copied
or downloaded) and none of what it lacks (pydantic, diffusers, qwen-vl-utils, controlnet-aux).
The wheelhouse is made by bench/wheelhouse.py for this Python (a registry download, ~15 MB for the
part gpu.sh installs, ~90 MB in all), once, and cached under the git-ignored .bench-env/ keyed by
the files that decide its content. gpu.sh then runs with BENCH_DEVICE=cpu (the same code paths;
no CUDA call is made) and toy model sizes. Differences from the GPU image that remain: Python 3.11
and this machine's torch/transformers versions instead of 3.12, torch 2.11 and transformers 5.17.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-env"
LACKING = ("pydantic", "diffusers", "qwen_vl_utils", "controlnet_aux")  # what the GPU image has not
# toy sizes and one batch per phase: every phase of every benchmark runs, in a couple of minutes
TOY_ENV = {
    "BENCH_DEVICE": "cpu", "SDXL_IMAGES": "2", "SDXL_FP32_IMAGES": "1", "SDXL_STEPS": "2",
    "SDXL_ARGS": "--toy --size 64 --batch-size 2", "COMPILE_ARGS": "--compile-backend eager",
    "VLM_SIZE": "toy", "CAPTIONS": "2", "ATTRIBUTES": "2",
    "VLM_ARGS": "--image-size 56 --max-new-tokens 2 --batch-size 2 --batch1-requests 1",
    "POSE_IMAGES": "1", "POSE_ARGS": "--batch-size 1 --detect-resolution 64 --image-size 64",
    "T_SDXL": "900", "T_COMPILE": "900", "T_VLM": "900", "T_POSE": "900",  # 2 shared cores are slow
}
PHASES = {
    "sdxl": {"fp32_default", "fp16_plain", "batched", "channels_last", "compile"},
    "qwen2_vl": {"caption_batch1", "caption_batched", "attribute_batch1", "attribute_batched"},
    "openpose": {"detect_per_image", "network_per_image", "network_batched"},
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_names() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "bench" / "target-base.txt").read_text().splitlines())
    return {normalise(line.split("==")[0]) for line in lines if line}


def link_distribution(dist: importlib.metadata.Distribution, site: Path, shared: set[str]) -> None:
    """Symlink one installed distribution's files into ``site``: whole top-level folders, or file
    by file inside a folder another distribution (maybe one the image lacks) also puts files in."""
    source = Path(dist.locate_file(""))
    for rel in dist.files or ():
        parts = Path(rel).parts
        if not parts or parts[0] == ".." or parts[0] == "__pycache__":
            continue
        top = parts[0]
        target = site / (Path(*parts) if top in shared else top)
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source / (Path(*parts) if top in shared else top))


def image_closure(dists: dict[str, importlib.metadata.Distribution], excluded: set[str]) -> set[str]:
    """The image's packages installed here, plus what these versions of them require (on the
    image, its own versions' requirements are met by construction), minus ``excluded``."""
    from packaging.requirements import Requirement

    todo, found = [n for n in target_names() if n in dists], set()
    while todo:
        name = todo.pop()
        if name in found or name in excluded:
            continue
        found.add(name)
        for spec in dists[name].requires or ():
            req = Requirement(spec)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and normalise(req.name) in dists:
                todo.append(normalise(req.name))
    return found


def make_target_stand_in(dest: Path, excluded: set[str]) -> Path:
    """A venv with only the image's packages (those installed here, with their requirements),
    none of ``excluded``. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    dists = {normalise(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    image = image_closure(dists, excluded)
    owners: dict[str, set[str]] = {}
    for name, dist in dists.items():
        for rel in dist.files or ():
            owners.setdefault(Path(rel).parts[0], set()).add(name)
    shared = {top for top, names in owners.items() if len(names) > 1}
    for name, dist in dists.items():
        if name in image:
            link_distribution(dist, site, shared)
    return python


def cache_key(*files: Path) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """bench/wheelhouse.py for this Python, cached under .bench-env/ (made once per content)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = cache_key(*(ROOT / p for p in ("pyproject.toml", "bench/target-base.txt", "bench/wheelhouse.py")))
    dest = CACHE / f"wheelhouse-{version}-{key}"
    if not (dest / "bench-requirements.txt").exists():
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "wheelhouse.py"), "--python-version", version,
                               "--dest", str(dest)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return dest


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory, wheelhouse) -> Path:
    provided = {normalise(line.split("==")[0]) for line in (wheelhouse / "bench-requirements.txt").read_text().split()
                if "==" in line}
    python = make_target_stand_in(tmp_path_factory.mktemp("target") / "venv", provided | set(map(normalise, LACKING)))
    for module in LACKING:  # the stand-in must lack what the image lacks, or the test proves nothing
        assert subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode != 0, module
    assert subprocess.run([str(python), "-c", "import torch, transformers, cv2, yaml"]).returncode == 0
    return python


def gpu_sh(python: Path, wheelhouse: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ.update(TOY_ENV, PYTHON=str(python), OUT=str(out), **env)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--wheelhouse", str(wheelhouse), *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)


def phases(out: Path) -> dict[str, dict]:
    merged = json.loads((out / "gpu_bench.json").read_text())
    return {b: merged[b]["phases"] for b in PHASES if b in merged}


@pytest.mark.slow
def test_gpu_sh_runs_every_phase_from_the_wheelhouse_and_a_failure_keeps_the_rest(stand_in, wheelhouse, tmp_path):
    done = gpu_sh(stand_in, wheelhouse, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    measured = phases(tmp_path)
    for benchmark, expected in PHASES.items():
        assert set(measured.get(benchmark, {})) >= expected, f"{benchmark}: {sorted(measured.get(benchmark, {}))}"
        for name in expected:
            assert measured[benchmark][name]["per_s"] > 0, (benchmark, name, measured[benchmark][name])
    merged = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert merged["failed"] == [] and merged["projection"]["missing"] == {}
    assert "sdxl.fp16_plain_vs_fp32_default" in merged["ratios"]
    assert merged["qwen2_vl"]["phases"]["caption_batched"]["tokens_generated"] == 2 * 2  # 2 requests x 2 tokens
    assert (tmp_path / "gpu.log").read_text() == done.stdout  # the whole console log is kept with the results

    # the compile call again, with a backend that does not exist (as a real compile failure would
    # fail), into the same results: gpu.sh exits 1, and every other phase is still there
    again = gpu_sh(stand_in, wheelhouse, tmp_path, "--only", "sdxl_compile", COMPILE_ARGS="--compile-backend nope")
    assert again.returncode == 1, again.stdout[-4000:] + again.stderr[-4000:]
    assert "FAILED: sdxl_compile" in again.stdout
    measured = phases(tmp_path)
    assert "error" in measured["sdxl"]["compile"]
    for benchmark, expected in PHASES.items():
        kept = expected - {"compile"}
        assert all(measured[benchmark][name]["per_s"] > 0 for name in kept), (benchmark, measured[benchmark])
    merged = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert merged["failed"] == ["sdxl_compile"]
    assert "sdxl.compile_vs_channels_last" not in merged["ratios"]
    assert merged["projection"]["missing"] == {}  # the projection does not use the compile phase
