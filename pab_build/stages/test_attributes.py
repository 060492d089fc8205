"""Stage ``test_attributes``: action / anomaly / scene labels of the captioned test images."""

from __future__ import annotations

from ..models.attributes import (
    ATTRIBUTE_STAGE_VERSION,
    TEST_ATTRIBUTES,
    run_attribute_unit,
)
from ..manifests import ok_rows
from ..engine.units import Context, Stage, Unit, chunk_units


# -- planning -------------------------------------------------------------------------------------
def plan_test_attribute_units(ctx: Context) -> list[Unit]:
    """Test images with an accepted caption; C is the OOPS! caption stored with the frame."""
    columns = ["sample_key", "image_path", "image_sha256", "behavior", "source_caption"]
    frames = {r["sample_key"]: r for r in ok_rows(ctx.store, "frames", columns)}
    items = []
    for r in ok_rows(ctx.store, "test_captions", ["sample_key"]):
        f = frames.get(r["sample_key"], {})
        items.append({
            "sample_key": r["sample_key"],
            "image_path": f.get("image_path"),
            "image_sha256": f.get("image_sha256"),
            "behavior": f.get("behavior"),
            "source_caption": f.get("source_caption"),
        })
    items.sort(key=lambda it: it["sample_key"])
    return chunk_units(TEST_ATTRIBUTES, items, ctx.cfg.attributes.images_per_unit)


STAGE = Stage(
    name=TEST_ATTRIBUTES,
    plan_units=plan_test_attribute_units,
    run_unit=run_attribute_unit,
    config_keys=("attributes", "models.qwen2_vl"),
    version=ATTRIBUTE_STAGE_VERSION,
    uses_gpu=True,
)
