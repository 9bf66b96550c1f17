"""Signals as cancellation: SIGTERM (the Jobs widget's Cancel, a scheduler's stop) and SIGINT (Ctrl-C)
end a job as ``cancelled`` with exit status 130, never as a crash.

:func:`cancel_on_signals` installs the handlers for the length of a command; :func:`signals_held`
defers a signal over a few file operations that belong together; :func:`signal_received` tells
:meth:`RunDir.running <napari_protodiff.core.jobs.RunDir.running>` that whatever ended the body was
caused by a signal. That last point matters because Python turns a KeyboardInterrupt raised while a
C extension initialises (a lazy ``import scipy.optimize`` ...) into ``ImportError: initialization
failed``: the user pressed Ctrl-C, so the run is ``cancelled``, not ``failed``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .errors import Cancelled, ProtodiffError


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the job ends like Ctrl-C (a BaseException, so no ``except Exception`` swallows it)."""


# depth: nesting of signals_held; pending: a signal that arrived while held; received: the signal (if any)
# that arrived under the innermost cancel_on_signals. The handlers run in the main thread.
_STATE: dict = {"depth": 0, "pending": None, "received": None}


def _interrupt(signum: int) -> KeyboardInterrupt:
    import signal

    return Terminated("cancelled (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()


def _in_main_thread() -> bool:
    """Signal handlers can only be installed (and only run) in the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()


def signal_received() -> int | None:
    """The SIGTERM/SIGINT number that arrived under :func:`cancel_on_signals` (None if none did)."""
    return _STATE["received"]


def raise_if_signalled() -> None:
    """Raise, once more, the interruption of a signal that arrived but did not stop the job.

    Python runs a signal handler in whatever code the main thread is executing, and when that
    is a ``__del__`` method, a weakref or garbage-collector callback, the handler's exception
    is printed ("Exception ignored in ...") and dropped: the job would go on, with SIGTERM
    now ignored, until the Jobs widget's grace ran out and it was killed. Long jobs call this
    between steps (:func:`napari_protodiff.cli._common.run_with_progress` after every
    progress event), so such a job ends ``cancelled`` at its next step instead. A no-op
    without a signal, and inside :func:`signals_held` (which raises it when done)."""
    signum = _STATE["received"]
    if signum is not None and not _STATE["depth"]:
        raise _interrupt(signum)


@contextlib.contextmanager
def cancel_on_signals(resume: str = "the same command with --resume starts it again") -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` and SIGINT raises KeyboardInterrupt, so a run
    directory's ``running()`` marks the job ``cancelled``; leaving, either (or any error that follows a
    signal) becomes :class:`~napari_protodiff.core.errors.Cancelled` (the CLI: one sentence, exit 130).

    The first SIGTERM is the only one acted on (later ones are ignored, so the clean-up that
    follows is not interrupted). Installed only in the main thread; elsewhere a no-op.
    A stage that handles SIGTERM itself (pretraining stops after its current step) replaces
    the handler while it runs and restores it after. ``resume``: how to go on, for the message.
    """
    import signal

    if not _in_main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def on_signal(signum, frame):
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _STATE["received"] = _STATE["received"] or signum
        if _STATE["depth"]:  # inside a few file operations that belong together: raised when they are done
            _STATE["pending"] = _STATE["pending"] or signum
            return
        raise _interrupt(signum)

    outer = _STATE["received"]
    _STATE["received"] = None
    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    try:
        yield
    except BaseException as exc:  # the run is marked cancelled by now; say so in one sentence (exit 130)
        signum = signal_received()
        by_signal = isinstance(exc, KeyboardInterrupt) or signum is not None  # (or an error the signal caused)
        if not by_signal or isinstance(exc, (Cancelled, SystemExit)):
            raise
        how = "SIGTERM" if isinstance(exc, Terminated) or signum == signal.SIGTERM else "Ctrl-C"
        raise Cancelled(f"Cancelled ({how}); {resume}.") from None
    finally:
        _STATE["pending"] = None
        _STATE["received"] = outer
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT (under :func:`cancel_on_signals`) held back around a few file operations that belong
    together, and raised when they are done. (A flag, not a blocked signal mask: the kernel may hand a
    process's signal to any thread, e.g. a BLAS worker, and Python runs the handler in the main thread.)"""
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
    if _STATE["depth"] == 0 and _STATE["pending"] is not None:
        signum, _STATE["pending"] = _STATE["pending"], None
        raise _interrupt(signum)


@contextlib.contextmanager
def noting_sigint() -> Iterator[None]:
    """For a whole CLI command: Ctrl-C still raises KeyboardInterrupt, and is remembered, so that an error it
    causes on its way (an ImportError from an interrupted import) is raised as a KeyboardInterrupt (an
    interruption, not a crash); a :class:`ProtodiffError` (e.g. :class:`Cancelled`) passes unchanged.

    Only replaces Python's default SIGINT handler, in the main thread; an inherited "ignore" stays.
    """
    import signal

    if not _in_main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def on_sigint(signum, frame):
        _STATE["received"] = _STATE["received"] or signum
        raise KeyboardInterrupt

    outer = _STATE["received"]
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except Exception as exc:
        if _STATE["received"] is not None and not isinstance(exc, ProtodiffError):
            raise KeyboardInterrupt from exc  # Python reports an interrupted import as ImportError
        raise
    finally:
        signal.signal(signal.SIGINT, old)
        _STATE["received"] = outer
