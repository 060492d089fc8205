"""The training half of ``pab export-official``, planned in Arrow (a full build ships ~1M training
images): which shipped samples export, their official paths and ids, and why the others do not.

The manifests are joined to the shipped rows column by column (``manifests.left_join``), the
checks are vectorised, and Python runs only per rejected sample (to word its reason) and per
sample whose hard negative chain leads to one (the same pass-by-pass drop as before, over those
few). Records are built a generation index at a time by :func:`train_records`.
"""

from __future__ import annotations

import json
import tarfile
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..manifests import OK, left_join, manifest_rel, read_manifest_table
from ..shards.hard_negatives import BEHAVIOR_OF_KIND
from ..store import Store

FOLDER_OF_KIND = {"n": "goal", "a": "wentrong", "a+": "full"}  # "wentrong": the official spelling
SOURCE_CODE_OF_KIND = {"n": 0, "a": 1, "a+": 2}
# the columns each manifest contributes (renamed where two manifests share a name)
JOIN = {"generate": {"prompt_key": "prompt_key", "kind": "kind", "index": "index", "clip_key": "clip_key",
                     "image_path": "image_path"},
        "gen_pose": {"pose_path": "pose_path"}, "train_captions": {"caption": "caption"},
        "train_attributes": {"action": "action", "anomaly": "anomaly", "scene": "scene"}}
PART_NAMES = {"generate": "generate", "gen_pose": "gen_pose", "train_captions": "train_captions",
              "train_attributes": "attributes", "prompts": "prompts"}


def manifest_table(store: Store, stage: str, columns: list[str] | None = None, ok_only: bool = False) -> pa.Table:
    if not store.exists(manifest_rel(stage)):
        raise FileNotFoundError(f"export-official needs {manifest_rel(stage)}: run the {stage} stage first")
    return read_manifest_table(store, stage, columns, ok_only=ok_only)


def clip_names(store: Store) -> list[str]:
    """The sorted clip names of the ``prompts`` manifest; a clip's index here is its ``source_id`` prefix."""
    names = pc.unique(manifest_table(store, "prompts", ["clip_name"])["clip_name"]).drop_null()
    return sorted(n for n in names.to_pylist() if n)  # one per clip (~20,000), not per row


def read_shard_metadata(store: Store, shard_rels: Iterable[str]) -> pa.Table:
    """``sample_key``, ``hard_negative_key``, ``hard_negative_caption`` of every sample in the given
    shards (only the json members are decoded; a shard's worth of Python at a time)."""
    parts = []
    for rel in sorted(set(shard_rels)):
        keys, negs, captions = [], [], []
        with store.fs.open(store.path(rel), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json") and "." not in member.name[:-5]:
                    meta = json.loads(tar.extractfile(member).read())
                    neg = meta.get("hard_negative_key")
                    keys.append(member.name[:-5])
                    negs.append(str(neg) if neg else None)
                    captions.append(meta.get("hard_negative_caption") or "")
        parts.append(pa.table({"sample_key": pa.array(keys, pa.string()), "hard_negative_key": pa.array(negs, pa.string()),
                               "hard_negative_caption": pa.array([c if isinstance(c, str) else str(c) for c in captions],
                                                                 pa.string())}))
    if not parts:
        return pa.table({n: pa.array([], pa.string()) for n in ("sample_key", "hard_negative_key", "hard_negative_caption")})
    table = pa.concat_tables(parts)
    last = pa.table({"sample_key": table["sample_key"], "_row": pa.array(np.arange(table.num_rows))}).group_by(
        "sample_key", use_threads=False).aggregate([("_row", "max")])  # a key in two shards: the last, as a dict kept it
    return table.take(last["_row_max"]) if last.num_rows < table.num_rows else table


def existing_files(store: Store, paths: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which of ``paths`` (relative to OUT) exist, as a boolean array: one listing per folder,
    not one stat per file, and never a listing of every file of the build at once."""
    paths = pa.chunked_array([paths]) if isinstance(paths, pa.Array) else paths
    parents = pc.replace_substring_regex(paths, pattern="/[^/]*$", replacement="")
    found = np.zeros(len(paths), dtype=bool)
    order = pc.sort_indices(parents).to_numpy()
    sorted_parents = parents.take(pa.array(order)).combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(sorted_parents[1:], sorted_parents[:-1]).to_numpy(
        zero_copy_only=False)]) if len(order) else np.array([], dtype=int)
    sorted_paths = paths.take(pa.array(order)).combine_chunks()
    for start, end in zip(starts, [*starts[1:], len(order)]):
        parent = sorted_parents[int(start)].as_py()
        try:
            names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in store.fs.ls(store.path(parent), detail=True)
                     if e.get("type") == "file"}
        except (FileNotFoundError, NotADirectoryError):
            continue
        found[order[start:end]] = [p.rsplit("/", 1)[-1] in names for p in sorted_paths[start:end].to_pylist()]
    return found


def _flag(table: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(table[name], False).to_numpy(zero_copy_only=False)


def _join_parts(store: Store, shipped: pa.Table) -> pa.Table:
    """The shipped rows with the columns of their ok row in each manifest and a ``_has_<part>`` flag."""
    table = shipped
    for stage, columns in JOIN.items():
        right = manifest_table(store, stage, ["sample_key", *columns], ok_only=True)
        table = left_join(table, right.rename_columns(["sample_key", *columns.values()]), "sample_key",
                          flag=f"_has_{PART_NAMES[stage]}")
    prompts = manifest_table(store, "prompts", ["sample_key", "clip_name", "prompt"], ok_only=True)
    # dictionary columns: ~20,000 prompts behind a million images (4 bytes a row, not the text again)
    table = left_join(table, prompts.rename_columns(["prompt_key", "clip_name", "prompt"]), "prompt_key",
                      flag="_has_prompts", dictionary=True)
    return table.set_column(table.schema.get_field_index("clip_name"), "clip_name",
                            table["clip_name"].cast(pa.string())).drop_columns(["prompt_key"])


def _first_problems(table: pa.Table, clips: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """(ok mask, {key: reason}) for the row checks, in the order the reasons name them."""
    lacking = {part: ~_flag(table, f"_has_{part}") for part in PART_NAMES.values()}
    bad_kind = ~pc.fill_null(pc.is_in(table["kind"], value_set=pa.array(list(FOLDER_OF_KIND))), False).to_numpy(
        zero_copy_only=False)
    bad_clip = ~pc.fill_null(pc.is_in(table["clip_name"], value_set=pa.array(clips, pa.string())), False).to_numpy(
        zero_copy_only=False)
    no_meta = ~_flag(table, "_has_meta")
    no_neg = pc.is_null(table["hard_negative_key"]).to_numpy(zero_copy_only=False)
    bad = np.logical_or.reduce([*lacking.values(), bad_kind, bad_clip, no_meta, no_neg])
    reasons = {}
    idx = np.flatnonzero(bad)
    rows = table.take(pa.array(idx)).select(["sample_key", "shard", "kind", "clip_name"]).to_pylist()
    for i, row in zip(idx, rows):  # Python per rejected sample only
        missing = [part for part, flags in lacking.items() if flags[i]]
        if missing:
            reasons[row["sample_key"]] = f"no ok row in the {', '.join(missing)} manifest(s)"
        elif bad_kind[i]:
            reasons[row["sample_key"]] = f"kind {row['kind']!r} is not n, a or a+"
        elif bad_clip[i]:
            reasons[row["sample_key"]] = f"clip {row['clip_name']!r} is not in the prompts manifest"
        elif no_meta[i]:
            reasons[row["sample_key"]] = f"no json member for it in {row['shard']}"
        else:
            reasons[row["sample_key"]] = f"its shard json in {row['shard']} has no hard_negative_key"
    return ~bad, reasons


def _drop_broken_negatives(table: pa.Table, skipped: dict[str, str]) -> np.ndarray:
    """Keep mask: the official loader opens every hard_i, so a sample whose negative is not exported
    (or belongs to another clip) is dropped, pass after pass in key order until nothing changes.
    Only samples whose negative chain reaches a bad one can drop: the passes run over those."""
    neg = pc.fill_null(pc.index_in(table["hard_negative_key"], value_set=table["sample_key"]), -1).to_numpy(
        zero_copy_only=False)
    clip = pc.fill_null(pc.dictionary_encode(table["clip_key"].combine_chunks()).indices, -1).to_numpy(
        zero_copy_only=False)
    has = neg >= 0
    affected = ~has
    affected[has] |= clip[neg[has]] != clip[has]
    while True:
        spread = affected.copy()
        spread[has] |= affected[neg[has]]
        if (spread == affected).all():
            break
        affected = spread
    keep = np.ones(table.num_rows, dtype=bool)
    suspects = np.flatnonzero(affected)  # ascending: key order (the table is sorted by key)
    if not len(suspects):
        return keep
    keys = dict(zip(suspects.tolist(), table["sample_key"].take(pa.array(suspects)).to_pylist()))
    neg_keys = table["hard_negative_key"].take(pa.array(suspects)).to_pylist()
    dropped = True
    while dropped:
        dropped = False
        for i, neg_key in zip(suspects, neg_keys):
            if not keep[i]:
                continue
            j = neg[i]
            if j < 0 or not keep[j]:
                why = f"was left out: {skipped[neg_key]}" if neg_key in skipped else "is not among the shipped training samples"
                skipped[keys[i]] = f"hard negative {neg_key} {why}"
            elif clip[j] != clip[i]:
                skipped[keys[i]] = f"hard negative {neg_key} belongs to another clip"
            else:
                continue
            keep[i], dropped = False, True
    return keep


def _positions(table: pa.Table) -> pa.Table:
    """Per generation index k, folders in goal / wentrong / full order, clips in index order: the
    path under ``train/`` (``imgs_<k>/<folder>/<n>.jpg``) and the ``<k>_<m>`` image id of each row."""
    table = table.sort_by([("index", "ascending"), ("kind_rank", "ascending"), ("clip_index", "ascending"),
                           ("sample_key", "ascending")])
    k = table["index"].to_numpy(zero_copy_only=False).astype(np.int64)
    rank = table["kind_rank"].to_numpy(zero_copy_only=False)
    row = np.arange(len(k))
    new_k = np.r_[True, k[1:] != k[:-1]] if len(k) else np.array([], dtype=bool)
    new_folder = new_k | np.r_[True, rank[1:] != rank[:-1]] if len(k) else new_k
    m = row - np.maximum.accumulate(np.where(new_k, row, 0))
    n = row - np.maximum.accumulate(np.where(new_folder, row, 0))
    folders = pa.array(list(FOLDER_OF_KIND.values())).take(pa.array(rank))
    ks = pc.cast(pa.array(k), pa.string())
    path = pc.binary_join_element_wise("imgs_", ks, "/", folders, "/", pc.cast(pa.array(n), pa.string()), ".jpg", "")
    image_id = pc.binary_join_element_wise(ks, "_", pc.cast(pa.array(m), pa.string()), "")
    return table.append_column("where", path).append_column("image_id", image_id)


def plan_train_export(store: Store, clips: list[str]) -> tuple[pa.Table, list[dict]]:
    """Training images to export, one row each in the official order (``where``, ``image_id``,
    ``hard_i``, ``hard_i_id`` and the joined columns), and ``{sample_key, split, reason}`` for each
    ok shard row left out."""
    shipped = manifest_table(store, "train_shards", ["sample_key", "shard"], ok_only=True).sort_by("sample_key")
    meta = read_shard_metadata(store, pc.unique(shipped["shard"]).to_pylist())
    table = left_join(_join_parts(store, shipped), meta, "sample_key", flag="_has_meta")
    good, skipped = _first_problems(table, clips)
    table = table.filter(pa.array(good)).drop_columns(["shard", *(c for c in table.column_names if c.startswith("_has_"))])
    image_ok = existing_files(store, table["image_path"])
    pose_ok = existing_files(store, table["pose_path"])
    for i in np.flatnonzero(~(image_ok & pose_ok)):
        row = table.slice(int(i), 1).select(["sample_key", "image_path", "pose_path"]).to_pylist()[0]
        missing = [p for p, ok in ((row["image_path"], image_ok[i]), (row["pose_path"], pose_ok[i])) if not ok]
        skipped[row["sample_key"]] = f"file missing: {', '.join(missing)}"
    table = table.filter(pa.array(image_ok & pose_ok))
    table = table.filter(pa.array(_drop_broken_negatives(table, skipped)))

    table = table.append_column("kind_rank", pc.index_in(table["kind"], value_set=pa.array(list(FOLDER_OF_KIND))))
    table = table.append_column("clip_index", pc.index_in(table["clip_name"], value_set=pa.array(clips, pa.string())))
    table = _positions(table.drop_columns(["clip_key"]))
    negatives = pc.index_in(table["hard_negative_key"], value_set=table["sample_key"])
    table = table.append_column("hard_i", table["where"].take(negatives)).append_column(
        "hard_i_id", table["image_id"].take(negatives))
    pa.default_memory_pool().release_unused()  # the joins' intermediate columns, back to the system
    return table, [{"sample_key": k, "split": "train", "reason": r} for k, r in sorted(skipped.items())]


def train_records(table: pa.Table, batch: int = 20_000) -> Iterator[tuple[int, list[tuple[str, str, str, dict]]]]:
    """(generation index k, [(sample_key, image source, pose source, record)]) a slice of a k at a
    time, in export order: the Python dicts of one slice at a time, not of every image."""
    columns = ["sample_key", "image_path", "pose_path", "where", "caption", "image_id", "hard_i",
               "hard_negative_caption", "hard_i_id", "clip_index", "kind", "prompt", "action", "anomaly",
               "scene", "index"]
    for start in range(0, table.num_rows, batch):
        rows = table.slice(start, batch).select(columns).to_pylist()
        out: list = []
        for r in rows:
            if out and int(r["index"]) != out[-1][0]:
                yield out[-1][0], [x[1] for x in out]
                out = []
            behavior = BEHAVIOR_OF_KIND[r["kind"]]
            record = {"image": f"train/{r['where']}", "caption": r["caption"], "image_id": r["image_id"],
                      "hard_i": r["hard_i"], "hard_c": r["hard_negative_caption"], "hard_i_id": r["hard_i_id"],
                      "source_id": f"{r['clip_index']}_{SOURCE_CODE_OF_KIND[r['kind']]}",
                      "source_caption": r["prompt"],
                      behavior: r["action" if behavior == "normal" else "anomaly"], "scene": r["scene"]}
            out.append((int(r["index"]), (r["sample_key"], r["image_path"], r["pose_path"], record)))
        if out:
            yield out[-1][0], [x[1] for x in out]
