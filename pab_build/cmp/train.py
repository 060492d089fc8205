"""Train CMP on a build's training shards with ``accelerate`` (one to many GPUs, or the CPU).

AdamW (lr 1e-4, weight decay 0.01, betas 0.9/0.98) in the official four parameter groups
(``optim.py``: x ``lr_mult`` for the official ``init_params``), and the official step schedule
(``scheduler.py``) or warm-up + linear decay to ``lr_end`` (``cmp.lr_schedule``). Checkpoints
(:mod:`pab_build.cmp.checkpoints`) restore everything, so a resumed run computes exactly what
the uninterrupted run computed, and a rerun of a finished training is skipped.
"""

from __future__ import annotations

import logging
import time

import torch
from safetensors.torch import load as load_safetensors

from pab_build.cmp.checkpoints import (  # noqa: F401 - re-exported: the checkpoint API callers know
    CKPT_DIR, MODEL_FILE, STATE_FILE, STATE_TENSORS_FILE, _optimizer_join, _set_rng_state, latest_checkpoint,
    load_model_state, move_aside_other_trainings, open_checkpoint, save_checkpoint, train_key)
from pab_build.cmp.data import TrainData, image_transform, list_shards, wordnet_synonyms
from pab_build.cmp.losses import loss_recipe
from pab_build.cmp.model import load_cmp
from pab_build.config import PABConfig, model_path
from pab_build.store import Store

log = logging.getLogger(__name__)

SUMMARY_REL = "cmp/train_summary.json"



def lr_multiplier(step: int, warmup: int, total: int, lr: float, lr_end: float) -> float:
    """lr(step) / lr: linear warm-up over ``warmup`` steps, then linear decay to ``lr_end``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return (lr + (lr_end - lr) * frac) / lr


def step_lr_multiplier(step: int, warmup: int, total: int) -> float:
    """The official ``scheduler.py`` 'step' schedule: step / warmup while warming up, then a factor
    1 until 4 x warmup, 0.5 until 7 x warmup, 0.2 after (steps 2000 / 3500 at warmup 500), times
    a linear decay to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    factor = 1.0 if step < 4 * warmup else 0.5 if step < 7 * warmup else 0.2
    return factor * max(0.0, (total - step) / max(1, total - warmup))


# the official optimiser (optim.py) exempts parameters whose *official* name contains one of these
_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias", "norm1.weight",
             "norm2.bias", "norm2.weight")


def doubled_lr_parameters(model: torch.nn.Module) -> set[str]:
    """Our names of the official ``init_params`` (trained with ``lr_mult`` x lr): the last two
    Swin stages, the last two layers of the text and of the cross encoder, the MLM head, the ITC
    and ITM heads and the pose modules (``models/cmp.py`` / ``model_search.py``: Swin layers 2-3,
    BERT layers 4, 5, 10, 11 of 12)."""
    n_stages = len(model.image_encoder.encoder.layers)
    n_text, n_cross = len(model.text_encoder.encoder.layer), len(model.cross_encoder)
    prefixes = [f"image_encoder.encoder.layers.{i}." for i in range(max(0, n_stages - 2), n_stages)]
    prefixes += [f"text_encoder.encoder.layer.{i}." for i in range(max(0, n_text - 2), n_text)]
    prefixes += [f"cross_encoder.{i}." for i in range(max(0, n_cross - 2), n_cross)]
    prefixes += ["mlm_head.", "image_proj.", "text_proj.", "itm_head.", "pose_stem.", "pose_block."]
    return {n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))}


def make_optimizer(model: torch.nn.Module, cfg: PABConfig) -> torch.optim.AdamW:
    """AdamW in four groups, as the official ``optim.py``: (decay, no decay) x (lr, lr_mult x lr),
    weight decay decided by the official parameter name."""
    from pab_build.cmp.official import official_name

    c = cfg.cmp
    doubled = doubled_lr_parameters(model)
    n_text = len(model.text_encoder.encoder.layer)
    groups = [{"params": [], "weight_decay": wd, "lr": c.lr * mult}
              for mult in (1.0, c.lr_mult) for wd in (c.weight_decay, 0.0)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = any(nd in official_name(name, n_text) for nd in _NO_DECAY)
            groups[2 * (name in doubled) + exempt]["params"].append(p)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=tuple(c.betas), eps=1e-8)


def make_scheduler(optimizer, cfg: PABConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    c = cfg.cmp
    if c.lr_schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: step_lr_multiplier(s, c.warmup_steps, total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, c.warmup_steps, total, c.lr, c.lr_end))


# -- training ------------------------------------------------------------------------------------
def _tokenize(tokenizer, texts: list[str], max_len: int, device, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def prepare_batch(batch: dict, tokenizer, max_len: int, device, padding: str = "longest") -> dict:
    """Loader batch (tensors + caption strings) -> model inputs on ``device``. The official ITC
    head pools padding too, so it is trained (and evaluated) on captions padded to ``max_len``."""
    out = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    out["ids"], out["mask"] = _tokenize(tokenizer, batch["texts"], max_len, device, padding)
    if len(batch["hard_texts"]):
        out["hard_ids"], out["hard_mask"] = _tokenize(tokenizer, batch["hard_texts"], max_len, device, padding)
    if batch.get("eda_texts"):
        out["eda_ids"], out["eda_mask"] = _tokenize(tokenizer, batch["eda_texts"], max_len, device, padding)
    return out


def text_padding(cfg: PABConfig) -> str:
    return "max_length" if cfg.cmp.itc_head == "official" else "longest"


def _finished_training(store: Store, key: str) -> dict | None:
    """The summary of a finished training with this key, if its last checkpoint is still there."""
    if not store.exists(SUMMARY_REL):
        return None
    summary = store.read_json(SUMMARY_REL)
    if summary.get("train_key") != key or summary.get("steps") != summary.get("total_steps"):
        return None
    last = latest_checkpoint(store, key)
    if last is None or store.read_json(f"{last}/{STATE_FILE}")["step"] != summary["steps"]:
        return None
    return {**summary, "checkpoint": f"{store.url_root}/{last}", "skipped": True}


def train_cmp(cfg: PABConfig, shards: str, out_dir: str, resume: bool | str = "auto",
              stop_after: int | None = None) -> dict:
    """Train CMP on ``shards`` (a build's OUT dir, its shards folder, or a URL) into ``out_dir/cmp``.

    A training is a resumable unit keyed by :func:`train_key` (training shards, CMP config,
    initial models). ``resume``: ``"auto"`` (or True) = skip a finished training with the same key,
    continue an interrupted one from its latest checkpoint, and move checkpoints of another key
    to ``cmp/superseded/`` before starting; False = start from step 0; a path/URL = continue from
    that checkpoint folder. ``stop_after``: return after this many steps in this call, as an
    interruption would (the rerun resumes). Returns a summary (steps, losses, checkpoint).
    """
    c = cfg.cmp
    store = Store(out_dir)
    key = train_key(cfg, shards)
    ckpt = None
    if resume in (True, "auto"):
        finished = _finished_training(store, key)
        if finished is not None:
            log.info("CMP training %s already finished (%d steps): skipped", key[:12], finished["steps"])
            return finished
        move_aside_other_trainings(store, key)
        found = latest_checkpoint(store, key)
        ckpt = f"{store.url_root}/{found}" if found else None
    elif resume:
        ckpt = str(resume)

    from accelerate import Accelerator

    from pab_build.cmp.determinism import make_deterministic

    accelerator = Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=c.mixed_precision)
    make_deterministic(c.seed, cfg.run.device)  # seeds + deterministic kernels (pab_build/cmp/determinism.py)
    model, tokenizer = load_cmp(cfg)
    init = None
    if c.init_checkpoint and not ckpt:  # a resumed run takes every weight from its checkpoint
        from pab_build.cmp.official import load_init_checkpoint

        report = load_init_checkpoint(model, c.init_checkpoint)
        init = {"checkpoint": c.init_checkpoint, "loaded": len(report["loaded"]),
                **{k: report[k] for k in ("unmapped", "shape_mismatch", "missing")}}

    urls = list_shards(shards, "train")
    data = TrainData(urls=urls, transform=image_transform(cfg, model_path(cfg, "swin")),
                     batch_size=c.batch_size, fraction=c.train_fraction, seed=c.seed,
                     erasing_probability=c.erasing_probability, eda_probability=c.eda_probability,
                     eda_stream=c.eda_stream_weight > 0, synonyms=wordnet_synonyms() if c.eda_probability else None,
                     caption_words=c.max_text_words if c.pre_caption else None, pose_augment=c.pose_augment,
                     shuffle_buffer=c.shuffle_buffer, num_workers=c.num_workers, load_counterparts=c.use_ihnm,
                     rank=accelerator.process_index, world_size=accelerator.num_processes)
    steps_per_epoch = data.steps_per_epoch
    total = c.epochs * steps_per_epoch if c.max_steps is None else min(c.max_steps, c.epochs * steps_per_epoch)

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)

    step, epoch, batch_in_epoch, pending_rng = 0, 0, 0, None
    if ckpt:
        ck_store, name = open_checkpoint(ckpt)
        state = ck_store.read_json(f"{name}/{STATE_FILE}")
        load_model_state(model, ck_store.read_bytes(f"{name}/{MODEL_FILE}"))
        tensors = load_safetensors(ck_store.read_bytes(f"{name}/{STATE_TENSORS_FILE}"))
        optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer"]))
        scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        pending_rng = (tensors, state["rng"])
        log.info("resuming from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch_in_epoch)

    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    special_ids, mask_id = list(tokenizer.all_special_ids), tokenizer.mask_token_id
    recipe, padding = loss_recipe(cfg, tokenizer), text_padding(cfg)
    history_every = max(1, total // 5000)
    losses: dict[int, float] = {}
    last: dict[str, float] = {}
    last_ckpt, t0, start_step = None, time.time(), step
    reads = {"fallback_reads": 0, "neighbour_reads": 0}  # hard negatives read outside the stream
    while step < total and (stop_after is None or step - start_step < stop_after):
        batches = iter(data.loader(epoch))
        for _ in range(batch_in_epoch):  # resumed mid-epoch: the same order, minus what was trained
            next(batches, None)
        if pending_rng is not None:
            _set_rng_state(*pending_rng)
            pending_rng = None
        for batch in batches:
            if batch_in_epoch >= steps_per_epoch or step >= total:
                break
            if stop_after is not None and step - start_step >= stop_after:
                break
            for k in reads:
                reads[k] += batch.get(k, 0)
            inputs = prepare_batch(batch, tokenizer, c.max_text_len, accelerator.device, padding)
            with accelerator.autocast():
                out = model(inputs, mlm_probability=c.mlm_probability, special_ids=special_ids, mask_id=mask_id,
                            recipe=recipe)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out["loss"])
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            last = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
            if step % history_every == 0 or step == total:
                losses[step] = last["loss"]
            if step % c.checkpoint_every == 0 or step == total:
                if accelerator.is_main_process:
                    last_ckpt = save_checkpoint(store, accelerator.unwrap_model(model), optimizer, scheduler, cfg,
                                                step, epoch, batch_in_epoch, key)
                accelerator.wait_for_everyone()
        else:
            epoch, batch_in_epoch = epoch + 1, 0
            continue
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    if last_ckpt is None and accelerator.is_main_process:
        last_ckpt = latest_checkpoint(store, key)
    summary = {
        "steps": step, "total_steps": total, "steps_per_epoch": steps_per_epoch, "epochs": epoch,
        "train_samples": data.num_samples, "losses": losses, "last": last, "train_key": key,
        "checkpoint": f"{store.url_root}/{last_ckpt}" if last_ckpt else None,
        "resumed_from": ckpt or None, "init": init, "hard_negative_reads": reads, "skipped": False, "seconds": round(time.time() - t0, 3),
    }
    if reads["fallback_reads"]:
        log.warning("%d hard negatives were read by random access (not in the stream)", reads["fallback_reads"])
    if accelerator.is_main_process and step == total:
        store.write_json(SUMMARY_REL, {k: v for k, v in summary.items()
                                       if k not in ("seconds", "skipped", "hard_negative_reads")})
    return summary
