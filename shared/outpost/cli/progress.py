"""Progress of long commands (``outpost bench``, ``model quantize``, ``replay``) on the terminal.

Always on **stderr**: stdout keeps what a script reads (with ``--json``, one JSON object on the
last line), so a progress display never lands in the figures. On a terminal a spinner (a bar when
the number of steps is known) names the phase now running with the time it has taken, and goes
when the command ends; each phase also leaves a dim line above it, so the run's record stays. On
something that is not a terminal (a pipe, a CI log) only those lines are written: a log, not an
animation (rich's live display does not draw there).
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


def stderr_console() -> Console:
    """Where progress goes: stderr, the terminal's width there, else 160 columns (a log's lines
    are not cut at rich's default 80)."""
    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class Phases:
    """``with Phases("bench ingest") as say: say("phase 1 ...")``: each call starts a phase (a
    line, the spinner's text, and one step of the bar when ``total`` steps were announced);
    :meth:`count` shows a running count within the phase (entries read, say)."""

    def __init__(self, what: str, *, total: int | None = None, console: Console | None = None) -> None:
        self.what = what
        self.console = console or stderr_console()
        columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("[dim]{task.fields[detail]}"), TimeElapsedColumn()]
        # transient: the display goes at the end and leaves the phases' lines; stdout is not
        # redirected into it (a stray print stays on stdout, where it was written)
        self._progress = Progress(*columns, console=self.console, transient=True, redirect_stdout=False)
        self._task: TaskID | None = None
        self._total = total
        self._started = False

    def __enter__(self) -> Phases:
        self._progress.start()
        self._task = self._progress.add_task(self.what, total=self._total, detail="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, message: str) -> None:
        """A new phase: its line (not markup: a message may hold brackets), and the display's text."""
        self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)
        if self._task is None:
            return
        advance = 1 if self._total is not None and self._started else 0
        self._started = True
        self._progress.update(self._task, description=f"{self.what}: {message}", advance=advance, detail="")

    def count(self, n: int, unit: str) -> None:
        """A running count within the phase (shown, not logged: it changes too often for lines)."""
        if self._task is not None:
            self._progress.update(self._task, detail=f"{n:,} {unit}")

    def done(self) -> None:
        """The last step finished (the bar full before the display goes)."""
        if self._task is not None and self._total is not None:
            self._progress.update(self._task, completed=self._total)
