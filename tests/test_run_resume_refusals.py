"""A run directory holds one run: resuming it with another backend or precision would mix rows computed two ways, so
it is refused (one line, exit 2 on the command line, rows untouched) unless --overwrite; the same options resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradcam_engine.cli.main import main
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions
from engine_support import SmallArtifact, artifact, export_small_cnn, results_table, write_scenes  # noqa: F401


@pytest.fixture(scope="module")
def both_precisions(tmp_path_factory: pytest.TempPathFactory) -> SmallArtifact:
    return export_small_cnn(tmp_path_factory.mktemp("both") / "small_cnn", precision="both")


def config(art: SmallArtifact, images: Path, out: Path, precision: str, overwrite: bool = False) -> RunConfig:
    return RunConfig(artifact=str(art.root), inputs=[str(images)], out=str(out), progress=False, overwrite=overwrite,
                     session=SessionOptions(device="cpu", precision=precision))


def test_another_backend_on_an_existing_run_directory_is_refused_unless_overwriting(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(64, 64), (80, 60), (30, 90)])
    argv = ["run", str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    before = results_table(tmp_path / "run")
    capsys.readouterr()

    assert main([*argv, "--backend", "tf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different backend" in err[0] and "--overwrite" in err[0], err
    assert results_table(tmp_path / "run").equals(before)

    assert main([*argv, "--backend", "tf", "--overwrite"]) == 0
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["fingerprint"]["backend"] == "tf" and run_json["counts"]["processed_this_run"] == 3


def test_another_precision_on_an_existing_run_directory_is_refused_unless_overwriting(
        both_precisions: SmallArtifact, tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "run"
    write_scenes(images, [(64, 64), (80, 60), (30, 90), (45, 45)])
    first = run_gradcam(config(both_precisions, images, out, precision="fp32"))
    before = results_table(out)

    with pytest.raises(RunError, match=r"different precision; use another --out, or --overwrite") as refused:
        run_gradcam(config(both_precisions, images, out, precision="fp16"))
    assert str(out) in str(refused.value)
    assert results_table(out).equals(before)

    # "auto" on a CPU means fp32: the same run, resumed with nothing left to do.
    again = run_gradcam(config(both_precisions, images, out, precision="auto"))
    assert (first.processed, again.processed, again.skipped_resume) == (4, 0, 4)

    replaced = run_gradcam(config(both_precisions, images, out, precision="fp16", overwrite=True))
    assert (replaced.processed, replaced.ok) == (4, 4) and replaced.backend == "onnx fp16"
