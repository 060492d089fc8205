"""CMP training objectives (paper 4.3): ITC (eq. 5-6), ITM with in-batch hard negatives and the
identity-based hard negatives (IHNM, eq. 3), MLM (eq. 7); total = ITC + ITM + MLM (eq. 8).

Randomness (negative sampling, masking) draws from torch's global generator, which the trainer
seeds and checkpoints, so a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows (gradients flow back to this process's rows) and this process's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities / tau; negatives are every pair across processes.
    ``label_smoothing`` (official 0.2): targets (1 - e) one-hot + e / N, as ``models/cmp.py``."""
    image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
    image_all, offset = gather_with_grad(image_feat)
    text_all, _ = gather_with_grad(text_feat)
    targets = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    loss_i2t = F.cross_entropy(image_feat @ text_all.t() / temperature, targets, label_smoothing=label_smoothing)  # eq. 5
    loss_t2i = F.cross_entropy(text_feat @ image_all.t() / temperature, targets, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2  # eq. 6


@torch.no_grad()
def sample_hard_negatives(image_feat, text_feat, temperature, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text and for each text a negative image, drawn in proportion to
    softmax(similarity / tau) among the batch items that are not the same sample: (B,), (B,)."""
    sim = F.normalize(image_feat.float(), dim=-1) @ F.normalize(text_feat.float(), dim=-1).t() / temperature
    same = sample_ids[:, None] == sample_ids[None, :]
    w_i2t = F.softmax(sim, dim=1).masked_fill(same, 0) + (~same) * 1e-5
    w_t2i = F.softmax(sim.t(), dim=1).masked_fill(same, 0) + (~same) * 1e-5
    return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)


def itm_loss(model, image_tokens, text_tokens, text_mask, image_feat, text_feat, sample_ids,
             hard: dict | None = None) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the ITM head over B positives and 2B in-batch hard negatives, plus (IHNM)
    a term over the pairs (image, counterpart caption) and (counterpart image, caption), all
    negatives, as the official code adds it. Returns (loss, number of IHNM pairs used)."""
    B = image_tokens.shape[0]
    pos = model.itm_logits(text_tokens, text_mask, image_tokens)
    logits, labels = [pos], [torch.ones(B, dtype=torch.long, device=pos.device)]
    if B > 1:
        neg_text, neg_image = sample_hard_negatives(image_feat, text_feat, model.temperature(), sample_ids)
        logits.append(model.itm_logits(text_tokens, text_mask, image_tokens[neg_image]))  # (text, wrong image)
        logits.append(model.itm_logits(text_tokens[neg_text], text_mask[neg_text], image_tokens))  # (image, wrong text)
        labels.append(torch.zeros(2 * B, dtype=torch.long, device=pos.device))
    loss = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    if hard is None or hard["image_tokens"].shape[0] == 0:
        return loss, 0
    rows = hard["rows"]  # batch rows that have a counterpart
    ihnm = torch.cat([
        model.itm_logits(hard["text_tokens"], hard["text_mask"], image_tokens[rows]),  # (I, T~)
        model.itm_logits(text_tokens[rows], text_mask[rows], hard["image_tokens"]),  # (I~, T)
    ])
    ihnm_loss = F.cross_entropy(ihnm, torch.zeros(ihnm.shape[0], dtype=torch.long, device=ihnm.device))
    return loss + ihnm_loss, int(ihnm.shape[0])


def replace_chosen(ids: torch.Tensor, chosen: torch.Tensor, mask_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the chosen tokens 80% become [MASK], 10% a random token, 10% stay; labels are the
    original ids there and -100 elsewhere."""
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, device=ids.device)
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    random_words = torch.randint(vocab_size, ids.shape, device=ids.device)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, masked)
    return masked, labels


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, probability: float, special_ids: list[int],
                mask_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is chosen with ``probability``; of those 80%
    become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere)."""
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    chosen = (torch.rand(ids.shape, device=ids.device) < probability) & candidates
    return replace_chosen(ids, chosen, mask_id, vocab_size)


def _word_starts(ids: torch.Tensor, continuation: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: tokens that are not WordPiece ``##`` continuations."""
    if continuation is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ~continuation.to(ids.device)[ids]


def mask_spans(ids: torch.Tensor, attention: torch.Tensor, probability: float, special_ids: list[int], mask_id: int,
               vocab_size: int, max_masks: int, continuation: torch.Tensor | None = None,
               skipgram_probability: float = 0.2, skipgram_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``TextMaskingGenerator``: per caption, n = min(max_masks, max(1, round(T *
    probability))) positions, picked by walking the candidates in random order and masking each
    one's whole word (``##`` pieces joined), with probability ``skipgram_probability`` a span of
    2..``skipgram_size`` tokens widened to whole words; then 80% [MASK], 10% random, 10% kept.
    As there, T is the padded length and every position after [CLS] is walked (with captions
    padded to 56, about 10/55 of the real tokens get masked); picks that land on padding, [SEP]
    or other special tokens are then dropped, where the official code asks the model to predict
    them. Draws from torch's RNG (seeded and checkpointed by the trainer)."""
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    starts = _word_starts(ids, continuation)
    chosen = torch.zeros_like(candidates)
    T = ids.shape[1]
    n_pred = min(max_masks, max(1, int(round(T * probability))))
    for b in range(ids.shape[0]):
        picked: set[int] = set()
        for pos in (torch.randperm(T - 1) + 1).tolist():
            if len(picked) >= n_pred:
                break
            if pos in picked:
                continue
            span = 1
            if skipgram_size >= 2 and float(torch.rand(())) < skipgram_probability:
                span = int(torch.randint(2, skipgram_size + 1, ()))
            st, end = pos, pos + span
            while st > 0 and not starts[b, st]:  # back to the word's first piece
                st -= 1
            while end < T and not starts[b, end]:  # on to its last piece
                end += 1
            picked.update(p for p in range(max(st, 1), min(end, T)))
        order = sorted(picked)
        if len(order) > n_pred:
            order = [order[i] for i in torch.randperm(len(order))[:n_pred].tolist()]
        chosen[b, order] = True
    chosen &= candidates
    return replace_chosen(ids, chosen, mask_id, vocab_size)


def mlm_loss(model, ids, mask, image_tokens, probability, special_ids, mask_id, max_masks: int | None = None,
             continuation: torch.Tensor | None = None) -> torch.Tensor:
    """Predict masked words of the caption from the text and its matched image (eq. 7).
    ``max_masks`` None: BERT per-token masking; a number: the official whole-word spans."""
    vocab = model.mlm_head.predictions.decoder.out_features
    if max_masks is None:
        masked, labels = mask_tokens(ids, mask, probability, special_ids, mask_id, vocab)
    else:
        masked, labels = mask_spans(ids, mask, probability, special_ids, mask_id, vocab, max_masks, continuation)
    hidden = model.cross(model.encode_text(masked, mask), mask, image_tokens)
    picked = labels != -100
    if not picked.any():  # very short captions: nothing masked in this batch
        return hidden.sum() * 0.0
    logits = model.mlm_head(hidden[picked])  # (masked tokens, vocab)
    return F.cross_entropy(logits.float(), labels[picked])


def cmp_losses(model, batch: dict, mlm_probability: float, special_ids: list[int], mask_id: int,
               recipe: dict | None = None) -> dict:
    """All losses of one batch. ``batch``: images/poses (B, 3, H, W), ids/mask (B, T), sample_ids (B,),
    for IHNM hard_rows (K,) with hard_images/hard_poses (K, 3, H, W), hard_ids/hard_mask (K, T), and
    for the EDA stream eda_ids/eda_mask (B, T'). ``recipe``: ``label_smoothing``, ``eda_weight``,
    ``max_masks``, ``continuation`` (see :func:`loss_recipe`); none = the paper's losses."""
    recipe = recipe or {}
    smoothing = recipe.get("label_smoothing", 0.0)
    image_tokens = model.encode_image(batch["images"], batch.get("poses"))
    text_tokens = model.encode_text(batch["ids"], batch["mask"])
    image_feat = model.image_feature(image_tokens)
    text_feat = model.text_feature(text_tokens, batch["mask"])

    itc = itc_loss(image_feat, text_feat, model.temperature(), smoothing)
    hard = None
    if model.arch.use_ihnm and batch.get("hard_rows") is not None and len(batch["hard_rows"]):
        hard = {
            "rows": batch["hard_rows"],
            "image_tokens": model.encode_image(batch["hard_images"], batch.get("hard_poses")),
            "text_tokens": model.encode_text(batch["hard_ids"], batch["hard_mask"]),
            "text_mask": batch["hard_mask"],
        }
    itm, ihnm_pairs = itm_loss(model, image_tokens, text_tokens, batch["mask"], image_feat, text_feat,
                               batch["sample_ids"], hard)
    mlm = mlm_loss(model, batch["ids"], batch["mask"], image_tokens, mlm_probability, special_ids, mask_id,
                   recipe.get("max_masks"), recipe.get("continuation"))
    eda_weight = recipe.get("eda_weight", 0.0)
    if eda_weight and batch.get("eda_ids") is not None:  # official: the same image with an EDA-edited caption
        # after MLM (the official order is ITC, ITM, EDA, MLM) so that switching the stream on
        # leaves MLM's random masks, and so MLM, unchanged
        eda_tokens = model.encode_text(batch["eda_ids"], batch["eda_mask"])
        eda_feat = model.text_feature(eda_tokens, batch["eda_mask"])
        itc = itc + eda_weight * itc_loss(image_feat, eda_feat, model.temperature(), smoothing)
        eda_itm, _ = itm_loss(model, image_tokens, eda_tokens, batch["eda_mask"], image_feat, eda_feat,
                              batch["sample_ids"])
        itm = itm + eda_weight * eda_itm
    return {"loss": itc + itm + mlm, "itc": itc, "itm": itm, "mlm": mlm, "ihnm_pairs": ihnm_pairs}


def loss_recipe(cfg, tokenizer) -> dict:
    """The loss switches of ``cfg.cmp`` in the form :func:`cmp_losses` takes."""
    c = cfg.cmp
    vocab = tokenizer.get_vocab()
    continuation = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    continuation[[i for w, i in vocab.items() if w.startswith("##")]] = True
    return {"label_smoothing": c.itc_label_smoothing, "eda_weight": c.eda_stream_weight,
            "max_masks": c.mlm_max_masks, "continuation": continuation}
