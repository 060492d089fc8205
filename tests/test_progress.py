"""The live progress of `pab run`: per stage units done / total, rows ok / rejected, rate, ETA,
failures, fed by `pab_build.engine.progress` events; Prefect's per-task lines only with --verbose."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from flows.progress import ProgressDisplay, stage_line
from pab_build.engine.progress import PROGRESS_LOGGER, StageProgress, StageReporter
from pab_build.store import Marker, Store
from pab_build.engine.units import Context, Unit, record_failed_unit


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=160, color_system=None), buf


def test_the_reporter_counts_units_and_rows_and_the_display_prints_them(smoke_cfg, tmp_path):
    store = Store(str(tmp_path))
    store.write_marker("pose", "000000", Marker("done", "s", "i", 4, ok=3, wall_s=1.0, finished_at=1.0))
    store.write_marker("pose", "000001", Marker("done", "s", "i", 2))  # an earlier version's marker: rows read
    from pab_build.manifests import rows_to_table, table_bytes

    store.write_bytes(store.unit_rows_rel("pose", "000001"), table_bytes(rows_to_table("pose", [
        {"sample_key": "a", "status": "ok", "reason": None}, {"sample_key": "b", "status": "rejected", "reason": "x"}])))
    from pab_build.engine.pipeline import get_stage

    record_failed_unit(Context(smoke_cfg, store), get_stage("pose"), Unit("pose", "000002", ({"sample_key": "c"},)),
                       RuntimeError("boom"))

    console, buf = _console(terminal=False)
    with ProgressDisplay(console=console, live=False):
        reporter = StageReporter(store, "pose", total=4)
        for unit_id, outcome in (("000000", "done"), ("000001", "skipped"), ("000002", "failed")):
            reporter.unit_finished(unit_id, outcome)
        reporter.stage_finished()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("pose: 0/4 units, rows 0 ok / 0 rejected, 0 failed")
    assert "pose: 3/4 units (1 skipped), rows 4 ok / 3 rejected, 1 failed" in lines[-2]  # a new failure prints at once
    assert re.fullmatch(r"pose: 3/4 units \(1 skipped\), rows 4 ok / 3 rejected, 1 failed, [\d.]+ units/s, ETA done", lines[-1])
    assert reporter.state == StageProgress("pose", 4, done=1, skipped=1, failed=1, ok=4, rejected=3,
                                           finished=True, at=reporter.state.at)
    assert not [h for h in logging.getLogger(PROGRESS_LOGGER).handlers if isinstance(h, ProgressDisplay)]


def test_rate_and_eta_and_the_terminal_table():
    p = StageProgress("generate", total=10, done=4, ok=100, rejected=4, at=120.0)
    assert stage_line(p, started=100.0) == \
        "generate: 4/10 units, rows 100 ok / 4 rejected, 0 failed, 0.20 units/s, ETA 30s"
    console, buf = _console(terminal=True)
    with ProgressDisplay(console=console, live=True) as display:
        display.update(StageProgress("generate", total=10, at=100.0))
        display.update(p)
    out = buf.getvalue()
    assert "generate" in out and "4/10" in out and "rows 100 ok / 4 rejected" in out and "0.20 u/s" in out


def test_the_display_shows_at_once_before_any_stage_reports():
    """Importing Prefect and starting its temporary server take seconds (a worker's first unit
    more): the display shows the build's stages and what it is doing from the start."""
    console, buf = _console(terminal=True)
    with ProgressDisplay(console=console, live=True, planned=["frames", "pose"]) as display:
        display.note("starting Prefect")
        display.bars.refresh()
        first = buf.getvalue()
        display.update(StageProgress("frames", total=5, done=2, ok=3, rejected=1, at=1.0))
    assert re.search(r"pab .* starting Prefect", first) and re.search(r"frames .* waiting", first)
    assert re.search(r"pose .* waiting", first)
    last = buf.getvalue()[len(first):]
    assert re.search(r"pab .* building", last) and re.search(r"frames .* 2/5 +units", last)
    console, buf = _console(terminal=False)  # a pipe or CI log: one line per note
    with ProgressDisplay(console=console, live=False, planned=["frames"]) as display:
        display.note("starting Prefect")
    assert buf.getvalue() == "pab: starting Prefect\n"


@pytest.fixture
def prefect_console():
    """A Prefect console handler on the root logger, as Prefect sets up: (handler, its stream)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    logging.getLogger().addHandler(handler)
    yield handler, stream
    logging.getLogger().removeHandler(handler)


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": msg})


def test_task_run_lines_are_hidden_unless_verbose(prefect_console):
    handler, stream = prefect_console
    task_line = _record("prefect.task_runs", logging.INFO, "Task run 'frames-unit-fd9' - Finished in state Completed()")
    failure = _record("prefect.task_runs", logging.ERROR, "Task run 'frames-unit-fd9' - Crashed")
    with ProgressDisplay(verbose=False, live=False):
        handler.handle(task_line)
        handler.handle(failure)
    assert "Completed()" not in stream.getvalue() and "Crashed" in stream.getvalue()
    with ProgressDisplay(verbose=True, live=False):
        handler.handle(task_line)
    assert "Completed()" in stream.getvalue()
    handler.handle(task_line)  # the filter leaves with the display
    assert stream.getvalue().count("Completed()") == 2


def test_the_flows_progress_lines_reach_the_ui_but_not_the_terminal(prefect_console):
    """The flow logs its progress lines (for the UI) from the events the display shows: while the
    display runs they stay off the terminal (each figure once), not off the other handlers."""
    from pab_build.engine.progress import PROGRESS_LINE

    handler, stream = prefect_console
    line = logging.makeLogRecord({"name": "prefect.flow_runs", "levelno": logging.INFO, "levelname": "INFO",
                                  "msg": "frames: 3/5 units, rows 6 ok / 4 rejected", PROGRESS_LINE: True})
    api = logging.Handler()  # stands for Prefect's API handler: no filter of the display on it
    shipped = []
    api.emit = shipped.append
    for verbose in (False, True):
        with ProgressDisplay(verbose=verbose, live=False):
            handler.handle(line)
            api.handle(line)
    assert "frames: 3/5" not in stream.getvalue() and len(shipped) == 2
    handler.handle(line)  # without a display (a worker's flow run): on its console as any log line
    assert "frames: 3/5" in stream.getvalue()


@pytest.mark.slow
def test_pab_run_prints_stage_progress_and_no_task_lines(tiny_model, sample_oops_root, tmp_path):
    models = os.path.dirname(tiny_model("openpose"))
    cmd = [sys.executable, "-m", "flows.cli", "run", "smoke", "--out", str(tmp_path / "out"), "--until", "frames",
           "--set", f"fixtures.models_dir={models}", "--set", "fixtures.build_tiny_models=false",
           "--set", f"oops.root={sample_oops_root}"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    assert re.search(r"^frames: (\d+)/\1 units, rows \d+ ok / \d+ rejected, 0 failed, .* ETA done$", text, re.M), text
    assert re.search(r"units/s", text) and "Task run '" not in text
    # the display speaks before Prefect's temporary server has started (seconds)
    assert 0 <= text.find("pab: starting Prefect") < text.find("Starting temporary server"), text
    verbose = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, env=env, timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Task run 'frames-unit" in verbose.stdout + verbose.stderr


def test_on_a_terminal_prefect_log_lines_scroll_above_the_bars(prefect_console):
    """Prefect's console has a theme of its own (no progress-bar styles): the bars use another
    console, and Prefect's lines are routed through the display while it runs."""
    handler, original = prefect_console
    line = _record("prefect.flow_runs", logging.INFO, "Beginning subflow run 'x' for flow 'stage-frames'")
    console, buf = _console(terminal=True)
    with ProgressDisplay(console=console, live=True) as display:
        display.update(StageProgress("frames", total=5, done=2, ok=3, rejected=1, at=1.0))
        handler.handle(line)
    assert "Beginning subflow run" in buf.getvalue() and "2/5" in buf.getvalue()
    assert original.getvalue() == ""
    handler.handle(line)  # after the display: back to its own stream
    assert "Beginning subflow run" in original.getvalue()
