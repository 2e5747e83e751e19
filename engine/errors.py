"""The exceptions that mean "the user can fix this": the CLI prints them as one line, without a traceback."""
from __future__ import annotations

from engine.artifact import ArtifactError


class RunError(Exception):
    """A run that cannot start: missing input, incompatible run directory, bad option."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ArtifactError, RunError]
    try:
        from engine.inputs import InputError
        errors.append(InputError)
    except ImportError:
        pass
    try:  # export's error class lives with TensorFlow code but imports none itself
        from export.errors import ExportError
        errors.append(ExportError)
    except ImportError:
        pass
    try:
        from bench.errors import BenchError
        errors.append(BenchError)
    except ImportError:
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()
