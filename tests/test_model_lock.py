"""Models pinned by models.lock.json, loaded offline from a real Hugging Face cache layout
(``models--org--name/snapshots/<commit>/``, ``refs/main``) through the stages' own from_pretrained
/ hf_hub_download paths; the loaded commit is recorded in the manifests and the dataset card."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pab_build.model_lock import locked_config
from pab_build.manifests import read_manifest
from pab_build.model_lock import check_locked, read_lock
from pab_build.store import Store

HUB_IDS = {"sdxl": "pab-test/tiny-sdxl", "qwen2_vl": "pab-test/tiny-qwen2-vl", "openpose": "pab-test/tiny-annotators"}


def _commit(name: str) -> str:
    import hashlib

    return hashlib.sha1(name.encode()).hexdigest()


def lay_out_hf_cache(hub_dir: str, models_dir: str) -> dict[str, str]:
    """Copy the tiny models into the hub cache structure; returns hub id -> commit."""
    commits = {}
    for name, repo in HUB_IDS.items():
        base = os.path.join(hub_dir, "models--" + repo.replace("/", "--"))
        commit = _commit(repo)
        shutil.copytree(os.path.join(models_dir, name), os.path.join(base, "snapshots", commit),
                        ignore=shutil.ignore_patterns(".pab-fixture"))
        os.makedirs(os.path.join(base, "refs"), exist_ok=True)
        with open(os.path.join(base, "refs", "main"), "w") as f:
            f.write(commit)
        commits[repo] = commit
    return commits


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", **extra}


def _fetch(cache: str, lock: str, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "models", "fetch", "smoke", "--cache", cache, "--lock", lock]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_fetch_locks_cached_commits_and_preflight_detects_a_mismatch(tmp_path, tiny_model):
    for name in HUB_IDS:
        tiny_model(name)
    models_dir = os.path.dirname(tiny_model("openpose"))
    cache, lock = str(tmp_path / "cache"), str(tmp_path / "models.lock.json")
    commits = lay_out_hf_cache(os.path.join(cache, "huggingface", "hub"), models_dir)
    overrides = [f"models.{n}.path={r}" for n, r in HUB_IDS.items()] + [f"fixtures.models_dir={models_dir}",
                                                                        "cmp.train_after_build=false"]
    proc = _fetch(cache, lock, overrides)
    assert proc.returncode == 0, proc.stderr
    entries = read_lock(lock)
    assert {k: v["revision"] for k, v in entries.items()} == commits
    assert all(len(sha) == 64 for e in entries.values() for sha in e["files"].values())
    cfg = locked_config("smoke", overrides + [f"run.models_lock={lock}"])
    assert cfg.models.qwen2_vl.revision == commits["pab-test/tiny-qwen2-vl"]  # a run loads the locked commit
    hub = os.path.join(cache, "huggingface", "hub")
    repo = "pab-test/tiny-annotators"
    assert check_locked(repo, entries[repo], hub) is None
    body = os.path.join(hub, "models--pab-test--tiny-annotators", "snapshots", commits[repo], "body_pose_model.pth")
    with open(body, "ab") as f:
        f.write(b"tampered")
    assert "the lock says" in check_locked(repo, entries[repo], hub, hash_files=False)  # preflight's quick check
    with open(body, "r+b") as f:
        f.seek(0)
        f.write(b"X")  # same size, other bytes: only the hash finds it
    entries[repo]["sizes"]["body_pose_model.pth"] = os.path.getsize(body)
    assert "sha256 differs" in check_locked(repo, entries[repo], hub)
    os.remove(body)
    assert "missing" in check_locked(repo, entries[repo], hub, hash_files=False)
    assert "not in the lock" in check_locked("other/model", None, hub)


@pytest.mark.slow
def test_offline_build_from_hf_cache_records_loaded_commits(tmp_path, tiny_models_dir, sample_oops_root):
    cache, lock, out = str(tmp_path / "cache"), str(tmp_path / "models.lock.json"), str(tmp_path / "out")
    commits = lay_out_hf_cache(os.path.join(cache, "huggingface", "hub"), tiny_models_dir)
    overrides = [f"models.{n}.path={r}" for n, r in HUB_IDS.items()] + [
        f"fixtures.models_dir={tiny_models_dir}", "fixtures.build_tiny_models=false", "cmp.train_after_build=false",
        f"oops.root={sample_oops_root}", f"run.models_lock={lock}"]
    assert _fetch(cache, lock, overrides).returncode == 0
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", out, "--no-cmp"]
    for o in overrides:
        cmd += ["--set", o]
    env = _env(HF_HUB_CACHE=os.path.join(cache, "huggingface", "hub"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(out)
    for stage, repo in (("generate", "pab-test/tiny-sdxl"), ("train_captions", "pab-test/tiny-qwen2-vl"),
                        ("test_captions", "pab-test/tiny-qwen2-vl")):
        ids = {r["model_id"] for r in read_manifest(store, stage) if r.get("model_id")}
        assert ids == {f"{repo}@{commits[repo]}"}, (stage, ids)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    for repo, commit in commits.items():
        assert commit in card, repo
    saved = json.dumps(open(os.path.join(out, "config.yaml")).read())
    assert commits["pab-test/tiny-annotators"] in saved


def test_sdxl_is_fetched_as_diffusers_loads_it_and_a_missing_fp16_variant_falls_back(tmp_path, tiny_model,
                                                                                    monkeypatch):
    from pab_build.model_lock import fetch_model, weights_variant

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models_dir = os.path.dirname(tiny_model("sdxl"))
    hub = str(tmp_path / "hub")
    base = os.path.join(hub, "models--pab-test--tiny-sdxl")
    shutil.copytree(os.path.join(models_dir, "sdxl"), os.path.join(base, "snapshots", _commit("sdxl")),
                    ignore=shutil.ignore_patterns(".pab-fixture"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(_commit("sdxl"))
    assert weights_variant("float16") == "fp16" and weights_variant("bfloat16") is None
    entry = fetch_model("pab-test/tiny-sdxl", None, hub, pipeline=True, variant="fp16")  # the tiny repo has none
    assert entry["revision"] == _commit("sdxl") and "unet/diffusion_pytorch_model.safetensors" in entry["files"]
