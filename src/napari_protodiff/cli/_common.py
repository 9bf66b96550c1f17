"""Helpers shared by the CLI commands: JSON output and progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

from ..core.progress import Progress


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_with_progress(gen: Iterator[Progress], quiet: bool = False):
    """Drive a core job generator with a rich progress bar on stderr; return its result."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Bar(*columns, console=console, disable=quiet or not console.is_terminal, transient=False) as bar:
        task = bar.add_task("starting", total=None)
        try:
            while True:
                ev = next(gen)
                bar.update(task, completed=ev.step, total=ev.total or None, description=ev.message[:60])
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()
