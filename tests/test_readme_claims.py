"""README claims that had no test: Ray resource requests, the credentials block, OUT/config.yaml,
the cross-stage cascade, ``pab status``, and ``trust_remote_code`` reaching the model loaders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pab_build.config import config_from_dict, load_config
from pab_build.manifests import read_manifest
from pab_build.engine.pipeline import STAGE_ORDER, get_stage
from pab_build.engine.prepare import prepare_build
from pab_build.engine.units import Context, run_stage


# -- "a GPU stage's Ray actors ask for run.gpus_per_unit GPUs (run.ray_gpu_share for small models), all for
# run.cpus_per_unit CPUs" ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_ray_actors_ask_for_gpus_only_in_gpu_stages_of_cuda_builds(device):
    from pab_build.engine.ray_cluster import actor_resources

    cfg = load_config("smoke", {"run.task_runner": "ray", "run.device": device, "run.gpus_per_unit": 0.5,
                                "run.cpus_per_unit": 3, "run.ray_gpu_share": {"pose": 0.25}})
    gpu_stages = {name for name in STAGE_ORDER if get_stage(name).uses_gpu}
    assert {"generate", "test_captions", "train_captions", "pose"} <= gpu_stages and "frames" not in gpu_stages
    for name in STAGE_ORDER:
        asked = actor_resources(cfg, name, get_stage(name).uses_gpu)
        want_gpus = (0.25 if name == "pose" else 0.5) if device == "cuda" and name in gpu_stages else 0
        assert asked == {"num_cpus": 3, "num_gpus": want_gpus}, name


# -- "credentials ... from a Prefect Secret block named by publish.credentials_block" ------------
def test_the_credentials_block_reaches_publish_and_no_file(monkeypatch, tmp_path):
    from prefect.blocks import system

    import flows.build_pab as build_pab
    from pab_build.release import publish as publish_mod

    secret = {"key": "AKIDEXAMPLE", "secret": "s3cr3t-from-the-block"}
    loaded, seen = [], {}
    monkeypatch.setattr(system.Secret, "load", classmethod(lambda cls, name: loaded.append(name) or
                                                           type("S", (), {"get": lambda self: secret})()))

    def spy_publish(out, url, storage_options=None, **kw):
        seen.update(out=out, url=url, options=storage_options)
        return publish_mod.PublishReport(url=url)

    monkeypatch.setattr(publish_mod, "publish", spy_publish)
    cfg = load_config("smoke", {"publish.credentials_block": "pab-s3",
                                "publish.storage_options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}})
    build_pab.publish_task.fn(cfg, str(tmp_path), "s3://bucket/pab")
    assert loaded == ["pab-s3"]
    assert seen["options"] == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, **secret}
    prepare_build(cfg.model_copy(update={"fixtures": cfg.fixtures.model_copy(
        update={"build_tiny_models": False, "build_sample_oops": False})}), str(tmp_path))
    assert "s3cr3t" not in (tmp_path / "config.yaml").read_text()  # the block's values never reach disk


# -- "The resolved config is saved as OUT/config.yaml" ---------------------------------------------
def test_the_resolved_config_is_saved_and_reads_back_equal(tmp_path):
    cfg = load_config("smoke", {"fixtures.build_tiny_models": False, "fixtures.build_sample_oops": False,
                                "pairs.max_cosine": 0.75})
    prepare_build(cfg, str(tmp_path))
    saved = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert saved == cfg and saved.pairs.max_cosine == 0.75
    for name in STAGE_ORDER:
        assert get_stage(name).stage_hash(saved) == get_stage(name).stage_hash(cfg), name


# -- "Changing a stage's config redoes that stage and whatever its changed outputs feed, never the
#    stages before it" -- on the real frames and pose stages ---------------------------------------
@pytest.mark.slow
def test_a_config_change_cascades_downstream_only(smoke_cfg, tiny_model, tmp_path):
    tiny_model("openpose")
    out = str(tmp_path / "out")
    prepare_build(smoke_cfg, out)
    ctx = Context.create(smoke_cfg, out)
    for name in ("frames", "pose"):
        assert run_stage(ctx, get_stage(name))["failed"] == 0
    frames_before = read_manifest(ctx.store, "frames")
    changed = Context.create(smoke_cfg.model_copy(update={"frames": smoke_cfg.frames.model_copy(
        update={"max_side": 64})}), out)
    assert run_stage(changed, get_stage("frames"))["skipped"] == 0  # its config changed: redone
    assert read_manifest(changed.store, "frames") != frames_before  # smaller images, other sha256
    pose = run_stage(changed, get_stage("pose"))
    assert pose["skipped"] == 0 and pose["done"] > 0  # fed changed outputs: redone
    # the stage before is never redone for a later stage's config
    later = Context.create(smoke_cfg.model_copy(update={"frames": smoke_cfg.frames.model_copy(
        update={"max_side": 64}), "pose": smoke_cfg.pose.model_copy(update={"detect_resolution": 96})}), out)
    assert run_stage(later, get_stage("frames"))["done"] == 0


# -- "pab status OUT shows units done / failed / pending and rows ok / rejected per stage" ---------
def test_pab_status_reports_units_and_rows(smoke_cfg, tmp_path):
    out = str(tmp_path / "out")
    prepare_build(smoke_cfg, out)
    ctx = Context.create(smoke_cfg, out)
    run_stage(ctx, get_stage("frames"))
    rows = read_manifest(ctx.store, "frames")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "status", out], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.split()}
    assert table["stage"][:6] == ["stage", "done", "failed", "pending", "ok", "rejected"]  # then timings
    units = len(get_stage("frames").plan_units(ctx))
    ok = sum(r["status"] == "ok" for r in rows)
    assert table["frames"][1:6] == [str(units), "0", "0", str(ok), str(len(rows) - ok)]
    assert table["pose"][1:4] == ["0", "0", str(len(get_stage("pose").plan_units(ctx)))]  # planned, not run
    assert table["pose"][4:6] == ["-", "-"]


# -- "trust_remote_code stays off unless run.trust_remote_code: true" ------------------------------
@pytest.mark.parametrize("opt_in", [False, True])
def test_trust_remote_code_reaches_the_vlm_loaders(monkeypatch, opt_in):
    import transformers

    from pab_build.models import vlm

    seen = []

    class Stop(Exception):
        pass

    def record(name):
        def from_pretrained(path, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code")))
            if name == "model":
                raise Stop
            return type("P", (), {"tokenizer": type("T", (), {})()})()
        return staticmethod(from_pretrained)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", record("processor"))
    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained", record("model"))
    cfg = load_config("smoke", {"run.trust_remote_code": opt_in, "fixtures.models_dir": f"/nonexistent-{opt_in}"})
    with pytest.raises(Stop):
        vlm.load_backend(cfg, cfg.test_captions.generation)
    assert seen == [("processor", opt_in), ("model", opt_in)]
