"""Shared fixtures: tiny models (built once per test session) and the sample OOPS! root."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> str:
    """Folder with every tiny model (sdxl, qwen2_vl, openpose, resnet50, swin, bert)."""
    from pab_build.fixtures import build_tiny_models

    d = os.environ.get("PAB_TEST_MODELS_DIR") or str(tmp_path_factory.getbasetemp() / "tiny-models")
    build_tiny_models(d, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model("openpose")`` -> folder of that one tiny model (built once per session)."""
    from pab_build.fixtures import build_tiny_models

    d = os.environ.get("PAB_TEST_MODELS_DIR") or str(tmp_path_factory.getbasetemp() / "tiny-models")

    def get(name: str) -> str:
        return build_tiny_models(d, seed=0, only=[name])[name]

    return get


@pytest.fixture(scope="session")
def sample_oops_root(tmp_path_factory) -> str:
    from pab_build.fixtures.sample_oops import write_sample_oops

    root = str(tmp_path_factory.mktemp("sample-oops"))
    write_sample_oops(root, seed=0)
    return root


@pytest.fixture
def smoke_cfg(tiny_models_dir, sample_oops_root):
    """The smoke profile pointed at the session's tiny models and sample root."""
    from pab_build.config import load_config

    return load_config(
        "smoke",
        {
            "fixtures.models_dir": tiny_models_dir,
            "fixtures.build_tiny_models": False,
            "fixtures.build_sample_oops": False,
            "oops.root": sample_oops_root,
        },
    )


@pytest.fixture
def ctx(smoke_cfg, tmp_path):
    from pab_build.units import Context

    return Context.create(smoke_cfg, str(tmp_path / "out"))
