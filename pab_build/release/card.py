"""The dataset card: ``OUT/README.md`` in Hugging Face dataset-card style, plus its figures under
``OUT/card/``.

Everything in the card is computed from the stage manifests, ``shards/index.json`` and
``config.yaml``; nothing is typed in by hand, so the card of a build always describes that build.
Shipped samples are the ok rows of ``test_shards`` / ``train_shards``. The figures are drawn by
:mod:`pab_build.release.card_figures`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import yaml

from ..manifests import OK, STAGE_COLUMNS, read_manifest, schema
from ..shards.index import ratio_text
from ..store import Store
from .card_figures import class_chart_png, example_grid_png

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
# the columns the card reads; the rest of a million-row manifest (keypoints, prompts, hashes) stays on disk
CARD_COLUMNS = ("sample_key", "status", "reason", "model_id", "caption", "behavior", "hard_negative_key",
                "image_path", *ATTRIBUTE_OF_BEHAVIOR)


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


def stage_funnel(stage: str, rows: list[dict]) -> StageFunnel:
    kept = sum(r["status"] == OK for r in rows)
    reasons = Counter(reason_pattern(r["reason"]) for r in rows if r["status"] != OK)
    return StageFunnel(stage, len(rows), kept, sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def top_classes(values, n: int = TOP_CLASSES) -> list[tuple[str, int]]:
    """The ``n`` most frequent non-empty values, ties broken by name (deterministic)."""
    counts = Counter(v.strip() for v in values if isinstance(v, str) and v.strip())
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def manifest_stages(store: Store) -> list[str]:
    """Stages with a manifest in this build, in pipeline order (unknown ones last, by name)."""
    present = {n[: -len(".parquet")] for n in store.listdir("manifests") if n.endswith(".parquet")}
    return [s for s in STAGE_COLUMNS if s in present] + sorted(present - set(STAGE_COLUMNS))


def split_stats(split: str, manifests: dict[str, list[dict]]) -> SplitStats | None:
    shard_rows = manifests.get(f"{split}_shards")
    if shard_rows is None:
        return None
    shipped = {r["sample_key"]: r for r in shard_rows if r["status"] == OK}
    captions = {r["sample_key"]: r["caption"] for r in manifests.get(SPLIT_CAPTIONS[split], [])}
    attributes = {r["sample_key"]: r for r in manifests.get(SPLIT_ATTRIBUTES[split], [])}
    words = [caption_words(captions[k]) for k in shipped if k in captions]
    stats = SplitStats(
        split=split, images=len(shipped),
        normal=sum(r["behavior"] == "normal" for r in shipped.values()),
        anomaly=sum(r["behavior"] == "anomaly" for r in shipped.values()),
        avg_caption_words=sum(words) / len(words) if words else None,
    )
    for attr, behavior in ATTRIBUTE_OF_BEHAVIOR.items():
        stats.classes[attr] = top_classes(
            attributes[k].get(attr) for k, r in shipped.items()
            if k in attributes and (behavior is None or r["behavior"] == behavior))
    return stats


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@`` -> no revision."""
    name, at, rev = model_id.rpartition("@")
    return (name, rev) if at and name and "/" not in rev else (model_id, None)


def models_used(manifests: dict[str, list[dict]]) -> list[tuple[str, str, str | None, int]]:
    """(stage, model, revision, ok rows) for every model id a manifest records."""
    out = []
    for stage, rows in manifests.items():
        ids = Counter(r["model_id"] for r in rows if r["status"] == OK and r.get("model_id"))
        for mid, n in sorted(ids.items()):
            out.append((stage, *split_model_id(mid), n))
    return out


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` bin of ``n`` samples."""
    bins = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
            (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (10**9, "100M<n<1B"),
            (10**10, "1B<n<10B"), (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]
    return next((label for limit, label in bins if n < limit), "n>1T")


def _short(text: str | None, words: int = 8) -> str:
    parts = (text or "").split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def example_pairs(split: str, store: Store, manifests: dict[str, list[dict]]) -> list[tuple[bytes, str, bytes, str]]:
    """Up to EXAMPLE_PAIRS (normal, anomaly) image pairs of one identity from the shipped samples:
    test pairs by clip, training normal images beside their hard negative."""
    rows = {r["sample_key"]: r for r in manifests.get(f"{split}_shards", []) if r["status"] == OK}
    captions = {r["sample_key"]: r["caption"] for r in manifests.get(SPLIT_CAPTIONS[split], [])}
    image_stage = "frames" if split == "test" else "generate"
    images = {r["sample_key"]: r.get("image_path") for r in manifests.get(image_stage, [])}
    links = []
    if split == "test":
        for key in sorted(k for k, r in rows.items() if r["behavior"] == "normal"):
            other = key.removesuffix("-normal") + "-anomaly"
            if other in rows:
                links.append((key, other))
    else:
        links = sorted((k, r["hard_negative_key"]) for k, r in rows.items()
                       if r["behavior"] == "normal" and r.get("hard_negative_key") in rows)
    pairs = []
    for normal, anomaly in links:
        if len(pairs) == EXAMPLE_PAIRS:
            break
        try:
            left, right = store.read_bytes(images[normal]), store.read_bytes(images[anomaly])
        except (KeyError, TypeError, FileNotFoundError, ValueError):
            continue  # an image gone since the build: show another pair
        pairs.append((left, f"normal: {_short(captions.get(normal), 40)}",
                      right, f"anomaly: {_short(captions.get(anomaly), 40)}"))
    return pairs


# -- the card ----------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def union_features(split_names: list[str]):
    """One ``datasets.Features`` holding every field of the given splits (``hf_features`` of each,
    merged): a Hugging Face config has one schema for all its splits, so a field one split lacks
    loads as null there rather than being dropped from the other."""
    from datasets import Features

    from ..shards.writer import hf_features

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for name, feature in b.items():
            out[name] = merge(out[name], feature) if isinstance(out.get(name), dict) and isinstance(feature, dict) \
                else out.get(name, feature)
        return out

    merged: dict = {}
    for split in split_names:
        merged = merge(merged, dict(hf_features(split)))
    return Features(merged)


def dataset_info(index: dict) -> tuple[list[dict], list[dict]]:
    """The card's ``configs`` and ``dataset_info``: ``default`` with both splits (every field of
    either, typed), and one config per split with exactly that split's fields. Typed features
    keep ``datasets`` from guessing a schema from each split's first samples."""
    from datasets import DatasetInfo

    from ..shards.writer import hf_features

    shard_splits = [s for s in ("train", "test") if s in index.get("splits", {})]
    sizes = {s: {"name": s, "num_bytes": index["splits"][s]["totals"]["bytes"],
                 "num_examples": index["splits"][s]["totals"]["samples"]} for s in shard_splits}

    def entry(name: str, features, names: list[str]) -> dict:
        yaml_info = DatasetInfo(features=features)._to_yaml_dict()
        return {"config_name": name, "features": yaml_info["features"], "splits": [sizes[s] for s in names]}

    configs = [{"config_name": "default",
                "data_files": [{"split": s, "path": f"shards/{s}/*.tar"} for s in shard_splits]}]
    infos = [entry("default", union_features(shard_splits), shard_splits)] if shard_splits else []
    if len(shard_splits) > 1:
        for s in shard_splits:
            configs.append({"config_name": s, "data_files": [{"split": s, "path": f"shards/{s}/*.tar"}]})
            infos.append(entry(s, hf_features(s), [s]))
    return configs, infos


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


def write_dataset_card(out: str) -> str:
    """Write ``OUT/README.md`` and its figures (``OUT/card/*.png``) from the build's manifests,
    shard index and config; return the card's path."""
    store = Store(out)
    stages = manifest_stages(store)
    manifests = {s: read_manifest(store, s, [c for c in schema(s).names if c in CARD_COLUMNS] if s in STAGE_COLUMNS
                                  else None) for s in stages}
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
    splits = [s for s in (split_stats(sp, manifests) for sp in ("train", "test")) if s is not None]

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
        pairs = example_pairs(s.split, store, manifests)
        if pairs:
            rel = f"{CARD_DIR}/examples_{s.split}.png"
            store.write_bytes(rel, example_grid_png(f"{SPLIT_TITLES[s.split][0]}: normal | anomaly", pairs))
            grids[s.split] = rel

    text = render_card(profile=str(profile or "unknown"), config_sha256=config_sha256, splits=splits,
                       funnel=[stage_funnel(s, manifests[s]) for s in stages], models=models_used(manifests),
                       configured_models=configured_models, index=index, charts=charts, grids=grids,
                       generation=generation)
    store.write_text(CARD_REL, text)
    log.info("dataset card written: %s/%s", store.url_root, CARD_REL)
    return f"{store.url_root}/{CARD_REL}"
