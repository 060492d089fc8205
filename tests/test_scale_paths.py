"""The paths that keep a full-size build small: Arrow finalize, lazy unit items, streamed shards."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pab_build import manifests
from pab_build.engine import unit_manifests
from pab_build.manifests import manifest_rel, rows_to_table, table_bytes, write_manifest
from pab_build.shards.writer import ShardTooBig, build_shard, write_shard
from pab_build.store import Store
from pab_build.engine.units import Context, LazyItems, Stage, Unit, chunk_table_units, chunk_units, finalize_stage, status_counts


def _pair_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"sample_key": f"{rng.choice('aZé')}{rng.randrange(10**6):06d}-{i}", "status": "ok" if i % 7 else "rejected",
             "reason": None if i % 7 else "too dark", "clip_key": f"c{i // 2}", "behavior": rng.choice(["normal", None]),
             "pair_key": "x", "cosine": rng.random()} for i in range(n)]


def _stage(name: str, finalized: list) -> Stage:
    return Stage(name=name, plan_units=lambda ctx: [], run_unit=lambda ctx, u: [], config_keys=(),
                 finalize=lambda ctx, table: finalized.append(table))


def test_finalize_concatenates_unit_files_in_arrow_with_the_same_bytes(tmp_path):
    store = Store(str(tmp_path))
    rows = _pair_rows(3000)
    write_manifest(store, "pairs", rows)
    expected = store.read_bytes(manifest_rel("pairs"))
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)  # units whose key ranges overlap, rows unsorted within a unit
    units = []
    for n, start in enumerate(range(0, len(shuffled), 97)):
        unit = Unit("pairs", f"{n:06d}", tuple({"sample_key": r["sample_key"]} for r in shuffled[start:start + 97]))
        store.write_bytes(Store.unit_rows_rel("pairs", unit.unit_id),
                          table_bytes(rows_to_table("pairs", shuffled[start:start + 97])))
        units.append(unit)
    finalized: list = []
    ctx = Context(cfg=None, store=store)
    table = finalize_stage(ctx, _stage("pairs", finalized), units[::-1])
    assert store.read_bytes(manifest_rel("pairs")) == expected
    assert finalized == [table] and isinstance(table, pa.Table)
    assert status_counts(table) == status_counts(rows) == {"ok": 3000 - 429, "rejected": 429}


def test_finalize_refuses_a_key_two_units_wrote(tmp_path):
    store = Store(str(tmp_path))
    rows = _pair_rows(10)
    for n, part in enumerate((rows[:6], rows[5:])):
        store.write_bytes(Store.unit_rows_rel("pairs", f"{n:06d}"), table_bytes(rows_to_table("pairs", part)))
    units = [Unit("pairs", f"{n:06d}", ()) for n in range(2)]
    with pytest.raises(ValueError, match="duplicate sample_key"):
        finalize_stage(Context(cfg=None, store=store), _stage("pairs", []), units)
    assert not store.exists(manifest_rel("pairs"))


def test_table_units_equal_dict_units_and_pickle_as_plain_tuples():
    items = [{"sample_key": f"k{i:04d}", "image_path": f"generate/p/k{i:04d}.jpg", "image_sha256": None}
             for i in range(10)]
    lazy = chunk_table_units("gen_pose", pa.Table.from_pylist(items), 4)
    plain = chunk_units("gen_pose", items, 4)
    assert [u.unit_id for u in lazy] == [u.unit_id for u in plain] == ["000000", "000001", "000002"]
    for a, b in zip(lazy, plain):
        assert isinstance(a.items, LazyItems) and len(a.items) == len(b.items)
        assert a.input_hash == b.input_hash and a.sample_keys == b.sample_keys and a == b
        shipped = pickle.loads(pickle.dumps(a))  # what a Ray worker receives
        assert isinstance(shipped.items, tuple) and shipped.items == b.items


def _sample_files(store: Store, n: int) -> tuple[list, list]:
    rng = random.Random(2)
    in_memory, from_files = [], []
    for i in range(n):
        key = f"c{i:04d}-n-{i:03d}"
        jpg, pose = rng.randbytes(rng.randrange(1, 3000)), rng.randbytes(700)
        store.write_bytes(f"src/{key}.jpg", jpg)
        store.write_bytes(f"src/{key}.png", pose)
        members = {"txt": f"caption {i} é".encode(), "json": b'{"k": 1}'}
        in_memory.append((key, {"jpg": jpg, "pose.png": pose, **members}))
        from_files.append((key, {"jpg": f"src/{key}.jpg", "pose.png": f"src/{key}.png", **members}))
    return in_memory, from_files


def test_streamed_shard_has_the_bytes_of_the_in_memory_one(tmp_path):
    store = Store(str(tmp_path))
    in_memory, from_files = _sample_files(store, 30)
    size, digest = write_shard(store, "shards/train/train-000000.tar", iter(from_files))
    data = build_shard(in_memory)
    assert store.read_bytes("shards/train/train-000000.tar") == data
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())


def test_a_shard_that_fails_or_grows_too_big_leaves_nothing(tmp_path):
    store = Store(str(tmp_path))
    _, from_files = _sample_files(store, 5)
    rel = "shards/train/train-000000.tar"
    store.write_bytes(rel, b"old")

    def dying():
        yield from from_files[:3]
        raise OSError("source vanished")

    with pytest.raises(OSError, match="vanished"):
        write_shard(store, rel, dying())
    assert store.read_bytes(rel) == b"old"
    with pytest.raises(ShardTooBig):
        write_shard(store, rel, iter(from_files), max_bytes=4096)
    assert store.read_bytes(rel) == b"old"
    assert sorted(os.listdir(tmp_path / "shards" / "train")) == ["train-000000.tar"]  # no temporary file left
    with pytest.raises(ValueError, match="not sorted"):
        write_shard(store, rel, iter(from_files[::-1]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_finalize_streams_row_groups_with_the_bytes_of_one_table(tmp_path, monkeypatch, shuffle):
    """Units in key order are streamed one row group at a time; out of order they are built whole.
    Either way the manifest has the bytes of one table written at once (several row groups here)."""
    monkeypatch.setattr(manifests, "ROW_GROUP_ROWS", 700)
    store = Store(str(tmp_path))
    rows = sorted(_pair_rows(3000), key=lambda r: r["sample_key"])
    write_manifest(store, "pairs", rows)
    expected = store.read_bytes(manifest_rel("pairs"))
    assert pq.ParquetFile(io.BytesIO(expected)).num_row_groups == 5
    units = []
    for n, start in enumerate(range(0, len(rows), 97)):
        part = rows[start:start + 97]
        units.append(Unit("pairs", f"{n:06d}", tuple({"sample_key": r["sample_key"]} for r in part)))
        store.write_bytes(Store.unit_rows_rel("pairs", units[-1].unit_id), table_bytes(rows_to_table("pairs", part)))
    if shuffle:
        random.Random(3).shuffle(units)
    store.remove(manifest_rel("pairs"))
    whole = []
    monkeypatch.setattr(unit_manifests, "concat_unit_tables", lambda *a, f=unit_manifests.concat_unit_tables: whole.append(
        a) or f(*a))
    no_hook = Stage(name="pairs", plan_units=lambda ctx: [], run_unit=lambda ctx, u: [], config_keys=())
    table = finalize_stage(Context(cfg=None, store=store), no_hook, units)
    assert store.read_bytes(manifest_rel("pairs")) == expected
    assert len(whole) == shuffle  # streamed when the units are in key order
    assert table.column_names == ["sample_key", "status"] and status_counts(table) == status_counts(rows)


def test_planning_and_finalizing_import_no_model_library():
    """Stage modules import torch, diffusers and transformers only where a model loads or runs:
    a flow process that plans and finalizes ~61k units does not carry ~500 MiB for them."""
    code = ("import sys; from pab_build.engine.pipeline import STAGE_ORDER, get_stage; import pab_build.engine.status; "
            "[get_stage(s) for s in STAGE_ORDER]; "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'torchvision') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]"
