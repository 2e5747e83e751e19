"""Benchmarks of the fused Grad-CAM graph against the seed's per-image loop, the forward pass and the full pipeline.

`gradcam bench` runs every contender on the same images in one process, alternating them, and reports throughput,
latency, memory and the ratios the project's targets are stated in; `pytest bench/ --benchmark-only` times the same
contenders with pytest-benchmark.
"""
