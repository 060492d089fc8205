"""Loading SDXL / RealVisXL as its authors run it: scheduler, weights variant and fast paths.

The paper names the model (RealVisXL V4.0) and nothing else about sampling. RealVisXL V4.0's model
card recommends DPM++ 2M Karras (or DPM++ SDE Karras) with 25+ steps; its repository's
``scheduler/`` config is plain Euler, which is what ``from_pretrained`` gives. ``generate.scheduler``
chooses: ``default`` keeps the repository's, the others are diffusers' equivalents of the A1111
sampler names (the table in diffusers' scheduler docs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..config import GenerateConfig
from ..model_lock import weights_variant
from .loading import cached_model, resolve_device, torch_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# generate.scheduler -> (diffusers class, settings on top of the repository's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # A1111 "DPM++ 2M Karras"
    "ddim": ("DDIMScheduler", {}),
}


def load_sdxl_pipeline(path: str, device: str, dtype: str, settings: GenerateConfig, revision: str | None = None):
    """``StableDiffusionXLPipeline`` from a hub id or folder, loaded once per process and setting.

    Fast paths, each from the config: ``dtype`` (float16/bfloat16 from the model spec; float16
    reads the repository's ``fp16`` weights files where it has them), SDPA attention (``AttnProcessor2_0``,
    set explicitly) or attention slicing, channels-last UNet and VAE, VAE slicing, and
    ``torch.compile`` of the UNet (CUDA only; ignored with a warning elsewhere).
    """
    key = ("sdxl", path, revision, device, dtype, settings.scheduler,
           settings.attention_slicing, settings.vae_slicing, settings.channels_last, settings.compile_unet)
    return cached_model(key, lambda: build_sdxl_pipeline(path, device, dtype, settings, revision))


def build_sdxl_pipeline(path: str, device: str, dtype: str, settings: GenerateConfig, revision: str | None = None):
    """A new pipeline (not cached): what :func:`load_sdxl_pipeline` caches."""
    dev = resolve_device(device)
    pipe = _from_pretrained(path, revision, dtype, weights_variant(dtype))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    apply_scheduler(pipe, settings.scheduler)
    apply_fast_paths(pipe, settings, dev)
    return pipe


def _from_pretrained(path: str, revision: str | None, dtype: str, variant: str | None):
    from diffusers import StableDiffusionXLPipeline

    kwargs = dict(revision=revision, dtype=torch_dtype(dtype),
                  use_safetensors=True,  # never unpickle weights
                  add_watermarker=False)  # outputs must not depend on whether invisible-watermark is installed
    if variant:
        try:
            return StableDiffusionXLPipeline.from_pretrained(path, variant=variant, **kwargs)
        except ValueError as e:
            if f"variant={variant}" not in str(e):
                raise
            log.info("%s has no %s weights files: loading its default files", path, variant)
    return StableDiffusionXLPipeline.from_pretrained(path, **kwargs)


def apply_scheduler(pipe, name: str) -> None:
    """Swap in ``generate.scheduler`` built from the repository's own scheduler config (its
    betas, timestep spacing and prediction type); ``default`` keeps the repository's scheduler."""
    if name == "default":
        return
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def apply_fast_paths(pipe, settings: GenerateConfig, device: torch.device) -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    # SDPA is diffusers' default on torch 2, but a checkpoint's saved processors could override it
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if settings.attention_slicing:
        pipe.enable_attention_slicing()  # less peak memory, a little slower
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.vae_slicing:
        # decode a batch's latents one image at a time: the float32 (upcast) decode of 4 images at
        # 1024 px is the stage's memory peak; tiling would do nothing at this size (one 1024 px tile)
        pipe.vae.enable_slicing()
    if settings.compile_unet:
        if device.type == "cuda":
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        else:
            log.warning("generate.compile_unet is ignored on %s: it is a CUDA fast path", device)
