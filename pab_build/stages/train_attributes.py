"""Stage ``train_attributes``: action / anomaly / scene labels of the captioned training images."""

from __future__ import annotations

from ..attributes import (
    ATTRIBUTE_STAGE_VERSION,
    TRAIN_ATTRIBUTES,
    run_attribute_unit,
)
from ..hard_negatives import BEHAVIOR_OF_KIND
from ..manifests import ok_rows, read_manifest
from ..units import Context, Stage, Unit, chunk_units


def plan_train_attribute_units(ctx: Context) -> list[Unit]:
    """Training images with a caption; C is the prompt the image was generated from."""
    generated = {r["sample_key"]: r for r in ok_rows(ctx.store, "generate")}
    prompts = {r["sample_key"]: r for r in read_manifest(ctx.store, "prompts")}
    items = []
    for r in ok_rows(ctx.store, "train_captions"):
        g = generated.get(r["sample_key"], {})
        p = prompts.get(g.get("prompt_key"), {})
        items.append({
            "sample_key": r["sample_key"],
            "image_path": g.get("image_path"),
            "image_sha256": g.get("image_sha256"),
            "behavior": BEHAVIOR_OF_KIND.get(g.get("kind")),
            "source_caption": p.get("prompt"),
        })
    items.sort(key=lambda it: it["sample_key"])
    return chunk_units(TRAIN_ATTRIBUTES, items, ctx.cfg.attributes.images_per_unit)


STAGE = Stage(
    name=TRAIN_ATTRIBUTES,
    plan_units=plan_train_attribute_units,
    run_unit=run_attribute_unit,
    config_keys=("attributes", "models.qwen2_vl"),
    version=ATTRIBUTE_STAGE_VERSION,
    uses_gpu=True,
)
