"""The GPU check: one command on a GPU machine measures the engine's GPU path and prints JSON.

Two steps, because the GPU machine has ONNX Runtime but no TensorFlow:

  here:    python -m gradcam_engine.bench.tools.gpu_check prepare [--model seed-resnet50|PATH.keras] --out .gpu
           exports the fused Grad-CAM graph and a forward-only graph of the same model, strips their weights
           (bench/tools/onnx_weights.py) so they travel in one small folder;
  there:   python -m gradcam_engine.bench.tools.gpu_check check .gpu [--batch-sizes 64 128 256] [--json FILE]
           (a checkout that is not installed imports as gradcam_engine through a link:
            mkdir -p /tmp/ns && ln -sfn "$PWD" /tmp/ns/gradcam_engine && export PYTHONPATH=/tmp/ns)
           refills the weights (seeded), derives the fp16 graphs with export/fp16.py, and measures, side by side
           in one process: model-only Grad-CAM vs forward-only img/s for fp32/fp16, host-fed vs IO binding, and
           the same graph with every CAM method vs Grad-CAM alone;
           the engine's own pipelined host-fed path (and CUDA graphs); end to end from JPEG files when Pillow and
           pyarrow are there; and fp16 parity against fp32, every method's map included.

`check --dry-run` runs the same code on the CPU with tiny sizes (the tests do), so the script is known to work
before device time is spent.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from gradcam_engine.bench.contenders.models import SEED_RESNET50
from gradcam_engine.cli.options import default
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import file_table
from gradcam_engine.export.api import ExportOptions

FUSED, FORWARD, FUSED_METHODS, METHODS_JSON = "fused.onnx", "forward.onnx", "fused_methods.onnx", "methods.json"


# --- here: export and strip -------------------------------------------------------------------------------------
def prepare(model_spec: str, out: Path, preprocessing: str, methods: tuple[str, ...] | None = None) -> Path:
    """Export fused (Grad-CAM alone, and with every CAM method) + forward-only graphs of one model and write them
    weight-stripped into `out`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from gradcam_engine.bench.contenders.forward import forward_onnx
    from gradcam_engine.bench.tools.onnx_weights import strip_weights
    from gradcam_engine.export import export_artifact
    from gradcam_engine.export.methods import method_names

    if model_spec == SEED_RESNET50:
        from gradcam_engine.bench.contenders.models import build_seed_resnet50

        model, preprocessing = build_seed_resnet50(), "caffe"
    else:
        model = keras.models.load_model(model_spec, compile=False)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_artifact(model, Path(tmp) / "a", ExportOptions(preprocessing=preprocessing))
        fused = onnx.load(str(Path(tmp) / "a" / C.ONNX_FILE))
        methods = methods or method_names()
        export_artifact(model, Path(tmp) / "m", ExportOptions(preprocessing=preprocessing, methods=methods))
        fused_methods = onnx.load(str(Path(tmp) / "m" / C.ONNX_FILE))
    proto = forward_onnx(model, preprocessing, (manifest["input"]["height"], manifest["input"]["width"]))
    onnx.save(strip_weights(fused), str(out / FUSED))
    onnx.save(strip_weights(proto), str(out / FORWARD))
    onnx.save(strip_weights(fused_methods), str(out / FUSED_METHODS))
    (out / METHODS_JSON).write_text(json.dumps(list(methods)))
    (out / C.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


# --- there: rebuild, then measure ------------------------------------------------------------------------------
def rebuild(prepared: Path, work: Path, seed: int = 0) -> dict[str, Path]:
    """Refill weights, derive fp16 graphs, and lay out a real artifact (manifest with checksums) for the engine."""
    from gradcam_engine.bench.tools.onnx_weights import fill_weights
    from gradcam_engine.export.fp16 import to_fp16

    work.mkdir(parents=True, exist_ok=True)
    fused = fill_weights(onnx.load(str(prepared / FUSED)), seed)
    forward = fill_weights(onnx.load(str(prepared / FORWARD)), seed)
    artifact = work / "artifact"
    artifact.mkdir(exist_ok=True)
    onnx.save(fused, str(artifact / C.ONNX_FILE))
    onnx.save(to_fp16(fused), str(artifact / C.ONNX_FP16_FILE))
    onnx.save(forward, str(work / "forward.onnx"))
    onnx.save(to_fp16(forward), str(work / "forward_fp16.onnx"))
    manifest = json.loads((prepared / C.MANIFEST).read_text())
    manifest["precision"] = {C.ONNX_FILE: "fp32", C.ONNX_FP16_FILE: "fp16"}
    manifest["files"] = file_table(artifact, [C.ONNX_FILE, C.ONNX_FP16_FILE])
    (artifact / C.MANIFEST).write_text(json.dumps(manifest, indent=2))
    paths = {"artifact": artifact, "forward_fp32": work / "forward.onnx", "forward_fp16": work / "forward_fp16.onnx"}
    if (prepared / FUSED_METHODS).is_file():  # a folder prepared before there were several methods has none
        methods = fill_weights(onnx.load(str(prepared / FUSED_METHODS)), seed)
        onnx.save(methods, str(work / "methods.onnx"))
        onnx.save(to_fp16(methods), str(work / "methods_fp16.onnx"))
        paths.update(methods_fp32=work / "methods.onnx", methods_fp16=work / "methods_fp16.onnx")
    return paths


def prepared_methods(prepared: Path) -> tuple[str, ...]:
    """The CAM methods of the prepared all-methods graph; () for a folder prepared before there were several."""
    return tuple(json.loads((prepared / METHODS_JSON).read_text())) if (prepared / METHODS_JSON).is_file() else ()


def _session(path: Path, device: str) -> Any:
    from gradcam_engine.engine.session import onnx_session

    return onnx_session(path, device == "cuda")


def _caller(session: Any, images: np.ndarray, outputs: list[str], bound: bool, device: str) -> Callable[[], None]:
    """One batch through a session: from host memory (plain run) or with the input already on the device."""
    import onnxruntime as ort

    feeds = {C.IMAGES: images}
    if C.CLASS_INDEX in {i.name for i in session.get_inputs()}:
        feeds[C.CLASS_INDEX] = np.full(len(images), -1, np.int32)
    if not bound:
        return lambda: session.run(outputs, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for name in outputs:
        binding.bind_output(name, device)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()
    return call


def _rates(calls: dict[str, Callable[[], None]], batch: int, reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """img/s per contender, repetitions alternated so drift hits every contender alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {k: {"img_s": batch / statistics.median(v), "min_img_s": batch / max(v), "max_img_s": batch / min(v)}
            for k, v in times.items()}


def model_only(paths: dict[str, Path], device: str, batch_sizes: list[int], reps: int, warmup: int,
               methods: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Grad-CAM vs forward-only, and every CAM method vs Grad-CAM alone, same precision, batch and feed."""
    rows = []
    rng = np.random.default_rng(0)
    for precision in ("fp32", "fp16"):
        fused = _session(paths["artifact"] / (C.ONNX_FILE if precision == "fp32" else C.ONNX_FP16_FILE), device)
        forward = _session(paths[f"forward_{precision}"], device)
        many = _session(paths[f"methods_{precision}"], device) if methods else None
        h, w = fused.get_inputs()[0].shape[1:3]
        for batch in batch_sizes:
            images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            for bound in (False, True):
                feed = "io_binding" if bound else "host"
                calls = {"gradcam": _caller(fused, images, list(C.ENGINE_OUTPUTS), bound, device),
                         "forward": _caller(forward, images, [C.PREDICTIONS], bound, device)}
                if many is not None:
                    calls["methods"] = _caller(many, images, list(C.engine_outputs(methods)), bound, device)
                rates = _rates(calls, batch, reps, warmup)
                rows.append({"precision": precision, "batch": batch, "feed": feed,
                             "gradcam_img_s": rates["gradcam"]["img_s"], "forward_img_s": rates["forward"]["img_s"],
                             "ratio": rates["gradcam"]["img_s"] / rates["forward"]["img_s"], "spread": rates})
                if many is not None:
                    rows[-1].update(methods_img_s=rates["methods"]["img_s"],
                                    methods_vs_gradcam=rates["methods"]["img_s"] / rates["gradcam"]["img_s"])
    return rows


def engine_path(paths: dict[str, Path], device: str, batch: int, batches: int, cuda_graph: bool) -> dict[str, Any]:
    """The engine's own host-fed path: GradCAMSession, batches staged one ahead in a thread (copy overlaps compute)."""
    from gradcam_engine.engine.pipeline import prefetch
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    session = GradCAMSession(paths["artifact"], SessionOptions(device=device, precision="fp16" if device == "cuda"
                                                            else "fp32", fixed_batch=batch if cuda_graph else 0,
                                                            cuda_graph=cuda_graph, io_binding=True))
    h, w = session.artifact.input_size
    host = [np.random.default_rng(i).integers(0, 256, (batch, h, w, 3), dtype=np.uint8) for i in range(4)]
    source = ({C.IMAGES: host[i % 4]} for i in range(batches + 3))
    staged = prefetch(session.prepare(b) for b in source)
    for _ in range(3):  # warm-up (and CUDA graph capture)
        session.run_prepared(next(staged))
    t0 = time.perf_counter()
    for prepared in staged:
        session.run_prepared(prepared)
    seconds = time.perf_counter() - t0
    return {"batch": batch, "cuda_graph": cuda_graph, "precision": session.precision, "device": session.device,
            "img_s": batch * batches / seconds}


def fp16_parity(paths: dict[str, Path], device: str, n: int, methods: tuple[str, ...] = ()) -> dict[str, Any]:
    """fp16 vs fp32 on the same images and classes (random weights: CAM agreement is the meaningful figure); with
    methods, every method's map too (Eigen-CAM where its direction is defined, see export.parity)."""
    from gradcam_engine.export.parity import cam_correlation, compare

    full = _session(paths["artifact"] / C.ONNX_FILE, device)
    half = _session(paths["artifact"] / C.ONNX_FP16_FILE, device)
    h, w = full.get_inputs()[0].shape[1:3]
    images = np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    a = dict(zip(C.ENGINE_OUTPUTS, full.run(list(C.ENGINE_OUTPUTS), {C.IMAGES: images,
                                                                      C.CLASS_INDEX: np.full(n, -1, np.int32)})))
    b = dict(zip(C.ENGINE_OUTPUTS, half.run(list(C.ENGINE_OUTPUTS), {C.IMAGES: images,
                                                                      C.CLASS_INDEX: a[C.TARGET_CLASS]})))
    top1 = b[C.PREDICTIONS].argmax(-1) == a[C.PREDICTIONS].argmax(-1)
    report = {"images": n, "top1_agreement": float(top1.mean()),
              "cam_min_correlation": cam_correlation(a[C.CAM], b[C.CAM]),
              "cam_max_abs_diff": float(np.abs(a[C.CAM] - b[C.CAM]).max())}
    if methods:
        names = [C.PREDICTIONS, C.TARGET_CLASS, C.FEATURE_MAPS, C.CAMS]
        feed = {C.IMAGES: images, C.CLASS_INDEX: a[C.TARGET_CLASS]}
        full_m = dict(zip(names, _session(paths["methods_fp32"], device).run(names, feed)))
        half_m = dict(zip(names, _session(paths["methods_fp16"], device).run(names, feed)))
        report["methods"] = list(methods)
        report["cams_max_abs_diff"] = compare(full_m, half_m, methods)["cams_max_abs_diff"]
        report["cams_min_correlation"] = {m: cam_correlation(full_m[C.CAMS][:, i], half_m[C.CAMS][:, i])
                                          for i, m in enumerate(methods)}
    return report


def end_to_end(paths: dict[str, Path], device: str, work: Path, n: int, batch: int) -> dict[str, Any]:
    """JPEG files -> Parquet through run_gradcam, and decode alone, to name the stage that bounds the run."""
    try:
        from PIL import Image  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed here"}
    from concurrent.futures import ThreadPoolExecutor

    from gradcam_engine.engine.decode import decode_image
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions

    folder = work / "jpegs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    base = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(16)]
    for i in range(n):
        Image.fromarray(base[i % 16]).save(folder / f"{i:06d}.jpg", quality=90)
    size = tuple(json.loads((paths["artifact"] / C.MANIFEST).read_text())["input"][k] for k in ("height", "width"))
    files = sorted(folder.glob("*.jpg"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda p: decode_image(p.read_bytes(), size), files))
    decode = n / (time.perf_counter() - t0)
    summary = run_gradcam(RunConfig(artifact=str(paths["artifact"]), inputs=[str(folder)], out=str(work / "run"),
                                    session=SessionOptions(device=device), batch_size=batch, overwrite=True))
    return {"images": n, "decode_only_img_s": decode, "end_to_end_img_s": summary.images_per_second,
            "cores": os.cpu_count(), "precision": summary.backend}


def check(prepared: Path, batch_sizes: list[int], dry_run: bool, out_json: Path | None) -> dict[str, Any]:
    """Everything the GPU check shows, in one process, printed as JSON."""
    try:
        import torch  # loads the CUDA libraries onnxruntime-gpu links against

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    from gradcam_engine.engine.session import cuda_available

    device = "cuda" if cuda_available() and not dry_run else "cpu"
    reps, warmup, n_e2e = (2, 1, 24) if dry_run else (7, 3, 4000)
    methods = prepared_methods(prepared)
    with tempfile.TemporaryDirectory() as tmp:
        paths = rebuild(prepared, Path(tmp))
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"), "gpu": gpu, "device": device,
            "command": "python -m gradcam_engine.bench.tools.gpu_check check " + " ".join(sys.argv[3:]),
            "model_only": model_only(paths, device, batch_sizes, reps, warmup, methods),
            "engine_host_fed": [engine_path(paths, device, b, 4 if dry_run else 50, False) for b in batch_sizes],
            "fp16_parity": fp16_parity(paths, device, 8 if dry_run else 256, methods),
        }
        if device == "cuda":
            report["engine_cuda_graph"] = [engine_path(paths, device, b, 50, True) for b in batch_sizes]
        report["end_to_end"] = end_to_end(paths, device, Path(tmp), n_e2e, batch_sizes[-1] if dry_run else 256)
    best = max(report["model_only"], key=lambda r: r["gradcam_img_s"])
    report["best_model_only"] = {k: best[k] for k in ("precision", "batch", "feed", "gradcam_img_s", "ratio")}
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if out_json:
        out_json.write_text(text)
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m gradcam_engine.bench.tools.gpu_check prepare|check ...`"""
    parser = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.tools.gpu_check")
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="export and strip (needs TensorFlow)")
    p.add_argument("--model", default=SEED_RESNET50, help=f"{SEED_RESNET50} (preprocessing caffe) or a .keras file")
    p.add_argument("--preprocess", default=default(ExportOptions, "preprocessing"), choices=C.PREPROCESSING)
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--methods", nargs="+", help="CAM methods of the all-methods graph (default: every one)")
    c = sub.add_parser("check", help="measure (needs onnxruntime, ideally onnxruntime-gpu)")
    c.add_argument("prepared", type=Path)
    c.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    c.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script itself")
    c.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        print(prepare(args.model, args.out, args.preprocess, tuple(args.methods) if args.methods else None))
    else:
        check(args.prepared, args.batch_sizes, args.dry_run, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
