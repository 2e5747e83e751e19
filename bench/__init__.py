"""Benchmarks of the fused Grad-CAM graph against the seed's per-image loop, the forward pass and the full pipeline.

`gradcam bench` runs every contender on the same images in one process, alternating them, and reports throughput,
latency, memory and the ratios the project's targets are stated in; `pytest bench/benchmarks --benchmark-only` times
the same contenders with pytest-benchmark.

    main.py        run_bench: build, check, time, report (the one function behind `gradcam bench`)
    contenders/    what is timed: the fused graph per runtime, forward-only, the per-image reference, the model
    measure/       how: alternated timing, memory, machine facts, agreement checks, end-to-end runs
    report/        the targets, the Markdown table, the PNG chart
    tools/         measurements run by hand (the GPU check, decode workers)
    benchmarks/    the pytest-benchmark suite
"""
