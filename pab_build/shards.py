"""Stages ``test_shards`` and ``train_shards``: WebDataset tar shards, the shard index, verification.

A shard is a plain (uncompressed) tar written with :mod:`tarfile` so every byte is ours: mtime 0,
uid/gid 0, empty user/group names, mode 0o644, samples sorted by key, members of a sample in the
fixed order of :data:`EXTENSIONS`. The same inputs therefore give byte-identical shards.

Sample keys become tar member names ``<key>.<ext>``; WebDataset splits a member name at its first
dot, so a key may only hold ``[A-Za-z0-9_-]`` (no dots, no slashes, no ``..``): anything else is
rejected with a reason, never escaped into a path.

A unit is one shard. The planner sorts samples by key, keeps a test pair (both images of a clip)
in one shard and starts a new shard when the next group would exceed ``max_samples_per_shard`` or
``max_bytes_per_shard``; the byte size is exact (tar headers and padding included), computed from
the source file sizes. After a split's manifest is written, ``finalize`` removes shard files no
longer referenced and rewrites ``shards/index.json`` (every shard's path, samples, bytes and sha256;
per-split totals); :func:`verify_shards` re-hashes a build or a published copy against it.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import re
import tarfile
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Iterator

from .config import REPO_ROOT, model_id
from .frames import BEHAVIORS
from .frames import sample_key as frame_sample_key
from .hard_negatives import BEHAVIOR_OF_KIND, choose_hard_negatives
from .manifests import OK, manifest_rel, read_manifest, reject
from .store import Store
from .units import Context, Stage, Unit

log = logging.getLogger(__name__)

FORMAT = "pab-webdataset-shards"
FORMAT_VERSION = 1
INDEX_REL = "shards/index.json"
INDEX_SCHEMA_PATH = REPO_ROOT / "manifests" / "shard_index.schema.json"
EXTENSIONS = ("jpg", "json", "pose.png", "txt")  # member order within a sample
FILE_EXTENSIONS = ("jpg", "pose.png")  # members copied from image files; txt/json are generated
MAX_KEY_LEN = 90  # keeps "<key>.pose.png" within ustar's 100-character name field
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BLOCK = tarfile.BLOCKSIZE
SPLITS = ("test", "train")
# models each split's samples record (config.model_id: path as written + revision)
SPLIT_MODELS = {"test": ("openpose", "resnet50", "qwen2_vl"), "train": ("sdxl", "openpose", "qwen2_vl")}
_ATTRIBUTE_FIELDS = ("action", "action_raw", "anomaly", "anomaly_raw", "scene", "scene_raw")
_index_lock = threading.Lock()


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


_SHARD_NAME = {s: re.compile(rf"{s}-\d{{6}}\.tar") for s in SPLITS}


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
            "attributes": {a: text for a in _ATTRIBUTE_FIELDS}}
    if split == "test":
        meta.update(time_s=Value("float64"), pair_key=text)
    else:
        meta.update(kind=text, seed=Value("int64"), hard_negative_key=text, hard_negative_caption=text)
    return Features({"jpg": Image(), "json": meta, "pose.png": Image(), "txt": text,
                     "__key__": text, "__url__": text})


# -- planning ---------------------------------------------------------------------------------
def _rows_by_key(store: Store, stage: str, needed_by: str) -> dict[str, dict]:
    if not store.exists(manifest_rel(stage)):
        raise FileNotFoundError(f"{needed_by} needs {manifest_rel(stage)}: run the {stage} stage first")
    return {r["sample_key"]: r for r in read_manifest(store, stage)}


def _ok(rows: dict[str, dict], key: str) -> dict | None:
    row = rows.get(key)
    return row if row is not None and row["status"] == OK else None


def _file_sizes(store: Store, rels: Iterable[str]) -> dict[str, int]:
    """Sizes of files (relative paths) that exist: one recursive listing per top-level folder
    (one request per 1000 objects on object stores) instead of one stat per file."""
    rels = set(rels)
    listed: dict[str, int] = {}
    for top in sorted({r.split("/", 1)[0] for r in rels}):
        base = store.path(top)
        if not store.fs.exists(base):
            continue
        for path, info in store.fs.find(base, detail=True).items():
            listed[path] = int(info["size"])
    sizes = {}
    for rel in rels:
        size = listed.get(store.path(rel))
        if size is None:  # a listing that spells paths differently: ask for this one
            try:
                size = int(store.fs.size(store.path(rel)))
            except (FileNotFoundError, OSError, ValueError):
                continue
        sizes[rel] = size
    return sizes


def _path_problem(store: Store, rel: Any) -> bool:
    if not isinstance(rel, str) or not rel.strip("/"):
        return True
    try:
        store.path(rel)
    except ValueError:  # ".." would leave the output root
        return True
    return False


def _attach_file_sizes(store: Store, items: list[dict]) -> None:
    """Record each source file's size (it counts towards the shard bound, and in the unit's input
    hash); an item whose file is missing is rejected."""
    for it in items:
        if "reject" not in it and (bad := [p for p in it["files"].values() if _path_problem(store, p)]):
            it["reject"] = f"unsafe file path(s) in the manifests: {', '.join(map(repr, bad))}"
    sizes = _file_sizes(store, (it["files"][e] for it in items if "reject" not in it for e in FILE_EXTENSIONS))
    for it in items:
        if "reject" in it:
            continue
        missing = [it["files"][e] for e in FILE_EXTENSIONS if it["files"][e] not in sizes]
        if missing:
            it["reject"] = f"file missing: {', '.join(missing)}"
        else:
            it["file_sizes"] = {e: sizes[it["files"][e]] for e in FILE_EXTENSIONS}


def sample_tar_bytes(it: dict) -> int:
    """Bytes a planned sample's members take in a tar."""
    generated = (len(it["txt"].encode("utf-8")), len(sample_json(it["json"])))
    return sum(member_bytes(n) for n in (*it["file_sizes"].values(), *generated))


def fit_problem(group: list[dict], max_samples: int, max_bytes: int) -> str | None:
    """Why ``group`` cannot fit in a shard even alone (None when it can)."""
    what = f"{'pair' if len(group) > 1 else 'sample'} of {len(group)} image(s)"
    if len(group) > max_samples:
        return f"{what} does not fit in a shard: shards.max_samples_per_shard={max_samples}"
    size = tar_bytes(sum(sample_tar_bytes(it) for it in group))
    if size > max_bytes:
        return f"{what} makes a {size}-byte shard alone: over shards.max_bytes_per_shard={max_bytes}"
    return None


def pack_units(stage: str, groups: list[list[dict]], rejected: list[dict], max_samples: int,
               max_bytes: int) -> list[Unit]:
    """Groups (a test pair, or one training image) -> shard units. Groups go in key order; a new
    shard starts when the next group would exceed either bound; a group that cannot fit even
    alone is rejected. Rejected items join the unit whose key range they fall in."""
    shards: list[list[dict]] = []
    count = total = 0
    rejected = list(rejected)
    for group in sorted(groups, key=lambda g: min(it["sample_key"] for it in g)):
        why = fit_problem(group, max_samples, max_bytes)
        if why:
            rejected.extend({**it, "reject": why} for it in group)
            continue
        size = sum(sample_tar_bytes(it) for it in group)
        if not shards or count + len(group) > max_samples or tar_bytes(total + size) > max_bytes:
            shards.append([])
            count = total = 0
        shards[-1].extend(group)
        count, total = count + len(group), total + size
    firsts = [min(it["sample_key"] for it in items) for items in shards]
    if not shards and rejected:
        shards = [[]]
    for it in sorted(rejected, key=lambda it: it["sample_key"]):
        shards[max(0, bisect.bisect_right(firsts, it["sample_key"]) - 1)].append(it)
    return [Unit(stage, f"{n:06d}", tuple(sorted(items, key=lambda it: it["sample_key"])))
            for n, items in enumerate(shards)]


def _attributes(row: dict) -> dict:
    return {k: row.get(k) for k in _ATTRIBUTE_FIELDS}


def _models(cfg, split: str) -> dict[str, str]:
    return {name: model_id(cfg, name) for name in SPLIT_MODELS[split]}


# the test branch in order; review may key its rows by image or by clip (and may be absent)
_TEST_UPSTREAM = ("frames", "pose", "pairs", "review", "test_captions", "test_attributes")


def _why_dropped(key: str, identity: str, manifests: dict[str, dict[str, dict]], this_stage: str,
                 planned_rejects: dict[str, str]) -> str:
    """Name the first stage (and its reason) that dropped sample ``key``."""
    for stage, rows in manifests.items():
        row = rows.get(key) or rows.get(identity)
        if row is None:
            return f"is missing from the {stage} manifest"
        if row["status"] != OK:
            return f"was rejected by {stage}: {row['reason']}"
    if key in planned_rejects:
        return f"was rejected by {this_stage}: {planned_rejects[key]}"
    return "is not among the ok samples"


def plan_test_shards(ctx: Context) -> list[Unit]:
    store, cfg, stage = ctx.store, ctx.cfg, "test_shards"
    manifests = {s: _rows_by_key(store, s, stage) for s in _TEST_UPSTREAM
                 if s != "review" or store.exists(manifest_rel(s))}
    models = _models(cfg, "test")
    items: list[dict] = []
    for key in sorted(k for k, r in manifests["test_attributes"].items() if r["status"] == OK):
        joined = {s: _ok(manifests[s], key) for s in ("frames", "pose", "pairs", "test_captions")}
        frame = joined["frames"] or {}
        if "review" in manifests:  # a pair a reviewer rejected never ships, whatever ran after
            joined["review"] = _ok(manifests["review"], key) or _ok(manifests["review"], frame.get("clip_key", ""))
        item = {"sample_key": key, "clip_key": frame.get("clip_key"), "behavior": frame.get("behavior")}
        lacking = [s for s, row in joined.items() if row is None]
        if lacking:
            item["reject"] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        elif problem := key_problem(key):
            item["reject"] = problem
        elif key != frame_sample_key(frame["clip_key"], frame["behavior"]):  # pairs are found by this rule
            item["reject"] = (f"sample key {key!r} is not <clip_key>-<behavior> "
                              f"({frame_sample_key(frame['clip_key'], frame['behavior'])!r})")
        else:
            cap, pose, pair = joined["test_captions"], joined["pose"], joined["pairs"]
            item.update({
                "files": {"jpg": frame["image_path"], "pose.png": pose["pose_path"]},
                # upstream hashes: a changed image changes this unit's input hash, so it is rewritten
                "sha256": {"jpg": frame["image_sha256"], "pose.png": pose["pose_sha256"]},
                "txt": cap["caption"],
                "json": {
                    "sample_key": key, "clip_name": frame["clip_name"], "identity": frame["clip_key"],
                    "behavior": frame["behavior"], "time_s": frame["time_s"], "pair_key": pair["pair_key"],
                    "source_caption": frame["source_caption"],
                    "attributes": _attributes(manifests["test_attributes"][key]),
                    "models": models, "prompt_version": cap["prompt_version"],
                },
            })
        items.append(item)
    _attach_file_sizes(store, items)

    # both images of a pair, or neither
    ok = {it["sample_key"]: it for it in items if "reject" not in it}
    planned_rejects = {it["sample_key"]: it["reject"] for it in items if "reject" in it}
    groups: dict[str, list[dict]] = {}
    for it in ok.values():
        groups.setdefault(it["clip_key"], []).append(it)
    complete = []
    for identity, group in sorted(groups.items()):
        for it in group:
            other = frame_sample_key(identity, next(b for b in BEHAVIORS if b != it["behavior"]))
            if other not in ok:
                why = _why_dropped(other, identity, manifests, stage, planned_rejects)
                it["reject"] = f"counterpart {other} {why}"
        if all("reject" not in it for it in group):
            complete.append(group)
    rejected = [it for it in items if "reject" in it]
    return pack_units(stage, complete, rejected, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)


def _link_hard_negatives(items: list[dict], max_samples: int, max_bytes: int) -> None:
    """Give every shippable training item its hard negative (or reject it). Links are chosen only
    among items that will be shipped; an item too big for a shard is dropped first, and the links
    are chosen again until nothing more drops (each round only removes items)."""
    while True:
        shipped = [it for it in items if "reject" not in it]
        links = choose_hard_negatives(shipped)
        by_key = {it["sample_key"]: it for it in shipped}
        for it in shipped:
            neg = links[it["sample_key"]]
            if neg is None:
                it["reject"] = "no counterpart image of the same identity"
            else:
                it["json"].update(hard_negative_key=neg, hard_negative_caption=by_key[neg]["txt"])
        too_big = [(it, why) for it in shipped if "reject" not in it
                   if (why := fit_problem([it], max_samples, max_bytes))]
        if not too_big:
            return
        for it, why in too_big:
            it["reject"] = why


def plan_train_shards(ctx: Context) -> list[Unit]:
    store, cfg, stage = ctx.store, ctx.cfg, "train_shards"
    attributes = _rows_by_key(store, "attributes", stage)
    generated = _rows_by_key(store, "generate", stage)
    gen_pose = _rows_by_key(store, "gen_pose", stage)
    captions = _rows_by_key(store, "train_captions", stage)
    prompts = _rows_by_key(store, "prompts", stage)
    models = _models(cfg, "train")
    items: list[dict] = []
    for key in sorted(k for k, r in attributes.items() if r["status"] == OK):
        gen = _ok(generated, key)
        joined = {"generate": gen, "gen_pose": _ok(gen_pose, key), "train_captions": _ok(captions, key),
                  "prompts": _ok(prompts, gen["prompt_key"]) if gen else None}
        item = {"sample_key": key, "clip_key": gen and gen["clip_key"], "kind": gen and gen["kind"]}
        lacking = [s for s, row in joined.items() if row is None]
        if lacking:
            item["reject"] = f"no ok row in the {', '.join(lacking)} manifest(s)"
        elif problem := key_problem(key):
            item["reject"] = problem
        elif gen["kind"] not in BEHAVIOR_OF_KIND:
            item["reject"] = f"kind {gen['kind']!r} is not n, a or a+"
        else:
            cap, pose, prompt = joined["train_captions"], joined["gen_pose"], joined["prompts"]
            behavior = BEHAVIOR_OF_KIND[gen["kind"]]
            item.update({
                "behavior": behavior, "index": gen["index"],
                "files": {"jpg": gen["image_path"], "pose.png": pose["pose_path"]},
                "sha256": {"jpg": gen["image_sha256"], "pose.png": pose["pose_sha256"]},
                "txt": cap["caption"],
                "json": {
                    "sample_key": key, "identity": gen["clip_key"], "clip_name": prompt["clip_name"],
                    "kind": gen["kind"], "behavior": behavior, "source_caption": prompt["prompt"],
                    "seed": gen["seed"], "models": models, "attributes": _attributes(attributes[key]),
                    "prompt_version": cap["prompt_version"],
                    "hard_negative_key": None, "hard_negative_caption": None,  # set below
                },
            })
        items.append(item)
    _attach_file_sizes(store, items)  # a sample whose files are missing is no one's hard negative
    _link_hard_negatives(items, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)
    groups = [[it] for it in items if "reject" not in it]
    rejected = [it for it in items if "reject" in it]
    return pack_units(stage, groups, rejected, cfg.shards.max_samples_per_shard, cfg.shards.max_bytes_per_shard)


# -- running a unit ---------------------------------------------------------------------------
def _row(it: dict, split: str, **fields) -> dict:
    row = {"split": split, "clip_key": it.get("clip_key"),
           "behavior": it.get("behavior"), **fields}
    if split == "train":
        row["kind"] = it.get("kind")
    return row


def write_shard_unit(ctx: Context, unit: Unit, split: str) -> list[dict]:
    """Write the unit's shard (its ok items) and return one row per item."""
    rows = [reject(it, it["reject"], **_row(it, split)) for it in unit.items if "reject" in it]
    ok = [it for it in unit.items if "reject" not in it]
    if not ok:
        return rows
    number = int(unit.unit_id)
    samples = []
    for it in ok:
        members = {ext: ctx.store.read_bytes(it["files"][ext]) for ext in FILE_EXTENSIONS}
        members["txt"] = it["txt"].encode("utf-8")
        members["json"] = sample_json(it["json"])
        samples.append((it["sample_key"], members))
    data = build_shard(samples)
    limit = ctx.cfg.shards.max_bytes_per_shard
    if len(data) > limit:  # a source file grew between planning and now: plan again
        raise RuntimeError(f"shard {unit.unit_id} came to {len(data)} bytes, over max_bytes_per_shard={limit}; "
                           "source files changed since planning")
    rel = shard_rel(split, number)
    digest = ctx.store.write_bytes(rel, data)
    for it in ok:
        extra = {"hard_negative_key": it["json"]["hard_negative_key"]} if split == "train" else {}
        fields = _row(it, split, shard=rel, shard_index=number, shard_bytes=len(data), shard_sha256=digest, **extra)
        rows.append({"sample_key": it["sample_key"], "status": OK, "reason": None, **fields})
    return rows


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


def split_section(split: str, rows: list[dict]) -> dict:
    """The index entry of one split, from its shard manifest rows."""
    shards: dict[str, dict] = {}
    normal = anomaly = 0
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


def update_shard_index(store: Store, split: str, rows: list[dict]) -> dict:
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
                sections[s] = split_section(s, read_manifest(store, f"{s}_shards"))
            elif s in old:
                sections[s] = old[s]
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "splits": sections}
        store.write_json(INDEX_REL, index)
        return index


def remove_stale_shards(store: Store, split: str, rows: list[dict]) -> list[str]:
    """Delete this split's shard files that no ok row references (left by an earlier, larger
    build); only names this stage writes are touched."""
    keep = {r["shard"] for r in rows if r["status"] == OK}
    removed = []
    for name in store.listdir(f"shards/{split}"):
        rel = f"shards/{split}/{name}"
        if _SHARD_NAME[split].fullmatch(name) and rel not in keep:
            store.remove(rel)
            removed.append(rel)
    if removed:
        log.info("removed %d stale %s shard(s): %s", len(removed), split, ", ".join(removed[:5]))
    return removed


def finalize_shards(ctx: Context, rows: list[dict], split: str) -> None:
    remove_stale_shards(ctx.store, split, rows)
    update_shard_index(ctx.store, split, rows)


# -- verification -----------------------------------------------------------------------------
def index_problems(index: Any) -> list[str]:
    """Schema violations of a loaded index (empty when valid)."""
    import jsonschema

    schema = json.loads(INDEX_SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(index), key=lambda e: list(map(str, e.absolute_path)))]


@dataclass
class ShardProblem:
    kind: str  # "missing" | "extra" | "altered"
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
                f"{len(self.missing)} missing, {len(self.extra)} extra, {len(self.altered)} altered")
        lines = [head] + [f"  error: {e}" for e in self.errors]
        lines += [f"  {p.kind}: {p.path}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def _sha256_of(fs, path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(url_or_dir: str, storage_options: dict | None = None) -> VerifyReport:
    """Re-hash every shard of a build (``OUT`` or ``OUT/shards``, local or any fsspec URL) against
    its ``index.json``: report missing, extra (a .tar the index does not list) and altered (size
    or sha256 differs) shards."""
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
        if present[rel] != want["bytes"]:
            report.problems.append(ShardProblem(
                "altered", rel, f"size is {present[rel]} bytes, the index says {want['bytes']}"))
            continue
        digest = _sha256_of(store.fs, store.path(f"{base}/{rel}".lstrip("/")))
        if digest != want["sha256"]:
            report.problems.append(ShardProblem(
                "altered", rel, f"sha256 is {digest}, the index says {want['sha256']} (same size: content changed)"))
    for rel in sorted(set(present) - set(listed)):
        report.problems.append(ShardProblem("extra", rel, f"a .tar of {present[rel]} bytes the index does not list"))
    return report


# -- the stages -------------------------------------------------------------------------------
def run_test_shards_unit(ctx: Context, unit: Unit) -> list[dict]:
    return write_shard_unit(ctx, unit, "test")


def run_train_shards_unit(ctx: Context, unit: Unit) -> list[dict]:
    return write_shard_unit(ctx, unit, "train")


def finalize_test_shards(ctx: Context, rows: list[dict]) -> None:
    finalize_shards(ctx, rows, "test")


def finalize_train_shards(ctx: Context, rows: list[dict]) -> None:
    finalize_shards(ctx, rows, "train")


TEST_SHARDS_STAGE = Stage(
    name="test_shards",
    plan_units=plan_test_shards,
    run_unit=run_test_shards_unit,
    config_keys=("shards", *(f"models.{m}" for m in SPLIT_MODELS["test"])),
    finalize=finalize_test_shards,
)

TRAIN_SHARDS_STAGE = Stage(
    name="train_shards",
    plan_units=plan_train_shards,
    run_unit=run_train_shards_unit,
    config_keys=("shards", *(f"models.{m}" for m in SPLIT_MODELS["train"])),
    finalize=finalize_train_shards,
)
