"""The errors a user can fix. Every one subclasses UserError, the one class the command line catches and prints as a
single line (exit code 2); anything else is a bug and keeps its traceback.

The layers above the core (the command line, the demo, the bench) add their own subclasses; the core never imports
them.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message names the file or option, what is wrong, and the way out."""


class ArtifactError(UserError):
    """An artifact that is missing, incomplete, inconsistent or altered since export."""


class RunError(UserError):
    """A run that cannot start or go on: incompatible run directory, bad option, unwritable output."""


class InputError(UserError):
    """An input spec that names nothing usable; the run cannot start."""


def one_line(value: object, limit: int | None = None) -> str:
    """Any message or exception as one line (whitespace runs collapsed), cut at `limit` characters: library errors
    span lines and tracebacks, a user-facing error must not."""
    text = " ".join(str(value).split()) or (type(value).__name__ if isinstance(value, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def first_line(value: object, limit: int | None = None) -> str:
    """The first non-empty line of a message or exception, as one_line: libraries put the cause first and a stack
    of context after it."""
    lines = [line for line in str(value).splitlines() if line.strip()]
    return one_line(lines[0] if lines else value, limit)
