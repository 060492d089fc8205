"""Stage ``test_shards``: the real-world test set as WebDataset shards, a pair never split."""

from __future__ import annotations

from ..manifests import OK, manifest_rel
from ..shards.pairing import other_behavior
from ..shards.index import finalize_shards
from ..shards.packing import (
    attach_file_sizes,
    attribute_fields,
    ok_row,
    pack_units,
    rows_by_key,
    split_models,
    why_dropped,
    write_shard_unit,
)
from ..shards.writer import SPLIT_MODELS, key_problem
from ..engine.units import Context, Stage, Unit
from .frames import sample_key as frame_sample_key

# the test branch in order; review may key its rows by image or by clip (and may be absent)
_TEST_UPSTREAM = ("frames", "pose", "pairs", "review", "test_captions", "test_attributes")


def plan_test_shards(ctx: Context) -> list[Unit]:
    store, cfg, stage = ctx.store, ctx.cfg, "test_shards"
    manifests = {s: rows_by_key(store, s, stage) for s in _TEST_UPSTREAM
                 if s != "review" or store.exists(manifest_rel(s))}
    models = split_models(cfg, "test")
    items: list[dict] = []
    for key in sorted(k for k, r in manifests["test_attributes"].items() if r["status"] == OK):
        joined = {s: ok_row(manifests[s], key) for s in ("frames", "pose", "pairs", "test_captions")}
        frame = joined["frames"] or {}
        if "review" in manifests:  # a pair a reviewer rejected never ships, whatever ran after
            joined["review"] = ok_row(manifests["review"], key) or ok_row(manifests["review"], frame.get("clip_key", ""))
        item = {"sample_key": key, "clip_key": frame.get("clip_key"), "behavior": frame.get("behavior")}
        lacking = [s for s, row in joined.items() if row is None]
        if lacking:
            item["reject"] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        elif problem := key_problem(key):
            item["reject"] = problem
        elif key != frame_sample_key(frame["clip_key"], frame["behavior"]):  # pairs are found by this rule
            item["reject"] = (f"sample key {key!r} is not <clip_key>-<behavior> "
                              f"({frame_sample_key(frame['clip_key'], frame['behavior'])!r})")
        else:
            cap, pose, pair = joined["test_captions"], joined["pose"], joined["pairs"]
            item.update({
                "files": {"jpg": frame["image_path"], "pose.png": pose["pose_path"]},
                # upstream hashes: a changed image changes this unit's input hash, so it is rewritten
                "sha256": {"jpg": frame["image_sha256"], "pose.png": pose["pose_sha256"]},
                "txt": cap["caption"],
                "json": {
                    "sample_key": key, "clip_name": frame["clip_name"], "identity": frame["clip_key"],
                    "behavior": frame["behavior"], "time_s": frame["time_s"], "pair_key": pair["pair_key"],
                    "source_caption": frame["source_caption"],
                    "attributes": attribute_fields(manifests["test_attributes"][key]),
                    "models": models, "prompt_version": cap["prompt_version"],
                },
            })
        items.append(item)
    attach_file_sizes(store, items)

    # both images of a pair, or neither
    ok = {it["sample_key"]: it for it in items if "reject" not in it}
    planned_rejects = {it["sample_key"]: it["reject"] for it in items if "reject" in it}
    groups: dict[str, list[dict]] = {}
    for it in ok.values():
        groups.setdefault(it["clip_key"], []).append(it)
    complete = []
    for identity, group in sorted(groups.items()):
        for it in group:
            other = frame_sample_key(identity, other_behavior(it["behavior"]))
            if other not in ok:
                why = why_dropped(other, identity, manifests, stage, planned_rejects)
                it["reject"] = f"counterpart {other} {why}"
        if all("reject" not in it for it in group):
            complete.append(group)
    rejected = [it for it in items if "reject" in it]
    return pack_units(stage, complete, rejected, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)


# -- the stages -------------------------------------------------------------------------------
def run_test_shards_unit(ctx: Context, unit: Unit) -> list[dict]:
    return write_shard_unit(ctx, unit, "test")


def finalize_test_shards(ctx: Context, table) -> None:
    finalize_shards(ctx, table, "test")


STAGE = Stage(
    name="test_shards",
    plan_units=plan_test_shards,
    run_unit=run_test_shards_unit,
    config_keys=("shards", *(f"models.{m}" for m in SPLIT_MODELS["test"])),
    finalize=finalize_test_shards,
)
