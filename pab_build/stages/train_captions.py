"""Stage ``train_captions``: Qwen2-VL re-captions of every kept generated image (paper 3.2)."""

from __future__ import annotations

from ..models.captions import (
    CAPTION_STAGE_VERSION,
    TRAIN_CAPTIONS,
    caption_unit,
)
from ..manifests import read_manifest_table, sorted_by_key
from ..engine.units import Context, Stage, Unit, chunk_table_units


def plan_train_caption_units(ctx: Context) -> list[Unit]:
    # the columns of captions.image_item, read straight from the gen_pose manifest
    columns = ["sample_key", "image_path", "image_sha256"]
    items = sorted_by_key(read_manifest_table(ctx.store, "gen_pose", columns, ok_only=True))
    return chunk_table_units(TRAIN_CAPTIONS, items, ctx.cfg.train_captions.images_per_unit)


def run_train_caption_unit(ctx: Context, unit: Unit) -> list[dict]:
    return caption_unit(ctx, unit, ctx.cfg.train_captions, "no image path in the gen_pose manifest")


STAGE = Stage(
    name=TRAIN_CAPTIONS,
    plan_units=plan_train_caption_units,
    run_unit=run_train_caption_unit,
    config_keys=(TRAIN_CAPTIONS, "models.qwen2_vl"),
    version=CAPTION_STAGE_VERSION,
    uses_gpu=True,
)
