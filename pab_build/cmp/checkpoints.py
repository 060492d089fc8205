"""CMP checkpoints: the folder format, and the identity of a training (its key) that makes
training a resumable unit.

A checkpoint is a folder ``OUT/cmp/checkpoints/step-NNNNNNNN/`` with ``model.safetensors``,
``training_state.safetensors`` (optimizer tensors, RNG states) and ``state.json`` (step, epoch,
position in the epoch, config, train key, scheduler, optimizer hyper-parameters, Python/NumPy
RNG). ``state.json`` is written last, so a folder without it is an interrupted save and is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pab_build.config import PABConfig, model_id, redact, stable_hash
from pab_build.store import Store

log = logging.getLogger(__name__)

CKPT_DIR = "cmp/checkpoints"
MODEL_FILE, STATE_TENSORS_FILE, STATE_FILE = "model.safetensors", "training_state.safetensors", "state.json"


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
                    batch_in_epoch: int, train_key: str | None = None) -> str:
    rel = f"{CKPT_DIR}/step-{step:08d}"
    model_bytes, aliases = model_state_bytes(model)
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state()
    store.write_bytes(f"{rel}/{MODEL_FILE}", model_bytes)
    store.write_bytes(f"{rel}/{STATE_TENSORS_FILE}", save_safetensors({**opt_tensors, **rng_tensors}))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": config_snapshot(cfg),
             "train_key": train_key,
             "scheduler": sched, "optimizer": opt_meta, "rng": rng_meta, "tied_parameters": aliases}
    store.write_text(f"{rel}/{STATE_FILE}", json.dumps(state, sort_keys=True))  # last: marks it complete
    return rel


def complete_checkpoints(store: Store) -> list[str]:
    """Checkpoint folders with a ``state.json`` (complete saves), oldest first."""
    steps = sorted(n for n in store.listdir(CKPT_DIR) if n.startswith("step-"))
    return [f"{CKPT_DIR}/{n}" for n in steps if store.exists(f"{CKPT_DIR}/{n}/{STATE_FILE}")]


def latest_checkpoint(store: Store, train_key: str | None = None) -> str | None:
    """The newest complete checkpoint (of the training ``train_key``, when given)."""
    for rel in reversed(complete_checkpoints(store)):
        if train_key is None or store.read_json(f"{rel}/{STATE_FILE}").get("train_key") == train_key:
            return rel
    return None


# -- the identity of a training: what its weights depend on --------------------------------------
# fields of ``cmp`` that only evaluation, logging or scheduling of saves read
EVAL_ONLY_FIELDS = ("rerank_k", "eval_batch_size", "figure_queries", "eval_combination", "train_after_build",
                    "checkpoint_every")


def shards_fingerprint(source: str, split: str) -> str:
    """Hash of ``split``'s section of the build's ``shards/index.json`` (every shard's path, size and
    sha256), so a change of the other split does not count; without an index (shards written by
    hand), of the shard names and sizes, with a warning."""
    import fsspec

    from pab_build.cmp.data import list_shards

    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/")
    for index in (f"{root}/shards/index.json", f"{root}/index.json", f"{root}/../index.json"):
        if fs.exists(index):
            data = json.loads(fs.cat_file(index))
            section = data.get("splits", {}).get(split) if isinstance(data, dict) else None
            return stable_hash(section) if section is not None else hashlib.sha256(fs.cat_file(index)).hexdigest()
    urls = list_shards(source, split)
    log.warning("no shards/index.json under %s: identifying the %s shards by name and size only", source, split)
    listing = [(u.rsplit("/", 1)[-1], fsspec.core.url_to_fs(u)[0].size(u)) for u in urls]
    return stable_hash(listing)


def train_key(cfg: PABConfig, shards: str) -> str:
    """Hash of what a training's weights depend on: the training shards, the CMP config (less its
    evaluation-only fields) and the initial models. Same key = the same training."""
    cmp = {k: v for k, v in cfg.cmp.model_dump(mode="json").items() if k not in EVAL_ONLY_FIELDS}
    return stable_hash({"shards": shards_fingerprint(shards, "train"), "cmp": cmp,
                        "models": {n: model_id(cfg, n) for n in ("swin", "bert")}})


def move_aside_other_trainings(store: Store, key: str) -> list[str]:
    """Checkpoints of another training (other shards or config) are moved, never overwritten, to
    ``cmp/superseded/<their key>/``; returns what was moved."""
    moved = []
    for rel in complete_checkpoints(store):
        other = store.read_json(f"{rel}/{STATE_FILE}").get("train_key") or "unknown"
        if other != key:
            dest = f"cmp/superseded/{other[:16]}/{rel.rsplit('/', 1)[-1]}"
            store.fs.mv(store.path(rel), store.path(dest), recursive=True)
            moved.append(dest)
    if moved:
        log.warning("CMP inputs changed: %d checkpoints of the earlier training moved to cmp/superseded/", len(moved))
    return moved


def open_checkpoint(path: str) -> tuple[Store, str]:
    """A checkpoint folder (local path or URL) -> (store over its parent, its name)."""
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    return Store(parent or "."), name
