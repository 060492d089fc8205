"""SDXL images/s at 1024 px: two plain baselines, then the project's fast paths one at a time (GPU).

    python bench/bench_sdxl_gpu.py [--images 8] [--fp32-images 2] [--steps 30] [--json out.json]
    python bench/bench_sdxl_gpu.py --phases compile --json out.json   # the compile variant, own call
    python bench/bench_sdxl_gpu.py --dry-run    # CPU: build on the meta device, print parameter counts

No model hub is reachable, so the full-size SDXL architecture (RealVisXL V4.0 has SDXL base's
sizes) is built from its published configs with random weights: speed does not depend on them.
Every phase makes the same 1024 px, 30-step, classifier-free-guided images (configs/full.yaml's
prompt handling: negative prompt, guidance scale) from the same weights:

* ``fp32_default``: ``pipe(...)``, one image per call, float32: diffusers' default pipeline;
* ``fp16_plain``: the same calls with the weights in ``models.sdxl.dtype`` (float16), nothing else;
* ``batched``: :func:`generate_arrays` (the generate stage's call) in batches of ``generate.batch_size``;
* ``channels_last``: + channels-last UNet and VAE: configs/full.yaml's generate path;
* ``compile``: + ``torch.compile(unet, fullgraph=True)``, as ``generate.compile_unet`` does; run it in
  its own call (gpu.sh does), since compiling takes minutes; its warm-up time is recorded.

Image counts are rounded up to whole batches (a partial batch changes shapes in the timed region).
Left out: SDPA (diffusers' default attention on torch 2: nothing to switch on) and VAE tiling (the
SDXL VAE tiles only above 1024 px: no effect at this size). Random weights may give NaN images in
float16; the time per step is the same.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from gpu_common import Results, add_common_args, device_name, device_or_exit, rate, round_up, timed

# the project's code this benchmark measures (imports kept here, in one place)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.model_lock import locked_config  # noqa: E402
from pab_build.fixtures.tiny_sdxl import _build_tokenizer  # noqa: E402  (offline CLIP BPE tables)
from pab_build.stages.generate import apply_fast_paths, generate_arrays  # noqa: E402
from pab_build.models.loading import torch_dtype  # noqa: E402

PROMPT = "A man is riding a skateboard down a ramp in a parking lot and falls off, realistic photo"
PHASES = ("fp32_default", "fp16_plain", "batched", "channels_last", "compile")
DEFAULT_PHASES = PHASES[:-1]

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


# --toy: the same pipeline classes at a few million parameters (CPU tests of the code paths)
TOY_UNET_CONFIG = dict(
    UNET_CONFIG, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
)
TOY_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=(32, 32, 32, 32), sample_size=64)
TOY_CLIP_CONFIG = dict(CLIP_L_CONFIG, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=32)


def build_sdxl_pipeline(device: str | torch.device, toy: bool = False):
    """Full-size (or ``toy``) SDXL with random weights, created on ``device`` ("meta": no memory)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > CLIP_L_CONFIG["vocab_size"]:
        raise RuntimeError(f"the offline tokenizer has {len(tokenizer)} tokens, more than CLIP's vocabulary")
    unet_config, vae_config, clip_l, clip_g = (
        (TOY_UNET_CONFIG, TOY_VAE_CONFIG, TOY_CLIP_CONFIG, TOY_CLIP_CONFIG) if toy
        else (UNET_CONFIG, VAE_CONFIG, CLIP_L_CONFIG, CLIP_G_CONFIG))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device: no 14 GB detour through host memory
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g, **ids))
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


def one_image_per_call(pipe, settings, n_images: int, device: torch.device) -> dict:
    """``n_images`` plain pipeline calls of one image each, after one warm-up call."""
    def call(seed: int) -> None:
        pipe(PROMPT, negative_prompt=settings.negative_prompt or None, num_inference_steps=settings.steps,
             guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")

    warm_up = timed(device, lambda: call(0))  # kernel selection, allocator
    seconds = timed(device, lambda: [call(i + 1) for i in range(n_images)])
    return rate(n_images, seconds, "images/s", batch_size=1, warm_up_s=warm_up)


def generate_path(pipe, settings, n_images: int, device: torch.device) -> dict:
    """The generate stage's call (:func:`generate_arrays`), after a warm-up of one full batch."""
    warm_up = timed(device, lambda: generate_arrays(pipe, [PROMPT] * settings.batch_size,
                                                    list(range(settings.batch_size)), settings))
    seconds = timed(device, lambda: generate_arrays(pipe, [PROMPT] * n_images, list(range(1, n_images + 1)),
                                                    settings))
    return rate(n_images, seconds, "images/s", batch_size=settings.batch_size, warm_up_s=warm_up)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8, help="timed images per phase, rounded up to whole batches")
    ap.add_argument("--fp32-images", type=int, default=2, help="timed images of the (slow) fp32_default phase")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None, help="default: configs/full.yaml generate.batch_size")
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile phase")
    ap.add_argument("--toy", action="store_true", help="a few-million-parameter SDXL (CPU tests of the code paths)")
    add_common_args(ap)
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")

    overrides = [f"generate.steps={args.steps}", f"generate.height={args.size}", f"generate.width={args.size}",
                 "generate.vae_slicing=false", "generate.channels_last=false", "generate.compile_unet=false",
                 "generate.attention_slicing=false"]
    if args.batch_size:
        overrides.append(f"generate.batch_size={args.batch_size}")
    cfg = locked_config("full", overrides)
    plain, dtype = cfg.generate, cfg.models.sdxl.dtype
    channels_last = plain.model_copy(update={"channels_last": True})
    n_images = round_up(args.images, plain.batch_size)

    if args.dry_run:
        pipe = build_sdxl_pipeline("meta", args.toy)
        apply_fast_paths(pipe, channels_last, torch.device("cpu"))  # the settings apply to this architecture
        counts = parameter_counts(pipe)
        for name, n in counts.items():
            print(f"{name:15s} {n / 1e6:10.1f} M parameters")
        print(f"{'total':15s} {sum(counts.values()) / 1e9:10.3f} B parameters")
        print(f"dry run ok: {dtype}, batch {plain.batch_size}, {plain.steps} steps, {plain.height}x{plain.width}; "
              f"phases {', '.join(phases)}; {n_images} images per phase ({args.fp32_images} in fp32_default)")
        return 0
    device = device_or_exit(args.device, "bench_sdxl_gpu")
    if device is None:
        return 2

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the fp16 pipeline warns at each call when it upcasts the VAE
    pipe = build_sdxl_pipeline(device, args.toy)  # float32, diffusers' defaults: the plain pipeline
    results = Results(args.json, "sdxl", gpu=device_name(device), torch=torch.__version__, toy=args.toy,
                      steps=plain.steps, size=plain.height, batch_size=plain.batch_size, dtype=dtype,
                      guidance_scale=plain.guidance_scale, parameters=parameter_counts(pipe))
    if "fp32_default" in phases:
        results.phase("fp32_default", "diffusers' default pipeline: float32, one image per call",
                      lambda: one_image_per_call(pipe, plain, args.fp32_images, device))
    pipe.to(dtype=torch_dtype(dtype))
    if "fp16_plain" in phases:
        results.phase("fp16_plain", f"{dtype} weights, one image per call, nothing else changed",
                      lambda: one_image_per_call(pipe, plain, n_images, device))
    if "batched" in phases:
        results.phase("batched", f"{dtype}, generate stage's call, batches of {plain.batch_size}",
                      lambda: generate_path(pipe, plain, n_images, device))
    if {"channels_last", "compile"} & set(phases):
        apply_fast_paths(pipe, channels_last, device)
    if "channels_last" in phases:
        results.phase("channels_last", f"{dtype}, batches of {plain.batch_size}, channels-last UNet and VAE "
                      "(configs/full.yaml's generate path)", lambda: generate_path(pipe, channels_last, n_images, device))
    if "compile" in phases:
        def compiled() -> dict:
            # what generate.compile_unet does (pab_build.stages.generate.apply_fast_paths), backend selectable
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=args.compile_backend)
            return {**generate_path(pipe, channels_last, n_images, device), "compile_backend": args.compile_backend}

        results.phase("compile", f"channels_last + torch.compile(unet, fullgraph=True, backend={args.compile_backend})"
                      "; warm_up_s includes compiling", compiled)
    return results.exit_code()


if __name__ == "__main__":
    sys.exit(main())
