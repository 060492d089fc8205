"""Shared fixtures: tiny models (built once per test session) and the sample OOPS! root."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> str:
    """Where this session's tiny models live (built on demand by the fixtures below)."""
    return os.environ.get("PAB_TEST_MODELS_DIR") or str(tmp_path_factory.getbasetemp() / "tiny-models")


@pytest.fixture(scope="session")
def tiny_models_dir(models_dir) -> str:
    """Folder with every tiny model (sdxl, safety_checker, qwen2_vl, openpose, resnet50, swin, bert)."""
    from pab_build.fixtures import build_tiny_models

    build_tiny_models(models_dir, seed=0)
    return models_dir


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    """``tiny_model("openpose")`` -> folder of that one tiny model (built once per session)."""
    from pab_build.fixtures import build_tiny_models

    def get(name: str) -> str:
        return build_tiny_models(models_dir, seed=0, only=[name])[name]

    return get


@pytest.fixture(scope="session")
def sample_oops_root(tmp_path_factory) -> str:
    from pab_build.fixtures.sample_oops import write_sample_oops

    root = str(tmp_path_factory.mktemp("sample-oops"))
    write_sample_oops(root, seed=0)
    return root


@pytest.fixture
def smoke_cfg(models_dir, sample_oops_root):
    """The smoke profile pointed at the session's tiny-model folder and sample root (ask for
    ``tiny_model(name)`` too when a test needs a model built)."""
    from pab_build.config import load_config

    return load_config(
        "smoke",
        {
            "fixtures.models_dir": models_dir,
            "fixtures.build_tiny_models": False,
            "fixtures.build_sample_oops": False,
            "oops.root": sample_oops_root,
        },
    )


@pytest.fixture
def ctx(smoke_cfg, tmp_path):
    from pab_build.engine.units import Context

    return Context.create(smoke_cfg, str(tmp_path / "out"))


_EXIT_STATUS = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


def pytest_unconfigure(config):
    # Native thread pools (pyarrow's, seen in libraries we call such as `datasets`) can abort the
    # interpreter during its final teardown, after every test has passed and the summary is printed.
    # Leave with pytest's own status instead of the teardown's SIGABRT.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS["code"])


@pytest.fixture(scope="session")
def real_build(tmp_path_factory, tiny_models_dir, sample_oops_root) -> str:
    """A whole smoke build made by the real stages (run_stage in a plain loop, no Prefect) on the
    tiny models and the bundled sample, plus its dataset card: what the release, card, publish
    and golden tests read. Built once per session; tests must not modify it (copy it first)."""
    from pab_build.config import load_config
    from pab_build.engine.pipeline import STAGE_ORDER, get_stage
    from pab_build.engine.prepare import prepare_build
    from pab_build.release.card import write_dataset_card
    from pab_build.engine.units import Context, run_stage

    cfg = load_config("smoke", {"fixtures.models_dir": tiny_models_dir, "fixtures.build_tiny_models": False,
                                "fixtures.build_sample_oops": False, "oops.root": sample_oops_root})
    out = str(tmp_path_factory.mktemp("real-build"))
    prepare_build(cfg, out)
    ctx = Context.create(cfg, out)
    for name in STAGE_ORDER:
        counts = run_stage(ctx, get_stage(name))
        assert counts["failed"] == 0, (name, counts)
    write_dataset_card(out)
    return out
