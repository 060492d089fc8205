"""A stage's manifest from its unit files, in Arrow, one row group in memory at a time.

Units of the big stages (``generate``, ``gen_pose``, ..., ``train_shards``) are planned in key
order and each covers its own key range, so their files, read in plan order, are already the
manifest's rows in order: they are streamed into the Parquet file one row group (``ROW_GROUP_ROWS``)
at a time, and 1.5M wide rows never sit in memory together. Units whose ranges overlap (or a key
two units wrote) are noticed on the way; the manifest is then built whole by :func:`concat_unit_tables`
(sorted globally; a duplicate key is an error). Both give the bytes ``write_manifest_table`` gives.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import manifests
from ..manifests import conform, manifest_rel, read_table, schema, write_manifest_table
from ..store import Store

UNIT_READ_THREADS = 16  # object stores answer one file at a time slowly; reads overlap (local reads
# are CPU-bound: one thread per core, more only contend for the interpreter lock)
UNIT_BLOCK = 256  # unit files read per block, then made one table: thousands of tiny tables never coexist


class _Overlap(Exception):
    """The unit files are not in key order (or share a key): build the manifest whole."""


def _read_sorted(store: Store, stage: str, rel: str) -> tuple[pa.Table, bool]:
    """A unit file's rows sorted by key, and whether its keys are unique."""
    t = conform(stage, read_table(store, rel))
    keys = t["sample_key"]
    n = t.num_rows
    if n < 2 or pc.all(pc.less(keys.slice(0, n - 1), keys.slice(1))).as_py():
        return t, True  # strictly increasing: sorted, no key twice
    t = t.take(pc.sort_indices(keys))
    keys = t["sample_key"]
    return t, not pc.any(pc.equal(keys.slice(0, n - 1), keys.slice(1))).as_py()


def _unit_blocks(store: Store, stage: str, rels: list[str]):
    """The unit files' tables (each sorted, empty ones skipped; with whether their keys are unique)
    in ``rels`` order, read concurrently, a block of ``UNIT_BLOCK`` files at a time."""
    threads = min(UNIT_READ_THREADS, os.cpu_count() or 1) if store.is_local else UNIT_READ_THREADS
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(rels), UNIT_BLOCK):
            read = pool.map(lambda rel: _read_sorted(store, stage, rel), rels[start : start + UNIT_BLOCK])
            yield [(t, unique) for t, unique in read if t.num_rows]


def _contiguous(tables: list[pa.Table], sch: pa.Schema, trim: bool = False) -> pa.Table:
    """One chunk per column (Parquet bytes depend on chunking), combined column by column, each
    column's pieces dropped at once (``tables`` is emptied: the caller hands them over), so the
    rows are never held twice; ``trim``: give freed memory back to the OS after each column."""
    pieces = {name: [c for t in tables for c in t.column(name).chunks] for name in sch.names}
    tables.clear()
    arrays = []
    for name in sch.names:
        arrays.append(pa.concat_arrays(pieces.pop(name)))
        if trim:
            pa.default_memory_pool().release_unused()
    return pa.Table.from_arrays(arrays, schema=sch)


def write_unit_manifest(store: Store, stage: str, rels: list[str]) -> None:
    """Write ``manifests/<stage>.parquet`` from the unit files ``rels``, streamed when they are in
    key order, else whole."""
    try:
        _stream(store, stage, rels)
    except _Overlap:
        write_manifest_table(store, stage, concat_unit_tables(store, stage, rels))


def _after(tables: list[tuple[pa.Table, bool]], last: str | None) -> str | None:
    """The last key of ``tables``, which follow a table ending at ``last``; raises _Overlap unless
    every key is greater than the one before."""
    for t, unique in tables:
        if not unique or (last is not None and t["sample_key"][0].as_py() <= last):
            raise _Overlap
        last = t["sample_key"][-1].as_py()
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
                pending.append(_contiguous([t for t, _ in tables], sch))
                del tables
                n_pending += pending[-1].num_rows
            while n_pending >= rows:
                group = pa.concat_tables(pending)
                pending = [group.slice(0, rows)]
                rest = group.slice(rows)
                del group
                writer = writer or pq.ParquetWriter(f, sch, **manifests.PARQUET_OPTIONS)
                writer.write_table(_contiguous(pending, sch, trim=True), row_group_size=rows)
                pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
                del rest
        if writer is None and not pending:
            raise _Overlap  # no rows: the whole path writes the empty manifest
        writer = writer or pq.ParquetWriter(f, sch, **manifests.PARQUET_OPTIONS)
        if pending:
            writer.write_table(_contiguous(pending, sch, trim=True), row_group_size=rows)
        writer.close()


def concat_unit_tables(store: Store, stage: str, rels: list[str]) -> pa.Table:
    """The rows of a stage's unit files as one table sorted by ``sample_key`` (tables ordered by
    their first key; ``write_manifest_table`` sorts what still overlaps)."""
    tables = sorted((t for block in _unit_blocks(store, stage, rels) for t, _ in block),
                    key=lambda t: t["sample_key"][0].as_py())
    return _contiguous(tables, schema(stage)) if tables else schema(stage).empty_table()
