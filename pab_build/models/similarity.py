"""ResNet-50 image embeddings and the pair cosine rule (used by the stage ``pairs``).

Paper 3.1: "we use ResNet-50 to extract features from the images and calculate the cosine
similarity between normal and anomaly images, filtering out pairs with a similarity greater than
0.95". Features are ResNet-50's pooled 2048-d vectors (the classifier removed), L2-normalised.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from PIL import Image

from .loading import cached_model, inference, resolve_device, run_halving_on_oom

if TYPE_CHECKING:
    import torch  # imported where features are computed: planning and finalizing never pay for it

WEIGHTS_FILE = "model.safetensors"  # a local folder holds resnet50's state dict in this file


TORCHVISION_PREFIX = "torchvision:"  # "torchvision:IMAGENET1K_V1" = torchvision's ResNet50_Weights member


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def load_resnet50(spec_path: str, device: str) -> torch.nn.Module:
    """ResNet-50 feature extractor (``fc`` = identity), loaded once per process, in eval mode.

    ``"torchvision:IMAGENET1K_V1"`` loads torchvision's published weights (downloaded into the torch
    hub cache on first use); a folder loads its ``model.safetensors`` into ``resnet50(weights=None)``.
    """
    dev = resolve_device(device)

    def load() -> torch.nn.Module:
        import torch
        from torchvision.models import ResNet50_Weights, resnet50

        if spec_path.startswith(TORCHVISION_PREFIX):
            name = spec_path[len(TORCHVISION_PREFIX):]
            try:
                weights = ResNet50_Weights[name]
            except KeyError:
                known = ", ".join(w.name for w in ResNet50_Weights)
                raise ValueError(f"unknown torchvision ResNet-50 weights {name!r}; known: {known}") from None
            model = resnet50(weights=weights)
        else:
            from safetensors.torch import load_file

            weights_file = os.path.join(spec_path, WEIGHTS_FILE)
            if not os.path.isfile(weights_file):
                raise FileNotFoundError(f"ResNet-50 folder {spec_path!r} has no {WEIGHTS_FILE}")
            model = resnet50(weights=None)
            model.load_state_dict(load_file(weights_file))
        model.fc = torch.nn.Identity()
        return model.eval().to(dev)

    return cached_model(("resnet50", spec_path, str(dev)), load)


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """The whole frame squeezed to ``image_size`` square (a centre crop would ignore the sides of a
    wide video frame, where the two frames may differ), ImageNet-normalised: 3 x S x S."""
    import torch
    from torchvision.transforms.v2 import functional as F

    pixels = F.pil_to_tensor(image.convert("RGB"))
    pixels = F.resize(pixels, [image_size, image_size], antialias=True)
    return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def embed_images(images: list[Image.Image], model: torch.nn.Module, image_size: int, batch_size: int,
                 device: str) -> torch.Tensor:
    """L2-normalised ResNet-50 features, N x 2048 (float32, CPU); batches halve on out-of-memory."""
    import torch

    dev = resolve_device(device)

    def run(batch: list[Image.Image]) -> list[torch.Tensor]:
        pixels = torch.stack([preprocess(im, image_size) for im in batch]).to(dev)
        with inference(model), torch.inference_mode():
            feats = model(pixels).float()
        return list(torch.nn.functional.normalize(feats, dim=1).cpu())

    feats = run_halving_on_oom(list(images), batch_size, run)
    return torch.stack(feats) if feats else torch.empty(0, 2048)


def pair_cosines(normal_feats: torch.Tensor, anomaly_feats: torch.Tensor) -> list[float]:
    """Cosine similarity of row i of ``normal_feats`` with row i of ``anomaly_feats``."""
    import torch

    if normal_feats.shape != anomaly_feats.shape:
        raise ValueError(f"feature shapes differ: {tuple(normal_feats.shape)} vs {tuple(anomaly_feats.shape)}")
    cosines = torch.nn.functional.cosine_similarity(normal_feats, anomaly_feats, dim=1)
    return [float(c) for c in cosines.clamp(-1.0, 1.0)]  # float error can put identical images at 1 + 1e-7


def similarity_problem(cosine: float, max_cosine: float) -> str | None:
    """Paper 3.1: a pair whose frames are too alike (cosine above ``max_cosine``) shows no change."""
    if cosine > max_cosine:
        return f"pair too similar: ResNet-50 cosine {cosine:.6f} above max_cosine={max_cosine}"
    return None
