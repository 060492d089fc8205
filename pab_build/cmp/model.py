"""CMP, the Cross-Modal Pose-aware retrieval model (paper section 4, Figure 3).

Image encoder: a Swin Transformer (transformers ``SwinModel``); its patch tokens get a [CLS] token
prepended that is their mean (4.1). Pose-aware block (PE): the pose map goes through a small conv
stem and the *same* image encoder, then ``f_V = f_I + CA(q=LN(f_P), k=v=LN(f_I))`` (eq. 1-2).
Text encoder: the first half of BERT's layers; cross encoder: the second half, each layer with a
cross-attention to the image tokens (4.3). Global features, two heads (``cmp.itc_head``):

- ``paper`` (eq. 4): ``FC([AVG(f_pat), f_cls])`` on both sides, E = ``cmp.embed_dim``.
- ``official`` (github.com/Shuyu-XJTU/CMP ``models/cmp.py``, what the released ``cmp.pth`` holds):
  image = the patch tokens adaptive-average-pooled into 3 groups, concatenated (3 Dv); text =
  [CLS, 3 pooled groups of the other tokens, padding included] (4 Dt); each through
  BatchNorm1d -> Dropout(0.5) -> Linear (3072 -> 2048 for Swin-B / BERT-base).

Heads: ITM (MLP -> 2) and BERT's MLM head. Shapes: B batch, L image tokens (1 + patches),
T text tokens, Dv image width, Dt text width, E embedding size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pab_build.config import CMPConfig, PABConfig, model_path


class PoseStem(nn.Module):
    """Pose map -> 3-channel input for the shared image encoder (the official ``pose_conv``)."""

    def __init__(self, width: int = 96):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(width, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, pose: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, H, W)
        return self.reduce(self.expand(pose))


class PoseCrossAttention(nn.Module):
    """Multi-head attention with queries from the pose tokens, keys/values from the image tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pose attention: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        B, L, D = image.shape

        def split(x):  # (B, L, D) -> (B, heads, L, D/heads)
            return x.view(B, -1, self.heads, D // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(pose)), split(self.k(image)), split(self.v(image)))
        return self.proj(out.transpose(1, 2).reshape(B, -1, D))  # (B, L, D)


class PoseAwareBlock(nn.Module):
    """f_V = f_I + CA(q = LN(f_P), k = v = LN(f_I)); one LayerNorm for both, as the official code."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = PoseCrossAttention(dim, heads)

    def forward(self, f_image: torch.Tensor, f_pose: torch.Tensor) -> torch.Tensor:
        return f_image + self.attn(self.norm(f_image), self.norm(f_pose))


class CrossEncoderLayer(nn.Module):
    """One pretrained BERT layer (bidirectional self-attention + FFN) with a new cross-attention
    to the image tokens between them; parameter names follow BERT's (``crossattention.*``)."""

    def __init__(self, bert_layer: nn.Module, config, image_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention

        self.attention = bert_layer.attention
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        hidden = config.hidden_size
        # image tokens are Dv wide: keys/values project Dv -> Dt (X-VLM / official CMP do the same)
        self.crossattention.self.key = nn.Linear(image_width, hidden)
        self.crossattention.self.value = nn.Linear(image_width, hidden)
        self.intermediate = bert_layer.intermediate
        self.output = bert_layer.output

    def forward(self, text: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x, _ = self.attention(text, text_bias)  # (B, T, Dt)
        x, _ = self.crossattention(x, None, encoder_hidden_states=image, encoder_attention_mask=None)
        return self.output(self.intermediate(x), x)  # (B, T, Dt)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 -> (B, 1, 1, T) additive bias for BERT attention (0 keep, very negative drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1: (B, T, D), (B, T) -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def feature_mapping(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """The official ITC head: BatchNorm1d -> Dropout -> Linear, the Linear initialised near zero
    (std 1e-5, as ``models/cmp.py``) so the first steps are driven by the BatchNorm statistics."""
    head = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    nn.init.normal_(head[2].weight, std=1e-5)
    nn.init.zeros_(head[2].bias)
    return head


def pool3(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, 3, D): adaptive average pooling of the token axis into 3 groups."""
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), 3).transpose(1, 2)


def _cmp_default(field: str):
    """The profile's default for ``cmp.<field>``: the full (official) settings, so an architecture built
    without a profile is the one ``cmp.pth`` loads into (a 256-d head would skip 4 of its tensors)."""
    return CMPConfig.model_fields[field].default


@dataclass
class CMPArchitecture:
    """What the switches and sizes of one CMP model are (everything else comes from the weights).
    Defaults are ``CMPConfig``'s, i.e. the full profile's official head (2048-d)."""

    embed_dim: int = _cmp_default("embed_dim")
    text_layers: int | None = _cmp_default("text_layers")  # None = the first half of BERT's layers
    use_pose: bool = _cmp_default("use_pose")
    use_ihnm: bool = _cmp_default("use_ihnm")
    temperature: float = _cmp_default("temperature")
    pose_heads: int = _cmp_default("pose_heads")
    pose_stem_width: int = _cmp_default("pose_stem_width")
    itc_head: str = _cmp_default("itc_head")  # "official" (pooled groups, BN, 2048-d) | "paper" (eq. 4)
    itc_dropout: float = _cmp_default("itc_dropout")  # dropout of the official head

    @classmethod
    def from_config(cls, cfg: PABConfig) -> "CMPArchitecture":
        c = cfg.cmp
        return cls(embed_dim=c.embed_dim, text_layers=c.text_layers, use_pose=c.use_pose, use_ihnm=c.use_ihnm,
                   temperature=c.temperature, pose_heads=c.pose_heads, pose_stem_width=c.pose_stem_width,
                   itc_head=c.itc_head, itc_dropout=c.itc_dropout)


class CMPModel(nn.Module):
    def __init__(self, swin: nn.Module, bert_mlm: nn.Module, arch: CMPArchitecture):
        super().__init__()
        self.arch = arch
        bert = bert_mlm.bert
        n_layers = len(bert.encoder.layer)
        n_text = arch.text_layers if arch.text_layers is not None else n_layers // 2
        if not 1 <= n_text < n_layers:
            raise ValueError(f"cmp.text_layers={n_text}: BERT has {n_layers} layers; the text encoder takes "
                             "1..n-1 of them and the cross encoder the rest")
        image_width, text_width = swin.num_features, bert.config.hidden_size

        self.image_encoder = swin  # pixels (B, 3, H, W) -> patch tokens (B, L-1, Dv)
        layers = list(bert.encoder.layer)
        bert.encoder.layer = nn.ModuleList(layers[:n_text])
        bert.config = copy.deepcopy(bert.config)
        bert.config.num_hidden_layers = n_text
        self.text_encoder = bert  # embeddings + first n_text layers: ids (B, T) -> (B, T, Dt)
        self.cross_encoder = nn.ModuleList(
            CrossEncoderLayer(layer, bert.config, image_width) for layer in layers[n_text:])
        self.mlm_head = bert_mlm.cls  # (B, T, Dt) -> (B, T, vocab); decoder tied to the word embeddings
        if arch.itc_head == "official":
            self.image_proj = feature_mapping(3 * image_width, arch.embed_dim, arch.itc_dropout)
            self.text_proj = feature_mapping(4 * text_width, arch.embed_dim, arch.itc_dropout)
        elif arch.itc_head == "paper":
            self.image_proj = nn.Linear(2 * image_width, arch.embed_dim)  # eq. 4
            self.text_proj = nn.Linear(2 * text_width, arch.embed_dim)
        else:
            raise ValueError(f"cmp.itc_head={arch.itc_head!r}: expected 'official' or 'paper'")
        self.itm_head = nn.Sequential(nn.Linear(text_width, 2 * text_width), nn.LayerNorm(2 * text_width),
                                      nn.GELU(), nn.Linear(2 * text_width, 2))
        self.temp = nn.Parameter(torch.tensor(float(arch.temperature)))
        # created last, so switching the pose branch off leaves every other initial weight unchanged
        if arch.use_pose:
            self.pose_stem = PoseStem(arch.pose_stem_width)
            self.pose_block = PoseAwareBlock(image_width, arch.pose_heads)

    @classmethod
    def from_pretrained(cls, swin_path: str, bert_path: str, arch: CMPArchitecture) -> "CMPModel":
        from transformers import BertForMaskedLM, SwinModel

        swin = SwinModel.from_pretrained(swin_path, add_pooling_layer=False)
        bert_mlm = BertForMaskedLM.from_pretrained(bert_path)
        return cls(swin, bert_mlm, arch)

    # -- encoders ---------------------------------------------------------------------------
    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.image_encoder(pixel_values=pixels).last_hidden_state  # (B, L-1, Dv)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)  # (B, L, Dv), CLS = mean

    def encode_image(self, images: torch.Tensor, poses: torch.Tensor | None = None) -> torch.Tensor:
        """Pose-aware image tokens f_V (B, L, Dv); f_I when the pose branch is off."""
        f_image = self._image_tokens(images)
        if not self.arch.use_pose:
            return f_image
        if poses is None:
            raise ValueError("the pose branch is on (cmp.use_pose) but no pose maps were given")
        f_pose = self._image_tokens(self.pose_stem(poses))
        return self.pose_block(f_image, f_pose)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, Dt)

    def cross(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Text tokens attending to image tokens through the cross encoder: (B, T, Dt)."""
        bias = additive_mask(text_mask, text.dtype)
        for layer in self.cross_encoder:
            text = layer(text, bias, image)
        return text

    # -- global features and heads ----------------------------------------------------------
    def image_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.arch.itc_head == "official":
            return self.image_proj(pool3(tokens[:, 1:]).flatten(1))  # (B, 3 Dv) -> (B, E)
        return self.image_proj(torch.cat([tokens[:, 1:].mean(1), tokens[:, 0]], dim=-1))  # eq. 4: (B, E)

    def text_feature(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.arch.itc_head == "official":  # the official pooling ignores the mask (padding included)
            return self.text_proj(torch.cat([tokens[:, :1], pool3(tokens[:, 1:])], dim=1).flatten(1))  # (B, 4 Dt) -> (B, E)
        words = masked_mean(tokens[:, 1:], mask[:, 1:])  # AVG over real tokens after [CLS]
        return self.text_proj(torch.cat([words, tokens[:, 0]], dim=-1))  # eq. 4: (B, E)

    def itm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.cross(text, text_mask, image)[:, 0])  # (B, 2): [no match, match]

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(min=1e-3, max=0.5)  # keeps a learnable temperature finite

    def forward(self, batch: dict, mlm_probability: float, special_ids: list[int], mask_id: int,
                recipe: dict | None = None) -> dict:
        """Training losses of one batch (see :func:`pab_build.cmp.losses.cmp_losses`). The losses
        run inside ``forward`` so distributed wrappers see one forward per step."""
        from pab_build.cmp.losses import cmp_losses

        return cmp_losses(self, batch, mlm_probability=mlm_probability, special_ids=special_ids, mask_id=mask_id,
                          recipe=recipe)


def load_cmp(cfg: PABConfig) -> tuple[CMPModel, object]:
    """CMP initialised from the profile's Swin and BERT (local folders or hub ids) and its tokenizer."""
    from transformers import AutoTokenizer

    arch = CMPArchitecture.from_config(cfg)
    model = CMPModel.from_pretrained(model_path(cfg, "swin"), model_path(cfg, "bert"), arch)
    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg, "bert"))
    return model, tokenizer
