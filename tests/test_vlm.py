"""Qwen2-VL backends, prompts and the answered-request cache, with the tiny Qwen2-VL."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pab_build.models import vlm
from pab_build.config import GenerationSettings, model_path
from pab_build.models.loading import LOAD_COUNTS, release_models
from pab_build.store import Store

PAPER_CAPTION_INSTRUCTION = (
    "Provide a simple description of the image content within 50 words, including the appearance, attire, "
    "and actions of the main figures in the picture. Do not imagine any contents that are not in the image. "
    "Do not describe the atmosphere of the image."
)

SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=4, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def _image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _requests() -> list[vlm.VLMRequest]:
    prompts = [
        PAPER_CAPTION_INSTRUCTION,
        "What is the scene?",
        "Below is the image caption of the image. Image caption: a man falls off a skateboard in a parking lot.",
        "Describe.",
        "Summarize the failure of the characters in the image using a single word or phrase.",
    ]
    sizes = [(64, 64), (120, 80), (64, 96), (200, 200), (90, 60)]
    return [vlm.VLMRequest(f"r{i}", _image(i, s), p) for i, (p, s) in enumerate(zip(prompts, sizes))]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return vlm.TransformersBackend(tiny_model("qwen2_vl"), model_id="tiny-qwen2-vl", device="cpu",
                                   dtype="float32", trust_remote_code=False)


class CountingBackend:
    """Delegates to a real backend, counts the requests it sends, and can fail one batch."""

    def __init__(self, inner, fail_on_batch: int | None = None):
        self.inner, self.model_id = inner, inner.model_id
        self.fail_on_batch = fail_on_batch
        self.batches: list[list[str]] = []

    def prompt_length(self, request, settings):
        return self.inner.prompt_length(request, settings)

    def generate_batch(self, requests, settings):
        self.batches.append([r.key for r in requests])
        if self.fail_on_batch is not None and len(self.batches) == self.fail_on_batch:
            raise RuntimeError("worker died")
        return self.inner.generate_batch(requests, settings)

    @property
    def sent(self) -> int:
        return sum(len(b) for b in self.batches)


# -- tiny model fixture ----------------------------------------------------------------------------
def test_tiny_qwen2vl_builds_deterministically_and_loads(tmp_path, tiny_model):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from pab_build.fixtures.tiny_qwen2vl import build_tiny_qwen2vl

    built = tiny_model("qwen2_vl")
    again = tmp_path / "again"
    build_tiny_qwen2vl(str(again), seed=0)
    names = sorted(n for n in os.listdir(again))
    assert "model.safetensors" in names and "chat_template.jinja" in names
    for n in names:
        assert (again / n).read_bytes() == open(os.path.join(built, n), "rb").read(), n
    other = tmp_path / "seed1"
    build_tiny_qwen2vl(str(other), seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()

    model = Qwen2VLForConditionalGeneration.from_pretrained(built)
    processor = AutoProcessor.from_pretrained(built)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 64
    assert model.config.vision_config.depth == 2
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.video_processor is not None


# -- prompts ---------------------------------------------------------------------------------------
def test_caption_prompt_is_the_papers_instruction_verbatim():
    assert vlm.load_prompt("caption_v1") == PAPER_CAPTION_INSTRUCTION


def test_attribute_prompts_put_the_caption_where_the_paper_writes_c():
    scene = vlm.load_prompt("attr_scene_v1")
    assert scene.startswith("Below is the image caption of the image. Based on the caption and image, summarize "
                            "the scene or background")
    assert scene.endswith("hotel, etc. Image caption: {caption}.")
    anomaly = vlm.load_prompt("attr_anomaly_v1")
    assert "In the image, someone fails to do something." in anomaly
    assert "falling into water, losing control, having accident, flipping, jumping, hitting head, etc." in anomaly
    action = vlm.load_prompt("attr_action_v1")
    assert "dyeing eyebrows, trimming beard, peeling potatoes, square dancing, etc." in action
    filled = vlm.fill_prompt(scene, "A man {falls}\n off a bike.")
    assert filled.endswith("Image caption: A man {falls} off a bike.")
    with pytest.raises(FileNotFoundError, match="caption_v1"):
        vlm.load_prompt("caption_v0")


def test_prompts_fingerprint_changes_with_the_text(tmp_path, monkeypatch):
    assert vlm.prompts_fingerprint("caption_v1") != vlm.prompts_fingerprint("attr_scene_v1")
    (tmp_path / "caption_v1.txt").write_text(vlm.load_prompt("caption_v1"), encoding="utf-8")
    monkeypatch.setattr(vlm, "PROMPTS_DIR", tmp_path)
    before = vlm.prompts_fingerprint("caption_v1")
    (tmp_path / "caption_v1.txt").write_text(vlm.load_prompt("caption_v1") + " Be brief.", encoding="utf-8")
    assert vlm.prompts_fingerprint("caption_v1") != before  # an edit in place changes the stage version


# -- transformers backend --------------------------------------------------------------------------
def test_batched_generation_equals_one_by_one(backend):
    reqs = _requests()
    batched = vlm.generate_answer_records(backend, reqs, SETTINGS)
    singles = [backend.generate_batch([r], SETTINGS)[0] for r in reqs]
    assert batched == singles
    assert vlm.generate_answers(backend, reqs, SETTINGS) == [a.text for a in singles]
    assert len(set(a.text for a in batched)) > 1  # the image and prompt matter


def test_finished_tells_an_end_token_from_the_token_limit(backend):
    reqs = _requests()
    short = vlm.generate_answer_records(backend, reqs, SETTINGS)
    longer = vlm.generate_answer_records(backend, reqs, SETTINGS.model_copy(update={"max_new_tokens": 12}))
    assert {a.finished for a in short} == {True, False}  # the tiny model does both on these inputs
    for s, lg in zip(short, longer):
        if s.finished:  # it stopped by itself: more room changes nothing
            assert lg == s
        else:  # cut off: given more room it goes on
            assert len(lg.text) > len(s.text)


def test_chat_prompt_holds_the_instruction_verbatim_and_the_image_is_resized(backend):
    inputs = vlm.to_vllm_inputs(_requests()[:2], backend.processor, SETTINGS)
    assert len(inputs) == 2
    assert PAPER_CAPTION_INSTRUCTION in inputs[0]["prompt"]
    assert inputs[0]["prompt"].count("<|image_pad|>") == 1
    assert inputs[0]["prompt"].endswith("<|im_start|>assistant\n")
    for item in inputs:
        (img,) = item["multi_modal_data"]["image"]
        assert img.width % 28 == 0 and img.height % 28 == 0
        assert SETTINGS.min_pixels <= img.width * img.height <= SETTINGS.max_pixels


def test_from_vllm_outputs_reads_the_first_completion():
    outs = [SimpleNamespace(outputs=[SimpleNamespace(text="a man", finish_reason="stop"),
                                     SimpleNamespace(text="x", finish_reason="stop")]),
            SimpleNamespace(outputs=[SimpleNamespace(text="runs on and on", finish_reason="length")])]
    assert vlm.from_vllm_outputs(outs) == ["a man", "runs on and on"]
    assert vlm.vllm_finished(outs) == [True, False]


def test_vllm_backend_is_a_clear_error_without_vllm(smoke_cfg):
    assert set(vlm.CAPTION_BACKENDS) == {"transformers", "vllm"}
    settings = SETTINGS.model_copy(update={"backend": "vllm"})
    with pytest.raises(RuntimeError, match="vllm extra"):
        vlm.load_backend(smoke_cfg, settings)


def test_load_backend_loads_once_per_process(smoke_cfg, tiny_model):
    tiny_model("qwen2_vl")
    release_models()  # an earlier test may have loaded it (and a stage end released it)
    path = model_path(smoke_cfg, "qwen2_vl")

    def loads():
        return sum(n for k, n in LOAD_COUNTS.items() if k[:3] == ("qwen2_vl", "transformers", path))

    before = loads()
    first = vlm.load_backend(smoke_cfg, smoke_cfg.test_captions.generation)
    again = vlm.load_backend(smoke_cfg, smoke_cfg.train_captions.generation)
    assert first is again and isinstance(first, vlm.TransformersBackend)
    assert loads() == before + 1
    assert first.model_id == "{models_dir}/qwen2_vl"


# -- length-sorted queue ---------------------------------------------------------------------------
class EchoBackend:
    """Answers each request with its key; the prompt length is the prompt's character count."""

    model_id = "echo"

    def __init__(self, oom_above: int | None = None):
        self.batches: list[list[str]] = []
        self.oom_above = oom_above

    def prompt_length(self, request, settings):
        return len(request.prompt)

    def generate_batch(self, requests, settings):
        if self.oom_above is not None and len(requests) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append([r.key for r in requests])
        return [vlm.VLMAnswer(r.key, True) for r in requests]


def test_queue_is_length_sorted_and_the_order_is_restored():
    lengths = [9, 1, 5, 3, 7, 2, 8]
    reqs = [vlm.VLMRequest(f"k{i}", _image(0), "x" * n) for i, n in enumerate(lengths)]
    backend = EchoBackend()
    answers = vlm.generate_answers(backend, reqs, SETTINGS.model_copy(update={"batch_size": 3}))
    assert answers == [r.key for r in reqs]
    assert backend.batches == [["k1", "k5", "k3"], ["k2", "k4", "k6"], ["k0"]]


def test_out_of_memory_halves_the_batch():
    reqs = [vlm.VLMRequest(f"k{i}", _image(0), "x" * (i + 1)) for i in range(5)]
    backend = EchoBackend(oom_above=2)
    answers = vlm.generate_answers(backend, reqs, SETTINGS.model_copy(update={"batch_size": 4}))
    assert answers == [r.key for r in reqs]
    assert max(len(b) for b in backend.batches) == 2


# -- answered-request cache ------------------------------------------------------------------------
def test_cache_resumes_a_unit_that_died_after_its_first_batch(tmp_path, backend):
    store = Store(str(tmp_path / "out"))
    reqs = _requests()
    settings = SETTINGS.model_copy(update={"batch_size": 2})
    clean = vlm.generate_answer_records(backend, reqs, settings)

    dying = CountingBackend(backend, fail_on_batch=2)
    with pytest.raises(RuntimeError, match="worker died"):
        vlm.answer_requests(store, "test_captions", "000000", dying, reqs, settings)
    assert store.listdir("_cache/test_captions/000000") == ["000000.json"]

    rerun = CountingBackend(backend)
    got = vlm.answer_requests(store, "test_captions", "000000", rerun, reqs, settings)
    assert got == clean
    assert rerun.sent == len(reqs) - 2  # the first batch's two answers came from the cache
    assert store.listdir("_cache/test_captions/000000") == ["000000.json", "000001.json", "000002.json"]

    # all answered: nothing goes to the model
    idle = CountingBackend(backend)
    assert vlm.answer_requests(store, "test_captions", "000000", idle, reqs, settings) == clean
    assert idle.sent == 0

    # a lost last cache file: only its batch is asked again
    store.remove("_cache/test_captions/000000/000002.json")
    again = CountingBackend(backend)
    assert vlm.answer_requests(store, "test_captions", "000000", again, reqs, settings) == clean
    assert again.sent == 1


def test_cache_is_keyed_by_image_prompt_settings_and_model(tmp_path, backend):
    store = Store(str(tmp_path / "out"))
    reqs = _requests()[:2]
    vlm.answer_requests(store, "s", "000000", CountingBackend(backend), reqs, SETTINGS)
    longer = SETTINGS.model_copy(update={"max_new_tokens": 7})
    counting = CountingBackend(backend)
    vlm.answer_requests(store, "s", "000000", counting, reqs, longer)
    assert counting.sent == 2
    other_prompt = [vlm.VLMRequest(r.key, r.image, r.prompt + " Briefly.") for r in reqs]
    counting = CountingBackend(backend)
    vlm.answer_requests(store, "s", "000000", counting, other_prompt, SETTINGS)
    assert counting.sent == 2
    h = vlm.request_hash(reqs[0], SETTINGS, "m")
    assert h == vlm.request_hash(reqs[0], SETTINGS.model_copy(update={"batch_size": 1}), "m")
    assert h != vlm.request_hash(reqs[0], SETTINGS, "other-model")
    assert h != vlm.request_hash(vlm.VLMRequest("r0", _image(99), reqs[0].prompt), SETTINGS, "m")


def test_vllm_is_started_with_the_configured_memory_share(smoke_cfg, tiny_model, monkeypatch):
    import sys
    import types

    import torch

    started = {}
    fake = types.ModuleType("vllm")  # vLLM itself needs a GPU: only its constructor's arguments are checked
    fake.LLM = lambda **kwargs: started.update(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vlm, "resolve_device", lambda device: torch.device("cuda"))
    tiny_model("qwen2_vl")
    smoke_cfg.run.vllm_gpu_memory_utilization = 0.55
    vlm.load_backend(smoke_cfg, SETTINGS.model_copy(update={"backend": "vllm"}))
    assert started["gpu_memory_utilization"] == 0.55 and started["trust_remote_code"] is False
    release_models(["qwen2_vl"])
