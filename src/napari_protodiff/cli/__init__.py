"""The ``protodiff`` command: the headless core's front door, one sub-command per stage.

Each stage's commands live in their own module and register on :data:`app`. Errors
caused by input (:class:`~napari_protodiff.core.errors.ProtodiffError`) print one
sentence on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import typer

from .._version import __version__

app = typer.Typer(
    name="protodiff",
    help="Prototype-guided diffusion for digital pathology: slides -> patches -> prototypes -> "
    "synthetic patches -> encoders -> evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"protodiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["PROTODIFF_DEBUG"] = "1"


from . import slides as _slides  # noqa: E402,F401  (registers info, tile)
from . import demo as _demo  # noqa: E402,F401  (registers demo)
from . import pretrain as _pretrain  # noqa: E402,F401  (registers pretrain)
from . import jobs as _jobs  # noqa: E402,F401  (registers jobs list/show)
from . import prototypes as _prototypes  # noqa: E402,F401  (registers embed, prototypes, prototype-map)
from . import diffusion as _diffusion  # noqa: E402,F401  (registers train-diffusion, sample, fidelity)
from . import evaluate as _evaluate  # noqa: E402,F401  (registers evaluate probe, evaluate mil)


def _forget_handled_interrupt() -> None:
    """Clear CPython's "unhandled KeyboardInterrupt" flag after the CLI has handled one.

    A KeyboardInterrupt raised inside code compiled from a string (``dataclasses`` and
    ``namedtuple`` build methods with ``exec``) sets that process-wide flag even when the
    exception is caught; under ``python -m`` (the Jobs widget, the tests) the interpreter then
    kills itself with SIGINT as it exits, replacing our exit status 130. Evaluating any string
    resets the flag (CPython's ``run_eval_code_obj``), so this is a no-op everywhere else.
    """
    exec("None", {})


@functools.cache
def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error class, wherever this typer takes click from (recent typer releases vendor it as
    ``typer._click``; older releases use the ``click`` package): both are caught."""
    classes: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``protodiff`` script."""
    try:
        return _main(argv)
    finally:
        _forget_handled_interrupt()


def _main(argv: list[str] | None) -> int:
    from ..core.errors import Cancelled, ProtodiffError
    from ..core.interrupts import noting_sigint

    try:
        # Not standalone: exit codes come back as the return value (typer turns Ctrl-C
        # into Exit(130), a command's ``raise typer.Exit(n)`` into n).
        with noting_sigint():
            rv = app(args=argv, prog_name="protodiff", standalone_mode=False)
    except ProtodiffError as exc:
        if os.environ.get("PROTODIFF_DEBUG"):
            raise
        typer.echo(f"protodiff: error: {exc}", err=True)
        return 130 if isinstance(exc, Cancelled) else 2
    except KeyboardInterrupt:
        rv = 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except _usage_errors() as exc:  # unknown command, missing argument, bad option value
        exc.show()
        return exc.exit_code
    if rv == 130:  # Ctrl-C (typer returns it as Exit(130); noting_sigint lets others through as KeyboardInterrupt)
        typer.echo("protodiff: interrupted; run the same command again to resume.", err=True)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
