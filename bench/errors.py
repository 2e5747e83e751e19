"""The benchmark's own user-facing error: a bad option or a model the bench cannot use, said in one line."""
from __future__ import annotations

from gradcam_engine.engine.errors import UserError


class BenchError(UserError):
    """A benchmark that cannot run as asked; the message names the option or file and the fix."""
