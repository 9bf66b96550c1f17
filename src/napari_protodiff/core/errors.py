"""User-facing errors: one clear sentence naming the file and what is wrong."""

from __future__ import annotations


class ProtodiffError(Exception):
    """An error caused by the user's input (file, parameter, store state).

    Its message is a single sentence meant to be shown as is: on stderr by the CLI
    (no traceback unless asked for) and as a notification in napari.
    """


class SlideError(ProtodiffError):
    """A slide cannot be opened or used."""


class StoreError(ProtodiffError):
    """A patch store is missing, malformed, or in a state that forbids the operation."""


class Cancelled(ProtodiffError):
    """The user cancelled a running job."""


def validation_message(exc: Exception) -> str:
    """A config validation error (pydantic) as the one sentence the CLI and widgets show."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    e = errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ()))
    msg = str(e.get("msg", exc))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg if msg.startswith("The ") else f"Invalid {loc or 'parameter'}: {msg}"
