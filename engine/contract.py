"""The exported graph's public contract: input and output names, dtypes and meaning.

Export writes graphs with exactly these names; the engine, the benchmarks and the tests read them from here, so a
rename happens in one place and users of the ONNX file or the SavedModel signature can rely on them.
"""
from __future__ import annotations

from typing import Sequence

IMAGES = "images"            # uint8 [N, H, W, 3], RGB, already resized to the model's input size
CLASS_INDEX = "class_index"  # int32 [N]; -1 selects the model's own top-1 class

PREDICTIONS = "predictions"    # float [N, K]: the model's own output (probabilities when it ends in softmax)
TARGET_CLASS = "target_class"  # int32 [N]: the class whose score was differentiated
TARGET_SCORE = "target_score"  # float [N]: that score (the pre-softmax logit when the model ends in softmax)
FEATURE_MAPS = "feature_maps"  # float [N, h, w, C]: the target layer's activations
GRADIENTS = "gradients"        # float [N, h, w, C]: d target_score / d feature_maps
CAM = "cam"                    # float [N, h, w]: the first method's map (Grad-CAM by default), ReLU'd, / its max
CAMS = "cams"                  # float [N, M, h, w]: every method's map, in the manifest's `methods` order

INPUT_NAMES: tuple[str, ...] = (IMAGES, CLASS_INDEX)
OUTPUT_NAMES: tuple[str, ...] = (PREDICTIONS, TARGET_CLASS, TARGET_SCORE, FEATURE_MAPS, GRADIENTS, CAM, CAMS)
# What the engine needs per image; feature maps and gradients stay inside the runtime unless asked for.
ENGINE_OUTPUTS: tuple[str, ...] = (PREDICTIONS, TARGET_CLASS, TARGET_SCORE, CAM)

# The CAM method of an artifact whose manifest lists no `methods` (exported before there were several): Grad-CAM.
DEFAULT_METHOD = "gradcam"


def engine_outputs(methods: Sequence[str]) -> tuple[str, ...]:
    """What the engine fetches for an artifact with these methods: `cams` only when there is more than one (`cam`
    already holds the first), so one-method artifacts, old ones without `cams` included, run as before."""
    return ENGINE_OUTPUTS + ((CAMS,) if len(methods) > 1 else ())


PREPROCESSING = ("none", "caffe", "tf", "torch")

# Name scope of the backbone inside the fused graph: fp16 artifacts run only this part in half precision.
FP16_SCOPE = "backbone/"

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model_fp16.onnx"
ONNX_INT8_FILE = "model_int8.onnx"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_FP16_DIR = "saved_model_fp16"
SIGNATURE = "serving_default"
# The precision gate's entry for bf16, which has no file of its own: TensorFlow runs saved_model in bf16.
BF16_GATE_LABEL = "saved_model (bf16)"
MANIFEST_VERSION = 1
