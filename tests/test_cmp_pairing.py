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
from pab_build.cmp import pairing_stream, tar_ranges
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


def test_a_train_fraction_pairs_the_same_subset_as_the_old_loader(smoke_urls):
    args = {**loader_args(smoke_urls, 1), "fraction": 0.5}
    new, old = pairs(epoch(cmp_data.TrainData(**args))), pairs(epoch(OldTrainData(**args)))
    assert 0 < len(new) < cmp_data.TrainData(**loader_args(smoke_urls)).num_samples
    assert_same_pairs(new, old)


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
    whole = tar_ranges.tail_samples(raw, whole=True)
    assert [s["__key__"] for s in whole] == keys
    for cut in range(512, len(raw) - 1024, 512 * 7):
        part = tar_ranges.tail_samples(raw[cut:], whole=False)
        assert [s["__key__"] for s in part] == keys[len(keys) - len(part):]
        assert all(s["jpg"] == w["jpg"] for s, w in zip(part, whole[len(keys) - len(part):]))


def test_head_parsing_finds_whole_samples_before_any_cut(smoke_urls):
    raw = open(smoke_urls[0], "rb").read()
    ref = list(pairing_stream.iter_samples(smoke_urls[:1], {}))
    samples, complete = tar_ranges.head_samples(raw)
    assert complete and [s["__key__"] for s in samples] == [s["__key__"] for s in ref]
    for cut in range(512, len(raw) - 1024, 512 * 7):
        samples, complete = tar_ranges.head_samples(raw[:cut])
        assert not complete and len(samples) < len(ref)
        for got, want in zip(samples, ref):  # whole samples only: every member, byte for byte
            assert got == {k: v for k, v in want.items() if not k.startswith("__") or k == "__key__"}


def test_the_header_parser_reads_what_tarfile_reads(tmp_path):
    """Every header block of archives in both tar formats the project could meet (webdataset's PAX,
    ustar with a long name split into prefix + name) gives tarfile's name, size and type; a block
    with one byte changed is refused, as tarfile refuses it."""
    import io
    import tarfile

    blocks = []
    for fmt, name in ((tarfile.PAX_FORMAT, "c0000000001-a-000.jpg"),
                      (tarfile.USTAR_FORMAT, "d" * 60 + "/" + "k" * 80 + ".pose.png")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            info = tarfile.TarInfo(name)
            info.size = 700
            info.mtime = 1.5
            tar.addfile(info, io.BytesIO(b"\xff" * 700))
        data = buf.getvalue()
        blocks += [data[at:at + 512] for at in range(0, len(data), 512)
                   if data[at:at + 512].count(0) < 512 and data[at + 257:at + 262] == b"ustar"]
    assert len(blocks) == 3  # the PAX record's header, its member's, the ustar member's
    for block in blocks:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        assert tar_ranges.parse_header(block) == (info.name, info.size, info.type)
        bad = block[:20] + bytes([block[20] ^ 1]) + block[21:]
        with pytest.raises(tarfile.InvalidHeaderError):
            tarfile.TarInfo.frombuf(bad, "utf-8", "surrogateescape")
        assert tar_ranges.parse_header(bad) is None


def test_a_neighbour_with_headers_the_parser_does_not_read_is_streamed(smoke_urls, tmp_path):
    """GNU long names (not the project's writer): the head of the next shard comes from webdataset's
    own tar reading instead, with the same samples."""
    import io
    import tarfile

    samples = list(pairing_stream.iter_samples(smoke_urls[:1], {}))[:6]
    ident = json.loads(samples[0]["json"])["identity"]
    long_keys = {s["__key__"]: s["__key__"] + "x" * 120 for s in samples}  # past ustar's 100-byte name
    urls = []
    for n, part in enumerate((samples[:3], samples[3:])):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for s in part:
                for ext, payload in s.items():
                    if not ext.startswith("__"):
                        info = tarfile.TarInfo(f"{long_keys[s['__key__']]}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        urls.append(str(tmp_path / f"train-{n:06d}.tar"))
        open(urls[-1], "wb").write(buf.getvalue())
    assert tar_ranges.head_samples(open(urls[1], "rb").read()) is None
    wanted = {long_keys[s["__key__"]] for s in samples[3:5]}
    found, whole = pairing_stream.ShardSet(urls).head(1, wanted, ident)
    assert sorted(found) == sorted(wanted) and not whole
    assert all(found[long_keys[s["__key__"]]]["jpg"] == s["jpg"] for s in samples[3:5])
