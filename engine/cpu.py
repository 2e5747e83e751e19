"""What this CPU can do natively: the instruction-set features that decide whether int8 and bf16 are fast here.

Read from /proc/cpuinfo (Linux names, e.g. `avx512_bf16`), else from numpy's own CPU dispatch table. Never from
TensorFlow: TensorFlow counts any AVX-512 CPU as bf16-capable, where oneDNN then emulates bf16 at a fraction of fp32's
speed (measured: 0.34x to 0.42x), and its check is not exposed to Python anyway.
"""
from __future__ import annotations

import functools

from gradcam_engine.engine.errors import RunError

BF16_FEATURES = ("avx512_bf16", "amx_bf16")          # either one: bf16 dot products in hardware
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products (VNNI) or tiles (AMX)
REPORTED_FEATURES = ("avx2", "avx512f", *INT8_FEATURES, *BF16_FEATURES, "amx_tile", "avx512_fp16")
# numpy's names for the features it knows (it has no AMX entries)
_NUMPY_NAMES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_vnni": "AVX512VNNI", "avx_vnni": "AVXVNNI",
                "avx512_bf16": "AVX512BF16", "avx512_fp16": "AVX512FP16"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags in Linux's spelling (lower case)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return frozenset(flag for flag, name in _NUMPY_NAMES.items() if features.get(name))


def cpu_features(names: tuple[str, ...] = REPORTED_FEATURES) -> dict[str, bool]:
    """Each named feature and whether this CPU has it, for reports (bench, run.json)."""
    flags = cpu_flags()
    return {name: name in flags for name in names}


def native_bf16() -> bool:
    """Whether bf16 matrix products run in hardware here (avx512_bf16 or AMX), the only case where bf16 pays."""
    return any(f in cpu_flags() for f in BF16_FEATURES)


def missing_bf16() -> str:
    """Why this CPU does not run bf16 natively ("" when it does)."""
    if native_bf16():
        return ""
    return (f"this CPU has neither {' nor '.join(BF16_FEATURES)}, so TensorFlow would emulate bf16 at a fraction of "
            "fp32's speed")


def require_native_bf16() -> None:
    """Refuse bf16 on a CPU that would only emulate it (slower than fp32), naming the missing feature."""
    if not native_bf16():
        raise RunError(f"--precision bf16: {missing_bf16()}; use fp32 here (or int8 with --backend onnx)")


def native_int8() -> bool:
    """Whether int8 dot products run in hardware here (VNNI or AMX): ONNX Runtime's fast and exact int8 path."""
    return any(f in cpu_flags() for f in INT8_FEATURES)


def missing_int8() -> str:
    """Why int8 does not pay on this CPU ("" when it does)."""
    if native_int8():
        return ""
    return (f"this CPU has none of {', '.join(INT8_FEATURES)} (int8 dot-product units), so ONNX Runtime's int8 "
            "either saturates (u8s8) or is slow (u8u8)")
