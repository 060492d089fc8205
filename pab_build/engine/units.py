"""Units of work: the unit of resumption.

A stage splits its input items into units. Running a unit writes its output files (each one
atomically), then its manifest rows (``_units/<stage>/<unit>.parquet``), then its marker
(``_markers/<stage>/<unit>.json``) last. A marker whose ``stage_hash`` (the stage's config and
code version) and ``input_hash`` (the unit's input records) match means "done": the unit is
skipped on rerun. A unit killed anywhere before its marker is simply redone.

Invalidation cascades through content: a stage's items carry the sha256 of upstream files and
upstream fields, so when an earlier stage's output changes, the later units' input hashes change.

This module knows nothing about Prefect: ``flows/`` calls :func:`execute_unit` from tasks, and
:func:`run_stage` runs a stage in a plain loop (tests, benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from ..config import PABConfig, stable_hash
from ..manifests import (
    OK,
    REJECTED,
    rows_to_table,
    table_bytes,
    read_manifest_table,
)
from ..store import Marker, Store, out_store
from .unit_manifests import write_unit_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    stage: str
    unit_id: str  # zero-padded, e.g. "000012", or "<prompt_key>-003"
    # JSON-serialisable input records, each with a "sample_key"; a tuple, or LazyItems made on demand
    items: "tuple[dict, ...] | LazyItems"

    @property
    def input_hash(self) -> str:
        return stable_hash(list(self.items))

    @property
    def sample_keys(self) -> list[str]:
        return [it["sample_key"] for it in self.items]


@dataclass
class Context:
    """What a stage function receives: the validated config and the output store."""

    cfg: PABConfig
    store: Store

    @classmethod
    def create(cls, cfg: PABConfig, out: str) -> "Context":
        return cls(cfg=cfg, store=out_store(out, cfg.publish.storage_options))


@dataclass(frozen=True)
class Stage:
    """A stage: how to split its inputs into units, and how to run one unit.

    ``plan_units(ctx)`` reads upstream manifests and returns the units; ``run_unit(ctx, unit)``
    returns exactly one manifest row per item. ``finalize(ctx, table)``, if given, runs after the
    manifest is written, with the manifest as a ``pyarrow.Table`` (e.g. to write the review sheet
    or a shard index).
    """

    name: str
    plan_units: Callable[[Context], list[Unit]]
    run_unit: Callable[[Context, Unit], list[dict]]
    config_keys: tuple[str, ...]  # config sections this stage's outputs depend on
    version: str = "1"  # bump when the stage's logic changes its outputs
    uses_gpu: bool = False
    finalize: Callable[[Context, pa.Table], None] | None = None
    finalize_columns: tuple[str, ...] | None = None  # the manifest columns ``finalize`` reads (None: all)
    extra: dict[str, Any] = field(default_factory=dict)
    # data the stage reads besides its config: file paths (their content is hashed) or functions
    # returning a fingerprint (e.g. of WordNet); editing one redoes this stage, not source comments
    data_files: tuple[str | os.PathLike | Callable[[], str], ...] = ()

    def stage_hash(self, cfg: PABConfig) -> str:
        h = {"v": self.version, "cfg": cfg.section_hash(*self.config_keys)}
        if self.data_files:
            h["data"] = [d() if callable(d) else file_fingerprint(os.fspath(d)) for d in self.data_files]
        return stable_hash(h)


def file_fingerprint(path: str) -> str:
    """sha256 of a file's content, cached per (path, size, mtime): stage_hash runs once per unit."""
    st = os.stat(path)
    return _file_sha256(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def chunk_units(stage: str, items: list[dict], size: int, group_key: str | None = None) -> list[Unit]:
    """Split items into units of about ``size`` items (or groups, when ``group_key`` keeps e.g. a
    clip's two frames together), numbered ``000000``, ``000001``, ..."""
    if group_key is None:
        groups = [[it] for it in items]
    else:
        by: dict[str, list[dict]] = {}
        for it in items:
            by.setdefault(it[group_key], []).append(it)
        groups = list(by.values())
    units = []
    for n, start in enumerate(range(0, len(groups), size)):
        chunk = [it for g in groups[start : start + size] for it in g]
        units.append(Unit(stage, f"{n:06d}", tuple(chunk)))
    return units


class LazyItems:
    """A unit's items, made only when the unit runs (or is hashed): at the paper's scale a plan
    holds 61k units of 1.5M items, which as dicts alone would take gigabytes in the flow process.

    ``make()`` returns the item dicts (e.g. a ``functools.partial`` over a slice of a shared Arrow
    table); ``n`` is how many. Pickled (Ray), it becomes the plain tuple of dicts.
    """

    __slots__ = ("_make", "_n")

    def __init__(self, make: Callable[[], list[dict]], n: int):
        self._make, self._n = make, n

    def __iter__(self):
        return iter(self._make())

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return tuple(self._make())[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, (tuple, LazyItems)) and tuple(self) == tuple(other)

    __hash__ = None  # like the tuple of dicts it stands for

    def __reduce__(self):
        return (tuple, (tuple(self._make()),))

    def __repr__(self) -> str:
        return f"LazyItems({self._n} items)"


def table_rows(table: pa.Table, start: int, stop: int, to_item: Callable[[dict], dict] | None = None) -> list[dict]:
    """Rows ``start:stop`` of ``table`` as dicts (through ``to_item`` when given)."""
    rows = table.slice(start, stop - start).to_pylist()
    return [to_item(r) for r in rows] if to_item is not None else rows


def chunk_table_units(stage: str, table: pa.Table, size: int, to_item: Callable[[dict], dict] | None = None,
                      bounds: list[int] | None = None) -> list[Unit]:
    """Like :func:`chunk_units` for items already sorted in an Arrow table (one row per item):
    units of ``size`` rows, or between the row offsets ``bounds`` when given, numbered
    ``000000``, ... Items stay in the table until a unit runs (:class:`LazyItems`)."""
    from functools import partial

    n = table.num_rows
    if bounds is None:
        bounds = list(range(0, n, max(1, size)))
    edges = [*bounds, n]
    return [Unit(stage, f"{i:06d}", LazyItems(partial(table_rows, table, a, b, to_item), b - a))
            for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def unit_is_done(ctx: Context, stage: Stage, unit: Unit) -> bool:
    m = ctx.store.read_marker(stage.name, unit.unit_id)
    return (
        m is not None
        and m.status == "done"
        and m.matches(stage.stage_hash(ctx.cfg), unit.input_hash)
        and ctx.store.exists(Store.unit_rows_rel(stage.name, unit.unit_id))
    )


def _check_rows(stage: Stage, unit: Unit, rows: list[dict]) -> None:
    got, want = [r["sample_key"] for r in rows], unit.sample_keys
    if sorted(got) != sorted(want):
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        raise RuntimeError(
            f"{stage.name} unit {unit.unit_id}: rows do not match items one to one "
            f"(missing {missing}, extra {extra}, {len(got)} rows for {len(want)} items)"
        )


def execute_unit(ctx: Context, stage: Stage, unit: Unit) -> str:
    """Run one unit unless it is already done. Returns ``"skipped"`` or ``"done"``.

    Per-item trouble is the stage's business (a rejected row); anything raised here is per-unit
    trouble, and the caller (Prefect) retries the unit. No marker is written for a failed run.
    """
    if unit_is_done(ctx, stage, unit):
        return "skipped"
    if ctx.cfg.run.torch_threads:
        import torch

        # several units share a few cores: oversubscribed intra-op threads make CPU stages crawl
        torch.set_num_threads(ctx.cfg.run.torch_threads)
    started = time.monotonic()
    rows = stage.run_unit(ctx, unit)
    _check_rows(stage, unit, rows)
    ctx.store.write_bytes(Store.unit_rows_rel(stage.name, unit.unit_id), table_bytes(rows_to_table(stage.name, rows)))
    ctx.store.write_marker(
        stage.name,
        unit.unit_id,
        Marker("done", stage.stage_hash(ctx.cfg), unit.input_hash, len(rows), ok=status_counts(rows)["ok"],
               **marker_timing(time.monotonic() - started)),
    )
    return "done"


def marker_timing(wall_s: float | None) -> dict:
    """The timing fields of a marker written now by this process."""
    return {"wall_s": None if wall_s is None else round(wall_s, 3), "finished_at": round(time.time(), 3),
            "host": socket.gethostname(), "worker": f"{os.getpid()}:{threading.current_thread().name}"}


def record_failed_unit(ctx: Context, stage: Stage, unit: Unit, error: BaseException | str) -> None:
    """After the last retry: every item of the unit becomes a rejected row naming the error, and a
    ``failed`` marker is written, so the build completes and a rerun tries the unit again."""
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
    else:
        text = str(error)
    reason = f"unit {unit.unit_id} failed after retries: {text}"[:500]
    rows = [{"sample_key": k, "status": REJECTED, "reason": reason} for k in unit.sample_keys]
    ctx.store.write_bytes(Store.unit_rows_rel(stage.name, unit.unit_id), table_bytes(rows_to_table(stage.name, rows)))
    ctx.store.write_marker(
        stage.name,
        unit.unit_id,
        Marker("failed", stage.stage_hash(ctx.cfg), unit.input_hash, len(rows), reason, **marker_timing(None)),
    )


def finalize_stage(ctx: Context, stage: Stage, units: list[Unit]) -> pa.Table:
    """Concatenate the planned units' rows into ``manifests/<stage>.parquet`` (sorted by key), in
    Arrow from file to file, one row group in memory at a time; returns the manifest's
    ``finalize_columns`` (all when the stage has a finalize hook and names none; else the key and
    status), the table the hook gets."""
    write_unit_manifest(ctx.store, stage.name, [Store.unit_rows_rel(stage.name, u.unit_id) for u in units])
    columns = stage.finalize_columns or (None if stage.finalize is not None else ["sample_key", "status"])
    table = read_manifest_table(ctx.store, stage.name, None if columns is None else list(columns))
    if stage.finalize is not None:
        stage.finalize(ctx, table)
    return table


def run_stage(ctx: Context, stage: Stage, retries: int | None = None) -> dict[str, int]:
    """Run a stage in a plain loop (no Prefect): tests, benchmarks and debugging."""
    retries = ctx.cfg.run.unit_retries if retries is None else retries
    units = stage.plan_units(ctx)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for u in units:
        for attempt in range(retries + 1):
            try:
                counts[execute_unit(ctx, stage, u)] += 1
                break
            except Exception as e:  # noqa: BLE001 - per-unit policy: retry, then record
                log.warning("%s unit %s attempt %d failed: %s", stage.name, u.unit_id, attempt + 1, e)
                if attempt == retries:
                    record_failed_unit(ctx, stage, u, e)
                    counts["failed"] += 1
    finalize_stage(ctx, stage, units)
    return counts


def status_counts(rows: "list[dict] | pa.Table") -> dict[str, int]:
    if isinstance(rows, pa.Table):
        import pyarrow.compute as pc

        ok = pc.sum(pc.equal(rows["status"], OK)).as_py() or 0
        return {"ok": ok, "rejected": rows.num_rows - ok}
    ok = sum(1 for r in rows if r["status"] == OK)
    return {"ok": ok, "rejected": len(rows) - ok}
