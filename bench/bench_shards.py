"""Shard writing: the project's deterministic writer (`pab_build.shard_writer.build_shard` + atomic store
write) vs. a plain `tarfile` copy of the same bytes to disk (the baseline).

    python bench/bench_shards.py [--samples 400] [--kb 120]

Prints MB/s for both and the ratio, measured in this process on the same bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.shard_writer import build_shard  # noqa: E402
from pab_build.store import Store  # noqa: E402


def plain_tarfile(path: str, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--kb", type=int, default=120, help="bytes of jpg per sample (KiB)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    samples = [
        (f"c{i:010d}-normal", {"jpg": rng.bytes(args.kb * 1024), "pose.png": rng.bytes(args.kb * 256),
                               "txt": b"a man in a red jacket falls off his bike " * 3, "json": b'{"k": 1}'})
        for i in range(args.samples)
    ]
    total_mb = sum(len(d) for _, m in samples for d in m.values()) / 1e6
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        timings = {}
        for name, fn in [
            ("tarfile copy (baseline)", lambda n: plain_tarfile(os.path.join(d, f"plain-{n}.tar"), samples)),
            ("pab shards writer", lambda n: store.write_bytes(f"pab-{n}.tar", build_shard(samples))),
        ]:
            best = float("inf")
            for n in range(args.repeat):
                t0 = time.perf_counter()
                fn(n)
                best = min(best, time.perf_counter() - t0)
            timings[name] = total_mb / best
            print(f"{name:24s} {timings[name]:8.1f} MB/s")
    ratio = timings["pab shards writer"] / timings["tarfile copy (baseline)"]
    print(f"ratio pab writer / tarfile = {ratio:.2f}x  ({args.samples} samples, {total_mb:.0f} MB; "
          "the writer also sorts, fsyncs and renames atomically)")


if __name__ == "__main__":
    main()
