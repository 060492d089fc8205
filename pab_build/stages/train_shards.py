"""Stage ``train_shards``: the synthetic training set as WebDataset shards, with identity hard negatives.

Planning works at the paper's scale (a million samples) in Arrow: the five upstream manifests are
read column by column and joined (``pyarrow.Table.join``), the files' sizes come from a listing
joined on path, and each unit (one shard) keeps a slice of the joined table; an item's nested dict
(files, json) is made only when its unit runs. Per-row Python in the planner is limited to the
checks (keys, kinds, paths), the hard-negative choice and each sample's exact tar size.
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from ..hard_negatives import BEHAVIOR_OF_KIND, choose_hard_negatives
from ..shard_index import finalize_shards
from ..shard_packing import (
    file_size_table,
    fit_problem,
    path_problem,
    read_upstream,
    sample_tar_bytes,
    split_models,
    write_shard_unit,
)
from ..shard_writer import ATTRIBUTE_FIELDS, FILE_EXTENSIONS, SPLIT_MODELS, key_problem, tar_bytes
from ..units import Context, LazyItems, Stage, Unit

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
    table = read_upstream(store, "train_attributes", ["sample_key", *ATTRIBUTE_FIELDS], STAGE_NAME)
    for stage, columns in _SOURCES:
        right = read_upstream(store, stage, columns, STAGE_NAME)
        right = right.append_column(f"has_{stage}", pa.repeat(True, right.num_rows))
        table = table.join(right, "sample_key", join_type="left outer", use_threads=False)
    prompts = read_upstream(store, "prompts", ["sample_key", "clip_name", "prompt"], STAGE_NAME)
    prompts = prompts.rename_columns(["prompt_key", "clip_name", "source_caption"])
    prompts = prompts.append_column("has_prompts", pa.repeat(True, prompts.num_rows))
    table = table.join(prompts, "prompt_key", join_type="left outer", use_threads=False)
    return table.drop_columns(["prompt_key"]).sort_by("sample_key")


def _first_rejections(table: pa.Table) -> list[str | None]:
    """Per row: a missing upstream row, an unsafe key or an unknown kind (the item is not built)."""
    keys, kinds = table["sample_key"].to_pylist(), table["kind"].to_pylist()
    has = {s: table[f"has_{s}"].to_pylist() for s in ("generate", "gen_pose", "train_captions", "prompts")}
    out: list[str | None] = []
    for i, key in enumerate(keys):
        lacking = [s for s, flags in has.items() if not flags[i]]
        if lacking:
            out.append(f"no ok row in the {', '.join(lacking)} manifest(s)")
        else:
            out.append(key_problem(key) or (None if kinds[i] in BEHAVIOR_OF_KIND
                                            else f"kind {kinds[i]!r} is not n, a or a+"))
    return out


def _file_rejections(store, table: pa.Table, reject: list[str | None]) -> tuple[pa.Array, pa.Array]:
    """Reject built items with an unsafe or missing file (in place); return the files' sizes."""
    paths = {e: table[c].to_pylist() for e, c in zip(FILE_EXTENSIONS, ("image_path", "pose_path"))}
    for i in range(table.num_rows):
        if reject[i] is None and (bad := [paths[e][i] for e in FILE_EXTENSIONS if path_problem(store, paths[e][i])]):
            reject[i] = f"unsafe file path(s) in the manifests: {', '.join(map(repr, bad))}"
    wanted = pa.array([p for e in FILE_EXTENSIONS for i, p in enumerate(paths[e]) if reject[i] is None],
                      pa.string())
    listing = file_size_table(store, pc.unique(wanted))
    sizes = {}
    for e, col in zip(FILE_EXTENSIONS, ("image_path", "pose_path")):
        found = pc.index_in(table[col], value_set=listing["path"])
        sizes[e] = pc.take(listing["size"], found).combine_chunks() if table.num_rows else pa.array([], pa.int64())
    size_lists = {e: sizes[e].to_pylist() for e in FILE_EXTENSIONS}
    for i in range(table.num_rows):
        if reject[i] is None and (missing := [paths[e][i] for e in FILE_EXTENSIONS if size_lists[e][i] is None]):
            reject[i] = f"file missing: {', '.join(missing)}"
    return sizes["jpg"], sizes["pose.png"]


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
    n = table.num_rows
    reject = _first_rejections(table)
    built = [r is None for r in reject]
    jpg_size, pose_size = _file_rejections(store, table, reject)  # a sample whose files are missing is no one's negative
    sized = [r is None for r in reject]
    table = table.append_column("built", pa.array(built)).append_column("sized", pa.array(sized))
    table = table.append_column("jpg_size", jpg_size).append_column("pose_size", pose_size)
    keys, clip_keys = table["sample_key"].to_pylist(), table["clip_key"].to_pylist()
    kinds, indexes = table["kind"].to_pylist(), table["index"].to_pylist()
    position = {k: i for i, k in enumerate(keys)}
    hn_pos: list[int | None] = [None] * n
    sizes: list[int] = [0] * n
    # Links are chosen only among items that will be shipped; an item too big for a shard is
    # dropped, and the links chosen again until nothing more drops (each round only removes items).
    while True:
        shipped = [i for i in range(n) if reject[i] is None]
        links = choose_hard_negatives([{"sample_key": keys[i], "clip_key": clip_keys[i], "kind": kinds[i],
                                        "index": indexes[i]} for i in shipped])
        for i in shipped:
            neg = links[keys[i]]
            if neg is None:
                reject[i] = "no counterpart image of the same identity"
            else:
                hn_pos[i] = position[neg]
        del links
        current = _with_links(table, reject, hn_pos, keys)
        too_big = 0
        for start in range(0, n, BATCH):
            for i, it in enumerate(train_unit_items(current, start, min(n, start + BATCH), models), start):
                if reject[i] is None:
                    sizes[i] = sample_tar_bytes(it)
                    if why := fit_problem([it], max_samples, max_bytes):
                        reject[i], too_big = why, too_big + 1
        if not too_big:
            break
    return chunk_shards(_with_links(table, reject, hn_pos, keys), reject, sizes, max_samples, max_bytes, models)


def _with_links(table: pa.Table, reject: list, hn_pos: list, keys: list) -> pa.Table:
    hn_key = [None if p is None else keys[p] for p in hn_pos]
    return (table.append_column("reject", pa.array(reject, pa.string()))
            .append_column("hn_pos", pa.array(hn_pos, pa.int64()))
            .append_column("hn_key", pa.array(hn_key, pa.string())))


def chunk_shards(table: pa.Table, reject: list, sizes: list[int], max_samples: int, max_bytes: int,
                 models: dict) -> list[Unit]:
    """Shards in key order, a new one when the next sample would exceed either bound; a shard's
    unit is its rows' key range (rejected items included), the first unit also taking those
    before the first shard, as :func:`~pab_build.shard_packing.pack_units` places them."""
    starts: list[int] = []
    count = total = 0
    for i, why in enumerate(reject):
        if why is not None:
            continue
        if not starts or count + 1 > max_samples or tar_bytes(total + sizes[i]) > max_bytes:
            starts.append(i)
            count = total = 0
        count, total = count + 1, total + sizes[i]
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
)
