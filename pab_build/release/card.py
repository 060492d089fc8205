"""The dataset card: ``OUT/README.md`` in Hugging Face dataset-card style, plus its figures under
``OUT/card/``.

Everything in the card is computed from the stage manifests, ``shards/index.json`` and
``config.yaml``; nothing is typed in by hand, so the card of a build always describes that build.
Shipped samples are the ok rows of ``test_shards`` / ``train_shards``. Manifests are read a few
columns at a time and counted in Arrow (a full build has 1.5M rows per stage). The figures are drawn by
:mod:`pab_build.release.card_figures`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ..manifests import OK, STAGE_COLUMNS, left_join, manifest_rel, read_manifest_table
from ..shards.index import ratio_text
from ..store import Store, out_store
from .card_figures import class_chart_png, example_grid_png
from .card_hf import dataset_info, size_category

log = logging.getLogger(__name__)

CARD_REL = "README.md"
CARD_DIR = "card"
TOP_CLASSES = 15
TOP_REASONS_INLINE = 3
MAX_REASON_GROUPS = 20
EXAMPLE_PAIRS = 4
# like the original PAB: research only. Change here if a build's sources allow more.
LICENSE = {"license": "other", "license_name": "pab-research-only",
           "license_link": "https://github.com/Shuyu-XJTU/CMP#pab"}
SPLIT_TITLES = {"train": ("Training set", "Synthesis"), "test": ("Test set", "Real-world")}
SPLIT_CAPTIONS = {"train": "train_captions", "test": "test_captions"}
SPLIT_ATTRIBUTES = {"train": "train_attributes", "test": "test_attributes"}
ATTRIBUTE_OF_BEHAVIOR = {"action": "normal", "anomaly": "anomaly", "scene": None}  # None: every sample


@dataclass
class SplitStats:
    """One split's row of the paper's Table 2, and its attribute class counts."""

    split: str
    images: int
    normal: int
    anomaly: int
    avg_caption_words: float | None
    classes: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # attribute -> top (class, count)

    @property
    def ratio(self) -> str:
        return ratio_text(self.normal, self.anomaly)


@dataclass
class StageFunnel:
    stage: str
    rows_in: int
    kept: int
    reasons: list[tuple[str, int]]  # (reason pattern, rows), most frequent first

    @property
    def rejected(self) -> int:
        return self.rows_in - self.kept


# -- numbers -----------------------------------------------------------------------------------
def caption_words(caption: str | None) -> int:
    return len((caption or "").split())


_KEY = re.compile(r"\bc[0-9a-f]{10}(?:-[A-Za-z0-9_+]+)*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def reason_pattern(reason: str | None) -> str:
    """A rejection reason with its particulars (sample keys, quoted text, numbers) blanked, so
    "limb ratio 2.61 > 2.5" and "limb ratio 3.00 > 2.5" count as one reason."""
    text = _KEY.sub("<key>", reason or "(no reason given)")
    text = _QUOTED.sub("'…'", text)
    return _NUMBER.sub("#", text).strip()


def stage_funnel(stage: str, table: pa.Table) -> StageFunnel:
    """Rows in, kept, and the rejection reasons grouped by pattern: counted per distinct reason in
    Arrow, so the Python work is per distinct reason, not per row."""
    ok = pc.fill_null(pc.equal(table["status"], OK), False)
    kept = pc.sum(ok).as_py() or 0
    reasons: Counter = Counter()
    if kept < table.num_rows:
        for entry in pc.value_counts(table["reason"].filter(pc.invert(ok))).to_pylist():
            reasons[reason_pattern(entry["values"])] += entry["counts"]
    return StageFunnel(stage, table.num_rows, kept, sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def top_classes(values: pa.Array | pa.ChunkedArray, n: int = TOP_CLASSES) -> list[tuple[str, int]]:
    """The ``n`` most frequent non-empty values (stripped), ties broken by name (deterministic)."""
    counts: Counter = Counter()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        for entry in pc.value_counts(values.drop_null()).to_pylist():  # Python per distinct value only
            if entry["values"].strip():
                counts[entry["values"].strip()] += entry["counts"]
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def manifest_stages(store: Store) -> list[str]:
    """Stages with a manifest in this build, in pipeline order (unknown ones last, by name)."""
    present = {n[: -len(".parquet")] for n in store.listdir("manifests") if n.endswith(".parquet")}
    return [s for s in STAGE_COLUMNS if s in present] + sorted(present - set(STAGE_COLUMNS))


def read_columns(store: Store, stage: str, columns) -> pa.Table | None:
    """Those of ``columns`` the stage's manifest has (the rest of a million-row manifest stays on
    disk), or None where the stage has no manifest."""
    if not store.exists(manifest_rel(stage)):
        return None
    with store.fs.open(store.path(manifest_rel(stage)), "rb") as f:
        names = set(pq.read_schema(f).names)
    return read_manifest_table(store, stage, [c for c in columns if c in names])


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """``table[name]``, or all nulls where the manifest has no such column."""
    if name in table.column_names:
        return table[name]
    return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])


def _caption_word_total(captions: pa.ChunkedArray) -> int:
    """Sum of ``caption_words`` over the column, a slice at a time (Python's ``str.split``: the
    same word count as before, without a million strings alive at once)."""
    total = 0
    for start in range(0, len(captions), 65536):
        total += sum(caption_words(c) for c in captions.slice(start, 65536).to_pylist())
    return total


def shipped_table(store: Store, split: str) -> pa.Table | None:
    """The ok rows of ``<split>_shards``: key, behavior and (training) hard negative."""
    table = read_columns(store, f"{split}_shards", ("sample_key", "status", "behavior", "hard_negative_key"))
    if table is None:
        return None
    table = table.filter(pc.fill_null(pc.equal(table["status"], OK), False))
    for name in ("behavior", "hard_negative_key"):
        if name not in table.column_names:
            table = table.append_column(name, _column(table, name))
    return table


def split_stats(split: str, store: Store) -> SplitStats | None:
    shipped = shipped_table(store, split)
    if shipped is None:
        return None
    normal = pc.fill_null(pc.equal(shipped["behavior"], "normal"), False)
    anomaly = pc.fill_null(pc.equal(shipped["behavior"], "anomaly"), False)
    captions = read_columns(store, SPLIT_CAPTIONS[split], ("sample_key", "caption"))
    words = None
    if captions is not None:  # any row of the captions manifest counts, as before (a null caption: 0 words)
        matched = pc.is_valid(pc.index_in(shipped["sample_key"], value_set=captions["sample_key"]))
        texts = left_join(shipped.select(["sample_key"]), captions.select(["sample_key"]).append_column(
            "caption", _column(captions, "caption")), "sample_key")["caption"].filter(matched)
        words = (_caption_word_total(texts), len(texts)) if len(texts) else None
    stats = SplitStats(
        split=split, images=shipped.num_rows,
        normal=pc.sum(normal).as_py() or 0, anomaly=pc.sum(anomaly).as_py() or 0,
        avg_caption_words=words[0] / words[1] if words else None,
    )
    attributes = read_columns(store, SPLIT_ATTRIBUTES[split], ("sample_key", *ATTRIBUTE_OF_BEHAVIOR))
    for attr, behavior in ATTRIBUTE_OF_BEHAVIOR.items():
        if attributes is None:
            stats.classes[attr] = []
            continue
        values = left_join(shipped.select(["sample_key"]), attributes.select(["sample_key"]).append_column(
            attr, _column(attributes, attr)), "sample_key")[attr]
        if behavior is not None:
            values = values.filter(normal if behavior == "normal" else anomaly)
        stats.classes[attr] = top_classes(values)
    return stats


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@`` -> no revision."""
    name, at, rev = model_id.rpartition("@")
    return (name, rev) if at and name and "/" not in rev else (model_id, None)


def models_used(stage: str, table: pa.Table) -> list[tuple[str, str, str | None, int]]:
    """(stage, model, revision, ok rows) for every model id the stage's manifest records."""
    if "model_id" not in table.column_names:
        return []
    ids = table["model_id"].filter(pc.fill_null(pc.equal(table["status"], OK), False))
    counts = {e["values"]: e["counts"] for e in pc.value_counts(ids.drop_null()).to_pylist() if e["values"]}
    return [(stage, *split_model_id(mid), n) for mid, n in sorted(counts.items())]


def _short(text: str | None, words: int = 8) -> str:
    parts = (text or "").split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def _lookup(store: Store, stage: str, keys: list[str], column: str) -> dict:
    """``{sample_key: column}`` of the manifest's rows (any status) with one of ``keys``."""
    table = read_columns(store, stage, ("sample_key", column))
    if table is None:
        return {}
    hit = table.filter(pc.is_in(table["sample_key"], value_set=pa.array(keys, pa.string())))
    return dict(zip(hit["sample_key"].to_pylist(), _column(hit, column).to_pylist()))


def example_pairs(split: str, store: Store) -> list[tuple[bytes, str, bytes, str]]:
    """Up to EXAMPLE_PAIRS (normal, anomaly) image pairs of one identity from the shipped samples:
    test pairs by clip, training normal images beside their hard negative."""
    shipped = shipped_table(store, split)
    if shipped is None:
        return []
    normal = shipped.filter(pc.fill_null(pc.equal(shipped["behavior"], "normal"), False))
    if split == "test":
        partner = pc.binary_join_element_wise(
            pc.replace_substring_regex(normal["sample_key"], pattern="-normal$", replacement=""), "-anomaly", "")
    else:
        partner = normal["hard_negative_key"]
    links = pa.table({"normal": normal["sample_key"], "anomaly": partner})
    links = links.filter(pc.is_in(links["anomaly"], value_set=shipped["sample_key"])).sort_by("normal")
    image_stage = "frames" if split == "test" else "generate"
    pairs = []
    for start in range(0, links.num_rows, 64):  # the first few candidates whose images are still there
        chunk = links.slice(start, 64)
        keys = chunk["normal"].to_pylist() + chunk["anomaly"].to_pylist()
        images, captions = _lookup(store, image_stage, keys, "image_path"), _lookup(store, SPLIT_CAPTIONS[split], keys, "caption")
        for normal_key, anomaly_key in zip(chunk["normal"].to_pylist(), chunk["anomaly"].to_pylist()):
            try:
                left, right = store.read_bytes(images[normal_key]), store.read_bytes(images[anomaly_key])
            except (KeyError, TypeError, FileNotFoundError, ValueError):
                continue  # an image gone since the build: show another pair
            pairs.append((left, f"normal: {_short(captions.get(normal_key), 40)}",
                          right, f"anomaly: {_short(captions.get(anomaly_key), 40)}"))
            if len(pairs) == EXAMPLE_PAIRS:
                return pairs
    return pairs


# -- the card ----------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(profile: str, splits: list[SplitStats], index: dict) -> str:
    configs, infos = dataset_info(index)
    meta = {
        **LICENSE,
        "task_categories": ["text-retrieval", "image-to-text", "image-classification"],
        "language": ["en"],
        "size_categories": [size_category(sum(s.images for s in splits))],
        "tags": ["webdataset", "text-based-person-search", "anomaly", "synthetic"],
        "pretty_name": f"PAB (Pedestrian Anomaly Behavior), build {profile}",
        "configs": configs,
    }
    if infos:
        meta["dataset_info"] = infos
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def generation_notes(gen: dict, funnel: list[StageFunnel]) -> str:
    """How the training images were generated where the paper says nothing, and where this build
    departs from it (the content filter)."""
    if not gen:
        return ""
    filtered = sum(n for f in funnel if f.stage == "generate" for r, n in f.reasons if r.startswith("content filter"))
    lines = [f"- Sampler: `generate.scheduler: {gen.get('scheduler', 'default')}`, {gen.get('steps')} steps, guidance "
             f"{gen.get('guidance_scale')} (the paper gives none of these; `dpmpp_2m_karras` is RealVisXL V4.0's "
             "model-card recommendation, `default` the repository's own scheduler)."]
    if gen.get("content_filter", True):
        lines.append(f"- **Deviation from the paper: content filter.** Every generated image was screened by the Stable "
                     f"Diffusion safety checker (`models.safety_checker`); {filtered} flagged image(s) were rejected "
                     "(`content filter: nsfw`) and are not in the dataset. The paper screens nothing, although "
                     "RealVisXL's model card says it can produce NSFW images.")
    else:
        lines.append("- No content filter (`generate.content_filter: false`), as in the paper: RealVisXL's model "
                     "card says it can produce NSFW images, and nothing screened them.")
    return "## Generation\n\n" + "\n".join(lines) + "\n"


def render_card(*, profile: str, config_sha256: str | None, splits: list[SplitStats], funnel: list[StageFunnel],
                models: list[tuple], configured_models: dict, index: dict, charts: dict[str, dict[str, str]],
                grids: dict[str, str], generation: dict | None = None) -> str:
    parts = [_front_matter(profile, splits, index)]
    parts.append(f"# PAB (Pedestrian Anomaly Behavior): build `{profile}`\n\n"
                 "Text-based person anomaly search data (paper: *Beyond Walking: A Large-Scale Image-Text "
                 "Benchmark for Text-based Person Anomaly Search*), built by pab-build. This card is generated "
                 "from the build's manifests and shard index: rebuild it with `pab card OUT`; do not edit by hand.\n")

    parts.append("## Statistics (the paper's Table 2, for this build)\n")
    parts.append(_table(["Split", "Data source", "#Images", "Avg. text length (words)", "Normal vs. Anomaly"], [
        [SPLIT_TITLES[s.split][0], SPLIT_TITLES[s.split][1], s.images,
         "-" if s.avg_caption_words is None else f"{s.avg_caption_words:.1f}",
         f"{s.ratio} ({s.normal} / {s.anomaly})"] for s in splits]) + "\n")

    if index.get("splits"):
        parts.append("## Shards\n\nWebDataset tar shards; each sample has `jpg`, `pose.png`, `txt` (caption) and "
                     "`json` (metadata). `shards/index.json` lists every shard's sample count, bytes and sha256; "
                     "`pab verify DIR_OR_URL` re-hashes them.\n")
        parts.append(_table(["Split", "Shards", "Samples", "Bytes"], [
            [s, sec["totals"]["shards"], sec["totals"]["samples"], sec["totals"]["bytes"]]
            for s, sec in sorted(index["splits"].items())]) + "\n")
        split = next(s for s in ("train", "test") if s in index["splits"])
        last = max(index["splits"][split]["totals"]["shards"] - 1, 0)
        parts.append("Load it with `datasets` (run in this folder, or set `where` to the hub repo id; "
                     '`datasets` cannot name a dataset `"."`). The `default` config has both splits and every field of either (a field a split '
                     "does not have is null there); the configs named after the splits have exactly their "
                     "split's fields.\n")
        parts.append("```python\nimport os\n\nfrom datasets import load_dataset\n\n"
                     "where = os.getcwd()\n"
                     "pab = load_dataset(where)\n"
                     f'{split} = load_dataset(where, "{split}", split="{split}")\n\n'
                     "import webdataset as wds\n"
                     f'shards = wds.WebDataset("shards/{split}/{split}-{{000000..{last:06d}}}.tar", '
                     'shardshuffle=False).decode("pil")\n```\n')

    parts.append("## Build funnel\n\nEvery stage's input rows, the rows kept and the rows rejected, with the most "
                 "frequent reasons (particulars such as numbers and keys are blanked as `#`, `<key>`, `'…'`).\n")
    parts.append(_table(["Stage", "In", "Kept", "Rejected", "Top reasons"], [
        [f.stage, f.rows_in, f.kept, f.rejected,
         "; ".join(f"{r} ({n})" for r, n in f.reasons[:TOP_REASONS_INLINE]) or "-"] for f in funnel]) + "\n")
    detailed = [f for f in funnel if f.reasons]
    if detailed:
        parts.append("### Rejections by reason\n")
        for f in detailed:
            lines = [f"- {n} × {r}" for r, n in f.reasons[:MAX_REASON_GROUPS]]
            rest = f.reasons[MAX_REASON_GROUPS:]
            if rest:
                lines.append(f"- {sum(n for _, n in rest)} × {len(rest)} other reasons")
            parts.append(f"**{f.stage}** ({f.rejected} rejected)\n\n" + "\n".join(lines) + "\n")

    if charts:
        parts.append(f"## Attribute classes (top {TOP_CLASSES} per split, as in the paper's Figure 6)\n\n"
                     "Actions are counted over normal images, anomalies over anomaly images, scenes over all.\n")
        for s in splits:
            if s.split not in charts:
                continue
            parts.append(f"### {SPLIT_TITLES[s.split][0]}\n")
            parts.append("\n".join(f"![{s.split} {attr}]({rel})" for attr, rel in charts[s.split].items()) + "\n")
            rows = [[attr, name, n] for attr, classes in s.classes.items() for name, n in classes]
            parts.append("<details><summary>counts</summary>\n\n" + _table(["Attribute", "Class", "Images"], rows)
                         + "\n\n</details>\n")

    if grids:
        parts.append("## Examples\n\nNormal (left) beside anomaly (right) of the same identity: a test clip's two "
                     "frames; a training image beside its identity hard negative.\n")
        parts.append("\n".join(f"![{split} examples]({rel})" for split, rel in grids.items()) + "\n")

    notes = generation_notes(generation or {}, funnel)
    if notes:
        parts.append(notes)
    parts.append("## Models\n\nModel ids and revisions recorded in the manifests (`model_id` columns, "
                 "`path@revision`):\n")
    parts.append(_table(["Stage", "Model", "Revision", "Rows"],
                        [[st, f"`{m}`", rev or "-", n] for st, m, rev, n in models]) + "\n")
    if configured_models:
        parts.append("Configured models (`config.yaml`):\n")
        parts.append(_table(["Name", "Path", "Revision"], [
            [name, f"`{spec.get('path')}`", spec.get("revision") or "-"]
            for name, spec in sorted(configured_models.items()) if isinstance(spec, dict)]) + "\n")

    parts.append("## Configuration\n")
    parts.append(f"Profile `{profile}`; `config.yaml` sha256: "
                 + (f"`{config_sha256}`" if config_sha256 else "(no config.yaml in this build)") + "\n")
    parts.append("## License and use\n\nResearch use only, as for the original PAB; the OOPS! videos behind the "
                 "test frames and captions keep their own terms.\n")
    return "\n".join(parts)


def write_dataset_card(out: str, storage_options: dict | None = None) -> str:
    """Write ``OUT/README.md`` and its figures (``OUT/card/*.png``) from the build's manifests,
    shard index and config; return the card's path. ``storage_options``: OUT's, on an object store."""
    store = out_store(out, storage_options)
    funnel, models = [], []
    for stage in manifest_stages(store):  # a stage's status, reason and model columns at a time
        table = read_columns(store, stage, ("status", "reason", "model_id"))
        if "reason" not in table.column_names:
            table = table.append_column("reason", _column(table, "reason"))
        funnel.append(stage_funnel(stage, table))
        models += models_used(stage, table)
    index = store.read_json("shards/index.json") if store.exists("shards/index.json") else {}
    config_sha256 = profile = None
    configured_models: dict = {}
    generation: dict = {}
    if store.exists("config.yaml"):
        raw = store.read_bytes("config.yaml")
        config_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            cfg = yaml.safe_load(raw) or {}
        except yaml.YAMLError:
            cfg = {}
        if isinstance(cfg, dict):
            profile = cfg.get("profile")
            configured_models = cfg.get("models") or {}
            generation = cfg.get("generate") or {}
    splits = [s for s in (split_stats(sp, store) for sp in ("train", "test")) if s is not None]

    charts: dict[str, dict[str, str]] = {}
    for s in splits:
        for attr, classes in s.classes.items():
            behavior = ATTRIBUTE_OF_BEHAVIOR[attr]
            total = s.images if behavior is None else (s.normal if behavior == "normal" else s.anomaly)
            rel = f"{CARD_DIR}/{s.split}_{attr}.png"
            title = f"{SPLIT_TITLES[s.split][0]}: top {TOP_CLASSES} {attr} classes ({total} images)"
            store.write_bytes(rel, class_chart_png(title, classes, total))
            charts.setdefault(s.split, {})[attr] = rel
    grids: dict[str, str] = {}
    for s in splits:
        pairs = example_pairs(s.split, store)
        if pairs:
            rel = f"{CARD_DIR}/examples_{s.split}.png"
            store.write_bytes(rel, example_grid_png(f"{SPLIT_TITLES[s.split][0]}: normal | anomaly", pairs))
            grids[s.split] = rel

    text = render_card(profile=str(profile or "unknown"), config_sha256=config_sha256, splits=splits,
                       funnel=funnel, models=models,
                       configured_models=configured_models, index=index, charts=charts, grids=grids,
                       generation=generation)
    store.write_text(CARD_REL, text)
    log.info("dataset card written: %s/%s", store.url_root, CARD_REL)
    return f"{store.url_root}/{CARD_REL}"
