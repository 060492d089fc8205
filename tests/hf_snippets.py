"""Run the code blocks of a README as written and compare what ``datasets`` loads with the shards."""

from __future__ import annotations

import contextlib
import os
import re
from glob import glob

import numpy as np
from PIL import Image

from pab_build.shards.writer import SPLITS, iter_shard_samples


def python_blocks(markdown: str, after: str | None = None) -> list[str]:
    """The ```python blocks of ``markdown`` (only those after the heading ``after``, up to the next
    heading of that level)."""
    if after is not None:
        level = after.split(" ", 1)[0]
        markdown = markdown.split(after, 1)[1]
        markdown = re.split(rf"^{level} ", markdown, maxsplit=1, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


@contextlib.contextmanager
def ran_blocks(blocks: list[str], cwd: str):
    """Execute the blocks in order, in one namespace, in ``cwd``; yield the namespace while still
    there (webdataset opens its relative shard paths lazily)."""
    namespace: dict = {}
    here = os.getcwd()
    os.chdir(cwd)
    try:
        for code in blocks:
            exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102 - our own documentation
        yield namespace
    finally:
        os.chdir(here)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _with_nulls(value, feature):
    """``value`` as ``datasets`` returns it under ``feature``: struct fields it lacks become None."""
    if isinstance(feature, dict):
        assert isinstance(value, dict), value
        extra = set(value) - set(feature)
        assert not extra, f"fields {sorted(extra)} are in the shards but not in the features: they would be dropped"
        return {k: _with_nulls(value.get(k), f) for k, f in feature.items()}
    return value


def assert_split_equals_shards(dataset, out: str, split: str) -> int:
    """Every field of every sample of ``dataset`` equals the shard sample's; returns the count."""
    shards = {s["__key__"]: s for s in iter_shard_samples(sorted(glob(os.path.join(out, "shards", split, "*.tar"))))}
    loaded = {row["__key__"]: row for row in dataset}
    assert sorted(loaded) == sorted(shards), split
    json_feature = dataset.features["json"]
    for key, want in shards.items():
        got = loaded[key]
        assert got["txt"] == want["txt"], key
        assert got["json"] == _with_nulls(want["json"], json_feature), key
        for ext in ("jpg", "pose.png"):
            assert np.array_equal(_pixels(got[ext]), _pixels(want[ext])), (key, ext)
            assert isinstance(got[ext], Image.Image)
    return len(shards)


def assert_loads_every_field(namespace: dict, out: str, both: str, one: str, one_split: str) -> None:
    """``namespace[both]`` is a DatasetDict of every split in the shards; ``namespace[one]`` is
    ``one_split`` with exactly that split's fields."""
    from pab_build.shards.writer import hf_features

    pab = namespace[both]
    present = [s for s in SPLITS if glob(os.path.join(out, "shards", s, "*.tar"))]
    assert sorted(pab) == sorted(present)
    for split in present:
        assert assert_split_equals_shards(pab[split], out, split) > 0
    single = namespace[one]
    assert single.features == hf_features(one_split)
    assert assert_split_equals_shards(single, out, one_split) > 0
