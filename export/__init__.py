"""Export a Keras classifier as one fused Grad-CAM graph (SavedModel + ONNX + manifest)."""
from gradcam_engine.export.api import EXPORT_PRECISIONS, ExportOptions, export_artifact, read_class_names
from gradcam_engine.export.errors import ExportError, PrecisionGateError

__all__ = ["EXPORT_PRECISIONS", "ExportError", "ExportOptions", "PrecisionGateError", "export_artifact",
           "read_class_names"]
