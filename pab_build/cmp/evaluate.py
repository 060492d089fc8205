"""Evaluate CMP on the test shards as the paper (B.2) and the official code do.

1. Embed every test caption and every test image (with its pose map): global features, eq. 4.
2. ITC similarity (cosine) text x image.
3. For each caption, the top-k images (``cmp.rerank_k``, 128 in the paper) are re-scored by the
   ITM head (its "match" logit); the other images get that caption's lowest re-scored value.
4. Final score = minmax(ITM matrix) + 0.002 * minmax(ITC matrix), each normalised over the whole
   matrix: the official combination, in which similarity only breaks ties (``cmp.eval_combination:
   single``). The official ``eval.py`` run on 4 processes (``official_4gpu``) differs: each process
   fills only its quarter of the rows, the others stay at 1000 before the min-max, and the 4
   matrices are summed; the ITM scores then span ~1/1000 of [0, 1] while the ITC term counts 4
   times, so similarity weighs far more than a tie-break. Reproduced exactly, to compare numbers.
Two settings: **behavior** match (only the exact image counts) and **identity** match (any image
of the same clip counts). Writes ``OUT/cmp/eval.json`` (metrics, counts, checkpoint step, config
hash, and the hash of its inputs: an unchanged evaluation is not rerun) and ``OUT/cmp/top5.png``
(paper Figure 5). :func:`evaluate_checkpoint` (``pab cmp-eval``) evaluates any checkpoint, ours or
an official ``cmp.pth``, and refuses when a parameter evaluation uses was not in it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import textwrap

import fsspec
import torch
import torch.nn.functional as F

from pab_build.cmp.checkpoints import MODEL_FILE, STATE_FILE, load_model_state, open_checkpoint, shards_fingerprint
from pab_build.cmp.data import EvalSample, image_transform, iter_test_samples, list_shards
from pab_build.cmp.metrics import retrieval_metrics
from pab_build.cmp.model import CMPModel, load_cmp
from pab_build.cmp.official import evaluation_gaps, load_init_checkpoint
from pab_build.config import (ConfigError, PABConfig, apply_override, config_from_dict, model_id,
                              model_path, parse_override, stable_hash)
from pab_build.models.loading import resolve_device
from pab_build.model_lock import locked_config
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


UNSCORED = 1000.0  # the official placeholder of rows another process scores
COMBINATION_PROCESSES = {"single": 1, "official_4gpu": 4}


def combine_scores(sims: torch.Tensor, itm_topk: torch.Tensor, top_idx: torch.Tensor,
                   combination: str = "single") -> torch.Tensor:
    """Final scores (Q, G) from ITC similarities and the top-k ITM logits, as the official
    ``evaluation_itm`` computes them on 1 (``single``) or 4 (``official_4gpu``) processes: process r
    scores rows [r * s, (r + 1) * s) with s = Q // n + 1, leaves the others at 1000, fills each of
    its rows' unscored entries with the row minimum, min-max normalises its whole matrix, adds
    0.002 x the min-max normalised similarities, and the n matrices are summed (all_reduce)."""
    n = COMBINATION_PROCESSES[combination]
    Q = sims.shape[0]
    rows_per_process = Q // n + 1 if n > 1 else Q
    sim_term = SIM_WEIGHT * _minmax(sims)
    total = torch.zeros_like(sims)
    for rank in range(n):
        start, end = rank * rows_per_process, min(Q, (rank + 1) * rows_per_process)
        itm = torch.full_like(sims, UNSCORED)
        if start < end:
            itm[start:end].scatter_(1, top_idx[start:end], itm_topk[start:end])
        row_min = itm.min(dim=1, keepdim=True).values.expand_as(itm)
        itm = torch.where(itm == UNSCORED, row_min, itm)  # rows of other processes stay at 1000
        total += _minmax(itm) + sim_term
    return total


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


def load_for_evaluation(cfg: PABConfig, checkpoint: str | None) -> tuple[CMPModel, object, dict]:
    """CMP for evaluation: the profile's architecture with weights from ``checkpoint`` (a folder
    written by training, or an official ``.pth``), or the pretrained initialisation. Returns the
    model, the tokenizer and what was loaded: ``step``, ``identity`` (what the weights are, for the
    inputs hash) and ``gaps`` (parameters evaluation uses that the checkpoint did not provide)."""
    model, tokenizer = load_cmp(cfg)
    if not checkpoint:
        return model, tokenizer, {"step": 0, "identity": "pretrained-init", "gaps": []}
    if checkpoint.endswith((".pth", ".pt", ".th")):
        report = load_init_checkpoint(model, checkpoint)
        with fsspec.open(checkpoint, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return model, tokenizer, {"step": None, "identity": f"sha256:{digest}", "gaps": evaluation_gaps(report),
                                  "unmapped": report["unmapped"]}
    ck_store, name = open_checkpoint(checkpoint)
    state = ck_store.read_json(f"{name}/{STATE_FILE}")
    load_model_state(model, ck_store.read_bytes(f"{name}/{MODEL_FILE}"))  # strict: nothing missing
    identity = f"{state.get('train_key')}:{state['step']}" if state.get("train_key") else \
        "sha256:" + hashlib.sha256(ck_store.read_bytes(f"{name}/{MODEL_FILE}")).hexdigest()
    return model, tokenizer, {"step": state["step"], "identity": identity, "gaps": []}


def evaluation_inputs_hash(cfg: PABConfig, identity: str, test_shards: str) -> str:
    """What an evaluation's result depends on: the weights, the test shards, the CMP config."""
    return stable_hash({"weights": identity, "test_shards": shards_fingerprint(test_shards, "test"),
                        "cmp": cfg.cmp.model_dump(mode="json"), "models": {n: model_id(cfg, n) for n in ("swin", "bert")}})


def evaluate_cmp(cfg: PABConfig, checkpoint: str | None, test_shards: str, out_dir: str,
                 allow_partial: bool = False, reuse: bool = True) -> dict:
    """Evaluate ``checkpoint`` (see :func:`load_for_evaluation`) on the test shards (a build's OUT
    dir, its shards folder, or a URL); writes eval.json and the top-5 figure. An eval.json of the
    same inputs is reused (``reuse``); a checkpoint that leaves evaluation parameters random is
    refused unless ``allow_partial``."""
    c = cfg.cmp
    store = Store(out_dir)
    device = resolve_device(cfg.run.device)
    model, tokenizer, loaded = load_for_evaluation(cfg, checkpoint)
    if loaded["gaps"] and not allow_partial:
        raise ConfigError(f"{checkpoint}: {len(loaded['gaps'])} parameters that evaluation uses are not in it "
                          f"(e.g. {', '.join(loaded['gaps'][:3])}); scores would be random. Check cmp.itc_head / the "
                          "architecture, or pass --allow-partial")
    inputs_hash = evaluation_inputs_hash(cfg, loaded["identity"], test_shards)
    if reuse and store.exists(EVAL_REL):
        previous = store.read_json(EVAL_REL)
        if previous.get("inputs_hash") == inputs_hash:
            log.info("CMP evaluation of these inputs already in %s: reused", EVAL_REL)
            figure = f"{store.url_root}/{FIGURE_REL}" if store.exists(FIGURE_REL) else None
            return {**previous, "checkpoint": checkpoint, "eval_json": f"{store.url_root}/{EVAL_REL}",
                    "figure": figure, "reused": True}
    model.to(device).eval()
    transform = image_transform(cfg, model_path(cfg, "swin"))
    samples = list(iter_test_samples(list_shards(test_shards, "test"), transform,
                                     caption_words=c.max_text_words if c.pre_caption else None))
    if not samples:
        raise ValueError(f"no test samples in {test_shards!r}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.mixed_precision == "bf16" and device.type == "cuda")
    with autocast:
        emb = embed_test_set(model, tokenizer, samples, c.max_text_len, c.eval_batch_size, device)
        sims = emb["text_feats"] @ emb["image_feats"].t()  # (Q, G): query i is caption of sample i
        itm_topk, top_idx = rerank_topk(model, sims, emb, c.rerank_k, c.eval_batch_size)
    scores = combine_scores(sims.float(), itm_topk.float(), top_idx, c.eval_combination).cpu().numpy()
    metrics = evaluate_scores(scores, samples)
    result = {**metrics, "num_queries": len(samples), "num_gallery": len(samples),
              "rerank_k": min(c.rerank_k, len(samples)), "eval_combination": c.eval_combination,
              "checkpoint_step": loaded["step"], "config_hash": cfg.section_hash("cmp", "models.swin", "models.bert"),
              "inputs_hash": inputs_hash}
    store.write_text(EVAL_REL, json.dumps(result, indent=2, sort_keys=True))
    queries = figure_queries(samples, c.figure_queries)
    if queries:
        from pab_build.cmp.figures import top5_png

        store.write_bytes(FIGURE_REL, top5_png(samples, scores, queries))
    log.info("CMP evaluation on %d test pairs: %s", len(samples), metrics)
    return {**result, "checkpoint": checkpoint, "eval_json": f"{store.url_root}/{EVAL_REL}",
            "figure": f"{store.url_root}/{FIGURE_REL}" if queries else None, "reused": False}


def evaluate_checkpoint(checkpoint: str, build_out: str, out_dir: str | None = None, allow_partial: bool = False,
                        profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """``pab cmp-eval``: evaluate a training checkpoint folder (its own config, from state.json)
    or an official ``cmp.pth`` (``profile``, default ``full``) on ``build_out``'s test shards;
    eval.json goes to ``out_dir/cmp/`` (default ``build_out/cmp_eval/<checkpoint name>``, so the
    build's own ``cmp/eval.json`` is never overwritten). ``overrides``
    (``cmp.eval_combination=official_4gpu``, ...) apply either way."""
    is_folder = not checkpoint.endswith((".pth", ".pt", ".th"))
    if is_folder:
        ck_store, name = open_checkpoint(checkpoint)
        if not ck_store.exists(f"{name}/{STATE_FILE}"):
            raise ConfigError(f"{checkpoint}: neither an official .pth nor a complete training checkpoint folder "
                              f"(no {STATE_FILE})")
    elif not fsspec.core.url_to_fs(checkpoint)[0].exists(checkpoint):
        raise ConfigError(f"{checkpoint}: no such checkpoint")
    if profile or not is_folder:
        cfg = locked_config(profile or "full", overrides or [])
    else:
        data = ck_store.read_json(f"{name}/{STATE_FILE}")["config"]
        for item in overrides or []:
            apply_override(data, *parse_override(item))
        cfg = config_from_dict(data)
    default_out = f"{build_out.rstrip('/')}/cmp_eval/{checkpoint.rstrip('/').rsplit('/', 1)[-1].rsplit('.', 1)[0]}"
    return evaluate_cmp(cfg, checkpoint, build_out, out_dir or default_out, allow_partial=allow_partial)
