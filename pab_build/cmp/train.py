"""Train CMP on a build's training shards with ``accelerate`` (one to many GPUs, or the CPU).

AdamW (lr 1e-4, weight decay 0.01, betas 0.9/0.98), linear warm-up then linear decay to
``lr_end`` (official ``configs/cmp.yaml``). A checkpoint is a folder
``OUT/cmp/checkpoints/step-NNNNNNNN/`` with ``model.safetensors``, ``training_state.safetensors``
(optimizer tensors, RNG states) and ``state.json`` (step, epoch, position in the epoch, config,
scheduler, optimizer hyper-parameters, Python/NumPy RNG). ``state.json`` is written last, so a
folder without it is an interrupted save and is ignored. Resuming restores all of it, so the next
step computes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import json
import logging
import random
import time

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pab_build.cmp.data import (
    TrainData,
    build_member_index,
    image_transform,
    list_shards,
)
from pab_build.cmp.model import CMPModel, load_cmp
from pab_build.config import PABConfig, model_path, redact
from pab_build.store import Store

log = logging.getLogger(__name__)

CKPT_DIR = "cmp/checkpoints"
MODEL_FILE, STATE_TENSORS_FILE, STATE_FILE = "model.safetensors", "training_state.safetensors", "state.json"


def lr_multiplier(step: int, warmup: int, total: int, lr: float, lr_end: float) -> float:
    """lr(step) / lr: linear warm-up over ``warmup`` steps, then linear decay to ``lr_end``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return (lr + (lr_end - lr) * frac) / lr


def make_optimizer(model: torch.nn.Module, cfg: PABConfig) -> torch.optim.AdamW:
    c = cfg.cmp
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # biases, norms and the temperature are not weight-decayed (as in X-VLM / CMP)
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas))


# -- checkpoints ---------------------------------------------------------------------------------
def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied MLM decoder / word embeddings)."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in state.items():
        sig = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if sig is not None and sig in seen:
            aliases[name] = seen[sig]
            continue
        if sig is not None:
            seen[sig] = name
        kept[name] = t.detach().cpu().contiguous()
    return kept, aliases


def model_state_bytes(model: torch.nn.Module) -> tuple[bytes, dict[str, str]]:
    kept, aliases = _dedupe(model.state_dict())
    return save_safetensors(kept, metadata={"aliases": json.dumps(aliases, sort_keys=True)}), aliases


def load_model_state(model: torch.nn.Module, data: bytes) -> None:
    """Load ``model.safetensors`` bytes (strictly: every parameter must be there)."""
    tensors = load_safetensors(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    for name, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    model.load_state_dict(tensors, strict=True)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_split(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta["scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def config_snapshot(cfg: PABConfig) -> dict:
    data = cfg.model_dump(mode="json")
    data["publish"]["storage_options"] = redact(data["publish"]["storage_options"])
    return data


def save_checkpoint(store: Store, model, optimizer, scheduler, cfg: PABConfig, step: int, epoch: int,
                    batch_in_epoch: int) -> str:
    rel = f"{CKPT_DIR}/step-{step:08d}"
    model_bytes, aliases = model_state_bytes(model)
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state()
    store.write_bytes(f"{rel}/{MODEL_FILE}", model_bytes)
    store.write_bytes(f"{rel}/{STATE_TENSORS_FILE}", save_safetensors({**opt_tensors, **rng_tensors}))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": config_snapshot(cfg),
             "scheduler": sched, "optimizer": opt_meta, "rng": rng_meta, "tied_parameters": aliases}
    store.write_text(f"{rel}/{STATE_FILE}", json.dumps(state, sort_keys=True))  # last: marks it complete
    return rel


def latest_checkpoint(store: Store) -> str | None:
    steps = sorted(n for n in store.listdir(CKPT_DIR) if n.startswith("step-"))
    for name in reversed(steps):
        if store.exists(f"{CKPT_DIR}/{name}/{STATE_FILE}"):
            return f"{CKPT_DIR}/{name}"
    return None


def open_checkpoint(path: str) -> tuple[Store, str]:
    """A checkpoint folder (local path or URL) -> (store over its parent, its name)."""
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    return Store(parent or "."), name


# -- training ------------------------------------------------------------------------------------
def _tokenize(tokenizer, texts: list[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def prepare_batch(batch: dict, tokenizer, max_len: int, device) -> dict:
    """Loader batch (tensors + caption strings) -> model inputs on ``device``."""
    out = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    out["ids"], out["mask"] = _tokenize(tokenizer, batch["texts"], max_len, device)
    if len(batch["hard_texts"]):
        out["hard_ids"], out["hard_mask"] = _tokenize(tokenizer, batch["hard_texts"], max_len, device)
    return out


def train_cmp(cfg: PABConfig, shards: str, out_dir: str, resume: bool | str = False) -> dict:
    """Train CMP on ``shards`` (a build's OUT dir, its shards folder, or a URL) into ``out_dir/cmp``.

    ``resume``: True = continue from the latest complete checkpoint under ``out_dir`` (if any),
    a path/URL = continue from that checkpoint folder. Returns a summary (steps, losses, checkpoint).
    """
    from accelerate import Accelerator

    from pab_build.cmp.determinism import make_deterministic

    c = cfg.cmp
    store = Store(out_dir)
    accelerator = Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=c.mixed_precision)
    make_deterministic(c.seed, cfg.run.device)  # seeds + deterministic kernels (pab_build/cmp/determinism.py)
    model, tokenizer = load_cmp(cfg)
    if c.init_checkpoint:
        from pab_build.cmp.official import load_init_checkpoint

        load_init_checkpoint(model, c.init_checkpoint)

    urls = list_shards(shards, "train")
    index = build_member_index(urls)
    data = TrainData(urls=urls, index=index, transform=image_transform(cfg, model_path(cfg, "swin")),
                     batch_size=c.batch_size, fraction=c.train_fraction, seed=c.seed,
                     erasing_probability=c.erasing_probability, eda_probability=c.eda_probability,
                     shuffle_buffer=c.shuffle_buffer, num_workers=c.num_workers, load_counterparts=c.use_ihnm,
                     rank=accelerator.process_index, world_size=accelerator.num_processes)
    steps_per_epoch = data.steps_per_epoch
    total = c.epochs * steps_per_epoch if c.max_steps is None else min(c.max_steps, c.epochs * steps_per_epoch)

    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, c.warmup_steps, total, c.lr, c.lr_end))

    step, epoch, batch_in_epoch, pending_rng = 0, 0, 0, None
    if resume is True:
        found = latest_checkpoint(store)
        ckpt = f"{store.url_root}/{found}" if found else None
    else:
        ckpt = resume or None
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
    history_every = max(1, total // 5000)
    losses: dict[int, float] = {}
    last: dict[str, float] = {}
    last_ckpt, t0 = None, time.time()
    while step < total:
        batches = iter(data.loader(epoch))
        for _ in range(batch_in_epoch):  # resumed mid-epoch: the same order, minus what was trained
            next(batches, None)
        if pending_rng is not None:
            _set_rng_state(*pending_rng)
            pending_rng = None
        for batch in batches:
            if batch_in_epoch >= steps_per_epoch or step >= total:
                break
            inputs = prepare_batch(batch, tokenizer, c.max_text_len, accelerator.device)
            with accelerator.autocast():
                out = model(inputs, mlm_probability=c.mlm_probability, special_ids=special_ids, mask_id=mask_id)
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
                                                step, epoch, batch_in_epoch)
                accelerator.wait_for_everyone()
        epoch, batch_in_epoch = epoch + 1, 0
    if last_ckpt is None and accelerator.is_main_process:
        last_ckpt = latest_checkpoint(store)
    summary = {
        "steps": step, "total_steps": total, "steps_per_epoch": steps_per_epoch, "epochs": epoch,
        "train_samples": data.num_samples, "losses": losses, "last": last,
        "checkpoint": f"{store.url_root}/{last_ckpt}" if last_ckpt else None,
        "resumed_from": ckpt or None, "seconds": round(time.time() - t0, 3),
    }
    if accelerator.is_main_process:
        store.write_json("cmp/train_summary.json", {k: v for k, v in summary.items() if k != "seconds"})
    return summary


def load_trained(cfg: PABConfig, checkpoint: str | None) -> tuple[CMPModel, object]:
    """CMP for evaluation: the profile's architecture with weights from ``checkpoint`` (a folder
    written by :func:`train_cmp`, or an official ``.pth``), or the pretrained initialisation."""
    model, tokenizer = load_cmp(cfg)
    if checkpoint and checkpoint.endswith((".pth", ".pt", ".th")):
        from pab_build.cmp.official import load_init_checkpoint

        load_init_checkpoint(model, checkpoint)
    elif checkpoint:
        ck_store, name = open_checkpoint(checkpoint)
        load_model_state(model, ck_store.read_bytes(f"{name}/{MODEL_FILE}"))
    return model, tokenizer
