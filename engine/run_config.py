"""What a run is asked to do: `RunConfig`, shared by the local and the Ray runner, and how its options are read."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gradcam_engine.engine.decode import DEFAULT_MAX_PIXELS
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.session import SessionOptions

OVERLAYS_ALL = 1 << 62


@dataclass(frozen=True)
class RunConfig:
    """Everything `gradcam run` accepts; the model session's options are nested, not copied."""

    artifact: str
    inputs: Sequence[str]
    out: str
    session: SessionOptions = field(default_factory=SessionOptions)
    batch_size: int = 32
    target: str = "predicted"        # predicted | class index | class name
    overlays: str = "none"           # none | all | N (the first N images)
    overlay_method: str | None = None  # the CAM method overlays show; None: the artifact's first
    workers: int = 0                 # decode threads; 0 = one per core
    shard_size: int = 4096           # rows per Parquet shard (also the resume granularity)
    commit_seconds: float = 60.0     # a shard is also committed once its first row is this old: bounds a kill's loss
    overwrite: bool = False
    max_bytes: int = 256 << 20       # larger files are refused before reading
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None     # None: on a terminal only
    exit_on_second_signal: bool = False  # True (the command line): a second SIGINT/SIGTERM ends the process at once

    def session_options(self, **overrides: object) -> SessionOptions:
        """The session this run uses: a TensorRT engine cache defaults to the run directory (engines are built for
        one GPU and one graph, which is what a run directory holds); the Ray runner overrides device and threads."""
        options = self.session
        if options.trt and not options.trt_cache:
            options = dataclasses.replace(options, trt_cache=str(Path(self.out).resolve() / "trt_cache"))
        return dataclasses.replace(options, **overrides)  # type: ignore[arg-type]

    def check(self) -> None:
        """Refuse option values that can only fail later, or would be taken silently to mean something else."""
        if self.batch_size < 1:
            raise RunError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.shard_size < 1:
            raise RunError(f"--shard-size {self.shard_size}: must be at least 1")
        if not self.commit_seconds > 0:
            raise RunError(f"--commit-seconds {self.commit_seconds:g}: must be more than 0")
        if self.workers < 0:
            raise RunError(f"--workers {self.workers}: must be 0 (one per core) or more")
        if self.session.threads < 0:
            raise RunError(f"--threads {self.session.threads}: must be 0 (the runtime's default) or more")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise RunError("the file size and pixel limits must be positive")
        if not self.inputs:
            raise RunError("no INPUT given")
        parse_overlays(self.overlays)


def resolve_target(target: str, class_names: list[str]) -> int:
    """--target -> the class_index fed to the graph (-1 for the predicted class)."""
    if target == "predicted":
        return -1
    if target.lstrip("-").isdigit():
        index = int(target)
        if not 0 <= index < len(class_names):
            raise RunError(f"--target {target}: class index out of range 0..{len(class_names) - 1}")
        return index
    if target in class_names:
        return class_names.index(target)
    raise RunError(f"--target {target!r}: not 'predicted', an index, or a class name ({', '.join(class_names[:20])})")


def resolve_overlay_method(name: str | None, methods: Sequence[str]) -> int:
    """--overlay-method -> the index of that method among the artifact's (0, the first, when not given)."""
    if name is None:
        return 0
    if name not in methods:
        raise RunError(f"--overlay-method {name}: the artifact has no such CAM method; it has {', '.join(methods)} "
                       "(gradcam export --methods chooses them)")
    return list(methods).index(name)


def parse_overlays(spec: str) -> int:
    """--overlays -> how many of the first inputs get an overlay."""
    if spec == "none":
        return 0
    if spec == "all":
        return OVERLAYS_ALL
    if spec.isdigit():
        return int(spec)
    raise RunError(f"--overlays {spec!r}: use none, all or a number")
