"""Export a Keras classifier as one fused Grad-CAM graph (SavedModel + ONNX + manifest)."""
from export.api import ExportOptions, export_artifact, read_class_names
from export.errors import ExportError

__all__ = ["ExportError", "ExportOptions", "export_artifact", "read_class_names"]
