"""The pyarrow schema of every stage's Parquet manifest, in one place.

Every manifest starts with the same three columns: ``sample_key`` (stable from the OOPS! clip to
the WebDataset ``__key__``), ``status`` (``ok`` | ``rejected``) and ``reason`` (why, when
rejected). Each input item of a stage appears exactly once. ``manifests/README.md`` describes the
columns for people; this module is what the code writes and checks.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from .store import Store

OK = "ok"
REJECTED = "rejected"

_s, _f, _i, _b = pa.string(), pa.float64(), pa.int64(), pa.bool_()

COMMON = [("sample_key", _s), ("status", _s), ("reason", _s)]

# columns shared by the stages that produce or re-encode an image
_IMAGE = [("image_path", _s), ("image_sha256", _s)]
_POSE = [
    ("pose_path", _s),  # rendered OpenPose map (PNG), consumed by CMP
    ("pose_sha256", _s),
    ("n_people", _i),
    ("main_person_area", _f),  # largest person's keypoint box / image area
    ("n_keypoints", _i),  # body keypoints found for the largest person
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
    "test_captions": [*_CAPTION, ("finished", _b)],  # finished: generation ended with an end token
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
    ],
    "gen_pose": [*_IMAGE, *_POSE],
    "train_captions": [*_CAPTION, ("finished", _b)],
    "attributes": [*_ATTRIBUTES, ("behavior", _s)],
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


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes with fixed writer settings, so equal tables give equal bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=False)
    return buf.getvalue()


def manifest_rel(stage: str) -> str:
    return f"manifests/{stage}.parquet"


def write_manifest(store: Store, stage: str, rows: list[dict]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["sample_key"])
    keys = [r["sample_key"] for r in rows]
    if len(keys) != len(set(keys)):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"{stage}: duplicate sample_key in manifest: {dup}")
    table = rows_to_table(stage, rows)
    store.write_bytes(manifest_rel(stage), table_bytes(table))
    return table


def read_parquet_bytes(data: bytes) -> pa.Table:
    # use_threads=False: pyarrow's reader thread pool makes the interpreter abort at exit
    # ("terminate called without an active exception") on our CI machines, after the work is done
    return pq.read_table(io.BytesIO(data), use_threads=False)


def read_table(store: Store, rel: str) -> pa.Table:
    return read_parquet_bytes(store.read_bytes(rel))


def read_manifest(store: Store, stage: str) -> list[dict]:
    """All rows of a stage's manifest (ok and rejected)."""
    return read_table(store, manifest_rel(stage)).to_pylist()


def ok_rows(store: Store, stage: str) -> list[dict]:
    return [r for r in read_manifest(store, stage) if r["status"] == OK]


def reject(item: dict, reason: str, **fields) -> dict:
    """A rejected row for ``item`` (an input record with a ``sample_key``)."""
    return {"sample_key": item["sample_key"], "status": REJECTED, "reason": reason, **fields}
