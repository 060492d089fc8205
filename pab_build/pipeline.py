"""The stages of a build, in order: one explicit table, no discovery magic."""

from __future__ import annotations

import importlib

from .config import ConfigError
from .units import Stage

# stage name -> "module:attribute" of its Stage object (imported lazily: stages pull in torch etc.)
STAGES: dict[str, str] = {
    # real-world test set (paper 3.1)
    "frames": "pab_build.frames:STAGE",
    "pose": "pab_build.pose:POSE_STAGE",
    "pairs": "pab_build.similarity:PAIRS_STAGE",
    "review": "pab_build.review:REVIEW_STAGE",
    "test_captions": "pab_build.captions:TEST_CAPTIONS_STAGE",
    "test_attributes": "pab_build.attributes:TEST_ATTRIBUTES_STAGE",
    "test_shards": "pab_build.shards:TEST_SHARDS_STAGE",
    # synthetic training set (paper 3.2)
    "prompts": "pab_build.subjects:PROMPTS_STAGE",
    "generate": "pab_build.generate:GENERATE_STAGE",
    "gen_pose": "pab_build.pose:GEN_POSE_STAGE",
    "train_captions": "pab_build.captions:TRAIN_CAPTIONS_STAGE",
    "attributes": "pab_build.attributes:ATTRIBUTES_STAGE",
    "train_shards": "pab_build.shards:TRAIN_SHARDS_STAGE",
}
STAGE_ORDER: list[str] = list(STAGES)


def get_stage(name: str) -> Stage:
    try:
        module, attr = STAGES[name].split(":")
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}") from None
    return getattr(importlib.import_module(module), attr)


def stages_until(until: str | None) -> list[str]:
    """The stages to run for ``--until STAGE`` (that stage included); all of them for None."""
    if until is None:
        return list(STAGE_ORDER)
    if until not in STAGES:
        raise ConfigError(f"--until {until!r} is not a stage; stages: {', '.join(STAGE_ORDER)}")
    return STAGE_ORDER[: STAGE_ORDER.index(until) + 1]
