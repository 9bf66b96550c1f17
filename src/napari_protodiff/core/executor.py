"""Run independent tasks with dask and report each completion.

* ``workers <= 1`` and no scheduler: in this process, one task after another.
* ``workers > 1``: dask's local scheduler (threads by default, processes on request).
* ``scheduler="tcp://host:port"``: an existing dask.distributed cluster (its workers
  must see the same files, e.g. a shared file system).

:func:`run_tasks` is a generator of task results in completion order; closing it
(or a set :class:`CancelToken`) stops the remaining tasks.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Sequence

from .errors import Cancelled, ProtodiffError
from .progress import CancelToken


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int = 1,
    scheduler: str | None = None,
    processes: bool = False,
    cancel: CancelToken | None = None,
) -> Iterator[Any]:
    if not tasks:
        return
    if scheduler:
        yield from _distributed(fn, tasks, scheduler, cancel)
    elif workers <= 1:
        for t in tasks:
            if cancel is not None:
                cancel.raise_if_cancelled()
            yield fn(t)
    else:
        yield from _local(fn, tasks, workers, processes, cancel)


def _local(fn, tasks, workers, processes, cancel) -> Iterator[Any]:
    import dask
    from dask.callbacks import Callback

    stop = threading.Event()
    results: "queue.Queue[tuple[str, Any]]" = queue.Queue()

    def wrapped(t):
        out = fn(t)
        results.put(("result", out))
        return None

    class _Stopper(Callback):
        def _pretask(self, key, dsk, state):
            if stop.is_set() or (cancel is not None and cancel.cancelled):
                raise Cancelled("The job was cancelled.")

    delayed = [dask.delayed(wrapped, pure=False)(t) for t in tasks]

    def runner():
        try:
            with _Stopper():
                dask.compute(*delayed, scheduler="processes" if processes else "threads", num_workers=workers)
            results.put(("done", None))
        except BaseException as exc:  # forwarded to the consumer
            results.put(("error", exc))

    if processes:
        # Results cannot come back through a queue from other processes; collect them.
        def runner():  # noqa: F811
            try:
                with _Stopper():
                    outs = dask.compute(*[dask.delayed(fn, pure=False)(t) for t in tasks],
                                        scheduler="processes", num_workers=workers)
                for o in outs:
                    results.put(("result", o))
                results.put(("done", None))
            except BaseException as exc:
                results.put(("error", exc))

    th = threading.Thread(target=runner, name="protodiff-dask", daemon=True)
    th.start()
    try:
        while True:
            kind, val = results.get()
            if kind == "result":
                yield val
            elif kind == "done":
                break
            else:
                raise val
    finally:
        stop.set()
        th.join()


def _distributed(fn, tasks, address, cancel) -> Iterator[Any]:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ProtodiffError("dask.distributed is not installed; install 'distributed' to use --scheduler.") from exc
    try:
        client = Client(address, timeout="5s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ProtodiffError(f"Cannot reach the dask scheduler at {address} ({exc}).") from exc
    futures = client.map(fn, tasks, pure=False)
    try:
        for fut in as_completed(futures, loop=client.loop):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("The job was cancelled.")
            yield fut.result()
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        client.close()
