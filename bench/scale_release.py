"""The steps after the planners, on the synthetic build of ``bench_scale.py`` (``--through release``).

First (not measured) the build gets real files consistent with its manifests:

- every ok ``generate`` image and ``gen_pose`` pose map, as a hard link to one tiny JPEG / PNG
  (a new source file every 30,000 links: ext4 allows 65,000 per inode, and export-official
  hard-links the images once more), so folders and listings
  have their real size and the card / export read real bytes;
- every training shard of the ``train_shards`` manifest, as a real tar written by
  ``shards.writer.write_shard`` (jpg, pose.png, txt, json members, ~4 KB a sample instead of
  ~190 KB), with the manifest's ``shard_bytes`` / ``shard_sha256`` and ``shards/index.json``
  rewritten to match;
- a ``done`` marker per unit of the training stages, so ``pab status`` reads as many markers as
  after a real build.

Then each step runs as its own process under ``/usr/bin/time`` (peak RSS from outside the
process, wall and CPU seconds; the card first, the rest at the same time unless
``--steps-one-by-one``): the dataset card, ``pab export-official``, ``pab verify``, a ``--deep``
verify of a sample (the first ``--deep-shards`` shards, linked into a folder of their own with
an index of just those), ``pab status``, ``pab status --json`` (both plan every stage against the
build's ``config.yaml``, written here as ``pab run`` writes it) and ``pab publish --force`` to a local
folder (``--force``: the synthetic build has no test split, which publish otherwise refuses).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LINKS_PER_SOURCE = 30_000  # ext4 allows 65,000 links an inode: export-official's links must fit too


def _tiny(fmt: str, colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def link_files(out: str) -> int:
    """Hard links for every ok image and pose path of the manifests; returns how many."""
    import pyarrow.parquet as pq

    made = 0
    for stage, col, fmt in (("generate", "image_path", "JPEG"), ("gen_pose", "pose_path", "PNG")):
        data, source, parent, linked = _tiny(fmt, (200, 40, 40)), None, None, 0
        with open(os.path.join(out, "manifests", f"{stage}.parquet"), "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[col, "status"]):
                for rel, status in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    if status != "ok" or not rel:
                        continue
                    if linked % LINKS_PER_SOURCE == 0:
                        source = os.path.join(out, "_bench_sources", f"{stage}-{linked}.{fmt.lower()}")
                        os.makedirs(os.path.dirname(source), exist_ok=True)
                        with open(source, "wb") as s:
                            s.write(data)
                    path = os.path.join(out, rel)
                    if os.path.dirname(path) != parent:
                        parent = os.path.dirname(path)
                        os.makedirs(parent, exist_ok=True)
                    if not os.path.exists(path):
                        os.link(source, path)
                    linked += 1
        made += linked
    return made


def write_shards(out: str) -> tuple[int, int]:
    """Real tar shards for the ok rows of ``train_shards``; the manifest and index made to match.
    Returns (shards, bytes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pab_build.manifests import read_manifest_table, write_manifest_table
    from pab_build.shards.index import update_shard_index
    from pab_build.shards.writer import sample_json, write_shard
    from pab_build.store import Store

    store = Store(out)
    jpg, png = _tiny("JPEG", (40, 200, 40)), _tiny("PNG", (0, 0, 0))
    ok = read_manifest_table(store, "train_shards", ["sample_key", "shard", "hard_negative_key", "behavior",
                                                     "kind", "clip_key"], ok_only=True)
    ok = ok.sort_by([("shard", "ascending"), ("sample_key", "ascending")])
    shard = ok["shard"].combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(shard[1:], shard[:-1]).to_numpy(zero_copy_only=False)])
    sizes, digests, total = {}, {}, 0
    for start, end in zip(starts, [*starts[1:], ok.num_rows]):
        rows = ok.slice(int(start), int(end - start)).to_pylist()  # one shard's rows (~5,000)
        rel = rows[0]["shard"]
        samples = ((r["sample_key"], {"jpg": jpg, "json": sample_json({
            "key": r["sample_key"], "split": "train", "behavior": r["behavior"], "kind": r["kind"],
            "clip_key": r["clip_key"], "hard_negative_key": r["hard_negative_key"],
            "hard_negative_caption": "A man in a red jacket falls off his bicycle into a ditch."}),
            "pose.png": png, "txt": b"A man in a red jacket rides a bicycle down a steep dirt trail."}) for r in rows)
        sizes[rel], digests[rel] = write_shard(store, rel, samples)
        total += sizes[rel]
    table = read_manifest_table(store, "train_shards")
    rels = table["shard"]
    names = pa.array(sorted(sizes), pa.string())
    found = pc.index_in(rels, value_set=names)
    for col, values, typ in (("shard_bytes", [sizes[n] for n in names.to_pylist()], table.schema.field("shard_bytes").type),
                             ("shard_sha256", [digests[n] for n in names.to_pylist()], pa.string())):
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, typ).take(found))
    write_manifest_table(store, "train_shards", table)
    update_shard_index(store, "train", table)
    return len(sizes), total


def write_markers(out: str, images_per_prompt: int) -> int:
    """A ``done`` marker per unit of the training stages, as ``execute_unit`` leaves them (written
    without an fsync: setup), so ``pab status`` reads ~65,000 markers as after a real build."""
    import json
    import socket
    import time

    from bench_scale import STAGES, fake_listing
    from pab_build.config import load_config
    from pab_build.engine.pipeline import get_stage
    from pab_build.engine.units import Context
    from pab_build.shards import packing
    from pab_build.store import Marker, Store

    cfg = load_config("full", [f"generate.images_per_caption={images_per_prompt}"])
    ctx = Context.create(cfg, out)
    packing.list_file_sizes = fake_listing(ctx.store)  # the sizes the bench planned train_shards with
    made = 0
    for name in STAGES:
        stage = get_stage(name)
        folder = os.path.join(out, "_markers", name)
        os.makedirs(folder, exist_ok=True)
        for unit in stage.plan_units(ctx):
            marker = Marker("done", stage.stage_hash(cfg), unit.input_hash, len(unit.items), ok=len(unit.items),
                            wall_s=30.0, finished_at=time.time(), host=socket.gethostname(), worker="1:1")
            with open(os.path.join(out, Store.marker_rel(name, unit.unit_id)), "w") as f:
                f.write(json.dumps(marker.__dict__, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            made += 1
    return made


def deep_sample(out: str, shards: int) -> str:
    """A folder with the first ``shards`` training shards (hard links) and an index of just those."""
    import json

    sample = os.path.join(out + "-deep-sample")
    index = json.load(open(os.path.join(out, "shards", "index.json")))
    sec = index["splits"]["train"]
    sec["shards"] = sec["shards"][:shards]
    sec["totals"] = {**sec["totals"], "shards": len(sec["shards"]), "samples": sum(s["samples"] for s in sec["shards"]),
                     "bytes": sum(s["bytes"] for s in sec["shards"])}
    index["splits"] = {"train": sec}
    os.makedirs(os.path.join(sample, "shards", "train"), exist_ok=True)
    for s in sec["shards"]:
        dst = os.path.join(sample, "shards", s["path"])
        if not os.path.exists(dst):
            os.link(os.path.join(out, "shards", s["path"]), dst)
    with open(os.path.join(sample, "shards", "index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return sample


def start(name: str, cmd: list[str], log_dir: str) -> tuple[str, subprocess.Popen, str]:
    """Start ``cmd`` under /usr/bin/time (its output in ``log_dir``)."""
    stats = os.path.join(log_dir, f"{name.replace(' ', '_')}.time")
    env = {**os.environ, "PYTHONPATH": ROOT}
    with open(os.path.join(log_dir, f"{name.replace(' ', '_')}.log"), "w") as log:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M %e %U %S", "-o", stats, *cmd], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return name, proc, stats


def finish(name: str, proc: subprocess.Popen, stats: str) -> dict:
    """Wait for a started step; its peak RSS (KB -> MiB), wall and CPU seconds."""
    rc = proc.wait()
    kb, wall, user, system = open(stats).read().split()[-4:]
    res = {"step": name, "rc": rc, "mib": round(int(kb) / 1024), "s": float(wall), "cpu_s": float(user) + float(system)}
    print(f"{name:>28}: rc {rc} | {res['s']:>7.1f} s (cpu {res['cpu_s']:.1f}) | {res['mib']:>5} MiB", flush=True)
    return res


def release_steps(out: str, images_per_prompt: int, deep_shards: int = 2, one_by_one: bool = False) -> list[dict]:
    """Set up the files, then run and measure each step; returns one result per step. The card
    runs first (publish ships it); the other steps only read the build, and run at the same time
    unless ``one_by_one``: each is its own process, so its peak RSS and CPU seconds are its own,
    but their wall seconds overlap (on a shared machine, read the CPU seconds)."""
    import time

    from pab_build.config import load_config

    t0 = time.perf_counter()
    with open(os.path.join(out, "config.yaml"), "w") as f:  # as `pab run` saves it: status plans against it
        f.write(load_config("full", [f"generate.images_per_caption={images_per_prompt}"]).to_yaml())
    links = link_files(out)
    shards, total = write_shards(out)
    markers = subprocess.run([sys.executable, "-c", "import sys; from scale_release import write_markers; "
                              "print(write_markers(sys.argv[1], int(sys.argv[2])))", out, str(images_per_prompt)],
                             check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.dirname(os.path.abspath(__file__))}"})
    print(f"{'(setup)':>17}: {links} image/pose links, {shards} shards of {total / 2**20:.0f} MiB, "
          f"{markers.stdout.strip()} unit markers "
          f"({time.perf_counter() - t0:.0f} s, not measured)", flush=True)
    logs = out + "-logs"
    os.makedirs(logs, exist_ok=True)
    pab = [sys.executable, "-m", "flows.cli"]
    sample = deep_sample(out, deep_shards)
    steps = [("card", [*pab, "card", out]),
             ("verify", [*pab, "verify", out]),
             (f"verify --deep ({deep_shards} shards)", [sys.executable, "-c", "import sys; from pab_build.shards.index "
              "import verify_shards; r = verify_shards(sys.argv[1], deep=True); print(r); sys.exit(0 if r.ok else 1)",
              sample]),
             ("status", [*pab, "status", out]),
             ("status --json", [*pab, "status", out, "--json"]),
             # --force: this build has no test split, which publish refuses otherwise ("split test has 0 samples")
             ("publish", [*pab, "publish", out, out + "-published", "--force"]),
             ("export-official", [*pab, "export-official", out, out + "-official"])]
    results = [finish(*start(*steps[0], logs))]
    if one_by_one:
        results += [finish(*start(name, cmd, logs)) for name, cmd in steps[1:]]
    else:
        results += [finish(*running) for running in [start(name, cmd, logs) for name, cmd in steps[1:]]]
    return results
