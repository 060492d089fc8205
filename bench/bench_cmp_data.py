"""CMP's training data at scale (issue 21): the stream-paired loader (identity hard negatives from
the shard stream, ``pab_build/cmp/pairing_stream.py``) against plain webdataset reading of the
same shards without hard negatives, and against the old loader (every counterpart by random
access from an index of all tar headers).

    python bench/bench_cmp_data.py --samples 100000            # builds the shards once, then measures
    python bench/bench_cmp_data.py --samples 1000000 --old-limit 20000 --s3-shards 2

The shards are real tars written by the project's writer (``build_shard``): ``--per-shard`` samples
each (the full profile's 5000), tiny JPEG / PNG members, the PAB identity structure (an OOPS! clip
is one identity: 75 images of each of its ``a``, ``a+`` and ``n`` prompts, keys in that order) and
hard negatives chosen by the build's own rule (``hard_negative_rows``); ``shards/index.json`` as a
build writes it. They are kept under ``--out`` and reused by a rerun with the same size.

Each mode runs in a child process (``--_run``) that iterates an epoch (or ``--limit`` samples) at
the reading level (batches of raw samples, no image decoding: both sides would pay the same
decoding), with ``--workers`` DataLoader workers. The parent samples the RSS and USS of the child
and of its workers from outside (psutil) every 0.2 s. Start-up is the time from building the
loader to its first batch. On moto's S3 server (in the child) the first ``--s3-shards`` shards are
uploaded, and the requests the server answers while the loader runs are counted (werkzeug's log).
``--rounds`` alternates plain and paired (the order swapped each round) and reports each round's
ratio: on 2 shared cores one run's wall figure moves by 10-15%, so the last line is
``ratio=X fallback_reads=N`` with X the median of the rounds' paired samples/s / plain samples/s.
The line before it gives the same ratio in CPU seconds (the child and its workers, from
``getrusage``), which other load on the machine does not move.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pab_build.cmp import data as cmp_data  # noqa: E402
from pab_build.cmp.pairing_stream import iter_samples  # noqa: E402
from pab_build.shards.hard_negatives import hard_negative_rows  # noqa: E402
from pab_build.shards.writer import build_shard  # noqa: E402

PER_PROMPT = 75
KINDS = (("a", "a"), ("ap", "a+"), ("n", "n"))  # key suffix, kind: sorted as the keys sort


# -- the shards -------------------------------------------------------------------------------------
def _pictures(n: int, fmt: str, size: int) -> list[bytes]:
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def make_shards(root: str, n: int, per_shard: int) -> list[str]:
    stamp = os.path.join(root, "shards", f".bench-{n}-{per_shard}")
    folder = os.path.join(root, "shards", "train")
    if os.path.exists(stamp):
        return cmp_data.list_shards(root, "train")
    import pyarrow as pa

    t0 = time.time()
    per_clip = PER_PROMPT * len(KINDS)
    clips = -(-n // per_clip)
    c = np.repeat(np.arange(clips), per_clip)[:n]
    k = np.tile(np.repeat(np.arange(len(KINDS)), PER_PROMPT), clips)[:n]
    i = np.tile(np.arange(PER_PROMPT), clips * len(KINDS))[:n]
    keys = [f"c{cl:010x}-{KINDS[kk][0]}-{ii:03d}" for cl, kk, ii in zip(c.tolist(), k.tolist(), i.tolist())]
    kinds = [KINDS[kk][1] for kk in k.tolist()]
    neg = hard_negative_rows(pa.array([f"c{cl:010x}" for cl in c.tolist()]), pa.array(kinds), pa.array(i),
                             pa.array(keys))
    jpgs, poses = _pictures(16, "JPEG", 16), _pictures(4, "PNG", 8)
    caption = "a person in a red shirt {} on the grass near clip {}"
    os.makedirs(folder, exist_ok=True)
    entries = []
    for s, start in enumerate(range(0, n, per_shard)):
        samples = []
        for r in range(start, min(n, start + per_shard)):
            behavior = "normal" if kinds[r] == "n" else "anomaly"
            hn = int(neg[r])
            meta = {"sample_key": keys[r], "identity": f"c{int(c[r]):010x}", "kind": kinds[r], "behavior": behavior,
                    "index": int(i[r]), "hard_negative_key": keys[hn] if hn >= 0 else None,
                    "hard_negative_caption": caption.format("lying" if kinds[r] == "n" else "standing", int(c[r]))}
            samples.append((keys[r], {"jpg": jpgs[r % 16], "pose.png": poses[r % 4],
                                      "txt": caption.format("standing" if kinds[r] == "n" else "lying",
                                                            int(c[r])).encode(),
                                      "json": json.dumps(meta, sort_keys=True).encode()}))
        data = build_shard(samples)
        name = f"train-{s:06d}.tar"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        entries.append({"path": f"train/{name}", "samples": len(samples), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    with open(os.path.join(root, "shards", "index.json"), "w") as f:
        json.dump({"format": "pab-webdataset-shards", "format_version": 1, "splits": {"train": {"shards": entries}}}, f)
    open(stamp, "w").close()
    print(f"wrote {n} samples in {len(entries)} shards ({sum(e['bytes'] for e in entries) / 2**20:.0f} MiB) "
          f"in {time.time() - t0:.0f} s", flush=True)
    return cmp_data.list_shards(root, "train")


# -- one mode, in a child process -------------------------------------------------------------------
def _train_data(urls, args, storage_options=None, pairing="stream"):
    return cmp_data.TrainData(pairing=pairing, urls=urls, transform=cmp_data.ImageTransform(16, (0.5,) * 3, (0.5,) * 3), batch_size=args.batch,
               seed=1, shuffle_buffer=1000, num_workers=args.workers, storage_options=storage_options or {})


def plain_loader(urls, args, storage_options):
    """Plain webdataset: the same shard shuffle, worker split, sample shuffle and batching, no
    hard negatives."""
    import random

    import torch
    import webdataset as wds

    urls = list(urls)
    random.Random(1_000_003).shuffle(urls)
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker,
        lambda src: iter_samples([s["url"] for s in src], storage_options),
        wds.shuffle(1000, initial=1000, seed=7919), wds.batched(args.batch, collation_fn=list, partial=True))
    return torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=args.workers)


def run_mode(mode: str, urls: list[str], args) -> dict:
    storage_options, requests = {}, None
    if mode.startswith("s3-"):
        urls, storage_options, requests = _moto(urls[:args.s3_shards])
        mode = mode[3:]
    import resource

    def cpu_now() -> float:
        return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
                   for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    cpu0, t0 = cpu_now(), time.time()  # the imports before this are not the loader's
    if mode == "plain":
        loader = plain_loader(urls, args, storage_options)
    else:
        # "old": the loader before issue 21 (an index of all tar headers, counterparts by random access)
        data = _train_data(urls, args, storage_options, "index" if mode == "old" else "stream")
        loader = data.loader(0, decode=False)
    limit = args.old_limit if mode == "old" else args.limit
    n = fallback = neighbour = 0
    first = None
    batches = iter(loader)
    for batch in batches:
        if first is None:
            first, t1 = time.time() - t0, time.time()
        n += len(batch)
        fallback += sum(s.get("__reads__", {}).get("fallback_reads", 0) for s in batch)
        neighbour += sum(s.get("__reads__", {}).get("neighbour_reads", 0) for s in batch)
        if limit and n >= limit:
            break
    seconds = time.time() - t1
    del batches, loader  # its workers exit and are waited for: their CPU seconds count in RUSAGE_CHILDREN
    import gc

    gc.collect()
    out = {"samples": n, "cpu_s": round(cpu_now() - cpu0, 2), "startup_s": round(first, 3), "seconds": round(seconds, 3),
           "samples_per_s": round((n - args.batch) / max(seconds, 1e-9), 1),  # the first batch is start-up
           "fallback_reads": fallback, "neighbour_reads": neighbour}
    if requests is not None:
        out["requests"] = len(requests.lines)
        out["requests_per_sample"] = round(len(requests.lines) / max(n, 1), 4)
    return out


def _moto(urls: list[str]):
    """moto's S3 server in this process, the shards uploaded; returns their s3 URLs, the storage
    options and the request log (cleared after the upload)."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    os.environ.update({"NO_PROXY": "127.0.0.1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    import s3fs
    from moto.server import ThreadedMotoServer

    class Log(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    log = Log(logging.INFO)
    wz = logging.getLogger("werkzeug")
    wz.addHandler(log)
    wz.setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    options = {"key": "bench", "secret": "bench", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.get_host_and_port()[1]}"}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    for u in urls:
        fs.put_file(u, f"bench/shards/train/{os.path.basename(u)}")
    index = json.load(open(os.path.join(os.path.dirname(os.path.dirname(urls[0])), "index.json")))
    names = {os.path.basename(u) for u in urls}
    index["splits"]["train"]["shards"] = [e for e in index["splits"]["train"]["shards"]
                                          if os.path.basename(e["path"]) in names]
    fs.pipe_file("bench/shards/index.json", json.dumps(index).encode())
    log.lines.clear()
    return [f"s3://bench/shards/train/{os.path.basename(u)}" for u in urls], options, log


# -- the parent: children measured from outside ------------------------------------------------------
def measure(mode: str, args) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--_run", mode, "--out", args.out, "--samples", str(args.samples),
           "--per-shard", str(args.per_shard), "--workers", str(args.workers), "--batch", str(args.batch),
           "--limit", str(args.limit), "--old-limit", str(args.old_limit), "--s3-shards", str(args.s3_shards)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    peak = {"main_rss": 0, "worker_rss": 0, "worker_uss": 0}
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak["main_rss"] = max(peak["main_rss"], p.memory_info().rss)
                for w in p.children():
                    info = w.memory_full_info()
                    peak["worker_rss"] = max(peak["worker_rss"], info.rss)
                    peak["worker_uss"] = max(peak["worker_uss"], info.uss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:  # the old loader over S3 can take hours: say so, go on
        os.killpg(proc.pid, 9)  # the child and its DataLoader workers
        proc.communicate()
        out = json.dumps({"timed_out_after_s": args.mode_timeout})
    done.set()
    watcher.join()
    if proc.returncode and "timed_out" not in out:
        raise SystemExit(f"{mode} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({k: round(v / 2**20, 1) for k, v in peak.items()})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--per-shard", type=int, default=5000)
    ap.add_argument("--out", default=None, help="where the shards are written (default /tmp/pab-bench-cmp-data-N)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="samples per run (0: one epoch)")
    ap.add_argument("--old-limit", type=int, default=20_000, help="samples the old loader reads (0: one epoch)")
    ap.add_argument("--s3-shards", type=int, default=2, help="shards uploaded to moto's S3 server (0: no S3 runs)")
    ap.add_argument("--mode-timeout", type=int, default=600, help="seconds one mode may run")
    ap.add_argument("--modes", default="plain,paired,old,s3-plain,s3-paired,s3-old")
    ap.add_argument("--rounds", type=int, default=3, help="plain / paired pairs run, alternating; the ratio is their median")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out or f"/tmp/pab-bench-cmp-data-{args.samples}"
    urls = make_shards(args.out, args.samples, args.per_shard)
    if args._run:
        print(json.dumps(run_mode(args._run, urls, args)), flush=True)
        return
    modes = [m for m in args.modes.split(",") if m and not (m.startswith("s3-") and args.s3_shards <= 0)]
    results, rounds = {}, []
    for mode in modes:
        if mode in ("plain", "paired") and {"plain", "paired"} <= set(modes):
            if mode == "paired":
                continue
            for r in range(max(1, args.rounds)):  # plain/paired pairs, the order swapped each round
                got = {m: measure(m, args) for m in (("plain", "paired") if r % 2 == 0 else ("paired", "plain"))}
                for m in ("plain", "paired"):
                    print(f"{m:10s} round={r + 1} " + " ".join(f"{k}={v}" for k, v in got[m].items()), flush=True)
                rounds.append(got)
            results.update(rounds[-1])
            continue
        results[mode] = r = measure(mode, args)
        print(f"{mode:10s} " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    paired = results.get("paired")
    wall = sorted(g["paired"]["samples_per_s"] / g["plain"]["samples_per_s"] for g in rounds)
    cpu = sorted((g["paired"]["samples"] / g["paired"]["cpu_s"]) / (g["plain"]["samples"] / g["plain"]["cpu_s"])
                 for g in rounds)
    median = (lambda xs: xs[len(xs) // 2] if xs else float("nan"))
    print(f"load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; workers={args.workers}; "
          f"rounds' wall ratios {', '.join(f'{x:.2f}' for x in wall)}")
    print(f"cpu_ratio={median(cpu):.2f} (samples per CPU second, paired / plain; rounds: {', '.join(f'{x:.2f}' for x in cpu)})")
    print(f"ratio={median(wall):.2f} fallback_reads={sum(g['paired']['fallback_reads'] for g in rounds) if rounds else -1}")


if __name__ == "__main__":
    main()
