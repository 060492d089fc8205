"""Seeding and deterministic kernels for CMP training.

On the CPU, with the same inputs, seed, config and torch thread count, training then writes the
same ``model.safetensors`` and ``training_state.safetensors`` bytes on every run: data order,
augmentation and EDA come from generators seeded per (seed, epoch, sample); dropout and MLM masking
from torch's generator seeded here; and ``torch.use_deterministic_algorithms`` makes every kernel
that has a nondeterministic variant use the deterministic one (or raise, rather than drift).
On CUDA the flag only warns: some kernels (e.g. interpolation backward) have no deterministic
version, and an 8-GPU run must not stop for that.

Not byte-stable (see README, "Byte-stable outputs"): ``state.json`` snapshots the process-wide
Python/NumPy RNG for exact resume, and other threads of the process (Prefect's services) draw from
it too; ``train_summary.json`` names the checkpoint path.
"""

from __future__ import annotations

import os


def make_deterministic(seed: int, device: str = "cpu") -> None:
    """Seed Python, NumPy and torch (every device) and switch torch to deterministic kernels
    (strict on the CPU, warn-only elsewhere). Process-wide, like the seeds themselves."""
    import torch
    from accelerate.utils import set_seed

    on_cpu = device == "cpu" or device.startswith("cpu")
    if not on_cpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic workspace
    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=not on_cpu)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
