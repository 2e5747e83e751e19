"""The exceptions export raises for problems a user can fix; the command line prints each as a single line."""
from __future__ import annotations

from typing import Any

from gradcam_engine.engine.errors import UserError


class ExportError(UserError):
    """A model, layer, head or output location that cannot be exported, with the reason and the fix."""

    # Raised while tracing the fused tf.function: tell AutoGraph not to rewrite it into a multi-line
    # "in user code:" message, so the command line can still print it as one line.
    ag_pass_through = True


class PrecisionGateError(ExportError):
    """Reduced-precision files the precision gate refused. The artifact was written without them and is usable as
    is: `root` is where it lies, `manifest` its manifest (the refused files' verdicts included), `refused` their
    labels."""

    def __init__(self, message: str, root: Any, manifest: dict[str, Any], refused: list[str]) -> None:
        super().__init__(message)
        self.root = root
        self.manifest = manifest
        self.refused = refused
