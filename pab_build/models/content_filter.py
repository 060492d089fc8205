"""A content filter on generated images: Stable Diffusion's safety checker (a deviation from the paper).

RealVisXL V4.0's model card warns that it can produce NSFW images, and the paper says nothing of
screening them. Every image the generate stage would keep goes through diffusers'
``StableDiffusionSafetyChecker`` (``CompVis/stable-diffusion-safety-checker``: CLIP ViT-L/14 image
embeddings compared with 17 concept and 3 special-care embeddings, each with its own threshold)
with its ``CLIPImageProcessor``, as diffusers' own Stable Diffusion pipelines run it; a flagged
image becomes a rejected row (:data:`REASON`) and is never written, so no later stage sees it.
``generate.content_filter: false`` turns it off (the dataset card says which was used).
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..config import PABConfig, model_path
from .loading import cached_model, inference, resolve_device, run_halving_on_oom, torch_dtype

REASON = "content filter: nsfw"


class SafetyChecker:
    """The checker and its image processor on one device."""

    def __init__(self, path: str, device: str, dtype: str, revision: str | None = None):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        self.processor = CLIPImageProcessor.from_pretrained(path, revision=revision)
        self.model = StableDiffusionSafetyChecker.from_pretrained(
            path, revision=revision, dtype=self.dtype, device_map=str(self.device)).eval()

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        """True for each image the checker flags (any concept score above its threshold)."""
        import numpy as np
        import torch

        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        with inference(self.model), torch.inference_mode():
            # `images` is only what the checker blacks out for a pipeline; the verdicts are what we use
            _, nsfw = self.model(clip_input=pixels.to(self.device, self.dtype),
                                 images=[np.zeros(1)] * len(images))
        return [bool(x) for x in nsfw]


def load_safety_checker(cfg: PABConfig) -> SafetyChecker:
    spec = cfg.models.safety_checker
    path = model_path(cfg, "safety_checker")
    return cached_model(("safety_checker", path, spec.revision, cfg.run.device, spec.dtype),
                        lambda: SafetyChecker(path, cfg.run.device, spec.dtype, spec.revision))


def content_flags(cfg: PABConfig, images: Sequence[Image.Image]) -> list[bool]:
    """The checker's verdict on each image, in batches of ``generate.batch_size`` (halved on OOM)."""
    if not images:
        return []
    checker = load_safety_checker(cfg)
    return run_halving_on_oom(list(images), cfg.generate.batch_size, checker.flagged)
