"""gradcam-engine's runtime: stream images through an exported fused Grad-CAM graph into Parquet.

Nothing here imports TensorFlow unless the TensorFlow backend is chosen.
"""
