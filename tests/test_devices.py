"""GPU stages over several devices (one worker process each) and models released after a stage."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pab_build.models import loading as models
from pab_build.engine.devices import DevicePool, resolve_devices, wants_device_workers
from pab_build.manifests import OK, manifest_rel, write_manifest
from pab_build.stages.generate import STAGE as GENERATE_STAGE
from pab_build.engine.units import Context, finalize_stage, run_stage


def test_devices_come_from_the_config_or_the_single_device(smoke_cfg):
    assert resolve_devices(smoke_cfg) == ["cpu"]
    assert not wants_device_workers(smoke_cfg, uses_gpu=True)
    smoke_cfg.run.devices = ["cpu", "cpu"]
    assert resolve_devices(smoke_cfg) == ["cpu", "cpu"]
    assert wants_device_workers(smoke_cfg, uses_gpu=True)
    assert not wants_device_workers(smoke_cfg, uses_gpu=False)
    smoke_cfg.run.task_runner = "ray"  # Ray gives each unit its own GPU instead
    assert not wants_device_workers(smoke_cfg, uses_gpu=True)


def test_release_models_empties_the_cache():
    model = models.cached_model(("test-release", 1), lambda: torch.nn.Linear(2, 2))
    gone = weakref.ref(model)
    assert ("test-release", 1) in models.cached_keys()
    del model
    assert models.release_models() >= 1
    assert models.cached_keys() == [] and gone() is None


def test_a_stage_end_releases_only_models_no_running_stage_uses():
    models.release_models()
    load = lambda: torch.nn.Linear(2, 2)  # noqa: E731
    with models.models_held_for_stage(["qwen2_vl"]):  # test_captions (test branch)
        with models.models_held_for_stage(["sdxl"]):  # generate (training branch), at the same time
            models.cached_model(("qwen2_vl", "p"), load)
            models.cached_model(("sdxl", "p"), load)
            with models.models_held_for_stage(["qwen2_vl"]):  # train_captions starts meanwhile
                pass  # ... and ends first: test_captions still uses Qwen2-VL
            assert {k[0] for k in models.cached_keys()} == {"qwen2_vl", "sdxl"}
        assert [k[0] for k in models.cached_keys()] == ["qwen2_vl"]  # generate ended: SDXL freed
    assert models.cached_keys() == []


RELEASE_WHILE_TORCH_IMPORTS = """
import sys, threading, time
from pab_build.models import loading
importer = threading.Thread(target=lambda: __import__("torch"))
importer.start()
while "torch" not in sys.modules:
    time.sleep(0.0002)
half_made = not hasattr(sys.modules["torch"], "cuda")
loading.release_models([])
assert loading.is_oom(RuntimeError("CUDA out of memory")) and not loading.is_oom(ValueError("x"))
importer.join()
print("half-made torch seen:", half_made)
"""


def test_a_stage_ends_while_another_thread_still_imports_torch():
    """The two branches run in threads of one process: a stage that ends (releasing its models)
    while the other branch's first stage is importing torch saw a half-made module and failed the
    build ("partially initialized module 'torch' has no attribute 'cuda'"). In a fresh process."""
    r = subprocess.run([sys.executable, "-c", RELEASE_WHILE_TORCH_IMPORTS], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "half-made torch seen: True" in r.stdout  # the race was really run


def _generate_build(cfg, out: str) -> Context:
    ctx = Context.create(cfg, out)
    write_manifest(ctx.store, "prompts", [
        {"sample_key": f"c000000000{i}-n", "status": OK, "reason": None, "clip_key": f"c000000000{i}",
         "split": "train", "kind": "n", "prompt": f"a man number {i} rides a bike"} for i in range(3)])
    return ctx


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            if "/_markers/" not in path:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.mark.slow
def test_two_cpu_device_workers_share_the_units_and_match_a_one_worker_build(smoke_cfg, tiny_model, tmp_path):
    tiny_model("sdxl"), tiny_model("safety_checker")  # the smoke profile's content filter runs in generate
    sec = smoke_cfg.generate
    sec.images_per_caption, sec.images_per_unit, sec.batch_size = 4, 1, 1
    single = _generate_build(smoke_cfg, str(tmp_path / "single"))
    run_stage(single, GENERATE_STAGE)

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.run.devices = ["cpu", "cpu"]
    two = _generate_build(cfg, str(tmp_path / "two"))
    units = GENERATE_STAGE.plan_units(two)
    with DevicePool(cfg, resolve_devices(cfg)) as pool, ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda u: pool.run(two.store.url_root, "generate", u), units))
    finalize_stage(two, GENERATE_STAGE, units)

    assert results == ["done"] * len(units) == ["done"] * 12
    assert len(pool.units_per_worker) == 2 and min(pool.units_per_worker.values()) >= 1
    assert os.getpid() not in pool.units_per_worker
    assert _files(str(tmp_path / "two")) == _files(str(tmp_path / "single"))
    assert two.store.read_bytes(manifest_rel("generate")) == single.store.read_bytes(manifest_rel("generate"))
