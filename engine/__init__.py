"""gradcam-engine's runtime: stream images through an exported fused Grad-CAM graph into Parquet.

Nothing here imports TensorFlow unless the TensorFlow backend is chosen, and nothing here imports the layers above
(the command line, the demo, the bench).
"""
