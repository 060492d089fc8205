"""Qwen2-VL captions/s and attribute answers/s: the transformers backend, and vLLM if installed (GPU only).

    python bench/bench_vlm_gpu.py [--size 2b|7b] [--captions 32] [--attributes 64] [--json out.json]
    python bench/bench_vlm_gpu.py --dry-run    # CPU: build on the meta device, print parameter counts

No model hub is reachable, so Qwen2-VL is built from its published config with random weights
(speed does not depend on them), saved with ``save_pretrained`` next to an offline processor
(the tokenizer of :mod:`pab_build.fixtures.tiny_qwen2vl`; the embedding keeps the published
vocabulary size, whose extra rows the tokenizer never produces), and loaded back through
:class:`pab_build.vlm.TransformersBackend`. Requests are 1024x1024 images with the caption prompt
(and an attribute prompt), sent through :func:`pab_build.vlm.generate_answers` with configs/full.yaml's
``train_captions`` / ``attributes`` generation settings. Random weights rarely emit an end token,
so every request generates ``max_new_tokens``: an upper bound on real answers' length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.config import load_config  # noqa: E402
from pab_build.fixtures.tiny_qwen2vl import (  # noqa: E402
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    _build_tokenizer,
)
from pab_build.vlm import (  # noqa: E402
    TransformersBackend,
    VllmBackend,
    VLMRequest,
    fill_prompt,
    generate_answers,
    image_tokens,
    load_prompt,
)

NO_CUDA_EXIT = 2
SOURCE_CAPTION = "A man is riding a skateboard down a ramp in a parking lot and falls off."

# Qwen/Qwen2-VL-{2B,7B}-Instruct config.json
TEXT_CONFIGS = {
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
TEXT_COMMON = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
VISION_CONFIG = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")


def qwen2vl_config(size: str, tokenizer):
    from transformers import Qwen2VLConfig

    text = TEXT_CONFIGS[size]
    if len(tokenizer) > text["vocab_size"]:
        raise RuntimeError(f"the offline tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    config = Qwen2VLConfig(
        text_config={**text, **TEXT_COMMON, "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad},
        vision_config={**VISION_CONFIG, "hidden_size": text["hidden_size"]},  # the merger's output width
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    return config, eos, pad


def build_model(size: str, device: str | torch.device, dtype: torch.dtype):
    """(model, tokenizer, eos, pad): full-size Qwen2-VL with random weights, created on ``device``."""
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    config, eos, pad = qwen2vl_config(size, tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the serving dtype: half the memory and time of float32
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, tokenizer, eos, pad


def save_model_folder(model, tokenizer, eos: int, pad: int, dest: str) -> None:
    """A hub-style folder (weights, generation config, processor) that ``from_pretrained`` loads."""
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(dest)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE).save_pretrained(dest)


def parameter_counts(model) -> dict[str, int]:
    vision = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    return {"vision": vision, "language": total - vision, "total": total}


def make_requests(n: int, prompt: str, tag: str) -> list[VLMRequest]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)) for _ in range(min(n, 4))]
    return [VLMRequest(f"{tag}-{i}", images[i % len(images)], prompt, image_sha256=f"{tag}-{i}") for i in range(n)]


def time_requests(backend, requests: list[VLMRequest], settings) -> float:
    generate_answers(backend, requests[: min(2, len(requests))], settings)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_answers(backend, requests, settings)
    torch.cuda.synchronize()
    return len(requests) / (time.perf_counter() - t0)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(TEXT_CONFIGS), default="2b")
    ap.add_argument("--captions", type=int, default=32, help="timed caption requests (after a warm-up)")
    ap.add_argument("--attributes", type=int, default=64, help="timed attribute requests (0: skip)")
    ap.add_argument("--workdir", default=None, help="where to save the random-weight model (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dry-run", action="store_true", help="CPU check: build on the meta device, count parameters")
    args = ap.parse_args()

    cfg = load_config("full")
    caption_settings, attribute_settings = cfg.train_captions.generation, cfg.attributes.generation
    dtype = cfg.models.qwen2_vl.dtype
    caption_prompt = load_prompt("caption_v1")
    attribute_prompt = fill_prompt(load_prompt("attr_scene_v1"), SOURCE_CAPTION)

    if args.dry_run:
        model, tokenizer, _, _ = build_model(args.size, "meta", torch.bfloat16)
        counts = parameter_counts(model)
        for name, n in counts.items():
            print(f"{name:10s} {n / 1e6:10.1f} M parameters")
        tokens = image_tokens(Image.new("RGB", (1024, 1024)), caption_settings)
        print(f"dry run ok: Qwen2-VL-{args.size.upper()}, tokenizer {len(tokenizer)} tokens < vocab "
              f"{model.config.text_config.vocab_size}; a 1024x1024 image -> {tokens} tokens "
              f"(max_pixels={caption_settings.max_pixels}); captions: batch {caption_settings.batch_size}, "
              f"{caption_settings.max_new_tokens} new tokens; attributes: batch {attribute_settings.batch_size}, "
              f"{attribute_settings.max_new_tokens} new tokens; vllm installed: {vllm_available()}")
        return 0
    if not torch.cuda.is_available():
        print("bench_vlm_gpu: no CUDA device; this benchmark needs a GPU (use --dry-run to check it on the CPU)",
              file=sys.stderr)
        return NO_CUDA_EXIT

    result: dict = {"benchmark": "qwen2_vl", "size": args.size, "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "dtype": dtype, "captions": args.captions,
                    "attributes": args.attributes,
                    "caption_settings": caption_settings.model_dump(mode="json"),
                    "attribute_settings": attribute_settings.model_dump(mode="json")}
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        model, tokenizer, eos, pad = build_model(args.size, "cuda", torch.bfloat16)
        result["parameters"] = parameter_counts(model)
        save_model_folder(model, tokenizer, eos, pad, folder)
        del model
        torch.cuda.empty_cache()

        kwargs = dict(model_id=f"random-Qwen2-VL-{args.size}", device="cuda", dtype=dtype, trust_remote_code=False)
        backends = {"transformers": lambda: TransformersBackend(folder, **kwargs)}
        if vllm_available():
            backends["vllm"] = lambda: VllmBackend(folder, settings=caption_settings, **kwargs)
        else:
            print("vLLM is not installed: reporting the transformers backend only")
        for name, make in backends.items():
            backend = make()
            rate = time_requests(backend, make_requests(args.captions, caption_prompt, "cap"), caption_settings)
            result[f"{name}_captions_per_s"] = rate
            print(f"{name:12s} captions:   {rate:8.2f} /s (batch {caption_settings.batch_size}, "
                  f"{caption_settings.max_new_tokens} new tokens)")
            if args.attributes:
                rate = time_requests(backend, make_requests(args.attributes, attribute_prompt, "attr"),
                                     attribute_settings)
                result[f"{name}_attributes_per_s"] = rate
                print(f"{name:12s} attributes: {rate:8.2f} /s (batch {attribute_settings.batch_size}, "
                      f"{attribute_settings.max_new_tokens} new tokens)")
            del backend
            torch.cuda.empty_cache()
    if "vllm_captions_per_s" in result:
        result["ratio_vllm_over_transformers"] = result["vllm_captions_per_s"] / result["transformers_captions_per_s"]
        print(f"ratio vLLM/transformers (captions): {result['ratio_vllm_over_transformers']:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
