"""The classifier head as a chain of layers with hand-written backward rules.

Why not let TensorFlow differentiate the head? Its gradient graph for a dynamic batch is full of shape plumbing
(`BroadcastGradientArgs`, `DynamicStitch`, `Reshape` to computed shapes) that tf2onnx converts wrongly or not at all.
The head of a classifier is a short chain of simple layers whose vector-Jacobian products are one line each, so we
write them as plain forward ops: the graph stays small, exports with any batch size and runs fast everywhere.
Each layer type registers one rule, in the manner of tf2onnx's op handlers; a layer without a rule is refused with
its name, never approximated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import keras
import tensorflow as tf

from gradcam_engine.export.errors import ExportError

Pullback = Callable[[tf.Tensor], tf.Tensor]


class Rule(Protocol):
    def __call__(self, layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]: ...


_RULES: dict[type, Rule] = {}


def head_rule(*layer_types: type) -> Callable[[Rule], Rule]:
    """Register the forward-and-pullback rule of a head layer type."""
    def register(rule: Rule) -> Rule:
        for t in layer_types:
            _RULES[t] = rule
        return rule
    return register


def supported_layers() -> list[str]:
    """Names of the head layer types export can differentiate, for error messages and the README."""
    return sorted(t.__name__ for t in _RULES)


def _v(variable: Any, dtype: tf.DType) -> tf.Tensor:
    """A layer weight in the compute dtype (weights stay float32 under a mixed-precision policy)."""
    t = tf.convert_to_tensor(variable)
    return t if t.dtype == dtype else tf.cast(t, dtype)


# --- activations: derivative written with the forward value where that is cheaper -----------------------------
_ACTIVATIONS: dict[str, Callable[[tf.Tensor], tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]]] = {
    "linear": lambda z: (z, lambda g: g),
    "relu": lambda z: (tf.nn.relu(z), lambda g: g * tf.cast(z > 0, g.dtype)),  # TF's ReluGrad: 0 at z == 0
    "sigmoid": lambda z: (lambda a: (a, lambda g: g * a * (1 - a)))(tf.sigmoid(z)),
    "tanh": lambda z: (lambda a: (a, lambda g: g * (1 - a * a)))(tf.tanh(z)),
}
# Final activations whose input is the class logit the Grad-CAM paper differentiates.
_SCORE_ACTIVATIONS = {"softmax": "pre-softmax logit", "sigmoid": "pre-sigmoid logit"}


def activation_name(fn: Any) -> str:
    """Keras activation function -> its registered name ("relu", "softmax", ...)."""
    return getattr(fn, "__name__", None) or str(fn)


def _activation(name: str, z: tf.Tensor, where: str) -> tuple[tf.Tensor, Pullback]:
    if name not in _ACTIVATIONS:
        raise ExportError(f"{where}: activation {name!r} inside the head is not supported; "
                          f"supported there: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name](z)


def _final_activation(layer: Any) -> str | None:
    """The softmax/sigmoid a head ends in, if the layer is one (Dense with it, or an activation layer)."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, (keras.layers.Dense, keras.layers.Activation)):
        name = activation_name(layer.activation)
        return name if name in _SCORE_ACTIVATIONS else None
    return None


# --- rules ----------------------------------------------------------------------------------------------------
@head_rule(keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
           keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
           keras.layers.ActivityRegularization, keras.layers.Identity, keras.layers.InputLayer)
def _identity(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    return x, lambda g: g  # identities at inference


@head_rule(keras.layers.GlobalAveragePooling2D)
def _global_average_pooling(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if layer.data_format != "channels_last":
        raise ExportError(f"head layer {layer.name!r}: only channels_last is supported")
    y = tf.reduce_mean(x, axis=[1, 2], keepdims=bool(layer.keepdims))  # (N, C) or (N, 1, 1, C)
    area = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)

    def pullback(g: tf.Tensor) -> tf.Tensor:
        g4 = g if layer.keepdims else g[:, tf.newaxis, tf.newaxis, :]
        return tf.broadcast_to(g4 / area, tf.shape(x))  # (N, h, w, C)
    return y, pullback


@head_rule(keras.layers.GlobalMaxPooling2D)
def _global_max_pooling(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if layer.data_format != "channels_last":
        raise ExportError(f"head layer {layer.name!r}: only channels_last is supported")
    y = tf.reduce_max(x, axis=[1, 2], keepdims=True)  # (N, 1, 1, C)
    hits = tf.cast(tf.equal(x, y), x.dtype)
    share = hits / tf.reduce_sum(hits, axis=[1, 2], keepdims=True)  # ties share the gradient, as TF's MaxGrad does

    def pullback(g: tf.Tensor) -> tf.Tensor:
        g4 = g if layer.keepdims else g[:, tf.newaxis, tf.newaxis, :]
        return share * g4
    return (y if layer.keepdims else y[:, 0, 0, :]), pullback


@head_rule(keras.layers.Flatten)
def _flatten(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ExportError(f"head layer {layer.name!r}: only channels_last is supported")
    size = 1
    for d in x.shape[1:]:
        if d is None:
            raise ExportError(f"head layer {layer.name!r}: Flatten needs a static feature-map size, got {x.shape}")
        size *= int(d)
    y = tf.reshape(x, [-1, size])  # -1 keeps the batch dynamic; a static size keeps tf2onnx's Reshape exact
    return y, lambda g: tf.reshape(g, [-1, *[int(d) for d in x.shape[1:]]])


@head_rule(keras.layers.Dense)
def _dense(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise ExportError(f"head layer {layer.name!r}: LoRA or quantized Dense layers are not supported")
    kernel = _v(layer.kernel, x.dtype)  # (in, out)
    z = tf.matmul(x, kernel) if x.shape.rank == 2 else tf.tensordot(x, kernel, axes=1)
    if layer.use_bias:
        z = z + _v(layer.bias, x.dtype)
    a, act_pullback = _activation(activation_name(layer.activation), z, f"head layer {layer.name!r}")

    def pullback(g: tf.Tensor) -> tf.Tensor:
        gz = act_pullback(g)
        return tf.matmul(gz, kernel, transpose_b=True) if gz.shape.rank == 2 else tf.tensordot(
            gz, tf.transpose(kernel), axes=1)
    return a, pullback


@head_rule(keras.layers.BatchNormalization)
def _batch_norm(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    if axis is None or axis not in (-1, x.shape.rank - 1):
        raise ExportError(f"head layer {layer.name!r}: BatchNormalization must normalise the last axis")
    inv = tf.math.rsqrt(_v(layer.moving_variance, x.dtype) + layer.epsilon)  # inference mode: moving statistics
    if layer.scale:
        inv = inv * _v(layer.gamma, x.dtype)
    y = (x - _v(layer.moving_mean, x.dtype)) * inv
    if layer.center:
        y = y + _v(layer.beta, x.dtype)
    return y, lambda g: g * inv


@head_rule(keras.layers.Activation)
def _activation_layer(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    return _activation(activation_name(layer.activation), x, f"head layer {layer.name!r}")


@head_rule(keras.layers.ReLU)
def _relu_layer(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if layer.max_value is not None or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise ExportError(f"head layer {layer.name!r}: only a plain ReLU (no max_value, slope or threshold)")
    return _ACTIVATIONS["relu"](x)


# --- the head ---------------------------------------------------------------------------------------------------
@dataclass
class HeadOutput:
    predictions: tf.Tensor  # (N, K) the model's own output
    logits: tf.Tensor       # (N, K) the scores differentiated
    pullback: Pullback      # d score / d logits  ->  d score / d feature maps


class KerasHead:
    """A head given as the ordered Keras layers between the target layer and the model output."""

    def __init__(self, layers: list[Any]):
        if not layers:
            raise ExportError("the target layer is the model output: there is no head to differentiate; "
                              "choose an earlier layer")
        for layer in layers:
            if type(layer) not in _RULES and not _final_activation(layer):
                raise ExportError(f"head layer {layer.name!r} ({type(layer).__name__}) is not supported for "
                                  f"export; supported head layers: {', '.join(supported_layers())}")
        self.layers = layers
        self.final = _final_activation(layers[-1])
        self.score = _SCORE_ACTIVATIONS.get(self.final or "", "model output")

    def __call__(self, fm: tf.Tensor) -> HeadOutput:
        x, pullbacks = fm, []
        last = len(self.layers) - 1
        logits = None
        for i, layer in enumerate(self.layers):
            if i == last and self.final:
                if isinstance(layer, keras.layers.Dense):  # the last Dense without its activation gives the logit
                    x, pb = _dense(_LinearView(layer), x)
                    pullbacks.append((pb, x.dtype))
                logits = tf.cast(x, tf.float32)  # softmax/sigmoid in float32, as mixed precision advises
                x = tf.nn.softmax(logits, axis=-1) if self.final == "softmax" else tf.sigmoid(logits)
                break
            x, pb = _RULES[type(layer)](layer, x)
            pullbacks.append((pb, x.dtype))
        if logits is None:  # no final softmax/sigmoid: the output is the score; float32 like the rest of the head
            x = logits = tf.cast(x, tf.float32)

        def pullback(g: tf.Tensor) -> tf.Tensor:
            for pb, dtype in reversed(pullbacks):
                g = pb(tf.cast(g, dtype) if g.dtype != dtype else g)
            return g
        return HeadOutput(predictions=x, logits=logits, pullback=pullback)


class _LinearView:
    """A Dense layer seen without its activation, to read the logit before a final softmax or sigmoid."""

    def __init__(self, layer: Any):
        self._layer = layer
        self.activation = keras.activations.linear

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


class CallableHead:
    """A head given as an opaque TensorFlow callable: differentiated by TensorFlow itself.

    The SavedModel is exact; the ONNX conversion of TensorFlow's gradient ops is checked numerically at export and
    refused when it disagrees, naming the fix (pass the head as Keras layers).
    """

    score = "model output"

    def __init__(self, fn: Callable[[tf.Tensor], tf.Tensor]):
        self.fn = fn

    def __call__(self, fm: tf.Tensor) -> HeadOutput:
        with tf.GradientTape() as tape:
            tape.watch(fm)
            predictions = self.fn(fm)
        return HeadOutput(predictions=predictions, logits=predictions,
                          pullback=lambda g: tape.gradient(predictions, fm, output_gradients=g))
