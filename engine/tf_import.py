"""Importing TensorFlow the one way every part of the product does: quietly, or with a one-line error.

TensorFlow prints oneDNN and CUDA-probing chatter on stderr at import, ignoring log levels; a user who asked for a
summary line should not get a screenful. Lives in the core because the engine's TensorFlow backend and export both
need it; nothing here runs unless TensorFlow is asked for.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from gradcam_engine.engine.errors import UserError


class TensorFlowMissing(UserError):
    """TensorFlow (or Keras) is not installed, and the requested job needs it."""


def import_tensorflow(why: str = "this") -> Any:
    """The tensorflow module, imported without its start-up chatter (shown after all if the import fails); a missing
    TensorFlow is a one-line error naming the extra to install and what needed it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
                import keras  # noqa: F401
            except ImportError as exc:
                missing = exc.name or "tensorflow"
                raise TensorFlowMissing(f"{why} needs TensorFlow ({missing} is not installed): "
                                        "pip install 'gradcam-engine[export]'") from None
            except BaseException:
                os.dup2(saved, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    import tensorflow

    return tensorflow
