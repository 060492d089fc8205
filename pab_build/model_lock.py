"""Models pinned by a lock file: ``pab models fetch`` downloads a profile's models and writes
``models.lock.json`` (id, resolved commit, files, sha256); a build loads exactly those commits.

Three kinds of model path (``models.<name>.path``): a Hugging Face repo id (``org/name``, cached
in the HF cache or ``--cache DIR``), ``torchvision:<WEIGHTS>`` (ResNet-50 weights in
``TORCH_HOME``), and a local folder (not locked: it is what it is).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .config import PABConfig, load_config, model_path

LOCK_NAME = "models.lock.json"
BUILD_MODELS = ("sdxl", "safety_checker", "qwen2_vl", "openpose", "resnet50")
CMP_MODELS = ("swin", "bert")
# the models each stage loads (stages not listed load none)
STAGE_MODELS = {"pose": ("openpose",), "pairs": ("resnet50",), "test_captions": ("qwen2_vl",),
                "test_attributes": ("qwen2_vl",), "generate": ("sdxl", "safety_checker"), "gen_pose": ("openpose",),
                "train_captions": ("qwen2_vl",), "train_attributes": ("qwen2_vl",)}


def profile_models(cfg: PABConfig, stages: list[str] | None = None) -> list[str]:
    """The model names a build of this profile loads: those of ``stages`` (None: the whole build,
    and CMP's when it trains after the build)."""
    unused = set() if cfg.generate.content_filter else {"safety_checker"}
    if stages is not None:
        return [m for m in BUILD_MODELS if m not in unused and any(m in STAGE_MODELS.get(s, ()) for s in stages)]
    return [m for m in BUILD_MODELS if m not in unused] + (list(CMP_MODELS) if cfg.cmp.train_after_build else [])


def weights_variant(dtype: str) -> str | None:
    """The diffusers weights variant of SDXL fetched and loaded for ``dtype``: ``fp16`` files for float16 (the same
    weights rounded to float16: half the bytes to fetch and read); none otherwise (bfloat16 from
    float16 files would lose the float32 weights' range)."""
    return "fp16" if dtype == "float16" else None


def model_kind(path: str) -> str:
    if path.startswith("torchvision:"):
        return "torchvision"
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or "{models_dir}" in path:
        return "local"
    return "hub"


def read_lock(path: str) -> dict[str, Any]:
    """``{model id: {"kind", "revision", "files": {relpath: sha256}}}``; empty when there is no lock."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("models", {})


def write_lock(path: str, entries: dict[str, Any]) -> None:
    merged = {**read_lock(path), **entries}  # one lock serves every profile that uses these models
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "models": dict(sorted(merged.items()))}, f, indent=2)
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_of(folder: str) -> dict[str, Any]:
    """``files`` (relpath -> sha256) and ``sizes`` (relpath -> bytes: a quick check without hashing)."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            found[os.path.relpath(p, folder)] = p
    rels = sorted(found)
    return {"files": {r: sha256_file(found[r]) for r in rels}, "sizes": {r: os.path.getsize(found[r]) for r in rels}}


def torchvision_weights_file(path: str) -> tuple[str, str]:
    """(url, file in TORCH_HOME) of ``torchvision:<WEIGHTS>`` ResNet-50 weights."""
    import torch
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights[path.split(":", 1)[1]]
    return weights.url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def fetch_model(path: str, revision: str | None, cache_dir: str | None = None, *, pipeline: bool = False,
                variant: str | None = None) -> dict[str, Any]:
    """Download one model (network needed) and return its lock entry. A diffusers ``pipeline`` is
    fetched as diffusers loads it: the ``variant``'s safetensors files where the repository has
    them (RealVisXL's fp16 files, not its single-file checkpoint and float32 copies as well)."""
    kind = model_kind(path)
    if kind == "hub":
        folder = _fetch_pipeline(path, revision, cache_dir, variant) if pipeline else _snapshot(path, revision, cache_dir)
        return {"kind": kind, "revision": os.path.basename(folder), **_files_of(folder)}
    if kind == "torchvision":
        import torch

        url, _ = torchvision_weights_file(path)
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
        _, file = torchvision_weights_file(path)
        name = os.path.basename(file)
        return {"kind": kind, "revision": name, "files": {name: sha256_file(file)}, "sizes": {name: os.path.getsize(file)}}
    raise ValueError(f"{path} is a local folder: nothing to fetch or lock")


def _snapshot(path: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, cache_dir=cache_dir)


def _fetch_pipeline(path: str, revision: str | None, cache_dir: str | None, variant: str | None) -> str:
    from diffusers import DiffusionPipeline

    kwargs = dict(revision=revision, cache_dir=cache_dir, use_safetensors=True)
    if variant:
        try:
            return DiffusionPipeline.download(path, variant=variant, **kwargs)
        except ValueError as e:  # the repository has no such variant: its default files, as loading does
            if f"variant={variant}" not in str(e):
                raise
    return DiffusionPipeline.download(path, **kwargs)


def fetch_profile(cfg: PABConfig, lock_path: str, cache_dir: str | None = None) -> dict[str, Any]:
    entries = {}
    for name in profile_models(cfg):
        path = model_path(cfg, name)
        if model_kind(path) != "local":
            sdxl = name == "sdxl"
            entries[path] = fetch_model(path, getattr(cfg.models, name).revision, cache_dir, pipeline=sdxl,
                                        variant=weights_variant(cfg.models.sdxl.dtype) if sdxl else None)
    write_lock(lock_path, entries)
    return entries


def local_snapshot(path: str, revision: str, cache_dir: str | None = None) -> str | None:
    """The cached snapshot folder of ``path`` at ``revision`` (no network), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def check_locked(path: str, entry: dict[str, Any] | None, cache_dir: str | None = None, hash_files: bool = True
                 ) -> str | None:
    """None when the model is in the local cache exactly as locked, else the problem."""
    if entry is None:
        return f"{path} is not in the lock file: run `pab models fetch` on a connected machine"
    if entry["kind"] == "torchvision":
        _, file = torchvision_weights_file(path)
        if not os.path.exists(file):
            return f"{path}: weights file {file} missing (TORCH_HOME)"
        want = next(iter(entry["files"].values()))
        return None if not hash_files or sha256_file(file) == want else f"{file}: sha256 differs from the lock"
    folder = local_snapshot(path, entry["revision"], cache_dir)
    if folder is None:
        return f"{path}@{entry['revision'][:12]} is not in the local Hugging Face cache"
    sizes = entry.get("sizes", {})
    for rel, sha in entry["files"].items():
        p = os.path.join(folder, rel)
        if not os.path.exists(p):
            return f"{path}@{entry['revision'][:12]}: file {rel} missing from the cache"
        if rel in sizes and os.path.getsize(p) != sizes[rel]:
            return f"{path}@{entry['revision'][:12]}: {rel} has {os.path.getsize(p)} bytes, the lock says {sizes[rel]}"
        if hash_files and sha256_file(p) != sha:
            return f"{path}@{entry['revision'][:12]}: {rel} sha256 differs from the lock"
    return None


def apply_lock(cfg: PABConfig, lock: dict[str, Any]) -> PABConfig:
    """Pin every hub model without an explicit revision to its locked commit, so the run loads
    exactly that commit and records it (``model_id`` = ``path@commit`` in manifests and the card)."""
    for name in profile_models(cfg):
        spec = getattr(cfg.models, name)
        entry = lock.get(model_path(cfg, name))
        if entry is not None and entry["kind"] == "hub" and spec.revision is None:
            spec.revision = entry["revision"]
    return cfg


def locked_config(profile: str, overrides: list[str] | dict[str, Any] | None = None) -> PABConfig:
    """``load_config`` with the profile's hub models pinned to ``run.models_lock``: what a run loads."""
    cfg = load_config(profile, overrides)
    return apply_lock(cfg, read_lock(cfg.run.models_lock))
