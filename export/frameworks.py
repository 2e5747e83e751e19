"""Keras 3 and tf_keras (Keras 2) behind one interface, so the export core never asks which one it holds.

An adapter (`export/keras3.py`, `export/keras2.py`) says how to recognise its models and layers, walk its functional
graph, build a sub-model from its tensors, load its files and rebuild a model in mixed precision. Everything else
(locating the target layer, the head rules, the fused graph) is written once against this interface. Head rules
are registered per layer *kind*: the class name the two frameworks share for a built-in layer (`Dense`,
`GlobalAveragePooling2D`, ...), so one rule serves both. tf_keras stays optional: nothing here imports it, and its
adapter only touches it for objects that already come from it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# The adapters, tried in this order; each module defines FRAMEWORK.
ADAPTERS = ("gradcam_engine.export.keras3", "gradcam_engine.export.keras2")
_BUILT_IN_MODELS = frozenset({"Functional", "Sequential", "Model"})


@dataclass(frozen=True)
class Producer:
    """Where a symbolic tensor comes from: the layer, that call's input tensors, and which of its outputs it is."""

    layer: Any
    inputs: list[Any]
    output_index: int


class Framework:
    """One Keras implementation: the questions the export core asks about models, layers and files."""

    name = ""     # for messages and the manifest: "keras", "tf_keras"
    package = ""  # its import name
    saved_as_object = True  # a SavedModel tracks its models as objects (else only the variables the graph reads)
    history_layer = ""      # the field of a symbolic tensor's `_keras_history` that holds its layer
    node_inputs = ""        # the attribute of a graph node listing its input tensors, flat

    @property
    def module(self) -> ModuleType:
        return sys.modules.get(self.package) or importlib.import_module(self.package)

    def installed(self) -> bool:
        return self.package in sys.modules or importlib.util.find_spec(self.package) is not None

    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    def owns(self, obj: Any) -> bool:
        """A layer or model of this framework (a subclass defined elsewhere, such as a Model Garden backbone, too)."""
        return any(c.__module__.split(".")[0] == self.package for c in type(obj).__mro__)

    def is_layer(self, obj: Any) -> bool:
        return self.owns(obj) and isinstance(obj, self.module.layers.Layer)

    def is_model(self, obj: Any) -> bool:
        """A model with a functional graph: defined inputs and outputs to walk."""
        return (self.owns(obj) and isinstance(obj, self.module.Model) and bool(getattr(obj, "inputs", None))
                and bool(getattr(obj, "outputs", None)))

    def is_sequential(self, obj: Any) -> bool:
        return self.owns(obj) and isinstance(obj, self.module.Sequential)

    def kind(self, layer: Any) -> str | None:
        """The built-in layer class's name (the key of the head rules); None for any other class, subclasses too."""
        cls = type(layer)
        return cls.__name__ if getattr(self.module.layers, cls.__name__, None) is cls else None

    def producer(self, tensor: Any) -> Producer:
        history = tensor._keras_history
        layer = getattr(history, self.history_layer)
        node = layer._inbound_nodes[history.node_index]
        return Producer(layer, list(getattr(node, self.node_inputs)), history.tensor_index)

    def call_inputs(self, layer: Any) -> list[Any]:
        """The input tensors of a layer's first call in the graph it belongs to (a nested model's call)."""
        return list(getattr(layer._inbound_nodes[0], self.node_inputs)) if layer._inbound_nodes else []

    def functional(self, inputs: Any, outputs: Any, name: str) -> Any:
        """A functional model from symbolic tensors of this framework, sharing their layers and weights."""
        return self.module.Model(inputs, outputs, name=name)

    def load(self, path: str) -> Any:
        return self.module.models.load_model(path, compile=False)

    def knows_class(self, class_name: str) -> bool:
        """Whether a class name in a saved config resolves: a built-in layer or model, or a registered class."""
        m = self.module
        if class_name in _BUILT_IN_MODELS or hasattr(m.layers, class_name):
            return True
        return m.saving.get_registered_object(class_name) is not None

    def mixed_twin(self, model: Any, policy: str) -> Any:
        raise NotImplementedError


_loaded: list[Framework] = []


def frameworks() -> list[Framework]:
    """The registered adapters (importing an adapter imports neither framework)."""
    if not _loaded:
        _loaded.extend(importlib.import_module(name).FRAMEWORK for name in ADAPTERS)
    return _loaded


def framework_of(obj: Any) -> Framework | None:
    """The framework a model or layer belongs to; None for anything else (a plain callable)."""
    return next((fw for fw in frameworks() if fw.owns(obj)), None)


def framework_named(name: str) -> Framework:
    return next(fw for fw in frameworks() if fw.name == name)


def is_layer(obj: Any) -> bool:
    fw = framework_of(obj)
    return fw is not None and fw.is_layer(obj)


def layer_kind(layer: Any) -> str | None:
    fw = framework_of(layer)
    return fw.kind(layer) if fw is not None else None
