"""`pab verify` does not trust the index: shards are checked against the manifests, must be
regular files inside OUT with safe members whose sample count matches, and `--deep` decodes every
member."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

from test_shards import built  # noqa: F401 - fixture

from pab_build.shards import index as shard_index
from pab_build.manifests import read_manifest, write_manifest
from pab_build.shards.writer import build_shard

REL = "shards/test/test-000001.tar"


def _replace_shard(store, data: bytes, *, rewrite_manifest: bool) -> None:
    """Swap a shard's bytes and rewrite the index (and optionally the manifests) to match them."""
    store.write_bytes(REL, data)
    digest = hashlib.sha256(data).hexdigest()
    index = store.read_json(shard_index.INDEX_REL)
    for s in index["splits"]["test"]["shards"]:
        if s["path"] == REL.removeprefix("shards/"):
            s["sha256"], s["bytes"] = digest, len(data)
    store.write_json(shard_index.INDEX_REL, index)
    if rewrite_manifest:
        rows = [{**r, "shard_sha256": digest, "shard_bytes": len(data)} if r.get("shard") == REL else r
                for r in read_manifest(store, "test_shards")]
        write_manifest(store, "test_shards", rows)


def _samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    by_key: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            by_key.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return sorted(by_key.items())


def test_a_rewritten_index_does_not_make_a_tampered_shard_pass(built):
    data = bytearray(built.store.read_bytes(REL))
    data[700] ^= 0x01
    _replace_shard(built.store, bytes(data), rewrite_manifest=False)
    report = shard_index.verify_shards(built.store.root)
    assert not report.ok and report.paths("mismatch") == ["test/test-000001.tar"]
    assert "the manifests say" in str(report)


def test_a_shard_linking_outside_out_is_unsafe(built, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes(built.store.read_bytes(REL))
    os.remove(built.store.local_path(REL))
    os.symlink(outside, built.store.local_path(REL))
    report = shard_index.verify_shards(built.store.root)
    assert report.paths("unsafe") == ["test/test-000001.tar"] and "outside the build folder" in str(report)


def test_unsafe_member_names_and_a_wrong_sample_count_are_found(built):
    samples = _samples(built.store.read_bytes(REL))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"../{key}.{ext}" if ext == "txt" else f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("evil.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    _replace_shard(built.store, buf.getvalue(), rewrite_manifest=True)
    report = shard_index.verify_shards(built.store.root)
    text = str(report)
    assert not report.ok and "member name '../" in text and "'evil.jpg' is not a regular file" in text

    assert len(samples) == 2  # shards.max_samples_per_shard in the fixture
    _replace_shard(built.store, build_shard(samples[:1]), rewrite_manifest=True)
    report = shard_index.verify_shards(built.store.root)
    assert "holds 1 samples, the index says 2" in str(report)


def test_deep_decodes_every_member(built, capsys):
    samples = _samples(built.store.read_bytes(REL))
    key, members = samples[0]
    samples[0] = (key, {**members, "jpg": b"\xff\xd8\xff\xe0 not really a jpeg"})
    _replace_shard(built.store, build_shard(samples), rewrite_manifest=True)
    assert shard_index.verify_shards(built.store.root).ok  # names, counts and hashes all agree
    deep = shard_index.verify_shards(built.store.root, deep=True)
    assert not deep.ok and f"member '{key}.jpg' does not decode as jpg" in str(deep)

    from flows.cli import main

    for argv, code in (([built.store.root], 0), ([built.store.root, "--deep"], 1)):
        try:
            main(["verify", *argv])
        except SystemExit as e:
            assert e.code == code
    assert "does not decode as jpg" in capsys.readouterr().out
