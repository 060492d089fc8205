"""Stage ``train_shards``: the synthetic training set as WebDataset shards, with identity hard negatives.

Planning works at the paper's scale (a million samples) in Arrow: the five upstream manifests are
read column by column and looked up by key (:func:`~pab_build.manifests.left_join`), the files'
sizes come from a listing looked up by path, the hard negatives from
:func:`~pab_build.shards.hard_negatives.hard_negative_rows` (numpy), and each unit (one shard) keeps a
slice of the joined table; an item's nested dict (files, json) is made only when its unit runs.
Per-row Python in the planner is limited to the reasons of the few suspect rows and each sample's
exact tar size (its json, 20,000 samples at a time).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..shards.hard_negatives import BEHAVIOR_OF_KIND, hard_negative_rows
from ..shards.index import INDEX_COLUMNS, finalize_shards
from ..shards.packing import (
    file_size_table,
    fit_problem,
    path_problem,
    read_upstream,
    sample_tar_bytes,
    split_models,
    write_shard_unit,
)
from ..shards.writer import ATTRIBUTE_FIELDS, SPLIT_MODELS, key_problem, safe_keys, tar_bytes
from ..manifests import has_match, left_join, sorted_by_key
from ..engine.units import Context, LazyItems, Stage, Unit

STAGE_NAME = "train_shards"
BATCH = 20_000  # rows turned into dicts at a time while sizing samples

# (manifest, columns read, flag column set where the manifest has an ok row), joined in this order
_SOURCES = [
    ("generate", ["sample_key", "prompt_key", "clip_key", "kind", "index", "seed", "image_path", "image_sha256"]),
    ("gen_pose", ["sample_key", "pose_path", "pose_sha256"]),
    ("train_captions", ["sample_key", "caption", "prompt_version"]),
]


def joined_table(store) -> pa.Table:
    """One row per ok ``train_attributes`` sample, sorted by key, with the ok upstream rows' columns
    (null where a manifest has no ok row; ``has_<manifest>`` says which)."""
    table = sorted_by_key(read_upstream(store, "train_attributes", ["sample_key", *ATTRIBUTE_FIELDS], STAGE_NAME))
    for stage, columns in _SOURCES:
        # one column at a time: a million rows of a manifest's columns never sit beside their copy
        found = pc.index_in(table["sample_key"], skip_nulls=True,
                            value_set=read_upstream(store, stage, ["sample_key"], STAGE_NAME)["sample_key"])
        for name in columns[1:]:
            table = table.append_column(name, read_upstream(store, stage, [name], STAGE_NAME)[name].take(found))
        table = table.append_column(f"has_{stage}", has_match(found))
        del found
        pa.default_memory_pool().release_unused()
    prompts = read_upstream(store, "prompts", ["sample_key", "clip_name", "prompt"], STAGE_NAME)
    prompts = prompts.rename_columns(["prompt_key", "clip_name", "source_caption"])
    return left_join(table, prompts, "prompt_key", "has_prompts", dictionary=True).drop_columns(["prompt_key"])


def _reasons(table: pa.Table, suspect: pa.Array, reason) -> pa.Array:
    """Per row: ``reason(row)`` where ``suspect`` (vectorised, a superset of the rows with a
    problem; usually a few), else null. Only the suspect rows become Python dicts."""
    suspect = pc.fill_null(suspect, True)
    suspect = suspect.combine_chunks() if isinstance(suspect, pa.ChunkedArray) else suspect
    found = [reason(r) for r in table.filter(suspect).to_pylist()]
    return pc.replace_with_mask(pa.nulls(table.num_rows, pa.string()), suspect, pa.array(found, pa.string()))


def _first_rejections(table: pa.Table) -> pa.Array:
    """Per row: a missing upstream row, an unsafe key or an unknown kind (the item is not built)."""
    sources = ("generate", "gen_pose", "train_captions", "prompts")

    def reason(r: dict) -> str | None:
        lacking = [s for s in sources if not r[f"has_{s}"]]
        if lacking:
            return f"no ok row in the {', '.join(lacking)} manifest(s)"
        return key_problem(r["sample_key"]) or (None if r["kind"] in BEHAVIOR_OF_KIND
                                               else f"kind {r['kind']!r} is not n, a or a+")

    suspect = pc.invert(pc.and_(safe_keys(table["sample_key"]),
                                pc.is_in(table["kind"], value_set=pa.array(list(BEHAVIOR_OF_KIND)))))
    for s in sources:
        suspect = pc.or_(suspect, pc.is_null(table[f"has_{s}"]))
    columns = ["sample_key", "kind", *(f"has_{s}" for s in sources)]
    return _reasons(table.select(columns), suspect, reason)


def _unsafe_paths(paths) -> pa.Array:
    """:func:`path_problem` in Arrow: null, only slashes, or a ``..`` component."""
    return pc.fill_null(pc.or_(pc.equal(pc.utf8_trim(paths, "/"), ""),
                               pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)")), True)


def _file_rejections(store, table: pa.Table, reject: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Reject built items with an unsafe or missing file; return the rejections and the files' sizes."""
    columns = ("image_path", "pose_path")
    ok = pc.is_null(reject)
    unsafe = pc.and_(ok, pc.or_(*(_unsafe_paths(table[c]) for c in columns)))
    def unsafe_reason(r: dict) -> str | None:
        bad = [repr(p) for p in (r[c] for c in columns) if path_problem(store, p)]
        return f"unsafe file path(s) in the manifests: {', '.join(bad)}" if bad else None

    found = _reasons(table.select(columns), unsafe, unsafe_reason)
    reject = pc.coalesce(reject, found)
    ok = pc.is_null(reject)
    wanted = pa.concat_arrays([pc.filter(table[c], ok).combine_chunks() for c in columns]) if table.num_rows \
        else pa.array([], pa.string())
    listing = file_size_table(store, pc.unique(wanted))
    del wanted
    sizes = [pc.take(listing["size"], pc.index_in(table[c], value_set=listing["path"])).combine_chunks()
             if table.num_rows else pa.array([], pa.int64()) for c in columns]
    del listing
    missing = pc.and_(ok, pc.or_(*(pc.is_null(z) for z in sizes)))
    sized = table.select(columns).append_column("jpg_size", sizes[0]).append_column("pose_size", sizes[1])
    found = _reasons(sized, missing, lambda r: "file missing: " + ", ".join(
        r[c] for c, z in zip(columns, ("jpg_size", "pose_size")) if r[z] is None))
    pa.default_memory_pool().release_unused()
    return pc.coalesce(reject, found), sizes[0], sizes[1]


def train_unit_items(table: pa.Table, start: int, stop: int, models: dict) -> list[dict]:
    """The items of rows ``start:stop``: the nested dicts :func:`write_shard_unit` takes."""
    rows = table.slice(start, stop - start).to_pylist()
    neg_pos = [r["hn_pos"] for r in rows]
    captions = table["caption"].take(pa.array(neg_pos, pa.int64())).to_pylist() if rows else []
    return [train_item(r, models, caption) for r, caption in zip(rows, captions)]


def train_item(r: dict, models: dict, hn_caption: str | None) -> dict:
    item = {"sample_key": r["sample_key"], "clip_key": r["clip_key"], "kind": r["kind"]}
    if r["built"]:
        key, behavior = r["sample_key"], BEHAVIOR_OF_KIND[r["kind"]]
        item.update({
            "behavior": behavior, "index": r["index"],
            "files": {"jpg": r["image_path"], "pose.png": r["pose_path"]},
            "sha256": {"jpg": r["image_sha256"], "pose.png": r["pose_sha256"]},
            "txt": r["caption"],
            "json": {
                "sample_key": key, "identity": r["clip_key"], "clip_name": r["clip_name"],
                "kind": r["kind"], "behavior": behavior, "source_caption": r["source_caption"],
                "seed": r["seed"], "models": models, "attributes": {k: r[k] for k in ATTRIBUTE_FIELDS},
                "prompt_version": r["prompt_version"],
                "hard_negative_key": r["hn_key"], "hard_negative_caption": hn_caption,
            },
        })
        if r["sized"]:
            item["file_sizes"] = {"jpg": r["jpg_size"], "pose.png": r["pose_size"]}
    if r["reject"] is not None:
        item["reject"] = r["reject"]
    return item


def plan_train_shards(ctx: Context) -> list[Unit]:
    store, cfg = ctx.store, ctx.cfg
    max_samples, max_bytes = cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard
    models = split_models(cfg, "train")
    table = joined_table(store)
    pa.default_memory_pool().release_unused()  # the upstream tables are gone: hand their memory back
    n = table.num_rows
    reject = _first_rejections(table)
    built = pc.is_null(reject)
    reject, jpg_size, pose_size = _file_rejections(store, table, reject)  # a sample whose files are missing is no one's negative
    table = table.append_column("built", built).append_column("sized", pc.is_null(reject))
    table = table.append_column("jpg_size", jpg_size).append_column("pose_size", pose_size)
    sizes, hn_pos = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    # Links are chosen only among items that will be shipped; an item too big for a shard is
    # dropped, and the links chosen again until nothing more drops (each round only removes items).
    while True:
        shipped = np.flatnonzero(pc.is_null(reject).to_numpy(zero_copy_only=False))
        s = table.select(["clip_key", "kind", "index", "sample_key"]).take(pa.array(shipped, pa.int64()))
        neg = hard_negative_rows(s["clip_key"], s["kind"], s["index"], s["sample_key"])
        del s
        found = neg >= 0  # a link chosen in an earlier round stays on an item dropped since (as it always did)
        hn_pos[shipped[found]] = shipped[neg[found]]
        lonely = np.zeros(n, bool)
        lonely[shipped[neg < 0]] = True
        reject = pc.if_else(pa.array(lonely), "no counterpart image of the same identity", reject)
        current = _with_links(table, reject, hn_pos)
        too_big: dict[int, str] = {}
        for start in range(0, n, BATCH):
            stop = min(n, start + BATCH)
            whys = current["reject"].slice(start, stop - start).to_pylist()
            for i, (it, why) in enumerate(zip(train_unit_items(current, start, stop, models), whys), start):
                if why is None:
                    sizes[i] = sample_tar_bytes(it)
                    if problem := fit_problem([it], max_samples, max_bytes):
                        too_big[i] = problem
        del current
        if not too_big:
            break
        mask = np.zeros(n, bool)
        mask[list(too_big)] = True
        reject = pc.replace_with_mask(reject, pa.array(mask), pa.array([too_big[i] for i in sorted(too_big)], pa.string()))
    return chunk_shards(_with_links(table, reject, hn_pos), sizes, max_samples, max_bytes, models)


def _with_links(table: pa.Table, reject: pa.Array, hn_pos: np.ndarray) -> pa.Table:
    pos = pa.array(hn_pos, pa.int64(), mask=hn_pos < 0)
    return (table.append_column("reject", reject).append_column("hn_pos", pos)
            .append_column("hn_key", pc.take(table["sample_key"], pos)))


def chunk_shards(table: pa.Table, sizes: np.ndarray, max_samples: int, max_bytes: int,
                 models: dict) -> list[Unit]:
    """Shards in key order, a new one when the next sample would exceed either bound; a shard's
    unit is its rows' key range (rejected items included), the first unit also taking those
    before the first shard, as :func:`~pab_build.shards.packing.pack_units` places them."""
    starts: list[int] = []
    count = total = 0
    shipped = np.flatnonzero(pc.is_null(table["reject"]).to_numpy(zero_copy_only=False))
    for i, size in zip(shipped.tolist(), sizes[shipped].tolist()):  # sequential by nature: ints only
        if not starts or count + 1 > max_samples or tar_bytes(total + size) > max_bytes:
            starts.append(i)
            count = total = 0
        count, total = count + 1, total + size
    n = table.num_rows
    if not n:
        return []
    edges = [0, *starts[1:], n] if starts else [0, n]
    make = partial(train_unit_items, models=models)
    return [Unit(STAGE_NAME, f"{u:06d}", LazyItems(partial(make, table, a, b), b - a))
            for u, (a, b) in enumerate(zip(edges, edges[1:]))]


def run_train_shards_unit(ctx: Context, unit: Unit) -> list[dict]:
    return write_shard_unit(ctx, unit, "train")


def finalize_train_shards(ctx: Context, table) -> None:
    finalize_shards(ctx, table, "train")


STAGE = Stage(
    name=STAGE_NAME,
    plan_units=plan_train_shards,
    run_unit=run_train_shards_unit,
    config_keys=("shards", *(f"models.{m}" for m in SPLIT_MODELS["train"])),
    finalize=finalize_train_shards,
    finalize_columns=tuple(INDEX_COLUMNS),
)
