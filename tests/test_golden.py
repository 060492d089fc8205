"""Golden outputs: every stage's manifest content on the bundled sample, against a committed file.

A stage's hash is its config, its data files and a hand-kept ``version`` (source text is not
hashed: a comment must not cost a GPU rerun). So a code change that alters a stage's outputs must
bump that version, or existing builds keep the old outputs. This test catches a forgotten bump:
it fails when a stage's outputs differ from ``tests/data/golden_outputs.json`` while its stage hash
did not change, and names the stage. After a deliberate change (version bumped), regenerate with
``PAB_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and commit the file.

The outputs of the tiny models depend on the torch / diffusers / transformers build and the CPU;
on another environment than the one recorded the comparison is skipped (it says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import pytest

from pab_build.config import load_config
from pab_build.manifests import read_manifest
from pab_build.engine.pipeline import STAGE_ORDER, get_stage
from pab_build.store import Store

pytestmark = pytest.mark.slow

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_outputs.json")


def _environment() -> dict[str, str]:
    import diffusers
    import numpy
    import torch
    import transformers

    from pab_build.text import wordnet

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "machine": platform.machine(), "wordnet": wordnet.fingerprint()}


def _rows_hash(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: r["sample_key"])
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def stage_records(out: str, cfg) -> dict[str, dict[str, str]]:
    store = Store(out)
    return {name: {"version": get_stage(name).version, "stage_hash": get_stage(name).stage_hash(cfg),
                   "outputs": _rows_hash(read_manifest(store, name))} for name in STAGE_ORDER}


def unversioned_changes(golden: dict, now: dict) -> list[str]:
    """Stages whose outputs changed although their stage hash did not, earliest first; a stage
    after one whose outputs changed may just be fed different inputs, so only the first is blamed."""
    blamed = []
    for name in STAGE_ORDER:
        old, new = golden.get(name), now[name]
        if old is None or old["outputs"] == new["outputs"]:
            continue
        if old["stage_hash"] == new["stage_hash"]:
            blamed.append(name)
        break
    return blamed


def test_stage_outputs_match_the_golden_file_or_their_version_was_bumped(real_build):
    cfg = load_config("smoke")  # the stage hash of the paths-independent config sections
    now = {"environment": _environment(), "stages": stage_records(real_build, cfg)}
    if os.environ.get("PAB_UPDATE_GOLDEN"):
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump(now, f, indent=1, sort_keys=True)
            f.write("\n")
        pytest.skip(f"wrote {GOLDEN}")
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    if golden["environment"] != now["environment"]:
        pytest.skip(f"golden outputs were recorded on {golden['environment']}, this is {now['environment']}")
    blamed = unversioned_changes(golden["stages"], now["stages"])
    assert not blamed, (
        f"stage {blamed[0]!r}: its outputs changed but its version ({now['stages'][blamed[0]]['version']!r}) "
        f"did not: existing builds would keep the old outputs. Bump {blamed[0]}'s Stage(version=...) "
        "(later stages follow through their inputs), then regenerate the golden file with "
        "PAB_UPDATE_GOLDEN=1 pytest tests/test_golden.py")
    changed = [n for n in STAGE_ORDER if golden["stages"].get(n) != now["stages"][n]]
    assert not changed, (f"stages {changed} changed with their version or config: regenerate the golden file "
                         "with PAB_UPDATE_GOLDEN=1 pytest tests/test_golden.py and commit it")


def test_the_blame_goes_to_the_first_changed_stage_only():
    same = {"version": "1", "stage_hash": "h", "outputs": "o"}
    golden = {n: dict(same) for n in STAGE_ORDER}
    now = {n: dict(same) for n in STAGE_ORDER}
    now["prompts"]["outputs"] = now["generate"]["outputs"] = "changed"
    assert unversioned_changes(golden, now) == ["prompts"]
    now["prompts"]["stage_hash"] = "bumped"
    assert unversioned_changes(golden, now) == []  # versioned: generate follows through its inputs
