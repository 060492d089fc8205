"""Stage ``train_attributes``: action / anomaly / scene labels of the captioned training images."""

from __future__ import annotations

import pyarrow as pa

from ..models.attributes import (
    ATTRIBUTE_STAGE_VERSION,
    TRAIN_ATTRIBUTES,
    run_attribute_unit,
)
from ..shards.hard_negatives import BEHAVIOR_OF_KIND
from ..manifests import left_join, read_manifest_table, sorted_by_key
from ..engine.units import Context, Stage, Unit, chunk_table_units


def plan_train_attribute_units(ctx: Context) -> list[Unit]:
    """Training images with a caption; C is the prompt the image was generated from. An Arrow
    join: captions (ok) x generate (ok) x prompts (any status), left outer, so a caption whose
    image or prompt row is missing still becomes an item (its unit rejects it). Lookups in Arrow
    (:func:`left_join`), in the captions' key order."""
    store = ctx.store
    captioned = read_manifest_table(store, "train_captions", ["sample_key"], ok_only=True)
    generated = read_manifest_table(store, "generate", ["sample_key", "image_path", "image_sha256", "kind",
                                                        "prompt_key"], ok_only=True)
    prompts = read_manifest_table(store, "prompts", ["sample_key", "prompt"]).rename_columns(
        ["prompt_key", "source_caption"])
    behavior = pa.table({"kind": list(BEHAVIOR_OF_KIND), "behavior": list(BEHAVIOR_OF_KIND.values())})
    items = left_join(sorted_by_key(captioned), generated, "sample_key")
    items = left_join(items, prompts, "prompt_key", dictionary=True)  # one prompt for 75 images
    items = left_join(items, behavior, "kind", dictionary=True)
    items = items.select(["sample_key", "image_path", "image_sha256", "behavior", "source_caption"])
    return chunk_table_units(TRAIN_ATTRIBUTES, items, ctx.cfg.attributes.images_per_unit)


STAGE = Stage(
    name=TRAIN_ATTRIBUTES,
    plan_units=plan_train_attribute_units,
    run_unit=run_attribute_unit,
    config_keys=("attributes", "models.qwen2_vl"),
    version=ATTRIBUTE_STAGE_VERSION,
    uses_gpu=True,
)
