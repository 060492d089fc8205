"""Heavy models load lazily, once per worker process, and are never passed as task arguments.

``cached_model(("openpose", path, device), lambda: load(...))`` returns the same object to every
unit that runs in this process (threads included), so a Ray worker or a Prefect thread pool loads
RealVisXL once, not once per unit.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    import torch

# torch is imported where a model is loaded or run, never at import: planning and finalizing a stage
# import its module, and torch alone is ~500 MiB of resident memory before any row

T = TypeVar("T")
log = logging.getLogger(__name__)

_CACHE: dict[Hashable, object] = {}
_LOCKS: dict[Hashable, threading.Lock] = {}
_GUARD = threading.Lock()
LOAD_COUNTS: dict[Hashable, int] = {}  # how often each key was loaded in this process (tests, Ray check)


class LoadGate:
    """Loading is exclusive, inference shared. ``from_pretrained`` changes process-wide state while
    it builds a model: transformers sets torch's default dtype, diffusers (through accelerate's
    ``init_empty_weights``) patches ``nn.Module.register_parameter`` to put new parameters on the
    meta device. A model built or run in another thread meanwhile picks that up ("Cannot copy out
    of meta tensor", or bfloat16 where float32 was meant); the two branches of a build and the units
    of a stage share one process, so every load waits for running forwards and the reverse."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._writers_waiting = 0
        self._mine = threading.local()  # shared holds of this thread

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:  # a load may run a forward (warm-up): it already excludes the rest
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers += 1
            self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._mine.n -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if getattr(self._mine, "n", 0):
                    raise RuntimeError("a model load inside a forward pass would wait for itself")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                self._cond.notify_all()


GATE = LoadGate()


@contextmanager
def inference(*models: object) -> Iterator[None]:
    """Hold around a model's forward / generate call (see :class:`LoadGate`).

    A failed call leaves the ``models`` as they were: their tensors' dtypes and devices are noted
    before the call and put back when it raises. Libraries move weights inside a call (diffusers
    upcasts a float16 SDXL VAE to float32 for the decode and back after it); an out-of-memory
    error in between skipped the move back, and the cached model then failed every later call
    with a dtype mismatch that no batch halving catches. A model that cannot be put back is
    dropped from the cache, so the next call loads it afresh."""
    with GATE.shared():
        if not models:
            yield
            return
        before = [snapshot_placement(m) for m in models]
        try:
            yield
        except BaseException:
            for m, snap in zip(models, before):
                try:
                    restore_placement(snap)
                except Exception:  # noqa: BLE001 - the call's own error is what propagates
                    log.exception("could not restore %s after a failed call: dropping it", type(m).__name__)
                    evict_model(m)
            raise


def torch_modules(obj: object, depth: int = 2) -> list[torch.nn.Module]:
    """The ``torch.nn.Module`` s a cached model is made of: itself, a diffusers pipeline's
    components, or modules held in its attributes (``depth`` levels of plain objects down)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return [obj]
    parts = getattr(obj, "components", None)
    values = list(parts.values()) if isinstance(parts, dict) else list(getattr(obj, "__dict__", {}).values())
    found: dict[int, torch.nn.Module] = {}
    for v in values:
        if isinstance(v, torch.nn.Module):
            found[id(v)] = v
        elif depth > 1 and hasattr(v, "__dict__") and not isinstance(v, type):
            found.update((id(m), m) for m in torch_modules(v, depth - 1))
    return list(found.values())


Placement = list[tuple["torch.nn.Module", str, bool, "torch.dtype", "torch.device"]]


def snapshot_placement(obj: object) -> Placement:
    """(owning module, tensor name, is a parameter, dtype, device) of every tensor of ``obj``."""
    out: Placement = []
    for top in torch_modules(obj):
        for mod in top.modules():
            out += [(mod, n, True, p.dtype, p.device) for n, p in mod._parameters.items() if p is not None]
            out += [(mod, n, False, b.dtype, b.device) for n, b in mod._buffers.items() if b is not None]
    return out


def restore_placement(snap: Placement) -> int:
    """Move every tensor back to its noted dtype/device; returns how many had moved."""
    moved = 0
    for mod, name, is_param, dtype, device in snap:
        t = (mod._parameters if is_param else mod._buffers)[name]
        if t is None or (t.dtype == dtype and t.device == device):
            continue
        if is_param:
            t.data = t.data.to(device=device, dtype=dtype)
        else:
            mod._buffers[name] = t.to(device=device, dtype=dtype)
        moved += 1
    return moved


def evict_model(obj: object) -> None:
    with _GUARD:
        for k in [k for k, v in _CACHE.items() if v is obj]:
            del _CACHE[k]
            _LOCKS.pop(k, None)


def cached_model(key: Hashable, load: Callable[[], T]) -> T:
    if key in _CACHE:
        return _CACHE[key]  # type: ignore[return-value]
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            with GATE.exclusive():
                _CACHE[key] = load()
            LOAD_COUNTS[key] = LOAD_COUNTS.get(key, 0) + 1
            name = key[0] if isinstance(key, tuple) and key else key
            log.info("loaded model %s in process %d", name, os.getpid())
    return _CACHE[key]  # type: ignore[return-value]


def cached_keys() -> list[Hashable]:
    """Keys of the models loaded in this process now."""
    with _GUARD:
        return list(_CACHE)


def _model_name(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else key


def release_models(names: Iterable[str] | None = None) -> int:
    """Drop this process's cached models (those named in ``names``, or all) and return CUDA's cached
    blocks, so the next stage's models get the memory (Qwen2-VL-7B and SDXL together do not fit a
    24 GB card). Returns how many models were released."""
    import gc

    wanted = None if names is None else set(names)
    with _GUARD:
        keys = [k for k in _CACHE if wanted is None or _model_name(k) in wanted]
        for k in keys:
            del _CACHE[k]
            _LOCKS.pop(k, None)
    n = len(keys)
    gc.collect()
    _empty_cuda_cache()
    if n:
        log.info("released %d model(s) in process %d", n, os.getpid())
    return n


_HELD: dict[str, int] = {}  # model name -> stages running in this process that use it


@contextmanager
def models_held_for_stage(names: Iterable[str]) -> Iterator[None]:
    """While a stage runs, its models stay cached; when the last running stage that uses a model
    ends, that model is released. The test and training branches run at once in one process:
    ending ``test_captions`` must not drop SDXL under a running ``generate`` (its units would load
    a second copy), nor Qwen2-VL under a running ``train_captions``."""
    names = list(dict.fromkeys(names))
    with _GUARD:
        for n in names:
            _HELD[n] = _HELD.get(n, 0) + 1
    try:
        yield
    finally:
        with _GUARD:
            for n in names:
                _HELD[n] -= 1
            idle = [n for n in names if not _HELD[n]]
            for n in idle:
                del _HELD[n]
        if idle:
            release_models(idle)


def _imported_torch():
    """torch if this process imported it, else None (without importing it). While another thread
    is still importing it, sys.modules holds a half-made module (no ``torch.cuda`` yet): the import
    statement waits for that thread's import to finish."""
    if "torch" not in sys.modules:
        return None
    import torch

    return torch


def _empty_cuda_cache() -> None:
    torch = _imported_torch()  # a process that never imported torch holds no CUDA memory
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(device: str) -> torch.device:
    """``cuda`` without a GPU is a configuration error, not a silent fall-back to the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={device!r} but no CUDA device is available")
    return dev


def is_oom(err: BaseException) -> bool:
    """True for CUDA (or CPU allocator) out-of-memory errors."""
    torch = _imported_torch()
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def run_halving_on_oom(items: list, batch_size: int, fn: Callable[[list], list]) -> list:
    """Run ``fn`` over ``items`` in batches; on out-of-memory halve the batch and retry the same
    items, down to 1 (then the error propagates and the unit fails)."""
    out: list = []
    i = 0
    bs = max(1, batch_size)
    while i < len(items):
        batch = items[i : i + bs]
        try:
            out.extend(fn(batch))
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or bs == 1:
                raise
            bs = max(1, bs // 2)
            _empty_cuda_cache()
            continue
        i += len(batch)
    return out
