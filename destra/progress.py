"""Progress in the terminal: live bars and spinners on a terminal, plain lines elsewhere.

    progress = Reporter.for_stream(sys.stderr, enabled=not as_json)
    with progress:
        progress.step(Step("Kafka start"))   # a spinner; the step before it gets a tick
        progress.step("a note")               # printed above the spinners
        progress.task(p, replicas=3)          # one bar per task: state, counts, elapsed

On a terminal (the stream's ``isatty()``, and ``TERM`` not ``dumb``) it draws with
``rich``. Anywhere else it prints plain lines, as the commands always did: one line per
change of a task's progress (``task_line``), one line per note. Disabled (``--json``),
it prints neither progress nor steps, only the notes that are not steps (warnings the
operator should read). ``rich`` is imported only when a terminal is there to draw on.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TextIO

from infra.notes import Step

if TYPE_CHECKING:
    from types import TracebackType

    from destra.client import Progress


def task_line(p: Progress) -> str:
    """The plain line of a task's progress, as ``destra submit --wait`` prints it."""
    return (f"  {p.state}: {p.assigned} assigned, {p.granted} granted, "
            f"{p.committed} committed, {p.revealed} revealed")


class Reporter:
    """Plain lines (no terminal) or nothing (disabled); ``for_stream`` picks the kind."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self._last: dict[str, str] = {}

    @classmethod
    def for_stream(cls, stream: TextIO, *, enabled: bool = True,
                   force_terminal: bool | None = None) -> Reporter:
        """The reporter for ``stream``: live on a terminal (or ``force_terminal``), plain
        lines elsewhere (or ``force_terminal=False``), quiet when not ``enabled``."""
        if not enabled:
            return cls(stream, quiet=True)
        if force_terminal is None:
            force_terminal = _is_terminal(stream)
        return LiveReporter(stream) if force_terminal else cls(stream)

    def task(self, p: Progress, replicas: int | None = None) -> None:
        """A task moved: its line, when it differs from the task's last one."""
        line = task_line(p)
        if not self.quiet and self._last.get(p.task_id) != line:
            self._last[p.task_id] = line
            self._print(line)

    def expect(self, task_id: str, replicas: int | None = None) -> None:
        """A task about to be followed: on a terminal its bar, queued, at once; no line."""

    def step(self, note: str) -> None:
        """A note: a ``Step`` begins a step (printed unless quiet), any other is printed."""
        if not (self.quiet and isinstance(note, Step)):
            self._print(note)

    def close(self, ok: bool = True) -> None:
        """Done (``ok``) or given up (the last step failed)."""

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(ok=kind is None)


def _is_terminal(stream: TextIO) -> bool:
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


_STATES = {"queued": "yellow", "awaiting-key": "yellow", "running": "cyan",
           "revealing": "cyan", "verified": "green", "failed": "red"}


class LiveReporter(Reporter):
    """Bars and spinners drawn by ``rich`` on a terminal, started on first use."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        from rich.console import Console

        self.console = Console(file=stream, force_terminal=True)
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._step: Any = None

    def _live(self) -> Any:
        if self._progress is None:
            from rich.progress import Progress as Bars

            self._progress = Bars(*_columns(), console=self.console, transient=False,
                                  refresh_per_second=8)
            self._progress.start()
        return self._progress

    def task(self, p: Progress, replicas: int | None = None) -> None:
        """The task's bar: its state, its replicas' counts, elapsed time."""
        from rich.markup import escape

        bars = self._live()
        asked = max(replicas or 0, p.assigned, 1)
        done = p.verdict is not None
        fields = {
            "description": f"{escape(p.task_id)} [{_STATES.get(p.state, 'white')}]{p.state}[/]",
            "counts": "  ".join(f"{n}/{asked} {what}" for n, what in (
                (p.assigned, "assigned"), (p.granted, "granted"), (p.committed, "committed"),
                (p.revealed, "revealed")) if what != "granted" or p.encrypted),
            "mark": ("[green]✔[/]" if p.state == "verified" else "[red]✘[/]") if done else "",
            "bar": True,
        }
        # Three stages per replica (assigned, committed, revealed); the verdict fills it.
        completed = 3 * asked if done else sum(min(n, asked) for n in (
            p.assigned, p.committed, p.revealed))
        if p.task_id not in self._tasks:
            self._tasks[p.task_id] = bars.add_task(total=3 * asked, completed=completed,
                                                   **fields)
        else:
            bars.update(self._tasks[p.task_id], total=3 * asked, completed=completed,
                        **fields)
        if done:
            bars.stop_task(self._tasks[p.task_id])
        bars.refresh()

    def expect(self, task_id: str, replicas: int | None = None) -> None:
        """The task's bar, queued, before any of its events arrives."""
        from destra.client import Progress

        if task_id not in self._tasks:
            self.task(Progress(task_id), replicas)

    def step(self, note: str) -> None:
        """A ``Step``: the running step gets a tick, a spinner starts; else printed above."""
        bars = self._live()
        if not isinstance(note, Step):
            bars.console.print(note, markup=False, highlight=False)
            return
        self._finish_step("[green]✔[/]")
        self._step = bars.add_task(note, total=None, counts="", mark="", bar=False)
        bars.refresh()

    def _finish_step(self, mark: str) -> None:
        if self._step is not None:
            self._progress.update(self._step, mark=mark)
            self._progress.stop_task(self._step)
            self._step = None

    def close(self, ok: bool = True) -> None:
        """Tick (or cross) the running step and leave the last picture on the terminal."""
        if self._progress is None:
            return
        self._finish_step("[green]✔[/]" if ok else "[red]✘[/]")
        self._progress.refresh()
        self._progress.stop()
        self._progress = None


def _columns() -> list[Any]:
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    class Mark(ProgressColumn):
        """A spinner while running; the tick or cross it ended with."""

        def __init__(self, table_column: Column | None = None) -> None:
            super().__init__(table_column)
            self.spinner = SpinnerColumn()

        def render(self, task: Any) -> Any:
            mark = task.fields.get("mark")
            return Text.from_markup(mark) if mark else self.spinner.render(task)

    class Bar(ProgressColumn):
        """A bar for a task; none for a step."""

        def __init__(self) -> None:
            super().__init__()
            self.bar = BarColumn(bar_width=24)

        def render(self, task: Any) -> Any:
            return self.bar.render(task) if task.fields.get("bar") else Text("")

    class Seconds(ProgressColumn):
        """Elapsed seconds, frozen when the task or step stopped."""

        max_refresh = 0.5

        def render(self, task: Any) -> Any:
            return Text(f"{task.elapsed or 0.0:.1f}s", style="progress.elapsed")

    return [Mark(table_column=Column(width=1, no_wrap=True)),
            TextColumn("{task.description}"), Bar(), TextColumn("{task.fields[counts]}"),
            Seconds(table_column=Column(min_width=7, justify="right", no_wrap=True))]
