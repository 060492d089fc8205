"""Export to the official CMP layout; also home of ``build_release_tree``, the small hand-built
output tree (manifests, images, shards, index) that test_card and test_publish use too, for the
edge cases a real build does not show (a hard negative whose file is gone, one split only). The
same steps on a build made by the real stages: tests/test_release_real_build.py."""

from __future__ import annotations

import hashlib
import io
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from pab_build.shards.hard_negatives import choose_hard_negatives
from pab_build.manifests import OK, REJECTED, write_manifest
from pab_build.oops import clip_key
from pab_build.release.official import export_official
from pab_build.shards.writer import build_shard
from pab_build.store import Store

KIND_CODES = {"n": "n", "a": "a", "a+": "ap"}
ACTIONS = ("running", "jumping", "walking")
ANOMALIES = ("falling", "tripping")
SCENES = ("park", "street", "gym")


def image_bytes(seed: int, fmt: str, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, 3)
    pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _put(store: Store, rel: str, data: bytes) -> str:
    store.write_bytes(rel, data)
    return hashlib.sha256(data).hexdigest()


def _row(key, status=OK, reason=None, **fields):
    return {"sample_key": key, "status": status, "reason": reason, **fields}


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A WebDataset shard, written by the shard stages' own writer."""
    return build_shard(samples)


def _write_shards(store: Store, split: str, samples: list[tuple[str, dict[str, bytes], str]], per_shard: int):
    """Write ``samples`` (key, members, behavior) into shards; returns manifest fields per key and the
    index section."""
    fields, listed, normal, anomaly = {}, [], 0, 0
    for number, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start:start + per_shard]
        data = _tar([(k, m) for k, m, _ in chunk])
        rel = f"shards/{split}/{split}-{number:06d}.tar"
        digest = _put(store, rel, data)
        listed.append({"path": rel.removeprefix("shards/"), "samples": len(chunk), "bytes": len(data), "sha256": digest})
        for key, _, behavior in chunk:
            fields[key] = dict(split=split, shard=rel, shard_index=number, shard_bytes=len(data), shard_sha256=digest)
            normal += behavior == "normal"
            anomaly += behavior == "anomaly"
    totals = {"shards": len(listed), "samples": sum(s["samples"] for s in listed),
              "bytes": sum(s["bytes"] for s in listed), "normal": normal, "anomaly": anomaly,
              "normal_anomaly_ratio": f"{normal}:{anomaly}", "normal_anomaly_ratio_float": normal / anomaly}
    return fields, {"shards": listed, "totals": totals}


def build_release_tree(root: str) -> dict:
    """A small finished build under ``root``: every stage manifest (with rejections), images, pose
    maps, test and train shards, ``shards/index.json`` and ``config.yaml``. Returns what went in."""
    store = Store(root)
    store.write_text("config.yaml", "profile: tiny-release-test\nrun: {seed: 0}\n")
    rows: dict[str, list[dict]] = {s: [] for s in (
        "frames", "pose", "pairs", "test_captions", "test_attributes", "test_shards",
        "prompts", "generate", "gen_pose", "train_captions", "train_attributes", "train_shards")}

    # -- test branch: three clips; the anomaly frame of "clip gamma" fails pose, so its pair is dropped
    test_clips = ["clip alpha", "clip beta", "clip gamma"]
    test_samples = []
    for n, name in enumerate(test_clips):
        ck = clip_key(name)
        for b_i, behavior in enumerate(("normal", "anomaly")):
            key, seed = f"{ck}-{behavior}", 2 * n + b_i
            img, pose = f"frames/{key}.jpg", f"pose/{key}.png"
            jpg, png = image_bytes(seed, "JPEG"), image_bytes(100 + seed, "PNG")
            rows["frames"].append(_row(key, clip_name=name, clip_key=ck, split="val", behavior=behavior, time_s=1.0 + b_i,
                                       source_caption=f"{name} {behavior}", image_path=img,
                                       image_sha256=_put(store, img, jpg), width=32, height=32))
            if name == "clip gamma" and behavior == "anomaly":
                rows["pose"].append(_row(key, REJECTED, "no person found (0 people)", clip_key=ck, behavior=behavior))
                continue
            rows["pose"].append(_row(key, clip_key=ck, behavior=behavior, image_path=img, pose_path=pose,
                                     pose_sha256=_put(store, pose, png)))
            rows["pairs"].append(_row(key, clip_key=ck, behavior=behavior, pair_key=ck, cosine=0.5))
            caption = f"a person in the {SCENES[n]} " + "word " * (3 + seed)
            rows["test_captions"].append(_row(key, caption=caption, caption_generated=caption, caption_corrected=False,
                                              prompt_version="caption-v1", model_id="org/qwen2-vl@rev1", finished=True))
            attr = {"action": ACTIONS[n]} if behavior == "normal" else {"anomaly": ANOMALIES[n % 2]}
            rows["test_attributes"].append(_row(key, scene=SCENES[n], behavior=behavior, prompt_version="attr-v1",
                                                model_id="org/qwen2-vl@rev1", **attr))
            if name != "clip gamma":
                meta = {"sample_key": key, "clip_name": name, "identity": ck, "behavior": behavior, "time_s": 1.0 + b_i,
                        "pair_key": ck, "source_caption": f"{name} {behavior}", "attributes": attr,
                        "models": {}, "prompt_version": "caption-v1"}
                test_samples.append((key, {"jpg": jpg, "pose.png": png, "txt": caption.encode(),
                                           "json": json.dumps(meta, sort_keys=True).encode()}, behavior))
    rows["test_shards"].append(_row(f"{clip_key('clip gamma')}-normal", REJECTED,
                                    "counterpart was rejected by pose: no person found (0 people)", split="test"))
    test_fields, test_section = _write_shards(store, "test", test_samples, per_shard=10)
    for key, _, behavior in test_samples:
        rows["test_shards"].append(_row(key, clip_key=key.split("-")[0], behavior=behavior, **test_fields[key]))

    # -- training branch: four clips x (n, a, a+) x 2 images; "Café clip" has no a+ prompt, and every
    #    anomaly image of "clip delta" fails gen_pose, so its normal images have no hard negative
    train_clips = ["clip alpha", "clip beta", "Café clip", "clip delta"]
    shippable = []
    seed = 1000
    for c_i, name in enumerate(train_clips):
        ck = clip_key(name)
        for kind in ("n", "a", "a+"):
            prompt_key = f"{ck}-{KIND_CODES[kind]}"
            prompt = f"{name} source caption {kind}"
            if name == "Café clip" and kind == "a+":
                rows["prompts"].append(_row(prompt_key, REJECTED, "subject 'it' is not a person", clip_name=name,
                                            clip_key=ck, kind=kind, prompt=prompt))
                continue
            rows["prompts"].append(_row(prompt_key, clip_name=name, clip_key=ck, split="train", kind=kind, prompt=prompt))
            for index in range(2):
                key, seed = f"{prompt_key}-{index:03d}", seed + 1
                img, pose = f"generate/{prompt_key}/{key}.jpg", f"gen_pose/{prompt_key}/{key}.png"
                jpg, png = image_bytes(seed, "JPEG"), image_bytes(seed + 7, "PNG")
                rows["generate"].append(_row(key, prompt_key=prompt_key, clip_key=ck, kind=kind, index=index,
                                             seed=seed, image_path=img, image_sha256=_put(store, img, jpg),
                                             width=32, height=32, model_id="org/realvis@v4", prompt=prompt))
                if name == "clip delta" and kind != "n":
                    rows["gen_pose"].append(_row(key, REJECTED, f"broken body: limb ratio {2.6 + index:.2f} > 2.5"))
                    continue
                rows["gen_pose"].append(_row(key, image_path=img, pose_path=pose, pose_sha256=_put(store, pose, png)))
                caption = f"a person {kind} in image {index} " + "word " * (index + c_i)
                rows["train_captions"].append(_row(key, caption=caption, caption_generated=caption,
                                                   prompt_version="caption-v1", model_id="org/qwen2-vl@rev1"))
                behavior = "normal" if kind == "n" else "anomaly"
                attr = ({"action": ACTIONS[(c_i + index) % 3]} if behavior == "normal"
                        else {"anomaly": ANOMALIES[(c_i + index) % 2]})
                rows["train_attributes"].append(_row(key, scene=SCENES[c_i % 3], behavior=behavior,
                                               prompt_version="attr-v1", model_id="org/qwen2-vl@rev1", **attr))
                shippable.append({"sample_key": key, "clip_key": ck, "kind": kind, "index": index, "behavior": behavior,
                                  "clip_name": name, "jpg": jpg, "png": png, "caption": caption, "attr": attr,
                                  "prompt": prompt, "seed": seed})
    links = choose_hard_negatives(shippable)
    captions = {s["sample_key"]: s["caption"] for s in shippable}
    train_samples = []
    for s in shippable:
        neg = links[s["sample_key"]]
        if neg is None:
            rows["train_shards"].append(_row(s["sample_key"], REJECTED, "no counterpart image of the same identity",
                                             split="train", clip_key=s["clip_key"], kind=s["kind"]))
            continue
        meta = {"sample_key": s["sample_key"], "identity": s["clip_key"], "clip_name": s["clip_name"],
                "kind": s["kind"], "behavior": s["behavior"], "source_caption": s["prompt"], "seed": s["seed"],
                "models": {}, "attributes": s["attr"], "hard_negative_key": neg,
                "hard_negative_caption": captions[neg], "prompt_version": "caption-v1"}
        train_samples.append((s["sample_key"], {"jpg": s["jpg"], "pose.png": s["png"], "txt": s["caption"].encode(),
                                                "json": json.dumps(meta, sort_keys=True).encode()}, s["behavior"]))
    train_samples.sort(key=lambda t: t[0])
    train_fields, train_section = _write_shards(store, "train", train_samples, per_shard=8)
    for key, _, behavior in train_samples:
        s = next(x for x in shippable if x["sample_key"] == key)
        rows["train_shards"].append(_row(key, clip_key=s["clip_key"], behavior=behavior, kind=s["kind"],
                                         hard_negative_key=links[key], **train_fields[key]))
    for stage, stage_rows in rows.items():
        write_manifest(store, stage, stage_rows)
    store.write_json("shards/index.json", {"format": "pab-webdataset-shards", "format_version": 1,
                                           "splits": {"test": test_section, "train": train_section}})
    return {"store": store, "links": links, "test_keys": [k for k, _, _ in test_samples],
            "train_keys": [k for k, _, _ in train_samples], "train_clips": train_clips}


@pytest.fixture
def release_tree(tmp_path):
    root = str(tmp_path / "out")
    info = build_release_tree(root)
    info["root"] = root
    return info


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


TRAIN_FIELDS = {"image", "caption", "image_id", "hard_i", "hard_c", "hard_i_id", "source_id", "source_caption", "scene"}


def test_export_has_every_field_and_every_hard_negative_resolves_to_the_same_clip(release_tree, tmp_path):
    dest = str(tmp_path / "PAB")
    summary = export_official(release_tree["root"], dest)
    assert summary["train_images"] == len(release_tree["train_keys"]) == 16
    assert summary["test_images"] == len(release_tree["test_keys"]) == 4
    assert summary["generation_indices"] == [0, 1] and summary["skipped"] == []
    assert sorted(os.listdir(f"{dest}/annotation/train")) == ["attr_0.json", "attr_1.json"]

    keys = json.load(open(f"{dest}/annotation/pab_keys.json", encoding="utf-8"))
    clips = sorted(["clip alpha", "clip beta", "Café clip", "clip delta"])
    assert keys["clips"] == clips
    records = [r for k in (0, 1) for r in _jsonl(f"{dest}/annotation/train/attr_{k}.json")]
    by_id = {r["image_id"]: r for r in records}
    assert len(by_id) == len(records) == 16
    by_key = {keys["train"][r["image_id"]]: r for r in records}
    assert set(by_key) == set(release_tree["train_keys"])
    for key, r in by_key.items():
        behavior_field = "normal" if key.split("-")[1] == "n" else "anomaly"
        assert set(r) == TRAIN_FIELDS | {behavior_field}, key
        k = int(r["image_id"].split("_")[0])
        kind = {"n": "goal", "a": "wentrong", "ap": "full"}[key.split("-")[1]]
        assert r["image"].startswith(f"train/imgs_{k}/{kind}/") and k == int(key.rsplit("-", 1)[1])
        # the hard negative: the shard's link, an exported image of the same clip, with its caption
        neg = release_tree["links"][key]
        assert keys["train"][r["hard_i_id"]] == neg
        assert by_id[r["hard_i_id"]]["image"] == "train/" + r["hard_i"]
        assert by_id[r["hard_i_id"]]["caption"] == r["hard_c"]
        assert r["source_id"].split("_")[0] == by_id[r["hard_i_id"]]["source_id"].split("_")[0]
        clip = clips[int(r["source_id"].split("_")[0])]
        assert clip_key(clip) == key.split("-")[0]
        assert r["source_id"].split("_")[1] == {"n": "0", "a": "1", "ap": "2"}[key.split("-")[1]]
        assert r["source_caption"] == f"{clip} source caption {key.split('-')[1].replace('ap', 'a+')}"
        # as the official loader opens them: image_root + image, pose/ + image, train/ + hard_i
        for rel in (r["image"], "pose/" + r["image"], "train/" + r["hard_i"], "pose/train/" + r["hard_i"]):
            with Image.open(f"{dest}/{rel}") as im:
                assert im.format == "JPEG" and im.size == (32, 32)
    src = release_tree["store"]
    some = next(iter(by_key))
    assert open(f"{dest}/{by_key[some]['image']}", "rb").read() == src.read_bytes(
        f"generate/{some.rsplit('-', 1)[0]}/{some}.jpg")

    tests = _jsonl(f"{dest}/annotation/test/attr.json")
    assert [t["image_id"] for t in tests] == [0, 1, 2, 3]
    for t in tests:
        assert isinstance(t["caption"], list) and len(t["caption"]) == 1 and t["caption"][0]
        assert t["image"] == f"test/{t['image_id']}.jpg" and os.path.exists(f"{dest}/pose/{t['image']}")
        assert ("normal" in t) != ("anomaly" in t) and t["scene"]
    # pairs stay together, normal first
    assert [keys["test"][str(i)].split("-")[1] for i in range(4)] == ["normal", "anomaly"] * 2


def test_a_sample_whose_hard_negative_cannot_be_exported_is_left_out_with_a_reason(release_tree, tmp_path):
    store = release_tree["store"]
    victim = next(k for k in release_tree["train_keys"] if "-a-" in k)
    store.remove(f"gen_pose/{victim.rsplit('-', 1)[0]}/{victim}.png")
    summary = export_official(release_tree["root"], str(tmp_path / "PAB"))
    reasons = {s["sample_key"]: s["reason"] for s in summary["skipped"]}
    assert "file missing" in reasons[victim]
    pointing = [k for k, neg in release_tree["links"].items() if neg == victim]
    assert pointing and all(f"hard negative {victim}" in reasons[k] for k in pointing)
    assert summary["train_images"] == 16 - len(reasons)
    keys = json.load(open(tmp_path / "PAB" / "annotation" / "pab_keys.json", encoding="utf-8"))
    assert victim not in keys["train"].values()
    records = [r for k in summary["generation_indices"]
               for r in _jsonl(str(tmp_path / "PAB" / "annotation" / "train" / f"attr_{k}.json"))]
    ids = {r["image_id"] for r in records}
    assert all(r["hard_i_id"] in ids for r in records)


def test_missing_manifests_are_a_clear_error_and_one_split_exports_alone(release_tree, tmp_path):
    Store(str(tmp_path / "empty")).write_text("config.yaml", "x: 1\n")
    with pytest.raises(FileNotFoundError, match="train_shards.*test_shards"):
        export_official(str(tmp_path / "empty"), str(tmp_path / "dest"))
    store = release_tree["store"]
    store.remove("manifests/test_shards.parquet")
    summary = export_official(release_tree["root"], str(tmp_path / "train-only"))
    assert summary["test_images"] == 0 and summary["train_images"] == 16
    assert "annotation/test/attr.json" not in summary["annotation_files"]
    store.remove("manifests/prompts.parquet")
    with pytest.raises(FileNotFoundError, match="prompts"):
        export_official(release_tree["root"], str(tmp_path / "dest"))


def _drop_by_passes(keys, negs, clips, skipped):
    """The export's hard-negative rule as it was written over dicts: passes in key order until none drops."""
    joined = {k: (n, c) for k, n, c in zip(keys, negs, clips)}
    while True:
        dropped = False
        for key in sorted(joined):
            neg = joined[key][0]
            if neg not in joined:
                why = f"was left out: {skipped[neg]}" if neg in skipped else "is not among the shipped training samples"
                skipped[key] = f"hard negative {neg} {why}"
            elif joined[neg][1] != joined[key][1]:
                skipped[key] = f"hard negative {neg} belongs to another clip"
            else:
                continue
            del joined[key]
            dropped = True
        if not dropped:
            return set(joined)


@pytest.mark.parametrize("seed", range(5))
def test_the_vectorised_hard_negative_drop_keeps_and_words_exactly_what_the_passes_did(seed):
    """Random negative graphs (chains, cycles, other clips, keys left out earlier or never shipped):
    the Arrow/numpy version keeps the same samples and gives each dropped one the same reason."""
    import pyarrow as pa

    from pab_build.release.official_train import _drop_broken_negatives

    rng = np.random.default_rng(seed)
    keys = [f"c{i:04d}" for i in range(300)]
    pool = keys + [f"gone{i}" for i in range(10)] + [f"never{i}" for i in range(5)]
    # mostly a neighbour of the same clip of 6 (chains and cycles), some anywhere, gone or never shipped
    negs = [keys[i // 6 * 6 + (i + 1 + rng.integers(0, 5)) % 6] if rng.random() < 0.9
            else pool[rng.integers(0, len(pool))] for i in range(len(keys))]
    clips = [None if rng.random() < 0.02 else f"clip{rng.integers(0, 50) if rng.random() < 0.03 else i // 6}"
             for i in range(len(keys))]
    earlier = {f"gone{i}": f"file missing: generate/gone{i}.jpg" for i in range(10)}
    want_skipped = dict(earlier)
    want = _drop_by_passes(keys, negs, clips, want_skipped)
    got_skipped = dict(earlier)
    keep = _drop_broken_negatives(pa.table({"sample_key": keys, "hard_negative_key": negs, "clip_key": clips}),
                                  got_skipped)
    assert {k for k, kept in zip(keys, keep) if kept} == want
    assert got_skipped == want_skipped and 0 < len(want) < len(keys)


def test_jpegs_are_hard_linked_on_one_file_system_and_copied_otherwise(release_tree, tmp_path):
    root, src = release_tree["root"], release_tree["store"]
    key = sorted(release_tree["train_keys"])[0]
    rel = f"generate/{key.rsplit('-', 1)[0]}/{key}.jpg"
    linked, copied = str(tmp_path / "linked"), str(tmp_path / "copied")
    export_official(root, linked)
    export_official(root, copied, link=False)
    keys = json.load(open(f"{linked}/annotation/pab_keys.json", encoding="utf-8"))
    (image,) = [r["image"] for k in (0, 1) for r in _jsonl(f"{linked}/annotation/train/attr_{k}.json")
                if keys["train"][r["image_id"]] == key]
    assert os.path.samefile(f"{linked}/{image}", src.path(rel))  # the same inode: no second copy
    assert not os.path.samefile(f"{copied}/{image}", src.path(rel))
    assert open(f"{copied}/{image}", "rb").read() == src.read_bytes(rel)
    with Image.open(f"{linked}/pose/{image}") as im:  # pose maps are PNGs in the build: re-encoded, not linked
        assert im.format == "JPEG"
    # a rebuild renames a new file over OUT's: the export keeps the bytes it had
    before = open(f"{linked}/{image}", "rb").read()
    src.write_bytes(rel, b"\xff\xd8\xff new bytes")
    assert open(f"{linked}/{image}", "rb").read() == before


def test_a_symlink_in_out_is_neither_linked_nor_read(release_tree, tmp_path):
    """Only regular files inside OUT are exported: an image that is a symlink (here to a JPEG outside
    OUT) leaves its sample out with a reason."""
    src = release_tree["store"]
    key = sorted(release_tree["train_keys"])[1]
    rel = f"generate/{key.rsplit('-', 1)[0]}/{key}.jpg"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(src.read_bytes(rel))
    os.remove(src.path(rel))
    os.symlink(outside, src.path(rel))
    summary = export_official(release_tree["root"], str(tmp_path / "PAB"))
    assert {"sample_key": key, "split": "train", "reason": f"file missing: {rel}"} in summary["skipped"]
    assert not any(os.path.samefile(p, outside) for p in glob.glob(str(tmp_path / "PAB" / "**" / "*.jpg"),
                                                                    recursive=True))
