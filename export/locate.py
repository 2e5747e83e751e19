"""Find the target layer in a Keras model, nested sub-models included, and split the model around it.

The split gives a backbone (images -> target feature maps) built from the model's own layers, and the head as the
ordered list of layers from those feature maps to the output, which `export.head` knows how to differentiate.
Keras 3 and tf_keras models are walked alike, through their adapter (`export.frameworks`); a nested model may
return several outputs (a backbone returning a dict of levels), of which the walk follows the one used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.frameworks import Framework, framework_of


@dataclass
class Split:
    """A model cut at its target layer."""

    layer_path: str          # "resnet50/conv5_block3_out"
    backbone: Any            # a model of the same framework: images -> feature maps (N, h, w, C)
    head: list[Any]          # layers from the feature maps to the model output, in call order


def graph_framework(model: Any) -> Framework:
    """The adapter of a model with a functional graph, or a one-line error saying what to do instead."""
    fw = framework_of(model)
    if fw is not None and fw.is_model(model):
        return fw
    if fw is not None and isinstance(model, fw.module.Model):
        raise ExportError(f"{type(model).__name__} {getattr(model, 'name', '')!r} is a {fw.name} model without a "
                          "functional graph (a subclassed model, or one never called on an Input): export it as a "
                          "(backbone, head) pair, or build it functionally (keras.Input -> layers -> Model)")
    raise ExportError(f"{type(model).__name__} is not a Keras model (Keras 3 or tf_keras); pass a model, a .keras/.h5 "
                      "file, a (backbone, head) pair, or module.py:function")


def _single_output(model: Any) -> Any:
    if len(model.outputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.outputs)} outputs; export needs a single "
                          "classification output")
    return model.outputs[0]


def candidates(fw: Framework, model: Any, prefix: str = "") -> list[str]:
    """Paths of every layer with a 4-D output, nested sub-models included, in model order."""
    found = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if fw.is_model(layer):
            found += candidates(fw, layer, prefix=f"{path}/")
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):  # several calls, or a dict of outputs
            continue
        if rank == 4 and fw.kind(layer) != "InputLayer":
            found.append(path)
    return found


def _auto_path(fw: Framework, model: Any) -> list[str]:
    """Walk back from the output to the first 4-D output; descend into a nested model that produced it."""
    tensor = _single_output(model)
    while True:
        p = fw.producer(tensor)
        if fw.kind(p.layer) == "InputLayer" or not p.inputs:
            raise ExportError(f"model {model.name!r} has no layer with a 4-D output (N, h, w, C) before its head; "
                              "Grad-CAM needs convolutional feature maps")
        if len(tensor.shape) == 4:
            if fw.is_model(p.layer):
                return [p.layer.name, *_auto_path_inner(fw, p.layer.outputs[p.output_index])]
            return [p.layer.name]
        if len(p.inputs) != 1:
            raise ExportError(f"cannot find the target layer automatically: layer {p.layer.name!r} has "
                              f"{len(p.inputs)} inputs; name the layer with --layer")
        tensor = p.inputs[0]


def _auto_path_inner(fw: Framework, tensor: Any) -> list[str]:
    p = fw.producer(tensor)
    if fw.is_model(p.layer):
        return [p.layer.name, *_auto_path_inner(fw, p.layer.outputs[p.output_index])]
    return [p.layer.name]


def _resolve(fw: Framework, model: Any, names: list[str]) -> list[Any]:
    layers, current = [], model
    for i, name in enumerate(names):
        try:
            layer = current.get_layer(name)
        except (ValueError, AttributeError):
            layer = None
        if layer is None or (i < len(names) - 1 and not fw.is_model(layer)):
            near = candidates(fw, model)
            listing = ", ".join(near[-12:]) if near else "none"
            raise ExportError(f"layer {'/'.join(names)!r} not found in model {model.name!r}; layers with 4-D "
                              f"outputs (last {min(12, len(near))}): {listing}")
        layers.append(layer)
        current = layer
    try:
        shape = tuple(layers[-1].output.shape)
    except (AttributeError, ValueError):  # a nested model returning a dict of levels
        shape = ()
    if len(shape) != 4:
        raise ExportError(f"layer {'/'.join(names)!r} has output shape {shape or 'of several outputs'}; Grad-CAM "
                          "needs a 4-D (N, h, w, C) feature map (name a layer inside it: outer/inner)")
    return layers


def _head_chain(fw: Framework, model: Any, path: list[Any], tensor: Any = None) -> list[Any]:
    """Layers from path[-1]'s output to `tensor` (the model's output), descending through nested models."""
    chain: list[Any] = []
    tensor = _single_output(model) if tensor is None else tensor
    while True:
        p = fw.producer(tensor)
        if p.layer is path[0]:
            if len(path) > 1:
                chain = _head_chain(fw, p.layer, path[1:], p.layer.outputs[p.output_index]) + chain
            return chain
        if fw.kind(p.layer) == "InputLayer" or not p.inputs:
            raise ExportError(f"layer {path[0].name!r} is not on the path from the input to the output of "
                              f"{model.name!r}")
        if len(p.inputs) != 1:
            raise ExportError(f"the head after the target layer is not a single chain: {p.layer.name!r} "
                              f"({type(p.layer).__name__}) takes {len(p.inputs)} inputs; choose a later target layer")
        chain.insert(0, p.layer)
        tensor = p.inputs[0]


def layer_chain(model: Any) -> list[Any]:
    """The layers of a single-chain model (a head given as a Keras model), input to output."""
    fw = framework_of(model)
    if fw is not None and fw.is_sequential(model):  # its layers are the chain, built on an Input or not
        return [layer for inner in model.layers
                for layer in (layer_chain(inner) if isinstance(inner, fw.module.Model) else [inner])]
    fw = graph_framework(model)
    chain: list[Any] = []
    tensor = _single_output(model)
    while True:
        p = fw.producer(tensor)
        if fw.kind(p.layer) == "InputLayer" or not p.inputs:
            return chain
        if len(p.inputs) != 1:
            raise ExportError(f"head model {model.name!r} is not a single chain: {p.layer.name!r} takes "
                              f"{len(p.inputs)} inputs")
        chain[:0] = layer_chain(p.layer) if fw.is_model(p.layer) else [p.layer]
        tensor = p.inputs[0]


def _backbone(fw: Framework, model: Any, path: list[Any]) -> Any:
    """A model from `model`'s inputs to path[-1]'s output, re-using the same layers (and weights)."""
    inputs = model.inputs
    top = path[0]
    if len(path) > 1:
        node_inputs = fw.call_inputs(top)
        if len(node_inputs) != 1:
            raise ExportError(f"nested model {top.name!r} must take a single input")
        inner = _backbone(fw, top, path[1:])
        return fw.functional(inputs, inner(node_inputs[0]), name="gradcam_backbone")
    return fw.functional(inputs, top.output, name="gradcam_backbone")


def split_model(model: Any, layer: str = "auto") -> Split:
    """Cut a Keras or tf_keras model at its target layer ("auto", a name, or a nested path "outer/inner")."""
    fw = graph_framework(model)
    if len(model.inputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.inputs)} inputs; export needs a single image input")
    names = _auto_path(fw, model) if layer == "auto" else [n for n in layer.split("/") if n]
    path = _resolve(fw, model, names)
    return Split(layer_path="/".join(names), backbone=_backbone(fw, model, path), head=_head_chain(fw, model, path))
