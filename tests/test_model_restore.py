"""A failed model call leaves the model as it was (issue 19, part 1): an out-of-memory error in
the middle of a float16 SDXL call used to leave the VAE upcast to float32, and every later call
in that worker failed with a dtype mismatch. Tiny SDXL in float16 on the CPU, 64 px, 2 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pab_build.models.loading import cached_model, cached_keys, inference, release_models
from pab_build.stages import generate

PROMPT = "a man falls off his skateboard"


@pytest.fixture
def fp16(ctx, tiny_model):
    tiny_model("sdxl")
    path, sec = generate.model_path(ctx.cfg, "sdxl"), ctx.cfg.generate
    pipe = generate.load_sdxl_pipeline(path, "cpu", "float16", sec)
    fresh = generate.build_sdxl_pipeline(path, "cpu", "float16", sec)  # not cached: never failed
    yield pipe, fresh, sec
    release_models(["sdxl"])


def _oom_once(monkeypatch, obj, name, when=lambda *a, **k: True):
    real = getattr(obj, name)
    fired = []

    def failing(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, failing)
    return fired


@pytest.mark.parametrize("where", ["vae_decode", "unet_forward"])
def test_an_oom_inside_a_float16_sdxl_call_leaves_the_pipeline_as_it_was(fp16, where, monkeypatch):
    pipe, fresh, sec = fp16
    target = (pipe.vae, "decode") if where == "vae_decode" else (pipe.unet, "forward")
    fired = _oom_once(monkeypatch, *target)
    with pytest.raises(torch.OutOfMemoryError):
        generate.generate_batch(pipe, [PROMPT], [7], sec)
    assert fired
    # diffusers had upcast the VAE before the failed decode; the guard put it back
    assert {p.dtype for p in pipe.vae.parameters()} == {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    (got,) = generate.generate_batch(pipe, [PROMPT], [7], sec)
    (ref,) = generate.generate_batch(fresh, [PROMPT], [7], sec)
    assert generate.image_problem(got, black_threshold=1.0) is None
    assert got.tobytes() == ref.tobytes()


def test_an_oom_in_the_decode_of_a_batch_is_halved_and_matches_a_fresh_pipeline(fp16, monkeypatch):
    pipe, fresh, sec = fp16
    _oom_once(monkeypatch, pipe.vae, "decode", when=lambda z, *a, **k: z.shape[0] > 1)
    sec = sec.model_copy(update={"batch_size": 2})
    arrays, calls = generate.generate_arrays(pipe, [PROMPT] * 2, [7, 8], sec)
    assert calls == [(0, 1), (1, 1)]
    for array, seed in zip(arrays, [7, 8]):
        (ref,) = generate.generate_batch(fresh, [PROMPT], [seed], sec)
        assert array.tobytes() == ref.tobytes()


class _Backend:
    """A non-SDXL cached model: a plain object holding a float16 network, as the caption backend."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).half().eval()

    def __call__(self, x, fail: bool):
        with inference(self):
            self.model.float()  # what an upcasting library does inside a call
            if fail:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return self.model(x.float())


def test_any_cached_model_is_restored_after_a_failed_call_and_dropped_when_it_cannot_be():
    release_models()
    backend = cached_model(("toy",), _Backend)
    with pytest.raises(torch.OutOfMemoryError):
        backend(torch.ones(2, 4), fail=True)
    dtypes = {t.dtype for t in [*backend.model.parameters(), *backend.model.buffers()] if t.is_floating_point()}
    assert dtypes == {torch.float16}
    assert ("toy",) in cached_keys()



def test_a_model_that_cannot_be_restored_is_dropped_from_the_cache(monkeypatch):
    from pab_build.models import loading

    release_models()
    backend = cached_model(("toy",), _Backend)

    def cannot(snap):
        raise RuntimeError("cannot move the weights back")

    monkeypatch.setattr(loading, "restore_placement", cannot)
    with pytest.raises(torch.OutOfMemoryError):  # the call's own error propagates, not the restore's
        backend(torch.ones(2, 4), fail=True)
    assert ("toy",) not in cached_keys()
    assert cached_model(("toy",), _Backend) is not backend  # the next call loads it afresh
    release_models()
