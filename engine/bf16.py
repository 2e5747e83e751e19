"""bf16 on CPU: TensorFlow's oneDNN auto-mixed-precision, switched on around the calls that should use it.

`auto_mixed_precision_onednn_bfloat16` rewrites a graph's matrix products and convolutions to bf16 when the graph
runs, also for a SavedModel signature loaded before the switch. The option is process-wide; switching it back off
returns bit-identical fp32 results (each setting keeps its own optimized graph, so toggling costs nothing measurable),
so an fp32 and a bf16 session can share a process. ONNX Runtime has no bf16 CPU kernels (Conv, Relu, MatMul, Add,
Mul and MaxPool are NOT_IMPLEMENTED for bfloat16 in 1.31), so bf16 is a TensorFlow-backend precision only.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from gradcam_engine.engine.errors import RunError

OPTION = "auto_mixed_precision_onednn_bfloat16"
_LOCK = threading.RLock()


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels (TF_ENABLE_ONEDNN_OPTS=0 turns them, and with them bf16, off)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow build without the query: assume the default (on)
        return True


def require_onednn() -> None:
    """Refuse bf16 when TensorFlow's oneDNN kernels are off: the option would silently do nothing."""
    if not onednn_enabled():
        raise RunError("--precision bf16: TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0), so it would "
                       "run fp32; unset TF_ENABLE_ONEDNN_OPTS")


@contextmanager
def tf_bfloat16(tf: Any) -> Iterator[None]:
    """Run the enclosed TensorFlow calls with oneDNN bf16 auto-mixed-precision, then restore the previous setting."""
    with _LOCK:
        before = bool(tf.config.optimizer.get_experimental_options().get(OPTION, False))
        tf.config.optimizer.set_experimental_options({OPTION: True})
        try:
            yield
        finally:
            tf.config.optimizer.set_experimental_options({OPTION: before})


def require_bf16() -> None:
    """bf16 only where it pays and where TensorFlow really applies it; the error names what is missing."""
    from gradcam_engine.engine.cpu import require_native_bf16

    require_native_bf16()
    require_onednn()
