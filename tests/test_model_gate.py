"""Loads exclusive, forwards shared: the test and training branches run in threads of one process,
and ``from_pretrained`` changes process-wide torch state while it builds a model (CI once failed
with "Cannot copy out of meta tensor" when a diffusers load overlapped a transformers load)."""

import threading
import time

import pytest
import torch
from accelerate import init_empty_weights

from pab_build.models.loading import GATE, cached_model, inference, release_models


@pytest.fixture(autouse=True)
def _clean_cache():
    release_models()
    yield
    release_models()


def test_a_load_never_overlaps_another_load_that_patches_torch():
    inside = threading.Event()

    def diffusers_like_load():
        # what diffusers does through accelerate: new parameters land on the meta device
        with init_empty_weights():
            inside.set()
            time.sleep(0.3)
            return torch.nn.Linear(2, 2)

    def transformers_like_load():
        return torch.nn.Linear(2, 2)

    t = threading.Thread(target=cached_model, args=(("meta-load",), diffusers_like_load))
    t.start()
    assert inside.wait(5)
    plain = cached_model(("plain-load",), transformers_like_load)  # waits for the first load
    t.join()
    assert plain.weight.device.type == "cpu"
    assert cached_model(("meta-load",), lambda: None).weight.device.type == "meta"


def test_a_forward_never_sees_the_default_dtype_of_a_load_in_another_thread():
    inside = threading.Event()
    seen: list[torch.dtype] = []

    def bf16_load():
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # what transformers does while it builds the model
        try:
            inside.set()
            time.sleep(0.3)
            return object()
        finally:
            torch.set_default_dtype(old)

    t = threading.Thread(target=cached_model, args=(("bf16-load",), bf16_load))
    t.start()
    assert inside.wait(5)
    with inference():
        seen.append(torch.zeros(1).dtype)
    t.join()
    assert seen == [torch.float32]


def test_a_load_waits_for_running_forwards_and_forwards_run_together():
    order: list[str] = []
    in_forward = threading.Event()
    both_in = threading.Barrier(2, timeout=5)

    def forward(name: str):
        with inference():
            in_forward.set()
            both_in.wait()  # two forwards hold the gate at once, or this times out
            time.sleep(0.2)
            order.append(name)

    threads = [threading.Thread(target=forward, args=(n,)) for n in ("f1", "f2")]
    for t in threads:
        t.start()
    assert in_forward.wait(5)
    cached_model(("after-forwards",), lambda: order.append("load") or object())
    for t in threads:
        t.join()
    assert sorted(order[:2]) == ["f1", "f2"] and order[2] == "load"


def test_a_load_inside_a_forward_fails_instead_of_waiting_for_itself():
    with inference(), pytest.raises(RuntimeError, match="wait for itself"):
        cached_model(("nested",), object)
    # the gate is free again afterwards
    with GATE.exclusive():
        pass
