"""`pab status` (timings from markers, ETA, first errors, --json) and the CLI's user errors: one
line `pab: error: ...`, exit code 2, the traceback only with --debug; help on every argument."""

from __future__ import annotations

import argparse
import json

import pytest

from flows import cli
from pab_build.stages import frames, pose
from pab_build.engine.status import marker_timings
from pab_build.store import Marker
from pab_build.engine.units import record_failed_unit, run_stage


def _pab(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_status_shows_unit_timings_failures_and_json(ctx, capsys):
    ctx.store.write_text("config.yaml", ctx.cfg.to_yaml())
    run_stage(ctx, frames.STAGE)
    units = pose.STAGE.plan_units(ctx)
    record_failed_unit(ctx, pose.STAGE, units[0], RuntimeError("CUDA out of memory on cuda:0"))

    marker = ctx.store.read_marker("frames", "000000")
    assert marker.wall_s > 0 and marker.finished_at and marker.host and marker.worker
    code, out, _ = _pab(capsys, "status", "--json", ctx.store.root)
    assert code == 0
    table = {r["stage"]: r for r in json.loads(out)}
    fr, po = table["frames"], table["pose"]
    assert fr["done"] == len(frames.STAGE.plan_units(ctx)) and fr["failed"] == 0 and fr["pending"] == 0
    assert fr["elapsed_s"] >= 0 and fr["unit_s_mean"] > 0 and fr["eta_s"] is None and fr["hosts"] == [marker.host]
    assert po["failed"] == 1 and po["pending"] == len(units) - 1
    assert po["errors"] == ["unit 000000 failed after retries: RuntimeError: CUDA out of memory on cuda:0"]

    code, out, _ = _pab(capsys, "status", ctx.store.root)
    assert code == 0 and out.splitlines()[0].split() == [
        "stage", "done", "failed", "pending", "ok", "rejected", "elapsed", "per", "unit", "eta"]
    assert "pose: failed unit: unit 000000 failed after retries: RuntimeError: CUDA out of memory" in out


def test_eta_from_the_observed_rate_and_old_markers_still_read(ctx):
    markers = [Marker("done", "s", "i", 1, wall_s=10.0, finished_at=100.0 + 10 * n, host="gpu-1") for n in range(4)]
    t = marker_timings(markers, pending=8, now=140.0)
    assert t["elapsed_s"] == 40.0 and t["unit_s_mean"] == 10.0 and t["eta_s"] == 80.0  # 4 units in 40 s
    assert t["hosts"] == ["gpu-1"] and t["last_unit_ago_s"] == 10.0
    assert marker_timings(markers, pending=0)["eta_s"] is None
    ctx.store.write_json("_markers/frames/000007.json",  # a marker an earlier version wrote
                         {"status": "done", "stage_hash": "s", "input_hash": "i", "rows": 3, "reason": None})
    old = ctx.store.read_marker("frames", "000007")
    assert old == Marker("done", "s", "i", 3) and old.wall_s is None
    assert marker_timings([old], pending=2) == {"elapsed_s": None, "unit_s_mean": None, "eta_s": None, "hosts": []}


@pytest.mark.parametrize("argv", [["card", "{missing}"], ["status", "{missing}"], ["status", "{empty}"],
                                  ["export-official", "{empty}", "{empty}/official"], ["publish", "{missing}", "{empty}/p"],
                                  ["verify", "{missing}"], ["run", "no-such-profile"]])
def test_user_errors_are_one_line_with_exit_code_2(argv, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "no" / "such", empty=tmp_path / "empty") for a in argv]
    code, out, err = _pab(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pab: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "no").exists()  # nothing created for a typo

    code, _, err = _pab(capsys, "--debug", *argv)
    assert code == 2 and "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("pab: error: ")


def test_user_error_finds_the_cause_and_leaves_defects_alone():
    from pab_build.stages.review import ReviewFileError

    try:
        try:
            raise ReviewFileError("r1.csv:3: decision 'maybe' must be 'accept' or 'reject'")
        except ReviewFileError as e:
            raise RuntimeError("flow run failed") from e
    except RuntimeError as wrapped:
        assert isinstance(cli.user_error(wrapped), ReviewFileError)
    assert cli.user_error(KeyError("sample_key")) is None and cli.user_error(ZeroDivisionError()) is None


def test_every_argument_of_every_subcommand_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing
    assert all((a.help or "").strip() for a in parser._actions if a.dest not in ("help", "command"))
