"""The run directory both runners share: what a run is (its fingerprint), what is already done, and run.json.

    RUN_DIR/
      run.json     status, fingerprint of the options that shape rows, options, device, counts, throughput
      results/     Parquet shards (engine.results)
      overlays/    JPEG overlays (engine.overlay)

A resumed run must have the same fingerprint; what is done is read from the committed shards, so either runner can
resume a run the other started.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.inputs import InputItem, InputListing
from gradcam_engine.engine.overlay import OVERLAY_DIR
from gradcam_engine.engine.results import RESULTS_DIR, clean_partial, count_rows, done_paths
from gradcam_engine.engine.run_config import RunConfig

RUN_JSON = "run.json"


@dataclass
class RunSummary:
    """What a run did; also written into run.json."""

    out: str
    images: int
    ok: int
    errors: int
    processed: int
    skipped_resume: int
    skipped_non_image: int
    seconds: float
    images_per_second: float
    device: str
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        resumed = f" ({self.skipped_resume} already done, resumed)" if self.skipped_resume else ""
        return (f"{self.images} images: {self.ok} ok, {self.errors} errors; processed {self.processed} in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} img/s, {self.backend} on {self.device})"
                f"{resumed}. Results: {Path(self.out) / RESULTS_DIR}/ (Parquet), summary {Path(self.out) / RUN_JSON}"
                + (f", overlays {Path(self.out) / OVERLAY_DIR}/" if self.extra.get("overlays") else "") + ".")


def fingerprint(config: RunConfig, artifact_sum: str, class_index: int, precision: str) -> dict[str, Any]:
    """The options that decide what a row contains; a resumed run must match them."""
    return {"artifact_sha256": artifact_sum, "inputs": [str(s) for s in config.inputs],
            "backend": config.session.backend, "precision": precision, "class_index": class_index,
            "overlays": config.overlays, "overlay_method": config.overlay_method}


def library_versions() -> dict[str, str]:
    """The versions that decide the numbers, recorded in run.json."""
    import onnxruntime
    import PIL
    import pyarrow

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "pyarrow": pyarrow.__version__, "pillow": PIL.__version__}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically: a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _options(config: RunConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(config).items()}


class RunDirectory:
    """One run directory: prepared (or refused) before any compute, then started and finished by a runner."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.results = self.out / RESULTS_DIR
        self.overlays = self.out / OVERLAY_DIR
        self.run_json = self.out / RUN_JSON
        self.info: dict[str, Any] = {}

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Create the directory, or check that it holds this same run (else refuse, unless overwriting)."""
        out = self.out
        if out.exists() and overwrite:
            for target in (self.results, self.overlays, self.run_json):
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif self.run_json.is_file():
            previous = json.loads(self.run_json.read_text()).get("fingerprint")
            if previous != fingerprint:
                changed = sorted(k for k in set(fingerprint) | set(previous or {})
                                 if (previous or {}).get(k) != fingerprint.get(k))
                raise RunError(f"{out}: holds a run with different {', '.join(changed)}; use another --out, or "
                               "--overwrite to replace it")
        elif out.exists() and self.results.exists():
            raise RunError(f"{out}: has results but no {RUN_JSON}; use another --out or --overwrite")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{out}: cannot create the run directory ({e.strerror})") from None

    def pending(self, listing: InputListing) -> list[tuple[int, InputItem]]:
        """(listing position, item) of every input without a committed row; what a killed run left half-written
        is deleted first."""
        clean_partial(self.results)
        done = done_paths(self.results)
        return [(i, item) for i, item in enumerate(listing.items) if item.key not in done]

    def start(self, config: RunConfig, fingerprint: dict[str, Any], device: str, precision: str,
              **extra: Any) -> None:
        """Write run.json with status "running" before the first image is read; `extra` adds runner-specific keys
        (and library versions under "versions")."""
        versions = {**library_versions(), **extra.pop("versions", {})}
        self.info = {"status": "running", "fingerprint": fingerprint, "artifact": str(config.artifact),
                     "options": _options(config), **extra, "device": device, "precision": precision,
                     "versions": versions, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.run_json, self.info)

    def finish(self, listing: InputListing, processed: int, seconds: float, device: str, backend: str,
               extra: dict[str, Any]) -> RunSummary:
        """Count what results/ now holds, mark run.json complete with counts and throughput, return the summary.

        Counts come from the results themselves, not this run's tally, so a resumed run reports the whole run.
        """
        counts = count_rows(self.results)
        summary = RunSummary(
            out=str(self.out), images=len(listing.items), ok=counts.get("ok", 0), errors=counts.get("error", 0),
            processed=processed, skipped_resume=len(listing.items) - processed,
            skipped_non_image=listing.skipped_non_image, seconds=seconds,
            images_per_second=processed / seconds if seconds > 0 else 0.0, device=device, backend=backend,
            extra=extra)
        self.info.update(status="complete", counts={"inputs": summary.images, "ok": summary.ok,
                                                    "error": summary.errors,
                                                    "skipped_non_image": summary.skipped_non_image,
                                                    "processed_this_run": summary.processed,
                                                    "already_done": summary.skipped_resume},
                         throughput={"seconds": round(seconds, 3),
                                     "images_per_second": round(summary.images_per_second, 2)},
                         finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(self.run_json, self.info)
        return summary
