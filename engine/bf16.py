"""bf16 on CPU: TensorFlow's oneDNN auto-mixed-precision, switched on around the calls that should use it.

`auto_mixed_precision_onednn_bfloat16` rewrites a graph's matrix products and convolutions to bf16 when the graph
runs, also for a SavedModel signature loaded before the switch. The option is process-wide; switching it back off
returns bit-identical fp32 results (each setting keeps its own optimized graph, so toggling costs nothing measurable),
so an fp32 and a bf16 session can share a process: every engine call on TensorFlow holds the mode it needs
(`tf_bfloat16` or `tf_float32`), and calls of the other mode wait, also from other threads. ONNX Runtime has no bf16
CPU kernels (Conv, Relu, MatMul, Add, Mul and MaxPool are NOT_IMPLEMENTED for bfloat16 in 1.31), so bf16 is a
TensorFlow-backend precision only.
"""
from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator

from gradcam_engine.engine.errors import RunError

OPTION = "auto_mixed_precision_onednn_bfloat16"


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels (TF_ENABLE_ONEDNN_OPTS=0 turns them, and with them bf16, off)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow build without the query: assume the default (on)
        return True


def onednn_off() -> str:
    """Why oneDNN bf16 cannot run in this process ("" when it can)."""
    if onednn_enabled():
        return ""
    if _onednn_opted_out():
        return "TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0), so it would run fp32"
    return ("TensorFlow's oneDNN kernels are off on this CPU (TensorFlow turns them off without AVX-512), "
            "so it would run fp32")


def _onednn_opted_out() -> bool:
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false")


def require_onednn() -> None:
    """Refuse bf16 when TensorFlow's oneDNN kernels are off: the option would silently do nothing."""
    if not onednn_enabled():
        fix = ("unset TF_ENABLE_ONEDNN_OPTS" if _onednn_opted_out()
               else "run fp32, or bf16 on a CPU with avx512_bf16 or AMX")
        raise RunError(f"--precision bf16: {onednn_off()}; {fix}")


def bf16_unavailable() -> str:
    """Why bf16 is not run here ("" where it is): no native bf16 on this CPU, or oneDNN off."""
    from gradcam_engine.engine.cpu import missing_bf16

    return missing_bf16() or onednn_off()


def require_bf16() -> None:
    """bf16 only where it pays and where TensorFlow really applies it; the error names what is missing."""
    from gradcam_engine.engine.cpu import require_native_bf16

    require_native_bf16()
    require_onednn()


class _Modes:
    """The oneDNN bf16 option is process-wide and read when a call starts: calls in one mode (bf16 or fp32) run
    together, a call in the other mode waits until they have finished, and calls arriving meanwhile queue behind it,
    so an fp32 call never runs under the bf16 rewrite (nor the reverse) and neither mode starves."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._mode: bool | None = None      # bf16 on (True) or off (False) while calls are active
        self._active = 0
        self._waiting = {True: 0, False: 0}
        self._before = False
        self._last = False                  # the mode that ran last: when both wait, the other one goes first
        self._held = threading.local()      # this thread's nesting depth, so a nested call re-enters its mode

    @contextmanager
    def hold(self, tf: Any, bf16: bool) -> Iterator[None]:
        depth = getattr(self._held, "depth", 0)
        if depth and self._mode != bf16:
            raise RuntimeError("a bf16 and an fp32 TensorFlow call cannot nest")
        with self._cond:
            if not depth:
                self._waiting[bf16] += 1
                while (self._mode != bf16 or self._waiting[not bf16]) if self._active else \
                        (self._waiting[not bf16] and self._last == bf16):
                    self._cond.wait()
                self._waiting[bf16] -= 1
            if not self._active:
                self._before = bool(tf.config.optimizer.get_experimental_options().get(OPTION, False))
                tf.config.optimizer.set_experimental_options({OPTION: bf16})
                self._mode = self._last = bf16
            self._active += 1
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            with self._cond:
                self._active -= 1
                if not self._active:
                    tf.config.optimizer.set_experimental_options({OPTION: self._before})
                    self._mode = None
                    self._cond.notify_all()


_MODES = _Modes()


def tf_bfloat16(tf: Any) -> AbstractContextManager[None]:
    """Run the enclosed TensorFlow calls with oneDNN bf16 auto-mixed-precision (restored afterwards)."""
    return _MODES.hold(tf, True)


def tf_float32(tf: Any) -> AbstractContextManager[None]:
    """Run the enclosed TensorFlow calls with oneDNN bf16 off: never while a bf16 call has it on."""
    return _MODES.hold(tf, False)
