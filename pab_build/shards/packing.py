"""Packing samples into shards, shared by the stages ``test_shards`` and ``train_shards``.

A unit is one shard. The planner sorts samples by key, keeps a group (a test pair, both images of a
clip) in one shard and starts a new shard when the next group would exceed ``max_samples_per_shard``
or ``max_bytes_per_shard``; the byte size is exact (tar headers and padding included), computed from
the source file sizes.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..config import model_id
from ..manifests import OK, keep, manifest_rel, read_manifest, read_manifest_table, reject
from .writer import (
    ATTRIBUTE_FIELDS,
    FILE_EXTENSIONS,
    SPLIT_MODELS,
    ShardTooBig,
    member_bytes,
    sample_json,
    shard_rel,
    tar_bytes,
    write_shard,
)
from ..store import Store
from ..engine.units import Context, Unit


# -- planning ---------------------------------------------------------------------------------
def _require(store: Store, stage: str, needed_by: str) -> None:
    if not store.exists(manifest_rel(stage)):
        raise FileNotFoundError(f"{needed_by} needs {manifest_rel(stage)}: run the {stage} stage first")


def rows_by_key(store: Store, stage: str, needed_by: str) -> dict[str, dict]:
    _require(store, stage, needed_by)
    return {r["sample_key"]: r for r in read_manifest(store, stage)}


def read_upstream(store: Store, stage: str, columns: list[str], needed_by: str) -> pa.Table:
    """``columns`` of the ok rows of an upstream manifest the planner of ``needed_by`` joins."""
    _require(store, stage, needed_by)
    return read_manifest_table(store, stage, columns, ok_only=True)


def ok_row(rows: dict[str, dict], key: str) -> dict | None:
    row = rows.get(key)
    return row if row is not None and row["status"] == OK else None


def _walk_sizes(store: Store, top: str) -> Iterator[tuple[list[str], list[int]]]:
    """(relative paths, sizes) of the files under ``top``, one folder at a time: a local disk is
    scanned with ``os.scandir``, an object store listed folder by folder (never one dict of
    millions of entries)."""
    base = store.path(top)
    if store.is_local:
        stack = [base]
        while stack:
            folder = stack.pop()
            rels, sizes = [], []
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file():
                        rels.append(e.path[len(store.root) + 1:])
                        sizes.append(e.stat().st_size)
            yield rels, sizes
        return
    prefix = store.root + "/"
    for folder, _dirs, files in store.fs.walk(base, detail=True):
        rels = [f"{folder}/{name}".removeprefix(prefix) for name in files]
        yield rels, [int(info["size"]) for info in files.values()]


def list_file_sizes(store: Store, tops: list[str]) -> pa.Table:
    """``path`` (relative) and ``size`` of every file under the top-level folders ``tops``."""
    paths, sizes = [], []
    for top in tops:
        if not store.fs.exists(store.path(top)):
            continue
        for rels, folder_sizes in _walk_sizes(store, top):
            paths.append(pa.array(rels, pa.string()))
            sizes.append(pa.array(folder_sizes, pa.int64()))
    return pa.table({"path": pa.chunked_array(paths, pa.string()), "size": pa.chunked_array(sizes, pa.int64())})


def file_size_table(store: Store, rels: pa.Array) -> pa.Table:
    """``path`` and ``size`` of those of ``rels`` (relative paths, unique) that exist: one
    listing per top-level folder (a request per 1000 objects on object stores) instead of one
    stat per file; a path the listing spells differently is asked for on its own. One folder's
    listing in memory at a time (the generated images alone are 1.5M paths)."""
    tops = pc.unique(pc.replace_substring_regex(rels, r"(?s)/.*", "")).to_pylist()
    sizes = pa.nulls(len(rels), pa.int64())
    for top in sorted(t for t in tops if t):
        listed = list_file_sizes(store, [top])
        sizes = pc.coalesce(sizes, pc.take(listed["size"], pc.index_in(rels, value_set=listed["path"])))
        del listed
        pa.default_memory_pool().release_unused()  # hand the listing back before the next one
    sizes = sizes.combine_chunks() if isinstance(sizes, pa.ChunkedArray) else sizes
    unlisted = pc.is_null(sizes)
    if pc.any(unlisted).as_py():
        extra = []
        for rel in pc.filter(rels, unlisted).to_pylist():
            try:
                extra.append(int(store.fs.size(store.path(rel))))
            except (FileNotFoundError, OSError, ValueError):
                extra.append(None)
        sizes = pc.replace_with_mask(sizes, unlisted, pa.array(extra, pa.int64()))
    table = pa.table({"path": rels, "size": sizes})
    return table.filter(pc.is_valid(sizes))


def _file_sizes(store: Store, rels: Iterable[str]) -> dict[str, int]:
    table = file_size_table(store, pa.array(sorted(set(rels)), pa.string()))
    return dict(zip(table["path"].to_pylist(), table["size"].to_pylist()))


def path_problem(store: Store, rel: Any) -> bool:
    if not isinstance(rel, str) or not rel.strip("/"):
        return True
    try:
        store.path(rel)
    except ValueError:  # ".." would leave the output root
        return True
    return False


def attach_file_sizes(store: Store, items: list[dict]) -> None:
    """Record each source file's size (it counts towards the shard bound, and in the unit's input
    hash); an item whose file is missing is rejected."""
    for it in items:
        if "reject" not in it and (bad := [p for p in it["files"].values() if path_problem(store, p)]):
            it["reject"] = f"unsafe file path(s) in the manifests: {', '.join(map(repr, bad))}"
    sizes = _file_sizes(store, (it["files"][e] for it in items if "reject" not in it for e in FILE_EXTENSIONS))
    for it in items:
        if "reject" in it:
            continue
        missing = [it["files"][e] for e in FILE_EXTENSIONS if it["files"][e] not in sizes]
        if missing:
            it["reject"] = f"file missing: {', '.join(missing)}"
        else:
            it["file_sizes"] = {e: sizes[it["files"][e]] for e in FILE_EXTENSIONS}


def sample_tar_bytes(it: dict) -> int:
    """Bytes a planned sample's members take in a tar."""
    generated = (len(it["txt"].encode("utf-8")), len(sample_json(it["json"])))
    return sum(member_bytes(n) for n in (*it["file_sizes"].values(), *generated))


def fit_problem(group: list[dict], max_samples: int, max_bytes: int) -> str | None:
    """Why ``group`` cannot fit in a shard even alone (None when it can)."""
    what = f"{'pair' if len(group) > 1 else 'sample'} of {len(group)} image(s)"
    if len(group) > max_samples:
        return f"{what} does not fit in a shard: shards.max_samples_per_shard={max_samples}"
    size = tar_bytes(sum(sample_tar_bytes(it) for it in group))
    if size > max_bytes:
        return f"{what} makes a {size}-byte shard alone: over shards.max_bytes_per_shard={max_bytes}"
    return None


def pack_units(stage: str, groups: list[list[dict]], rejected: list[dict], max_samples: int,
               max_bytes: int) -> list[Unit]:
    """Groups (a test pair, or one training image) -> shard units. Groups go in key order; a new
    shard starts when the next group would exceed either bound; a group that cannot fit even
    alone is rejected. Rejected items join the unit whose key range they fall in."""
    shards: list[list[dict]] = []
    count = total = 0
    rejected = list(rejected)
    for group in sorted(groups, key=lambda g: min(it["sample_key"] for it in g)):
        why = fit_problem(group, max_samples, max_bytes)
        if why:
            rejected.extend({**it, "reject": why} for it in group)
            continue
        size = sum(sample_tar_bytes(it) for it in group)
        if not shards or count + len(group) > max_samples or tar_bytes(total + size) > max_bytes:
            shards.append([])
            count = total = 0
        shards[-1].extend(group)
        count, total = count + len(group), total + size
    firsts = [min(it["sample_key"] for it in items) for items in shards]
    if not shards and rejected:
        shards = [[]]
    for it in sorted(rejected, key=lambda it: it["sample_key"]):
        shards[max(0, bisect.bisect_right(firsts, it["sample_key"]) - 1)].append(it)
    return [Unit(stage, f"{n:06d}", tuple(sorted(items, key=lambda it: it["sample_key"])))
            for n, items in enumerate(shards)]


def attribute_fields(row: dict) -> dict:
    return {k: row.get(k) for k in ATTRIBUTE_FIELDS}


def split_models(cfg, split: str) -> dict[str, str]:
    return {name: model_id(cfg, name) for name in SPLIT_MODELS[split]}


def why_dropped(key: str, identity: str, manifests: dict[str, dict[str, dict]], this_stage: str,
                 planned_rejects: dict[str, str]) -> str:
    """Name the first stage (and its reason) that dropped sample ``key``."""
    for stage, rows in manifests.items():
        row = rows.get(key) or rows.get(identity)
        if row is None:
            return f"is missing from the {stage} manifest"
        if row["status"] != OK:
            return f"was rejected by {stage}: {row['reason']}"
    if key in planned_rejects:
        return f"was rejected by {this_stage}: {planned_rejects[key]}"
    return "is not among the ok samples"


# -- running a unit ---------------------------------------------------------------------------
def _row(it: dict, split: str, **fields) -> dict:
    row = {"split": split, "clip_key": it.get("clip_key"),
           "behavior": it.get("behavior"), **fields}
    if split == "train":
        row["kind"] = it.get("kind")
    return row


def write_shard_unit(ctx: Context, unit: Unit, split: str) -> list[dict]:
    """Write the unit's shard (its ok items) and return one row per item."""
    rows = [reject(it, it["reject"], **_row(it, split)) for it in unit.items if "reject" in it]
    ok = [it for it in unit.items if "reject" not in it]
    if not ok:
        return rows
    number = int(unit.unit_id)

    def samples():  # image files are copied in chunks: memory does not grow with the shard
        for it in sorted(ok, key=lambda it: it["sample_key"]):
            members = {ext: it["files"][ext] for ext in FILE_EXTENSIONS}
            members["txt"] = it["txt"].encode("utf-8")
            members["json"] = sample_json(it["json"])
            yield it["sample_key"], members

    rel = shard_rel(split, number)
    limit = ctx.cfg.shards.max_bytes_per_shard
    try:
        size, digest = write_shard(ctx.store, rel, samples(), max_bytes=limit)
    except ShardTooBig as e:  # a source file grew between planning and now: plan again
        raise RuntimeError(f"shard {unit.unit_id}: {e} (max_bytes_per_shard); source files changed since planning"
                           ) from None
    for it in ok:
        extra = {"hard_negative_key": it["json"]["hard_negative_key"]} if split == "train" else {}
        fields = _row(it, split, shard=rel, shard_index=number, shard_bytes=size, shard_sha256=digest, **extra)
        rows.append(keep(it, **fields))
    return rows
