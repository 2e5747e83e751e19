"""Find the target layer in a Keras model, nested sub-models included, and split the model around it.

The split gives a backbone (images -> target feature maps) built from the model's own layers, and the head as the
ordered list of layers from those feature maps to the output, which `export.head` knows how to differentiate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from gradcam_engine.export.errors import ExportError


@dataclass
class Split:
    """A model cut at its target layer."""

    layer_path: str          # "resnet50/conv5_block3_out"
    backbone: keras.Model    # images -> feature maps (N, h, w, C)
    head: list[Any]          # layers from the feature maps to the model output, in call order


def _is_model(op: Any) -> bool:
    return isinstance(op, keras.Model) and hasattr(op, "outputs") and bool(getattr(op, "outputs", None))


def _producer(tensor: Any) -> tuple[Any, list[Any]]:
    """The operation that produced a symbolic tensor, and that call's input tensors."""
    history = tensor._keras_history
    node = history.operation._inbound_nodes[history.node_index]
    return history.operation, list(node.input_tensors)


def _single_output(model: Any) -> Any:
    if len(model.outputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.outputs)} outputs; export needs a single "
                          "classification output")
    return model.outputs[0]


def candidates(model: Any, prefix: str = "") -> list[str]:
    """Paths of every layer with a 4-D output, nested sub-models included, in model order."""
    found = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if _is_model(layer):
            found += candidates(layer, prefix=f"{path}/")
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if rank == 4 and not isinstance(layer, keras.layers.InputLayer):
            found.append(path)
    return found


def _auto_path(model: Any) -> list[str]:
    """Walk back from the output to the first 4-D output; descend into a nested model that produced it."""
    tensor = _single_output(model)
    while True:
        op, inputs = _producer(tensor)
        if isinstance(op, keras.layers.InputLayer) or not inputs:
            raise ExportError(f"model {model.name!r} has no layer with a 4-D output (N, h, w, C) before its head; "
                              "Grad-CAM needs convolutional feature maps")
        if len(tensor.shape) == 4:
            if _is_model(op) and len(_single_output(op).shape) == 4:
                return [op.name, *_auto_path_inner(op)]
            return [op.name]
        if len(inputs) != 1:
            raise ExportError(f"cannot find the target layer automatically: layer {op.name!r} has {len(inputs)} "
                              "inputs; name the layer with --layer")
        tensor = inputs[0]


def _auto_path_inner(model: Any) -> list[str]:
    op, _ = _producer(_single_output(model))
    if _is_model(op):
        return [op.name, *_auto_path_inner(op)]
    return [op.name]


def _resolve(model: Any, names: list[str]) -> list[Any]:
    layers, current = [], model
    for i, name in enumerate(names):
        try:
            layer = current.get_layer(name)
        except (ValueError, AttributeError):
            layer = None
        if layer is None or (i < len(names) - 1 and not _is_model(layer)):
            near = candidates(model)
            listing = ", ".join(near[-12:]) if near else "none"
            raise ExportError(f"layer {'/'.join(names)!r} not found in model {model.name!r}; layers with 4-D "
                              f"outputs (last {min(12, len(near))}): {listing}")
        layers.append(layer)
        current = layer
    if len(layers[-1].output.shape) != 4:
        raise ExportError(f"layer {'/'.join(names)!r} has output shape {tuple(layers[-1].output.shape)}; "
                          "Grad-CAM needs a 4-D (N, h, w, C) feature map")
    return layers


def _head_chain(model: Any, path: list[Any]) -> list[Any]:
    """Layers from path[-1]'s output to model's output, descending through the nested models on the path."""
    chain: list[Any] = []
    tensor = _single_output(model)
    while True:
        op, inputs = _producer(tensor)
        if op is path[0]:
            if len(path) > 1:
                chain = _head_chain(op, path[1:]) + chain
            return chain
        if isinstance(op, keras.layers.InputLayer) or not inputs:
            raise ExportError(f"layer {path[0].name!r} is not on the path from the input to the output of "
                              f"{model.name!r}")
        if len(inputs) != 1:
            raise ExportError(f"the head after the target layer is not a single chain: {op.name!r} "
                              f"({type(op).__name__}) takes {len(inputs)} inputs; choose a later target layer")
        chain.insert(0, op)
        tensor = inputs[0]


def layer_chain(model: Any) -> list[Any]:
    """The layers of a single-chain model (a head given as a Keras model), input to output."""
    chain: list[Any] = []
    tensor = _single_output(model)
    while True:
        op, inputs = _producer(tensor)
        if isinstance(op, keras.layers.InputLayer) or not inputs:
            return chain
        if len(inputs) != 1:
            raise ExportError(f"head model {model.name!r} is not a single chain: {op.name!r} takes "
                              f"{len(inputs)} inputs")
        chain.insert(0, op)
        tensor = inputs[0]


def _backbone(model: Any, path: list[Any]) -> keras.Model:
    """A model from `model`'s inputs to path[-1]'s output, re-using the same layers (and weights)."""
    inputs = model.inputs
    top = path[0]
    node_inputs = list(top._inbound_nodes[0].input_tensors) if top._inbound_nodes else []
    if len(path) > 1:
        if len(node_inputs) != 1:
            raise ExportError(f"nested model {top.name!r} must take a single input")
        inner = _backbone(top, path[1:])
        return keras.Model(inputs, inner(node_inputs[0]), name="gradcam_backbone")
    return keras.Model(inputs, top.output, name="gradcam_backbone")


def split_model(model: Any, layer: str = "auto") -> Split:
    """Cut a Keras model at its target layer ("auto", a name, or a nested path "outer/inner")."""
    if not _is_model(model):
        raise ExportError(f"{type(model).__name__} is not a Keras model with defined inputs and outputs; build "
                          "it (call it on an Input) or save it as a functional or Sequential model")
    if len(model.inputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.inputs)} inputs; export needs a single image input")
    names = _auto_path(model) if layer == "auto" else [n for n in layer.split("/") if n]
    path = _resolve(model, names)
    return Split(layer_path="/".join(names), backbone=_backbone(model, path), head=_head_chain(model, path))
