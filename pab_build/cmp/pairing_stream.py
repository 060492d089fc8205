"""Identity hard negatives served from the shard stream (issue 21).

The training shards are written in sample-key order and the samples of one identity (an OOPS!
clip: its ``n``, ``a`` and ``a+`` images) have keys with the identity's prefix, so they are
contiguous in the stream. :func:`paired_samples` reads one shard as it streams, holds one
identity's samples at a time, and takes each sample's counterpart (``hard_negative_key``, always
of the same identity) from that buffer. An identity cut by a shard boundary is completed from the
neighbouring shard by range requests (1 MiB, doubled while the identity goes on): the head of the
next shard up to the last wanted key, the tail of the previous one parsed from its first whole tar
header. Nothing is indexed up front.

Random access by key (:class:`MemberIndex`, the old loader's way: read a shard's tar headers, then
seek to the member) remains only as the fallback for a counterpart that is not where key order says
(shards not in key order, a counterpart of another identity); each one is counted and logged.
"""

from __future__ import annotations

import bisect
import json
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec

from pab_build.cmp.tar_ranges import BLOCK as _BLOCK
from pab_build.cmp.tar_ranges import head_samples, parse_header, split_member, tail_samples

log = logging.getLogger(__name__)

IMAGE_EXT, POSE_EXT, JSON_EXT = "jpg", "pose.png", "json"
TAIL_FIRST_READ = 1 << 20  # bytes of a neighbour's head / tail read first; doubled until the wanted key


def open_streams(urls, storage_options, **open_options):
    """``open_options`` go to the file's ``open`` (``block_size``), not to the filesystem."""
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        with fs.open(path, "rb", **open_options) as stream:
            yield {"url": url, "stream": stream}


def iter_samples(urls, storage_options: dict, **open_options) -> Iterator[dict]:
    """webdataset's own tar reading: one dict per sample (``__key__``, one entry per member)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(open_streams(urls, storage_options, **open_options)))


# -- random access: the fallback (and the old loader's way) --------------------------------------
@dataclass
class MemberRef:
    url: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)


class MemberIndex:
    """Where every sample's members are: key -> shard URL and (offset, size) of each member."""

    def __init__(self, refs: dict[str, MemberRef], storage_options: dict | None = None):
        self.refs = refs
        self.storage_options = storage_options or {}

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, key: str, ext: str) -> bytes:
        ref = self.refs[key]
        if ext not in ref.members:
            raise KeyError(f"sample {key!r} has no {ext!r} member in {ref.url}")
        offset, size = ref.members[ext]
        with fsspec.open(ref.url, "rb", **self.storage_options) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{ref.url}: short read of {key}.{ext} ({len(data)} of {size} bytes)")
        return data


def build_member_index(urls: list[str], storage_options: dict | None = None) -> MemberIndex:
    """Read every tar's headers (``tarfile`` seeks past the data) into a :class:`MemberIndex`."""
    refs: dict[str, MemberRef] = {}
    for url in urls:
        with fsspec.open(url, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member(info.name)
                ref = refs.setdefault(key, MemberRef(url))
                if ref.url != url:
                    raise ValueError(f"sample key {key!r} appears in two shards: {ref.url} and {url}")
                ref.members[ext] = (info.offset_data, info.size)
    return MemberIndex(refs, storage_options)


# -- the shards and their neighbours --------------------------------------------------------------
@dataclass
class PairingStats:
    fallback_reads: int = 0  # counterparts read by random access (two member reads each)
    neighbour_reads: int = 0  # requests to a neighbouring shard's head or tail
    pending: dict = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)
        self.pending[name] = self.pending.get(name, 0) + n

    def take(self) -> dict:
        """The counts since the last call: the next emitted sample carries them to the batch, so
        they reach the training process from DataLoader workers too."""
        out, self.pending = self.pending, {}
        return out


class ShardSet:
    """The training shards in key order, with reads of a neighbour's head / tail and the fallback."""

    def __init__(self, urls: list[str], storage_options: dict | None = None):
        self.urls = list(urls)
        self.storage_options = storage_options or {}
        self.stats = PairingStats()
        self._firsts: list[str | None] | None = None  # each shard's first key, read on the first fallback
        self._located: dict[str, MemberIndex] = {}  # header index of the last shard a fallback used

    def __getstate__(self):  # a DataLoader worker starts with fresh counters and caches
        return {"urls": self.urls, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["urls"], state["storage_options"])

    def head(self, pos: int, wanted: set[str], ident) -> tuple[dict[str, dict], bool]:
        """Wanted samples of shard ``pos`` from its start while they are of identity ``ident``, up
        to the last wanted key, from range reads of its head (1 MiB, doubled while the identity and
        the wanted keys go on); and whether the whole shard is that identity's (the rest of
        ``wanted`` may then be in the next one)."""
        fs, path = fsspec.core.url_to_fs(self.urls[pos], **self.storage_options)
        size, length = fs.size(path), TAIL_FIRST_READ
        while True:
            self.stats.add("neighbour_reads")
            parsed = head_samples(fs.cat_file(path, start=0, end=min(size, length)))
            if parsed is None:
                return self._streamed_head(pos, wanted, ident)
            found, stopped = _identity_head(parsed[0], wanted, ident)
            if stopped:
                return found, False
            if parsed[1] or length >= size:
                return found, True
            length *= 2

    def _streamed_head(self, pos: int, wanted: set[str], ident) -> tuple[dict[str, dict], bool]:
        """:meth:`head` by webdataset's tar reading, for a shard whose headers
        :func:`~pab_build.cmp.tar_ranges.parse_header` does not read (GNU long names: not the
        project's writer)."""
        # small blocks: s3fs would otherwise fetch 50 MiB ahead for an identity's head
        samples = iter_samples([self.urls[pos]], self.storage_options, block_size=TAIL_FIRST_READ)
        try:
            found, stopped = _identity_head(samples, wanted, ident)
        finally:
            samples.close()
        return found, not stopped

    def tail(self, pos: int, wanted: set[str], ident) -> tuple[dict[str, dict], bool]:
        """Wanted samples of identity ``ident`` in shard ``pos``, from range reads of its tail: 1 MiB,
        doubled until the read starts before the first wanted key or the identity's start; and
        whether the whole shard is that identity's."""
        fs, path = fsspec.core.url_to_fs(self.urls[pos], **self.storage_options)
        size, first, length = fs.size(path), min(wanted), TAIL_FIRST_READ
        while True:
            start = max(0, size - length) // _BLOCK * _BLOCK
            self.stats.add("neighbour_reads")
            samples = tail_samples(fs.cat_file(path, start=start, end=size), whole=start == 0)
            mine = [s for s in samples if _identity(s) == ident]
            if start == 0 or len(mine) < len(samples) or (samples and samples[0]["__key__"] < first):
                whole = start == 0 and len(mine) == len(samples)
                return {s["__key__"]: s for s in mine if s["__key__"] in wanted}, whole
            length *= 2

    def first_key(self, pos: int) -> str | None:
        if self._firsts is None:
            self._firsts = []
            for url in self.urls:  # one 512-byte read per shard
                fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
                header = parse_header(fs.cat_file(path, start=0, end=_BLOCK) if fs.size(path) >= _BLOCK else b"")
                self._firsts.append(None if header is None else split_member(header[0])[0])
        return self._firsts[pos]

    def fallback(self, keys: set[str]) -> dict[str, dict]:
        """Counterparts read by random access: the shard whose key range holds the key (by each
        shard's first key), its tar headers, then a seek per member. Counted and logged."""
        found, absent = {}, []
        firsts = [(k, i) for i in range(len(self.urls)) if (k := self.first_key(i)) is not None]
        ordered = [k for k, _ in firsts] == sorted(k for k, _ in firsts)
        for key in sorted(keys):
            at = bisect.bisect_right([k for k, _ in firsts], key) - 1
            # in key order the key can only be in one shard; otherwise look in every one
            for pos in ([firsts[at][1]] if at >= 0 else []) if ordered else [i for _, i in firsts]:
                url = self.urls[pos]
                if url not in self._located:
                    self._located = {url: build_member_index([url], self.storage_options)}
                index = self._located[url]
                if key in index:
                    found[key] = {"__key__": key, **{ext: index.read(key, ext) for ext in (IMAGE_EXT, POSE_EXT)
                                                      if ext in index.refs[key].members}}
                    self.stats.add("fallback_reads")
                    log.warning("hard negative %s read by random access from %s (fallback %d)", key, url,
                                self.stats.fallback_reads)
                    break
            else:
                absent.append(key)
        if absent:  # the sample trains without one, as with the old loader
            log.warning("%d hard negative(s) are in none of the %d training shards: %s", len(absent),
                        len(self.urls), ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else ""))
        return found

    def resolve(self, pos: int, missing: set[str], first: str, last: str, ident) -> dict[str, dict]:
        """Counterparts of shard ``pos``'s samples of identity ``ident`` that are not in its stream
        (keys ``first``..``last``): from the neighbours while the identity goes on, else the fallback."""
        found: dict[str, dict] = {}
        absent: set[str] = set()
        for step, wanted in ((-1, {k for k in missing if k < first}), (1, {k for k in missing if k > last})):
            i, whole = pos + step, True
            while wanted and 0 <= i < len(self.urls):
                got, whole = (self.tail if step < 0 else self.head)(i, wanted, ident)
                found.update(got)
                wanted -= got.keys()
                if not whole:
                    break
                i += step
            if whole and not 0 <= i < len(self.urls):
                absent |= wanted  # the identity runs to the first / last shard: these are in no shard
        if absent:  # the samples train without one, as with the old loader
            log.warning("%d hard negative(s) of identity %s are in none of the training shards: %s", len(absent),
                        ident, ", ".join(sorted(absent)[:3]) + (", ..." if len(absent) > 3 else ""))
        rest = missing - found.keys() - absent
        if rest:
            found.update(self.fallback(rest))
        return found


def _identity_head(samples, wanted: set[str], ident) -> tuple[dict[str, dict], bool]:
    """The wanted samples among the first ``samples`` of a shard while they are of identity
    ``ident``; and whether they stopped (another identity, or the last wanted key reached)."""
    found, last = {}, max(wanted)
    for s in samples:
        if _identity(s) != ident:
            return found, True
        if s["__key__"] in wanted:
            found[s["__key__"]] = s
        if s["__key__"] >= last:
            return found, True
    return found, False


# -- the pairing step -------------------------------------------------------------------------------
_JSON = json.JSONDecoder()


def _identity(sample: dict) -> str | None:
    try:  # the decoder itself: json.loads on bytes first guesses the encoding (a third of the time)
        meta = _JSON.decode(sample[JSON_EXT].decode("utf-8"))
    except UnicodeDecodeError:
        meta = _loads_or_empty(sample[JSON_EXT])
    except (KeyError, ValueError):
        meta = {}  # decoding rejects the sample later, as the old loader did
    sample["__meta__"] = meta if isinstance(meta, dict) else {}
    return sample["__meta__"].get("identity")


def _loads_or_empty(data: bytes):
    try:
        return json.loads(data)  # UTF-16 / 32, as json.loads reads bytes
    except ValueError:
        return {}


def paired_samples(url: str, shards: ShardSet, select: Callable[[str], bool] | None,
                   load_counterparts: bool = True) -> Iterator[dict]:
    """The selected samples of shard ``url`` (``select`` None: all) in shard order, each with
    ``__hard__``: its counterpart's members (``jpg``, ``pose.png``), or None when it has none."""
    pos = shards.urls.index(url)
    group: list[dict] = []
    first = ident = None
    for s in iter_samples([url], shards.storage_options):
        first = first or s["__key__"]
        this = _identity(s)
        if group and this != ident:
            yield from _emit(group, pos, first, shards, select, load_counterparts, at_end=False)
            group = []
        group.append(s)
        ident = this
    if group:
        yield from _emit(group, pos, first, shards, select, load_counterparts, at_end=True)


def _emit(group: list[dict], pos: int, first: str, shards: ShardSet, select, load_counterparts: bool,
          at_end: bool) -> Iterator[dict]:
    chosen = group if select is None else [s for s in group if select(s["__key__"])]
    found: dict[str, dict] = {s["__key__"]: s for s in group}
    if load_counterparts:
        wanted = {k for s in chosen if (k := s["__meta__"].get("hard_negative_key"))} - found.keys()
        if wanted:
            # past the stream's end only for the shard's last identity; else not in the stream
            last = group[-1]["__key__"] if at_end else "\uffff"
            found.update(shards.resolve(pos, wanted, first, last, group[-1]["__meta__"].get("identity")))
    for s in chosen:
        meta = s.pop("__meta__")  # decoding parses the json again: nothing extra travels to the trainer
        hard = found.get(meta.get("hard_negative_key") or "") if load_counterparts else None
        s["__hard__"] = None if hard is None else {ext: hard[ext] for ext in (IMAGE_EXT, POSE_EXT) if ext in hard}
        if shards.stats.pending:
            s["__reads__"] = shards.stats.take()
        yield s


def index_paired_samples(urls: list[str], index: MemberIndex, select: Callable[[str], bool] | None,
                         storage_options: dict | None = None) -> Iterator[dict]:
    """The loader before issue 21 (``TrainData(pairing="index")``): the same samples in the same
    order, every counterpart read by key through ``index`` (an index of all tar headers). Kept as
    the reference the tests and ``bench/bench_cmp_data.py`` compare the stream with."""
    for s in iter_samples(urls, storage_options or {}):
        if select is None or select(s["__key__"]):
            _identity(s)
            hard = s.pop("__meta__").get("hard_negative_key")
            s["__hard__"] = ({e: index.read(hard, e) for e in (IMAGE_EXT, POSE_EXT) if e in index.refs[hard].members}
                             if hard and hard in index else None)
            yield s
