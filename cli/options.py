"""Helpers that keep option values and defaults in the core: the command line reads them, never restates them."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def default(cls: type, name: str) -> Any:
    """The default of a dataclass field, so a flag's default is the library's."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()  # type: ignore[misc]


def size(text: str) -> tuple[int, int]:
    """"224x224" or "224" -> (height, width)."""
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (for example 224x224)") from None


def listed(values: list[str] | None, cast: type = str) -> tuple | None:
    """`--x a b`, `--x a,b` or both -> a tuple; None when the flag was not given."""
    if values is None:
        return None
    return tuple(cast(v) for item in values for v in item.split(",") if v)
