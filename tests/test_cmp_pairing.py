"""Identity hard negatives from the stream (issue 21): one epoch's (sample, counterpart) pairs on
the smoke build equal the old loader's, which read every counterpart by random access; identities
cut by shard boundaries are completed from the neighbours, and what is not there is a counted
fallback."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pab_build.cmp import data as cmp_data
from pab_build.cmp import pairing_stream
from pab_build.shards.writer import build_shard


def OldTrainData(**kw):
    """The loader before issue 21: the same pipeline, every counterpart read by key from an index
    of all tar headers (``pairing="index"``)."""
    return cmp_data.TrainData(pairing="index", **kw)


def loader_args(urls, batch_size=4):
    """``batch_size=1``: every sample in the epoch, whatever the shard layout (no partial batch dropped)."""
    return dict(urls=urls, transform=cmp_data.ImageTransform(16, (0.5,) * 3, (0.5,) * 3), batch_size=batch_size,
                seed=5, shuffle_buffer=8)


def epoch(data, n=0) -> list[dict]:
    return list(data.loader(n))


def pairs(batches) -> dict[str, tuple]:
    """sample key -> (counterpart caption, image, pose map) as the model receives them."""
    out = {}
    for b in batches:
        hard = {int(r): i for i, r in enumerate(b["hard_rows"])}
        for row, key in enumerate(b["keys"]):
            i = hard.get(row)
            out[key] = None if i is None else (b["hard_texts"][i], b["hard_images"][i], b["hard_poses"][i])
    return out


def assert_same_pairs(new: dict, old: dict):
    assert new.keys() == old.keys()
    for key, theirs in old.items():
        mine = new[key]
        assert (mine is None) == (theirs is None), key
        if mine is not None:
            assert mine[0] == theirs[0], key
            torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=0, msg=key)
            torch.testing.assert_close(mine[2], theirs[2], rtol=0, atol=0, msg=key)


def repack(urls, folder, per_shard, edit=None) -> list[str]:
    """The same samples, in the same key order, in shards of ``per_shard`` (the project's writer)."""
    samples = list(pairing_stream.iter_samples(urls, {}))
    if edit:
        edit(samples)
    os.makedirs(folder, exist_ok=True)
    out = []
    for n, start in enumerate(range(0, len(samples), per_shard)):
        path = os.path.join(folder, f"train-{n:06d}.tar")
        with open(path, "wb") as f:
            f.write(build_shard((s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                                for s in samples[start:start + per_shard]))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def smoke_urls(real_build):
    return cmp_data.list_shards(real_build, "train")


def test_one_epoch_has_the_old_loaders_batches_and_pairs_on_the_smoke_build(smoke_urls):
    new, old = cmp_data.TrainData(**loader_args(smoke_urls)), OldTrainData(**loader_args(smoke_urls))
    assert new.num_samples == len(old.index) > 8  # counted from shards/index.json, no index
    a, b = epoch(new), epoch(old)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]  # same order: the same batches
    for x, y in zip(a, b):
        torch.testing.assert_close(x["images"], y["images"], rtol=0, atol=0)
    got = pairs(a)
    assert_same_pairs(got, pairs(b))
    assert sum(v is not None for v in got.values()) == len(got)  # every sample has its counterpart
    assert sum(x["fallback_reads"] for x in a) == 0


def test_identities_cut_by_shard_boundaries_are_completed_from_the_neighbours(smoke_urls, tmp_path, monkeypatch):
    monkeypatch.setattr(pairing_stream, "TAIL_FIRST_READ", 2048)  # the tail read doubles a few times
    old = pairs(epoch(OldTrainData(**loader_args(smoke_urls, 1))))
    cut = repack(smoke_urls, str(tmp_path / "train"), per_shard=5)
    assert len(cut) > len(smoke_urls)
    batches = epoch(cmp_data.TrainData(**loader_args(cut, 1)))
    assert_same_pairs(pairs(batches), old)
    assert sum(x["neighbour_reads"] for x in batches) > 0 and sum(x["fallback_reads"] for x in batches) == 0


def test_a_counterpart_outside_the_stream_is_a_counted_fallback(smoke_urls, tmp_path, caplog):
    def point_far(samples):  # the first sample's counterpart: the last sample (another identity, shard)
        meta = json.loads(samples[0]["json"])
        meta["hard_negative_key"] = samples[-1]["__key__"]
        samples[0]["json"] = json.dumps(meta).encode()

    cut = repack(smoke_urls, str(tmp_path / "train"), per_shard=7, edit=point_far)
    old = pairs(epoch(OldTrainData(**loader_args(cut, 1))))
    batches = epoch(cmp_data.TrainData(**loader_args(cut, 1)))
    assert_same_pairs(pairs(batches), old)
    assert sum(x["fallback_reads"] for x in batches) == 1
    assert "read by random access" in caplog.text


def test_tail_parsing_finds_whole_samples_from_any_cut(smoke_urls):
    raw = open(smoke_urls[0], "rb").read()
    keys = [s["__key__"] for s in pairing_stream.iter_samples(smoke_urls[:1], {})]
    whole = pairing_stream.tail_samples(raw, whole=True)
    assert [s["__key__"] for s in whole] == keys
    for cut in range(512, len(raw) - 1024, 512 * 7):
        part = pairing_stream.tail_samples(raw[cut:], whole=False)
        assert [s["__key__"] for s in part] == keys[len(keys) - len(part):]
        assert all(s["jpg"] == w["jpg"] for s, w in zip(part, whole[len(keys) - len(part):]))
