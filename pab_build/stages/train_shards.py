"""Stage ``train_shards``: the synthetic training set as WebDataset shards, with identity hard negatives."""

from __future__ import annotations

from ..hard_negatives import BEHAVIOR_OF_KIND, choose_hard_negatives
from ..manifests import OK
from ..shard_index import finalize_shards
from ..shard_packing import (
    attach_file_sizes,
    attribute_fields,
    fit_problem,
    ok_row,
    pack_units,
    rows_by_key,
    split_models,
    write_shard_unit,
)
from ..shard_writer import SPLIT_MODELS, key_problem
from ..units import Context, Stage, Unit


def _link_hard_negatives(items: list[dict], max_samples: int, max_bytes: int) -> None:
    """Give every shippable training item its hard negative (or reject it). Links are chosen only
    among items that will be shipped; an item too big for a shard is dropped first, and the links
    are chosen again until nothing more drops (each round only removes items)."""
    while True:
        shipped = [it for it in items if "reject" not in it]
        links = choose_hard_negatives(shipped)
        by_key = {it["sample_key"]: it for it in shipped}
        for it in shipped:
            neg = links[it["sample_key"]]
            if neg is None:
                it["reject"] = "no counterpart image of the same identity"
            else:
                it["json"].update(hard_negative_key=neg, hard_negative_caption=by_key[neg]["txt"])
        too_big = [(it, why) for it in shipped if "reject" not in it
                   if (why := fit_problem([it], max_samples, max_bytes))]
        if not too_big:
            return
        for it, why in too_big:
            it["reject"] = why


def plan_train_shards(ctx: Context) -> list[Unit]:
    store, cfg, stage = ctx.store, ctx.cfg, "train_shards"
    attributes = rows_by_key(store, "train_attributes", stage)
    generated = rows_by_key(store, "generate", stage)
    gen_pose = rows_by_key(store, "gen_pose", stage)
    captions = rows_by_key(store, "train_captions", stage)
    prompts = rows_by_key(store, "prompts", stage)
    models = split_models(cfg, "train")
    items: list[dict] = []
    for key in sorted(k for k, r in attributes.items() if r["status"] == OK):
        gen = ok_row(generated, key)
        joined = {"generate": gen, "gen_pose": ok_row(gen_pose, key), "train_captions": ok_row(captions, key),
                  "prompts": ok_row(prompts, gen["prompt_key"]) if gen else None}
        item = {"sample_key": key, "clip_key": gen and gen["clip_key"], "kind": gen and gen["kind"]}
        lacking = [s for s, row in joined.items() if row is None]
        if lacking:
            item["reject"] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        elif problem := key_problem(key):
            item["reject"] = problem
        elif gen["kind"] not in BEHAVIOR_OF_KIND:
            item["reject"] = f"kind {gen['kind']!r} is not n, a or a+"
        else:
            cap, pose, prompt = joined["train_captions"], joined["gen_pose"], joined["prompts"]
            behavior = BEHAVIOR_OF_KIND[gen["kind"]]
            item.update({
                "behavior": behavior, "index": gen["index"],
                "files": {"jpg": gen["image_path"], "pose.png": pose["pose_path"]},
                "sha256": {"jpg": gen["image_sha256"], "pose.png": pose["pose_sha256"]},
                "txt": cap["caption"],
                "json": {
                    "sample_key": key, "identity": gen["clip_key"], "clip_name": prompt["clip_name"],
                    "kind": gen["kind"], "behavior": behavior, "source_caption": prompt["prompt"],
                    "seed": gen["seed"], "models": models, "attributes": attribute_fields(attributes[key]),
                    "prompt_version": cap["prompt_version"],
                    "hard_negative_key": None, "hard_negative_caption": None,  # set below
                },
            })
        items.append(item)
    attach_file_sizes(store, items)  # a sample whose files are missing is no one's hard negative
    _link_hard_negatives(items, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)
    groups = [[it] for it in items if "reject" not in it]
    rejected = [it for it in items if "reject" in it]
    return pack_units(stage, groups, rejected, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)


def run_train_shards_unit(ctx: Context, unit: Unit) -> list[dict]:
    return write_shard_unit(ctx, unit, "train")


def finalize_train_shards(ctx: Context, table) -> None:
    finalize_shards(ctx, table, "train")


STAGE = Stage(
    name="train_shards",
    plan_units=plan_train_shards,
    run_unit=run_train_shards_unit,
    config_keys=("shards", *(f"models.{m}" for m in SPLIT_MODELS["train"])),
    finalize=finalize_train_shards,
)
