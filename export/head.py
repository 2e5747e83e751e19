"""The classifier head as a chain of layers with hand-written backward rules.

Why not let TensorFlow differentiate the head? Its gradient graph for a dynamic batch is full of shape plumbing
(`BroadcastGradientArgs`, `DynamicStitch`, `Reshape` to computed shapes) that tf2onnx converts wrongly or not at all.
The head of a classifier is a short chain of simple layers whose vector-Jacobian products are one line each, so we
write them as plain forward ops: the graph stays small, exports with any batch size and runs fast everywhere.
Each layer kind registers one rule, in the manner of tf2onnx's op handlers, and the rule serves the Keras 3 and the
tf_keras class of that kind alike; a layer without a rule is refused with its name, never approximated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import tensorflow as tf

from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.frameworks import framework_of, is_layer, layer_kind

Pullback = Callable[[tf.Tensor], tf.Tensor]


class Rule(Protocol):
    def __call__(self, layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]: ...


_RULES: dict[str, Rule] = {}


def head_rule(*kinds: str) -> Callable[[Rule], Rule]:
    """Register the forward-and-pullback rule of a head layer kind: the built-in class name, which Keras 3 and
    tf_keras share (`"Dense"` covers keras.layers.Dense and tf_keras.layers.Dense)."""
    def register(rule: Rule) -> Rule:
        for kind in kinds:
            _RULES[kind] = rule
        return rule
    return register


def supported_layers() -> list[str]:
    """Names of the head layer kinds export can differentiate, for error messages and the README."""
    return sorted(_RULES)


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
# Final activations, as (forward, pullback given the forward value): with score "logit" their input is the class
# logit the Grad-CAM paper differentiates; with score "output" their output is, as the seed notebook does.
_FINAL: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]] = {
    "softmax": (lambda z: tf.nn.softmax(z, axis=-1),
                lambda p, g: p * (g - tf.reduce_sum(g * p, axis=-1, keepdims=True))),  # onehot: p_c (onehot - p)
    "sigmoid": (tf.sigmoid, lambda p, g: g * p * (1 - p)),
}
_SCORE_NAMES = {("logit", "softmax"): "pre-softmax logit", ("logit", "sigmoid"): "pre-sigmoid logit",
                ("output", "softmax"): "softmax probability (model output)",
                ("output", "sigmoid"): "sigmoid probability (model output)"}


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
    kind = layer_kind(layer)
    if kind == "Softmax":
        return "softmax"
    if kind in ("Dense", "Activation"):
        name = activation_name(layer.activation)
        return name if name in _FINAL else None
    return None


# --- rules ----------------------------------------------------------------------------------------------------
@head_rule("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
           "ActivityRegularization", "Identity", "InputLayer")
def _identity(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    return x, lambda g: g  # identities at inference


@head_rule("GlobalAveragePooling2D")
def _global_average_pooling(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    if layer.data_format != "channels_last":
        raise ExportError(f"head layer {layer.name!r}: only channels_last is supported")
    y = tf.reduce_mean(x, axis=[1, 2], keepdims=bool(layer.keepdims))  # (N, C) or (N, 1, 1, C)
    area = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)

    def pullback(g: tf.Tensor) -> tf.Tensor:
        g4 = g if layer.keepdims else g[:, tf.newaxis, tf.newaxis, :]
        return tf.broadcast_to(g4 / area, tf.shape(x))  # (N, h, w, C)
    return y, pullback


@head_rule("GlobalMaxPooling2D")
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


@head_rule("Flatten")
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


def _affine(layer: Any, x: tf.Tensor, activation: str) -> tuple[tf.Tensor, Pullback]:
    """A Dense layer with the given activation (its own, or "linear" to read the logit before a final one)."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):  # Keras 3 only
        raise ExportError(f"head layer {layer.name!r}: LoRA or quantized Dense layers are not supported")
    kernel = _v(layer.kernel, x.dtype)  # (in, out)
    z = tf.matmul(x, kernel) if x.shape.rank == 2 else tf.tensordot(x, kernel, axes=1)
    if layer.use_bias:
        z = z + _v(layer.bias, x.dtype)
    a, act_pullback = _activation(activation, z, f"head layer {layer.name!r}")

    def pullback(g: tf.Tensor) -> tf.Tensor:
        gz = act_pullback(g)
        return tf.matmul(gz, kernel, transpose_b=True) if gz.shape.rank == 2 else tf.tensordot(
            gz, tf.transpose(kernel), axes=1)
    return a, pullback


@head_rule("Dense")
def _dense(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    return _affine(layer, x, activation_name(layer.activation))


@head_rule("BatchNormalization")
def _batch_norm(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    # Keras 3 keeps the axis as given (-1); tf_keras stores a list of positive axes ([3]) once built.
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


@head_rule("Activation")
def _activation_layer(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    return _activation(activation_name(layer.activation), x, f"head layer {layer.name!r}")


@head_rule("ReLU")
def _relu_layer(layer: Any, x: tf.Tensor) -> tuple[tf.Tensor, Pullback]:
    # tf_keras stores max_value, negative_slope and threshold as 0-d arrays; float() reads both kinds.
    if layer.max_value is not None or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise ExportError(f"head layer {layer.name!r}: only a plain ReLU (no max_value, slope or threshold)")
    return _ACTIVATIONS["relu"](x)


_WEIGHTED = frozenset({"Dense", "BatchNormalization"})


# --- the head ---------------------------------------------------------------------------------------------------
@dataclass
class HeadOutput:
    predictions: tf.Tensor  # (N, K) the model's own output
    scores: tf.Tensor       # (N, K) what is differentiated: the logits, or the output itself (score "output")
    pullback: Pullback      # d score / d scores  ->  d score / d feature maps


class KerasHead:
    """A head given as the ordered Keras (or tf_keras) layers between the target layer and the model output."""

    def __init__(self, layers: list[Any], score: str = "logit"):
        if not layers:
            raise ExportError("the target layer is the model output: there is no head to differentiate; "
                              "choose an earlier layer")
        for layer in layers:
            kind = layer_kind(layer)
            if kind not in _RULES and not _final_activation(layer):
                raise ExportError(f"head layer {layer.name!r} ({type(layer).__name__}) is not supported for "
                                  f"export; supported head layers: {', '.join(supported_layers())}")
            if kind in _WEIGHTED and not layer.built:
                raise ExportError(f"head layer {layer.name!r} ({kind}) has no weights yet: build the head (call it "
                                  "on the backbone's output) and load its trained weights before exporting")
        self.layers = layers
        self.final = _final_activation(layers[-1])
        self.score_mode = score
        self.score = _SCORE_NAMES.get((score, self.final or ""), "model output")

    def __call__(self, fm: tf.Tensor) -> HeadOutput:
        x, pullbacks = fm, []
        last = len(self.layers) - 1
        logits = None
        for i, layer in enumerate(self.layers):
            if i == last and self.final:
                if layer_kind(layer) == "Dense":  # the last Dense without its activation gives the logit
                    x, pb = _affine(layer, x, "linear")
                    pullbacks.append((pb, x.dtype))
                logits = tf.cast(x, tf.float32)  # softmax/sigmoid in float32, as mixed precision advises
                x = _FINAL[self.final][0](logits)
                break
            x, pb = _RULES[layer_kind(layer)](layer, x)
            pullbacks.append((pb, x.dtype))
        if logits is None:  # no final softmax/sigmoid: the output is the score; float32 like the rest of the head
            x = logits = tf.cast(x, tf.float32)

        def to_feature_maps(g: tf.Tensor) -> tf.Tensor:
            for pb, dtype in reversed(pullbacks):
                g = pb(tf.cast(g, dtype) if g.dtype != dtype else g)
            return g
        if self.score_mode == "output" and self.final:
            output, final_pullback = x, _FINAL[self.final][1]
            return HeadOutput(predictions=x, scores=x, pullback=lambda g: to_feature_maps(final_pullback(output, g)))
        return HeadOutput(predictions=x, scores=logits, pullback=to_feature_maps)


class CallableHead:
    """A head given as an opaque TensorFlow callable: differentiated by TensorFlow itself.

    TensorFlow's gradient graph of a head over a dynamic batch is shape plumbing that tf2onnx converts wrongly for
    some heads (`Reshape` to computed shapes after a global pooling). Two ways to write it, tried in this order by
    export until one gives an ONNX graph that ONNX Runtime runs and that agrees with TensorFlow:
    - "per_image": inside a `tf.map_fn` over the batch, each image's gradient is traced with a static batch of one,
      whose shapes are constants; the loop becomes an ONNX `Loop`, and the batch stays dynamic;
    - "batched": one gradient over the whole batch (what tf2onnx converts for reshape-and-matmul heads, whose
      per-image loop body its shape inference gets wrong).
    The forward pass (the predictions) runs batched either way. Its score is the callable's output: no logit to split
    off.
    """

    score = "model output"
    score_mode = "output"
    STRATEGIES = ("per_image", "batched")

    def __init__(self, fn: Callable[[tf.Tensor], tf.Tensor], strategy: str = "per_image"):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose {', '.join(self.STRATEGIES)}")
        self.fn = fn
        self.strategy = strategy

    def with_strategy(self, strategy: str) -> "CallableHead":
        """The same head, its gradient written the other way."""
        return CallableHead(self.fn, strategy)

    def __call__(self, fm: tf.Tensor) -> HeadOutput:
        predictions = self.fn(fm)
        if not isinstance(predictions, tf.Tensor) or predictions.shape.rank != 2:
            raise ExportError(f"the head callable returned {type(predictions).__name__} "
                              f"{getattr(predictions, 'shape', '')}; it must return one (N, K) tensor of scores")

        def one_image(args: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
            fm1, g1 = args[0][tf.newaxis], args[1][tf.newaxis]   # (1, h, w, C), (1, K)
            with tf.GradientTape() as tape:
                tape.watch(fm1)
                out = self.fn(fm1)
            return tape.gradient(out, fm1, output_gradients=tf.cast(g1, out.dtype))[0]

        def pullback(g: tf.Tensor) -> tf.Tensor:
            if self.strategy == "batched":
                with tf.GradientTape() as tape:
                    tape.watch(fm)
                    out = self.fn(fm)
                return tape.gradient(out, fm, output_gradients=tf.cast(g, out.dtype))
            return tf.map_fn(one_image, (fm, g), fn_output_signature=tf.TensorSpec(fm.shape[1:], fm.dtype))
        return HeadOutput(predictions=predictions, scores=predictions, pullback=pullback)


def head_from(head: Any, score: str = "logit") -> KerasHead | CallableHead:
    """The head of a (backbone, head) pair. Keras or tf_keras layers (a list, one layer, a Sequential or functional
    model) are differentiated by the rules above; any other callable (a subclassed model too) by TensorFlow."""
    if isinstance(head, (list, tuple)):
        bad = [f"item {i} ({type(h).__name__})" for i, h in enumerate(head) if not is_layer(h)]
        if bad:
            raise ExportError(f"a head given as a list must hold Keras or tf_keras layers; {', '.join(bad)} is not "
                              "one (pass other code as one callable instead)")
        return KerasHead([inner for h in head for inner in _layers_of(h)], score)
    if is_layer(head) and (not _is_model_class(head) or _walkable(head)):
        return KerasHead(_layers_of(head), score)
    if callable(head):
        return CallableHead(head)
    raise ExportError(f"head must be Keras or tf_keras layers, a Keras model or a callable, got {type(head).__name__}")


def _is_model_class(obj: Any) -> bool:
    fw = framework_of(obj)
    return fw is not None and isinstance(obj, fw.module.Model)


def _walkable(model: Any) -> bool:
    fw = framework_of(model)
    return fw is not None and (fw.is_sequential(model) or fw.is_model(model))


def _layers_of(obj: Any) -> list[Any]:
    """A layer as itself; a Sequential or functional model as its chain of layers."""
    from gradcam_engine.export.locate import layer_chain

    return layer_chain(obj) if _is_model_class(obj) else [obj]
