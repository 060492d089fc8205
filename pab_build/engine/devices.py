"""Every GPU of a node: one worker process per device for GPU stages (without Ray).

With ``run.device: cuda`` and N visible GPUs (or ``run.devices`` naming them), a GPU stage's units
run in N worker processes, one per device, each with ``run.device`` set to its device: a worker
loads its models once (``models.cached_model``) and keeps them for the stage's units; when the
stage ends the workers exit, which frees their GPU memory. Outputs do not depend on which worker
ran a unit (a unit's outputs depend on its items and the config only), so a build on
``[cpu, cpu]`` is byte-identical to a one-worker build. With Ray, Ray gives each unit its GPU
(``run.gpus_per_unit``) and this module is not used.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from ..config import PABConfig

log = logging.getLogger(__name__)


def resolve_devices(cfg: PABConfig) -> list[str]:
    """The devices a GPU stage's units spread over."""
    if cfg.run.devices:
        return list(cfg.run.devices)
    if cfg.run.device == "cuda":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [cfg.run.device]


def wants_device_workers(cfg: PABConfig, uses_gpu: bool) -> bool:
    return uses_gpu and cfg.run.task_runner != "ray" and len(resolve_devices(cfg)) > 1


def _execute_on_device(cfg: PABConfig, out: str, stage_name: str, unit) -> tuple[str, int]:
    """In a device worker: run one unit (models stay cached in this process between units)."""
    from .pipeline import get_stage
    from .units import Context, execute_unit

    return execute_unit(Context.create(cfg, out), get_stage(stage_name), unit), os.getpid()


class DevicePool:
    """One single-process executor per device; :meth:`run` runs a unit on a free device and
    blocks until it is done (call it from as many threads as there are devices)."""

    def __init__(self, cfg: PABConfig, devices: list[str]):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self.devices = devices
        self._cfgs, self._executors = [], []
        for device in devices:
            dev_cfg = cfg.model_copy(deep=True)
            dev_cfg.run.device, dev_cfg.run.devices = device, None
            self._cfgs.append(dev_cfg)
            self._executors.append(ProcessPoolExecutor(max_workers=1, mp_context=ctx))
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(len(devices)):
            self._free.put(slot)
        self._lock = threading.Lock()
        self.units_per_worker: Counter[int] = Counter()  # worker pid -> units it ran
        log.info("device workers: %s", ", ".join(devices))

    def run(self, out: str, stage_name: str, unit) -> str:
        slot = self._free.get()
        try:
            result, pid = self._executors[slot].submit(
                _execute_on_device, self._cfgs[slot], out, stage_name, unit).result()
        finally:
            self._free.put(slot)
        with self._lock:
            self.units_per_worker[pid] += 1
        return result

    def close(self) -> None:
        """End the workers: their models, and the GPU memory they hold, go with them."""
        for ex in self._executors:
            ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DevicePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
