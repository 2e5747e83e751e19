"""`run_bench`: build every contender once, check they agree, time them alternated, and report.

The one function behind `gradcam bench`, the smoke test and anything else that wants the numbers as data.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradcam_engine.bench import contenders as K
from gradcam_engine.bench.contenders.models import (CALIBRATION_IMAGES, FORWARD_INT8_ONNX, FORWARD_ONNX, SEED_RESNET50,
                                                    BenchModel, default_work_dir, methods_artifact, prepare_model)
from gradcam_engine.bench.errors import BenchError
from gradcam_engine.bench.measure.agreement import compare, mixed_targets
from gradcam_engine.bench.measure.images import jpeg_set, path_list, scene_images
from gradcam_engine.bench.measure.machine import machine_info, rss_mb
from gradcam_engine.bench.measure.timing import Timing, Unit, batched_run, round_robin, summarize
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.bf16 import bf16_unavailable
from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.methods import check_methods, method_names

Log = Callable[[str], None]
CONTENDER_GROUPS = ("reference", "onnx", "tf", "tf-xla", "e2e")  # what --backends may name
# Precisions the bench may time on CPU (--precisions): int8 on ONNX Runtime (the artifact is exported with an int8
# file calibrated on scene images), bf16 on TensorFlow (skipped, with the missing CPU feature named, without native
# bf16). fp16 is timed in --hardware mode (on CPU it is slower than fp32).
BENCH_PRECISIONS = ("fp32", "int8", "bf16")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; `gradcam bench` fills it from a preset (quick or full) and its flags."""

    model: str = SEED_RESNET50
    backends: tuple[str, ...] = CONTENDER_GROUPS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    images: int = 32               # images per timed repetition of a batched contender
    reference_images: int = 8      # the reference is ~10-20x slower: it is timed (and checked) on the first few
    reps: int = 5                  # timed rounds after one warm-up round
    e2e_images: int = 32
    e2e_batch_size: int = 16
    dataset_sizes: tuple[int, ...] = (200, 2000)
    hardware: bool = False         # synthetic batches, every backend x precision x device, best configuration last
    quick: bool = False
    device: str = "auto"
    threads: int = 0
    preprocess: str = "none"       # for a .keras model: the input scaling to build into the graph
    work_dir: str | None = None
    json_path: str | None = None
    plot_path: str | None = None
    memory: bool = True            # each contender's peak RSS in its own fresh process (largest batch)
    seed: int = 0
    methods: tuple[str, ...] = field(default_factory=method_names)  # the all-methods contenders' CAM methods
                                   # (Grad-CAM always first, so their `cam` is checked against the reference);
                                   # Grad-CAM alone: no such contenders
    precisions: tuple[str, ...] = BENCH_PRECISIONS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.backends) - set(CONTENDER_GROUPS))
        if unknown:
            raise BenchError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(CONTENDER_GROUPS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BenchError("--batch-sizes: give one or more positive integers")
        if self.reps < 1 or self.images < 1 or self.reference_images < 1:
            raise BenchError("--reps, --images and --reference-images must be at least 1")
        check_methods(self.methods)
        if "fp32" not in self.precisions or set(self.precisions) - set(BENCH_PRECISIONS):
            raise BenchError(f"--precisions: fp32 and any of {', '.join(BENCH_PRECISIONS[1:])}")

    @property
    def export_methods(self) -> tuple[str, ...]:
        """The methods artifact's methods: Grad-CAM first, then the others asked for."""
        return (C.DEFAULT_METHOD, *(m for m in self.methods if m != C.DEFAULT_METHOD))


@dataclass
class Built:
    """The contenders ready to run, how each was specified, and those that could not be built, with why."""

    sources: K.Sources
    contenders: list[K.Contender] = field(default_factory=list)
    specs: dict[str, K.Spec] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _build(spec: K.Spec, built: Built, shared: dict[str, Any], log: Log) -> None:
    """Build one contender, recording the resident memory it added; a runtime that cannot is skipped, with why."""
    label = f"{spec.kind} {spec.backend}-{spec.device} {spec.precision}"
    gc.collect()
    before, start = rss_mb(), time.perf_counter()
    try:
        contender = K.make(spec, built.sources, shared)
    except Exception as e:  # an unsupported runtime or precision must not stop the other contenders
        reason = first_line(e, 200)
        built.skipped.append({"contender": label, "reason": reason})
        log(f"skipped {label}: {reason}")
        return
    contender.load_mb = max(rss_mb() - before, 0.0)
    built.contenders.append(contender)
    built.specs[contender.name] = spec
    log(f"built {contender.name} in {time.perf_counter() - start:.1f} s")


def _devices(config: BenchConfig) -> list[str]:
    from gradcam_engine.engine.session import cuda_available

    if config.hardware:
        return ["cpu", "cuda"] if cuda_available() else ["cpu"]
    if config.device == "auto":
        return ["cuda" if cuda_available() else "cpu"]
    return [config.device]


def skipped_precisions(config: BenchConfig) -> list[dict[str, str]]:
    """The reduced precisions asked for that this machine does not time, each with why: bf16's contenders (Grad-CAM,
    forward-only, end to end) where TensorFlow would emulate it or not apply it at all."""
    why = bf16_unavailable() if "bf16" in config.precisions and "tf" in config.backends else ""
    if not why or "cpu" not in _devices(config):
        return []
    return [{"contender": "gradcam tf-cpu bf16, forward tf-cpu bf16, end-to-end tf-cpu bf16", "reason": why}]


def contender_specs(config: BenchConfig, artifact: Any, has_keras: bool) -> list[K.Spec]:
    """What to build: the reference, then per device each backend's Grad-CAM (each precision the artifact has, in
    hardware mode), its forward-only counterpart and, for ONNX Runtime and TensorFlow, the same graph with every CAM
    method (these two need the Keras model; not in hardware mode)."""
    onnx_precisions = ["fp32"] + (["fp16"] if config.hardware and artifact.has(C.ONNX_FP16_FILE) else [])
    tf_precisions = ["fp32"] + (["fp16"] if config.hardware and artifact.has(C.SAVED_MODEL_FP16_DIR) else [])
    forward = has_keras and not config.hardware
    specs = [K.Spec(K.REFERENCE, "reference")] if forward and "reference" in config.backends else []
    for device in _devices(config):
        cpu_only = {"onnx": ["int8"] if "int8" in config.precisions and artifact.has(C.ONNX_INT8_FILE) else [],
                    "tf": ["bf16"] if "bf16" in config.precisions and not bf16_unavailable() else []
                    } if device == "cpu" else {}
        for backend, precisions in (("onnx", onnx_precisions), ("tf", tf_precisions), ("tf-xla", tf_precisions)):
            if backend in config.backends:
                for p in [*precisions, *cpu_only.get(backend, [])]:
                    specs.append(K.Spec(K.GRADCAM, backend, device, p))
                    if p == "fp32" and forward and len(config.export_methods) > 1 and backend in ("onnx", "tf"):
                        specs.append(K.Spec(K.METHODS, backend, device))  # next to Grad-CAM: timed back to back
                    if forward and p in ("fp32", *cpu_only.get(backend, [])):
                        specs.append(K.Spec(K.FORWARD, backend, device, p))
    return specs


def build_contenders(config: BenchConfig, model: BenchModel, artifact: Any, log: Log) -> Built:
    """Every contender the config asks for and this machine and artifact can run."""
    has_keras = model.keras_path is not None
    specs = contender_specs(config, artifact, has_keras)
    forward_onnx = model.cache / FORWARD_ONNX if has_keras else None
    if forward_onnx and not forward_onnx.is_file() and any(s.kind == K.FORWARD and s.backend == "onnx"
                                                           for s in specs):
        import keras

        from gradcam_engine.bench.contenders.forward import export_forward_onnx
        start = time.perf_counter()
        export_forward_onnx(keras.models.load_model(model.keras_path, compile=False), model.preprocessing,
                            artifact.input_size, forward_onnx)
        log(f"forward-only ONNX written: {forward_onnx} ({time.perf_counter() - start:.1f} s)")
    methods_root = None
    if any(s.kind == K.METHODS for s in specs):
        methods_root, seconds = methods_artifact(model, config.export_methods)
        log(f"methods artifact ({', '.join(config.export_methods)}): {methods_root} "
            + (f"(exported in {seconds:.0f} s)" if seconds else "(cached export)"))
    forward_int8 = None
    if any(s.kind == K.FORWARD and s.precision == "int8" for s in specs):
        from gradcam_engine.bench.contenders.forward import forward_part

        forward_int8 = forward_part(artifact.path(C.ONNX_INT8_FILE), model.cache / FORWARD_INT8_ONNX)
    built = Built(K.Sources(str(model.artifact), str(model.keras_path) if has_keras else None, model.preprocessing,
                            str(forward_onnx) if forward_onnx else None, config.threads,
                            methods_artifact=str(methods_root) if methods_root else None,
                            forward_int8=str(forward_int8) if forward_int8 else None))
    if not has_keras and not config.hardware:
        built.skipped.append({"contender": "reference and forward-only",
                              "reason": "an artifact directory holds no Keras model; pass --model FILE.keras"})
    for skip in skipped_precisions(config):
        built.skipped.append(skip)
        log(f"skipped {skip['contender']}: {skip['reason']}")
    shared: dict[str, Any] = {"artifact": artifact}
    for spec in specs:
        _build(spec, built, shared, log)
    return built


def _chunked(call: K.Call, images: np.ndarray, class_index: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    parts = [call(images[i:i + batch_size], class_index[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_contenders(built: Built, images: np.ndarray, num_classes: int, log: Log,
                     batch_size: int | None = None) -> list[dict[str, Any]]:
    """Run every contender once on the check images and compare with the reference (or the first fused graph).

    Batched contenders run in batches of batch_size (default: all at once); the bench picks a timed batch size so
    an XLA contender compiles no shape it is not timed at."""
    pool = built.contenders
    baseline = next((c for c in pool if c.kind == K.REFERENCE), None) or \
        next((c for c in pool if c.kind == K.GRADCAM and c.precision == "fp32"), None)
    if baseline is None:
        raise BenchError("no contender to run: check --backends")
    b = batch_size or len(images)
    probe = next((c for c in pool if c.kind == K.GRADCAM), baseline)
    top1 = _chunked(probe.call, images, np.full(len(images), -1, np.int32), b)[C.PREDICTIONS].argmax(-1)
    class_index = mixed_targets(top1, num_classes)
    start = time.perf_counter()
    expected = baseline.call(images, class_index)
    log(f"check: {baseline.name} on {len(images)} images: {time.perf_counter() - start:.1f} s")
    methods = _methods_of(built)
    if methods and C.GRADIENTS in expected:  # the reference: every method's map from its formula
        from gradcam_engine.bench.contenders.reference import reference_maps

        expected = {**expected, C.CAMS: reference_maps(expected[C.FEATURE_MAPS], expected[C.GRADIENTS], methods)}
    checks = []
    for c in pool:
        if c is baseline:
            checks.append({"contender": c.name, "against": "itself", "ok": True})
            continue
        try:
            result = compare(expected, _chunked(c.call, images, class_index, b), c.precision,
                             methods if c.kind == K.METHODS else ())
        except Exception as e:  # XLA may refuse a graph on first call: the contender is out, the bench goes on
            result = {"ok": False, "error": first_line(e, 200)}
        checks.append({"contender": c.name, "against": baseline.name, **result})
        log(f"check: {c.name} vs {baseline.name}: {'ok' if result['ok'] else 'MISMATCH'} "
            f"{ {k: v for k, v in result.items() if k != 'ok'} }")
    return checks


def _methods_of(built: Built) -> tuple[str, ...]:
    """The all-methods contenders' CAM methods, read from their artifact; () when there are none."""
    if not built.sources.methods_artifact or not any(c.kind == K.METHODS for c in built.contenders):
        return ()
    from gradcam_engine.engine.artifact import load_artifact

    return load_artifact(built.sources.methods_artifact, verify=[]).methods


def _e2e_variants(config: BenchConfig, artifact: Any, device: str) -> list[tuple[str, str]]:
    """(backend, precision) of each end-to-end run: the default runtime in fp32, then int8 on ONNX Runtime and bf16
    on TensorFlow on CPU when asked for (each beside its own model-only run)."""
    backend = "onnx" if "onnx" in config.backends or "tf" not in config.backends else "tf"
    variants = [(backend, "fp32")]
    if device == "cpu" and "int8" in config.precisions and artifact.has(C.ONNX_INT8_FILE):
        variants.append(("onnx", "int8"))
    if device == "cpu" and "bf16" in config.precisions and "tf" in config.backends and not bf16_unavailable():
        variants.append(("tf", "bf16"))
    return variants


def _end_to_end(config: BenchConfig, artifact: Any, work: Path, device: str, log: Log
                ) -> tuple[list[Unit], list[dict[str, Any]], list[Path]]:
    """The end-to-end and model-only units on the same JPEG files, each variant with its agreement check."""
    from gradcam_engine.bench.measure.e2e import (decode_like_engine, end_to_end_unit, model_only_unit,
                                                  parquet_cams, run_config)
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    paths = jpeg_set(work / "images", max([config.e2e_images, *config.dataset_sizes]), seed=config.seed)
    subset = paths[:config.e2e_images]
    list_file = path_list(subset, work / f"inputs-{len(subset)}.txt")
    pixels = decode_like_engine(subset, artifact.input_size)
    units: list[Unit] = []
    checks: list[dict[str, Any]] = []
    for backend, precision in _e2e_variants(config, artifact, device):
        try:
            session = GradCAMSession(artifact, SessionOptions(backend=backend, device=device, threads=config.threads,
                                                              precision=precision))
        except RunError as e:  # bf16 on a CPU without native bf16: not a contender here
            log(f"end-to-end {backend} {precision} skipped: {e}")
            continue
        runtime = f"{backend}-{session.device}"
        run = run_config(artifact.root, list_file, work / f"e2e-run-{backend}-{precision}", config.e2e_batch_size,
                         backend, device, precision)
        run_gradcam(run, session=session)
        direct = session({C.IMAGES: pixels[:config.e2e_batch_size],
                         C.CLASS_INDEX: np.full(min(len(pixels), config.e2e_batch_size), -1, np.int32)})[C.CAM]
        written = parquet_cams(run.out)
        diff = max(float(np.abs(written[str(p)] - cam).max()) for p, cam in zip(subset, direct))
        e2e = end_to_end_unit(session, run, len(subset), runtime, precision)
        ok = diff <= 1e-5 and len(written) == len(subset)
        checks.append({"contender": e2e.contender, "against": "model-only on the decoded images",
                       "cam_max_abs_diff": diff, "rows": len(written), "ok": ok})
        log(f"check: {e2e.contender} Parquet CAMs vs model-only: max diff {diff:.1e}")
        units += [e2e, model_only_unit(session, pixels, config.e2e_batch_size, runtime, precision)] if ok else []
    return units, checks, paths


def _dataset_sweep(config: BenchConfig, artifact: Any, work: Path, paths: list[Path], device: str,
                   log: Log) -> list[dict[str, Any]]:
    """End to end at each dataset size, each in a fresh process."""
    from gradcam_engine.bench.measure.e2e import fresh_process_run

    backend = "onnx" if "onnx" in config.backends or "tf" not in config.backends else "tf"
    rows = []
    for n in config.dataset_sizes:
        list_file = path_list(paths[:n], work / f"inputs-{n}.txt")
        start = time.perf_counter()
        result = fresh_process_run(artifact.root, list_file, work / f"sweep-{n}", config.e2e_batch_size, backend,
                                   device)
        log(f"dataset sweep {n} images: {result['images_per_second']:.1f} img/s, peak RSS "
            f"{result['peak_rss_mb']:.0f} MB ({time.perf_counter() - start:.0f} s)")
        rows.append({"images": n, "batch_size": config.e2e_batch_size, "runtime": f"{backend}-{device}", **result})
    return rows


def _model_units(built: Built, images: np.ndarray, config: BenchConfig) -> list[Unit]:
    class_index = np.full(len(images), -1, np.int32)
    units = []
    for c in built.contenders:
        if c.per_image:  # the reference: one image per call, on the first few images
            n = min(config.reference_images, len(images))
            units.append(Unit(c.name, c.kind, c.runtime, c.precision, 1, n,
                              batched_run(c.call, images[:n], class_index[:n], 1)))
            continue
        # int8 and bf16 at the largest batch only (the side-by-side ratio), but for the hardware sweep
        reduced = c.precision in ("int8", "bf16") and not config.hardware
        sizes = [max(config.batch_sizes)] if reduced else config.batch_sizes
        for b in sizes:
            units.append(Unit(c.name, c.kind, c.runtime, c.precision, b, len(images),
                              batched_run(c.call, images, class_index, b)))
    return units


def _rows(timings: list[Timing], built: Built, memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One result row per timed unit, with the ratios: vs reference and vs forward-only (same runtime, batch); for
    the all-methods contenders also vs Grad-CAM alone: the median over rounds of the per-round ratio, since each
    round runs both once, back to back, in wall time and in CPU time (steadier on a shared machine; with --threads 1
    no idle runtime thread spins into it)."""
    load = {c.name: c.load_mb for c in built.contenders}
    rows = []
    for t in timings:
        u = t.unit
        rows.append({"contender": u.contender, "kind": u.kind, "runtime": u.runtime, "precision": u.precision,
                     "batch_size": u.batch_size, "images": u.images, "group": u.group, **summarize(t),
                     "rep_seconds": t.rep_seconds, "rep_cpu_seconds": t.rep_cpu_seconds,
                     # fresh process, this contender alone, at its largest batch: the figure to read
                     "own_process_memory": memory.get(u.contender)
                     if memory.get(u.contender, {}).get("batch_size") == u.batch_size else None,
                     # this long process: allocators keep what other contenders freed, so indicative only
                     "in_process_load_mb": load.get(u.contender), "in_process_run_peak_mb": t.run_peak_mb,
                     "in_process_peak_rss_mb": t.peak_rss_mb})
    reference = next((r for r in rows if r["kind"] == K.REFERENCE), None)
    forward = {(r["runtime"], r["precision"], r["batch_size"]): r for r in rows if r["kind"] == K.FORWARD}
    gradcam = {(r["runtime"], r["precision"], r["batch_size"]): r for r in rows if r["kind"] == K.GRADCAM}
    for r in rows:
        ips = r["images_per_second"]
        ref = reference["images_per_second"] if reference else None
        key = (r["runtime"], r["precision"], r["batch_size"])
        r["vs_reference"] = ips / ref if ips and ref and r["group"] == "model" else None
        pair = forward.get(key) if r["kind"] in (K.GRADCAM, K.METHODS) else None
        r["forward_pair"] = pair["contender"] if pair else None
        r["vs_forward"] = ips / pair["images_per_second"] if pair and ips and pair["images_per_second"] else None
        if r["kind"] == K.METHODS and key in gradcam:
            r["gradcam_pair"] = gradcam[key]["contender"]
            for field_name, times in (("vs_gradcam", "rep_seconds"), ("vs_gradcam_cpu", "rep_cpu_seconds")):
                pairs = zip(gradcam[key][times], r[times])
                r[field_name] = float(np.median([a / m for a, m in pairs if m > 0]))
    return rows


def contender_memory(built: Built, config: BenchConfig, input_size: tuple[int, int], log: Log
                     ) -> dict[str, dict[str, Any]]:
    """Peak RSS of each contender alone: a fresh process imports its runtime, loads it and runs one largest batch."""
    from gradcam_engine.bench.measure.fresh import run_worker

    out = {}
    for c in built.contenders:
        batch = 1 if c.per_image else max(config.batch_sizes)
        start = time.perf_counter()
        try:
            out[c.name] = run_worker("gradcam_engine.bench.measure.memory_worker", [
                json.dumps(asdict(built.specs[c.name])), json.dumps(asdict(built.sources)), "--batch-size",
                str(batch), "--size", str(input_size[0]), str(input_size[1])])
        except BenchError as e:
            log(f"memory {c.name}: {e}")
            continue
        log(f"memory {c.name} b={batch}: peak {out[c.name]['peak_rss_mb']:.0f} MB "
            f"({time.perf_counter() - start:.0f} s)")
    return out


def _export_request(config: BenchConfig, work: Path) -> tuple[str, str | None]:
    """The precisions to export and the path list int8 is calibrated on (scene JPEGs, not the timed images):
    fp16 in hardware mode; int8 when asked for; bf16's gate figures where this machine runs bf16 (bf16_unavailable)."""
    precisions = ["fp32", *(["fp16"] if config.hardware else [])]
    precisions += ["int8"] if "int8" in config.precisions else []
    precisions += ["bf16"] if "bf16" in config.precisions and not bf16_unavailable() else []
    if precisions in (["fp32"], ["fp32", "fp16"]):  # nothing to calibrate; fp16 is judged on random images
        return ",".join(precisions), None
    calibration = jpeg_set(work / "calibration", CALIBRATION_IMAGES, seed=config.seed + 1000)
    return ",".join(precisions), str(path_list(calibration, work / f"calibration-{CALIBRATION_IMAGES}.txt"))


def run_bench(config: BenchConfig, log: Log = lambda _: None) -> dict[str, Any]:
    """Everything the bench measures, as one JSON-ready dict (also written to config.json_path / plot_path)."""
    from gradcam_engine.engine.artifact import load_artifact

    from gradcam_engine.bench.report.markdown import targets
    from gradcam_engine.engine.tf_import import import_tensorflow

    import_tensorflow("gradcam bench")  # quietly: TensorFlow's start-up lines would bury the log
    wall = time.perf_counter()
    machine = machine_info()
    work = Path(config.work_dir) if config.work_dir else default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    precision, calibrate = _export_request(config, work)
    model = prepare_model(config.model, work, config.preprocess, precision, config.seed, calibrate)
    log(f"model {model.name}: artifact {model.artifact} "
        + (f"(exported in {model.export_seconds:.0f} s)" if model.export_seconds else "(cached export)"))
    artifact = load_artifact(model.artifact)
    images = scene_images(max(config.images, config.reference_images), artifact.input_size, config.seed + 1)
    built = build_contenders(config, model, artifact, log)
    if not built.contenders:
        raise BenchError("no contender could be built: " + "; ".join(f"{s['contender']}: {s['reason']}"
                                                                     for s in built.skipped))
    check_batch = max([b for b in config.batch_sizes if b <= config.reference_images] or [1])
    checks = check_contenders(built, images[:config.reference_images], artifact.manifest["num_classes"], log,
                              check_batch)
    for c in [c for c in checks if "error" in c]:  # could not run here (say, XLA refusing a graph): skipped, not wrong
        built.skipped.append({"contender": c["contender"], "reason": f"failed on its first call: {c['error']}"})
    checks = [c for c in checks if "error" not in c]
    failed = {c["contender"] for c in checks if not c["ok"]} | {s["contender"] for s in built.skipped}
    built.contenders = [c for c in built.contenders if c.name not in failed]
    units = _model_units(built, images[:config.images], config)

    device = _devices(config)[0]
    run_work = work / "runs" / model.cache.name
    paths: list[Path] = []
    if "e2e" in config.backends and not config.hardware:
        e2e_units, e2e_checks, paths = _end_to_end(config, artifact, run_work, device, log)
        checks += e2e_checks
        units += e2e_units
    timings = round_robin(units, config.reps, log=log)
    memory = contender_memory(built, config, artifact.input_size, log) if config.memory else {}
    rows = _rows(timings, built, memory)
    sweep = _dataset_sweep(config, artifact, run_work, paths, device, log) if paths and config.dataset_sizes else []

    report: dict[str, Any] = {
        "machine": machine,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "model": {"name": model.name, "artifact": str(model.artifact), "keras": str(model.keras_path or ""),
                  "input_size": list(artifact.input_size), "target_layer": artifact.manifest["target_layer"],
                  "preprocessing": model.preprocessing, "export_seconds": model.export_seconds,
                  "methods": list(_methods_of(built)),
                  "files": sorted({k.split("/")[0] for k in artifact.manifest.get("files", {})})},
        "checks": checks, "skipped": built.skipped, "results": rows, "dataset_sweep": sweep,
        "precision_gate": artifact.manifest.get("precision_gate"),
    }
    report["targets"] = targets(report)
    report["wall_seconds"] = time.perf_counter() - wall
    if config.json_path:
        Path(config.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if config.plot_path:
        from gradcam_engine.bench.report.chart import draw_chart
        draw_chart(report, Path(config.plot_path))
    return report


_PRESETS: dict[tuple[bool, bool], dict[str, Any]] = {
    # (quick, hardware): sized so --quick with the seed ResNet50 (fp32, int8, bf16 and end to end) fits in about 15
    # minutes on 2 quiet CPU cores, export included
    (True, False): dict(batch_sizes=(1, 8, 32), images=32, reference_images=8, reps=5, e2e_images=32,
                        e2e_batch_size=16, dataset_sizes=(200, 2000)),
    (False, False): dict(batch_sizes=(1, 8, 16, 32, 64), images=64, reference_images=16, reps=7, e2e_images=256,
                         e2e_batch_size=32, dataset_sizes=(200, 2000)),
    (True, True): dict(batch_sizes=(1, 8, 32), images=32, reps=5, dataset_sizes=()),
    (False, True): dict(batch_sizes=(1, 8, 32, 64, 128), images=128, reps=7, dataset_sizes=()),
}


def preset(quick: bool = False, hardware: bool = False, **overrides: Any) -> BenchConfig:
    """The quick or full configuration (model, or hardware mode), with explicit options laid over it."""
    values = {**_PRESETS[(quick, hardware)], **{k: v for k, v in overrides.items() if v is not None}}
    return BenchConfig(quick=quick, hardware=hardware, **values)
