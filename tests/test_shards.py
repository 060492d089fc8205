"""WebDataset shards: the tar writer, the test/train shard stages, the shard index and `verify`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pab_build.shards import index as shard_index, packing as shard_packing, writer as shard_writer
from pab_build.manifests import OK, REJECTED, read_manifest, write_manifest
from pab_build.oops import clip_key
from pab_build.stages import test_shards as test_shards_stage
from pab_build.stages import train_shards as train_shards_stage
from pab_build.engine.units import Context, run_stage

# -- hand-built upstream manifests -------------------------------------------------------------


def _image_bytes(seed: int, fmt: str, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _put(store, rel: str, data: bytes) -> str:
    store.write_bytes(rel, data)
    return hashlib.sha256(data).hexdigest()


def _row(key, status=OK, reason=None, **fields):
    if status == REJECTED and reason is None:
        reason = "rejected for the test"
    return {"sample_key": key, "status": status, "reason": reason, **fields}


def write_test_build(store, clip_names, rejected_at=None, image_size=16):
    """Upstream test manifests for these clips, both frames each; ``rejected_at`` maps a sample
    key to the stage that rejects it (later stages then lack it). Returns the sample keys."""
    rejected_at = rejected_at or {}
    order = ["frames", "pose", "pairs", "test_captions", "test_attributes"]
    rows = {s: [] for s in order}
    keys = []
    for n, name in enumerate(clip_names):
        ck = clip_key(name)
        for b_i, behavior in enumerate(("normal", "anomaly")):
            key = f"{ck}-{behavior}"
            keys.append(key)
            drop = rejected_at.get(key)
            seed = 2 * n + b_i
            image_rel, pose_rel = f"frames/{key}.jpg", f"pose/{key}.png"
            per_stage = {
                "frames": dict(clip_name=name, clip_key=ck, split="val", behavior=behavior, time_s=1.5 + b_i,
                               source_caption=f"{name} {behavior} caption", image_path=image_rel,
                               image_sha256=_put(store, image_rel, _image_bytes(seed, "JPEG", image_size))),
                "pose": dict(clip_key=ck, behavior=behavior, pose_path=pose_rel,
                             pose_sha256=_put(store, pose_rel, _image_bytes(100 + seed, "PNG", image_size))),
                "pairs": dict(clip_key=ck, behavior=behavior, pair_key=ck, cosine=0.5),
                "test_captions": dict(caption=f"a person in a café, {behavior} {n}", caption_generated="x",
                                      prompt_version="caption-v1", model_id="qwen"),
                "test_attributes": dict(scene="park", scene_raw="A park.", prompt_version="attr-v1", model_id="qwen",
                                        **({"action": "walking", "action_raw": "Walking."} if behavior == "normal"
                                           else {"anomaly": "falling", "anomaly_raw": "Falling."})),
            }
            for stage in order:
                if drop == stage:
                    rows[stage].append(_row(key, REJECTED, f"{stage} said no", **per_stage[stage]))
                    break
                rows[stage].append(_row(key, **per_stage[stage]))
    for stage in order:
        write_manifest(store, stage, rows[stage])
    return keys


TRAIN_KIND_CODES = {"n": "n", "a": "a", "a+": "ap"}


def write_train_build(store, identities, rejected_at=None, image_size=16):
    """Upstream training manifests; ``identities`` maps a clip name to ``{kind: n_images}``."""
    rejected_at = rejected_at or {}
    order = ["generate", "gen_pose", "train_captions", "train_attributes"]
    rows = {s: [] for s in ["prompts", *order]}
    keys = []
    seed = 0
    for name, kinds in identities.items():
        ck = clip_key(name)
        for kind, count in kinds.items():
            prompt_key = f"{ck}-{TRAIN_KIND_CODES[kind]}"
            rows["prompts"].append(_row(prompt_key, clip_name=name, clip_key=ck, split="train", kind=kind,
                                        prompt=f"{name} prompt {kind}"))
            for index in range(count):
                key = f"{prompt_key}-{index:03d}"
                keys.append(key)
                seed += 1
                image_rel, pose_rel = f"generate/{prompt_key}/{key}.jpg", f"gen_pose/{prompt_key}/{key}.png"
                behavior = "normal" if kind == "n" else "anomaly"
                per_stage = {
                    "generate": dict(prompt_key=prompt_key, clip_key=ck, kind=kind, index=index, seed=1000 + seed,
                                     image_path=image_rel, model_id="sdxl",
                                     image_sha256=_put(store, image_rel, _image_bytes(seed, "JPEG", image_size))),
                    "gen_pose": dict(image_path=image_rel, pose_path=pose_rel,
                                     pose_sha256=_put(store, pose_rel, _image_bytes(500 + seed, "PNG", image_size))),
                    "train_captions": dict(caption=f"caption of {key}", prompt_version="caption-v1", model_id="qwen"),
                    "train_attributes": dict(scene="street", scene_raw="A street.",
                                       **({"action": "running", "action_raw": "Running."} if behavior == "normal"
                                          else {"anomaly": "tripping", "anomaly_raw": "Tripping."})),
                }
                for stage in order:
                    if rejected_at.get(key) == stage:
                        rows[stage].append(_row(key, REJECTED, f"{stage} said no", **per_stage[stage]))
                        break
                    rows[stage].append(_row(key, **per_stage[stage]))
    for stage, stage_rows in rows.items():
        write_manifest(store, stage, stage_rows)
    return keys


def shard_paths(ctx, split):
    return [ctx.store.local_path(f"shards/{split}/{n}") for n in ctx.store.listdir(f"shards/{split}")]


def tar_names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


# -- the tar writer -----------------------------------------------------------------------------


def test_build_shard_is_byte_identical_and_its_size_is_predicted():
    samples = [("b-2", {"txt": "zwei".encode(), "jpg": b"\xff" * 700, "json": b"{}"}),
               ("a-1", {"pose.png": b"p" * 3, "txt": b"eins", "jpg": b"j" * 513, "json": b"{}"})]
    first, second = shard_writer.build_shard(samples), shard_writer.build_shard(list(reversed(samples)))
    assert first == second
    members = sum(shard_writer.member_bytes(len(v)) for _, m in samples for v in m.values())
    assert len(first) == shard_writer.tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["a-1.jpg", "a-1.json", "a-1.pose.png", "a-1.txt",
                                      "b-2.jpg", "b-2.json", "b-2.txt"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


@pytest.mark.parametrize("key", ["../evil", "/etc/passwd", "a/b", "a.b", "..", "", "caf\u00e9", "a b", "x" * 91])
def test_hostile_keys_cannot_become_member_names(key):
    assert shard_writer.key_problem(key)
    with pytest.raises(ValueError):
        shard_writer.member_name(key, "jpg")
    with pytest.raises(ValueError):
        shard_writer.build_shard([(key, {"jpg": b"x"})])


def test_unknown_member_extension_is_refused():
    with pytest.raises(ValueError, match="extension"):
        shard_writer.build_shard([("k", {"exe": b"x"})])
    assert shard_writer.key_problem("c0123456789-ap-007") is None


def test_ratio_text():
    assert shard_index.ratio_text(2, 3) == "2:3"
    assert shard_index.ratio_text(989, 989) == "1:1"
    assert shard_index.ratio_text(405_000, 608_605) == "~2:3"
    assert shard_index.ratio_text(5, 0) == "1:0" and shard_index.ratio_text(0, 0) == "0:0"
    assert shard_index.ratio_text(1, 500) == "1:500"


# -- the test split -------------------------------------------------------------------------------


def test_test_shards_read_back_with_webdataset_match_the_manifest(ctx):
    keys = write_test_build(ctx.store, ["clip one", "clip two", "clip three"])
    counts = run_stage(ctx, test_shards_stage.STAGE)
    assert counts == {"done": 1, "skipped": 0, "failed": 0}
    rows = read_manifest(ctx.store, "test_shards")
    assert sorted(r["sample_key"] for r in rows) == sorted(keys)
    assert {r["status"] for r in rows} == {OK}
    assert {r["shard"] for r in rows} == {"shards/test/test-000000.tar"}

    samples = list(shard_writer.iter_shard_samples(shard_paths(ctx, "test")))
    assert [s["__key__"] for s in samples] == sorted(keys)
    captions = {r["sample_key"]: r["caption"] for r in read_manifest(ctx.store, "test_captions")}
    frames = {r["sample_key"]: r for r in read_manifest(ctx.store, "frames")}
    for s in samples:
        meta, frame = s["json"], frames[s["__key__"]]
        assert s["txt"] == captions[s["__key__"]]
        assert s["jpg"].size == (16, 16) and s["pose.png"].size == (16, 16)
        assert meta["sample_key"] == s["__key__"] and meta["identity"] == frame["clip_key"]
        assert (meta["clip_name"], meta["behavior"], meta["time_s"]) == (
            frame["clip_name"], frame["behavior"], frame["time_s"])
        assert meta["pair_key"] == frame["clip_key"] and meta["prompt_version"] == "caption-v1"
        assert meta["models"]["qwen2_vl"] == ctx.cfg.models.qwen2_vl.path
        assert set(meta["models"]) == {"openpose", "resnet50", "qwen2_vl"}
        kept = "action" if meta["behavior"] == "normal" else "anomaly"
        assert meta["attributes"][kept] in ("walking", "falling") and meta["attributes"]["scene"] == "park"
    # the jpg member is the frame file itself, byte for byte; json is sorted, non-ASCII kept
    with tarfile.open(shard_paths(ctx, "test")[0]) as tar:
        jpg = tar.extractfile(f"{keys[0]}.jpg").read()
        raw_json = tar.extractfile(f"{keys[0]}.json").read()
    assert jpg == ctx.store.read_bytes(f"frames/{keys[0]}.jpg")
    assert raw_json == json.dumps(json.loads(raw_json), sort_keys=True, ensure_ascii=False).encode()

    index = ctx.store.read_json("shards/index.json")
    assert shard_index.index_problems(index) == []
    test = index["splits"]["test"]
    assert test["totals"] == {"shards": 1, "samples": 6, "bytes": test["shards"][0]["bytes"], "normal": 3,
                                   "anomaly": 3, "normal_anomaly_ratio": "1:1", "normal_anomaly_ratio_float": 1.0}
    data = ctx.store.read_bytes("shards/test/test-000000.tar")
    assert test["shards"] == [{"path": "test/test-000000.tar", "samples": 6, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}]
    # a rerun skips every unit and changes nothing
    assert run_stage(ctx, test_shards_stage.STAGE)["skipped"] == 1
    assert ctx.store.read_bytes("shards/test/test-000000.tar") == data


def test_two_builds_in_different_folders_are_byte_identical(ctx, tmp_path):
    other = Context.create(ctx.cfg, str(tmp_path / "other"))
    ctx.cfg.shards.max_samples_per_shard = 2
    for c in (ctx, other):
        write_test_build(c.store, ["clip one", "clip two"])
        run_stage(c, test_shards_stage.STAGE)
    names = ctx.store.listdir("shards/test")
    assert names == ["test-000000.tar", "test-000001.tar"] == other.store.listdir("shards/test")
    for rel in [f"shards/test/{n}" for n in names] + ["shards/index.json", "manifests/test_shards.parquet"]:
        assert ctx.store.read_bytes(rel) == other.store.read_bytes(rel), rel


def test_shards_respect_both_bounds_and_keep_pairs_together(ctx):
    write_test_build(ctx.store, [f"clip {i}" for i in range(5)], image_size=48)
    ctx.cfg.shards.max_samples_per_shard = 5  # odd on purpose: a pair must not be split over two shards
    run_stage(ctx, test_shards_stage.STAGE)
    rows = read_manifest(ctx.store, "test_shards")
    per_shard = {}
    for r in rows:
        per_shard.setdefault(r["shard"], []).append(r)
    assert [len(v) for _, v in sorted(per_shard.items())] == [4, 4, 2]
    for r in rows:
        assert {x["shard"] for x in rows if x["clip_key"] == r["clip_key"]} == {r["shard"]}
        assert r["shard"] == shard_writer.shard_rel("test", r["shard_index"])

    # now the byte bound: room for two pairs per shard, not three
    planned = [it for u in test_shards_stage.plan_test_shards(ctx) for it in u.items]
    pair_bytes = sorted(shard_packing.sample_tar_bytes(a) + shard_packing.sample_tar_bytes(b)
                        for a, b in zip(planned[::2], planned[1::2]))
    ctx.cfg.shards.max_samples_per_shard = 1000
    ctx.cfg.shards.max_bytes_per_shard = shard_writer.tar_bytes(pair_bytes[-1] + pair_bytes[-2])
    assert shard_writer.tar_bytes(sum(pair_bytes[:3])) > ctx.cfg.shards.max_bytes_per_shard
    run_stage(ctx, test_shards_stage.STAGE)
    names_now = ctx.store.listdir("shards/test")
    assert names_now == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
    for name in names_now:
        assert len(ctx.store.read_bytes(f"shards/test/{name}")) <= ctx.cfg.shards.max_bytes_per_shard
    # shards of the earlier, differently bounded build are gone, and the index lists exactly these
    assert shard_index.verify_shards(ctx.store.root).ok
    assert sum(s["samples"] for s in ctx.store.read_json("shards/index.json")["splits"]["test"]["shards"]) == 10
    # looser bounds: one shard; the two left over from before are removed, not left as strays
    ctx.cfg.shards.max_bytes_per_shard = 1 << 30
    run_stage(ctx, test_shards_stage.STAGE)
    assert ctx.store.listdir("shards/test") == ["test-000000.tar"]
    assert shard_index.verify_shards(ctx.store.root).ok


def test_a_pair_too_big_for_any_shard_is_rejected_with_its_reason(ctx):
    write_test_build(ctx.store, ["small"], image_size=16)
    ctx.cfg.shards.max_bytes_per_shard = 1024
    run_stage(ctx, test_shards_stage.STAGE)
    rows = read_manifest(ctx.store, "test_shards")
    assert {r["status"] for r in rows} == {REJECTED}
    assert all("max_bytes_per_shard=1024" in r["reason"] and "pair of 2" in r["reason"] for r in rows)
    assert ctx.store.listdir("shards/test") == []
    assert ctx.store.read_json("shards/index.json")["splits"]["test"]["totals"]["samples"] == 0


def test_both_images_of_a_pair_or_neither(ctx):
    keep, lose_pose, lose_file = clip_key("kept"), clip_key("pose drop"), clip_key("file gone")
    write_test_build(ctx.store, ["kept", "pose drop", "file gone"], rejected_at={f"{lose_pose}-anomaly": "pose"})
    ctx.store.remove(f"frames/{lose_file}-normal.jpg")
    run_stage(ctx, test_shards_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_shards")}
    # the one rejected by pose never reaches test_attributes, so it has no row; its partner is rejected
    assert f"{lose_pose}-anomaly" not in rows
    reason = rows[f"{lose_pose}-normal"]["reason"]
    assert rows[f"{lose_pose}-normal"]["status"] == REJECTED
    assert f"counterpart {lose_pose}-anomaly was rejected by pose: pose said no" == reason
    assert rows[f"{lose_file}-normal"]["reason"] == f"file missing: frames/{lose_file}-normal.jpg"
    assert rows[f"{lose_file}-anomaly"]["reason"] == (
        f"counterpart {lose_file}-normal was rejected by test_shards: file missing: frames/{lose_file}-normal.jpg")
    shipped = [s["__key__"] for s in shard_writer.iter_shard_samples(shard_paths(ctx, "test"))]
    assert shipped == [f"{keep}-anomaly", f"{keep}-normal"]
    assert sorted(k for k, r in rows.items() if r["status"] == OK) == shipped


def test_a_hostile_sample_key_is_rejected_and_escapes_nowhere(ctx, tmp_path):
    write_test_build(ctx.store, ["fine", "bad path"])
    hostile, bad_path = "../../escaped", f"{clip_key('bad path')}-normal"
    for stage in ("frames", "pose", "pairs", "test_captions", "test_attributes"):
        rows = read_manifest(ctx.store, stage)
        rows.append({**rows[0], "sample_key": hostile})
        rows.append({**rows[0], "sample_key": rows[0]["sample_key"] + "_2"})  # off the key convention
        if stage == "frames":
            rows = [{**r, "image_path": "../outside.jpg"} if r["sample_key"] == bad_path else r for r in rows]
        write_manifest(ctx.store, stage, rows)
    run_stage(ctx, test_shards_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_shards")}
    assert rows[hostile]["status"] == REJECTED and "not a safe WebDataset key" in rows[hostile]["reason"]
    assert rows[bad_path]["reason"] == "unsafe file path(s) in the manifests: '../outside.jpg'"
    first = min(f"{clip_key(n)}-anomaly" for n in ("fine", "bad path"))
    assert rows[f"{first}_2"]["reason"] == f"sample key '{first}_2' is not <clip_key>-<behavior> ('{first}')"
    assert [k for k, r in rows.items() if r["status"] == OK] == [f"{clip_key('fine')}-anomaly",
                                                                 f"{clip_key('fine')}-normal"]
    names = [n for p in shard_paths(ctx, "test") for n in tar_names(p)]
    assert names and all("/" not in n and ".." not in n and n.count(".") in (1, 2) for n in names)
    assert not list(tmp_path.rglob("escaped*"))


def test_missing_upstream_manifest_is_a_clear_error(ctx):
    with pytest.raises(FileNotFoundError, match="run the frames stage first"):
        test_shards_stage.plan_test_shards(ctx)


# -- verify ---------------------------------------------------------------------------------------


@pytest.fixture
def built(ctx):
    ctx.cfg.shards.max_samples_per_shard = 2
    write_test_build(ctx.store, ["clip one", "clip two", "clip three"])
    run_stage(ctx, test_shards_stage.STAGE)
    assert ctx.store.listdir("shards/test") == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
    return ctx


def test_verify_passes_on_a_clean_build_and_on_its_shards_folder(built):
    for target in (built.store.root, built.store.root + "/shards"):
        report = shard_index.verify_shards(target)
        assert report.ok, str(report)
        assert report.checked == 3 and "OK" in str(report)


def test_verify_detects_a_flipped_byte(built):
    rel = "shards/test/test-000001.tar"
    data = bytearray(built.store.read_bytes(rel))
    data[700] ^= 0x01
    built.store.write_bytes(rel, bytes(data))
    report = shard_index.verify_shards(built.store.root)
    assert not report.ok and report.altered == ["test/test-000001.tar"]
    assert report.missing == [] and report.extra == []
    assert "altered: test/test-000001.tar: sha256 is" in str(report) and "content changed" in str(report)


def test_verify_detects_a_truncated_shard_by_size(built):
    rel = "shards/test/test-000000.tar"
    built.store.write_bytes(rel, built.store.read_bytes(rel)[:-512])
    report = shard_index.verify_shards(built.store.root)
    assert report.altered == ["test/test-000000.tar"] and "size is" in report.problems[0].message


def test_verify_detects_a_missing_and_an_extra_shard(built):
    built.store.remove("shards/test/test-000002.tar")
    built.store.write_bytes("shards/test/test-000099.tar", built.store.read_bytes("shards/test/test-000000.tar"))
    built.store.write_bytes("shards/stray/other.tar", b"\0" * 1024)
    report = shard_index.verify_shards(built.store.root)
    assert not report.ok
    assert report.missing == ["test/test-000002.tar"]
    assert report.extra == ["stray/other.tar", "test/test-000099.tar"]
    text = str(report)
    assert "missing: test/test-000002.tar: listed in the index but not found" in text
    assert "extra: test/test-000099.tar: a .tar of" in text and "FAILED" in text


def test_verify_without_an_index_or_with_a_broken_one(ctx, built):
    assert "no shards/index.json" in str(shard_index.verify_shards(str(ctx.store.root) + "/frames"))
    index = built.store.read_json("shards/index.json")
    index["splits"]["test"]["shards"][0]["sha256"] = "not a hash"
    built.store.write_json("shards/index.json", index)
    report = shard_index.verify_shards(built.store.root)
    assert not report.ok and "does not match its schema" in report.errors[0]


# -- both splits and other readers ----------------------------------------------------------------


def test_index_holds_both_splits_and_validates(ctx):
    write_test_build(ctx.store, ["clip one"])
    write_train_build(ctx.store, {"clip t": {"n": 2, "a": 2, "a+": 1}})
    run_stage(ctx, test_shards_stage.STAGE)
    run_stage(ctx, train_shards_stage.STAGE)
    index = ctx.store.read_json("shards/index.json")
    assert shard_index.index_problems(index) == []
    assert set(index["splits"]) == {"test", "train"}
    train = index["splits"]["train"]["totals"]
    assert (train["samples"], train["normal"], train["anomaly"]) == (5, 2, 3)
    assert train["normal_anomaly_ratio"] == "2:3" and train["normal_anomaly_ratio_float"] == pytest.approx(2 / 3)
    # rerunning the test split keeps the train section
    run_stage(ctx, test_shards_stage.STAGE)
    assert ctx.store.read_json("shards/index.json") == index
    assert shard_index.verify_shards(ctx.store.root).ok

    samples = list(shard_writer.iter_shard_samples(shard_paths(ctx, "train")))
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "train_shards")}
    assert [s["__key__"] for s in samples] == sorted(rows)
    for s in samples:
        meta = s["json"]
        assert set(meta) == {"sample_key", "identity", "clip_name", "kind", "behavior", "source_caption", "seed",
                             "models", "attributes", "hard_negative_key", "hard_negative_caption",
                             "prompt_version"}
        assert meta["behavior"] == ("normal" if meta["kind"] == "n" else "anomaly")
        assert meta["source_caption"] == f"clip t prompt {meta['kind']}"
        assert set(meta["models"]) == {"sdxl", "openpose", "qwen2_vl"}
        assert rows[s["__key__"]]["hard_negative_key"] == meta["hard_negative_key"]


def test_shards_load_with_hugging_face_datasets(ctx, tmp_path):
    datasets = pytest.importorskip("datasets")
    write_test_build(ctx.store, ["clip one", "clip two"])
    run_stage(ctx, test_shards_stage.STAGE)
    try:
        ds = datasets.load_dataset("webdataset", data_files={"test": shard_paths(ctx, "test")}, split="test",
                                   cache_dir=str(tmp_path / "hf-cache"))
    except (ConnectionError, OSError) as e:  # the packaged builder should not need a network
        pytest.skip(f"datasets could not load without network: {e}")
    assert len(ds) == 4
    first = ds[0]
    assert first["__key__"] == min(clip_key("clip one"), clip_key("clip two")) + "-anomaly"
    assert first["json"]["behavior"] == "anomaly" and first["jpg"].size == (16, 16)
    assert sorted(ds["__key__"]) == sorted(r["sample_key"] for r in read_manifest(ctx.store, "test_shards"))


def test_training_shards_load_with_datasets_given_their_features(ctx, tmp_path):
    datasets = pytest.importorskip("datasets")
    write_train_build(ctx.store, {"clip t": {"n": 2, "a": 3, "a+": 3}})  # the first five are all anomaly
    run_stage(ctx, train_shards_stage.STAGE)
    try:
        ds = datasets.load_dataset("webdataset", data_files={"train": shard_paths(ctx, "train")}, split="train",
                                   cache_dir=str(tmp_path / "hf-cache"), features=shard_writer.hf_features("train"))
    except (ConnectionError, OSError) as e:
        pytest.skip(f"datasets could not load without network: {e}")
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "train_shards")}
    assert sorted(ds["__key__"]) == sorted(rows)
    for s in ds:
        assert s["json"]["hard_negative_key"] == rows[s["__key__"]]["hard_negative_key"]
        assert (s["json"]["attributes"]["action"] is None) == (s["json"]["kind"] != "n")


def test_a_pair_the_reviewer_rejected_never_ships(ctx):
    write_test_build(ctx.store, ["accepted", "refused"])
    refused = clip_key("refused")
    write_manifest(ctx.store, "review", [  # keyed by clip, as a pair-level review may be
        _row(clip_key("accepted"), clip_key=clip_key("accepted"), decision="accept", reviewers="r1"),
        _row(refused, REJECTED, "reviewer r1: blurry", clip_key=refused, decision="reject", reviewers="r1"),
    ])
    run_stage(ctx, test_shards_stage.STAGE)
    rows = {r["sample_key"]: r for r in read_manifest(ctx.store, "test_shards")}
    for b in ("normal", "anomaly"):
        assert rows[f"{refused}-{b}"]["reason"] == "no ok row in the review manifest(s)"
        assert rows[f"{clip_key('accepted')}-{b}"]["status"] == OK
