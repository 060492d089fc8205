"""Tar samples parsed from a range read of a shard: its first bytes (the head) or its last (the
tail, from its first whole header). A neighbour's head or tail completes an identity cut by a shard
boundary (:mod:`pab_build.cmp.pairing_stream`) with one request instead of a stream or an index.
The headers are parsed here, not by ``tarfile``: a read holds thousands of them, and
``TarInfo.frombuf`` decodes every field (4-5x the time of the name, size and type used here)."""

from __future__ import annotations

import tarfile

BLOCK = tarfile.BLOCKSIZE


def split_member(name: str) -> tuple[str, str]:
    """``<dir>/<key>.<ext>`` -> (key, ext); keys have no dots, so the first dot starts the extension."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def _pax_records(payload: bytes) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records of a PAX extended header (webdataset's TarWriter
    writes one per member for its float mtime)."""
    out, at = {}, 0
    while at < len(payload):
        length = int(payload[at:payload.index(b" ", at)])
        key, _, value = payload[payload.index(b" ", at) + 1:at + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


_HIGH_BYTES = bytes(range(128, 256))


def parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a ustar header block, or None unless its checksum holds (unsigned or
    signed, as tarfile accepts); the long name of a ustar prefix rebuilt as tarfile does."""
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        chksum = int(field, 8)
        size_field = block[124:136]
        size = (int.from_bytes(size_field[1:], "big") if size_field[0] == 0o200
                else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8))
    except (ValueError, IndexError):
        return None
    unsigned = sum(block) - sum(block[148:156]) + 256
    if chksum != unsigned and chksum != unsigned - 256 * (len(block) - len(block.translate(None, _HIGH_BYTES))):
        return None
    kind = block[156:157]
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and kind not in tarfile.GNU_TYPES:  # a ustar long name, as tarfile rebuilds it
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name, size, kind


def _member_chain(data: bytes, at: int, cut_ok: bool = False) -> tuple[list[tuple[str, str, bytes]], bool] | None:
    """The members from offset ``at`` and whether the archive's end (its zero blocks) was reached;
    None when ``at`` does not start a chain of valid headers (a checksum check rules out image
    bytes). A member cut by the end of ``data`` ends the chain when ``cut_ok`` (a head read), else
    it is no chain (a tail read ends at the archive's end)."""
    out, pax = [], {}
    while at + BLOCK <= len(data):
        block = data[at:at + BLOCK]
        if block.count(0) == BLOCK:
            return out, True
        header = parse_header(block)
        if header is None:
            return None
        name, size, kind = header
        try:
            size = int(pax.get("size", size))
        except ValueError:
            return None
        end = at + BLOCK + size
        if end > len(data):
            return (out, False) if cut_ok else None
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.XHDTYPE):
            return None  # GNU long names, links: not what the project's writer makes
        if kind == tarfile.XHDTYPE:
            try:
                pax = _pax_records(data[at + BLOCK:end])
            except (ValueError, UnicodeDecodeError):
                return None
        else:
            if kind != tarfile.DIRTYPE and not name.endswith("/"):
                out.append((*split_member(pax.get("path", name)), data[at + BLOCK:end]))
            pax = {}
        at += BLOCK + -(-size // BLOCK) * BLOCK
    return (out, False) if cut_ok else None


def _grouped(members: list[tuple[str, str, bytes]]) -> list[dict]:
    samples: list[dict] = []
    for key, ext, payload in members:
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][ext] = payload
    return samples


def tail_samples(data: bytes, whole: bool) -> list[dict]:
    """Samples in the tail ``data`` of a shard (block-aligned); unless ``whole``, the first one may
    lack members before the cut and is left out."""
    for at in range(0, max(0, len(data) - BLOCK + 1), BLOCK):
        chain = _member_chain(data, at)
        if chain is not None:
            break
    else:
        return []
    samples = _grouped(chain[0])
    return samples if whole else samples[1:]


def head_samples(data: bytes) -> tuple[list[dict], bool] | None:
    """Samples in the first bytes ``data`` of a shard and whether they are all of its samples; the
    last one may lack members after the cut and is left out unless the archive ends in ``data``.
    None when the shard does not start with headers this parser reads."""
    chain = _member_chain(data, 0, cut_ok=True)
    if chain is None:
        return None
    samples = _grouped(chain[0])
    return (samples, True) if chain[1] else (samples[:-1], False)
