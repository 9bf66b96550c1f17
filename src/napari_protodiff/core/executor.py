"""Run independent tasks with dask and report each completion.

* ``workers <= 1`` and no scheduler: in this process, one task after another.
* ``workers > 1``: worker processes by default: forked by :func:`warm_up` when this
  process runs no other Python thread (a script, the CLI: they start at once with what
  it has imported), else started from a clean fork server that has already imported
  the task's module (so they start warm and safely even from a process with threads,
  such as napari); ``processes=False``: dask's local threaded scheduler. Tiling is mostly GIL-free (JPEG decoding, compression, file writes), but
  on a busy machine threads still stall each other on the GIL whenever the one holding
  it is descheduled; processes do not.
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
    processes: bool | None = None,
    cancel: CancelToken | None = None,
    preload: Sequence[str] = (),
) -> Iterator[Any]:
    """Run ``fn`` on every task; yield the results in completion order.

    ``processes``: for ``workers > 1``, worker processes (``None`` or ``True``) or threads
    (``False``). ``fn`` must then be importable (module level) and tasks picklable.
    ``preload``: more modules for the fork server to import once (beside ``fn``'s own),
    e.g. what ``fn`` imports lazily, so that each worker does not import them again.
    """
    if not tasks:
        return
    if scheduler:
        yield from _distributed(fn, tasks, scheduler, cancel)
    elif workers <= 1:
        for t in tasks:
            if cancel is not None:
                cancel.raise_if_cancelled()
            yield fn(t)
    elif processes is False:
        yield from _local(fn, tasks, workers, False, cancel)
    else:
        yield from _processes(fn, tasks, workers, cancel, preload)


def _process_context(fn, preload: Sequence[str] = ()):
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    module = getattr(fn, "__module__", None)
    modules = ([module] if module and module != "__main__" else []) + [m for m in preload if m != module]
    if modules:
        ctx.set_forkserver_preload(modules)  # used when the server starts (once a process)
    return ctx


def _worker_init() -> None:
    """In each worker process: SIGINT and SIGTERM are ignored. Ctrl-C in a terminal, or a
    scheduler's SIGTERM to the whole process group, reaches the workers too; the process
    that hands out the tasks acts on it (stops handing out tasks, keeps what is done, see
    ``core.interrupts``) and the workers finish the task in hand and exit with the pool,
    instead of each dying mid-task with a traceback (a fork inherits the parent's handlers)."""
    import signal

    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


#: Worker pools forked by :func:`warm_up`, waiting for :func:`run_tasks` (by worker count).
_WARM: dict[int, Any] = {}


def _can_fork() -> bool:
    """Can worker processes be forked from this process right now? Only on Linux and only
    while this process runs no other Python thread: a fork copies every lock, held or not,
    but only the forking thread. (Native threads of numerical libraries, such as OpenBLAS's
    pool, reset themselves in the child.)"""
    import multiprocessing as mp
    import sys

    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() and threading.active_count() == 1


def warm_up(fn: Callable[[Any], Any], workers: int = 1, scheduler: str | None = None,
            processes: bool | None = None, preload: Sequence[str] = ()) -> None:
    """Start what :func:`run_tasks` with these arguments will need, now, so that it overlaps
    the caller's own set-up (the next :func:`run_tasks` with as many workers uses it).

    In a process with no other Python thread (a script, the CLI) the workers are forked now:
    they start at once with everything this process has imported. Otherwise (napari, or
    any process with threads) the fork server is started in the background, with ``fn``'s
    module and ``preload`` imported once, and the workers fork from it when the tasks come.
    Call :func:`release_warm` if the tasks never come."""
    if workers <= 1 or scheduler or processes is False:
        return
    if _can_fork() and workers not in _WARM:
        import importlib
        import multiprocessing as mp
        import sys
        import warnings
        from concurrent.futures import ProcessPoolExecutor

        for m in preload:  # imported once, here, instead of in every worker
            try:
                importlib.import_module(m)
            except ImportError:
                pass

        for stream in (sys.stdout, sys.stderr):  # what a child flushes at its exit must not be printed twice
            try:
                stream.flush()
            except Exception:  # pragma: no cover - a closed or odd stream
                pass
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_worker_init)
        with warnings.catch_warnings():
            # Python >= 3.12 warns about any other OS thread (OpenBLAS's, see _can_fork)
            warnings.simplefilter("ignore", DeprecationWarning)
            pool.submit(int).result()  # a fork pool starts all its workers at the first task
        _WARM[workers] = pool
        return
    ctx = _process_context(fn, preload)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except Exception:  # pragma: no cover - it will be started (or fail clearly) later
            pass


def release_warm() -> None:
    """Shut down worker pools that :func:`warm_up` started and no :func:`run_tasks` used."""
    while _WARM:
        _WARM.popitem()[1].shutdown(wait=True, cancel_futures=True)


def _processes(fn, tasks, workers, cancel, preload=()) -> Iterator[Any]:
    """A pool of ``workers`` processes; at most two tasks a worker are queued at a time, so
    a cancel (checked between tasks) stops the run after the tasks already running."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    todo = list(tasks)[::-1]
    pool = _WARM.pop(workers, None)
    if pool is None:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_process_context(fn, preload),
                                   initializer=_worker_init)
    running: set = set()
    with pool:
        try:
            while todo or running:
                while todo and len(running) < 2 * workers:
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    running.add(pool.submit(fn, todo.pop()))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in running:
                f.cancel()


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
