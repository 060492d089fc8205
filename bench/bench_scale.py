"""Planning and finalizing the training branch at the paper's size, without models or images.

    python bench/bench_scale.py --prompts 20387 --images-per-prompt 75 --clips 20000

Writes a prompts manifest (``--prompts`` prompts: ``n``, ``a`` and ``a+`` of one clip each, over
at most ``--clips`` clips), then for each stage ``generate``, ``gen_pose``, ``train_captions``,
``train_attributes`` and ``train_shards``, in a fresh process each, as ``flows/build_pab.py`` does:

1. plans the units (``STAGE.plan_units``) from the manifests written so far (measured);
2. synthesises every unit's rows file in the stage's real schema, with values of realistic size
   (not measured): about a third of the generated images fail the pose filter (1.53M -> ~1.0M
   kept, as in the paper), a few are rejected elsewhere;
3. finalizes the stage (``finalize_stage``: the manifest from the unit files, then the stage's
   finalize hook) (measured).

``train_shards`` lists the image folders to size its samples; here that listing is faked (an
Arrow table of every image and pose path with a size of ~150/40 KB), since no files exist.
Prints seconds (wall, and the process's CPU seconds: on a shared machine wall time is mostly
waiting) and peak RSS (sampled every 10 ms) per phase; the last line is
``peak_rss_mib=N seconds=S`` (N: the largest measured phase; S: plan + finalize, all stages).
Wrap it in ``/usr/bin/time -v`` for the whole process tree's maximum (synthesis included).

``--through release`` goes on to every step after the planners (``bench/scale_release.py``): the
dataset card, ``pab export-official``, ``pab verify`` (and ``--deep`` on a sample of shards),
``pab status`` (plain and ``--json``) and ``pab publish`` to a local folder, each in its own process
under ``/usr/bin/time`` (peak RSS from outside, wall seconds); they count in the last line too.
Keep ``--out`` on a disk with room: at full size ~5 GB of shards, twice (the published copy), and
~2M small files of the official export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STAGES = ["generate", "gen_pose", "train_captions", "train_attributes", "train_shards"]
KINDS = ("n", "a", "a+")
SUFFIX = {"n": "n", "a": "a", "a+": "ap"}
MODEL = "models/Qwen2-VL-7B-Instruct@" + "0" * 40
KEYPOINTS = json.dumps([[[0.5123, 0.2345, 0.9123]] * 18])  # one person, 18 keypoints: ~400 characters
CAPTION = "A man in a red jacket rides a bicycle down a steep dirt trail and loses his balance near a ditch."


class PeakRSS:
    """Peak resident memory of this process while the block runs (psutil, every 10 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self._stop, self.peak = psutil.Process(), threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0, self._cpu0 = time.perf_counter(), sum(os.times()[:2])
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = sum(os.times()[:2]) - self._cpu0  # this process's CPU time (all threads)
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return False

    @property
    def mib(self) -> int:
        return round(self.peak / 2**20)


def _h(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_prompts(store, n_prompts: int, n_clips: int) -> None:
    from pab_build.manifests import write_manifest
    from pab_build.oops import clip_key

    clips = min(n_clips, -(-n_prompts // len(KINDS)))
    rows = []
    for i in range(n_prompts):
        name = f"Funny Fails - Week {i // len(KINDS) % clips} (March 2017){i // (len(KINDS) * clips) or ''}"
        ck, kind = clip_key(name), KINDS[i % len(KINDS)]
        rows.append({"sample_key": f"{ck}-{SUFFIX[kind]}", "status": "ok", "reason": None, "clip_name": name,
                     "clip_key": ck, "split": "train", "kind": kind, "annotation_index": 0,
                     "prompt": "A man is riding a bicycle down a steep hill and falls into the ditch.",
                     "subject": "A man", "counterpart_keys": "[]"})
    write_manifest(store, "prompts", rows)


# -- rows each stage's units would have written ---------------------------------------------------
def synth_row(stage: str, it: dict, unit_id: str) -> dict:
    key = it["sample_key"]
    row = {"sample_key": key, "status": "ok", "reason": None}
    if stage == "generate":
        row.update(prompt_key=it["prompt_key"], clip_key=it["clip_key"], kind=it["kind"], index=it["index"],
                   seed=it["seed"], image_path=f"generate/{it['prompt_key']}/{key}.jpg", image_sha256=_sha(key),
                   width=1024, height=1024, model_id="SG161222/RealVisXL_V4.0@" + "0" * 40, prompt=it["prompt"],
                   batch_first_index=it["index"] - it["index"] % 4, batch_size=4)
    elif stage == "gen_pose":
        row.update(image_path=it["image_path"], image_sha256=it["image_sha256"])
        if _h(key) % 3 == 0:  # the paper keeps 1,013,605 of 1,529,025
            row.update(status="rejected", person_count=1, person_height=0.12,
                       reason="person too small: the tallest person is 0.120 of the image height (below min_person_height=0.2)")
        else:
            row.update(pose_path=f"gen_pose/{it['prompt_key']}/{key}.png", pose_sha256=_sha("p" + key),
                       person_count=1, main_person_area=0.31, keypoint_count=15, person_height=0.62,
                       limb_ratio_max=1.1, keypoints_json=KEYPOINTS)
    elif stage == "train_captions":
        row.update(caption_generated=CAPTION, caption=CAPTION, caption_corrected=False, prompt_version="caption-v2",
                   model_id=MODEL, finished=True)
    elif stage == "train_attributes":
        normal = it.get("behavior") == "normal"
        row.update(action="riding a bicycle" if normal else None, action_raw="Riding a bicycle." if normal else None,
                   anomaly=None if normal else "falling", anomaly_raw=None if normal else "Falling off.",
                   scene="outdoor trail", scene_raw="An outdoor dirt trail.", prompt_version="attr-v1",
                   model_id=MODEL, behavior=it.get("behavior"))
    elif stage == "train_shards":
        row.update(split="train", clip_key=it.get("clip_key"), behavior=it.get("behavior"), kind=it.get("kind"))
        if "reject" in it:
            row.update(status="rejected", reason=it["reject"])
        else:
            n = int(unit_id)
            row.update(shard=f"shards/train/train-{n:06d}.tar", shard_index=n, shard_bytes=2_000_000_000,
                       shard_sha256=_sha(unit_id), hard_negative_key=it["json"]["hard_negative_key"])
    if stage in ("train_captions", "train_attributes") and _h(key) % 200 == 0:
        row.update(status="rejected", reason="the model gave no answer")
    return row


def fake_listing(store):
    """What listing generate/ and gen_pose/ would return: every image and pose path, with a size."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pab_build.manifests import read_manifest_table

    def listing(_store, tops):
        parts = []
        for stage, col, size in (("generate", "image_path", 150_000), ("gen_pose", "pose_path", 40_000)):
            if stage in tops:
                paths = read_manifest_table(store, stage, [col], ok_only=True)[col]
                sizes = pc.add(pc.cast(pc.utf8_length(paths), pa.int64()), size)  # a little variety
                parts.append(pa.table({"path": paths, "size": sizes}))
        return pa.concat_tables(parts)

    return listing


def run_stage_child(stage_name: str, out: str, images_per_prompt: int) -> dict:
    from pab_build.shards import packing as shard_packing
    from pab_build.config import load_config
    import pyarrow as pa

    from pab_build.manifests import schema, table_bytes
    from pab_build.engine.pipeline import get_stage
    from pab_build.engine.units import Context, finalize_stage

    cfg = load_config("full", [f"generate.images_per_caption={images_per_prompt}"])
    ctx = Context.create(cfg, out)
    stage = get_stage(stage_name)
    shard_packing.list_file_sizes = fake_listing(ctx.store)
    with PeakRSS() as plan:
        units = stage.plan_units(ctx)
    t0 = time.perf_counter()
    folder = os.path.join(out, "_units", stage_name)
    os.makedirs(folder, exist_ok=True)
    sch = schema(stage_name)
    for u in units:  # written plainly (no fsync, no checks): this part only sets the stage up
        rows = [synth_row(stage_name, it, u.unit_id) for it in u.items]
        with open(os.path.join(folder, f"{u.unit_id}.parquet"), "wb") as f:
            f.write(table_bytes(pa.Table.from_pylist(rows, schema=sch)))
    synth_s = time.perf_counter() - t0
    with PeakRSS() as fin:
        table = finalize_stage(ctx, stage, units)
    return {"stage": stage_name, "units": len(units), "rows": table.num_rows, "plan_s": round(plan.seconds, 1),
            "plan_cpu_s": round(plan.cpu_seconds, 1), "plan_mib": plan.mib, "finalize_s": round(fin.seconds, 1),
            "finalize_cpu_s": round(fin.cpu_seconds, 1), "finalize_mib": fin.mib, "synth_s": round(synth_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20387)
    ap.add_argument("--images-per-prompt", type=int, default=75)
    ap.add_argument("--clips", type=int, default=20000)
    ap.add_argument("--out", help="build folder (default: a temporary one, removed after)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--through", choices=["planners", "release"], default="planners",
                    help="release: go on to the card, export-official, verify, status and publish (bench/scale_release.py)")
    ap.add_argument("--deep-shards", type=int, default=2, help="shards `verify --deep` reads (with --through release)")
    ap.add_argument("--steps-one-by-one", action="store_true",
                    help="with --through release: run the steps after the card one at a time, not together")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_stage_child(args.child, args.out, args.images_per_prompt)), flush=True)
        return
    from pab_build.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        write_prompts(Store(out), args.prompts, args.clips)
        results = []
        for stage in args.stages.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", stage, "--out", out,
                   "--images-per-prompt", str(args.images_per_prompt)]
            proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"{res['stage']:>17}: {res['units']:>6} units {res['rows']:>8} rows | plan {res['plan_s']:>6.1f} s "
                  f"(cpu {res['plan_cpu_s']:.1f}) {res['plan_mib']:>5} MiB | finalize {res['finalize_s']:>6.1f} s "
                  f"(cpu {res['finalize_cpu_s']:.1f}) {res['finalize_mib']:>5} MiB | (synthesis {res['synth_s']:.0f} s)",
                  flush=True)
        steps = []
        if args.through == "release":
            from scale_release import release_steps

            steps = release_steps(out, args.images_per_prompt, args.deep_shards, args.steps_one_by_one)
            if any(r["rc"] for r in steps):
                sys.exit(f"failed steps: {[r['step'] for r in steps if r['rc']]} (logs in {out}-logs)")
    peak = max([max(r["plan_mib"], r["finalize_mib"]) for r in results] + [r["mib"] for r in steps])
    seconds = sum(r["plan_s"] + r["finalize_s"] for r in results) + sum(r["s"] for r in steps)
    print(f"peak_rss_mib={peak} seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
