"""CMP data: a WebDataset pipeline over the training shards and a reader for the test shards.

Shards may be local folders or fsspec URLs (``s3://...``). Each training sample carries the key
and caption of its identity counterpart (``hard_negative_key``/``hard_negative_caption``); IHNM
also needs the counterpart's *image*: :mod:`pab_build.cmp.pairing_stream` takes it from the stream
itself (an identity's samples are contiguous in the shards), with random access only as a
counted fallback. No per-sample index is held: the epoch's length comes from ``shards/index.json``.

Augmentation (paper B.1) is seeded per (seed, epoch, sample key): the same sample gets the same
flip / erasing / text edit in an uninterrupted and in a resumed run, whatever the worker count.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import fsspec
import numpy as np
import torch
from PIL import Image

from pab_build.cmp.pairing_stream import (  # noqa: F401 - re-exported: the old random-access API
    MemberIndex, MemberRef, ShardSet, build_member_index, index_paired_samples, open_streams, paired_samples,
    split_member)
from pab_build.cmp.text_augment import eda, pre_caption, wordnet_synonyms  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

IMAGE_EXT, POSE_EXT, TEXT_EXT, JSON_EXT = "jpg", "pose.png", "txt", "json"


# -- shards -----------------------------------------------------------------------------------
def list_shards(source: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Sorted shard URLs of ``split`` under a build's output root (``<root>/shards/<split>/``),
    a ``shards`` folder, or the split folder itself."""
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/")
    for pattern in (f"{root}/shards/{split}/{split}-*.tar", f"{root}/{split}/{split}-*.tar", f"{root}/{split}-*.tar"):
        found = sorted(fs.glob(pattern))
        if found:
            return [fs.unstrip_protocol(p) if "://" in source else p for p in found]
    raise FileNotFoundError(f"no {split} shards ({split}-NNNNNN.tar) under {source!r}")


def in_fraction(key: str, fraction: float) -> bool:
    """Deterministic subset by key hash; the 10% subset is inside the 25% one, and so on."""
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def sample_id(key: str) -> int:
    """A stable integer per sample (ITM's "same sample" test compares them), from the key alone."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 1


def _index_counts(urls: list[str], storage_options: dict) -> int | None:
    """Samples in ``urls`` by the build's ``shards/index.json`` (next to the split's folder), if it
    lists every one of them."""
    fs, first = fsspec.core.url_to_fs(urls[0], **storage_options)
    split_dir = os.path.dirname(first)
    index = f"{os.path.dirname(split_dir)}/index.json"
    if not fs.exists(index):
        return None
    split = os.path.basename(split_dir)
    listed = {e["path"].rsplit("/", 1)[-1]: e.get("samples")
              for e in json.loads(fs.cat_file(index)).get("splits", {}).get(split, {}).get("shards", [])}
    counts = [listed.get(u.rsplit("/", 1)[-1]) for u in urls]
    return None if any(c is None for c in counts) else sum(counts)


def _manifest_keys(urls: list[str], storage_options: dict) -> list[str] | None:
    """The ok sample keys of ``urls`` in the build's ``manifests/<split>_shards.parquet`` (Arrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, first = fsspec.core.url_to_fs(urls[0], **storage_options)
    split_dir = os.path.dirname(first)
    manifest = f"{os.path.dirname(os.path.dirname(split_dir))}/manifests/{os.path.basename(split_dir)}_shards.parquet"
    if not fs.exists(manifest):
        return None
    with fs.open(manifest, "rb") as f:
        t = pq.read_table(f, columns=["sample_key", "status", "shard"])
    names = pc.replace_substring_regex(t["shard"], r"^.*/", "")  # matched by file name
    mine = pc.is_in(names, value_set=pa.array([u.rsplit("/", 1)[-1] for u in urls]))
    return t.filter(pc.and_(pc.equal(t["status"], "ok"), mine))["sample_key"].to_pylist()


def _header_keys(urls: list[str], storage_options: dict) -> Iterator[str]:
    """Sample keys from the tar headers (slow over an object store: the last resort)."""
    for url in urls:
        last = None
        with fsspec.open(url, "rb", **storage_options) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                key = split_member(info.name)[0]
                if info.isfile() and key != last:
                    last = key
                    yield key


def count_samples(urls: list[str], fraction: float, storage_options: dict | None = None) -> int:
    """Samples of ``urls`` in the ``fraction`` subset: from ``shards/index.json`` (all samples), the
    shard manifest's key column (a subset), else by reading the tar headers."""
    so = storage_options or {}
    if fraction >= 1 and (n := _index_counts(urls, so)) is not None:
        return n
    keys = _manifest_keys(urls, so) if fraction < 1 else None
    if keys is None:
        log.warning("counting the training samples from the tar headers of %d shards", len(urls))
        keys = _header_keys(urls, so)
    return sum(in_fraction(k, fraction) for k in keys)


def sample_rng(seed: int, epoch: int, key: str, purpose: str = "") -> random.Random:
    h = hashlib.sha256(f"{seed}:{epoch}:{key}:{purpose}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


# -- augmentation ----------------------------------------------------------------------------
@dataclass
class ImageTransform:
    """Resize to size x size, ImageNet-style normalisation (the Swin processor's mean/std)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_tensor(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


def random_erase(x: torch.Tensor, rng: random.Random, probability: float) -> torch.Tensor:
    """Random erasing (Zhong et al.) with the official parameters (``dataset/random_erasing.py``):
    one rectangle of 2-40% of the area, aspect 0.3-3.3, set to 0 (the mean after normalisation)."""
    if rng.random() >= probability:
        return x
    _, h, w = x.shape
    for _ in range(100):
        area = rng.uniform(0.02, 0.4) * h * w
        ratio = rng.uniform(0.3, 1 / 0.3)
        eh, ew = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            x = x.clone()
            x[:, top:top + eh, left:left + ew] = 0
            return x
    return x


# -- training pipeline -----------------------------------------------------------------------
def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@dataclass
class TrainData:
    """The training shards of one run: the pipeline of each epoch and its length in steps."""

    urls: list[str]  # in key order (as list_shards gives them): a shard's neighbours complete its identities
    transform: ImageTransform
    batch_size: int
    fraction: float = 1.0
    seed: int = 0
    erasing_probability: float = 0.6
    eda_probability: float = 0.5
    eda_stream: bool = False  # True: keep the caption, put its EDA edit in a second stream ("eda_text")
    synonyms: Callable[[str], list[str]] | None = None  # WordNet synonyms for EDA
    caption_words: int | None = None  # official pre_caption with this many words; None = caption as written
    pose_augment: str = "shared"  # "own": the pose map gets its own flip and erasing (official)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    load_counterparts: bool = True
    rank: int = 0
    world_size: int = 1
    storage_options: dict = field(default_factory=dict)
    skipped: int = 0  # samples dropped for undecodable members (logged)
    sample_count: int | None = None  # samples in the fraction; counted on first use
    pairing: str = "stream"  # "index": the old loader (every counterpart by random access), the reference

    def __post_init__(self):
        self.shards = ShardSet(self.urls, self.storage_options)
        self.index = build_member_index(self.urls, self.storage_options) if self.pairing == "index" else None

    @property
    def num_samples(self) -> int:
        if self.sample_count is None:
            self.sample_count = count_samples(self.urls, self.fraction, self.storage_options)
        return self.sample_count

    @property
    def steps_per_epoch(self) -> int:
        per_rank = self.num_samples // self.world_size
        if per_rank == 0:
            raise ValueError(f"train_fraction={self.fraction} leaves no training samples in {len(self.urls)} shards")
        # full batches only (steady shapes); each worker may end on a partial batch that is dropped
        workers = max(1, self.num_workers)
        return max(1, per_rank // self.batch_size - (workers - 1))

    def pipeline(self, epoch: int, decode: bool = True):
        """The epoch's batches; ``decode=False``: lists of raw samples with their counterparts'
        bytes (what ``bench/bench_cmp_data.py`` times against plain webdataset reading)."""
        import webdataset as wds

        urls = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
        n_full = self.num_samples // self.world_size >= self.batch_size
        stages = [wds.SimpleShardList(urls), wds.split_by_worker, self._paired,
                  wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.seed * 7919 + epoch),
                  self._this_rank]
        if not decode:
            return wds.DataPipeline(*stages, wds.batched(self.batch_size, collation_fn=list, partial=not n_full))
        return wds.DataPipeline(
            *stages,
            wds.map(lambda s: self.decode(s, epoch)),
            wds.select(lambda s: s is not None),
            wds.batched(self.batch_size, collation_fn=collate_train, partial=not n_full),
        )

    def _paired(self, shards):
        """Each shard's samples in the fraction, in shard order, with their counterparts' bytes."""
        select = None if self.fraction >= 1 else partial(in_fraction, fraction=self.fraction)
        if self.index is not None:
            yield from index_paired_samples([s["url"] for s in shards], self.index, select, self.storage_options)
            return
        for shard in shards:
            yield from paired_samples(shard["url"], self.shards, select, self.load_counterparts)

    def _this_rank(self, samples):
        for i, s in enumerate(samples):
            if i % self.world_size == self.rank:
                yield s

    def loader(self, epoch: int, decode: bool = True) -> torch.utils.data.DataLoader:
        # a dedicated generator: creating the iterator must not draw from torch's global RNG
        return torch.utils.data.DataLoader(self.pipeline(epoch, decode), batch_size=None, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed + epoch))

    def decode(self, sample: dict, epoch: int) -> dict | None:
        key = sample["__key__"]
        try:
            meta = json.loads(sample[JSON_EXT])
            image, pose = self._pictures(sample[IMAGE_EXT], sample[POSE_EXT], epoch, key)
            text = self.caption(sample[TEXT_EXT].decode("utf-8"))
            edited = eda(text, sample_rng(self.seed, epoch, key, "text"), self.eda_probability, synonyms=self.synonyms)
            out = {"key": key, "position": sample_id(key), "image": image, "pose": pose,
                   "text": text if self.eda_stream else edited, "eda_text": edited if self.eda_stream else None,
                   "hard": None, "reads": sample.get("__reads__") or {}}
            if self.load_counterparts:
                out["hard"] = self._counterpart(meta, epoch, sample.get("__hard__"))
            return out
        except Exception as e:  # noqa: BLE001 - one bad sample must not stop a 4-day run
            self.skipped += 1
            log.warning("skipping training sample %s: %s", key, e)
            return None

    def caption(self, text: str) -> str:
        text = text.strip()
        if self.caption_words is None:
            return text
        cleaned = pre_caption(text, self.caption_words)
        if not cleaned:
            raise ValueError(f"pre_caption leaves nothing of {text!r}")
        return cleaned

    def _pictures(self, image_bytes: bytes, pose_bytes: bytes, epoch: int, key: str,
                  erase: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (flip, erasing unless ``erase`` is False) and pose map: flipped with the image and
        never erased (``shared``), or, as the official transform, with their own flip and erasing (``own``)."""
        rng = sample_rng(self.seed, epoch, key, "image")
        flip = rng.random() < 0.5
        image = self.transform.to_tensor(_decode_image(image_bytes), flip)
        image = random_erase(image, rng, self.erasing_probability) if erase else image
        if self.pose_augment != "own":
            return image, self.transform.to_tensor(_decode_image(pose_bytes), flip)
        pose_rng = sample_rng(self.seed, epoch, key, "pose")
        pose = self.transform.to_tensor(_decode_image(pose_bytes), pose_rng.random() < 0.5)
        return image, random_erase(pose, pose_rng, self.erasing_probability)

    def _counterpart(self, meta: dict, epoch: int, members: dict | None) -> dict | None:
        """``members``: the counterpart's ``jpg`` / ``pose.png`` bytes from the pairing step; None
        when it is in no shard (the sample trains without one, as before)."""
        hard_key = meta.get("hard_negative_key")
        if not hard_key or members is None:
            return None
        # the official dataset puts counterparts through the training transform; the paper setting
        # (``shared``) flips them and never erases
        image, pose = self._pictures(members[IMAGE_EXT], members[POSE_EXT],
                                     epoch, f"{hard_key}:counterpart", erase=self.pose_augment == "own")
        caption = str(meta.get("hard_negative_caption") or "")
        return {"image": image, "pose": pose, "text": self.caption(caption) if caption.strip() else ""}


def collate_train(samples: list[dict]) -> dict:
    rows = [i for i, s in enumerate(samples) if s["hard"] is not None]
    batch = {
        "keys": [s["key"] for s in samples],
        "sample_ids": torch.tensor([s["position"] for s in samples]),
        "images": torch.stack([s["image"] for s in samples]),
        "poses": torch.stack([s["pose"] for s in samples]),
        "texts": [s["text"] for s in samples],
        "eda_texts": [s["eda_text"] for s in samples] if samples[0]["eda_text"] is not None else [],
        "hard_rows": torch.tensor(rows, dtype=torch.long),
        "hard_texts": [samples[i]["hard"]["text"] for i in rows],
        # requests outside the stream (pairing_stream), carried from the workers
        "fallback_reads": sum(s["reads"].get("fallback_reads", 0) for s in samples),
        "neighbour_reads": sum(s["reads"].get("neighbour_reads", 0) for s in samples),
    }
    if rows:
        batch["hard_images"] = torch.stack([samples[i]["hard"]["image"] for i in rows])
        batch["hard_poses"] = torch.stack([samples[i]["hard"]["pose"] for i in rows])
    return batch


# -- test set ------------------------------------------------------------------------------
@dataclass
class EvalSample:
    key: str
    identity: str
    behavior: str
    caption: str
    image: torch.Tensor  # (3, S, S) normalised
    pose: torch.Tensor
    thumbnail: Image.Image  # for the results figure


def iter_test_samples(urls: list[str], transform: ImageTransform, storage_options: dict | None = None,
                      thumb_size: int = 96, caption_words: int | None = None) -> Iterator[EvalSample]:
    """Test samples in shard order (no augmentation); ``caption_words``: official pre_caption."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for s in group_by_keys(tar_file_expander(open_streams(urls, storage_options or {}))):
        meta = json.loads(s[JSON_EXT])
        image = _decode_image(s[IMAGE_EXT])
        thumb = image.copy()
        thumb.thumbnail((thumb_size, thumb_size))
        yield EvalSample(key=s["__key__"], identity=str(meta.get("identity", "")), behavior=str(meta.get("behavior", "")),
                         caption=_test_caption(s[TEXT_EXT].decode("utf-8"), caption_words), image=transform.to_tensor(image),
                         pose=transform.to_tensor(_decode_image(s[POSE_EXT])), thumbnail=thumb)


def _test_caption(text: str, caption_words: int | None) -> str:
    text = text.strip()
    return (pre_caption(text, caption_words) or text) if caption_words else text


# the official code normalises with CLIP's statistics (dataset/__init__.py), not ImageNet's
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def image_transform(cfg, swin_path: str) -> ImageTransform:
    """Resize to ``cfg.cmp.image_size``; CLIP mean/std (``cmp.image_norm: clip``) or the Swin
    image processor's (``processor``)."""
    if cfg.cmp.image_norm == "clip":
        return ImageTransform(cfg.cmp.image_size, CLIP_MEAN, CLIP_STD)
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(swin_path)
    return ImageTransform(cfg.cmp.image_size, tuple(proc.image_mean), tuple(proc.image_std))
