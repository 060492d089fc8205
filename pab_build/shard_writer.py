"""WebDataset tar shards: deterministic bytes, safe member names, reading samples back.

A shard is a plain (uncompressed) tar whose every byte is ours: mtime 0, uid/gid 0, empty user/group
names, mode 0o644, samples sorted by key, members of a sample in the fixed order of :data:`EXTENSIONS`.
The same inputs therefore give byte-identical shards.

Sample keys become tar member names ``<key>.<ext>``; WebDataset splits a member name at its first
dot, so a key may only hold ``[A-Za-z0-9_-]`` (no dots, no slashes, no ``..``): anything else is
rejected with a reason, never escaped into a path.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


EXTENSIONS = ("jpg", "json", "pose.png", "txt")  # member order within a sample


FILE_EXTENSIONS = ("jpg", "pose.png")  # members copied from image files; txt/json are generated


MAX_KEY_LEN = 90  # keeps "<key>.pose.png" within ustar's 100-character name field


_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


_BLOCK = tarfile.BLOCKSIZE


SPLITS = ("test", "train")
# models each split's samples record (config.model_id: path as written + revision)
SPLIT_MODELS = {"test": ("openpose", "resnet50", "qwen2_vl"), "train": ("sdxl", "openpose", "qwen2_vl")}
ATTRIBUTE_FIELDS = ("action", "action_raw", "anomaly", "anomaly_raw", "scene", "scene_raw")




# -- the tar writer ---------------------------------------------------------------------------
def key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be a WebDataset ``__key__`` (None when it can)."""
    if not isinstance(key, str) or not key:
        return f"sample key {key!r} is empty or not a string"
    if len(key) > MAX_KEY_LEN:
        return f"sample key {key[:40]!r}... is longer than {MAX_KEY_LEN} characters"
    if not _SAFE_KEY.fullmatch(key):
        return (f"sample key {key!r} is not a safe WebDataset key "
                "(only letters, digits, '_' and '-'; no dots, slashes or '..')")
    return None


def member_name(key: str, ext: str) -> str:
    """``<key>.<ext>``; raises ValueError for an unsafe key or an unknown extension."""
    problem = key_problem(key)
    if problem:
        raise ValueError(problem)
    if ext not in EXTENSIONS:
        raise ValueError(f"member extension {ext!r} is not one of {EXTENSIONS}")
    return f"{key}.{ext}"


def member_bytes(size: int) -> int:
    """Bytes one member of ``size`` bytes takes in a tar: a header block plus padded data."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def tar_bytes(member_total: int) -> int:
    """Size of a tar whose members take ``member_total`` bytes: two zero blocks end it and
    :mod:`tarfile` pads the archive to a whole record."""
    return -(-(member_total + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sample_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def build_shard(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """Tar bytes of ``(key, {ext: data})`` samples, sorted by key, members in EXTENSIONS order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in sorted(samples, key=lambda s: s[0]):
            unknown = set(members) - set(EXTENSIONS)
            if unknown:
                raise ValueError(f"sample {key!r}: unknown member extensions {sorted(unknown)}")
            for ext in EXTENSIONS:
                if ext not in members:
                    continue
                info = tarfile.TarInfo(member_name(key, ext))
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


def shard_rel(split: str, number: int) -> str:
    """``shards/test/test-000003.tar`` (relative to the output root)."""
    return f"shards/{split}/{split}-{number:06d}.tar"


SHARD_NAME = {s: re.compile(rf"{s}-\d{{6}}\.tar") for s in SPLITS}


# -- readers ----------------------------------------------------------------------------------
def iter_shard_samples(paths: Iterable[str], decode: str = "pil") -> Iterator[dict]:
    """Samples of the given shards (paths or URLs webdataset understands), in order, decoded:
    ``jpg`` / ``pose.png`` as PIL images, ``txt`` as str, ``json`` as dict, plus ``__key__``."""
    import webdataset as wds

    yield from wds.WebDataset(list(paths), shardshuffle=False, empty_check=False).decode(decode)


def hf_features(split: str):
    """``datasets.Features`` of a split's samples, for ``load_dataset("webdataset", ...,
    features=hf_features("train"))``. Without them ``datasets`` infers types from the first five
    samples, and a training shard starts with anomaly images whose ``action`` is null."""
    from datasets import Features, Image, Value

    text = Value("string")
    meta = {"sample_key": text, "identity": text, "clip_name": text, "behavior": text, "source_caption": text,
            "prompt_version": text, "models": {m: text for m in SPLIT_MODELS[split]},
            "attributes": {a: text for a in ATTRIBUTE_FIELDS}}
    if split == "test":
        meta.update(time_s=Value("float64"), pair_key=text)
    else:
        meta.update(kind=text, seed=Value("int64"), hard_negative_key=text, hard_negative_caption=text)
    return Features({"jpg": Image(), "json": meta, "pose.png": Image(), "txt": text,
                     "__key__": text, "__url__": text})
