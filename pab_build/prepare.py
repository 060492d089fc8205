"""Before the first stage: build the fixtures a profile asks for, save the resolved config."""

from __future__ import annotations

from .config import PABConfig
from .store import Store


def prepare_build(cfg: PABConfig, out: str) -> None:
    """Build tiny models / the sample OOPS! root when the profile says so (smoke), and write the
    resolved config to ``OUT/config.yaml`` so every output can be traced to its settings."""
    if cfg.fixtures.build_tiny_models:
        from .fixtures import build_tiny_models

        build_tiny_models(cfg.fixtures.models_dir, seed=cfg.fixtures.seed)
    if cfg.fixtures.build_sample_oops and cfg.oops.root is None:
        from .fixtures.sample_oops import write_sample_oops

        write_sample_oops(cfg.fixtures.sample_oops_dir, seed=cfg.fixtures.seed)
    store = Store(out, **cfg.publish.storage_options) if "://" in out else Store(out)
    store.write_text("config.yaml", cfg.to_yaml())
