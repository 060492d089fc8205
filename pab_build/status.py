"""``pab status OUT``: per stage, units done / failed / pending and rows ok / rejected."""

from __future__ import annotations

from .config import config_from_dict
from .manifests import manifest_rel, read_manifest
from .pipeline import STAGE_ORDER, get_stage
from .store import Store
from .units import Context, status_counts, unit_is_done


def build_status(out: str) -> list[dict]:
    """One dict per stage. Pending units are counted by planning the stage against the build's
    saved config (``OUT/config.yaml``); a stage whose inputs do not exist yet shows "-"."""
    import yaml

    store = Store(out)
    cfg = config_from_dict(yaml.safe_load(store.read_text("config.yaml"))) if store.exists("config.yaml") else None
    table = []
    for name in STAGE_ORDER:
        row: dict = {"stage": name, "done": 0, "failed": 0, "pending": "-", "ok": "-", "rejected": "-"}
        markers = store.listdir(f"_markers/{name}")
        for m in markers:
            marker = store.read_marker(name, m[: -len(".json")])
            if marker is not None:
                row["failed" if marker.status == "failed" else "done"] += 1
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
            row.update(status_counts(read_manifest(store, name)))
        table.append(row)
    return table


def format_status(table: list[dict]) -> str:
    cols = ["stage", "done", "failed", "pending", "ok", "rejected"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in table]
    return "\n".join(lines)
