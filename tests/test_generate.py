"""Stage generate with the tiny SDXL pipeline (64 px, 2 steps)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch

from pab_build.config import ConfigError
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.models.loading import LOAD_COUNTS, release_models
from pab_build.stages import generate
from pab_build.stages.generate import STAGE as GENERATE_STAGE
from pab_build.stages.generate import image_key, image_seed
from pab_build.store import Store
from pab_build.engine.units import execute_unit, finalize_stage, run_stage

PROMPTS = {
    "c0000000001-n": ("n", "a man is riding a skateboard in a parking lot"),
    "c0000000001-a": ("a", "a man falls off his skateboard"),
}


def _write_prompts(ctx, prompts: dict[str, tuple[str, str]]) -> None:
    rows = [{"sample_key": pk, "status": OK, "reason": None, "clip_key": pk.rsplit("-", 1)[0], "split": "train",
             "kind": kind, "prompt": text} for pk, (kind, text) in prompts.items()]
    write_manifest(ctx.store, "prompts", rows)


@pytest.fixture
def gen_ctx(ctx, tiny_model):
    tiny_model("sdxl")
    tiny_model("safety_checker")
    sec = ctx.cfg.generate
    sec.images_per_caption, sec.images_per_unit, sec.batch_size = 3, 2, 2
    return ctx


def _pipe(ctx):
    return generate.load_pipeline_for(ctx.cfg)


def _jpeg(image, ctx) -> bytes:
    return generate.encode_jpeg(image, ctx.cfg.generate.jpeg_quality)


# -- seeds and pure checks -------------------------------------------------------------------------
RECORDED_SEED = 3105646067002043811  # image_seed(0, "c0000000001-a", 0) since the first release


def test_image_seed_is_a_fixed_function_of_base_seed_prompt_and_index():
    s = image_seed(0, "c0000000001-a", 0)
    # a recorded value, not the formula again: any change of the derivation changes every image
    assert s == RECORDED_SEED
    assert 0 <= s < 2**63
    others = {image_seed(0, "c0000000001-a", 1), image_seed(1, "c0000000001-a", 0), image_seed(0, "c0000000001-n", 0)}
    assert s not in others and len(others) == 3


def test_image_problem_finds_nan_inf_and_black_images():
    fine = np.full((8, 8, 3), 0.5, dtype=np.float32)
    assert generate.image_problem(fine) is None
    nan = fine.copy()
    nan[0, 0, 0] = np.nan
    assert "NaN/inf" in generate.image_problem(nan) and "1 of 192" in generate.image_problem(nan)
    inf = fine.copy()
    inf[1, 1, 1] = np.inf
    assert "NaN/inf" in generate.image_problem(inf)
    dark = np.full((8, 8, 3), 1.0 / 255, dtype=np.float32)  # mean 1.0 on the 0..255 scale
    assert "black image" in generate.image_problem(dark, black_threshold=2.0)
    assert generate.image_problem(dark, black_threshold=0.5) is None
    assert "black image" in generate.image_problem(np.zeros((8, 8, 3), np.uint8), black_threshold=2.0)
    assert generate.image_problem(np.full((8, 8, 3), 3, np.uint8), black_threshold=2.0) is None
    assert generate.image_problem(np.zeros((8, 8, 3), np.uint8), black_threshold=0.0) is None
    assert generate.image_problem(np.zeros((0, 0, 3), np.float32)) == "empty image"
    with pytest.raises(ValueError, match="NaN/inf"):
        generate.array_to_image(nan)
    assert np.asarray(generate.array_to_image(np.full((2, 2, 3), 0.5, np.float32))).tolist() == [[[128] * 3] * 2] * 2


# -- generating ------------------------------------------------------------------------------------
def test_same_seed_same_bytes_and_another_index_another_image(gen_ctx):
    pipe, sec = _pipe(gen_ctx), gen_ctx.cfg.generate
    seeds = [image_seed(0, "c0000000001-a", i) for i in (0, 1)]
    first, again = ([generate.array_to_image(a) for a in generate.generate_arrays(
        pipe, [PROMPTS["c0000000001-a"][1]] * 2, seeds, sec)[0]] for _ in range(2))
    assert [im.size for im in first] == [(sec.width, sec.height)] * 2
    assert [_jpeg(im, gen_ctx) for im in first] == [_jpeg(im, gen_ctx) for im in again]
    assert seeds[0] != seeds[1]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_an_image_depends_on_its_own_seed_only_up_to_batch_numerics(gen_ctx):
    """The finding behind recording batches: alone vs in a batch of 3, the same seed gives the same
    image up to float noise (on this CPU not always bit-identical, hence batch_first_index)."""
    pipe, sec = _pipe(gen_ctx), gen_ctx.cfg.generate
    seeds = [11, 12, 13]
    batch = generate.generate_batch(pipe, ["a woman falls"] * 3, seeds, sec)
    for slot, seed in enumerate(seeds):
        (alone,) = generate.generate_batch(pipe, ["a woman falls"], [seed], sec)
        np.testing.assert_allclose(alone, batch[slot], atol=1e-4)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)


def test_oom_halves_the_batch_instead_of_failing(gen_ctx):
    real, sec = _pipe(gen_ctx), gen_ctx.cfg.generate
    sizes = []

    def tight_memory_pipe(**kwargs):
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(**kwargs)

    sec.batch_size = 4
    seeds = [1, 2, 3]
    arrays, calls = generate.generate_arrays(tight_memory_pipe, ["a man jumps"] * 3, seeds, sec)
    assert sizes == [3, 2, 1, 1, 1] and calls == [(0, 1), (1, 1), (2, 1)]
    for array, seed in zip(arrays, seeds):
        (alone,) = generate.generate_batch(real, ["a man jumps"], [seed], sec)
        assert np.array_equal(array, alone)


def test_oom_at_batch_one_still_fails_the_unit(gen_ctx):
    def no_memory_pipe(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        generate.generate_arrays(no_memory_pipe, ["a man jumps"] * 2, [1, 2], gen_ctx.cfg.generate)


# -- loading and fast paths ------------------------------------------------------------------------
def test_pipeline_loads_once_per_process_with_sdpa_attention(gen_ctx):
    release_models()  # an earlier test may have loaded it (and a stage end released it)
    path = generate.model_path(gen_ctx.cfg, "sdxl")

    def loads():
        return sum(n for k, n in LOAD_COUNTS.items() if k[0] == "sdxl" and k[1] == path)

    before = loads()
    pipe = _pipe(gen_ctx)
    assert _pipe(gen_ctx) is pipe
    assert loads() == before + 1
    procs = {*pipe.unet.attn_processors.values(), *pipe.vae.attn_processors.values()}
    assert {type(p).__name__ for p in procs} == {"AttnProcessor2_0"}


@pytest.mark.parametrize(
    "toggle",
    ["attention_slicing", "channels_last", "vae_slicing", "compile_unet", "bfloat16"],
)
def test_fast_path_toggles_still_give_valid_images(gen_ctx, toggle, caplog):
    cfg = gen_ctx.cfg
    path, sec = generate.model_path(cfg, "sdxl"), cfg.generate
    baseline = generate.load_sdxl_pipeline(path, "cpu", "float32", sec)
    fast_sec = sec.model_copy()
    dtype = "float32"
    if toggle == "bfloat16":
        dtype = "bfloat16"
    else:
        setattr(fast_sec, toggle, True)
    with caplog.at_level(logging.WARNING, logger="pab_build.stages.generate"):
        fast = generate.load_sdxl_pipeline(path, "cpu", dtype, fast_sec)
    assert fast is not baseline
    (ref,) = generate.generate_batch(baseline, ["a man falls"], [5], sec)
    (got,) = generate.generate_batch(fast, ["a man falls"], [5], fast_sec)
    assert got.shape == (sec.height, sec.width, 3)
    assert generate.image_problem(got, black_threshold=1.0) is None
    if toggle == "attention_slicing":
        assert {type(p).__name__ for p in fast.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
        np.testing.assert_allclose(got, ref, atol=1e-4)
    elif toggle == "channels_last":
        assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(got, ref, atol=1e-4)
    elif toggle == "vae_slicing":
        assert fast.vae.use_slicing and not fast.vae.use_tiling
        np.testing.assert_allclose(got, ref, atol=1e-4)  # a batch of one: the same decode
    elif toggle == "compile_unet":
        assert "ignored on cpu" in caplog.text and isinstance(fast.unet, torch.nn.Module)
        assert not hasattr(fast.unet, "_orig_mod")  # not compiled on the CPU
        np.testing.assert_array_equal(got, ref)
    else:
        assert fast.unet.dtype == torch.bfloat16
        np.testing.assert_allclose(got, ref, atol=0.1)  # same picture, bf16 rounding


# -- the stage -------------------------------------------------------------------------------------
def test_plan_units_per_prompt_chunk_with_stable_ids(gen_ctx):
    _write_prompts(gen_ctx, PROMPTS)
    units = GENERATE_STAGE.plan_units(gen_ctx)
    assert [u.unit_id for u in units] == ["c0000000001-a-000", "c0000000001-a-001",
                                          "c0000000001-n-000", "c0000000001-n-001"]
    assert units[0].sample_keys == ["c0000000001-a-000", "c0000000001-a-001"]
    assert units[1].items[0]["seed"] == image_seed(gen_ctx.cfg.run.seed, "c0000000001-a", 2)
    before = {u.unit_id: u.input_hash for u in units}
    _write_prompts(gen_ctx, {**PROMPTS, "c0000000000-ap": ("a+", "a man falls off his skateboard onto the road")})
    after = {u.unit_id: u.input_hash for u in GENERATE_STAGE.plan_units(gen_ctx)}
    assert {k: after[k] for k in before} == before and len(after) == 6
    gen_ctx.cfg.generate.max_prompts = 1
    assert [u.unit_id for u in GENERATE_STAGE.plan_units(gen_ctx)] == ["c0000000000-ap-000", "c0000000000-ap-001"]
    gen_ctx.cfg.generate.height = 60
    with pytest.raises(ConfigError, match="generate.height=60"):
        GENERATE_STAGE.plan_units(gen_ctx)


def _file_bytes(ctx, rows) -> dict[str, bytes]:
    return {r["sample_key"]: ctx.store.read_bytes(r["image_path"]) for r in rows if r["status"] == OK}


def test_stage_writes_images_and_reruns_only_the_deleted_unit(gen_ctx):
    _write_prompts(gen_ctx, PROMPTS)
    assert run_stage(gen_ctx, GENERATE_STAGE) == {"done": 4, "skipped": 0, "failed": 0}
    rows = {r["sample_key"]: r for r in read_manifest(gen_ctx.store, "generate")}
    assert sorted(rows) == [image_key(pk, i) for pk in sorted(PROMPTS) for i in range(3)]
    r = rows["c0000000001-a-001"]
    assert r["status"] == OK and r["image_path"] == "generate/c0000000001-a/c0000000001-a-001.jpg"
    assert (r["index"], r["kind"], r["clip_key"], r["prompt_key"]) == (1, "a", "c0000000001", "c0000000001-a")
    assert r["seed"] == image_seed(0, "c0000000001-a", 1) and (r["width"], r["height"]) == (64, 64)
    assert (r["batch_first_index"], r["batch_size"]) == (0, 2)
    assert (rows["c0000000001-a-002"]["batch_first_index"], rows["c0000000001-a-002"]["batch_size"]) == (2, 1)
    assert r["model_id"] == gen_ctx.cfg.models.sdxl.path and r["prompt"] == PROMPTS["c0000000001-a"][1]
    files = _file_bytes(gen_ctx, rows.values())
    assert all(hashlib.sha256(files[k]).hexdigest() == rows[k]["image_sha256"] for k in files)
    manifest_before = gen_ctx.store.read_bytes("manifests/generate.parquet")

    lost = "c0000000001-n-000"
    gen_ctx.store.remove(Store.marker_rel("generate", lost))
    for k in ("c0000000001-n-000", "c0000000001-n-001"):
        gen_ctx.store.remove(rows[k]["image_path"])
    units = GENERATE_STAGE.plan_units(gen_ctx)
    status = {u.unit_id: execute_unit(gen_ctx, GENERATE_STAGE, u) for u in units}
    assert status == {u.unit_id: "done" if u.unit_id == lost else "skipped" for u in units}
    finalize_stage(gen_ctx, GENERATE_STAGE, units)
    assert _file_bytes(gen_ctx, rows.values()) == files
    assert gen_ctx.store.read_bytes("manifests/generate.parquet") == manifest_before


def test_regenerating_an_image_from_its_row_reproduces_the_file(gen_ctx):
    _write_prompts(gen_ctx, {"c0000000001-a": PROMPTS["c0000000001-a"]})
    run_stage(gen_ctx, GENERATE_STAGE)
    rows = read_manifest(gen_ctx.store, "generate")
    files = _file_bytes(gen_ctx, rows)
    for row in rows:  # slots 0 and 1 of a batch of 2, and a batch of 1
        assert _jpeg(generate.regenerate_image(gen_ctx.cfg, row), gen_ctx) == files[row["sample_key"]]
    key = "c0000000001-a-001"
    assert _jpeg(generate.regenerate_image(gen_ctx.cfg, key, gen_ctx.store), gen_ctx) == files[key]
    gen_ctx.cfg.run.seed = 1
    with pytest.raises(ValueError, match="another run.seed"):
        generate.regenerate_image(gen_ctx.cfg, rows[0])


def test_oom_halving_in_the_stage_is_recorded_and_regeneration_still_matches(gen_ctx, monkeypatch):
    _write_prompts(gen_ctx, {"c0000000001-n": PROMPTS["c0000000001-n"]})
    real = generate.load_pipeline_for(gen_ctx.cfg)

    def tight_memory_pipe(**kwargs):
        if len(kwargs["prompt"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(**kwargs)

    monkeypatch.setattr(generate, "load_pipeline_for", lambda cfg: tight_memory_pipe)
    assert run_stage(gen_ctx, GENERATE_STAGE)["done"] == 2
    monkeypatch.undo()
    rows = read_manifest(gen_ctx.store, "generate")
    assert [(r["status"], r["batch_size"]) for r in rows] == [(OK, 1)] * 3
    files = _file_bytes(gen_ctx, rows)
    for row in rows:
        assert _jpeg(generate.regenerate_image(gen_ctx.cfg, row), gen_ctx) == files[row["sample_key"]]


def test_nan_image_and_empty_prompt_become_rejected_rows(gen_ctx, monkeypatch):
    _write_prompts(gen_ctx, {"c0000000001-a": PROMPTS["c0000000001-a"], "c0000000002-n": ("n", "   ")})
    bad_seed = image_seed(0, "c0000000001-a", 1)
    real_batch = generate.generate_batch

    def batch_with_a_nan_image(pipe, prompts, seeds, settings):
        arrays = real_batch(pipe, prompts, seeds, settings)
        return [np.full_like(a, np.nan) if s == bad_seed else a for a, s in zip(arrays, seeds)]

    monkeypatch.setattr(generate, "generate_batch", batch_with_a_nan_image)
    run_stage(gen_ctx, GENERATE_STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(gen_ctx.store, "generate")}
    nan = rows["c0000000001-a-001"]
    assert nan["status"] == REJECTED and "NaN/inf" in nan["reason"] and nan["image_path"] is None
    assert nan["seed"] == bad_seed
    assert not gen_ctx.store.exists("generate/c0000000001-a/c0000000001-a-001.jpg")
    assert rows["c0000000001-a-000"]["status"] == OK and rows["c0000000001-a-002"]["status"] == OK
    empty = [rows[image_key("c0000000002-n", i)] for i in range(3)]
    assert all(r["status"] == REJECTED and r["reason"] == "empty prompt in the prompts manifest" for r in empty)
    with pytest.raises(ValueError, match="NaN/inf"):  # the recorded call reproduces the NaN image
        generate.regenerate_image(gen_ctx.cfg, nan)


def test_manifest_is_byte_identical_across_output_folders(gen_ctx, tmp_path):
    from pab_build.engine.units import Context

    other = Context.create(gen_ctx.cfg, str(tmp_path / "elsewhere"))
    for c in (gen_ctx, other):
        _write_prompts(c, {"c0000000001-n": PROMPTS["c0000000001-n"]})
        run_stage(c, GENERATE_STAGE)
    manifest = "manifests/generate.parquet"
    assert gen_ctx.store.read_bytes(manifest) == other.store.read_bytes(manifest)
    rows = read_manifest(gen_ctx.store, "generate")
    assert _file_bytes(gen_ctx, rows) == _file_bytes(other, rows)
