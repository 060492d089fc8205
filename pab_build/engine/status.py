"""``pab status OUT``: per stage, units done / failed / pending, rows ok / rejected, how long the
units took (from their markers), an ETA while units are pending, and the first errors of failed
units. ``as_json`` gives the same for scripts."""

from __future__ import annotations

import json
import time

from ..config import config_from_dict
from ..manifests import manifest_rel, read_manifest_table
from .pipeline import STAGE_ORDER, get_stage
from ..store import Marker, Store
from .units import Context, status_counts, unit_is_done

FIRST_ERRORS = 3
BUILD_SIGNS = ("config.yaml", "manifests", "_markers")


class NotABuildError(FileNotFoundError):
    """A folder given as OUT that no build wrote (a typo, or the wrong folder)."""


def require_build(out: str) -> Store:
    """The build's store; raises NotABuildError when ``out`` is missing or holds no build, so a
    command that reads a build neither creates a folder nor reports zeros for a typo."""
    store = Store(out)
    if not store.exists(""):
        raise NotABuildError(f"{out}: no such folder (give the --out of a `pab run`)")
    if not any(store.exists(sign) for sign in BUILD_SIGNS):
        raise NotABuildError(f"{out} is not a build: it has none of {', '.join(BUILD_SIGNS)} "
                             "(give the --out of a `pab run`)")
    return store


def marker_timings(markers: list[Marker], pending: int | None, now: float | None = None) -> dict:
    """Elapsed time, mean unit time, hosts and ETA from a stage's markers. Elapsed runs from the
    first unit's start to the last marker; the ETA assumes the observed units-per-second."""
    timed = [m for m in markers if m.finished_at is not None]
    out: dict = {"elapsed_s": None, "unit_s_mean": None, "eta_s": None,
                 "hosts": sorted({m.host for m in timed if m.host})}
    if not timed:
        return out
    start = min(m.finished_at - (m.wall_s or 0.0) for m in timed)
    end = max(m.finished_at for m in timed)
    walls = [m.wall_s for m in timed if m.wall_s is not None]
    out["elapsed_s"] = round(end - start, 1)
    out["unit_s_mean"] = round(sum(walls) / len(walls), 2) if walls else None
    if pending and walls:
        rate = len(timed) / (end - start) if end > start else 1.0 / max(out["unit_s_mean"], 1e-3)
        out["eta_s"] = round(pending / rate, 1)
        out["last_unit_ago_s"] = round((now or time.time()) - end, 1)
    return out


def build_status(out: str) -> list[dict]:
    """One dict per stage. Pending units are counted by planning the stage against the build's
    saved config (``OUT/config.yaml``); a stage whose inputs do not exist yet shows "-"."""
    import yaml

    store = require_build(out)
    cfg = config_from_dict(yaml.safe_load(store.read_text("config.yaml"))) if store.exists("config.yaml") else None
    table = []
    for name in STAGE_ORDER:
        row: dict = {"stage": name, "done": 0, "failed": 0, "pending": "-", "ok": "-", "rejected": "-"}
        markers = [m for m in (store.read_marker(name, f[: -len(".json")]) for f in store.listdir(f"_markers/{name}"))
                   if m is not None]
        row["done"] = sum(m.status != "failed" for m in markers)
        row["failed"] = sum(m.status == "failed" for m in markers)
        if cfg is not None:
            try:
                ctx = Context(cfg, store)
                stage = get_stage(name)
                units = stage.plan_units(ctx)
                done = sum(1 for u in units if unit_is_done(ctx, stage, u))
                row["done"], row["pending"] = done, len(units) - done - min(row["failed"], len(units) - done)
            except Exception:  # noqa: BLE001 - upstream manifest missing: the stage has not started
                pass
        if store.exists(manifest_rel(name)):
            row.update(status_counts(read_manifest_table(store, name, ["status"])))  # one column of 1.5M rows
        row.update(marker_timings(markers, row["pending"] if isinstance(row["pending"], int) else None))
        row["errors"] = [m.reason for m in markers if m.status == "failed" and m.reason][:FIRST_ERRORS]
        table.append(row)
    return table


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_status(table: list[dict], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(table, indent=2)
    cols = ["stage", "done", "failed", "pending", "ok", "rejected", "elapsed", "per unit", "eta"]
    cells = [{**{c: str(r[c]) for c in cols[:6]}, "elapsed": duration_text(r["elapsed_s"]),
              "per unit": "-" if r["unit_s_mean"] is None else f"{r['unit_s_mean']:.1f}s",
              "eta": duration_text(r["eta_s"])} for r in table]
    widths = {c: max(len(c), *(len(row[c]) for row in cells)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in cols) for row in cells]
    for r in table:
        lines += [f"{r['stage']}: failed unit: {e}" for e in r["errors"]]
    return "\n".join(lines)
