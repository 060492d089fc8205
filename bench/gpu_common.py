"""What the GPU benchmarks share: the device, timing, and a result file written phase by phase.

A benchmark is a list of phases (a baseline, then one change at a time). Each phase's figures are
written to the JSON file as soon as they are measured, so a timeout or a crash in a later phase
(or in a later process adding phases to the same file, like the SDXL compile variant) keeps them.
A phase that raises is recorded with its error, the next phase still runs, and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Callable

import torch

NO_CUDA_EXIT = 2
FAILED_EXIT = 1


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same code paths, for tests")
    ap.add_argument("--json", default=None, help="add the phases' results to this file, one phase at a time")
    ap.add_argument("--dry-run", action="store_true", help="CPU check: build on the meta device, count parameters")


def device_or_exit(name: str, script: str) -> torch.device | None:
    """The device to run on, or None (after saying why) when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA device; this benchmark needs a GPU (use --dry-run to check it on the CPU, "
              "or --device cpu to run its code paths there)", file=sys.stderr)
        return None
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (not a GPU)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to whole batches: a partial last batch would change shapes in the timed
    region (a recompile with torch.compile, a smaller, less efficient call without)."""
    return max(1, math.ceil(n / multiple)) * multiple


def rate(items: int, seconds: float, unit: str, **extra) -> dict:
    return {"items": items, "seconds": seconds, "per_s": items / seconds, "unit": unit, **extra}


class Results:
    """``{"benchmark": ..., <meta>, "phases": {name: figures}}`` in ``path`` (None: not written).
    An existing file of the same benchmark is extended, not replaced."""

    def __init__(self, path: str | None, benchmark: str, **meta):
        self.path, self.failed = path, []
        self.data: dict = {"benchmark": benchmark, "phases": {}}
        if path and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("benchmark") == benchmark:
                self.data = old
        self.data.update(meta)
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)  # a reader never sees half a file

    def phase(self, name: str, label: str, measure: Callable[[], dict]) -> dict | None:
        """Run one phase; record its figures (or its error) at once."""
        print(f"-- {name}: {label}", flush=True)
        try:
            figures = {"label": label, **measure()}
        except Exception as e:  # noqa: BLE001 - recorded, reported, and the exit code says so
            traceback.print_exc()
            self.failed.append(name)
            self.data["phases"][name] = {"label": label, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            self.write()
            return None
        self.data["phases"][name] = figures
        self.write()
        if "per_s" in figures:
            print(f"   {figures['per_s']:10.3f} {figures['unit']} ({figures['items']} in {figures['seconds']:.1f} s)",
                  flush=True)
        return figures

    def exit_code(self) -> int:
        if self.failed:
            print(f"failed phases: {', '.join(self.failed)}", file=sys.stderr)
        return FAILED_EXIT if self.failed else 0
