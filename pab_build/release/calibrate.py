"""``pab calibrate``: a pilot run on a sample that measures what every filter measures, before the
week-long build (DESIGN.md principle 19).

The pilot is an ordinary build into its own OUT, of the real stages through the plain runner
(``run_stage``), on a sampled config: the first ``calibrate.samples`` OOPS! clips (``oops.limit``)
and about as many generated images (``generate.max_prompts`` prompts x ``calibrate.images_per_prompt``).
Nothing here re-implements a stage: the numbers are read back from the manifests the stages wrote
(``calibration.py``). ``calibration/summary.json`` holds them (diff two calibrations),
``calibration/index.html`` shows them (``calibration_page.py``).
"""

from __future__ import annotations

import logging
import math

from ..config import PABConfig
from ..engine.pipeline import get_stage
from ..engine.prepare import prepare_build
from ..engine.units import Context, run_stage
from ..model_lock import locked_config
from .calibration import summarise
from .calibration_page import render_calibration_page

log = logging.getLogger(__name__)

# the stages a pilot runs: the test branch up to the attributes and the training branch up to its
# attributes (no shards, no CMP); review and caption QC accept everything (a pilot has no reviewers)
CALIBRATION_STAGES = ["frames", "pose", "pairs", "review", "test_captions", "test_attributes",
                      "prompts", "generate", "gen_pose", "train_captions", "train_attributes"]
PILOT_SETTINGS = ["review.policy=accept_all", "qc.policy=none", "cmp.train_after_build=false"]


# -- the sampled config -----------------------------------------------------------------------------
def sample_overrides(cfg: PABConfig, samples: int | None) -> list[str]:
    """Overrides that make a build a pilot of ``samples`` clips and about as many generated images."""
    n = samples or cfg.calibrate.samples
    per_prompt = cfg.calibrate.images_per_prompt
    return [f"oops.limit={n}", f"generate.max_prompts={math.ceil(n / per_prompt)}",
            f"generate.images_per_caption={per_prompt}", *PILOT_SETTINGS]


def calibration_config(profile: str, samples: int | None = None, overrides: list[str] | None = None) -> PABConfig:
    """The profile's config as a pilot: its ``calibrate.overrides``, then the sample's, then the
    user's ``--set`` (the user's last, so they win), models pinned to the lock like a run's."""
    user = list(overrides or [])
    base = locked_config(profile, user)
    return locked_config(profile, [*base.calibrate.overrides, *sample_overrides(base, samples), *user])


# -- the pilot ------------------------------------------------------------------------------------
def run_calibration(cfg: PABConfig, out: str) -> dict:
    """Run the pilot's stages on ``cfg`` (already sampled: :func:`sample_overrides`) into ``out``,
    then write ``calibration/summary.json`` and ``calibration/index.html``; returns the summary.
    Finished units are kept, so a rerun with other thresholds redoes only the stages they change."""
    prepare_build(cfg, out)
    ctx = Context.create(cfg, out)
    runs = {}
    for name in CALIBRATION_STAGES:
        runs[name] = run_stage(ctx, get_stage(name))
        log.info("calibrate: %s %s", name, runs[name])
    summary = summarise(ctx.store, cfg)
    summary["units"] = runs
    ctx.store.write_json("calibration/summary.json", summary)
    ctx.store.write_text("calibration/index.html", render_calibration_page(ctx.store, cfg, summary))
    return summary
