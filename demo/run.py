"""The embedded demo: synthetic scenes with known object boxes -> export the shipped classifier -> `gradcam run`
-> `gradcam evaluate` (the scenes' labels and boxes, written as evaluate's CSVs; faithfulness through the artifact)
-> `gradcam report`. No download."""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam_engine.demo.scenes import CLASS_NAMES, read_scene_files, write_scene_files

MODEL = Path(__file__).with_name("model.keras")
LABELS_CSV = "labels.csv"
FAITHFULNESS = ("drop", "deletion", "insertion")


@dataclass
class DemoReport:
    """What the demo prints; the figures are evaluate's (RUN_DIR/metrics.json)."""

    images: int
    accuracy: float
    pointing_game: float
    pointing_game_correct: float
    run_summary: str
    overlays: Path
    seconds: float
    metrics: dict[str, Any]
    report: Path
    # CAM method -> (pointing game of all images, of correctly classified ones); the first is the one above
    pointing_by_method: dict[str, tuple[float, float]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [self.run_summary,
                 f"Demo: {self.images} synthetic scenes, classification accuracy {self.accuracy:.1%}; pointing game "
                 f"(CAM peak inside the object's box) {self.pointing_game:.1%} of all images, "
                 f"{self.pointing_game_correct:.1%} of correctly classified ones. Overlays: {self.overlays}/ "
                 f"(demo took {self.seconds:.0f} s)."]
        if self.pointing_by_method:
            lines.append("Pointing game per CAM method (all images, correctly classified):"
                         + "".join(f"\n  {name:<10} {everything:6.1%} {correct:6.1%}"
                                   for name, (everything, correct) in self.pointing_by_method.items()))
        for method, m in self.metrics["overall"].items():
            faithfulness = (f"; Average Drop {m['average_drop']:.1%}, Increase in Confidence "
                            f"{m['increase_in_confidence']:.1%}, deletion AUC {m['deletion_auc']:.3f}, insertion AUC "
                            f"{m['insertion_auc']:.3f}" if "average_drop" in m else "")
            lines.append(f"Evaluate ({method}): energy pointing game {m['energy_pointing_game']:.3f}, IoU@0.5 "
                         f"{m['iou']:.3f}{faithfulness}.")
        lines.append(f"Metrics: {self.overlays.parent / 'metrics.json'}")
        lines.append(f"Report: {self.report}")
        return "\n".join(lines)


def write_labels(scene_dir: Path) -> Path:
    """labels.csv (path,label as the class name) next to boxes.csv, paths relative to the folder, as evaluate reads."""
    target = scene_dir / LABELS_CSV
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for path, label, _ in read_scene_files(scene_dir):
            writer.writerow([path.name, CLASS_NAMES[label]])
    return target


def run_demo(out: Path, images: int = 400, seed: int = 2026, overlays: int = 16, batch_size: int = 32,
             backend: str = "onnx", faithfulness: bool = True) -> DemoReport:
    """Generate scenes (once), export the shipped model, run the engine with overlays, evaluate, write the report."""
    from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions
    from gradcam_engine.export import ExportOptions, export_artifact
    from gradcam_engine.report import write_report
    from gradcam_engine.export.methods import method_names

    start = time.perf_counter()
    out = Path(out)
    scene_dir = out / "images"
    if not (scene_dir / "boxes.csv").is_file() or len(read_scene_files(scene_dir)) != images:
        write_scene_files(scene_dir, images, seed)
    labels = write_labels(scene_dir)

    artifact = out / "artifact"
    manifest = export_artifact(MODEL, artifact, ExportOptions(class_names=CLASS_NAMES, overwrite=True,
                                                              methods=method_names()))  # every method, compared
    print(f"exported {MODEL.name}: target layer {manifest['target_layer']}, score {manifest['score']}")
    run_dir = out / "run"
    summary = run_gradcam(RunConfig(artifact=str(artifact), inputs=[str(scene_dir.resolve())], out=str(run_dir),
                                    overlays=str(overlays), batch_size=batch_size,
                                    session=SessionOptions(backend=backend), overwrite=True))
    evaluation = evaluate(EvaluateConfig(run_dir=str(run_dir), labels=str(labels), boxes=str(scene_dir / "boxes.csv"),
                                         faithfulness=FAITHFULNESS if faithfulness else (), batch_size=batch_size,
                                         overwrite=True))
    report = write_report(run_dir)
    metrics = evaluation.info
    overall = metrics["overall"]
    first = overall[metrics["methods"][0]]
    return DemoReport(images=first["images_with_boxes"], accuracy=metrics["classification"]["accuracy"],
                      pointing_game=first["pointing_game"],
                      pointing_game_correct=first.get("pointing_game_correct") or float("nan"),
                      run_summary=summary.text(), overlays=run_dir / "overlays", seconds=time.perf_counter() - start,
                      metrics=metrics, report=report.path,
                      pointing_by_method={m: (overall[m]["pointing_game"],
                                              overall[m].get("pointing_game_correct") or float("nan"))
                                          for m in metrics["methods"]})
