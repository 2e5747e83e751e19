"""The embedded demo: synthetic scenes with known object boxes -> export the shipped classifier -> `gradcam run`
-> accuracy and the pointing game (how often the CAM's peak falls inside the object's box). No download."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from gradcam_engine.demo.scenes import CLASS_NAMES, pointing_hits, read_scene_files, write_scene_files

MODEL = Path(__file__).with_name("model.keras")


@dataclass
class DemoReport:
    """What the demo prints."""

    images: int
    accuracy: float
    pointing_game: float
    pointing_game_correct: float
    run_summary: str
    overlays: Path
    seconds: float
    # CAM method -> (pointing game of all images, of correctly classified ones); the first is the one above
    pointing_by_method: dict[str, tuple[float, float]] = field(default_factory=dict)

    def text(self) -> str:
        methods = "".join(f"\n  {name:<10} {everything:6.1%} {correct:6.1%}"
                          for name, (everything, correct) in self.pointing_by_method.items())
        return (f"{self.run_summary}\n"
                f"Demo: {self.images} synthetic scenes, classification accuracy {self.accuracy:.1%}; pointing game "
                f"(CAM peak inside the object's box) {self.pointing_game:.1%} of all images, "
                f"{self.pointing_game_correct:.1%} of correctly classified ones. Overlays: {self.overlays}/ "
                f"(demo took {self.seconds:.0f} s)."
                + (f"\nPointing game per CAM method (all images, correctly classified):{methods}" if methods else ""))


def run_demo(out: Path, images: int = 400, seed: int = 2026, overlays: int = 16, batch_size: int = 32,
             backend: str = "onnx") -> DemoReport:
    """Generate scenes (once), export the shipped model, run the engine with overlays, score the heatmaps."""
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions
    from gradcam_engine.export import ExportOptions, export_artifact
    from gradcam_engine.export.methods import method_names

    start = time.perf_counter()
    out = Path(out)
    scene_dir = out / "images"
    if not (scene_dir / "boxes.csv").is_file() or len(read_scene_files(scene_dir)) != images:
        write_scene_files(scene_dir, images, seed)
    truth = {str(p): (label, box) for p, label, box in read_scene_files(scene_dir)}

    artifact = out / "artifact"
    manifest = export_artifact(MODEL, artifact, ExportOptions(class_names=CLASS_NAMES, overwrite=True,
                                                              methods=method_names()))  # every method, compared
    print(f"exported {MODEL.name}: target layer {manifest['target_layer']}, score {manifest['score']}")
    summary = run_gradcam(RunConfig(artifact=str(artifact), inputs=[str(scene_dir.resolve())], out=str(out / "run"),
                                    overlays=str(overlays), batch_size=batch_size,
                                    session=SessionOptions(backend=backend), overwrite=True))

    table = ds.dataset(out / "run" / "results", format="parquet").to_table().to_pylist()
    rows = [r for r in table if r["status"] == "ok" and str(Path(r["path"]).resolve()) in truth]
    known = [truth[str(Path(r["path"]).resolve())] for r in rows]
    labels = np.array([label for label, _ in known])
    boxes = np.array([box for _, box in known])
    sizes = np.array([(r["width"], r["height"]) for r in rows])
    predicted = np.array([r["predicted_class"] for r in rows])
    correct = predicted == labels
    by_method = {}
    for i, method in enumerate(manifest["methods"]):  # `cam` is the first; each has its own column when several
        column = "cam" if i == 0 else f"cam_{method}"
        cams = np.stack([np.asarray(r[column], np.float32).reshape(r["cam_height"], r["cam_width"]) for r in rows])
        by_method[method] = pointing_hits(cams, boxes, sizes)
    hits = by_method[manifest["methods"][0]]
    return DemoReport(images=len(rows), accuracy=float(correct.mean()), pointing_game=float(hits.mean()),
                      pointing_game_correct=float(hits[correct].mean()) if correct.any() else float("nan"),
                      run_summary=summary.text(), overlays=out / "run" / "overlays",
                      seconds=time.perf_counter() - start,
                      pointing_by_method={m: (float(h.mean()), float(h[correct].mean()) if correct.any()
                                              else float("nan")) for m, h in by_method.items()})
