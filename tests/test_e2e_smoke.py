"""The smoke profile end to end through Prefect, on the bundled sample clips and tiny models; then
a second build into another folder must give byte-identical manifests and shards."""

import filecmp
import os

import pytest

from pab_build.manifests import read_manifest
from pab_build.engine.pipeline import STAGE_ORDER
from pab_build.store import Store

pytestmark = pytest.mark.slow


def _content_files(out: str) -> list[str]:
    keep = []
    for sub in ("manifests", "shards"):
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            keep += [os.path.relpath(os.path.join(dirpath, f), out) for f in files if not f.startswith(".")]
    return sorted(keep)


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory, tiny_models_dir, sample_oops_root):
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_pab import build_pab

    overrides = [f"fixtures.models_dir={tiny_models_dir}", f"oops.root={sample_oops_root}",
                 "fixtures.build_tiny_models=false"]
    outs = [str(tmp_path_factory.mktemp("smoke-a")), str(tmp_path_factory.mktemp("smoke-b"))]
    summaries = []
    with prefect_test_harness(server_startup_timeout=120):
        summaries.append(build_pab(profile="smoke", out=outs[0], overrides=overrides))
        summaries.append(build_pab(profile="smoke", out=outs[1], overrides=overrides + ["cmp.train_after_build=false"]))
    return outs, summaries


def test_every_stage_ran_with_reasons_and_shards_match_manifests(smoke_builds):
    (out, _), (summary, _) = smoke_builds
    store = Store(out)
    for stage in STAGE_ORDER:
        rows = read_manifest(store, stage)
        assert rows, stage
        assert all(r["reason"] for r in rows if r["status"] == "rejected"), stage
        assert summary[stage]["failed"] == 0, (stage, summary[stage])
    from pab_build.shards.index import verify_shards
    from pab_build.shards.writer import iter_shard_samples

    for split in ("test", "train"):
        ok = sorted(r["sample_key"] for r in read_manifest(store, f"{split}_shards") if r["status"] == "ok")
        assert ok, split
        tars = sorted(os.path.join(out, "shards", split, f) for f in os.listdir(os.path.join(out, "shards", split)))
        keys = sorted(s["__key__"] for s in iter_shard_samples(tars))
        assert keys == ok
    assert verify_shards(out).ok
    assert os.path.exists(os.path.join(out, "README.md"))
    ev = os.path.join(out, "cmp", "eval.json")
    assert os.path.exists(ev), "pab run smoke ends with CMP training and evaluation"


def test_two_builds_are_byte_identical(smoke_builds):
    (a, b), _ = smoke_builds
    files = _content_files(a)
    assert files == _content_files(b)
    assert any(f.endswith(".tar") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, mismatch + errors


def test_readme_and_card_snippets_load_every_field_of_both_splits(smoke_builds, tmp_path):
    """Hugging Face ``datasets`` on a real build, through the snippets exactly as the README and the
    card print them: every field of both splits, equal to the shards."""
    from hf_snippets import assert_loads_every_field, python_blocks, ran_blocks

    (out, _), _ = smoke_builds
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    os.makedirs(tmp_path / "out")
    os.symlink(out, tmp_path / "out" / "smoke")  # the README's commands write out/smoke
    with ran_blocks(python_blocks(readme, after="## Using the shards"), cwd=str(tmp_path)) as namespace:
        assert_loads_every_field(namespace, out, "pab", "train", "train")
        assert len(list(namespace["ds"])) == len(namespace["pab"]["test"])
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    with ran_blocks(python_blocks(card, after="## Shards"), cwd=out) as namespace:
        assert_loads_every_field(namespace, out, "pab", "train", "train")
        assert len(list(namespace["shards"])) == len(namespace["pab"]["train"])
