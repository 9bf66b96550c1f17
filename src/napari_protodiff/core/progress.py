"""Progress events and cancel tokens shared by every long-running core job.

A long job is a generator of :class:`Progress` events (the stardist-napari pattern):
the CLI turns them into a progress bar, napari into its progress machinery, and a
consumer that stops iterating (``generator.close()``) cancels the job cleanly.
A :class:`CancelToken` lets a thread outside the generator ask for cancellation too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import Cancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a job: ``step`` of ``total`` units done, with a message."""

    step: int
    total: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.step / self.total)


class CancelToken:
    """A thread-safe flag a job checks between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("The job was cancelled.")


ProgressCallback = Callable[[Progress], None]


def run_to_end(events: Iterable[Progress], callback: ProgressCallback | None = None) -> Progress | None:
    """Drain a job generator, forwarding each event to ``callback``; returns the last event."""
    last = None
    for event in events:
        last = event
        if callback is not None:
            callback(event)
    return last


def drain(gen: Iterator[Progress | T]) -> T | None:
    """Run a job generator to the end and return its ``return`` value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
