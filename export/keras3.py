"""The Keras 3 adapter: symbolic tensors know their `operation`, nodes their `input_tensors`; a mixed twin is
rebuilt from the serialized config with its DTypePolicies rewritten."""
from __future__ import annotations

from typing import Any

from gradcam_engine.export.frameworks import Framework


def _policies_to(node: Any, policy: str) -> Any:
    """A serialized config with every float32 DTypePolicy replaced by `policy`."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") == "float32":
            return {**node, "config": {**node["config"], "name": policy}}
        return {k: _policies_to(v, policy) for k, v in node.items()}
    if isinstance(node, list):
        return [_policies_to(v, policy) for v in node]
    return node


class Keras3(Framework):
    name = "keras"
    package = "keras"
    history_layer = "operation"
    node_inputs = "input_tensors"

    def mixed_twin(self, model: Any, policy: str) -> Any:
        saving = self.module.saving
        twin = saving.deserialize_keras_object(_policies_to(saving.serialize_keras_object(model), policy))
        twin.set_weights(model.get_weights())
        return twin


FRAMEWORK = Keras3()
