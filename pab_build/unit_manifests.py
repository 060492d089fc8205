"""A stage's manifest from its unit files, in Arrow, one row group in memory at a time.

Units of the big stages (``generate``, ``gen_pose``, ..., ``train_shards``) are planned in key
order and each covers its own key range, so their files, read in plan order, are already the
manifest's rows in order: they are streamed into the Parquet file one row group (``ROW_GROUP_ROWS``)
at a time, and 1.5M wide rows never sit in memory together. Units whose ranges overlap (or a key
two units wrote) are noticed on the way; the manifest is then built whole by :func:`concat_unit_tables`
(sorted globally; a duplicate key is an error). Both give the bytes ``write_manifest_table`` gives.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import manifests
from .manifests import conform, is_sorted, manifest_rel, read_table, schema, write_manifest_table
from .store import Store

UNIT_READ_THREADS = 16  # object stores answer one file at a time slowly; reads overlap
UNIT_BLOCK = 64  # unit files read per block: thousands of tiny tables never coexist


class _Overlap(Exception):
    """The unit files are not in key order (or share a key): build the manifest whole."""


def _read_sorted(store: Store, stage: str, rel: str) -> pa.Table:
    t = conform(stage, read_table(store, rel))
    return t if is_sorted(t["sample_key"]) else t.take(pc.sort_indices(t["sample_key"]))


def _unit_blocks(store: Store, stage: str, rels: list[str]):
    """The unit files' tables (each sorted, empty ones skipped) in ``rels`` order, read concurrently,
    a block of ``UNIT_BLOCK`` files at a time."""
    with ThreadPoolExecutor(max_workers=UNIT_READ_THREADS) as pool:
        for start in range(0, len(rels), UNIT_BLOCK):
            tables = pool.map(lambda rel: _read_sorted(store, stage, rel), rels[start : start + UNIT_BLOCK])
            yield [t for t in tables if t.num_rows]


def _contiguous(tables: list[pa.Table], sch: pa.Schema) -> pa.Table:
    """One chunk per column (Parquet bytes depend on chunking), combined column by column, each
    column's pieces dropped from ``tables`` (emptied in place: the caller hands them over) at once,
    so the rows are never held twice."""
    arrays = []
    for name in sch.names:
        arrays.append(pa.concat_arrays([c for t in tables for c in t.column(name).chunks]))
        tables[:] = [t.drop_columns([name]) for t in tables]
        pa.default_memory_pool().release_unused()
    tables.clear()
    pa.default_memory_pool().release_unused()  # mimalloc keeps freed pages otherwise
    return pa.Table.from_arrays(arrays, schema=sch)


def write_unit_manifest(store: Store, stage: str, rels: list[str]) -> None:
    """Write ``manifests/<stage>.parquet`` from the unit files ``rels``, streamed when they are in
    key order, else whole."""
    try:
        _stream(store, stage, rels)
    except _Overlap:
        write_manifest_table(store, stage, concat_unit_tables(store, stage, rels))


def _after(tables: list[pa.Table], last: str | None) -> str | None:
    """The last key of ``tables``, which follow a table ending at ``last``; raises _Overlap unless
    every key is greater than the one before."""
    for t in tables:
        keys = t["sample_key"]
        if (last is not None and keys[0].as_py() <= last) or (
                t.num_rows > 1 and pc.any(pc.equal(keys.slice(1), keys.slice(0, t.num_rows - 1))).as_py()):
            raise _Overlap
        last = keys[-1].as_py()
    return last


def _stream(store: Store, stage: str, rels: list[str]) -> None:
    sch = schema(stage)
    rows = manifests.ROW_GROUP_ROWS
    with store.open_atomic(manifest_rel(stage)) as f:  # removed unless the block ends without error
        writer = None
        pending: list[pa.Table] = []  # blocks of unit files, each made contiguous as soon as it is read:
        n_pending, last = 0, None  # a column's memory is then freed as a whole, not file by file
        for tables in _unit_blocks(store, stage, rels):
            last = _after(tables, last)
            if tables:
                pending.append(_contiguous(tables, sch))
                n_pending += pending[-1].num_rows
            while n_pending >= rows:
                group = pa.concat_tables(pending)
                pending = [group.slice(0, rows)]
                rest = group.slice(rows)
                del group
                writer = writer or pq.ParquetWriter(f, sch, **manifests.PARQUET_OPTIONS)
                writer.write_table(_contiguous(pending, sch), row_group_size=rows)
                pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
                del rest
        if writer is None and not pending:
            raise _Overlap  # no rows: the whole path writes the empty manifest
        writer = writer or pq.ParquetWriter(f, sch, **manifests.PARQUET_OPTIONS)
        if pending:
            writer.write_table(_contiguous(pending, sch), row_group_size=rows)
        writer.close()


def concat_unit_tables(store: Store, stage: str, rels: list[str]) -> pa.Table:
    """The rows of a stage's unit files as one table sorted by ``sample_key`` (tables ordered by
    their first key; ``write_manifest_table`` sorts what still overlaps)."""
    tables = sorted((t for block in _unit_blocks(store, stage, rels) for t in block),
                    key=lambda t: t["sample_key"][0].as_py())
    return _contiguous(tables, schema(stage)) if tables else schema(stage).empty_table()
