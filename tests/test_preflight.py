"""Preflight: every problem at once, in seconds, offline, before anything is written under OUT."""

import os
import subprocess
import sys
import time

from pab_build.config import load_config
from pab_build.engine.preflight import check_oops, check_packages, check_publish, run_checks


def test_full_run_without_gpu_or_cached_models_fails_fast_and_writes_nothing(tmp_path):
    out, root = tmp_path / "X", tmp_path / "R"
    root.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "CUDA_VISIBLE_DEVICES": ""}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "full", "--out", str(out), "--oops-root", str(root)],
                          env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - start
    assert proc.returncode == 2, proc.stderr
    assert took < 60
    err = proc.stderr
    assert "device" in err and "CUDA is not available" in err
    for model in ("SG161222/RealVisXL_V4.0", "Qwen/Qwen2-VL-7B-Instruct", "lllyasviel/Annotators",
                  "torchvision:IMAGENET1K_V1"):
        assert model in err
    assert "no clip with a video" in err  # an empty OOPS! root is a problem too
    assert "16m_base_model_state_step_199999.th: no such file" in err  # CMP's init, trained after the build
    assert not out.exists()


def test_smoke_profile_passes_and_problems_are_named(tmp_path, sample_oops_root, tiny_model):
    tiny_model("resnet50")
    cfg = load_config("smoke", {"oops.root": sample_oops_root, "cmp.train_after_build": False})
    rows = run_checks(cfg, str(tmp_path / "out"))
    assert [r for r in rows if r.problem] == [], rows
    assert not (tmp_path / "out").exists()
    bad = load_config("smoke", {"oops.root": str(tmp_path / "missing"), "run.task_runner": "ray",
                                "models.resnet50.path": str(tmp_path / "nope"), "fixtures.build_tiny_models": False,
                                "test_captions.generation.backend": "vllm"})
    problems = {r.check: r.detail for r in run_checks(bad, str(tmp_path / "out")) if r.problem}
    assert "model resnet50" in problems and "OOPS! root" in problems
    assert any(r.problem for r in check_packages(bad)) == ("vllm" not in sys.modules and
                                                          __import__("importlib").util.find_spec("vllm") is None)


def test_unparseable_annotations_and_missing_credentials_are_problems(tmp_path, monkeypatch):
    root = tmp_path / "oops"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "transition_times.json").write_text("{not json")
    cfg = load_config("smoke", {"oops.root": str(root), "fixtures.build_sample_oops": False})
    rows = check_oops(cfg)
    assert any(r.problem and r.check == "OOPS! clips" for r in rows)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.time()
    (row,) = check_publish(cfg, "s3://bucket/pab")
    assert row.problem and "no AWS credentials" in row.detail and time.time() - start < 10
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    assert not check_publish(cfg, "s3://bucket/pab")[0].problem


def test_cmp_init_checkpoint_is_checked_only_when_cmp_trains_after_the_build(tmp_path):
    from pab_build.engine.preflight import check_cmp_init

    missing = str(tmp_path / "16m_base_model_state_step_199999.th")
    cfg = load_config("smoke", {"cmp.train_after_build": True, "cmp.init_checkpoint": missing})
    (row,) = check_cmp_init(cfg)
    assert row.problem and missing in row.detail
    assert check_cmp_init(cfg, ["frames", "pose"]) == []  # `--until pose` trains no CMP
    assert check_cmp_init(load_config("smoke", {"cmp.train_after_build": False, "cmp.init_checkpoint": missing})) == []
    (tmp_path / "16m_base_model_state_step_199999.th").write_bytes(b"\0" * 1024)
    (row,) = check_cmp_init(cfg)
    assert not row.problem
    os.remove(missing)
    os.mkdir(missing)  # a folder is not a checkpoint
    assert check_cmp_init(cfg)[0].problem


def test_vllm_memory_share_is_checked_against_the_other_models_of_the_worker(monkeypatch):
    from pab_build.engine import preflight

    over = {"run.device": "cuda:0", "test_captions.generation.backend": "vllm"}
    assert preflight.check_gpu_memory(load_config("full")) == []  # transformers backend: nothing reserved
    monkeypatch.setattr(preflight, "_gpu_total_gib", lambda device: 80.0)
    (row,) = preflight.check_gpu_memory(load_config("full", over))  # 0.9 x 80 = 72 GiB + ~17 GiB > 80
    assert row.problem and "vllm_gpu_memory_utilization=0.9 of 80 GiB" in row.detail
    assert "sdxl ~12.0" in row.detail and "safety_checker ~1.5" in row.detail
    assert "set run.vllm_gpu_memory_utilization <= 0.78" in row.detail
    (row,) = preflight.check_gpu_memory(load_config("full", {**over, "run.vllm_gpu_memory_utilization": 0.75}))
    assert row.ok
    # only the stages this run goes up to: test_captions alone leaves Qwen2-VL beside OpenPose and ResNet-50
    (row,) = preflight.check_gpu_memory(load_config("full", over), ["pose", "pairs", "test_captions"])
    assert row.ok and "sdxl" not in row.detail
    monkeypatch.setattr(preflight, "_gpu_total_gib", lambda device: None)
    (row,) = preflight.check_gpu_memory(load_config("full", over))
    assert row.ok and "not checked" in row.detail
