"""Qwen2-VL captions/s and attribute answers/s: batch 1 vs. the project's batches (GPU).

    python bench/bench_vlm_gpu.py [--size 7b|2b] [--captions 32] [--attributes 64] [--json out.json]
    python bench/bench_vlm_gpu.py --dry-run    # CPU: build on the meta device, print parameter counts

No model hub is reachable, so Qwen2-VL is built from its published config with random weights
(speed does not depend on them), saved with ``save_pretrained`` next to an offline processor
(the tokenizer of :mod:`pab_build.fixtures.tiny_qwen2vl`; the embedding keeps the published
vocabulary size, whose extra rows the tokenizer never produces), and loaded back through
:class:`pab_build.models.vlm.TransformersBackend`. Requests are 1024x1024 images with the caption prompt
(and an attribute prompt), sent through :func:`pab_build.models.vlm.generate_answer_records` with
configs/full.yaml's ``train_captions`` / ``attributes`` generation settings. The default size is
the full profile's (``models.qwen2_vl``: 7B). Phases, for captions and for attributes:

* ``*_batch1``: transformers, one request per ``generate`` call: the baseline;
* ``*_batched``: transformers in the profile's batches (32 captions, 64 attributes);
* ``vllm_*``: the vLLM backend, when vLLM is installed (it is not on the target image).

Each timed phase follows a warm-up of one full batch, and counts whole batches. Tokens generated
are recorded: random weights rarely emit an end token, so most requests run to ``max_new_tokens``,
an upper bound on real answers' length (finished answers count their re-tokenised text + 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from gpu_common import Results, add_common_args, device_name, device_or_exit, rate, round_up, timed

# the project's code this benchmark measures (imports kept here, in one place)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.model_lock import locked_config  # noqa: E402
from pab_build.fixtures.tiny_qwen2vl import CHAT_TEMPLATE, SPECIAL_TOKENS, _build_tokenizer  # noqa: E402
from pab_build.models.vlm import (  # noqa: E402
    TransformersBackend, VLMRequest, VllmBackend, fill_prompt, generate_answer_records, image_tokens, load_prompt,
)

SOURCE_CAPTION = "A man is riding a skateboard down a ramp in a parking lot and falls off."
DEFAULT_SIZE = "7b"  # configs/full.yaml's models.qwen2_vl: Qwen2-VL-7B-Instruct

# Qwen/Qwen2-VL-{2B,7B}-Instruct config.json
TEXT_CONFIGS = {
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
TEXT_COMMON = dict(max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
# --size toy: the same classes at a few million parameters (CPU tests of the code paths)
TEXT_CONFIGS["toy"] = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
TOY_ROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}  # head_dim 16 = 2 * sum(mrope_section)
TOY_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2)
VISION_CONFIG = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")


def qwen2vl_config(size: str, tokenizer):
    from transformers import Qwen2VLConfig

    text = TEXT_CONFIGS[size]
    if len(tokenizer) > text["vocab_size"]:
        raise RuntimeError(f"the offline tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    toy = size == "toy"
    text_common = {**TEXT_COMMON, "rope_scaling": TOY_ROPE} if toy else TEXT_COMMON
    vision = {**VISION_CONFIG, **TOY_VISION} if toy else VISION_CONFIG
    config = Qwen2VLConfig(
        text_config={**text, **text_common, "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad},
        vision_config={**vision, "hidden_size": text["hidden_size"]},  # the merger's output width
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
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(dest)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE).save_pretrained(dest)


def parameter_counts(model) -> dict[str, int]:
    vision = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    return {"vision": vision, "language": total - vision, "total": total}


def make_requests(n: int, prompt: str, tag: str, image_size: int) -> list[VLMRequest]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
              for _ in range(min(n, 4))]
    return [VLMRequest(f"{tag}-{i}", images[i % len(images)], prompt, image_sha256=f"{tag}-{i}") for i in range(n)]


def tokens_generated(answers, settings, tokenizer) -> int:
    return sum(len(tokenizer(a.text).input_ids) + 1 if a.finished else settings.max_new_tokens for a in answers)


def measure(backend, requests: list[VLMRequest], settings, device: torch.device) -> dict:
    """Requests/s through the stage's call, after a warm-up of one full batch."""
    warm_up = timed(device, lambda: generate_answer_records(backend, requests[: settings.batch_size], settings))
    answers: list = []
    seconds = timed(device, lambda: answers.extend(generate_answer_records(backend, requests, settings)))
    tokenizer = getattr(getattr(backend, "processor", None), "tokenizer", None)
    extra = {"batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens, "warm_up_s": warm_up,
             "finished_answers": sum(a.finished for a in answers)}
    if tokenizer is not None:
        extra["tokens_generated"] = tokens = tokens_generated(answers, settings, tokenizer)
        extra["tokens_per_s"] = tokens / seconds
    return rate(len(requests), seconds, "requests/s", **extra)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(TEXT_CONFIGS), default=DEFAULT_SIZE)
    ap.add_argument("--captions", type=int, default=32, help="timed caption requests, rounded up to whole batches")
    ap.add_argument("--attributes", type=int, default=64, help="timed attribute requests (0: skip), whole batches")
    ap.add_argument("--batch1-requests", type=int, default=4, help="timed requests of each batch-1 baseline")
    ap.add_argument("--image-size", type=int, default=1024, help="side of the square request images")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override the profile's (CPU tests)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the profile's batch sizes (CPU tests)")
    ap.add_argument("--workdir", default=None, help="where to save the random-weight model (default: a temp dir)")
    add_common_args(ap)
    args = ap.parse_args()

    overrides = []
    for flag, value in (("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size)):
        if value:
            overrides += [f"{stage}.generation.{flag}={value}" for stage in ("train_captions", "attributes")]
    cfg = locked_config("full", overrides)
    caption_settings, attribute_settings = cfg.train_captions.generation, cfg.attributes.generation
    dtype = cfg.models.qwen2_vl.dtype
    caption_prompt = load_prompt("caption_v1")
    attribute_prompt = fill_prompt(load_prompt("attr_scene_v1"), SOURCE_CAPTION)

    if args.dry_run:
        model, tokenizer, _, _ = build_model(args.size, "meta", torch.bfloat16)
        counts = parameter_counts(model)
        for name, n in counts.items():
            print(f"{name:10s} {n / 1e6:10.1f} M parameters")
        tokens = image_tokens(Image.new("RGB", (args.image_size, args.image_size)), caption_settings)
        print(f"dry run ok: Qwen2-VL-{args.size.upper()}, tokenizer {len(tokenizer)} tokens < vocab "
              f"{model.config.text_config.vocab_size}; a {args.image_size}x{args.image_size} image -> {tokens} tokens "
              f"(max_pixels={caption_settings.max_pixels}); captions: batch {caption_settings.batch_size}, "
              f"{caption_settings.max_new_tokens} new tokens; attributes: batch {attribute_settings.batch_size}, "
              f"{attribute_settings.max_new_tokens} new tokens; vllm installed: {vllm_available()}")
        return 0
    device = device_or_exit(args.device, "bench_vlm_gpu")
    if device is None:
        return 2

    results = Results(args.json, "qwen2_vl", size=args.size, gpu=device_name(device), torch=torch.__version__,
                      dtype=dtype, image_size=args.image_size,
                      caption_settings=caption_settings.model_dump(mode="json"),
                      attribute_settings=attribute_settings.model_dump(mode="json"))
    kinds = [("caption", caption_prompt, caption_settings, args.captions)]
    if args.attributes:
        kinds.append(("attribute", attribute_prompt, attribute_settings, args.attributes))
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        model, tokenizer, eos, pad = build_model(args.size, device, torch.bfloat16)
        results.data["parameters"] = parameter_counts(model)
        save_model_folder(model, tokenizer, eos, pad, folder)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        kwargs = dict(model_id=f"random-Qwen2-VL-{args.size}", device=str(device), dtype=dtype,
                      trust_remote_code=False)
        backend = TransformersBackend(folder, **kwargs)
        for kind, prompt, settings, n in kinds:
            single = settings.model_copy(update={"batch_size": 1})
            results.phase(f"{kind}_batch1", f"transformers, 1 request per generate call ({kind}s)",
                          lambda: measure(backend, make_requests(args.batch1_requests, prompt, kind, args.image_size),
                                          single, device))
            batched = make_requests(round_up(n, settings.batch_size), prompt, kind, args.image_size)
            results.phase(f"{kind}_batched", f"transformers, batches of {settings.batch_size} ({kind}s)",
                          lambda: measure(backend, batched, settings, device))
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not vllm_available():
            print("vLLM is not installed: transformers phases only")
            results.data["vllm"] = "not installed"
            results.write()
            return results.exit_code()
        vllm = VllmBackend(folder, settings=caption_settings, **kwargs)
        for kind, prompt, settings, n in kinds:
            batched = make_requests(round_up(n, settings.batch_size), prompt, kind, args.image_size)
            results.phase(f"vllm_{kind}_batched", f"vLLM, batches of {settings.batch_size} ({kind}s)",
                          lambda: measure(vllm, batched, settings, device))
    return results.exit_code()


if __name__ == "__main__":
    sys.exit(main())
