"""The official CMP checkpoint layout (github.com/Shuyu-XJTU/CMP) loads into our model completely.

The key names and shapes of ``official_cmp_state`` (pab_build/fixtures/tiny_cmp.py) are written from the official code, not from our model:
``models/swin_transformer.py`` (X-VLM's Swin: ``patch_embed``, ``layers.i.blocks.j.{norm1, attn.qkv,
attn.proj, attn.relative_position_bias_table, attn.relative_position_index, norm2, mlp.fc1, mlp.fc2}``,
``layers.i.downsample.{reduction, norm}``, ``norm``), ``models/bert.py`` (ALBEF's BertForMaskedLM
without pooler; layers >= ``fusion_layer`` carry ``crossattention`` whose key/value read
``encoder_width``; ``cls.predictions.{bias, transform, decoder}`` with the decoder bias tied),
``models/cmp.py`` (``vision_proj`` / ``text_proj`` = BatchNorm1d, Dropout, Linear over 3 x Dv and
4 x Dt; ``itm_head`` = Linear, LayerNorm, GELU, Linear; ``temp``) and ``models/pose.py``
(``pose_block.{norm, attn.q, attn.k, attn.v, attn.proj}``, ``pose_conv.{expand, reduce}.{0: Conv2d, 1: BatchNorm2d}``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pab_build.cmp.model import CMPArchitecture, CMPModel
from pab_build.cmp.official import evaluation_gaps, load_official_state, official_name
from pab_build.fixtures.tiny_cmp import TINY_EMBED, TINY_POSE_WIDTH, official_cmp_state

@pytest.fixture(scope="module")
def tiny_paths(tiny_model):
    return tiny_model("swin"), tiny_model("bert")


def build(tiny_paths, **arch):
    torch.manual_seed(0)
    return CMPModel.from_pretrained(*tiny_paths, CMPArchitecture(embed_dim=TINY_EMBED, pose_heads=4,
                                                                 pose_stem_width=TINY_POSE_WIDTH, **arch))


def test_an_official_checkpoint_leaves_only_recomputed_buffers_unmapped(tiny_paths):
    model, official = build(tiny_paths), official_cmp_state()
    report = load_official_state(model, official)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert report["unmapped"] and all(n.endswith(("relative_position_index", "position_ids")) for n in report["unmapped"])
    assert evaluation_gaps(report) == []
    ours = model.state_dict()
    n_text = len(model.text_encoder.encoder.layer)
    for name, tensor in ours.items():  # every tensor of ours is the official tensor of the same role
        source = official[official_name(name, n_text)]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias")):
            source = source.chunk(3, dim=0)["qkv".index(name.rsplit(".", 2)[-2][0])]
        torch.testing.assert_close(tensor, source.to(tensor.dtype), msg=name)


def test_the_official_itc_heads_compute_what_the_official_code_computes(tiny_paths):
    """get_image_feat / get_text_feat of models/cmp.py, written out with the official tensors."""
    model, official = build(tiny_paths).eval(), official_cmp_state(seed=1)
    load_official_state(model, official)
    g = torch.Generator().manual_seed(2)
    image_tokens, text_tokens = torch.randn(3, 17, 32, generator=g), torch.randn(3, 11, 32, generator=g)

    def head(prefix, x):  # BatchNorm1d (eval) -> Dropout (eval: identity) -> Linear
        bn = {k: official[f"{prefix}.0.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        x = (x - bn["running_mean"]) / torch.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
        return x @ official[f"{prefix}.2.weight"].t() + official[f"{prefix}.2.bias"]

    pooled = F.adaptive_avg_pool1d(image_tokens[:, 1:].transpose(1, 2), 3).transpose(1, 2)
    want_image = head("vision_proj", torch.cat([pooled[:, 0], pooled[:, 1], pooled[:, 2]], dim=1))
    pooled = F.adaptive_avg_pool1d(text_tokens[:, 1:].transpose(1, 2), 3).transpose(1, 2)
    want_text = head("text_proj", torch.cat([text_tokens[:, 0], pooled[:, 0], pooled[:, 1], pooled[:, 2]], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model.image_feature(image_tokens), want_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.text_feature(text_tokens, torch.ones(3, 11)), want_text, atol=1e-5, rtol=1e-5)


def test_the_paper_heads_cannot_take_the_official_projections_and_say_so(tiny_paths):
    model = build(tiny_paths, itc_head="paper")
    report = load_official_state(model, official_cmp_state())
    assert {"vision_proj.0.weight", "vision_proj.2.weight", "text_proj.2.bias"} <= set(report["unmapped"])
    gaps = evaluation_gaps(report)
    assert gaps == ["image_proj.bias", "image_proj.weight", "text_proj.bias", "text_proj.weight"]


def test_images_are_normalised_with_clip_statistics_unless_asked_otherwise(smoke_cfg, tiny_model):
    from PIL import Image

    from pab_build.cmp.data import CLIP_MEAN, CLIP_STD, image_transform
    from pab_build.config import model_path

    swin = tiny_model("swin")
    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    clip = image_transform(smoke_cfg, swin)
    assert (clip.mean, clip.std) == (CLIP_MEAN, CLIP_STD) == ((0.48145466, 0.4578275, 0.40821073),
                                                              (0.26862954, 0.26130258, 0.27577711))
    smoke_cfg.cmp.image_norm = "processor"
    imagenet = image_transform(smoke_cfg, model_path(smoke_cfg, "swin"))
    assert imagenet.mean == pytest.approx((0.485, 0.456, 0.406))  # the tiny Swin processor's
    x_clip, x_imagenet = clip.to_tensor(grey), imagenet.to_tensor(grey)
    assert x_clip[0, 0, 0].item() == pytest.approx((128 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-5)
    assert not torch.allclose(x_clip, x_imagenet)
