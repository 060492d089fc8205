"""Stage ``pairs``: drop test pairs whose normal and anomaly frames look alike (ResNet-50 cosine)."""

from __future__ import annotations

from PIL import Image

from ..config import model_path
from ..manifests import keep, ok_rows, reject
from ..shards.pairing import pair_problem
from ..models.similarity import (
    embed_images,
    load_resnet50,
    pair_cosines,
    similarity_problem,
)
from ..engine.units import Context, Stage, Unit, chunk_units


# -- stage ----------------------------------------------------------------------------------------
def plan_pairs_units(ctx: Context) -> list[Unit]:
    items = [{"sample_key": r["sample_key"], "clip_key": r["clip_key"], "behavior": r["behavior"],
              "image_path": r["image_path"], "image_sha256": r["image_sha256"]}
             for r in sorted(ok_rows(ctx.store, "pose", ["sample_key", "clip_key", "behavior", "image_path",
                                                          "image_sha256"]), key=lambda r: r["sample_key"])]
    return chunk_units("pairs", items, ctx.cfg.pairs.clips_per_unit, group_key="clip_key")


def run_pairs_unit(ctx: Context, unit: Unit) -> list[dict]:
    cfg, sec = ctx.cfg, ctx.cfg.pairs
    by_clip: dict[str, dict[str, dict]] = {}
    for it in unit.items:
        by_clip.setdefault(it["clip_key"], {})[it["behavior"]] = it
    rows: dict[str, dict] = {}

    def row(it: dict, reason: str | None, pair_key: str | None, cosine: float | None) -> dict:
        fields = {"clip_key": it["clip_key"], "behavior": it["behavior"], "pair_key": pair_key, "cosine": cosine}
        if reason is not None:
            return reject(it, reason, **fields)
        return keep(it, **fields)

    pairs: list[tuple[dict, dict, Image.Image, Image.Image]] = []
    for clip_key, frames in sorted(by_clip.items()):
        normal, anomaly = frames.get("normal"), frames.get("anomaly")
        if problem := pair_problem(clip_key, frames, "no counterpart: pose kept only"):
            for it in frames.values():
                rows[it["sample_key"]] = row(it, problem, None, None)
            continue
        images, unreadable = {}, {}
        for it in (normal, anomaly):
            try:
                images[it["sample_key"]] = ctx.store.read_image(it["image_path"])
            except Exception as e:  # noqa: BLE001 - a missing or corrupt file rejects this pair only
                unreadable[it["sample_key"]] = f"image unreadable: {it['image_path']}: {type(e).__name__}"
        if unreadable:
            for it, other in ((normal, anomaly), (anomaly, normal)):
                why = (unreadable.get(it["sample_key"])
                       or f"counterpart {other['sample_key']} {unreadable[other['sample_key']]}")
                rows[it["sample_key"]] = row(it, why, other["sample_key"], None)
            continue
        pairs.append((normal, anomaly, images[normal["sample_key"]], images[anomaly["sample_key"]]))

    if pairs:
        model = load_resnet50(model_path(cfg, "resnet50"), cfg.run.device)
        feats = embed_images([p[2] for p in pairs] + [p[3] for p in pairs], model, sec.image_size,
                             sec.batch_size, cfg.run.device)
        cosines = pair_cosines(feats[: len(pairs)], feats[len(pairs):])
        for (normal, anomaly, _, _), cosine in zip(pairs, cosines):
            why = similarity_problem(cosine, sec.max_cosine)
            rows[normal["sample_key"]] = row(normal, why, anomaly["sample_key"], cosine)
            rows[anomaly["sample_key"]] = row(anomaly, why, normal["sample_key"], cosine)
    return [rows[k] for k in unit.sample_keys]


STAGE = Stage(
    name="pairs",
    plan_units=plan_pairs_units,
    run_unit=run_pairs_unit,
    config_keys=("pairs", "models.resnet50"),
    uses_gpu=True,
)
