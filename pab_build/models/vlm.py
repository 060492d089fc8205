"""Qwen2-VL questions about images: captions (paper 3.1, 3.2) and attributes (appendix A.1).

One interface over two backends, chosen by ``GenerationSettings.backend`` from
:data:`CAPTION_BACKENDS`: ``transformers`` (batched ``generate`` with left padding) and ``vllm``
(a thin adapter, imported only when selected; GPU only).

:func:`generate_answers` sorts requests by prompt length so each batch pads little, runs them in
batches (halving the batch on out-of-memory) and returns the answers in the callers' order.
:func:`answer_requests` adds the answered-request cache: after every batch the answers are written
to ``_cache/<stage>/<unit_id>/<n>.json``, so a unit whose worker died half way only sends the
unanswered rest to the model when it is run again.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from ..config import (
    PROMPTS_DIR,
    GenerationSettings,
    PABConfig,
    model_id,
    model_path,
    stable_hash,
)
from .loading import cached_model, inference, resolve_device, run_halving_on_oom, torch_dtype
from ..store import Store

# the image grid of Qwen2-VL: 14 px patches, merged 2 x 2 into one token
IMAGE_FACTOR = 28


# -- prompts --------------------------------------------------------------------------------------
def load_prompt(version: str) -> str:
    """The instruction stored in ``prompts/<version>.txt`` (the version is the file stem)."""
    path = PROMPTS_DIR / f"{version}.txt"
    if not path.exists():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
        raise FileNotFoundError(f"no prompt {version!r} in {PROMPTS_DIR}; known: {', '.join(known)}")
    return path.read_text(encoding="utf-8").strip()


def fill_prompt(template: str, caption: str) -> str:
    """Put caption C where the paper writes *C* (``... Image caption: {caption}.``). A trailing
    period of C is dropped so the sentence does not end in "..". ``str.replace``, not ``format``:
    captions may contain braces."""
    return template.replace("{caption}", " ".join(caption.split()).rstrip("."))


def prompts_fingerprint(*versions: str) -> str:
    """Short hash of the named prompt files' text: part of a stage's version, so editing a
    prompt in place invalidates the stages that send it."""
    return stable_hash({v: load_prompt(v) for v in versions})[:12]


# -- requests and answers -------------------------------------------------------------------------
@dataclass(frozen=True)
class VLMRequest:
    key: str  # caller's id of the request, e.g. "<sample_key>/scene"
    image: Image.Image | str  # PIL image or a local file path
    prompt: str
    image_sha256: str | None = None  # known content hash (manifests carry it); computed otherwise


@dataclass(frozen=True)
class VLMAnswer:
    text: str  # decoded output, special tokens removed
    finished: bool  # False when generation stopped at max_new_tokens instead of an end token


def open_image(image: Image.Image | str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def image_from_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def image_sha256(request: VLMRequest) -> str:
    if request.image_sha256:
        return request.image_sha256
    if isinstance(request.image, Image.Image):
        im = request.image
        head = f"{im.mode}:{im.width}x{im.height}:".encode()
        return hashlib.sha256(head + im.tobytes()).hexdigest()
    with open(request.image, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def chat_messages(request: VLMRequest, settings: GenerationSettings) -> list[dict]:
    """One user turn: the image (resized by qwen_vl_utils within min/max_pixels), then the text."""
    return [{
        "role": "user",
        "content": [
            {"type": "image", "image": open_image(request.image),
             "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels},
            {"type": "text", "text": request.prompt},
        ],
    }]


def image_tokens(image: Image.Image | str, settings: GenerationSettings) -> int:
    """How many tokens the image takes in the prompt after the min/max_pixels resize."""
    from qwen_vl_utils import smart_resize

    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        with Image.open(image) as im:
            w, h = im.size
    rh, rw = smart_resize(h, w, factor=IMAGE_FACTOR, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    return (rh // IMAGE_FACTOR) * (rw // IMAGE_FACTOR)


# -- backends -------------------------------------------------------------------------------------
class VLMBackend(Protocol):
    model_id: str

    def prompt_length(self, request: VLMRequest, settings: GenerationSettings) -> int: ...

    def generate_batch(self, requests: Sequence[VLMRequest], settings: GenerationSettings) -> list[VLMAnswer]: ...


def _sampling_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.do_sample:  # greedy decoding ignores (and warns about) these
        kw.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # the instruct release's generation config samples (top_k=1 ...): override it all
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


class TransformersBackend:
    """Qwen2VLForConditionalGeneration + AutoProcessor; batched, left-padded ``generate``."""

    def __init__(self, path: str, *, model_id: str, device: str, dtype: str, trust_remote_code: bool,
                 seed: int = 0, revision: str | None = None):
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        self.model_id = model_id
        self.device = resolve_device(device)
        self.seed = seed
        self.processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        # decoder-only batches must pad on the left, so every row's last token is its prompt's end
        self.processor.tokenizer.padding_side = "left"
        # straight onto the device: loading into host memory first and moving it took 16 GB of host
        # RAM per worker for Qwen2-VL-7B (8 workers: 128 GB at once)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            path, revision=revision, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
            device_map=str(self.device),
        ).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.processor.tokenizer.eos_token_id)
        self._lock = threading.Lock()  # units running in threads share this model

    def prompt_length(self, request: VLMRequest, settings: GenerationSettings) -> int:
        with self._lock:
            n_text = len(self.processor.tokenizer(request.prompt).input_ids)
        return n_text + image_tokens(request.image, settings)

    def generate_batch(self, requests: Sequence[VLMRequest], settings: GenerationSettings) -> list[VLMAnswer]:
        import torch
        from qwen_vl_utils import process_vision_info

        conversations = [chat_messages(r, settings) for r in requests]
        images, _ = process_vision_info(conversations)
        # the lock covers the tokenizer too: a fast tokenizer used from two threads at once can
        # fail with "Already borrowed"
        with self._lock, inference(self.model), torch.inference_mode():
            texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations]
            inputs = self.processor(
                text=texts, images=images, padding=True, return_tensors="pt",
                size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
            ).to(self.device)
            if settings.do_sample:
                torch.manual_seed(self.seed)
            out = self.model.generate(**inputs, **_sampling_kwargs(settings))
            new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
            decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
        return [VLMAnswer(text, finished=any(t in self.eos_ids for t in toks))
                for text, toks in zip(decoded, new_tokens)]


def to_vllm_inputs(requests: Sequence[VLMRequest], processor: Any, settings: GenerationSettings) -> list[dict]:
    """vLLM prompts: the chat-template text plus the resized image as multi-modal data."""
    from qwen_vl_utils import process_vision_info

    out = []
    for r in requests:
        messages = chat_messages(r, settings)
        images, _ = process_vision_info(messages)
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append({"prompt": prompt, "multi_modal_data": {"image": images}})
    return out


def from_vllm_outputs(outputs: Sequence[Any]) -> list[str]:
    """The first completion's text of each vLLM ``RequestOutput``."""
    return [o.outputs[0].text for o in outputs]


def vllm_finished(outputs: Sequence[Any]) -> list[bool]:
    """False where vLLM stopped at the token limit (``finish_reason == "length"``)."""
    return [o.outputs[0].finish_reason != "length" for o in outputs]


class VllmBackend:
    """vLLM's offline ``LLM``; needs the ``vllm`` extra and a GPU."""

    def __init__(self, path: str, *, model_id: str, device: str, dtype: str, trust_remote_code: bool,
                 seed: int = 0, settings: GenerationSettings | None = None, revision: str | None = None,
                 gpu_memory_utilization: float = 0.9):
        try:
            import vllm  # only here: optional, GPU-only dependency
        except ImportError as e:
            raise RuntimeError("generation.backend=vllm needs the vllm extra (pip install 'pab-build[vllm]') "
                               "and a CUDA device; use backend=transformers otherwise") from e
        from transformers import AutoProcessor

        if resolve_device(device).type != "cuda":
            raise RuntimeError(f"the vllm caption backend needs a CUDA device, run.device is {device!r}")
        self.model_id = model_id
        self.seed = seed
        self._vllm = vllm
        self.processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        mm = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels} if settings else {}
        self.llm = vllm.LLM(model=path, revision=revision, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                            limit_mm_per_prompt={"image": 1}, mm_processor_kwargs=mm,
                            # the share of the GPU vLLM reserves at start (run.vllm_gpu_memory_utilization;
                            # preflight checks it leaves room for the other models of this worker)
                            gpu_memory_utilization=gpu_memory_utilization)

    def prompt_length(self, request: VLMRequest, settings: GenerationSettings) -> int:
        return len(self.processor.tokenizer(request.prompt).input_ids) + image_tokens(request.image, settings)

    def generate_batch(self, requests: Sequence[VLMRequest], settings: GenerationSettings) -> list[VLMAnswer]:
        params = self._vllm.SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            repetition_penalty=settings.repetition_penalty,
            seed=self.seed,
        )
        with inference():
            outputs = self.llm.generate(to_vllm_inputs(requests, self.processor, settings), params, use_tqdm=False)
        return [VLMAnswer(t, f) for t, f in zip(from_vllm_outputs(outputs), vllm_finished(outputs))]


CAPTION_BACKENDS: dict[str, Callable[..., VLMBackend]] = {
    "transformers": TransformersBackend,
    "vllm": VllmBackend,
}


def load_backend(cfg: PABConfig, settings: GenerationSettings) -> VLMBackend:
    """The Qwen2-VL backend named by ``settings.backend``, loaded once per process."""
    spec = cfg.models.qwen2_vl
    path = model_path(cfg, "qwen2_vl")
    kwargs: dict[str, Any] = dict(model_id=model_id(cfg, "qwen2_vl"), device=cfg.run.device, dtype=spec.dtype,
                                  trust_remote_code=cfg.run.trust_remote_code, seed=cfg.run.seed,
                                  revision=spec.revision)
    key: tuple = ("qwen2_vl", settings.backend, path, tuple(sorted(kwargs.items())))
    if settings.backend == "vllm":  # the engine fixes the image size bounds when it starts
        kwargs.update(settings=settings, gpu_memory_utilization=cfg.run.vllm_gpu_memory_utilization)
        key += (settings.min_pixels, settings.max_pixels, cfg.run.vllm_gpu_memory_utilization)
    factory = CAPTION_BACKENDS[settings.backend]
    return cached_model(key, lambda: factory(path, **kwargs))


# -- running requests -----------------------------------------------------------------------------
def length_sorted_order(lengths: Sequence[int]) -> list[int]:
    """Indices by ascending prompt length (stable), so batches hold prompts of similar length."""
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def generate_answer_records(backend: VLMBackend, requests: Sequence[VLMRequest], settings: GenerationSettings,
                            on_batch: Callable[[list[VLMRequest], list[VLMAnswer]], None] | None = None,
                            ) -> list[VLMAnswer]:
    """Answers in the order of ``requests``; ``on_batch`` sees each finished batch (the cache)."""
    order = length_sorted_order([backend.prompt_length(r, settings) for r in requests])
    queue = [requests[i] for i in order]

    def run_batch(batch: list[VLMRequest]) -> list[VLMAnswer]:
        answers = backend.generate_batch(batch, settings)
        if len(answers) != len(batch):
            raise RuntimeError(f"backend returned {len(answers)} answers for {len(batch)} requests")
        if on_batch is not None:
            on_batch(batch, answers)
        return answers

    sorted_answers = run_halving_on_oom(queue, settings.batch_size, run_batch)
    answers: list[VLMAnswer | None] = [None] * len(requests)
    for i, a in zip(order, sorted_answers):
        answers[i] = a
    return answers  # type: ignore[return-value]


def generate_answers(backend: VLMBackend, requests: Sequence[VLMRequest], settings: GenerationSettings) -> list[str]:
    """The decoded answer text of each request, in the order given."""
    return [a.text for a in generate_answer_records(backend, requests, settings)]


def request_hash(request: VLMRequest, settings: GenerationSettings, model: str) -> str:
    """What makes an answer reusable: the image, the prompt, the generation settings and the model.
    The batch size is left out: it changes how requests are grouped, not what is asked."""
    gen = settings.model_dump(mode="json", exclude={"batch_size"})
    return stable_hash({"image": image_sha256(request), "prompt": request.prompt, "gen": gen, "model": model})


def cache_dir(stage: str, unit_id: str) -> str:
    return f"_cache/{stage}/{unit_id}"


def read_answer_cache(store: Store, stage: str, unit_id: str) -> dict[str, VLMAnswer]:
    """Every answer cached for a unit, by request hash (unreadable files are skipped: they are
    only a cache, and the writes are atomic)."""
    cached: dict[str, VLMAnswer] = {}
    folder = cache_dir(stage, unit_id)
    for name in store.listdir(folder):
        if not name.endswith(".json"):
            continue
        try:
            data = store.read_json(f"{folder}/{name}")
            cached.update({h: VLMAnswer(a["text"], bool(a["finished"])) for h, a in data["answers"].items()})
        except (ValueError, KeyError, TypeError):
            continue
    return cached


def answer_requests(store: Store, stage: str, unit_id: str, backend: VLMBackend,
                    requests: Sequence[VLMRequest], settings: GenerationSettings) -> list[VLMAnswer]:
    """Like :func:`generate_answer_records`, but answers already cached for this unit are read
    back, and each new batch is cached as soon as it is answered."""
    hashes = [request_hash(r, settings, backend.model_id) for r in requests]
    cached = read_answer_cache(store, stage, unit_id)
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    folder = cache_dir(stage, unit_id)
    existing = [n for n in store.listdir(folder) if n.endswith(".json") and n[:-5].isdigit()]
    next_n = [max((int(n[:-5]) for n in existing), default=-1) + 1]

    def save_batch(batch: list[VLMRequest], answers: list[VLMAnswer]) -> None:
        record = {request_hash(r, settings, backend.model_id): {"key": r.key, "text": a.text, "finished": a.finished}
                  for r, a in zip(batch, answers)}
        store.write_bytes(f"{folder}/{next_n[0]:06d}.json",
                          json.dumps({"answers": record}, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        next_n[0] += 1

    if todo:
        fresh = generate_answer_records(backend, [requests[i] for i in todo], settings, on_batch=save_batch)
        cached.update({hashes[i]: a for i, a in zip(todo, fresh)})
    return [cached[h] for h in hashes]
