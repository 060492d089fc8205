"""The live progress display of ``pab run``: per stage, units done / total, rows ok / rejected,
units per second, ETA and failed units, fed by ``pab_build.engine.progress`` events.

On a terminal it is a ``rich`` progress table drawn on the console Prefect logs to (so log lines
scroll above it); elsewhere (CI logs, a pipe) a line per stage every ``LINE_EVERY_S`` and when the
stage ends. Unless ``verbose``, Prefect's per-task lines (``Task run 'frames-unit-fd9' - Finished
in state Completed()``) are kept off the console, and so are the flow's progress lines (made from
the same events: each figure shows once); both still reach the API and the UI.
"""

from __future__ import annotations

import io
import logging
import sys
import time

from pab_build.engine.progress import PROGRESS_LINE, PROGRESS_LOGGER, StageProgress, stage_line

LINE_EVERY_S = 10.0


class _LinesTo(io.TextIOBase):
    """A file whose complete lines are printed on a live ``console`` (above its bars)."""

    def __init__(self, console, original):
        self.console, self.original, self.pending = console, original, ""

    def isatty(self) -> bool:  # Prefect's console keeps its colours when the real stream has them
        return bool(getattr(self.original, "isatty", lambda: False)())

    def write(self, text: str) -> int:
        from rich.text import Text

        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.console.print(Text.from_ansi(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


class _ConsoleFilter(logging.Filter):
    """Off the terminal: the flow's progress lines (the display shows the same events) and,
    unless ``verbose``, Prefect's per-task-run lines. Both still reach the API and the UI."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, PROGRESS_LINE, False):
            return False
        return self.verbose or not (record.name.startswith("prefect.task_runs") and record.levelno < logging.WARNING)


class ProgressDisplay(logging.Handler):
    """``with ProgressDisplay(planned=stages) as d: d.note("starting Prefect"); ...; build_pab(...)``.

    It shows at once, before Prefect is imported (seconds) and its temporary server has started
    (seconds more): a status row (``note``) and a waiting row per ``planned`` stage; call
    ``attach_prefect()`` once Prefect is imported, so its console lines go through the display."""

    def __init__(self, verbose: bool = False, console=None, live: bool | None = None, planned=()):
        super().__init__(logging.INFO)
        self.verbose = verbose
        self.planned = list(planned)
        self.console_handlers: list[logging.Handler] = []
        if console is None:  # not Prefect's console: its theme lacks the progress bar's styles
            from rich.console import Console

            console = Console(file=sys.stderr)
        self.console = console
        self._prefect_file = None
        self.live = console.is_terminal if live is None else live
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}
        self.latest: dict[str, StageProgress] = {}
        self.bars = None
        self.task_ids: dict[str, int] = {}
        self.status_id = None
        self.failed_seen: dict[str, int] = {}
        self._hide = _ConsoleFilter(verbose)

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            try:
                self._start_bars()
            except Exception:  # noqa: BLE001 - a display problem must never stop a build: print lines
                logging.getLogger(__name__).warning("no live progress display; printing lines", exc_info=True)
                self._stop_bars()
                self.live = False
        logging.getLogger(PROGRESS_LOGGER).addHandler(self)
        self.attach_prefect()
        return self

    def attach_prefect(self) -> None:
        """Filter Prefect's console handlers (and on a terminal route their lines above the bars);
        every one of them: a process that configured Prefect's logging twice has more than one."""
        for h in logging.getLogger().handlers:
            if type(h).__name__ != "PrefectConsoleHandler" or h in self.console_handlers:
                continue
            self.console_handlers.append(h)
            h.addFilter(self._hide)
            prefect_console = getattr(h, "console", None)
            if self.bars is not None and prefect_console is not None:
                self._prefect_file.append((prefect_console, prefect_console.file))
                prefect_console.file = _LinesTo(self.console, prefect_console.file)

    def note(self, text: str) -> None:
        """What the build is doing before its stages report (starting Prefect, ...)."""
        if self.bars is None:
            self.console.print(f"pab: {text}", markup=False, highlight=False, soft_wrap=True)
        else:
            self.bars.update(self.status_id, units=text)

    def __exit__(self, *exc) -> None:
        logging.getLogger(PROGRESS_LOGGER).removeHandler(self)
        self._stop_bars()
        for h in self.console_handlers:
            h.removeFilter(self._hide)

    def _start_bars(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bars = Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.fields[units]}"),
                             TextColumn("{task.fields[rows]}"), TextColumn("{task.fields[rate]}"),
                             TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[failed]}"),
                             console=self.console, transient=False)
        self._prefect_file = []  # Prefect's log lines go through the display (attach_prefect), not across the bars
        self.bars.start()  # from here sys.stderr is the display's proxy: lines print above the bars
        # the whole build at once: a status row on top (note), each stage waiting for its first event
        self.status_id = self.bars.add_task("pab", total=None, units="", rows="", rate="", failed="")
        for stage in self.planned:
            self.task_ids[stage] = self.bars.add_task(stage, total=None, units="waiting", rows="", rate="", failed="")

    def _stop_bars(self) -> None:
        for prefect_console, file in self._prefect_file or ():
            prefect_console.file = file
        self._prefect_file = None
        if self.bars is not None:
            self.bars.stop()
            self.bars = None

    # -- events ----------------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        data = getattr(record, "pab_progress", None)
        if not data:
            return
        try:
            self.update(StageProgress(**data))
        except Exception:  # noqa: BLE001 - a display problem must never stop a build
            self.handleError(record)

    def update(self, p: StageProgress) -> None:
        self.started.setdefault(p.stage, p.at)
        self.latest[p.stage] = p
        if self.bars is not None:
            fields = self._fields(p)
            if p.stage not in self.task_ids:
                self.task_ids[p.stage] = self.bars.add_task(p.stage, total=max(p.total, 1), **fields)
            if self.status_id is not None and len(self.latest) == 1:
                self.bars.update(self.status_id, units="building")
            self.bars.update(self.task_ids[p.stage], total=max(p.total, 1),
                             completed=p.units_finished if p.total else 1, **fields)
            return
        now = time.monotonic()
        due = now - self.last_line.get(p.stage, -LINE_EVERY_S) >= LINE_EVERY_S
        if due or p.finished or p.failed > self.failed_seen.get(p.stage, 0):
            self.last_line[p.stage] = now
            self.console.print(stage_line(p, self.started[p.stage]), markup=False, highlight=False, soft_wrap=True)
        self.failed_seen[p.stage] = p.failed

    def _fields(self, p: StageProgress) -> dict:
        elapsed = max(p.at - self.started[p.stage], 1e-6)
        worked = p.done + p.failed
        return {"units": f"{p.units_finished:>6}/{p.total:<6} units", "rows": f"rows {p.ok} ok / {p.rejected} rejected",
                "rate": f"{worked / elapsed:.2f} u/s" if worked else "- u/s",
                "failed": f"[red]{p.failed} failed[/red]" if p.failed else "0 failed"}
