"""The tf_keras (Keras 2) adapter: the Keras of TF Model Garden and of models saved before Keras 3.

Its symbolic tensors name their `layer` (not `operation`), a node's flat inputs are `keras_inputs`, its layers are
`tf.Module`s, and a mixed-precision model is rebuilt under its own global policy. Importing this module does not
import tf_keras; the adapter only runs for objects that come from it (or files it saved).
"""
from __future__ import annotations

from typing import Any

from gradcam_engine.export.frameworks import Framework


def _dtypes_to(config: Any, policy: str) -> Any:
    """A layer config with every explicit float32 dtype replaced by `policy` (input layers keep their dtype)."""
    if isinstance(config, dict):
        if config.get("class_name") == "InputLayer":
            return config
        return {k: policy if k == "dtype" and v == "float32" else _dtypes_to(v, policy) for k, v in config.items()}
    if isinstance(config, list):
        return [_dtypes_to(v, policy) for v in config]
    return config


class Keras2(Framework):
    name = "tf_keras"
    package = "tf_keras"
    # tf.saved_model.save traces every call function of every tf_keras layer it tracks (seconds for a small model,
    # and warnings), for a Keras SavedModel the artifact never uses: the fused graph tracks their variables instead.
    saved_as_object = False
    history_layer = "layer"
    node_inputs = "keras_inputs"  # input_tensors keeps the call's structure (one tensor, or a list for Add)

    def mixed_twin(self, model: Any, policy: str) -> Any:
        """Clone under a global `policy`: explicit float32 configs are rewritten, and layers a custom model builds
        in its constructor (a Model Garden backbone rebuilt from its arguments) take the global policy."""
        tfk = self.module
        input_layer = tfk.layers.InputLayer

        def clone(layer: Any) -> Any:
            config = layer.get_config()
            return layer.__class__.from_config(config if isinstance(layer, input_layer) else _dtypes_to(config, policy))

        previous = tfk.mixed_precision.global_policy()
        tfk.mixed_precision.set_global_policy(policy)
        try:
            twin = tfk.models.clone_model(model, clone_function=clone)
        finally:
            tfk.mixed_precision.set_global_policy(previous)
        twin.set_weights(model.get_weights())
        return twin


FRAMEWORK = Keras2()
