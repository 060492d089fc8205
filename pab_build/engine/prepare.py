"""Before the first stage: build the fixtures a profile asks for, save the resolved config."""

from __future__ import annotations

import logging

from ..config import PABConfig
from ..manifests import manifest_rel
from .pipeline import RENAMED_STAGES
from ..store import Store, out_store

log = logging.getLogger(__name__)


def migrate_renamed_stages(store: Store) -> list[str]:
    """Move a build's outputs from a stage's old name to its new one (e.g. ``attributes`` ->
    ``train_attributes``), so its finished units stay done; a stage hash does not include the name."""
    moved = []
    for old, new in RENAMED_STAGES.items():
        for old_rel, new_rel in ((f"_markers/{old}", f"_markers/{new}"), (f"_units/{old}", f"_units/{new}"),
                                 (f"_cache/{old}", f"_cache/{new}"), (manifest_rel(old), manifest_rel(new))):
            if store.exists(old_rel) and not store.exists(new_rel):
                store.fs.mv(store.path(old_rel), store.path(new_rel), recursive=True)
                moved.append(f"{old_rel} -> {new_rel}")
    for m in moved:
        log.info("renamed stage outputs: %s", m)
    return moved


def prepare_build(cfg: PABConfig, out: str) -> None:
    """Build tiny models / the sample OOPS! root when the profile says so (smoke), and write the
    resolved config to ``OUT/config.yaml`` so every output can be traced to its settings."""
    if cfg.fixtures.build_tiny_models:
        from ..fixtures import build_tiny_models

        build_tiny_models(cfg.fixtures.models_dir, seed=cfg.fixtures.seed)
    if cfg.fixtures.build_sample_oops and cfg.oops.root is None:
        from ..fixtures.sample_oops import write_sample_oops

        write_sample_oops(cfg.fixtures.sample_oops_dir, seed=cfg.fixtures.seed)
    store = out_store(out, cfg.publish.storage_options)
    migrate_renamed_stages(store)
    store.write_text("config.yaml", cfg.to_yaml())
