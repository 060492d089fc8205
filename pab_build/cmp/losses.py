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


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities / tau; negatives are every pair across processes."""
    image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
    image_all, offset = gather_with_grad(image_feat)
    text_all, _ = gather_with_grad(text_feat)
    targets = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    loss_i2t = F.cross_entropy(image_feat @ text_all.t() / temperature, targets)  # S_I2T, eq. 5
    loss_t2i = F.cross_entropy(text_feat @ image_all.t() / temperature, targets)
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


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, probability: float, special_ids: list[int],
                mask_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is chosen with ``probability``; of those 80%
    become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere)."""
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    chosen = (torch.rand(ids.shape, device=ids.device) < probability) & candidates
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, device=ids.device)
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    random_words = torch.randint(vocab_size, ids.shape, device=ids.device)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, masked)
    return masked, labels


def mlm_loss(model, ids, mask, image_tokens, probability, special_ids, mask_id) -> torch.Tensor:
    """Predict masked words of the caption from the text and its matched image (eq. 7)."""
    vocab = model.mlm_head.predictions.decoder.out_features
    masked, labels = mask_tokens(ids, mask, probability, special_ids, mask_id, vocab)
    hidden = model.cross(model.encode_text(masked, mask), mask, image_tokens)
    picked = labels != -100
    if not picked.any():  # very short captions: nothing masked in this batch
        return hidden.sum() * 0.0
    logits = model.mlm_head(hidden[picked])  # (masked tokens, vocab)
    return F.cross_entropy(logits.float(), labels[picked])


def cmp_losses(model, batch: dict, mlm_probability: float, special_ids: list[int], mask_id: int) -> dict:
    """All losses of one batch. ``batch``: images/poses (B, 3, H, W), ids/mask (B, T), sample_ids (B,),
    and, for IHNM, hard_rows (K,) with hard_images/hard_poses (K, 3, H, W), hard_ids/hard_mask (K, T)."""
    image_tokens = model.encode_image(batch["images"], batch.get("poses"))
    text_tokens = model.encode_text(batch["ids"], batch["mask"])
    image_feat = model.image_feature(image_tokens)
    text_feat = model.text_feature(text_tokens, batch["mask"])

    itc = itc_loss(image_feat, text_feat, model.temperature())
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
    mlm = mlm_loss(model, batch["ids"], batch["mask"], image_tokens, mlm_probability, special_ids, mask_id)
    return {"loss": itc + itm + mlm, "itc": itc, "itm": itm, "mlm": mlm, "ihnm_pairs": ihnm_pairs}
