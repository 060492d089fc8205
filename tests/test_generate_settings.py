"""SDXL as its authors run it (scheduler, weights variant, plain negative prompt) and the content
filter (issue 19, parts 2 and 3). Tiny SDXL and a tiny random safety checker, 64 px, 2 steps."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from pab_build.config import ConfigError, load_config
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.model_lock import profile_models
from pab_build.models import content_filter
from pab_build.models.loading import release_models
from pab_build.stages import generate
from pab_build.stages.generate import STAGE as GENERATE_STAGE
from pab_build.engine.units import run_stage
from test_generate import gen_ctx  # noqa: F401 (fixture)


@pytest.fixture
def one_unit_ctx(gen_ctx):  # noqa: F811
    """A prompt's 3 images in one unit and one pipeline call (the content filter sees them together)."""
    gen_ctx.cfg.generate.images_per_unit = gen_ctx.cfg.generate.batch_size = 3
    yield gen_ctx
    release_models(["sdxl", "safety_checker"])


def test_profiles_run_sdxl_as_the_model_card_says_and_refuse_a1111_weighting():
    full = load_config("full").generate
    assert (full.scheduler, full.vae_slicing, full.content_filter) == ("dpmpp_2m_karras", True, True)
    assert generate.weights_variant(load_config("full").models.sdxl.dtype) == "fp16"
    assert full.steps >= 25 and "(" not in full.negative_prompt and "worst quality" in full.negative_prompt
    smoke = load_config("smoke").generate
    assert (smoke.scheduler, smoke.content_filter) == ("default", True)
    with pytest.raises(ConfigError, match="negative_prompt"):
        load_config("smoke", {"generate.negative_prompt": "(worst quality:1.2), sketch"})
    assert "safety_checker" in profile_models(load_config("full"))
    assert "safety_checker" not in profile_models(load_config("full", {"generate.content_filter": False}))


def test_dpmpp_2m_karras_is_built_from_the_repository_scheduler_config(one_unit_ctx):
    cfg = one_unit_ctx.cfg
    path, sec = generate.model_path(cfg, "sdxl"), cfg.generate
    euler = generate.load_sdxl_pipeline(path, "cpu", "float32", sec)
    dpm_sec = sec.model_copy(update={"scheduler": "dpmpp_2m_karras"})
    dpm = generate.load_sdxl_pipeline(path, "cpu", "float32", dpm_sec)
    assert type(euler.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(dpm.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.scheduler.config.use_karras_sigmas and dpm.scheduler.config.algorithm_type == "dpmsolver++"
    for k in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"):
        assert dpm.scheduler.config[k] == euler.scheduler.config[k], k  # the repository's own betas
    (b,) = generate.generate_batch(dpm, ["a man falls"], [3], dpm_sec)
    assert generate.image_problem(b, black_threshold=1.0) is None


def test_the_fp16_variant_is_loaded_where_it_exists_and_skipped_cleanly_where_not(one_unit_ctx, tmp_path, caplog):
    src = generate.model_path(one_unit_ctx.cfg, "sdxl")
    sec = one_unit_ctx.cfg.generate
    with caplog.at_level("INFO", logger="pab_build.models.sdxl"):
        plain = generate.build_sdxl_pipeline(src, "cpu", "float16", sec)  # the tiny repo has no fp16 files
    assert "no fp16 weights files" in caplog.text and plain.unet.dtype == torch.float16
    with_variant = str(tmp_path / "sdxl-fp16")
    shutil.copytree(src, with_variant)
    plain.save_pretrained(with_variant, variant="fp16", safe_serialization=True)
    assert os.path.exists(os.path.join(with_variant, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    # poison the default files: a load that read them instead of the variant would fail
    os.remove(os.path.join(with_variant, "unet", "diffusion_pytorch_model.safetensors"))
    caplog.clear()
    fp16 = generate.build_sdxl_pipeline(with_variant, "cpu", "float16", sec)
    assert "no fp16" not in caplog.text
    (x,) = generate.generate_batch(fp16, ["a man falls"], [3], sec)
    (y,) = generate.generate_batch(plain, ["a man falls"], [3], sec)
    assert x.tobytes() == y.tobytes()  # the fp16 files are the same weights


def _flag_rows(monkeypatch, checker, positions: set[int]):
    """Replace only the checker's raw output (the image embedding): rows at ``positions`` of each
    call get the first concept embedding, so the real cosine/threshold post-processing flags them."""
    real = checker.model.visual_projection

    class Projection(torch.nn.Module):
        def forward(self, pooled):
            out = real(pooled).clone()
            for i in positions & set(range(out.shape[0])):
                out[i] = checker.model.concept_embeds[0]
            return out

    monkeypatch.setattr(checker.model, "visual_projection", Projection())


def test_flagged_images_become_rejected_rows_and_are_never_written(one_unit_ctx, monkeypatch):
    rows = [{"sample_key": "c0000000001-a", "status": OK, "reason": None, "clip_key": "c0000000001",
             "split": "train", "kind": "a", "prompt": "a man falls off his skateboard"}]
    write_manifest(one_unit_ctx.store, "prompts", rows)
    checker = content_filter.load_safety_checker(one_unit_ctx.cfg)
    assert checker.flagged([generate.array_to_image(np.full((64, 64, 3), 0.5, np.float32))]) == [False]
    _flag_rows(monkeypatch, checker, {1})
    run_stage(one_unit_ctx, GENERATE_STAGE)
    got = {r["sample_key"]: r for r in read_manifest(one_unit_ctx.store, "generate")}
    bad = got["c0000000001-a-001"]
    assert bad["status"] == REJECTED and bad["reason"] == content_filter.REASON == "content filter: nsfw"
    assert bad["image_path"] is None and bad["seed"] is not None and bad["batch_size"] == 3
    assert not one_unit_ctx.store.exists("generate/c0000000001-a/c0000000001-a-001.jpg")
    assert [got[f"c0000000001-a-00{i}"]["status"] for i in (0, 2)] == [OK, OK]


def test_the_content_filter_is_off_with_a_setting(one_unit_ctx, monkeypatch):
    write_manifest(one_unit_ctx.store, "prompts", [{"sample_key": "c0000000001-n", "status": OK, "reason": None,
                   "clip_key": "c0000000001", "split": "train", "kind": "n", "prompt": "a man walks"}])
    one_unit_ctx.cfg.generate.content_filter = False
    monkeypatch.setattr(content_filter, "load_safety_checker", lambda cfg: pytest.fail("the filter ran"))
    run_stage(one_unit_ctx, GENERATE_STAGE)
    assert [r["status"] for r in read_manifest(one_unit_ctx.store, "generate")] == [OK] * 3
