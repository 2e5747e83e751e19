"""Which precision a run uses, and what it says about it: `--precision fast` picks a reduced precision only where the
CPU computes it in hardware and export's precision gate passed it; an explicit reduced precision the gate never
judged, or one this CPU runs badly, runs with a one-line note (stderr and run.json); what cannot run is refused.

CPU features and the oneDNN switch are simulated (cpu_flags, onednn_enabled); the computation never is.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.engine import bf16, cpu
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.session import X64_QUANT_PRECISION, GradCAMSession, SessionOptions
from engine_support import SmallArtifact, shared_artifact, write_scenes
from precision_support import DemoPrecisions, demo_precisions, held_out_scenes, pearson, tf_can_run_bf16

NO_VNNI = frozenset({"sse4_2", "avx2", "fma", "avx512f"})   # AVX2/AVX-512 without VNNI or AMX (Skylake-SP-like)
NOT_JUDGED = "not judged against fp32 on your images; export with --precision fp32,bf16 --calibrate"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallArtifact:
    """An fp32-only artifact: exported without any reduced precision, so nothing was judged by the gate."""
    art = shared_artifact(tmp_path_factory)
    assert "precision_gate" not in art.manifest
    return art


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPrecisions:
    return demo_precisions(tmp_path_factory)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("choice_scenes")
    write_scenes(folder, [(96, 64), (80, 80), (120, 90), (64, 96)])
    return folder


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU as one with native bf16 (and VNNI), so the computation runs (natively or emulated by oneDNN)."""
    if not tf_can_run_bf16():
        pytest.skip("this CPU has neither bf16 units nor AVX-512: TensorFlow cannot compute bf16 here at all")
    flags = cpu.cpu_flags() | {"avx512_bf16", "avx512_vnni"}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)


@pytest.fixture
def no_vnni_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_VNNI)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`gradcam run ARGS`: exit code and the lines it wrote to stderr."""
    from gradcam_engine.cli.main import main

    capsys.readouterr()
    code = main(["run", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def _x64_quant_precision(session: GradCAMSession) -> str | None:
    """The ONNX Runtime session's u8u8 setting, None when it was never set."""
    try:
        return session.backend.session.get_session_options().get_session_config_entry(X64_QUANT_PRECISION)
    except RuntimeError:  # "SessionOptions does not have configuration with key"
        return None


def test_fast_runs_fp32_on_a_native_bf16_cpu_when_bf16_was_never_judged(small: SmallArtifact, bf16_cpu: None,
                                                                         scenes: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    session = GradCAMSession(small.root, SessionOptions(backend="tf", precision="fast"))
    assert session.precision == "fp32"
    assert session.precision_note == f"--precision fast ran fp32, not bf16: {NOT_JUDGED} IMAGES to judge it"
    code, err = _run([str(small.root), str(scenes), "--out", str(tmp_path / "r"), "--backend", "tf",
                      "--precision", "fast"], capsys)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert code == 0 and info["precision"] == "fp32" and info["counts"]["ok"] == 4
    assert info["precision_note"] == session.precision_note and err == [f"gradcam run: {session.precision_note}"]


def test_explicit_bf16_never_judged_runs_and_says_so_in_one_line(small: SmallArtifact, bf16_cpu: None, scenes: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([str(small.root), str(scenes), "--out", str(tmp_path / "r"), "--backend", "tf",
                      "--precision", "bf16"], capsys)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert code == 0 and info["precision"] == "bf16" and info["counts"]["ok"] == 4
    assert info["precision_note"].startswith(f"--precision bf16: {NOT_JUDGED}")
    assert len(err) == 1 and err[0] == f"gradcam run: {info['precision_note']}"


def test_fast_picks_bf16_and_says_nothing_where_the_gate_passed_it(demo: DemoPrecisions, bf16_cpu: None) -> None:
    assert demo.manifest["precision_gate"]["results"][C.BF16_GATE_LABEL]["passed"]
    session = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="fast"))
    assert session.precision == "bf16" and session.precision_note == ""
    assert GradCAMSession(demo.root, SessionOptions(backend="tf", precision="bf16")).precision_note == ""


def test_a_failed_gate_entry_keeps_fast_off_bf16_and_int8(demo: DemoPrecisions, bf16_cpu: None,
                                                          tmp_path: Path) -> None:
    import shutil

    root = Path(shutil.copytree(demo.root, tmp_path / "a"))
    manifest = json.loads((root / C.MANIFEST).read_text())
    for label in (C.BF16_GATE_LABEL, C.ONNX_INT8_FILE):  # as export writes a file kept with --keep-failing
        manifest["precision_gate"]["results"][label].update(passed=False, failed=["cam_corr_mean"])
    (root / C.MANIFEST).write_text(json.dumps(manifest))
    for backend, reduced in (("tf", "bf16"), ("onnx", "int8")):
        fast = GradCAMSession(root, SessionOptions(backend=backend, precision="fast"))
        assert fast.precision == "fp32" and f"not {reduced}: it failed the precision gate" in fast.precision_note
        explicit = GradCAMSession(root, SessionOptions(backend=backend, precision=reduced))
        assert explicit.precision == reduced and "failed the precision gate against fp32 (cam_corr_mean" in \
            explicit.precision_note


def test_fast_runs_fp32_without_int8_dot_product_units_and_says_why(demo: DemoPrecisions, no_vnni_cpu: None,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(demo.scenes.glob("*.jpg"))[:8]
    code, err = _run([str(demo.root), *map(str, files), "--out", str(tmp_path / "r"), "--precision", "fast"], capsys)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert code == 0 and info["precision"] == "fp32" and info["counts"]["ok"] == 8
    assert info["precision_note"].startswith("--precision fast ran fp32, not int8: this CPU has none of "
                                             "avx512_vnni, avx_vnni, amx_int8")
    assert err == [f"gradcam run: {info['precision_note']}"]


def test_explicit_int8_without_vnni_runs_the_exact_path_with_a_warning(demo: DemoPrecisions, no_vnni_cpu: None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    images, _, _ = held_out_scenes(64)
    session = GradCAMSession(demo.root, SessionOptions(precision="int8"))
    assert session.precision == "int8"
    note = session.precision_note
    assert note.startswith("--precision int8: this CPU has none of avx512_vnni, avx_vnni, amx_int8")
    assert "exact u8u8 path" in note and "\n" not in note
    assert _x64_quant_precision(session) == "1"
    fp32 = GradCAMSession(demo.root, SessionOptions(precision="fp32"))({C.IMAGES: images})
    exact = session({C.IMAGES: images, C.CLASS_INDEX: fp32[C.TARGET_CLASS]})
    assert pearson(fp32[C.CAM], exact[C.CAM]).mean() >= 0.98          # the gate's int8 limit
    assert np.abs(fp32[C.CAM] - exact[C.CAM]).max() > 1e-3             # int8 really ran
    monkeypatch.undo()  # this CPU as it is: where it has VNNI, the exact path gives VNNI's own (exact) results
    if cpu.native_int8():
        default = GradCAMSession(demo.root, SessionOptions(precision="int8"))
        assert default.precision_note == ""
        assert _x64_quant_precision(default) is None
        np.testing.assert_allclose(default({C.IMAGES: images, C.CLASS_INDEX: fp32[C.TARGET_CLASS]})[C.CAM],
                                   exact[C.CAM], atol=1e-5)


def test_fp32_calls_never_run_under_a_concurrent_bf16_call(demo: DemoPrecisions, bf16_cpu: None) -> None:
    """oneDNN's bf16 switch is process-wide: fp32 calls on one thread while bf16 calls run on another stay fp32."""
    images, _, _ = held_out_scenes(32)
    fp32 = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="fp32"))
    half = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="bf16"))
    expected = fp32({C.IMAGES: images})
    rounded = half({C.IMAGES: images, C.CLASS_INDEX: expected[C.TARGET_CLASS]})
    assert np.abs(rounded[C.PREDICTIONS] - expected[C.PREDICTIONS]).max() > 1e-3  # bf16 is told apart from fp32
    done = threading.Event()
    bf16_calls = []

    def bf16_loop() -> None:
        while not done.is_set():
            bf16_calls.append(half({C.IMAGES: images, C.CLASS_INDEX: expected[C.TARGET_CLASS]})[C.PREDICTIONS])

    worker = threading.Thread(target=bf16_loop)
    worker.start()
    try:
        got = [fp32({C.IMAGES: images})[C.PREDICTIONS] for _ in range(12)]
    finally:
        done.set()
        worker.join()
    assert len(bf16_calls) >= 3  # the two really ran interleaved
    for predictions in got:
        np.testing.assert_array_equal(predictions, expected[C.PREDICTIONS])
    for predictions in bf16_calls:  # and bf16 stayed bf16
        np.testing.assert_array_equal(predictions, rounded[C.PREDICTIONS])


def test_bf16_is_refused_when_tensorflow_onednn_is_off(small: SmallArtifact, bf16_cpu: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16, "onednn_enabled", lambda: False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    with pytest.raises(RunError, match=r"oneDNN kernels are off \(TF_ENABLE_ONEDNN_OPTS=0\).*unset TF_ENABLE"):
        GradCAMSession(small.root, SessionOptions(backend="tf", precision="bf16"))
    fast = GradCAMSession(small.root, SessionOptions(backend="tf", precision="fast"))
    assert fast.precision == "fp32" and "TF_ENABLE_ONEDNN_OPTS=0" in fast.precision_note
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")  # off by TensorFlow's own choice (a CPU without AVX-512)
    with pytest.raises(RunError, match=r"oneDNN kernels are off on this CPU .*; run fp32, or bf16 on a CPU with"):
        GradCAMSession(small.root, SessionOptions(backend="tf", precision="bf16"))


def test_bf16_on_a_cuda_device_is_refused_pointing_to_fp16(small: SmallArtifact, tmp_path: Path, scenes: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import tensorflow as tf

    listed = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",  # TensorFlow sees a GPU; nothing ever runs on it
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else listed(kind))
    code, err = _run([str(small.root), str(scenes), "--out", str(tmp_path / "r"), "--backend", "tf", "--device",
                      "cuda", "--precision", "bf16"], capsys)
    assert code == 2 and len(err) == 1
    assert "--precision bf16 runs on CPU (TensorFlow's oneDNN) from the fp32 SavedModel; on a GPU use fp16" in err[0]
    assert not (tmp_path / "r" / "results").exists()


def test_int8_on_tensorflow_is_refused_pointing_to_onnx(demo: DemoPrecisions, tmp_path: Path, scenes: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([str(demo.root), str(scenes), "--out", str(tmp_path / "r"), "--backend", "tf",
                      "--precision", "int8"], capsys)
    assert code == 2 and err == ["gradcam run: error: --precision int8: the int8 file is an ONNX graph; "
                                 "use --backend onnx"]
    assert not (tmp_path / "r" / "results").exists()


@pytest.mark.parametrize("machine", ["no_native_bf16", "onednn_off"])
def test_the_bench_skips_bf16_with_its_reason_where_it_cannot_run(small: SmallArtifact, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  machine: str) -> None:
    """`gradcam bench` and the pytest-benchmark suite (which requires every contender_specs entry to build) must not
    fail on such a machine: bf16 is not asked of it, and the skip says why."""
    from gradcam_engine.bench.contenders.models import BenchModel
    from gradcam_engine.bench.main import _e2e_variants, _export_request, build_contenders, contender_specs, preset
    from gradcam_engine.engine.artifact import load_artifact

    if machine == "no_native_bf16":
        monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_VNNI)
        reason = "neither avx512_bf16 nor amx_bf16"
    else:
        flags = cpu.cpu_flags() | {"avx512_bf16"}
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
        monkeypatch.setattr(bf16, "onednn_enabled", lambda: False)
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
        reason = "TF_ENABLE_ONEDNN_OPTS=0"
    config = preset(quick=True, model=str(small.root), backends=("tf", "e2e"), precisions=("fp32", "bf16"),
                    device="cpu", work_dir=str(tmp_path))
    artifact = load_artifact(small.root)
    specs = contender_specs(config, artifact, has_keras=False)
    assert specs and all(s.precision == "fp32" for s in specs)          # nothing in bf16 is required
    assert ("tf", "bf16") not in _e2e_variants(config, artifact, "cpu")
    assert _export_request(config, tmp_path)[0] == "fp32"              # nor judged at export
    model = BenchModel("small", small.root, None, tmp_path / "cache", 0.0, "none")
    built = build_contenders(config, model, artifact, log=lambda _: None)
    assert [c.name for c in built.contenders] == ["gradcam tf-cpu"]
    bf16_skips = [s for s in built.skipped if "gradcam tf-cpu bf16" in s["contender"]]
    assert len(bf16_skips) == 1 and reason in bf16_skips[0]["reason"]
    assert all(s.precision != "bf16" for s in built.specs.values())
