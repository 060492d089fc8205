"""Shard writing: the project's streamed writer (`pab_build.shards.writer.write_shard`: tar members
copied from the source files in chunks into `Store.open_atomic`) vs. a plain `tarfile`
copy of the same files to disk followed by an fsync (the baseline).

    python bench/bench_shards.py [--samples 400] [--kb 120]      # MB/s of both and the ratio
    python bench/bench_shards.py --only-writer --samples 1000 --kb 1024   # a ~1.2 GiB shard
    /usr/bin/time -v python bench/bench_shards.py --only-writer ...      # peak RSS from outside

The sample files (a jpg of ``--kb`` KiB and a pose map of a quarter of that) are written to disk
first; both writers read them from there. Each run's best time is taken over ``--repeat`` runs.
Peak RSS (psutil, sampled) is printed for the writer.
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
from bench.bench_scale import PeakRSS  # noqa: E402
from pab_build.shards.writer import write_shard  # noqa: E402
from pab_build.store import Store  # noqa: E402

TXT = b"a man in a red jacket falls off his bike " * 3
JSON = b'{"k": 1}'


def plain_tarfile(path: str, root: str, keys: list[str]) -> None:
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                tar.add(os.path.join(root, "src", f"{key}.jpg"), f"{key}.jpg")
                tar.add(os.path.join(root, "src", f"{key}.png"), f"{key}.pose.png")
                for ext, data in (("json", JSON), ("txt", TXT)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())


def pab_writer(store: Store, rel: str, keys: list[str]) -> None:
    def samples():
        for key in keys:
            yield key, {"jpg": f"src/{key}.jpg", "pose.png": f"src/{key}.png", "txt": TXT, "json": JSON}

    write_shard(store, rel, samples())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--kb", type=int, default=120, help="bytes of jpg per sample (KiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only-writer", action="store_true", help="write one shard with the pab writer, no baseline")
    ap.add_argument("--dir", help="folder for the files (default: a temporary one)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        store = Store(d)
        keys = [f"c{i:010d}-n-{i % 75:03d}" for i in range(args.samples)]
        os.makedirs(os.path.join(d, "src"))
        for key in keys:
            with open(os.path.join(d, "src", f"{key}.jpg"), "wb") as f:
                f.write(rng.bytes(args.kb * 1024))
            with open(os.path.join(d, "src", f"{key}.png"), "wb") as f:
                f.write(rng.bytes(args.kb * 256))
        total_mb = args.samples * (args.kb * 1280 + len(TXT) + len(JSON)) / 1e6
        runs = [("pab streamed writer", lambda n: pab_writer(store, f"pab-{n}.tar", keys))]
        if not args.only_writer:
            runs.insert(0, ("tarfile + fsync (baseline)", lambda n: plain_tarfile(os.path.join(d, f"plain-{n}.tar"),
                                                                                 d, keys)))
        speed, peak = {}, {}
        for name, fn in runs:
            best = float("inf")
            for n in range(1 if args.only_writer else args.repeat):
                with PeakRSS() as rss:
                    fn(n)
                best = min(best, rss.seconds)
                peak[name] = max(peak.get(name, 0), rss.mib)
            speed[name] = total_mb / best
            print(f"{name:28s} {speed[name]:8.1f} MB/s  peak RSS {peak[name]} MiB", flush=True)
        if not args.only_writer:
            ratio = speed["pab streamed writer"] / speed["tarfile + fsync (baseline)"]
            print(f"ratio pab writer / tarfile = {ratio:.2f}x  ({args.samples} samples, {total_mb:.0f} MB per shard)")
        print(f"shard_mb={total_mb:.0f} writer_mb_s={speed['pab streamed writer']:.1f} "
              f"writer_peak_rss_mib={peak['pab streamed writer']}")


if __name__ == "__main__":
    main()
