"""CMP on the CPU: two uninterrupted runs write the same model and training-state bytes, even
while another thread of the process draws from the global Python RNG (as Prefect's services do)."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import torch
from test_cmp_train import make_cfg, shards  # noqa: F401 - fixtures

from pab_build.cmp.train import MODEL_FILE, STATE_TENSORS_FILE, train_cmp


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rerun_writes_identical_checkpoint_bytes(make_cfg, shards, tmp_path):
    cfg = make_cfg(max_steps=3, checkpoint_every=3, warmup_steps=1)
    first = train_cmp(cfg, shards, str(tmp_path / "a"))
    assert torch.are_deterministic_algorithms_enabled()
    stop = threading.Event()

    def churn():  # another thread consuming the global RNG during training
        while not stop.is_set():
            random.random()
            time.sleep(0.0005)

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        second = train_cmp(cfg, shards, str(tmp_path / "b"))
    finally:
        stop.set()
        worker.join()
    assert first["losses"] == second["losses"] and first["steps"] == 3
    for name in (MODEL_FILE, STATE_TENSORS_FILE):
        a = tmp_path / "a" / "cmp" / "checkpoints" / "step-00000003" / name
        b = tmp_path / "b" / "cmp" / "checkpoints" / "step-00000003" / name
        assert _digest(a) == _digest(b), name
