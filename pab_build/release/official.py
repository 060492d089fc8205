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

Images that are JPEGs already are hard-linked from a local OUT into a local DEST on the same file
system (``--copy``: copies), so a full-size export costs ~2M links, not ~300 GB of copies.

What ships is what the shards ship: the ok rows of ``train_shards`` / ``test_shards``. The hard
negative of each training image is read from its shard's ``json`` member, not recomputed. A sample
that cannot be exported (a joined row or file missing, a hard negative that is not exported or
belongs to another clip) is left out and listed with its reason in the returned summary.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from PIL import Image

import pyarrow as pa

from ..manifests import OK, manifest_rel
from ..store import Store
from .official_train import (FOLDER_OF_KIND, SOURCE_CODE_OF_KIND, clip_names, existing_files,  # noqa: F401
                             manifest_table, plan_train_export, train_records)

log = logging.getLogger(__name__)

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
    """Every row of a (test-sized: a few thousand rows) manifest, by key."""
    return {r["sample_key"]: r for r in manifest_table(store, stage).to_pylist()}


def _ok(rows: dict[str, dict], key: str | None) -> dict | None:
    row = rows.get(key) if key is not None else None
    return row if row is not None and row["status"] == OK else None


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
    wanted = sorted({p for j in joined.values() for p in (j["frames"]["image_path"], j["pose"]["pose_path"])})
    files = {p for p, ok in zip(wanted, existing_files(store, pa.array(wanted, pa.string()))) if ok}
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


def _copy_image(src: Store, dst: Store, image: ExportImage, link: bool) -> None:
    _place(src, dst, image.image_src, image.image_dest, link)
    _place(src, dst, image.pose_src, f"pose/{image.image_dest}", link)


_process_stores: tuple[Store, Store, bool] | None = None  # a copying process's OUT, DEST and link choice


def _start_copier(out: str, dest: str, link: bool) -> None:
    global _process_stores
    _process_stores = (Store(out), Store(dest), link)


def _copy_paths(paths: list[tuple[str, str, str]]) -> None:
    src, dst, link = _process_stores
    for image_src, pose_src, image_dest in paths:
        _place(src, dst, image_src, image_dest, link)
        _place(src, dst, pose_src, f"pose/{image_dest}", link)


class _Copier:
    """Copies (or links) images: into a local DEST by one process per core, since threads under the
    GIL cost 2-3x the CPU per file of a single thread (measured on 2 cores: 215 vs 470-610 us an
    image); into an object store by threads, whose time is network waits."""

    CHUNK = 2_500

    def __init__(self, src: Store, dst: Store, link: bool, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.src, self.dst, self.link = src, dst, link
        if dst.is_local and src.is_local:
            # forkserver: the planning process holds Arrow's threads and ~1.4 GB of tables at full size
            self.pool = ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0)),
                                            mp_context=multiprocessing.get_context("forkserver"),
                                            initializer=_start_copier, initargs=(src.url_root, dst.url_root, link))
            self.local = True
        else:
            self.pool, self.local = ThreadPoolExecutor(max_workers=max(1, workers)), False

    def copy(self, images: list[ExportImage]) -> None:
        if not self.local:
            list(self.pool.map(lambda im: _copy_image(self.src, self.dst, im, self.link), images))
            return
        paths = [(im.image_src, im.pose_src, im.image_dest) for im in images]
        list(self.pool.map(_copy_paths, [paths[i:i + self.CHUNK] for i in range(0, len(paths), self.CHUNK)]))

    def __enter__(self) -> "_Copier":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)


def _place(src: Store, dst: Store, rel_src: str, rel_dest: str, link: bool) -> None:
    """A JPEG that is a regular file of a local OUT is hard-linked into a local DEST on the same file
    system (at full size ~2M files and ~300 GB: no second copy; the build never rewrites a file in
    place, it renames a new one over it, so the export keeps its bytes). Anything else, or where a
    link fails (another file system, the link limit), is copied, re-encoded as JPEG when it is not one:
    renamed into place without a per-file fsync (~10 ms each): one sync at the end."""
    if link and src.is_local and dst.is_local and _link_jpeg(src.path(rel_src), dst.path(rel_dest)):
        return
    dst.write_bytes(rel_dest, as_jpeg(src.read_bytes(rel_src), rel_src), durable=False)


def _link_jpeg(path: str, target: str) -> bool:
    import stat
    import uuid

    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a symlink is read (and copied) like any file, never linked
            return False
        with open(path, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":
                return False
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.link-{uuid.uuid4().hex[:8]}"
        os.link(path, tmp)
    except OSError:  # EXDEV, EMLINK, EPERM...: copied instead
        return False
    try:
        os.replace(tmp, target)
    except OSError:
        os.unlink(tmp)
        return False
    return True


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _keys_json(clips: list[str], train: pa.Table | None, test: list[ExportImage]) -> str:
    """``annotation/pab_keys.json`` as ``Store.write_json`` writes it (indent 2, sorted keys), with
    the training ids (one per exported image) rendered a slice at a time."""
    train_text = "{}"
    if train is not None and train.num_rows:
        ids = train.select(["image_id", "sample_key"]).sort_by("image_id")
        lines = []
        for start in range(0, ids.num_rows, 65536):
            chunk = ids.slice(start, 65536)
            lines += [f"    {json.dumps(i)}: {json.dumps(k, ensure_ascii=False)}"
                      for i, k in zip(chunk["image_id"].to_pylist(), chunk["sample_key"].to_pylist())]
        train_text = "{\n" + ",\n".join(lines) + "\n  }"
    placeholder = "\u0000train\u0000"
    text = json.dumps({"clips": clips, "train": placeholder,
                       "test": {str(im.record["image_id"]): im.sample_key for im in test}},
                      indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return text.replace(json.dumps(placeholder), train_text, 1)


def export_official(out: str, dest: str, workers: int = 8, link: bool = True) -> dict:
    """Write build ``out`` in the official CMP layout under ``dest`` (local path or fsspec URL).

    Exports the splits whose shard manifest exists. JPEGs are hard-linked where both are local on
    one file system, unless ``link`` is False (then every file is a copy). A local export copies with
    one process per CPU; ``workers`` threads copy into an object store. Returns a summary: counts, the annotation
    files written and every shipped sample left out with its reason. Files in ``dest`` are
    overwritten; use an empty folder per export.
    """
    src, dst = Store(out), Store(dest)
    has = {split: src.exists(manifest_rel(f"{split}_shards")) for split in ("train", "test")}
    if not any(has.values()):
        raise FileNotFoundError(f"{src.url_root} has neither {manifest_rel('train_shards')} nor "
                                f"{manifest_rel('test_shards')}: build the shards before exporting")
    started = time.perf_counter()
    clips = clip_names(src) if has["train"] else []
    train, train_skipped = plan_train_export(src, clips) if has["train"] else (None, [])
    test, test_skipped = plan_test_export(src) if has["test"] else ([], [])
    log.info("export-official: planned %d training and %d test images in %.1f s; copying them",
             train.num_rows if train is not None else 0, len(test), time.perf_counter() - started)

    written: list[str] = []
    ks: list[int] = []
    lines: list[str] = []

    def flush() -> None:  # one attr_<k>.json per generation index, written once all its records are in
        rel = f"annotation/train/attr_{ks[-1]}.json"
        dst.write_text(rel, "".join(lines))
        written.append(rel)
        lines.clear()

    with _Copier(src, dst, link, workers) as copier:
        for k, items in train_records(train) if train is not None else ():  # a slice of images at a time
            copier.copy([ExportImage(key, "train", image, pose, rec["image"], rec) for key, image, pose, rec in items])
            if ks and k != ks[-1]:
                flush()
            if not ks or k != ks[-1]:
                ks.append(k)
            lines.append(_jsonl(rec for *_, rec in items))
        if ks:
            flush()
        copier.copy(test)
    if dst.is_local:
        os.sync()  # the images written without an fsync each, on disk before the annotations that name them
    if has["test"]:
        dst.write_text("annotation/test/attr.json", _jsonl(im.record for im in test))
        written.append("annotation/test/attr.json")
    dst.write_text(KEYS_REL, _keys_json(clips, train, test))
    skipped = train_skipped + test_skipped
    for s in skipped:
        log.warning("export-official: left out %s sample %s: %s", s["split"], s["sample_key"], s["reason"])
    n_train = train.num_rows if train is not None else 0
    log.info("export-official: %d training and %d test images written to %s", n_train, len(test), dst.url_root)
    return {
        "dest": dst.url_root,
        "clips": len(clips),
        "train_images": n_train,
        "test_images": len(test),
        "generation_indices": ks,
        "annotation_files": written,
        "skipped": skipped,
    }
