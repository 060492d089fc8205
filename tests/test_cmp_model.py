"""CMP model, losses and data: ablation switches, masking, the shard pipeline and its index."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from pab_build.cmp import data as cmp_data
from pab_build.cmp.losses import cmp_losses, mask_spans, mask_tokens
from pab_build.cmp.model import CMPArchitecture, CMPModel
from pab_build.fixtures.tiny_cmp import write_synthetic_cmp_shards

CAPTIONS = ["a person in a red shirt standing on the grass", "a person in a blue shirt lying on the grass",
            "a man in black pants running in the park", "a woman in a white dress falling on the street"]


@pytest.fixture(scope="module")
def tiny_paths(tiny_model):
    return tiny_model("swin"), tiny_model("bert")


def build(tiny_paths, seed=0, **arch):
    torch.manual_seed(seed)
    return CMPModel.from_pretrained(*tiny_paths, CMPArchitecture(embed_dim=16, pose_heads=4, pose_stem_width=8, **arch))


@pytest.fixture(scope="module")
def tokenizer(tiny_paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_paths[1])


def make_batch(tokenizer, n=4, size=32, hard_rows=(0, 2), hard_captions=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(CAPTIONS[:n], padding="longest", return_tensors="pt")
    hard_captions = hard_captions or [CAPTIONS[(i + 1) % n] for i in hard_rows]
    hard = tokenizer(hard_captions, padding="longest", return_tensors="pt")
    return {"images": torch.randn(n, 3, size, size, generator=g), "poses": torch.randn(n, 3, size, size, generator=g),
            "ids": enc["input_ids"], "mask": enc["attention_mask"], "sample_ids": torch.arange(n),
            "hard_rows": torch.tensor(hard_rows), "hard_images": torch.randn(len(hard_rows), 3, size, size, generator=g),
            "hard_poses": torch.randn(len(hard_rows), 3, size, size, generator=g),
            "hard_ids": hard["input_ids"], "hard_mask": hard["attention_mask"]}


def losses(model, tokenizer, batch, seed=5, recipe=None):
    torch.manual_seed(seed)  # same negatives and masks in every call
    with torch.no_grad():
        return cmp_losses(model.eval(), batch, 0.25, list(tokenizer.all_special_ids), tokenizer.mask_token_id,
                          recipe=recipe)


def test_text_and_cross_encoders_split_bert_and_load_its_weights(tiny_paths):
    from transformers import BertForMaskedLM

    model = build(tiny_paths)
    bert = BertForMaskedLM.from_pretrained(tiny_paths[1])
    assert len(model.text_encoder.encoder.layer) == 2 and len(model.cross_encoder) == 2
    torch.testing.assert_close(model.cross_encoder[1].output.dense.weight, bert.bert.encoder.layer[3].output.dense.weight)
    torch.testing.assert_close(model.text_encoder.encoder.layer[0].attention.self.query.weight,
                               bert.bert.encoder.layer[0].attention.self.query.weight)
    # the MLM decoder stays tied to the word embeddings
    assert model.mlm_head.predictions.decoder.weight.data_ptr() == model.text_encoder.embeddings.word_embeddings.weight.data_ptr()
    with pytest.raises(ValueError, match="text_layers"):
        build(tiny_paths, text_layers=4)


def test_pose_branch_changes_image_features_only_when_on(tiny_paths, tokenizer):
    with_pose, without = build(tiny_paths, use_pose=True).eval(), build(tiny_paths, use_pose=False).eval()
    # nothing but the pose modules differs between the two models
    extra = set(with_pose.state_dict()) - set(without.state_dict())
    assert extra and all(k.startswith(("pose_stem.", "pose_block.")) for k in extra)
    for k, v in without.state_dict().items():
        torch.testing.assert_close(v, with_pose.state_dict()[k])
    b = make_batch(tokenizer)
    other_poses = torch.randn_like(b["poses"])
    with torch.no_grad():
        f_on = with_pose.image_feature(with_pose.encode_image(b["images"], b["poses"]))
        f_on2 = with_pose.image_feature(with_pose.encode_image(b["images"], other_poses))
        f_off = without.image_feature(without.encode_image(b["images"], b["poses"]))
        f_off2 = without.image_feature(without.encode_image(b["images"], other_poses))
        t_on = with_pose.text_feature(with_pose.encode_text(b["ids"], b["mask"]), b["mask"])
        t_off = without.text_feature(without.encode_text(b["ids"], b["mask"]), b["mask"])
    # (the official head starts near 0: compare directions, which is what retrieval uses)
    f_on, f_on2, f_off, f_off2 = (torch.nn.functional.normalize(f, dim=-1) for f in (f_on, f_on2, f_off, f_off2))
    assert not torch.allclose(f_on, f_on2, atol=1e-3)  # the pose map matters when PE is on
    torch.testing.assert_close(f_off, f_off2)  # and is ignored when it is off
    assert not torch.allclose(f_on, f_off, atol=1e-3)
    torch.testing.assert_close(t_on, t_off)  # text side untouched


def test_ihnm_negatives_enter_itm_only_when_on(tiny_paths, tokenizer):
    on, off = build(tiny_paths, use_ihnm=True), build(tiny_paths, use_ihnm=False)
    batch = make_batch(tokenizer)
    other = make_batch(tokenizer, hard_captions=["a dog in the snow", "a boy riding a bike"])
    other["hard_images"] = torch.randn_like(batch["hard_images"])
    l_on, l_on2 = losses(on, tokenizer, batch), losses(on, tokenizer, other)
    l_off, l_off2 = losses(off, tokenizer, batch), losses(off, tokenizer, other)
    assert l_on["ihnm_pairs"] == 4 and l_off["ihnm_pairs"] == 0  # (I, T~) and (I~, T) for 2 rows
    assert abs(float(l_on["itm"] - l_on2["itm"])) > 1e-6  # counterparts change ITM when on
    assert float(l_off["itm"]) == pytest.approx(float(l_off2["itm"]), abs=1e-7)  # ignored when off
    assert float(l_on["itm"]) > float(l_off["itm"])  # extra term
    for k in ("itc", "mlm"):  # nothing else changes
        assert float(l_on[k]) == pytest.approx(float(l_off[k]), abs=1e-6)
    total = l_on["itc"] + l_on["itm"] + l_on["mlm"]
    assert float(l_on["loss"]) == pytest.approx(float(total), abs=1e-6)


def test_mask_tokens_follows_the_80_10_10_rule():
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (200, 50))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    attention = torch.ones_like(ids)
    attention[:, 40:] = 0  # padding is never masked
    masked, labels = mask_tokens(ids, attention, 0.25, special_ids=[0, 1, 2, 3, 4], mask_id=4, vocab_size=1000)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()
    assert chosen[:, 1:40].float().mean().item() == pytest.approx(0.25, abs=0.02)
    torch.testing.assert_close(labels[chosen], ids[chosen])
    as_mask = (masked[chosen] == 4).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.03)  # (a random word equal to the original is rare)
    torch.testing.assert_close(masked[~chosen], ids[~chosen])


# -- data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cmp-shards"))
    write_synthetic_cmp_shards(root, "train", n_identities=8, image_size=32, samples_per_shard=6)
    return root


def test_index_reads_counterparts_from_any_shard(train_shards):
    urls = cmp_data.list_shards(train_shards, "train")
    assert len(urls) == 3  # 16 samples, 6 per shard
    index = cmp_data.build_member_index(urls)
    assert len(index) == 16
    import json
    import tarfile

    with tarfile.open(urls[2]) as tar:  # a sample in the last shard and its counterpart
        meta = json.loads(tar.extractfile([m for m in tar if m.name.endswith(".json")][0]).read())
    assert index.read(meta["hard_negative_key"], "txt").decode() == meta["hard_negative_caption"]
    Image.open(io.BytesIO(index.read(meta["hard_negative_key"], "jpg"))).verify()
    with pytest.raises(FileNotFoundError):
        cmp_data.list_shards(train_shards, "nonexistent")


def test_train_fraction_is_deterministic_and_nested():
    keys = [f"c{i:010x}-n-000" for i in range(2000)]
    ten = {k for k in keys if cmp_data.in_fraction(k, 0.1)}
    half = {k for k in keys if cmp_data.in_fraction(k, 0.5)}
    assert ten < half and 150 < len(ten) < 250 and 900 < len(half) < 1100
    assert ten == {k for k in keys if cmp_data.in_fraction(k, 0.1)}
    assert not any(cmp_data.in_fraction(k, 0.0) for k in keys)


def _half_white(size=32) -> bytes:
    im = Image.new("RGB", (size, size), "black")
    im.paste((255, 255, 255), (0, 0, size // 2, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_flip_moves_image_and_pose_together(train_shards):
    urls = cmp_data.list_shards(train_shards, "train")
    index = cmp_data.build_member_index(urls)
    transform = cmp_data.ImageTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    td = cmp_data.TrainData(urls=urls, transform=transform, batch_size=4, erasing_probability=0.0,
                            load_counterparts=False)
    key = sorted(index.refs)[0]
    pic = _half_white()
    sides = set()
    for epoch in range(12):
        s = td.decode({"__key__": key, "jpg": pic, "pose.png": pic, "txt": b"a person standing",
                       "json": b"{}"}, epoch)
        left_bright_image = s["image"][:, :, :16].mean() > s["image"][:, :, 16:].mean()
        left_bright_pose = s["pose"][:, :, :16].mean() > s["pose"][:, :, 16:].mean()
        assert left_bright_image == left_bright_pose
        sides.add(bool(left_bright_image))
    assert sides == {True, False}  # both orientations occur
    assert td.decode({"__key__": key, "jpg": b"not an image", "pose.png": pic, "txt": b"x", "json": b"{}"}, 0) is None
    assert td.skipped == 1


def test_epoch_batches_are_reproducible_and_carry_counterparts(train_shards):
    urls = cmp_data.list_shards(train_shards, "train")
    index = cmp_data.build_member_index(urls)
    transform = cmp_data.ImageTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    td = cmp_data.TrainData(urls=urls, transform=transform, batch_size=4, seed=3)
    assert td.steps_per_epoch == 4
    a, b, c = list(td.loader(0)), list(td.loader(0)), list(td.loader(1))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert [x["keys"] for x in a] != [x["keys"] for x in c]  # reshuffled per epoch
    torch.testing.assert_close(a[0]["images"], b[0]["images"])
    assert sorted(k for x in a for k in x["keys"]) == sorted(index.refs)
    batch = a[0]
    assert batch["hard_images"].shape == (4, 3, 32, 32) and len(batch["hard_texts"]) == 4
    assert all("shirt" in t for t in batch["hard_texts"])


def test_eda_is_seeded():
    text = "a person in a red shirt lying on the grass"
    edits = {cmp_data.eda(text, random.Random(s), 1.0) for s in range(20)}
    assert len(edits) > 10  # swaps, deletions and insertions differ from seed to seed
    assert cmp_data.eda(text, random.Random(7), 1.0) == cmp_data.eda(text, random.Random(7), 1.0)
    assert cmp_data.eda(text, random.Random(7), 0.0) == text


def test_official_checkpoint_names_map_onto_ours(tiny_paths, tmp_path):
    from pab_build.cmp.official import load_init_checkpoint

    model = build(tiny_paths, itc_head="paper")  # eq. 4 heads: the official projections cannot load
    ours = model.state_dict()
    blk = "image_encoder.encoder.layers.1.blocks.0."
    qkv_w = torch.cat([ours[blk + f"attention.{p}_proj.weight"] for p in "qkv"]) + 1
    official = {
        "vision_encoder.patch_embed.proj.weight": ours["image_encoder.embeddings.patch_embeddings.projection.weight"] + 1,
        "vision_encoder.layers.1.blocks.0.attn.qkv.weight": qkv_w,
        "vision_encoder.layers.1.blocks.0.attn.proj.bias": ours[blk + "attention.o_proj.bias"] + 1,
        "vision_encoder.layers.1.blocks.0.norm1.weight": ours[blk + "layernorm_before.weight"] + 1,
        "vision_encoder.layers.1.blocks.0.attn.relative_position_bias_table":
            ours[blk + "attention.relative_position_bias.relative_position_bias_table"] + 1,
        "vision_encoder.layers.1.blocks.0.attn.relative_position_index": torch.zeros(16, 16, dtype=torch.long),
        "vision_encoder.layers.0.downsample.reduction.weight": ours["image_encoder.encoder.layers.0.downsample.reduction.weight"] + 1,
        "vision_encoder.norm.bias": ours["image_encoder.layernorm.bias"] + 1,
        "text_encoder.bert.embeddings.word_embeddings.weight": ours["text_encoder.embeddings.word_embeddings.weight"] + 1,
        "text_encoder.bert.encoder.layer.1.attention.self.query.weight":
            ours["text_encoder.encoder.layer.1.attention.self.query.weight"] + 1,
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight":
            ours["cross_encoder.1.crossattention.self.key.weight"] + 1,
        "text_encoder.cls.predictions.bias": ours["mlm_head.predictions.bias"] + 1,
        "pose_conv.expand.0.weight": ours["pose_stem.expand.0.weight"] + 1,
        "pose_block.attn.q.weight": ours["pose_block.attn.q.weight"] + 1,
        "itm_head.3.bias": ours["itm_head.3.bias"] + 1,
        "temp": torch.tensor(0.05),
        "vision_proj.2.weight": torch.zeros(16, 3072),  # official-only projection
        "text_encoder.bert.encoder.layer.3.output.dense.weight": torch.zeros(7, 7),  # wrong shape
    }
    path = tmp_path / "cmp.pth"
    torch.save({"model": official, "epoch": 29}, path)
    report = load_init_checkpoint(model, str(path))
    new = model.state_dict()
    torch.testing.assert_close(new[blk + "attention.k_proj.weight"], qkv_w.chunk(3)[1])
    torch.testing.assert_close(new["cross_encoder.1.crossattention.self.key.weight"],
                               official["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"])
    torch.testing.assert_close(new["temp"], torch.tensor(0.05))
    assert len(report["loaded"]) == len(official) - 3 + 2  # qkv became three tensors
    assert report["unmapped"] == ["vision_encoder.layers.1.blocks.0.attn.relative_position_index", "vision_proj.2.weight"]
    assert report["shape_mismatch"] == ["cross_encoder.1.output.dense.weight"]
    assert "image_proj.weight" in report["missing"]


# -- the official recipe's switches: each changes what it should and nothing else --------------
def test_label_smoothing_changes_only_itc(tiny_paths, tokenizer):
    model, batch = build(tiny_paths), make_batch(tokenizer)
    plain, smoothed = losses(model, tokenizer, batch), losses(model, tokenizer, batch, recipe={"label_smoothing": 0.2})
    assert float(smoothed["itc"]) != pytest.approx(float(plain["itc"]), abs=1e-4)
    for k in ("itm", "mlm"):
        assert float(smoothed[k]) == float(plain[k])
    # against the official formula: targets (1 - e) one-hot + e / N, both directions averaged
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.image_feature(model.encode_image(batch["images"], batch["poses"])), dim=-1)
        txt = torch.nn.functional.normalize(model.text_feature(model.encode_text(batch["ids"], batch["mask"]), batch["mask"]), dim=-1)
        logits = img @ txt.t() / model.temperature()
    labels = 0.8 * torch.eye(4) + 0.2 / 4
    want = (-(logits.log_softmax(1) * labels).sum(1).mean() - (logits.t().log_softmax(1) * labels).sum(1).mean()) / 2
    assert float(smoothed["itc"]) == pytest.approx(float(want), rel=1e-5)


def test_the_eda_stream_adds_weighted_itc_and_itm_and_leaves_mlm(tiny_paths, tokenizer):
    model, batch = build(tiny_paths, use_ihnm=False), make_batch(tokenizer)
    off = losses(model, tokenizer, batch)
    same_text = {**batch, "eda_ids": batch["ids"], "eda_mask": batch["mask"]}
    on = losses(model, tokenizer, same_text, recipe={"eda_weight": 0.8})
    assert float(on["itc"]) == pytest.approx(1.8 * float(off["itc"]), rel=1e-5)  # an unedited stream: the same ITC
    assert float(on["itm"]) > float(off["itm"])  # plus 0.8 x the stream's ITM
    assert float(on["mlm"]) == float(off["mlm"])
    assert float(losses(model, tokenizer, same_text, recipe={"eda_weight": 0.0})["itc"]) == float(off["itc"])


def test_official_masking_masks_whole_words_at_most_max_masks(tokenizer):
    enc = tokenizer(["a skateboarder wearing a jacketed hoodie tumbles on the concrete"] * 64, padding="max_length",
                    max_length=56, return_tensors="pt")
    ids, attention = enc["input_ids"], enc["attention_mask"]
    vocab = tokenizer.get_vocab()
    continuation = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    continuation[[i for w, i in vocab.items() if w.startswith("##")]] = True
    special = list(tokenizer.all_special_ids)
    torch.manual_seed(0)
    _, labels = mask_spans(ids, attention, 0.25, special, tokenizer.mask_token_id, len(vocab), 10, continuation)
    chosen = labels != -100
    assert chosen.sum(1).max() <= 10 and chosen.any(1).float().mean() > 0.8
    assert not (chosen & ~attention.bool()).any() and not torch.isin(ids[chosen], torch.tensor(special)).any()
    # words are masked whole (a piece with the token before it), except where the last span
    # overshoots max_masks and is cut at random, as in the official generator; per-token masking
    # splits words far more often
    def whole_word_share(chosen):
        piece = continuation[ids] & attention.bool()
        masked_pieces = chosen & piece
        with_previous = masked_pieces[:, 1:] & chosen[:, :-1]
        return float(with_previous.sum()) / max(1, int(masked_pieces.sum()))

    assert continuation[ids].any()  # the caption does split into pieces
    _, per_token = mask_tokens(ids, attention, 0.25, special, tokenizer.mask_token_id, len(vocab))
    assert whole_word_share(chosen) > 0.6 > 0.4 > whole_word_share(per_token != -100)


def test_pre_caption_is_the_official_cleaning():
    assert cmp_data.pre_caption("A man, in a RED-shirt/jeans <person> falls!  Ouch.", 56) == \
        "a man in a red shirt jeans person falls ouch"
    assert cmp_data.pre_caption("one two three four", 2) == "one two"


def _decode(train_shards, **switches):
    urls = cmp_data.list_shards(train_shards, "train")
    index = cmp_data.build_member_index(urls)
    td = cmp_data.TrainData(urls=urls, transform=cmp_data.ImageTransform(32, (0.5,) * 3, (0.5,) * 3),
                            batch_size=4, erasing_probability=0.6, eda_probability=1.0, **switches)
    key = sorted(index.refs)[0]
    sample = {"__key__": key, "jpg": index.read(key, "jpg"), "pose.png": _half_white(), "json": index.read(key, "json"),
              "txt": b"A person, in a red shirt; lying on the grass!"}
    return [td.decode(sample, epoch) for epoch in range(8)]


def test_data_switches_change_only_their_part(train_shards):
    base = _decode(train_shards)
    own = _decode(train_shards, pose_augment="own")
    stream = _decode(train_shards, eda_stream=True)
    cleaned = _decode(train_shards, caption_words=56)
    for b, o, s, c in zip(base, own, stream, cleaned):
        for other in (o, s, c):
            torch.testing.assert_close(other["image"], b["image"])  # the image never changes
        torch.testing.assert_close(s["pose"], b["pose"])
        torch.testing.assert_close(c["pose"], b["pose"])
        assert o["text"] == b["text"] and s["eda_text"] == b["text"]  # the stream gets the edit ...
        assert s["text"] == "A person, in a red shirt; lying on the grass!"  # ... the caption stays
        assert "," not in c["text"] and c["text"].islower()
    # own pose augmentation: its own flips (some epochs disagree with the image's) and erasing
    def flipped(x):
        return bool(x[:, :, :16].mean() < x[:, :, 16:].mean())
    assert any(flipped(o["pose"]) != flipped(b["pose"]) for o, b in zip(own, base))
    assert any((o["pose"] == 0).all(0).any() for o in own) and not any((b["pose"] == 0).all(0).any() for b in base)


def test_eda_uses_synonyms_when_a_wordnet_is_given():
    synonyms = {"person": ["individual"], "grass": ["lawn"], "lying": ["resting"]}.get
    text = "a person lying on the grass"
    edits = {cmp_data.eda(text, random.Random(s), 1.0, synonyms=lambda w: synonyms(w, [])) for s in range(40)}
    assert any("individual" in e or "lawn" in e or "resting" in e for e in edits)
    assert not any("individual" in e for e in (cmp_data.eda(text, random.Random(s), 1.0) for s in range(40)))


def test_an_architecture_built_without_a_profile_is_the_full_profiles():
    """A bare CMPArchitecture() must load the official cmp.pth: the 2048-d official ITC head, not a 256-d one."""
    from pab_build.config import load_config

    bare = CMPArchitecture()
    assert bare == CMPArchitecture.from_config(load_config("full"))
    assert (bare.itc_head, bare.embed_dim) == ("official", 2048)
