"""bf16 on CPU: TensorFlow's oneDNN bf16 on the fp32 SavedModel, close to fp32 on the demo scenes, refused (naming
the missing feature) where the CPU would only emulate it, and never on ONNX Runtime, which has no bf16 kernels.

The feature check is simulated by replacing the CPU's flags; the computation is never simulated. Where the CPU lacks
native bf16 but has AVX-512, oneDNN emulates bf16 with the same rounding (slowly), so the quality test runs there too
with the check bypassed, and it asserts that the results really are bf16's, not fp32's. On a CPU without AVX-512,
TensorFlow leaves its oneDNN kernels off (seen with TensorFlow 2.21 under a Haswell CPU model: oneDNN off, and the
bf16 option then returns fp32's results bit for bit), so bf16 cannot run at all: there the same tests assert that
the run, the session and the export refuse it, rather than skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.engine import contract as C
from gradcam_engine.engine import bf16 as engine_bf16
from gradcam_engine.engine import cpu
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.session import GradCAMSession, SessionOptions
from precision_support import DemoPrecisions, demo_precisions, held_out_scenes, pearson

NO_BF16 = frozenset({"sse4_2", "avx2", "avx512f", "avx512_vnni"})  # a Cascade Lake / Zen 3-like CPU


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPrecisions:
    return demo_precisions(tmp_path_factory)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> bool:
    """This CPU as one with native bf16, so the computation runs (natively or emulated by oneDNN); whether TensorFlow
    can run bf16 here at all (its oneDNN kernels are on: not on a CPU without AVX-512)."""
    flags = cpu.cpu_flags() | {"avx512_bf16"}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    return engine_bf16.onednn_enabled()


def assert_refused_without_onednn(demo: DemoPrecisions) -> None:
    """Without TensorFlow's oneDNN kernels the bf16 option would silently run fp32: bf16 is refused, saying so."""
    with pytest.raises(RunError, match="TensorFlow's oneDNN kernels are off"):
        GradCAMSession(demo.root, SessionOptions(backend="tf", precision="bf16"))


@pytest.fixture
def no_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: NO_BF16)


def test_bf16_is_refused_where_the_cpu_has_no_bf16_units(demo: DemoPrecisions, no_bf16_cpu: None,
                                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gradcam_engine.cli.main import main

    with pytest.raises(RunError, match="neither avx512_bf16 nor amx_bf16"):
        GradCAMSession(demo.root, SessionOptions(backend="tf", precision="bf16"))
    assert main(["run", str(demo.root), str(demo.scenes), "--out", str(tmp_path / "r"), "--backend", "tf",
                 "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "avx512_bf16" in err and "amx_bf16" in err
    assert not (tmp_path / "r" / "results").exists()
    # asked for the fastest precision, TensorFlow on such a CPU runs fp32 rather than emulated bf16
    assert GradCAMSession(demo.root, SessionOptions(backend="tf", precision="fast")).precision == "fp32"


def test_bf16_on_onnx_runtime_is_refused_pointing_to_tensorflow(demo: DemoPrecisions) -> None:
    with pytest.raises(RunError, match="ONNX Runtime has no bf16 kernels.*--backend tf --precision bf16"):
        GradCAMSession(demo.root, SessionOptions(backend="onnx", precision="bf16"))


def test_fast_picks_bf16_on_tensorflow_only_on_a_native_bf16_cpu(demo: DemoPrecisions, bf16_cpu: bool) -> None:
    fast = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="fast")).precision
    assert fast == ("bf16" if bf16_cpu else "fp32")  # without oneDNN, TensorFlow could not run bf16
    assert GradCAMSession(demo.root, SessionOptions(backend="tf", precision="auto")).precision == "fp32"


def test_tensorflow_bf16_agrees_with_fp32_on_demo_scenes(demo: DemoPrecisions, bf16_cpu: bool) -> None:
    if not bf16_cpu:
        assert_refused_without_onednn(demo)
        return
    images, labels, _ = held_out_scenes()
    fp32 = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="fp32"))
    bf16 = GradCAMSession(demo.root, SessionOptions(backend="tf", precision="bf16"))
    full = fp32({C.IMAGES: images})
    own = bf16({C.IMAGES: images})
    same = bf16({C.IMAGES: images, C.CLASS_INDEX: full[C.TARGET_CLASS]})
    assert (full[C.PREDICTIONS].argmax(-1) == labels).mean() >= 0.95  # a trained model: real classes and heatmaps
    assert (full[C.CAM].reshape(len(images), -1).max(-1) == 1.0).mean() >= 0.99
    assert (own[C.PREDICTIONS].argmax(-1) == full[C.PREDICTIONS].argmax(-1)).mean() >= 0.995
    assert pearson(full[C.CAM], same[C.CAM]).mean() >= 0.999
    # bf16 really ran: predictions move by bf16's rounding, far beyond fp32's summation-order noise (1e-4)
    assert np.abs(full[C.PREDICTIONS] - same[C.PREDICTIONS]).max() > 1e-3
    # and the switch is scoped to the bf16 session's calls: fp32 in the same process is still bit-identical fp32
    np.testing.assert_array_equal(fp32({C.IMAGES: images[:64]})[C.CAM], full[C.CAM][:64])


def test_run_backend_tf_precision_bf16_records_it(demo: DemoPrecisions, bf16_cpu: bool, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    out = tmp_path / "run"
    code = main(["run", str(demo.root), str(demo.scenes), "--out", str(out), "--backend", "tf", "--precision", "bf16"])
    if not bf16_cpu:
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "oneDNN kernels are off" in err
        assert not (out / "results").exists()
        return
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    assert info["precision"] == "bf16" and info["fingerprint"]["precision"] == "bf16"
    assert info["counts"]["ok"] == 200


def test_export_records_the_bf16_gate_figures(demo: DemoPrecisions, tmp_path: Path) -> None:
    from gradcam_engine.export import ExportOptions, export_artifact
    from gradcam_engine.export.errors import ExportError
    from precision_support import DEMO_MODEL

    if not engine_bf16.onednn_enabled():  # no AVX-512: TensorFlow's oneDNN is off; export says bf16 cannot be judged
        with pytest.raises(ExportError, match="bf16 check: TensorFlow's oneDNN kernels are off"):
            export_artifact(DEMO_MODEL, tmp_path / "a", ExportOptions(precision="fp32,bf16"))
        assert not (tmp_path / "a").exists()
        assert C.BF16_GATE_LABEL not in demo.manifest.get("precision_gate", {}).get("results", {})
        return
    entry = demo.manifest["precision_gate"]["results"][C.BF16_GATE_LABEL]
    assert entry["passed"] and entry["precision"] == "bf16"
    assert entry["figures"]["cam_corr_mean"] >= 0.999 and entry["figures"]["images"] == 50
    assert entry["cpu"]["native_bf16"] == cpu.native_bf16()
    assert C.BF16_GATE_LABEL not in demo.manifest["precision"]  # no file of its own: the fp32 SavedModel runs it


def test_bf16_check_refuses_when_tensorflow_stays_fp32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CPU where TensorFlow silently keeps fp32 (oneDNN cannot run bf16 there) must not get bf16 figures that are
    fp32's: simulated by making the switch a no-op."""
    from contextlib import nullcontext

    from gradcam_engine.export import ExportOptions, export_artifact
    from gradcam_engine.export.errors import ExportError
    from precision_support import DEMO_MODEL

    monkeypatch.setattr(engine_bf16, "tf_bfloat16", lambda tf: nullcontext())
    monkeypatch.setattr(engine_bf16, "onednn_enabled", lambda: True)  # also where oneDNN is off (a CPU without AVX-512)
    with pytest.raises(ExportError, match="TensorFlow ran the graph in fp32 on this CPU"):
        export_artifact(DEMO_MODEL, tmp_path / "a", ExportOptions(precision="fp32,bf16"))
    assert not (tmp_path / "a").exists()


def test_cpu_features_read_the_same_flags_numpy_dispatches_on() -> None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as numpy_features
    features = cpu.cpu_features()
    assert set(cpu.BF16_FEATURES) | set(cpu.INT8_FEATURES) <= set(features)
    assert features["avx512_bf16"] == bool(numpy_features.get("AVX512BF16"))
    assert features["avx512f"] == bool(numpy_features.get("AVX512F"))
    assert cpu.native_bf16() == (features["avx512_bf16"] or features["amx_bf16"])
