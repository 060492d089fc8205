"""Stage ``test_captions``: Qwen2-VL captions of the reviewed test images, with people's QC corrections."""

from __future__ import annotations

import pyarrow as pa

from ..models.captions import (
    CAPTION_STAGE_VERSION,
    TEST_CAPTIONS,
    caption_unit,
    image_item,
)
from ..config import qc_settings
from ..manifests import OK, ok_rows, read_manifest
from ..engine.units import Context, Stage, Unit, chunk_units
from .review import export_caption_sheet, load_caption_corrections


def plan_test_caption_units(ctx: Context) -> list[Unit]:
    """Images the review kept, with their frame; QC corrections ride in the items, so a changed
    correction redoes only its own unit (and the answer cache spares the model)."""
    sec = ctx.cfg.test_captions
    frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames")}
    corrections: dict[str, str] = {}
    policy, files = qc_settings(ctx.cfg)
    if policy != "none":  # `wait`: the flow pauses for the files after this stage, then replans with them
        corrections = load_caption_corrections(files, set(frames))
    items = []
    for r in ok_rows(ctx.store, "review"):
        frame = frames.get(r["sample_key"])
        item = image_item(r["sample_key"], frame if frame and frame["status"] == OK else None)
        item["caption_correction"] = corrections.get(r["sample_key"])
        items.append(item)
    items.sort(key=lambda it: it["sample_key"])
    return chunk_units(TEST_CAPTIONS, items, sec.images_per_unit)


def run_test_caption_unit(ctx: Context, unit: Unit) -> list[dict]:
    return caption_unit(ctx, unit, ctx.cfg.test_captions, "no frame image for this sample in the frames manifest")


def export_test_caption_sheet(ctx: Context, table: pa.Table) -> None:
    """After the manifest: the sheet people use for caption QC (one HTML row per test image, so
    per-row Python is the sheet's own size)."""
    export_caption_sheet(ctx, table.to_pylist())


STAGE = Stage(
    name=TEST_CAPTIONS,
    plan_units=plan_test_caption_units,
    run_unit=run_test_caption_unit,
    config_keys=(TEST_CAPTIONS, "models.qwen2_vl"),
    version=CAPTION_STAGE_VERSION,
    uses_gpu=True,
    finalize=export_test_caption_sheet,
)
