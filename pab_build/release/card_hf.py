"""The dataset card's Hugging Face metadata: ``size_categories`` and the typed ``configs`` /
``dataset_info`` of its YAML front matter, from ``shards/index.json``."""

from __future__ import annotations


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` bin of ``n`` samples."""
    bins = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
            (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (10**9, "100M<n<1B"),
            (10**10, "1B<n<10B"), (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]
    return next((label for limit, label in bins if n < limit), "n>1T")


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
