"""SDXL images/s at 1024 px: the project's generate path vs. a plain diffusers pipeline (GPU only).

    python bench/bench_sdxl_gpu.py [--images 8] [--steps 30] [--compile] [--json out.json]
    python bench/bench_sdxl_gpu.py --dry-run    # CPU: build on the meta device, print parameter counts

No model hub is reachable, so the full-size SDXL architecture (RealVisXL V4.0 has SDXL base's
sizes) is built from its published configs with random weights: speed does not depend on them.
Both runs use the same weights and the same 1024 px, 30-step, classifier-free-guided calls:

* baseline: ``pipe(prompt)`` one image per call, float32, diffusers' default attention;
* optimised: the weights cast to ``models.sdxl.dtype``, :func:`pab_build.stages.generate.apply_fast_paths`
  with configs/full.yaml's ``generate`` settings (SDPA, channels-last, VAE tiling, compile if
  ``--compile``), images made by :func:`pab_build.stages.generate.generate_arrays` in batches of
  ``generate.batch_size``.

Random weights may produce NaN images in float16; the time per step is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.config import load_config  # noqa: E402
from pab_build.fixtures.tiny_sdxl import _build_tokenizer  # noqa: E402  (offline CLIP BPE tables)
from pab_build.models import torch_dtype  # noqa: E402
from pab_build.stages.generate import (
    apply_fast_paths,
    generate_arrays,  # noqa: E402
)

NO_CUDA_EXIT = 2
PROMPT = "A man is riding a skateboard down a ramp in a parking lot and falls off, realistic photo"

# SDXL base 1.0 (and RealVisXL V4.0) unet/config.json
UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 micro-conditions x 256 + 1280 pooled text
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# SDXL's vae/config.json
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# text_encoder: CLIP ViT-L/14's text tower; text_encoder_2: OpenCLIP ViT-bigG/14's
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768)
CLIP_G_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                     projection_dim=1280)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        timestep_spacing="leading", prediction_type="epsilon")


def build_sdxl_pipeline(device: str | torch.device):
    """Full-size SDXL with random weights, created directly on ``device`` ("meta": no memory)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > CLIP_L_CONFIG["vocab_size"]:
        raise RuntimeError(f"the offline tokenizer has {len(tokenizer)} tokens, more than CLIP's vocabulary")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device: no 14 GB detour through host memory
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG, **ids))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def time_baseline(pipe, n_images: int, steps: int, size: int) -> float:
    """Images/s of plain ``pipe(prompt)`` calls, one image each (diffusers' defaults otherwise)."""
    def one(seed: int) -> None:
        pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")

    one(0)  # warm-up: kernel selection, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_images):
        one(i + 1)
    torch.cuda.synchronize()
    return n_images / (time.perf_counter() - t0)


def time_optimised(pipe, settings, n_images: int) -> float:
    """Images/s of the project's generate path (batches of ``settings.batch_size``, OOM halving)."""
    generate_arrays(pipe, [PROMPT] * settings.batch_size, list(range(settings.batch_size)), settings)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_arrays(pipe, [PROMPT] * n_images, list(range(1, n_images + 1)), settings)
    torch.cuda.synchronize()
    return n_images / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8, help="timed images per variant (after a warm-up call)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None, help="default: configs/full.yaml generate.batch_size")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the UNet (slow first call)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dry-run", action="store_true", help="CPU check: build on the meta device, count parameters")
    args = ap.parse_args()

    overrides = [f"generate.steps={args.steps}", f"generate.height={args.size}", f"generate.width={args.size}",
                 f"generate.compile_unet={str(args.compile).lower()}"]
    if args.batch_size:
        overrides.append(f"generate.batch_size={args.batch_size}")
    cfg = load_config("full", overrides)
    settings, dtype = cfg.generate, cfg.models.sdxl.dtype

    if args.dry_run:
        pipe = build_sdxl_pipeline("meta")
        apply_fast_paths(pipe, settings, torch.device("cpu"))  # the settings apply to this architecture
        counts = parameter_counts(pipe)
        for name, n in counts.items():
            print(f"{name:15s} {n / 1e6:10.1f} M parameters")
        print(f"{'total':15s} {sum(counts.values()) / 1e9:10.3f} B parameters")
        print(f"dry run ok: optimised = {dtype}, batch {settings.batch_size}, {settings.steps} steps, "
              f"{settings.height}x{settings.width}, vae_tiling={settings.vae_tiling}, "
              f"channels_last={settings.channels_last}, compile_unet={settings.compile_unet}")
        return 0
    if not torch.cuda.is_available():
        print("bench_sdxl_gpu: no CUDA device; this benchmark needs a GPU (use --dry-run to check it on the CPU)",
              file=sys.stderr)
        return NO_CUDA_EXIT

    device = torch.device("cuda")
    pipe = build_sdxl_pipeline(device)  # float32, default attention: the plain pipeline
    result = {"benchmark": "sdxl", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "images": args.images, "steps": args.steps, "size": args.size,
              "parameters": parameter_counts(pipe),
              "optimised_settings": {"dtype": dtype, "batch_size": settings.batch_size,
                                     "vae_tiling": settings.vae_tiling, "channels_last": settings.channels_last,
                                     "attention_slicing": settings.attention_slicing,
                                     "compile_unet": settings.compile_unet}}
    if not args.skip_baseline:
        result["baseline_images_per_s"] = time_baseline(pipe, args.images, args.steps, args.size)
        print(f"baseline  (float32, default attention, 1 image/call): {result['baseline_images_per_s']:.3f} images/s")
    pipe.to(dtype=torch_dtype(dtype))
    apply_fast_paths(pipe, settings, device)
    result["optimised_images_per_s"] = time_optimised(pipe, settings, args.images)
    print(f"optimised ({dtype}, SDPA, channels-last={settings.channels_last}, batch {settings.batch_size}): "
          f"{result['optimised_images_per_s']:.3f} images/s")
    if "baseline_images_per_s" in result:
        result["ratio"] = result["optimised_images_per_s"] / result["baseline_images_per_s"]
        print(f"ratio optimised/baseline: {result['ratio']:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
