"""CAM methods: each one small function from the target layer's feature maps and gradients to a raw map.

Every method reads only what the fused graph already has in hand, A = feature maps and G = d score / d A, both
float32 [N, h, w, C]; so any set of them comes out of the same pass, batched, in one graph. A method is registered with
`@cam_method("name")` and returns its raw map [N, h, w]; `cam_maps` then applies the one normalisation all share:
ReLU, then divide by the per-image max (0 where the max is 0). The formulas follow pytorch-grad-cam 1.5.7; sums run
over the h x w grid. Adding a method is one function here, plus its numpy formula beside the reference
(bench/contenders/reference.py), which the tests hold the graph to.

TensorFlow is imported on first use, not at import: the command line lists the registered names without loading it.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from gradcam_engine.export.errors import ExportError


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


tf: Any = _Lazy("tensorflow")

Formula = Callable[[Any, Any], Any]  # (feature maps A [N, h, w, C], gradients G [N, h, w, C]) -> raw map [N, h, w]
_METHODS: dict[str, Formula] = {}


def cam_method(name: str) -> Callable[[Formula], Formula]:
    """Register a CAM method under the name `--methods` takes (and the results column cam_<name> carries)."""
    def register(fn: Formula) -> Formula:
        if not name.isidentifier() or name != name.lower() or name in ("height", "width") or name in _METHODS:
            raise ValueError(f"bad or duplicate CAM method name {name!r}")
        _METHODS[name] = fn
        return fn
    return register


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def summary(name: str) -> str:
    """A method's one-line description: the first line of its docstring."""
    return (_METHODS[name].__doc__ or name).strip().splitlines()[0]


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods as a tuple, or one line naming what is wrong: none, unknown or repeated names."""
    methods = tuple(methods)
    known = ", ".join(method_names())
    if not methods:
        raise ExportError(f"no CAM method given; choose one or more of {known}")
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise ExportError(f"unknown CAM method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"known methods: {known}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ExportError(f"CAM method {', '.join(map(repr, repeated))} given more than once")
    return methods


def normalise(raw: Any) -> Any:
    """ReLU, then divide by the per-image max; 0 where the map is all <= 0 (nothing contributes)."""
    cam = tf.nn.relu(raw)
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)                          # (N, 1, 1)
    safe = tf.where(peak > 0, peak, tf.ones_like(peak))
    return tf.where(peak > 0, cam / safe, tf.zeros_like(cam))


def cam_maps(feature_maps: Any, gradients: Any, methods: Sequence[str]) -> list[Any]:
    """Each method's normalised map [N, h, w], in the order given."""
    maps = []
    for name in check_methods(methods):
        with tf.name_scope(name):
            maps.append(normalise(_METHODS[name](feature_maps, gradients)))
    return maps


def _grid(A: Any) -> tuple[Any, Any, Any]:
    """(h, w, C) of feature maps [N, h, w, C]: static ints where known, so reshapes stay exact in ONNX."""
    return tuple(A.shape[i] if A.shape[i] is not None else tf.shape(A)[i] for i in (1, 2, 3))  # type: ignore


def _weighted_sum(A: Any, weights: Any) -> Any:
    """sum_c w_c A_c for channel weights [N, C], as one matrix-vector product per image: one read of A, where an
    element-wise product and a sum would write and read a tensor as large as A (this is what the methods cost)."""
    h, w, c = _grid(A)
    return tf.reshape(tf.matmul(tf.reshape(A, [-1, h * w, c]), weights[:, :, tf.newaxis]), [-1, h, w])


# --- the methods, in the order the command line lists them ------------------------------------------------------
@cam_method("gradcam")
def gradcam(A: Any, G: Any) -> Any:
    """Grad-CAM: w_c = mean_hw G; map = sum_c w_c A_c. Selvaraju et al., ICCV 2017.

    Written as the seed computes it (weighted channel MEAN, which the normalisation makes equal to the sum), so the
    default graph and its CAMs are exactly those of every earlier release.
    """
    weights = tf.reduce_mean(G, axis=[1, 2])                                       # (N, C)
    return tf.reduce_mean(A * weights[:, tf.newaxis, tf.newaxis, :], -1)           # (N, h, w)


@cam_method("gradcampp")
def gradcampp(A: Any, G: Any) -> Any:
    """Grad-CAM++: a = G^2 / (2G^2 + sum_hw A * G^3 + 1e-6); w_c = sum_hw relu(G) a. Chattopadhay et al., WACV 2018.

    relu(G) a is 0 wherever G <= 0, so it is computed with P = relu(G) in place of G: the same value where G > 0,
    exactly 0 elsewhere (a = 0 where G = 0 is pytorch-grad-cam's rule), and no 0 * inf where a's denominator
    vanishes at a negative gradient; fewer passes over [N, h, w, C] tensors than a mask would take.
    """
    P = tf.nn.relu(G)
    p2 = P * P
    total = tf.reduce_sum(A, axis=[1, 2])[:, tf.newaxis, tf.newaxis, :]             # sum_hw A, (N, 1, 1, C)
    weights = tf.reduce_sum(p2 * P / (p2 * (2.0 + total * P) + 1e-6), axis=[1, 2])  # sum_hw relu(G) a, (N, C)
    return _weighted_sum(A, weights)


@cam_method("xgradcam")
def xgradcam(A: Any, G: Any) -> Any:
    """XGrad-CAM: w_c = sum_hw G A / (sum_hw A + 1e-7); map = sum_c w_c A_c. Fu et al., BMVC 2020."""
    weights = tf.reduce_sum(G * A, axis=[1, 2]) / (tf.reduce_sum(A, axis=[1, 2]) + 1e-7)  # (N, C)
    return _weighted_sum(A, weights)


@cam_method("hirescam")
def hirescam(A: Any, G: Any) -> Any:
    """HiResCAM: map = sum_c G A, element-wise, no pooling. Draelos & Carin, arXiv:2011.08891, 2020."""
    return tf.reduce_sum(G * A, axis=-1)


@cam_method("layercam")
def layercam(A: Any, G: Any) -> Any:
    """LayerCAM: map = sum_c relu(G) A, element-wise. Jiang et al., IEEE TIP 2021."""
    return tf.reduce_sum(tf.nn.relu(G) * A, axis=-1)


EIGENCAM = "eigencam"
# Every path applies K^256 to one of K's columns, so the leading direction wins by (l2/l1)^256: 2e-6 at a 5% gap.
EIGEN_SQUARINGS = 8         # M <- M^2 eight times (2^8 = 256), 2m^3 flops each
EIGEN_SQUARING_SIZE = 256   # beyond this size m, power steps are cheaper
EIGEN_POWER_STEPS = 255     # then: K's largest column, then v <- K v, 2m^2 flops each
EIGEN_STEPS_PER_UNIT = 8    # power steps between normalisations (one small matmul each: fewer graph nodes)


def eigen_plan(cells: Any, channels: Any) -> tuple[str, int, int]:
    """How Eigen-CAM finds the direction for a grid of `cells` positions and `channels` channels: on which side the
    Gram matrix is formed (the smaller: "cells" X X^T or "channels" X^T X), then squarings and power steps."""
    static = isinstance(cells, int) and isinstance(channels, int)
    side = "channels" if static and channels < cells else "cells"
    size = min(cells, channels) if static else None
    squarings = EIGEN_SQUARINGS if size is not None and size <= EIGEN_SQUARING_SIZE else 0
    return side, squarings, 0 if squarings else EIGEN_POWER_STEPS


@cam_method(EIGENCAM)
def eigencam(A: Any, G: Any) -> Any:
    """Eigen-CAM: centred A (hw x C) projected on its first principal direction. Muhammad & Yeasin, IJCNN 2020.

    Uses no gradient; the sign, arbitrary in a principal direction, is chosen to correlate positively with sum_c A.
    ONNX has no SVD. The projection X v1 (= s1 u1) comes from the leading eigenvector of the smaller Gram matrix:
    K = X X^T (hw x hw, 49 x 49 for ResNet50) gives u1; X^T X (C x C, when there are fewer channels than cells)
    gives v1. Both found as K^256 applied to K's largest column, by 8 squarings up to m = 256, by 255 power steps
    beyond: the error shrinks as (l2/l1)^256, under 1e-4 on the map where the top two eigenvalues differ by 5% or
    more (closer, the direction itself is ill-defined); the normalisation removes the scale. A constant feature map
    (K = 0) gives an all-zero map.
    """
    h, w, c = _grid(A)
    x = tf.reshape(A, [-1, h * w, c])                                              # (N, hw, C)
    x = x - tf.reduce_mean(x, axis=1, keepdims=True)                               # each channel centred over the grid
    side, squarings, steps = eigen_plan(h * w, c)
    if side == "cells":
        u = _leading_eigenvector(tf.matmul(x, x, transpose_b=True), squarings, steps)  # u1, (N, hw)
    else:
        v = _leading_eigenvector(tf.matmul(x, x, transpose_a=True), squarings, steps)  # v1, (N, C)
        u = tf.reduce_sum(x * v[:, tf.newaxis, :], axis=-1)                        # X v1, (N, hw)
    total = tf.reshape(tf.reduce_sum(A, axis=-1), [-1, h * w])                     # sum_c A, (N, hw)
    total = total - tf.reduce_mean(total, axis=1, keepdims=True)
    agree = tf.reduce_sum(u * total, axis=1, keepdims=True)                        # sign of the correlation
    return tf.reshape(tf.where(agree < 0, -u, u), [-1, h, w])


def _leading_eigenvector(gram: Any, squarings: int, steps: int) -> Any:
    """Unit leading eigenvector [N, m] of symmetric PSD matrices [N, m, m]; all zero for a zero matrix."""
    m = gram
    for _ in range(squarings):                      # scaled to max |entry| 1 first: no overflow, K^(2^k) up to scale
        m = _scaled(m)
        m = tf.matmul(m, m)
    # Start from the column with the largest norm: m ~ e1 e1^T, so that column is e1 times its largest |entry| (a fixed
    # vector would not do: on the cells side, e1 is orthogonal to the all-ones vector, the columns of X being centred).
    size = m.shape[-1] if m.shape[-1] is not None else tf.shape(m)[-1]
    pick = tf.one_hot(tf.argmax(tf.reduce_sum(m * m, axis=1), axis=-1), size, dtype=m.dtype)  # (N, m)
    v = _unit(tf.reduce_sum(m * pick[:, tf.newaxis, :], axis=-1))
    if not steps:
        return v
    # K / trace(K) has its eigenvalues in [0, 1], the largest >= 1/m: a few steps unnormalised cannot overflow, nor
    # underflow float32 (m^-8 at m = 361 is 3e-21).
    trace = tf.reduce_sum(tf.linalg.diag_part(gram), axis=-1)[:, tf.newaxis, tf.newaxis]
    k = gram / tf.where(trace > 0, trace, tf.ones_like(trace))
    x = v[:, :, tf.newaxis]                                                         # (N, m, 1)
    for step in range(1, steps + 1):
        x = tf.matmul(k, x)                                                         # v <- K v
        if step % EIGEN_STEPS_PER_UNIT == 0 or step == steps:
            x = _unit(x, axis=1)
    return x[:, :, 0]


def _scaled(m: Any) -> Any:
    scale = tf.reduce_max(tf.abs(m), axis=[1, 2], keepdims=True)
    return m / tf.where(scale > 0, scale, tf.ones_like(scale))


def _unit(v: Any, axis: int = -1) -> Any:
    norm = tf.sqrt(tf.reduce_sum(v * v, axis=axis, keepdims=True))
    return v / tf.where(norm > 0, norm, tf.ones_like(norm))
