"""Helpers shared by the CLI commands: JSON output and progress bars."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterator

from ..core.interrupts import raise_if_signalled
from ..core.progress import Progress


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_with_progress(gen: Iterator[Progress], quiet: bool = False):
    """Drive a core job generator with a rich progress bar on stderr; return its result."""
    if quiet:  # no bar: rich is not even imported
        try:
            while True:
                next(gen)
                raise_if_signalled()  # a signal whose exception Python dropped (see there)
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    # auto_refresh=False: no refresh thread (the bar is redrawn at each event), so a job can
    # fork its worker processes (see core.executor.warm_up)
    with Bar(*columns, console=console, disable=quiet or not console.is_terminal, transient=False,
             auto_refresh=False) as bar:
        task = bar.add_task("starting", total=None)
        last = 0.0
        try:
            while True:
                ev = next(gen)
                raise_if_signalled()
                now = time.monotonic()
                redraw, last = (now - last >= 0.1), (now if now - last >= 0.1 else last)
                bar.update(task, completed=ev.step, total=ev.total or None, description=ev.message[:60], refresh=redraw)
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()
