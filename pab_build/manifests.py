"""The pyarrow schema of every stage's Parquet manifest, in one place.

Every manifest starts with the same three columns: ``sample_key`` (stable from the OOPS! clip to
the WebDataset ``__key__``), ``status`` (``ok`` | ``rejected``) and ``reason`` (why, when
rejected). Each input item of a stage appears exactly once. ``manifests/README.md`` describes the
columns for people; this module is what the code writes and checks.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .store import Store

# Arrow's default pool (mimalloc) keeps the pages a freed table leaves: a stage that drops one large
# table and builds the next holds both. The system allocator hands them back (release_unused trims
# it): at the paper's size ~20% less peak memory planning and finalizing (bench/bench_scale.py).
# ARROW_DEFAULT_MEMORY_POOL, when set, still chooses.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.system_memory_pool())

OK = "ok"
REJECTED = "rejected"

_s, _f, _i, _b = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_f32, _i32 = pa.float32(), pa.int32()

COMMON = [("sample_key", _s), ("status", _s), ("reason", _s)]

# columns shared by the stages that produce or re-encode an image
_IMAGE = [("image_path", _s), ("image_sha256", _s)]
_POSE = [
    ("pose_path", _s),  # rendered OpenPose map (PNG), consumed by CMP
    ("pose_sha256", _s),
    # what the rules measured (models/pose_rules.py), on rejected rows too (calibration histograms)
    ("person_height", _f32),  # main person's estimated body height / image height; null when nobody
    ("person_count", _i32),  # people OpenPose found
    ("keypoint_count", _i32),  # body keypoints found for the main person
    ("limb_ratio_max", _f32),  # main person's largest segment stretch; null with < 3 segments
    ("main_person_area", _f),  # main person's keypoint box / image area
    ("keypoints_json", _s),  # [[ [x, y, score] | null ] * 18 ] per person, x/y in [0, 1]
]
_CAPTION = [
    ("caption_generated", _s),  # raw Qwen2-VL output
    ("caption", _s),  # final caption (corrected by QC when there is a correction)
    ("caption_corrected", _b),
    ("prompt_version", _s),
    ("model_id", _s),
]
_ATTRIBUTES = [
    ("action", _s), ("action_raw", _s),
    ("anomaly", _s), ("anomaly_raw", _s),
    ("scene", _s), ("scene_raw", _s),
    ("prompt_version", _s), ("model_id", _s),
]
_SHARD = [("split", _s), ("shard", _s), ("shard_index", _i)]

STAGE_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    # -- test set (paper 3.1) ----------------------------------------------------------------
    "frames": [
        ("clip_name", _s), ("clip_key", _s), ("split", _s), ("behavior", _s),
        ("failure_time_s", _f), ("duration_s", _f), ("time_s", _f), ("frame_index", _i),
        ("source_caption", _s),  # OOPS! goal (normal) / wentwrong (anomaly) caption of the clip
        *_IMAGE, ("width", _i), ("height", _i),
    ],
    "pose": [("clip_key", _s), ("behavior", _s), *_IMAGE, *_POSE],
    "pairs": [("clip_key", _s), ("behavior", _s), ("pair_key", _s), ("cosine", _f)],
    "review": [("clip_key", _s), ("decision", _s), ("reviewers", _s)],
    "test_captions": [*_CAPTION, ("finished", _b), ("caption_end", _s)],  # finished: generation ended with an end token
    "test_attributes": [*_ATTRIBUTES, ("behavior", _s)],
    "test_shards": [
        *_SHARD, ("clip_key", _s), ("behavior", _s),
        ("shard_bytes", _i), ("shard_sha256", _s),  # of the whole shard: the index is built from these
    ],
    # -- training set (paper 3.2) ------------------------------------------------------------
    "prompts": [
        ("clip_name", _s), ("clip_key", _s), ("split", _s), ("kind", _s),  # n | a | a+
        ("annotation_index", _i), ("prompt", _s), ("subject", _s),
        ("counterpart_keys", _s),  # JSON list of the same clip's prompts of the other behavior
    ],
    "generate": [
        ("prompt_key", _s), ("clip_key", _s), ("kind", _s), ("index", _i), ("seed", _i),
        *_IMAGE, ("width", _i), ("height", _i), ("model_id", _s),
        ("prompt", _s),  # the prompt text (before prompt_prefix/suffix), so a row alone can regenerate its image
        ("batch_first_index", _i), ("batch_size", _i),  # the pipeline call it came from (reproducibility)
    ],
    "gen_pose": [*_IMAGE, *_POSE],
    "train_captions": [*_CAPTION, ("finished", _b), ("caption_end", _s)],
    "train_attributes": [*_ATTRIBUTES, ("behavior", _s)],
    "train_shards": [
        *_SHARD, ("clip_key", _s), ("behavior", _s), ("kind", _s),
        ("shard_bytes", _i), ("shard_sha256", _s),
        ("hard_negative_key", _s),  # sample_key of the same identity's counterpart-behavior sample
    ],
}


def schema(stage: str) -> pa.Schema:
    try:
        cols = STAGE_COLUMNS[stage]
    except KeyError:
        raise KeyError(f"no manifest schema for stage {stage!r}") from None
    return pa.schema([pa.field(n, t) for n, t in COMMON + cols])


def rows_to_table(stage: str, rows: list[dict]) -> pa.Table:
    """Rows -> table with the stage's schema; an unknown column is a bug, so it raises."""
    sch = schema(stage)
    names = set(sch.names)
    for r in rows:
        extra = set(r) - names
        if extra:
            raise ValueError(f"{stage}: columns not in the manifest schema: {sorted(extra)}")
        if r.get("status") not in (OK, REJECTED):
            raise ValueError(f"{stage}: row {r.get('sample_key')!r} has status {r.get('status')!r}")
        if r["status"] == REJECTED and not r.get("reason"):
            raise ValueError(f"{stage}: rejected row {r.get('sample_key')!r} has no reason")
    return pa.Table.from_pylist(rows, schema=sch)


ROW_GROUP_ROWS = 1024 * 1024  # pyarrow's default; the streamed manifest writer cuts row groups here too
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": False, "store_schema": False}


def write_parquet(table: pa.Table, sink) -> None:
    """Parquet with fixed writer settings, so equal tables (in one chunk) give equal bytes."""
    pq.write_table(table, sink, row_group_size=min(table.num_rows, ROW_GROUP_ROWS) or None, **PARQUET_OPTIONS)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    write_parquet(table, buf)
    return buf.getvalue()


def manifest_rel(stage: str) -> str:
    return f"manifests/{stage}.parquet"


def write_manifest(store: Store, stage: str, rows: list[dict]) -> pa.Table:
    return write_manifest_table(store, stage, rows_to_table(stage, rows))


def write_manifest_table(store: Store, stage: str, table: pa.Table) -> pa.Table:
    """Write a stage's manifest: rows sorted by ``sample_key`` (unique), the stage's schema, in one
    contiguous chunk (Parquet bytes depend on chunking, so equal rows give equal files)."""
    table = conform(stage, table)
    keys = table["sample_key"]
    if not is_sorted(keys):
        table = table.take(pc.sort_indices(keys))  # stable, byte order = Python's str order for UTF-8
        keys = table["sample_key"]
    if table.num_rows > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, table.num_rows - 1))
        if pc.any(same).as_py():
            dup = pc.unique(keys.slice(1).filter(same)).to_pylist()
            raise ValueError(f"{stage}: duplicate sample_key in manifest: {sorted(dup)[:5]}")
    table = table.combine_chunks()  # a no-op for unit_manifests.concat_unit_tables' result
    with store.open_atomic(manifest_rel(stage)) as f:  # streamed: the file's bytes are never all in memory
        write_parquet(table, f)
    return table


def conform(stage: str, table: pa.Table) -> pa.Table:
    """``table`` with exactly the stage's schema (column order and types); an unknown column is a bug."""
    sch = schema(stage)
    if table.schema.equals(sch):
        return table
    extra = set(table.column_names) - set(sch.names)
    if extra:
        raise ValueError(f"{stage}: columns not in the manifest schema: {sorted(extra)}")
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in sch]
    return pa.Table.from_arrays(cols, schema=sch)


def sorted_by_key(table: pa.Table) -> pa.Table:
    """``table`` sorted by ``sample_key``; no copy when it already is (a manifest read as written)."""
    return table if is_sorted(table["sample_key"]) else table.sort_by("sample_key")


def is_sorted(keys: pa.ChunkedArray | pa.Array) -> bool:
    n = len(keys)
    return n < 2 or bool(pc.all(pc.less_equal(keys.slice(0, n - 1), keys.slice(1))).as_py())


def read_parquet_bytes(data: bytes) -> pa.Table:
    # use_threads=False: pyarrow's reader thread pool makes the interpreter abort at exit
    # ("terminate called without an active exception") on our CI machines, after the work is done
    # ParquetFile, not read_table: a few times faster per small file (no dataset discovery), which
    # counts when finalize reads 61k unit files
    return pq.ParquetFile(io.BytesIO(data)).read(use_threads=False)


def read_table(store: Store, rel: str) -> pa.Table:
    return read_parquet_bytes(store.read_bytes(rel))


def read_manifest_table(store: Store, stage: str, columns: list[str] | None = None,
                        ok_only: bool = False) -> pa.Table:
    """A stage's manifest as a table, with only ``columns`` read from the file (all when None) and
    only ``status == ok`` rows when ``ok_only``."""
    wanted = None if columns is None else list(dict.fromkeys([*columns, *(["status"] if ok_only else [])]))
    with store.fs.open(store.path(manifest_rel(stage)), "rb") as f:
        table = pq.read_table(f, columns=wanted, use_threads=False)  # see read_parquet_bytes
    if ok_only:
        ok = pc.equal(table["status"], OK)
        if not pc.all(ok).as_py():  # filtering copies every column: only when something is rejected
            table = table.filter(ok)
        if columns is not None and "status" not in columns:
            table = table.drop_columns(["status"])
    return table


def read_manifest_row(store: Store, stage: str, row: int) -> dict:
    """Row number ``row`` of a stage's manifest, decoding the file a batch at a time up to it (a
    row of a 1.5M-row manifest without the manifest in memory)."""
    with store.fs.open(store.path(manifest_rel(stage)), "rb") as f:
        start = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64 * 1024, use_threads=False):
            if 0 <= row - start < batch.num_rows:
                return batch.slice(row - start, 1).to_pylist()[0]
            start += batch.num_rows
    raise IndexError(f"{stage} manifest has {start} rows, not row {row}")


def left_join(table: pa.Table, right: pa.Table, key: str, flag: str | None = None,
              dictionary: bool = False) -> pa.Table:
    """``table`` (row order kept) with the other columns of ``right``'s row of the same ``key``
    (unique there; null keys match nothing), null where there is none; ``flag`` (when given) is
    true where there is one, else null. A lookup and a take per column: ``Table.join`` would hold
    both sides again in its own row format, and lose the order. ``dictionary``: the columns are
    dictionary arrays over ``right``'s (4 bytes a row: for a small ``right`` many rows point at,
    like the prompts of a million images; their values read back the same)."""
    found = pc.index_in(table[key], value_set=right[key], skip_nulls=True)
    for name in right.column_names:
        if name != key:
            column = right[name].combine_chunks()
            table = table.append_column(name, pa.DictionaryArray.from_arrays(found, column) if dictionary
                                        else column.take(found))
    if flag is not None:
        table = table.append_column(flag, has_match(found))
    return table


def has_match(found: pa.Array) -> pa.Array:
    """True where a lookup found a row, else null (what a left outer join leaves)."""
    return pc.if_else(pc.is_null(found), pa.scalar(None, pa.bool_()), True)


def read_manifest(store: Store, stage: str, columns: list[str] | None = None) -> list[dict]:
    """All rows of a stage's manifest (ok and rejected), with only ``columns`` when given."""
    return read_manifest_table(store, stage, columns).to_pylist()


def ok_rows(store: Store, stage: str, columns: list[str] | None = None) -> list[dict]:
    """The ok rows of a stage's manifest (filtered in Arrow), with only ``columns`` when given."""
    return read_manifest_table(store, stage, columns, ok_only=True).to_pylist()


def reject(item: dict, reason: str, **fields) -> dict:
    """A rejected row for ``item`` (an input record with a ``sample_key``)."""
    return {"sample_key": item["sample_key"], "status": REJECTED, "reason": reason, **fields}


def keep(item: dict, **fields) -> dict:
    """An ok row for ``item``: the counterpart of :func:`reject`."""
    return {"sample_key": item["sample_key"], "status": OK, "reason": None, **fields}


def decide(item: dict, problem: str | None, **fields) -> dict:
    """``item``'s row: rejected with ``problem`` as the reason, or ok when there is none."""
    return reject(item, problem, **fields) if problem else keep(item, **fields)


# One line per column, for manifests/README.md (`python -m pab_build.manifests > manifests/README.md`).
COLUMN_DOCS: dict[str, str] = {
    "sample_key": "stable key of the item; the WebDataset `__key__` of the sample it becomes",
    "status": "`ok` or `rejected`",
    "reason": "why the item was rejected (null when ok)",
    "clip_name": "OOPS! clip name (mojibake repaired)",
    "clip_key": "identity: `c` + 10 hex chars of sha1(clip name)",
    "split": "OOPS! split (`train`/`val`) of the clip; for shards, `test`/`train`",
    "behavior": "`normal` or `anomaly`",
    "failure_time_s": "median of the annotators' failure times (s)",
    "duration_s": "clip length used by the rules (annotated `len`, else the video's duration)",
    "time_s": "timestamp of the frame actually taken (s)",
    "frame_index": "index of that frame in the video",
    "source_caption": "the clip's OOPS! caption for this behavior (goal / wentwrong)",
    "image_path": "image file, relative to the build's output root",
    "image_sha256": "sha256 of the image file",
    "width": "image width (px)",
    "height": "image height (px)",
    "pose_path": "rendered OpenPose map (PNG), relative to the output root",
    "pose_sha256": "sha256 of the pose map",
    "person_height": "main (tallest) person's estimated body height, head to feet, / image height (null: nobody)",
    "person_count": "people OpenPose found",
    "keypoint_count": "body keypoints found for the main person",
    "limb_ratio_max": "main person's largest segment stretch (length / what its body height allows; null: < 3 segments)",
    "main_person_area": "main person's keypoint box / image area",
    "keypoints_json": "JSON: per person, 18 body keypoints `[x, y, score]` in [0, 1] or null",
    "pair_key": "sample_key of the other frame of the same clip",
    "cosine": "ResNet-50 cosine similarity between the clip's normal and anomaly frames",
    "decision": "merged reviewer decision (`accept` / `reject`)",
    "reviewers": "who decided (`auto` under the accept_all policy)",
    "caption_generated": "raw Qwen2-VL caption",
    "caption": "final caption (the QC correction when there is one)",
    "caption_corrected": "true when a reviewer corrected the caption",
    "finished": "generation ended with an end token (false = cut at max_new_tokens)",
    "caption_end": "finished (end token) | trimmed (cut at max_new_tokens, kept up to its last whole sentence) | "
                   "unfinished (cut, too little whole text: rejected when reject_unfinished)",
    "prompt_version": "version(s) of the instruction(s) under prompts/",
    "model_id": "model as written in the profile (`path@revision`)",
    "action": "normalised action type (normal images)",
    "action_raw": "raw answer to the action question",
    "anomaly": "normalised anomaly class (anomaly images)",
    "anomaly_raw": "raw answer to the anomaly question",
    "scene": "normalised scene category",
    "scene_raw": "raw answer to the scene question",
    "shard": "shard file, relative to the output root",
    "shard_index": "shard number",
    "shard_bytes": "size of the whole shard (bytes)",
    "shard_sha256": "sha256 of the whole shard",
    "kind": "prompt kind: `n` (C_n), `a` (C_a), `a+` (C_n and C_a joined)",
    "annotation_index": "which OOPS! caption annotation of the clip",
    "prompt": "the text prompt (for generate: before prefix/suffix)",
    "subject": "the caption's grammatical subject as found by the subject filter",
    "counterpart_keys": "JSON list of the same clip's prompts of the other behavior",
    "prompt_key": "sample_key of the prompt the image was generated from",
    "index": "image index within its prompt (0..images_per_caption-1)",
    "seed": "the image's own seed, derived from (base seed, prompt key, index)",
    "batch_first_index": "first index of the pipeline call the image came from",
    "batch_size": "size of that pipeline call",
    "hard_negative_key": "sample_key of the same identity's counterpart-behavior sample (IHNM)",
}


def describe_markdown() -> str:
    """manifests/README.md, generated from the schemas above."""
    lines = [
        "# Manifests",
        "",
        "Every stage writes `OUT/manifests/<stage>.parquet`: one row per input item, `status` `ok` or",
        "`rejected` and a `reason` when rejected. Generated from `pab_build/manifests.py`",
        "(`python -m pab_build.manifests > manifests/README.md`); a test keeps it in sync.",
        "The shard index schema is [`shard_index.schema.json`](shard_index.schema.json).",
        "",
    ]
    for stage in STAGE_COLUMNS:
        lines += [f"## `{stage}`", "", "| column | type | meaning |", "|---|---|---|"]
        for field in schema(stage):
            lines.append(f"| `{field.name}` | {field.type} | {COLUMN_DOCS.get(field.name, '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_markdown())
