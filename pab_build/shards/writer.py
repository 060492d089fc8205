"""WebDataset tar shards: deterministic bytes, safe member names, reading samples back.

A shard is a plain (uncompressed) tar whose every byte is ours: mtime 0, uid/gid 0, empty user/group
names, mode 0o644, samples sorted by key, members of a sample in the fixed order of :data:`EXTENSIONS`.
The same inputs therefore give byte-identical shards.

Sample keys become tar member names ``<key>.<ext>``; WebDataset splits a member name at its first
dot, so a key may only hold ``[A-Za-z0-9_-]`` (no dots, no slashes, no ``..``): anything else is
rejected with a reason, never escaped into a path.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from typing import Any, BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

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


def safe_keys(keys) -> pa.Array:
    """``key_problem(key) is None`` for a column of keys, in Arrow (a million keys, no Python loop)."""
    ok = pc.and_(pc.match_substring_regex(keys, r"^[A-Za-z0-9_-]+$"), pc.less_equal(pc.utf8_length(keys), MAX_KEY_LEN))
    return pc.fill_null(ok, False)


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


def _add_sample(tar: tarfile.TarFile, key: str, members: dict[str, Any], store=None) -> None:
    """Members of one sample in EXTENSIONS order. A member is bytes, or a ``str``: the path
    (relative to ``store``) of a file copied into the tar in chunks, never read whole."""
    unknown = set(members) - set(EXTENSIONS)
    if unknown:
        raise ValueError(f"sample {key!r}: unknown member extensions {sorted(unknown)}")
    for ext in EXTENSIONS:
        if ext not in members:
            continue
        info = tarfile.TarInfo(member_name(key, ext))
        info.mtime, info.mode = 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        data = members[ext]
        if isinstance(data, str):
            path = store.path(data)
            with store.fs.open(path, "rb") as src:
                info.size = int(store.fs.size(path))
                tar.addfile(info, src)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build_shard(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """Tar bytes of ``(key, {ext: data})`` samples, sorted by key, members in EXTENSIONS order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in sorted(samples, key=lambda s: s[0]):
            _add_sample(tar, key, members)
    return buf.getvalue()


class HashingWriter:
    """A write-only file that hashes (sha256) and counts what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO):
        self.sink, self.sha256, self.bytes = sink, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.sink.write(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.sink.flush()


class ShardTooBig(RuntimeError):
    pass


def write_shard(store, rel: str, samples: Iterable[tuple[str, dict[str, Any]]],
                max_bytes: int | None = None) -> tuple[int, str]:
    """Stream ``(key, {ext: bytes or source path})`` samples, sorted by key, into the shard ``rel``
    through :meth:`Store.open_atomic` (nothing visible until the whole shard is written); return
    its size and sha256. Source files are copied in chunks, so memory does not grow with the
    shard. The bytes equal :func:`build_shard`'s. Raises :class:`ShardTooBig` (and leaves nothing)
    once the shard exceeds ``max_bytes``.

    Not webdataset's ``TarWriter``: it would give the same bytes (mtime 0, mode 0o644, empty
    user/group, sorted members), but it takes each member as bytes in memory and importing
    webdataset imports torch (~700 MiB resident), too much for a process that only copies files."""
    with store.open_atomic(rel) as f:
        out = HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            last = None
            for key, members in samples:
                if last is not None and key <= last:
                    raise ValueError(f"samples are not sorted by key: {key!r} after {last!r}")
                _add_sample(tar, key, members, store)
                last = key
                # with the end blocks and record padding still to come
                if max_bytes is not None and tar_bytes(out.bytes) > max_bytes:
                    raise ShardTooBig(f"{rel} came to {tar_bytes(out.bytes)} bytes, over {max_bytes}")
    return out.bytes, out.sha256.hexdigest()


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
