"""Export a build in the layout the official CMP code (github.com/Shuyu-XJTU/CMP) reads.

``DEST`` receives (``DEST`` is the official ``image_root``, e.g. ``data/PAB/``)::

    annotation/train/attr_<k>.json    JSON Lines, one record per training image of generation index k
    annotation/test/attr.json         JSON Lines, one record per test image
    annotation/pab_keys.json          ours: official ids -> sample keys, and the clip list
    train/imgs_<k>/{goal,wentrong,full}/<n>.jpg   images generated from C_n / C_a / C_a+
    test/<n>.jpg
    pose/<same path as the image>     pose maps, re-encoded as JPEG because the official
                                      loader opens ``pose/`` + the image's own ``.jpg`` path

A training record: ``image`` (relative to DEST), ``caption``, ``image_id`` (``<k>_<m>``, unique),
``hard_i`` (relative to ``DEST/train/``, as the official loader joins it), ``hard_c``, ``hard_i_id``,
``source_id`` (``<clip index>_<0|1|2>`` for n / a / a+), ``source_caption``, ``normal`` (the
action) or ``anomaly`` (the anomaly class), and ``scene``. The clip index is the clip's position
in the sorted list of clip names of the ``prompts`` manifest (all rows, so a rejection elsewhere
never renumbers the clips). A test record: ``image``, ``caption`` (a list), numeric ``image_id``,
plus ``normal``/``anomaly`` and ``scene``.

What ships is what the shards ship: the ok rows of ``train_shards`` / ``test_shards``. The hard
negative of each training image is read from its shard's ``json`` member, not recomputed. A sample
that cannot be exported (a joined row or file missing, a hard negative that is not exported or
belongs to another clip) is left out and listed with its reason in the returned summary.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from PIL import Image

from ..shards.hard_negatives import BEHAVIOR_OF_KIND
from ..manifests import OK, manifest_rel, read_manifest
from ..store import Store

log = logging.getLogger(__name__)

FOLDER_OF_KIND = {"n": "goal", "a": "wentrong", "a+": "full"}  # "wentrong": the official spelling
SOURCE_CODE_OF_KIND = {"n": 0, "a": 1, "a+": 2}
KEYS_REL = "annotation/pab_keys.json"
JPEG_QUALITY = 95


@dataclass
class ExportImage:
    """One image to export: where it comes from, where it goes, and its annotation record."""

    sample_key: str
    split: str
    image_src: str  # relative to OUT
    pose_src: str
    image_dest: str  # relative to DEST
    record: dict


def _rows(store: Store, stage: str) -> dict[str, dict]:
    if not store.exists(manifest_rel(stage)):
        raise FileNotFoundError(f"export-official needs {manifest_rel(stage)}: run the {stage} stage first")
    return {r["sample_key"]: r for r in read_manifest(store, stage)}


def _ok(rows: dict[str, dict], key: str | None) -> dict | None:
    row = rows.get(key) if key is not None else None
    return row if row is not None and row["status"] == OK else None


def _existing_files(store: Store, rels: Iterable[str]) -> set[str]:
    """Which of ``rels`` exist: one recursive listing per top-level folder, not one stat per file."""
    rels = set(rels)
    found: set[str] = set()
    prefix = store.root + "/"
    for top in sorted({r.split("/", 1)[0] for r in rels}):
        base = store.path(top)
        if store.fs.exists(base):
            found.update(p[len(prefix):] if p.startswith(prefix) else p for p in store.fs.find(base))
    return rels & found


def clip_names(store: Store) -> list[str]:
    """The sorted clip names of the ``prompts`` manifest; a clip's index here is its ``source_id`` prefix."""
    return sorted({r["clip_name"] for r in _rows(store, "prompts").values() if r.get("clip_name")})


def read_shard_metadata(store: Store, shard_rels: Iterable[str]) -> dict[str, dict]:
    """``{sample_key: json}`` of every sample in the given shards (only the json members are decoded)."""
    meta: dict[str, dict] = {}
    for rel in sorted(set(shard_rels)):
        with store.fs.open(store.path(rel), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json") and "." not in member.name[:-5]:
                    meta[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return meta


def plan_train_export(store: Store, clip_index: dict[str, int]) -> tuple[list[ExportImage], list[dict]]:
    """Training images to export and ``{sample_key, split, reason}`` for each ok shard row left out."""
    shipped = {k: r for k, r in _rows(store, "train_shards").items() if r["status"] == OK}
    generate, gen_pose = _rows(store, "generate"), _rows(store, "gen_pose")
    captions, attributes, prompts = _rows(store, "train_captions"), _rows(store, "train_attributes"), _rows(store, "prompts")
    shard_meta = read_shard_metadata(store, (r["shard"] for r in shipped.values()))

    skipped: dict[str, str] = {}
    joined: dict[str, dict] = {}
    for key in sorted(shipped):
        gen = _ok(generate, key)
        parts = {"generate": gen, "gen_pose": _ok(gen_pose, key), "train_captions": _ok(captions, key),
                 "attributes": _ok(attributes, key), "prompts": _ok(prompts, gen and gen["prompt_key"])}
        lacking = [s for s, row in parts.items() if row is None]
        meta = shard_meta.get(key)
        if lacking:
            skipped[key] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        elif gen["kind"] not in FOLDER_OF_KIND:
            skipped[key] = f"kind {gen['kind']!r} is not n, a or a+"
        elif parts["prompts"]["clip_name"] not in clip_index:
            skipped[key] = f"clip {parts['prompts']['clip_name']!r} is not in the prompts manifest"
        elif meta is None:
            skipped[key] = f"no json member for it in {shipped[key]['shard']}"
        elif not meta.get("hard_negative_key"):
            skipped[key] = f"its shard json in {shipped[key]['shard']} has no hard_negative_key"
        else:
            joined[key] = {**parts, "meta": meta}
    files = _existing_files(store, (p for j in joined.values()
                                    for p in (j["generate"]["image_path"], j["gen_pose"]["pose_path"])))
    for key in list(joined):
        missing = [p for p in (joined[key]["generate"]["image_path"], joined[key]["gen_pose"]["pose_path"])
                   if p not in files]
        if missing:
            skipped[key] = f"file missing: {', '.join(missing)}"
            del joined[key]

    # the official loader opens every hard_i: keep only samples whose negative is exported too
    while True:
        dropped = False
        for key in sorted(joined):
            neg = joined[key]["meta"]["hard_negative_key"]
            if neg not in joined:
                why = f"was left out: {skipped[neg]}" if neg in skipped else "is not among the shipped training samples"
                skipped[key] = f"hard negative {neg} {why}"
                del joined[key]
                dropped = True
            elif joined[neg]["generate"]["clip_key"] != joined[key]["generate"]["clip_key"]:
                skipped[key] = f"hard negative {neg} belongs to another clip"
                del joined[key]
                dropped = True
        if not dropped:
            break

    # positions: per generation index k, folders in goal / wentrong / full order, clips in index order
    def order(key: str) -> tuple:
        gen = joined[key]["generate"]
        kind_rank = list(FOLDER_OF_KIND).index(gen["kind"])
        return int(gen["index"]), kind_rank, clip_index[joined[key]["prompts"]["clip_name"]], key

    where: dict[str, tuple[str, str]] = {}  # key -> (path under train/, image_id)
    per_k: dict[int, int] = {}
    per_folder: dict[tuple[int, str], int] = {}
    for key in sorted(joined, key=order):
        gen = joined[key]["generate"]
        k, folder = int(gen["index"]), FOLDER_OF_KIND[gen["kind"]]
        n = per_folder.get((k, folder), 0)
        m = per_k.get(k, 0)
        per_folder[(k, folder)], per_k[k] = n + 1, m + 1
        where[key] = (f"imgs_{k}/{folder}/{n}.jpg", f"{k}_{m}")

    images = []
    for key in sorted(joined, key=order):
        j = joined[key]
        gen, meta, kind = j["generate"], j["meta"], j["generate"]["kind"]
        neg = meta["hard_negative_key"]
        path, image_id = where[key]
        record = {
            "image": f"train/{path}",
            "caption": j["train_captions"]["caption"],
            "image_id": image_id,
            "hard_i": where[neg][0],
            "hard_c": meta.get("hard_negative_caption") or "",
            "hard_i_id": where[neg][1],
            "source_id": f"{clip_index[j['prompts']['clip_name']]}_{SOURCE_CODE_OF_KIND[kind]}",
            "source_caption": j["prompts"]["prompt"],
        }
        behavior = BEHAVIOR_OF_KIND[kind]
        record[behavior] = j["attributes"]["action" if behavior == "normal" else "anomaly"]
        record["scene"] = j["attributes"]["scene"]
        images.append(ExportImage(key, "train", gen["image_path"], j["gen_pose"]["pose_path"],
                                  record["image"], record))
    return images, [{"sample_key": k, "split": "train", "reason": r} for k, r in sorted(skipped.items())]


def plan_test_export(store: Store) -> tuple[list[ExportImage], list[dict]]:
    """Test images to export (pairs in clip-name order, normal first) and the ok shard rows left out."""
    shipped = {k: r for k, r in _rows(store, "test_shards").items() if r["status"] == OK}
    frames, pose = _rows(store, "frames"), _rows(store, "pose")
    captions, attributes = _rows(store, "test_captions"), _rows(store, "test_attributes")
    skipped: dict[str, str] = {}
    joined: dict[str, dict] = {}
    for key in sorted(shipped):
        parts = {"frames": _ok(frames, key), "pose": _ok(pose, key), "test_captions": _ok(captions, key),
                 "test_attributes": _ok(attributes, key)}
        lacking = [s for s, row in parts.items() if row is None]
        if lacking:
            skipped[key] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        else:
            joined[key] = parts
    files = _existing_files(store, (p for j in joined.values()
                                    for p in (j["frames"]["image_path"], j["pose"]["pose_path"])))
    for key in list(joined):
        missing = [p for p in (joined[key]["frames"]["image_path"], joined[key]["pose"]["pose_path"]) if p not in files]
        if missing:
            skipped[key] = f"file missing: {', '.join(missing)}"
            del joined[key]

    def order(key: str) -> tuple:
        frame = joined[key]["frames"]
        return frame["clip_name"], frame["behavior"] != "normal", key

    images = []
    for n, key in enumerate(sorted(joined, key=order)):
        j = joined[key]
        behavior = j["frames"]["behavior"]
        record = {"image": f"test/{n}.jpg", "caption": [j["test_captions"]["caption"]], "image_id": n,
                  behavior: j["test_attributes"]["action" if behavior == "normal" else "anomaly"],
                  "scene": j["test_attributes"]["scene"]}
        images.append(ExportImage(key, "test", j["frames"]["image_path"], j["pose"]["pose_path"],
                                  record["image"], record))
    return images, [{"sample_key": k, "split": "test", "reason": r} for k, r in sorted(skipped.items())]


def as_jpeg(data: bytes, what: str) -> bytes:
    """JPEG bytes as they are, anything else PIL reads re-encoded as an RGB JPEG."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    except Exception as e:  # PIL raises several types for bad data
        raise ValueError(f"{what} is not a readable image: {e}") from None
    return buf.getvalue()


def _copy_image(src: Store, dst: Store, image: ExportImage) -> None:
    dst.write_bytes(image.image_dest, as_jpeg(src.read_bytes(image.image_src), image.image_src))
    dst.write_bytes(f"pose/{image.image_dest}", as_jpeg(src.read_bytes(image.pose_src), image.pose_src))


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def export_official(out: str, dest: str, workers: int = 8) -> dict:
    """Write build ``out`` in the official CMP layout under ``dest`` (local path or fsspec URL).

    Exports the splits whose shard manifest exists. Returns a summary: counts, the annotation
    files written and every shipped sample left out with its reason. Files in ``dest`` are
    overwritten; use an empty folder per export.
    """
    src, dst = Store(out), Store(dest)
    has = {split: src.exists(manifest_rel(f"{split}_shards")) for split in ("train", "test")}
    if not any(has.values()):
        raise FileNotFoundError(f"{src.url_root} has neither {manifest_rel('train_shards')} nor "
                                f"{manifest_rel('test_shards')}: build the shards before exporting")
    clips = clip_names(src) if has["train"] else []
    clip_index = {name: i for i, name in enumerate(clips)}
    train, train_skipped = plan_train_export(src, clip_index) if has["train"] else ([], [])
    test, test_skipped = plan_test_export(src) if has["test"] else ([], [])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda im: _copy_image(src, dst, im), train + test))

    written = []
    by_k: dict[int, list[dict]] = {}
    for im in train:
        by_k.setdefault(int(im.record["image_id"].split("_")[0]), []).append(im.record)
    for k in sorted(by_k):
        rel = f"annotation/train/attr_{k}.json"
        dst.write_text(rel, _jsonl(by_k[k]))
        written.append(rel)
    if has["test"]:
        dst.write_text("annotation/test/attr.json", _jsonl(im.record for im in test))
        written.append("annotation/test/attr.json")
    dst.write_json(KEYS_REL, {
        "clips": clips,
        "train": {im.record["image_id"]: im.sample_key for im in train},
        "test": {str(im.record["image_id"]): im.sample_key for im in test},
    })
    skipped = train_skipped + test_skipped
    for s in skipped:
        log.warning("export-official: left out %s sample %s: %s", s["split"], s["sample_key"], s["reason"])
    log.info("export-official: %d training and %d test images written to %s", len(train), len(test), dst.url_root)
    return {
        "dest": dst.url_root,
        "clips": len(clips),
        "train_images": len(train),
        "test_images": len(test),
        "generation_indices": sorted(by_k),
        "annotation_files": written,
        "skipped": skipped,
    }
