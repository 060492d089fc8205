"""Per-unit failure policy through Prefect: transient failures are retried, a poisoned unit is
recorded as rejected rows after its retries; the stage completes only when run.max_failed_units
accepts it, and otherwise ends Failed naming the unit's error."""

import pytest

from pab_build.engine.build_outcome import StageFailed
from pab_build.config import load_config
from pab_build.manifests import read_manifest, reject
from pab_build.engine.units import Stage, chunk_units

pytestmark = pytest.mark.slow


def _fault_stage(attempts: dict) -> Stage:
    def plan(ctx):
        return chunk_units("frames", [{"sample_key": f"k{i}"} for i in range(6)], 2)

    def run(ctx, unit):
        attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
        if unit.unit_id == "000000" and attempts[unit.unit_id] == 1:
            raise ConnectionError("transient: storage hiccup")
        if unit.unit_id == "000002":
            raise ValueError("poisoned input: cannot parse k4")
        return [{"sample_key": it["sample_key"], "status": "ok", "reason": None} if it["sample_key"] != "k1"
                else reject(it, "no person") for it in unit.items]

    return Stage("frames", plan, run, config_keys=("frames",))


def test_retries_then_rejects_poisoned_unit(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    import flows.build_pab as fb

    attempts: dict = {}
    monkeypatch.setattr(fb, "get_stage", lambda name: _fault_stage(attempts))
    cfg = load_config("smoke", ["run.unit_retries=2", "run.retry_delay_s=0", "run.max_failed_units=1"])
    out = str(tmp_path / "out")
    with prefect_test_harness(server_startup_timeout=120):
        counts = fb.stage_flow(cfg, out, "frames")
        first_attempts = dict(attempts)
        strict = load_config("smoke", ["run.unit_retries=0", "run.retry_delay_s=0"])
        state = fb.stage_flow(strict, str(tmp_path / "strict"), "frames", return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="stage frames: 1 of 3 units failed.*poisoned input"):
        state.result()
    assert counts["failed"] == 1 and counts["done"] == 2
    assert first_attempts == {"000000": 2, "000001": 1, "000002": 3}  # transient retried once; poisoned 1 + 2 retries
    rows = {r["sample_key"]: r for r in read_manifest(fb.Context.create(cfg, out).store, "frames")}
    assert len(rows) == 6
    assert rows["k0"]["status"] == "ok" and rows["k1"]["reason"] == "no person"
    assert rows["k4"]["status"] == rows["k5"]["status"] == "rejected"
    assert "poisoned input" in rows["k4"]["reason"]
