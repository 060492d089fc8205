"""Load the official released CMP checkpoint (``cmp.pth``, github.com/Shuyu-XJTU/CMP) into our model.

The official model is X-VLM-style: a Microsoft Swin (``vision_encoder.*``, fused ``qkv``), an
ALBEF-style ``BertForMaskedLM`` whose last layers carry the cross-attention
(``text_encoder.bert.*``, ``text_encoder.cls.*``), ``pose_conv`` / ``pose_block``, ``itm_head``,
``temp``. Name mapping (official -> ours):

=============================================  ==================================================
``vision_encoder.patch_embed.proj|norm``       ``image_encoder.embeddings.patch_embeddings.projection`` / ``.norm``
``vision_encoder.layers.i.blocks.j.norm1|2``   ``image_encoder.encoder.layers.i.blocks.j.layernorm_before|after``
``...attn.qkv`` (3D x D)                       split into ``...attention.q_proj|k_proj|v_proj``
``...attn.proj``                               ``...attention.o_proj``
``...attn.relative_position_bias_table``       ``...attention.relative_position_bias.relative_position_bias_table``
``...mlp.fc1|fc2``                             ``...mlp.fc1|fc2``
``vision_encoder.layers.i.downsample.*``       ``image_encoder.encoder.layers.i.downsample.*``
``vision_encoder.norm``                        ``image_encoder.layernorm``
``text_encoder.bert.embeddings.*``             ``text_encoder.embeddings.*``
``text_encoder.bert.encoder.layer.i`` (i < n)  ``text_encoder.encoder.layer.i``
``text_encoder.bert.encoder.layer.i`` (i >= n) ``cross_encoder.(i - n)``
``text_encoder.cls.*``                         ``mlm_head.*``
``pose_conv.*`` / ``pose_block.*``             ``pose_stem.*`` / ``pose_block.*``
``vision_proj.*`` / ``text_proj.*``           ``image_proj.*`` / ``text_proj.*`` (``cmp.itc_head: official``)
``itm_head.*``, ``temp``                       the same
=============================================  ==================================================

Left unmapped, and reported: buffers our libraries recompute (``relative_position_index``,
``attn_mask``, ``position_ids``). With ``cmp.itc_head: paper`` the official ``vision_proj`` /
``text_proj`` (BatchNorm1d + Linear 3072 -> 2048) do not fit our eq. 4 heads and stay unmapped:
:func:`evaluation_gaps` then names them, and ``pab cmp-eval`` refuses to score with random heads.
"""

from __future__ import annotations

import logging
import re

import torch

from pab_build.config import ConfigError

log = logging.getLogger(__name__)

_RECOMPUTED = re.compile(r"(relative_position_index|attn_mask|position_ids)$")
_SWIN_BLOCK = re.compile(r"^vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SWIN_BLOCK_PARTS = {
    "norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.o_proj.",
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
}
_PREFIXES = [
    ("vision_encoder.patch_embed.proj.", "image_encoder.embeddings.patch_embeddings.projection."),
    ("vision_encoder.patch_embed.norm.", "image_encoder.embeddings.norm."),
    ("vision_encoder.norm.", "image_encoder.layernorm."),
    ("text_encoder.bert.embeddings.", "text_encoder.embeddings."),
    ("text_encoder.cls.", "mlm_head."),
    ("pose_conv.", "pose_stem."),
    ("pose_block.", "pose_block."),
    ("itm_head.", "itm_head."),
    ("vision_proj.", "image_proj."),
    ("text_proj.", "text_proj."),
]


def map_official_state(official: dict[str, torch.Tensor], text_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official names -> ours (``qkv`` split into q/k/v). Returns (mapped state, unmapped names)."""
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, t in official.items():
        if _RECOMPUTED.search(name):
            unmapped.append(name)
            continue
        if name == "temp":
            mapped["temp"] = t
            continue
        m = _SWIN_BLOCK.match(name)
        if m:
            i, j, rest = m.groups()
            base = f"image_encoder.encoder.layers.{i}.blocks.{j}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]  # weight | bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    mapped[f"{base}attention.{part}.{kind}"] = chunk.contiguous()
                continue
            for old, new in _SWIN_BLOCK_PARTS.items():
                if rest.startswith(old):
                    mapped[base + new + rest[len(old):]] = t
                    break
            else:
                unmapped.append(name)
            continue
        m = re.match(r"^vision_encoder\.layers\.(\d+)\.downsample\.(.+)$", name)
        if m:
            mapped[f"image_encoder.encoder.layers.{m.group(1)}.downsample.{m.group(2)}"] = t
            continue
        m = re.match(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.(.+)$", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            mapped[f"text_encoder.encoder.layer.{i}.{rest}" if i < text_layers
                   else f"cross_encoder.{i - text_layers}.{rest}"] = t
            continue
        for old, new in _PREFIXES:
            if name.startswith(old):
                mapped[new + name[len(old):]] = t
                break
        else:
            unmapped.append(name)
    return mapped, unmapped


def official_name(ours: str, text_layers: int) -> str:
    """Our parameter name -> the official one (q/k/v projections -> the fused ``attn.qkv``); the
    inverse of :func:`map_official_state`, used to apply the official optimiser's name rules."""
    m = re.match(r"^image_encoder\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", ours)
    if m:
        i, j, rest = m.groups()
        qkv = re.match(r"^attention\.[qkv]_proj\.(weight|bias)$", rest)
        if qkv:
            return f"vision_encoder.layers.{i}.blocks.{j}.attn.qkv.{qkv.group(1)}"
        for old, new in _SWIN_BLOCK_PARTS.items():
            if rest.startswith(new):
                return f"vision_encoder.layers.{i}.blocks.{j}.{old}{rest[len(new):]}"
    m = re.match(r"^image_encoder\.encoder\.layers\.(\d+)\.downsample\.(.+)$", ours)
    if m:
        return f"vision_encoder.layers.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"^text_encoder\.encoder\.layer\.(\d+)\.(.+)$", ours)
    if m:
        return f"text_encoder.bert.encoder.layer.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^cross_encoder\.(\d+)\.(.+)$", ours)
    if m:
        return f"text_encoder.bert.encoder.layer.{int(m.group(1)) + text_layers}.{m.group(2)}"
    for old, new in _PREFIXES:
        if ours.startswith(new):
            return old + ours[len(new):]
    return ours  # temp


def evaluation_gaps(report: dict[str, list[str]]) -> list[str]:
    """Parameters that evaluation uses but the checkpoint did not provide: everything except the
    MLM head's own layers (its decoder is tied to the word embeddings, which evaluation uses)."""
    return sorted(k for k in report["missing"] + report["shape_mismatch"] if not k.startswith("mlm_head."))


def load_official_state(model: torch.nn.Module, official: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every mapped tensor whose shape matches into ``model``; report the rest."""
    n_text = len(model.text_encoder.encoder.layer)
    mapped, unmapped = map_official_state(official, n_text)
    ours = model.state_dict()
    usable = {k: v for k, v in mapped.items() if k in ours and tuple(ours[k].shape) == tuple(v.shape)}
    report = {
        "loaded": sorted(usable),
        "unmapped": sorted(set(unmapped + [official_name(k, n_text) for k in mapped if k not in ours])),
        "shape_mismatch": sorted(k for k in mapped if k in ours and k not in usable),
        "missing": sorted(k for k in ours if k not in usable and not _RECOMPUTED.search(k)),
    }
    model.load_state_dict(usable, strict=False)
    for what in ("unmapped", "shape_mismatch", "missing"):
        names = [n for n in report[what] if not _RECOMPUTED.search(n)]  # recomputed buffers are expected
        if names:
            log.warning("official checkpoint: %d %s keys, e.g. %s", len(names), what, names[:5])
    return report


def load_init_checkpoint(model: torch.nn.Module, path: str) -> dict[str, list[str]]:
    """Load an official ``cmp.pth`` or the X-VLM / APTM checkpoint the official training starts
    from (``{"model": state}`` or a bare state dict), safely, through the same name mapping."""
    import fsspec

    fs = fsspec.core.url_to_fs(path)[0]
    if not fs.exists(path):
        raise ConfigError(f"cmp checkpoint {path} does not exist (cmp.init_checkpoint or --checkpoint)")
    with fsspec.open(path, "rb") as f:
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({e}); "
                             "re-save its state dict with plain tensors") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or {{'model': state dict}}")
    return load_official_state(model, state)
