"""Evaluate CMP on the test shards as the paper (B.2) and the official code do.

1. Embed every test caption and every test image (with its pose map): global features, eq. 4.
2. ITC similarity (cosine) text x image.
3. For each caption, the top-k images (``cmp.rerank_k``, 128 in the paper) are re-scored by the
   ITM head (its "match" logit); the other images get that caption's lowest re-scored value.
4. Final score = minmax(ITM matrix) + 0.002 * minmax(ITC matrix), each normalised over the whole
   matrix: the official combination, in which similarity only breaks ties.
Two settings: **behavior** match (only the exact image counts) and **identity** match (any image
of the same clip counts). Writes ``OUT/cmp/eval.json`` and ``OUT/cmp/top5.png`` (paper Figure 5).
"""

from __future__ import annotations

import io
import json
import logging
import textwrap

import torch
import torch.nn.functional as F

from pab_build.cmp.data import (
    EvalSample,
    image_transform,
    iter_test_samples,
    list_shards,
)
from pab_build.cmp.metrics import retrieval_metrics
from pab_build.config import PABConfig, model_path
from pab_build.models import resolve_device
from pab_build.store import Store

log = logging.getLogger(__name__)

EVAL_REL, FIGURE_REL = "cmp/eval.json", "cmp/top5.png"
SIM_WEIGHT = 0.002  # official: similarity only breaks ties between equal ITM scores


@torch.no_grad()
def embed_test_set(model, tokenizer, samples: list[EvalSample], max_text_len: int, batch_size: int, device) -> dict:
    """Image tokens/features of every test image and text tokens/features of every caption."""
    image_tokens, image_feats, text_tokens, text_masks, text_feats = [], [], [], [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = torch.stack([s.image for s in chunk]).to(device)
        poses = torch.stack([s.pose for s in chunk]).to(device)
        tokens = model.encode_image(images, poses)  # (b, L, Dv)
        image_tokens.append(tokens)
        image_feats.append(F.normalize(model.image_feature(tokens).float(), dim=-1))
        enc = tokenizer([s.caption for s in chunk], padding="max_length", truncation=True,
                        max_length=max_text_len, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        t = model.encode_text(ids, mask)  # (b, T, Dt)
        text_tokens.append(t)
        text_masks.append(mask)
        text_feats.append(F.normalize(model.text_feature(t, mask).float(), dim=-1))
    return {"image_tokens": torch.cat(image_tokens), "image_feats": torch.cat(image_feats),
            "text_tokens": torch.cat(text_tokens), "text_mask": torch.cat(text_masks),
            "text_feats": torch.cat(text_feats)}


@torch.no_grad()
def rerank_topk(model, sims: torch.Tensor, emb: dict, k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM "match" logits of each query's top-k images: values (Q, k) and gallery indices (Q, k)."""
    k = min(k, sims.shape[1])
    top_idx = sims.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(sims.shape[0], device=sims.device)[:, None].expand(-1, k).reshape(-1)
    gallery = top_idx.reshape(-1)
    logits = []
    for i in range(0, queries.numel(), batch_size):
        q, g = queries[i:i + batch_size], gallery[i:i + batch_size]
        logits.append(model.itm_logits(emb["text_tokens"][q], emb["text_mask"][q], emb["image_tokens"][g])[:, 1].float())
    return torch.cat(logits).view(-1, k), top_idx


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def combine_scores(sims: torch.Tensor, itm_topk: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Official final scores (Q, G) from ITC similarities and the top-k ITM logits."""
    itm = itm_topk.min(dim=1, keepdim=True).values.expand(-1, sims.shape[1]).clone()  # row minimum elsewhere
    itm.scatter_(1, top_idx, itm_topk)
    return _minmax(itm) + SIM_WEIGHT * _minmax(sims)


def evaluate_scores(scores, samples: list[EvalSample]) -> dict[str, dict[str, float]]:
    """Behavior match (query id = the caption's own image key) and identity match (clip)."""
    keys = [s.key for s in samples]
    identities = [s.identity for s in samples]
    return {"behavior": retrieval_metrics(scores, keys, keys),
            "identity": retrieval_metrics(scores, identities, identities)}


def figure_queries(samples: list[EvalSample], n: int) -> list[int]:
    """Up to n queries, anomalous and normal alternating, in shard order (deterministic)."""
    by_behavior = {b: [i for i, s in enumerate(samples) if s.behavior == b] for b in ("anomaly", "normal")}
    picked, j = [], 0
    while len(picked) < min(n, len(samples)):
        for b in ("anomaly", "normal"):
            if j < len(by_behavior[b]) and len(picked) < n:
                picked.append(by_behavior[b][j])
        j += 1
        if j > len(samples):
            break
    rest = [i for i in range(len(samples)) if i not in picked]
    return picked + rest[: n - len(picked)]


MATCH_COLOURS = {"match": (40, 170, 60), "identity": (40, 90, 220), "other": (210, 40, 40)}


def draw_top5(samples: list[EvalSample], scores, queries: list[int], thumb: int = 96) -> bytes:
    """PNG: one row per query (caption, then its top-5 images framed green = the exact image,
    blue = same identity, other behavior, red = another identity), like the paper's Figure 5."""
    from PIL import Image, ImageDraw

    text_w, pad, border = 260, 6, 4
    cell = thumb + 2 * border
    width = text_w + 5 * (cell + pad) + pad
    canvas = Image.new("RGB", (width, max(1, len(queries)) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, qi in enumerate(queries):
        y = pad + row * (cell + pad)
        q = samples[qi]
        draw.multiline_text((pad, y), f"[{q.behavior}] " + "\n".join(textwrap.wrap(q.caption, 40)[:6]), fill="black")
        order = sorted(range(len(samples)), key=lambda j: -float(scores[qi][j]))[:5]
        for col, gj in enumerate(order):
            g = samples[gj]
            kind = "match" if g.key == q.key else "identity" if g.identity == q.identity else "other"
            x = text_w + pad + col * (cell + pad)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=MATCH_COLOURS[kind])
            scale = thumb / max(g.thumbnail.size)  # up or down to the cell size
            im = g.thumbnail.resize((max(1, round(g.thumbnail.width * scale)), max(1, round(g.thumbnail.height * scale))))
            canvas.paste(im, (x + border + (thumb - im.width) // 2, y + border + (thumb - im.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def evaluate_cmp(cfg: PABConfig, checkpoint: str | None, test_shards: str, out_dir: str) -> dict:
    """Evaluate ``checkpoint`` (see :func:`pab_build.cmp.train.load_trained`) on the test shards
    (a build's OUT dir, its shards folder, or a URL); writes eval.json and the top-5 figure."""
    from pab_build.cmp.train import load_trained

    c = cfg.cmp
    device = resolve_device(cfg.run.device)
    model, tokenizer = load_trained(cfg, checkpoint)
    model.to(device).eval()
    transform = image_transform(cfg, model_path(cfg, "swin"))
    samples = list(iter_test_samples(list_shards(test_shards, "test"), transform))
    if not samples:
        raise ValueError(f"no test samples in {test_shards!r}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.mixed_precision == "bf16" and device.type == "cuda")
    with autocast:
        emb = embed_test_set(model, tokenizer, samples, c.max_text_len, c.eval_batch_size, device)
        sims = emb["text_feats"] @ emb["image_feats"].t()  # (Q, G): query i is caption of sample i
        itm_topk, top_idx = rerank_topk(model, sims, emb, c.rerank_k, c.eval_batch_size)
    scores = combine_scores(sims.float(), itm_topk.float(), top_idx).cpu().numpy()
    metrics = evaluate_scores(scores, samples)
    store = Store(out_dir)
    store.write_text(EVAL_REL, json.dumps(metrics, indent=2, sort_keys=True))
    queries = figure_queries(samples, c.figure_queries)
    if queries:
        from pab_build.cmp.figures import top5_png

        store.write_bytes(FIGURE_REL, top5_png(samples, scores, queries))
    log.info("CMP evaluation on %d test pairs: %s", len(samples), metrics)
    return {**metrics, "num_queries": len(samples), "rerank_k": min(c.rerank_k, len(samples)),
            "checkpoint": checkpoint, "eval_json": f"{store.url_root}/{EVAL_REL}",
            "figure": f"{store.url_root}/{FIGURE_REL}" if queries else None}
