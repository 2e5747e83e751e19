"""The benchmark's own user-facing error: a bad option or a model the bench cannot use, said in one line."""
from __future__ import annotations


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message names the option or file and the fix."""
