"""Publishing cannot destroy a release: an empty build, a build with failed units, or a smaller
build is refused before anything remote changes (local folder and moto S3); stale remote shards
stay unless --delete; nothing outside OUT is ever uploaded."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_publish import BUCKET, release, s3  # noqa: F401 - fixtures

from pab_build.release.publish import PublishError, publish
from pab_build.shards.index import update_shard_index, verify_shards
from pab_build.store import Marker, Store


def _empty_build(root: str) -> None:
    """What a build over an empty OOPS! root leaves: an index whose splits have no samples."""
    store = Store(root)
    update_shard_index(store, "test", [])
    update_shard_index(store, "train", [])
    store.write_text("README.md", "# empty\n")


def _failed_build(root: str, good: str) -> None:
    shutil.copytree(good, root)
    Store(root).write_marker("pose", "000001", Marker("failed", "h", "i", 2, "unit 000001 failed after retries"))


def _smaller_build(root: str, good: str) -> None:
    shutil.copytree(good, root)
    path = os.path.join(root, "shards", "index.json")
    index = json.load(open(path))
    train = index["splits"]["train"]
    dropped = train["shards"].pop()
    train["totals"]["samples"] -= dropped["samples"]
    train["totals"]["shards"] -= 1
    train["totals"]["bytes"] -= dropped["bytes"]
    json.dump(index, open(path, "w"))


BAD_BUILDS = {"empty": ("split test has 0 samples", lambda root, good: _empty_build(root)),
              "failed": ("stage pose has 1 failed unit", _failed_build),
              "smaller": ("fewer than the", _smaller_build)}


def _snapshot_folder(dest) -> dict:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", sorted(BAD_BUILDS))
def test_a_bad_build_leaves_a_published_folder_byte_identical(release, tmp_path, kind):
    good, _ = release
    dest = tmp_path / "published"
    assert publish(good, str(dest)).ok
    before = _snapshot_folder(dest)
    fragment, make = BAD_BUILDS[kind]
    bad = str(tmp_path / f"{kind}-build")
    make(bad, good)
    with pytest.raises(PublishError, match="nothing remote was changed") as refused:
        publish(bad, str(dest), delete=True)
    assert fragment in str(refused.value) and "--force" in str(refused.value)
    assert _snapshot_folder(dest) == before
    assert verify_shards(str(dest)).ok


def test_a_bad_build_leaves_a_release_on_s3_byte_identical(release, s3, tmp_path):
    import s3fs

    good, _ = release
    _server, options, _requests = s3
    url = f"s3://{BUCKET}/pab"
    assert publish(good, url, options).ok
    remote = s3fs.S3FileSystem(**options)

    def snapshot() -> dict:
        remote.invalidate_cache()
        return {p: remote.cat_file(p) for p in sorted(remote.find(f"{BUCKET}/pab"))}

    before = snapshot()
    assert f"{BUCKET}/pab/shards/index.json" in before
    for kind, (fragment, make) in sorted(BAD_BUILDS.items()):
        bad = str(tmp_path / f"{kind}-build")
        make(bad, good)
        with pytest.raises(PublishError, match=fragment):
            publish(bad, url, options, delete=True)
        assert snapshot() == before, kind


def test_an_empty_build_is_refused_even_with_nothing_published(tmp_path):
    _empty_build(str(tmp_path / "out"))
    with pytest.raises(PublishError, match="0 samples"):
        publish(str(tmp_path / "out"), str(tmp_path / "published"))
    assert not any((tmp_path / "published").rglob("*.tar"))


def test_a_shard_that_links_outside_out_is_never_uploaded(release, tmp_path):
    good, _ = release
    shard = os.path.join(good, "shards", "train", "train-000000.tar")
    outside = tmp_path / "outside.tar"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(PublishError, match="train-000000.tar.*outside the build folder"):
        publish(good, str(tmp_path / "published"))
    assert not (tmp_path / "published" / "shards" / "train" / "train-000000.tar").exists()
