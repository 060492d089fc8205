"""The stages of a build, in order: one explicit table, no discovery magic.

Each stage is the module ``pab_build/stages/<name>.py`` exposing ``STAGE``; adding a stage is that
module, one line here and its config section (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib

from ..config import ConfigError
from .units import Stage

STAGE_ORDER: list[str] = [
    # real-world test set (paper 3.1)
    "frames", "pose", "pairs", "review", "test_captions", "test_attributes", "test_shards",
    # synthetic training set (paper 3.2)
    "prompts", "generate", "gen_pose", "train_captions", "train_attributes", "train_shards",
]

# the two branches of the build graph; they run at once (the training branch's `prompts` only needs
# `pairs` of the test branch, see stages/prompts.py)
TEST_BRANCH: list[str] = STAGE_ORDER[: STAGE_ORDER.index("test_shards") + 1]
TRAINING_BRANCH: list[str] = STAGE_ORDER[STAGE_ORDER.index("prompts") :]

# stage names of earlier releases -> today's name (prepare_build renames their outputs)
RENAMED_STAGES: dict[str, str] = {"attributes": "train_attributes"}


def get_stage(name: str) -> Stage:
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    # imported lazily: stage modules pull in torch, diffusers, ...
    return importlib.import_module(f"pab_build.stages.{name}").STAGE


def stages_until(until: str | None) -> list[str]:
    """The stages to run for ``--until STAGE`` (that stage included); all of them for None."""
    if until is None:
        return list(STAGE_ORDER)
    if until not in STAGE_ORDER:
        raise ConfigError(f"--until {until!r} is not a stage; stages: {', '.join(STAGE_ORDER)}")
    return STAGE_ORDER[: STAGE_ORDER.index(until) + 1]
