"""Publish a build's release (shards, ``shards/index.json``, the dataset card) to any fsspec URL,
resumably, then verify the remote copy.

Targets: a local folder, ``s3://bucket/prefix`` (a custom endpoint through
``storage_options={"client_kwargs": {"endpoint_url": ...}}``), ``hf://datasets/org/name`` when
``huggingface_hub`` is installed and logged in, or anything else fsspec writes to.

Resuming. Every uploaded object gets a sidecar ``<name>.sha256`` (``sha256sum`` format, so
``sha256sum -c`` works on a downloaded copy), written after the object. On a rerun an object is
skipped when its remote size equals the local one and its sidecar names the local sha256; when the
object is there with the right size but has no sidecar (the run died between the two writes) the
remote bytes are re-hashed, and a match is kept. Nothing that was complete is uploaded again.

Atomicity. On a local target each file is written under a hidden temporary name and renamed; on
object stores one PUT (or one completed multipart upload) is all-or-nothing. The index is written
LAST, and a remote index that differs from the one being published is deleted FIRST, so a remote
index always describes shards that are all there. Before uploading, every local shard is checked
against the local index, so a damaged build is never published.

Nothing destructive by default. A build with failed units, a split with no samples, or a split
with fewer samples than the remote release it would replace is refused before anything remote is
touched (``force`` overrides). Remote shards the new index no longer lists (an earlier, larger
build) are left in place and reported unless ``delete`` is given, and are then removed only after
the new release has verified. Only regular files inside OUT are read (no symlink out of OUT).

Verification. :func:`pab_build.shards.index.verify_shards` re-hashes the remote shards against the
remote index; card files are re-hashed against the local ones. Shards it finds missing or altered
are uploaded once more and verified again.

Credentials come from the environment (``AWS_*``, ``HF_TOKEN``) or from storage options the caller
resolved (e.g. a Prefect block in the flow); they are never logged: storage options are redacted
and every message is scrubbed of secret values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..redact import redact, scrub as scrub_text, secret_values
from ..shards.index import INDEX_REL, VerifyReport, index_problems, local_file_problem, verify_shards
from .guards import release_problems
from ..store import Store, out_store

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
CARD_FILES = ("README.md",)
CARD_DIR = "card"
_CHUNK = 8 << 20
_SHARD_NAME = re.compile(r"(test|train)-\d{6}\.tar")
# an access key id is not a secret (and may be a common word such as "test"): not scrubbed
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_tmp_counter = itertools.count()
_tmp_lock = threading.Lock()


class PublishError(RuntimeError):
    """Publishing stopped; the message names the object and never holds a credential."""


@dataclass
class PublishReport:
    url: str  # credentials scrubbed
    uploaded: list[str] = field(default_factory=list)  # relative paths, in upload order
    skipped: list[str] = field(default_factory=list)  # already there with the right size and sha256
    removed: list[str] = field(default_factory=list)  # stale remote shards removed (delete=True)
    stale: list[str] = field(default_factory=list)  # stale remote shards left in place (delete=False)
    repaired: list[str] = field(default_factory=list)  # uploaded again after verification found them bad
    verify: VerifyReport | None = None
    card_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The published index and every shard it lists verified; extra shards left in place on
        purpose (no ``delete``) are reported, not counted as a failure."""
        if not release_verified(self.verify) or self.card_problems:
            return False
        return set(self.verify.extra) <= {rel.removeprefix("shards/") for rel in self.stale}

    def __str__(self) -> str:
        head = (f"publish {self.url}: {'OK' if self.ok else 'FAILED'}: {len(self.uploaded)} uploaded, "
                f"{len(self.skipped)} already there, {len(self.removed)} stale removed, "
                f"{len(self.repaired)} repaired")
        lines = [head]
        if self.stale:
            lines.append(f"  {len(self.stale)} remote shard(s) the new index does not list were left in place "
                         f"(pass --delete to remove them): {', '.join(self.stale[:5])}")
        if self.verify is not None:
            lines += ["  " + ln for ln in str(self.verify).splitlines()]
        lines += [f"  card: {p}" for p in self.card_problems]
        return "\n".join(lines)


def release_verified(v: VerifyReport | None) -> bool:
    """The index and every shard it lists check out (extra shards aside)."""
    return v is not None and not v.errors and all(p.kind == "extra" for p in v.problems)


# -- secrets ----------------------------------------------------------------------------------
class Scrubber:
    """Removes credentials (URL passwords, the storage options' secrets, the environment's) from text."""

    def __init__(self, storage_options: dict, url: str = ""):
        secrets = secret_values(storage_options) + secret_values(url)
        self.secrets = secrets + [os.environ[n] for n in _SECRET_ENV if os.environ.get(n)]

    def __call__(self, text: str) -> str:
        return scrub_text(text, self.secrets)


def url_credentials(url: str, options: dict) -> tuple[str, dict]:
    """``s3://KEY:SECRET@bucket/x`` -> (``s3://bucket/x``, options with key and secret): s3fs would
    otherwise take ``KEY:SECRET@bucket`` for a bucket name. Other protocols parse userinfo themselves."""
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "s3a") or parts.password is None:
        return url, options
    host = parts.netloc.rsplit("@", 1)[1]
    merged = {**options, "key": unquote(parts.username or ""), "secret": unquote(parts.password)}
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), merged


# -- hashing and copying ----------------------------------------------------------------------
def _sha256_stream(f) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while block := f.read(_CHUNK):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def file_digest(fs, path: str) -> tuple[str, int]:
    """(sha256, size) of a file, streamed."""
    with fs.open(path, "rb") as f:
        return _sha256_stream(f)


def _tmp_name(path: str) -> str:
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    with _tmp_lock:
        n = next(_tmp_counter)
    tmp = f".{name}.tmp-{os.getpid()}-{n}"
    return f"{folder}/{tmp}" if folder else tmp


def _write_atomically(fs, target: str, write) -> None:
    """``write(path)`` to a temporary name then rename on a local target; straight on object stores."""
    if not isinstance(fs, LocalFileSystem):
        write(target)
        return
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = _tmp_name(target)
    try:
        write(tmp)
        fs.mv(tmp, target)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def upload_object(src: Store, rel: str, fs, target: str) -> None:
    """Copy ``OUT/rel`` to ``target`` on ``fs`` so it appears whole or not at all."""
    local = src.local_path(rel)

    def write(path: str) -> None:
        if local is not None:
            fs.put_file(local, path)
        else:
            with src.fs.open(src.path(rel), "rb") as fi, fs.open(path, "wb") as fo:
                shutil.copyfileobj(fi, fo, _CHUNK)

    _write_atomically(fs, target, write)


def write_sidecar(fs, target: str, digest: str) -> None:
    data = f"{digest}  {target.rsplit('/', 1)[-1]}\n".encode()
    _write_atomically(fs, target + SIDECAR_SUFFIX, lambda path: fs.pipe_file(path, data))


def read_sidecar(fs, target: str) -> str | None:
    try:
        text = fs.cat_file(target + SIDECAR_SUFFIX).decode("utf-8", "replace")
    except (FileNotFoundError, OSError):
        return None
    token = text.split()[0] if text.split() else ""
    return token if re.fullmatch(r"[0-9a-f]{64}", token) else None


def _remote_size(fs, path: str) -> int | None:
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError):
        return None
    return int(info["size"]) if info.get("type", "file") == "file" and info.get("size") is not None else None


# -- what to publish --------------------------------------------------------------------------
def release_files(src: Store) -> tuple[dict, list[str], list[str]]:
    """(local index, shard paths, card paths), all relative to OUT; checks the index's schema."""
    if not src.exists(INDEX_REL):
        raise PublishError(f"{src.url_root} has no {INDEX_REL}: build the shards before publishing")
    try:
        index = src.read_json(INDEX_REL)
    except ValueError as e:
        raise PublishError(f"{INDEX_REL} is not valid JSON: {e}") from None
    problems = index_problems(index)
    if problems:
        raise PublishError(f"{INDEX_REL} does not match its schema: {'; '.join(problems[:3])}")
    shards = sorted(f"shards/{s['path']}" for sec in index["splits"].values() for s in sec["shards"])
    card = [f for f in CARD_FILES if src.exists(f)]
    card += [f"{CARD_DIR}/{n}" for n in src.listdir(CARD_DIR) if n.endswith(".png")]
    for rel in shards + card + [INDEX_REL]:
        problem = local_file_problem(src, rel)
        if problem:
            raise PublishError(f"refusing to publish {rel}: {problem}")
    if not card:
        log.warning("publish: %s has no dataset card (README.md); publishing the shards without it", src.url_root)
    return index, shards, card


def _check_local_shards(src: Store, index: dict, digests: dict[str, tuple[str, int]]) -> None:
    for sec in index["splits"].values():
        for s in sec["shards"]:
            rel = f"shards/{s['path']}"
            if digests[rel] != (s["sha256"], s["bytes"]):
                raise PublishError(f"local {rel} does not match {INDEX_REL} (sha256/size differ): "
                                   f"run `pab verify {src.url_root}` and rebuild the shards")


def _remote_index(pub: "_Publisher") -> dict | None:
    """The published index when there is a valid one, else None."""
    try:
        data = json.loads(pub.fs.cat_file(pub.target(INDEX_REL)))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if not index_problems(data) else None


# -- publish ----------------------------------------------------------------------------------
class _Publisher:
    def __init__(self, src: Store, url: str, storage_options: dict, scrub: Scrubber):
        self.src, self.scrub = src, scrub
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.fs.invalidate_cache()
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.root, exist_ok=True)
        self.digests: dict[str, tuple[str, int]] = {}

    def target(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def local_digest(self, rel: str) -> tuple[str, int]:
        if rel not in self.digests:
            self.digests[rel] = file_digest(self.src.fs, self.src.path(rel))
        return self.digests[rel]

    def is_complete(self, rel: str) -> bool:
        """The remote object has the local size and sha256 (by its sidecar, else by re-hashing)."""
        digest, size = self.local_digest(rel)
        target = self.target(rel)
        if _remote_size(self.fs, target) != size:
            return False
        recorded = read_sidecar(self.fs, target)
        if recorded is not None:
            return recorded == digest
        if file_digest(self.fs, target)[0] != digest:
            return False
        write_sidecar(self.fs, target, digest)  # complete, but the run died before its sidecar
        return True

    def put(self, rel: str, report: PublishReport, force: bool = False) -> None:
        if not force and self.is_complete(rel):
            report.skipped.append(rel)
            log.info("publish: %s already there, skipped", rel)
            return
        digest, size = self.local_digest(rel)
        upload_object(self.src, rel, self.fs, self.target(rel))
        write_sidecar(self.fs, self.target(rel), digest)
        report.uploaded.append(rel)
        log.info("publish: uploaded %s (%d bytes)", rel, size)

    def remove(self, rel: str) -> None:
        for path in (self.target(rel), self.target(rel) + SIDECAR_SUFFIX):
            if self.fs.exists(path):
                self.fs.rm(path)

    def stale_shards(self, listed: set[str]) -> list[str]:
        stale = []
        for split in ("test", "train"):
            folder = self.target(f"shards/{split}")
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                rel = f"shards/{split}/{name}"
                if _SHARD_NAME.fullmatch(name) and name.startswith(split) and rel not in listed:
                    stale.append(rel)
        return sorted(stale)

    def card_problems(self, card: list[str]) -> list[str]:
        problems = []
        for rel in card:
            digest, size = self.local_digest(rel)
            if _remote_size(self.fs, self.target(rel)) != size:
                problems.append(f"{rel}: missing or of another size remotely")
            elif file_digest(self.fs, self.target(rel))[0] != digest:
                problems.append(f"{rel}: remote sha256 differs from the local file")
        return problems


def publish(out: str, url: str, storage_options: dict | None = None, *, force: bool = False,
            delete: bool = False, verify: bool = True, out_options: dict | None = None) -> PublishReport:
    """Upload build ``out``'s shards, ``shards/index.json`` (last) and dataset card to ``url``;
    skip objects already there with the right size and sha256; then re-hash the remote copy
    (``verify``). Refuses (before touching anything remote) a build with failed units, an empty
    split, or fewer samples than the published release, unless ``force``. Remote shards the index
    no longer lists are removed only with ``delete``, and only after the new release verified.

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``); put no
    secret in a config file: credentials come from the environment or a block the caller loads.
    ``out_options``: OUT's own, when OUT is on an object store.
    Raises :class:`PublishError` (credentials scrubbed) when an upload fails; rerun to resume.
    """
    options = dict(storage_options or {})
    scrub = Scrubber(options, url)
    safe_url = scrub(url)
    url, options = url_credentials(url, options)
    report = PublishReport(url=safe_url)
    src = out_store(out, out_options)
    index, shards, card = release_files(src)
    log.info("publish: %s -> %s (storage options %s): %d shard(s), %d card file(s)",
             src.url_root, safe_url, redact(options), len(shards), len(card))
    step = "connecting"
    try:
        pub = _Publisher(src, url, options, scrub)
        step = "hashing the local files"
        for rel in shards + card + [INDEX_REL]:
            pub.local_digest(rel)
        _check_local_shards(src, index, pub.digests)

        step = f"reading the remote {INDEX_REL}"
        problems = release_problems(src, index, _remote_index(pub))
        if problems and not force:
            raise PublishError(f"refusing to publish {src.url_root} to {safe_url}: {'; '.join(problems)}; "
                               "nothing remote was changed (pass --force to publish anyway)")
        for p in problems:
            log.warning("publish: --force: publishing although %s", p)

        step = f"checking the remote {INDEX_REL}"
        if _remote_size(pub.fs, pub.target(INDEX_REL)) is not None and not pub.is_complete(INDEX_REL):
            pub.remove(INDEX_REL)  # it describes another set of shards: never leave it beside new ones
            log.info("publish: removed the remote %s of an earlier build", INDEX_REL)
        for rel in shards + card:
            step = f"uploading {rel}"
            pub.put(rel, report)
        step = f"uploading {INDEX_REL}"
        pub.put(INDEX_REL, report)
        step = "listing stale remote shards"
        report.stale = pub.stale_shards(set(shards))

        if verify:
            step = "verifying the remote copy"
            report.verify = _verify(pub, url, options)
            bad = sorted(set(report.verify.missing) | set(report.verify.altered))
            if bad:
                log.warning("publish: verification found %d bad shard(s); uploading them again", len(bad))
                for path in bad:
                    rel = f"shards/{path}"
                    step = f"repairing {rel}"
                    pub.put(rel, report, force=True)
                    report.repaired.append(rel)
                report.verify = _verify(pub, url, options)
            report.card_problems = pub.card_problems(card)
        verified = release_verified(report.verify) and not report.card_problems
        if delete and report.stale and verified:
            for rel in report.stale:
                step = f"removing stale {rel}"
                pub.remove(rel)
                report.removed.append(rel)
                log.info("publish: removed stale remote %s", rel)
            report.stale = []
            report.verify = _verify(pub, url, options)
        elif delete and report.stale:
            log.warning("publish: the new release did not verify: stale remote shards kept")
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - any fsspec/network error: name the step, hide credentials
        raise PublishError(scrub(f"publishing to {safe_url} failed while {step}: {type(e).__name__}: {e}")) from None
    if report.verify is not None:
        report.verify.target = safe_url
    log.info("%s", scrub(str(report)).splitlines()[0])
    return report


def _verify(pub: _Publisher, url: str, options: dict) -> VerifyReport:
    pub.fs.invalidate_cache()
    return verify_shards(url, options)
