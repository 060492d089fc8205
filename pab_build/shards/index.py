"""``shards/index.json`` (every shard's path, samples, bytes and sha256; per-split totals) and verification.

After a split's manifest is written, :func:`finalize_shards` removes shard files no longer referenced
and rewrites the index; :func:`verify_shards` re-hashes a build or a published copy against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..config import REPO_ROOT
import pyarrow as pa
import pyarrow.compute as pc

from ..manifests import OK, manifest_rel, read_manifest_table
from .writer import EXTENSIONS, SPLITS, key_problem
from ..store import Store
from ..engine.units import Context

FORMAT = "pab-webdataset-shards"


FORMAT_VERSION = 1


from .writer import SHARD_NAME

log = logging.getLogger(__name__)
_index_lock = threading.Lock()  # the two shard stages may finalize at the same time

INDEX_REL = "shards/index.json"


INDEX_SCHEMA_PATH = REPO_ROOT / "manifests" / "shard_index.schema.json"


# -- the shard index --------------------------------------------------------------------------
def ratio_text(normal: int, anomaly: int) -> str:
    """``normal:anomaly`` in lowest terms ("2:3"); when the terms are large, the closest ratio with
    small terms, marked ``~`` (the exact counts sit beside it in the index)."""
    if normal == 0 or anomaly == 0:
        return f"{1 if normal else 0}:{1 if anomaly else 0}"
    exact = Fraction(normal, anomaly)
    if max(exact.numerator, exact.denominator) <= 100:
        return f"{exact.numerator}:{exact.denominator}"
    approx = exact.limit_denominator(20)
    if approx.numerator == 0:  # too lopsided to round: give it exactly
        return f"{exact.numerator}:{exact.denominator}"
    return f"~{approx.numerator}:{approx.denominator}"


INDEX_COLUMNS = ["sample_key", "status", "shard", "shard_bytes", "shard_sha256", "behavior"]


def _shards_of_table(table: pa.Table) -> tuple[dict[str, dict], int, int]:
    """Per shard (samples, bytes, sha256) and the behavior counts of a shard manifest's ok rows,
    aggregated in Arrow (a training manifest has a million rows)."""
    ok = table.select(INDEX_COLUMNS).filter(pc.equal(table["status"], OK))
    per_shard = ok.group_by("shard", use_threads=False).aggregate(
        [("sample_key", "count"), ("shard_bytes", "first"), ("shard_sha256", "first")])
    shards = {}
    for r in per_shard.to_pylist():
        path = r["shard"].removeprefix("shards/")
        shards[path] = {"path": path, "samples": r["sample_key_count"], "bytes": r["shard_bytes_first"],
                        "sha256": r["shard_sha256_first"]}
    behavior = ok["behavior"]
    count = (lambda b: pc.sum(pc.equal(behavior, b)).as_py() or 0)
    return shards, count("normal"), count("anomaly")


def split_section(split: str, rows: "list[dict] | pa.Table") -> dict:
    """The index entry of one split, from its shard manifest (a table, or rows)."""
    shards: dict[str, dict] = {}
    normal = anomaly = 0
    if isinstance(rows, pa.Table):
        shards, normal, anomaly = _shards_of_table(rows)
        rows = []
    for r in rows:
        if r["status"] != OK:
            continue
        path = r["shard"].removeprefix("shards/")
        entry = shards.setdefault(path, {"path": path, "samples": 0, "bytes": r["shard_bytes"],
                                         "sha256": r["shard_sha256"]})
        entry["samples"] += 1
        normal += r["behavior"] == "normal"
        anomaly += r["behavior"] == "anomaly"
    listed = [shards[p] for p in sorted(shards)]
    return {
        "shards": listed,
        "totals": {
            "shards": len(listed),
            "samples": sum(s["samples"] for s in listed),
            "bytes": sum(s["bytes"] for s in listed),
            "normal": normal,
            "anomaly": anomaly,
            "normal_anomaly_ratio": ratio_text(normal, anomaly),
            "normal_anomaly_ratio_float": normal / anomaly if anomaly else None,
        },
    }


def update_shard_index(store: Store, split: str, rows: "list[dict] | pa.Table") -> dict:
    """Rewrite ``shards/index.json`` with ``split`` from ``rows`` and the other split from its
    manifest (or, without one, from the index already there)."""
    with _index_lock:
        old: dict = {}
        if store.exists(INDEX_REL):
            try:
                old = store.read_json(INDEX_REL).get("splits", {})
            except (ValueError, AttributeError):
                old = {}
        sections = {}
        for s in SPLITS:
            if s == split:
                sections[s] = split_section(s, rows)
            elif store.exists(manifest_rel(f"{s}_shards")):
                sections[s] = split_section(s, read_manifest_table(store, f"{s}_shards", INDEX_COLUMNS))
            elif s in old:
                sections[s] = old[s]
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "splits": sections}
        store.write_json(INDEX_REL, index)
        return index


def remove_stale_shards(store: Store, split: str, rows: "list[dict] | pa.Table") -> list[str]:
    """Delete this split's shard files that no ok row references (left by an earlier, larger
    build); only names this stage writes are touched."""
    if isinstance(rows, pa.Table):
        keep = set(pc.unique(rows.filter(pc.equal(rows["status"], OK))["shard"]).to_pylist())
    else:
        keep = {r["shard"] for r in rows if r["status"] == OK}
    removed = []
    for name in store.listdir(f"shards/{split}"):
        rel = f"shards/{split}/{name}"
        if SHARD_NAME[split].fullmatch(name) and rel not in keep:
            store.remove(rel)
            removed.append(rel)
    if removed:
        log.info("removed %d stale %s shard(s): %s", len(removed), split, ", ".join(removed[:5]))
    return removed


def finalize_shards(ctx: Context, rows: "list[dict] | pa.Table", split: str) -> None:
    remove_stale_shards(ctx.store, split, rows)
    update_shard_index(ctx.store, split, rows)


# -- verification -----------------------------------------------------------------------------
def local_file_problem(store: Store, rel: str) -> str | None:
    """Why ``OUT/rel`` must not be read as part of the release: not a regular file, or (through a
    symlink or ``..``) outside OUT. Object stores hold only regular objects: always None there."""
    local = store.local_path(rel)
    if local is None:
        return None
    root = os.path.realpath(store.local_path(""))
    real = os.path.realpath(local)
    if os.path.commonpath([root, real]) != root:
        return f"resolves to {real}, outside the build folder {root}"
    try:
        mode = os.lstat(local).st_mode
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISLNK(mode):
        return "is a symbolic link, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


def index_problems(index: Any) -> list[str]:
    """Schema violations of a loaded index (empty when valid)."""
    import jsonschema

    schema = json.loads(INDEX_SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(index), key=lambda e: list(map(str, e.absolute_path)))]


@dataclass
class ShardProblem:
    kind: str  # "missing" | "extra" | "altered" | "unsafe" | "mismatch"
    path: str  # relative to the folder holding index.json
    message: str


@dataclass
class VerifyReport:
    target: str
    index_path: str | None = None
    checked: int = 0  # shards listed in the index and hashed
    problems: list[ShardProblem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the index itself is missing or invalid

    @property
    def ok(self) -> bool:
        return not self.problems and not self.errors

    def paths(self, kind: str) -> list[str]:
        return [p.path for p in self.problems if p.kind == kind]

    @property
    def missing(self) -> list[str]:
        return self.paths("missing")

    @property
    def extra(self) -> list[str]:
        return self.paths("extra")

    @property
    def altered(self) -> list[str]:
        return self.paths("altered")

    def __str__(self) -> str:
        head = (f"{self.target}: {'OK' if self.ok else 'FAILED'}: {self.checked} shard(s) in the index, "
                f"{len(self.missing)} missing, {len(self.extra)} extra, {len(self.altered)} altered, "
                f"{len(self.paths('unsafe'))} unsafe, {len(self.paths('mismatch'))} mismatched")
        lines = [head] + [f"  error: {e}" for e in self.errors]
        lines += [f"  {p.kind}: {p.path}: {p.message}" for p in self.problems]
        return "\n".join(lines)


class _HashingReader:
    """A read-only file wrapper that hashes what passes through (one pass: hash + tar walk)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def drain(self, chunk: int = 8 << 20) -> str:
        while self.read(chunk):
            pass
        return self.h.hexdigest()


def _member_problem(member: tarfile.TarInfo) -> str | None:
    if not member.isfile():
        return f"member {member.name!r} is not a regular file (tar type {member.type!r})"
    key, _, ext = member.name.partition(".")
    if key_problem(key) or ext not in EXTENSIONS:
        return f"member name {member.name!r} is not <safe key>.<{'|'.join(EXTENSIONS)}>"
    return None


def _check_member_content(member: tarfile.TarInfo, data: bytes) -> str | None:
    """--deep: the member decodes as what its extension says."""
    ext = member.name.partition(".")[2]
    try:
        if ext == "json":
            json.loads(data)
        elif ext == "txt":
            data.decode("utf-8")
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error is this member's problem
        return f"member {member.name!r} does not decode as {ext}: {type(e).__name__}: {str(e)[:120]}"
    return None


def read_shard(fs, path: str, deep: bool = False) -> tuple[str, int, list[str]]:
    """One pass over a shard: (sha256, samples, problems). Checks every member's type and name
    (and with ``deep`` reads and decodes every member)."""
    problems: list[str] = []
    keys: set[str] = set()
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    problem = _member_problem(member)
                    if problem:
                        problems.append(problem)
                        continue
                    keys.add(member.name.partition(".")[0])
                    if deep:
                        problem = _check_member_content(member, tar.extractfile(member).read())
                        if problem:
                            problems.append(problem)
        except tarfile.TarError as e:
            problems.append(f"not a readable tar: {e}")
        digest = reader.drain()
    return digest, len(keys), problems


def _manifest_shards(store: Store) -> dict[str, dict] | None:
    """Shard path (relative to ``shards/``) -> {samples, sha256, bytes} from a build's shard
    manifests, or None where there are none (a published copy)."""
    if not any(store.exists(manifest_rel(f"{s}_shards")) for s in SPLITS):
        return None
    found: dict[str, dict] = {}
    for split in SPLITS:
        if store.exists(manifest_rel(f"{split}_shards")):  # a million rows: the index's columns, in Arrow
            shards, _, _ = _shards_of_table(read_manifest_table(store, f"{split}_shards", INDEX_COLUMNS))
            found.update({p: {k: e[k] for k in ("samples", "sha256", "bytes")} for p, e in shards.items()})
    return found


def verify_shards(url_or_dir: str, storage_options: dict | None = None, deep: bool = False) -> VerifyReport:
    """Check every shard of a build (``OUT`` or ``OUT/shards``, local or any fsspec URL) against
    its ``index.json`` and, in a build folder, against the shard manifests: missing, extra (a .tar
    the index does not list), altered (size or sha256 differs), unsafe (not a regular file inside
    OUT, a member that is not a regular file or has an unsafe name) and mismatched shards (sample
    counts, sizes or hashes that differ between the tar, the index and the manifests). One pass per
    shard hashes it and walks its members; ``deep`` also reads and decodes every member."""
    store = Store(url_or_dir, **(storage_options or {}))
    report = VerifyReport(target=url_or_dir)
    base = next((b for b in ("shards", "") if store.exists(f"{b}/index.json".lstrip("/"))), None)
    if base is None:
        report.errors.append("no shards/index.json (or index.json) here: nothing to verify against")
        return report
    report.index_path = f"{base}/index.json".lstrip("/")
    try:
        index = store.read_json(report.index_path)
    except ValueError as e:
        report.errors.append(f"{report.index_path} is not valid JSON: {e}")
        return report
    problems = index_problems(index)
    if problems:
        report.errors.extend(f"{report.index_path} does not match its schema: {p}" for p in problems[:10])
        return report
    listed = {s["path"]: s for sec in index["splits"].values() for s in sec["shards"]}
    for split, sec in index["splits"].items():
        total = sum(s["samples"] for s in sec["shards"])
        if sec["totals"]["samples"] != total:
            report.errors.append(f"{report.index_path}: split {split} totals {sec['totals']['samples']} samples, "
                                 f"its shards list {total}")
    manifest = _manifest_shards(store) if base == "shards" else None
    if manifest is not None:
        for rel in sorted(set(manifest) | set(listed)):
            want, got = manifest.get(rel), listed.get(rel)
            if want is None or got is None:
                where = "the manifests" if want is None else "the index"
                report.problems.append(ShardProblem("mismatch", rel, f"not in {where}"))
            elif (got["samples"], got["sha256"], got["bytes"]) != (want["samples"], want["sha256"], want["bytes"]):
                report.problems.append(ShardProblem(
                    "mismatch", rel, f"the index says {got['samples']} samples, {got['bytes']} bytes, sha256 "
                    f"{got['sha256'][:12]}; the manifests say {want['samples']}, {want['bytes']}, {want['sha256'][:12]}"))
    prefix = store.path(base) + "/"
    present = {}
    for path, info in store.fs.find(store.path(base), detail=True).items():
        rel = path[len(prefix):] if path.startswith(prefix) else path
        if rel.endswith(".tar") and not rel.rsplit("/", 1)[-1].startswith("."):
            present[rel] = int(info["size"])
    for rel in sorted(listed):
        want = listed[rel]
        report.checked += 1
        if rel not in present:
            report.problems.append(ShardProblem("missing", rel, "listed in the index but not found"))
            continue
        unsafe = local_file_problem(store, f"{base}/{rel}".lstrip("/"))
        if unsafe:
            report.problems.append(ShardProblem("unsafe", rel, unsafe))
            continue
        if present[rel] != want["bytes"]:
            report.problems.append(ShardProblem(
                "altered", rel, f"size is {present[rel]} bytes, the index says {want['bytes']}"))
            continue
        digest, samples, member_problems = read_shard(store.fs, store.path(f"{base}/{rel}".lstrip("/")), deep)
        if digest != want["sha256"]:
            report.problems.append(ShardProblem(
                "altered", rel, f"sha256 is {digest}, the index says {want['sha256']} (same size: content changed)"))
            continue
        report.problems += [ShardProblem("unsafe", rel, p) for p in member_problems[:5]]
        if samples != want["samples"]:
            report.problems.append(ShardProblem(
                "mismatch", rel, f"holds {samples} samples, the index says {want['samples']}"))
    for rel in sorted(set(present) - set(listed)):
        report.problems.append(ShardProblem("extra", rel, f"a .tar of {present[rel]} bytes the index does not list"))
    return report
