"""Failure accounting: units failed after retries against run.max_failed_units; the summary names
each stage, the count and the first distinct errors."""

import pytest

from pab_build.engine.build_outcome import BuildFailed, allowed_failures, stage_failures
from pab_build.config import ConfigError, load_config
from pab_build.store import Marker, Store


def test_allowed_failures_count_or_fraction():
    assert allowed_failures(0, 100) == 0
    assert allowed_failures(3, 100) == 3
    assert allowed_failures(0.05, 100) == 5
    assert allowed_failures(0.05, 10) == 0
    with pytest.raises(ValueError):
        allowed_failures(1.5, 10)
    assert load_config("smoke", ["run.max_failed_units=0.1"]).run.max_failed_units == 0.1
    with pytest.raises(ConfigError, match="max_failed_units"):
        load_config("smoke", ["run.max_failed_units=-1"])


def test_stage_failures_reads_first_distinct_errors(tmp_path):
    store = Store(str(tmp_path))
    for uid, err in [("000000", "OSError: no model at /nope"), ("000001", "OSError: no model at /nope"),
                     ("000002", "ValueError: bad frame")]:
        store.write_marker("pose", uid, Marker("failed", "h", "i", 2, f"unit {uid} failed after retries: {err}"))
    store.write_marker("pose", "000003", Marker("done", "h", "i", 2))
    f = stage_failures(store, "pose", {"done": 1, "skipped": 0, "failed": 3}, 0)
    assert (f.failed, f.units, f.allowed, f.over_limit) == (3, 4, 0, True)
    assert f.errors == ["OSError: no model at /nope", "ValueError: bad frame"]
    assert not stage_failures(store, "pose", {"done": 1, "failed": 3}, 0.75).over_limit
    text = str(BuildFailed([f]))
    assert "stage pose: 3 of 4 units failed" in text and "no model at /nope" in text


def test_status_lists_failed_stages_with_errors(tmp_path, capsys):
    from flows.cli import main

    store = Store(str(tmp_path))
    store.write_marker("generate", "000004", Marker("failed", "h", "i", 3, "unit 000004 failed after retries: "
                                                   "OSError: no such model: /models/sdxl"))
    with pytest.raises(SystemExit) as e:
        main(["status", str(tmp_path)])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "generate: 1 unit(s) failed after retries; first errors: OSError: no such model: /models/sdxl" in text
