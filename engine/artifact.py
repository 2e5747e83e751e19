"""Reading an exported artifact: its manifest, checked for what a run relies on, against the sha256 of every file the
chosen runtime loads, and against the graph it describes.

Lives in engine/ (no TensorFlow) because the engine loads artifacts; export/ writes them with the same helpers.
A manifest is not trusted blindly: `load_artifact` checks its shape (input size, classes, outputs), `verify_files`
refuses a model file the checksum list does not cover, and `check_graph` compares the manifest with the inputs,
outputs and metadata of the graph a backend loaded, before any image is read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import ArtifactError, one_line

__all__ = ["Artifact", "ArtifactError", "GraphSignature", "check_graph", "check_manifest", "file_table",
           "load_artifact", "sha256_file", "verify_files"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large models do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(root: Path, relative: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each file under root (directories expanded), keyed by POSIX relative path."""
    table: dict[str, dict[str, Any]] = {}
    for rel in relative:
        p = root / rel
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            table[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return table


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.manifest["input"]["height"]), int(self.manifest["input"]["width"])

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.get("class_names")
        return list(names) if names else [str(i) for i in range(int(self.manifest["num_classes"]))]

    @property
    def methods(self) -> tuple[str, ...]:
        """The CAM methods of `cams`, in order (`cam` is the first); an artifact exported before there were several
        lists none and computes Grad-CAM."""
        return tuple(self.manifest.get("methods") or (C.DEFAULT_METHOD,))

    @property
    def checksum(self) -> str:
        """One digest for the whole artifact: the manifest's own sha256 (it lists every file's)."""
        return sha256_file(self.root / C.MANIFEST)

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return any(k == name or k.startswith(name + "/") for k in self.manifest.get("files", {}))


def load_artifact(root: str | Path, verify: list[str] | None = None) -> Artifact:
    """Open an artifact directory and check its manifest; verify the sha256 of the named files or folders (every
    listed file when verify is None)."""
    root = Path(root)
    manifest_path = root / C.MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: not an artifact directory (no {C.MANIFEST}); create one with `gradcam export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({one_line(e)})") from None
    check_manifest(manifest, manifest_path)
    artifact = Artifact(root=root, manifest=manifest)
    verify_files(artifact, sorted(manifest["files"]) if verify is None else verify)
    return artifact


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_manifest(manifest: Any, where: Path) -> None:
    """Refuse a manifest that lacks, or garbles, what a run reads from it; ArtifactError naming the field."""
    def bad(field_name: str, why: str) -> ArtifactError:
        return ArtifactError(f"{where}: {field_name} {why}; re-export the artifact")

    if not isinstance(manifest, dict):
        raise bad("the manifest", "is not a JSON object")
    size = manifest.get("input")
    if not isinstance(size, dict):
        raise bad('"input"', "is missing")
    for key in ("height", "width"):
        if not _positive_int(size.get(key)):
            raise bad(f'"input.{key}"', "is missing or not a positive integer")
    num_classes = manifest.get("num_classes")
    if not _positive_int(num_classes):
        raise bad('"num_classes"', "is missing or not a positive integer")
    names = manifest.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad('"class_names"', "is not a list of names")
        if len(names) != num_classes:
            raise bad('"class_names"', f"has {len(names)} names for {num_classes} classes")
    cam = manifest.get("cam")
    if not isinstance(cam, dict) or not all(_positive_int(cam.get(k)) for k in ("height", "width")):
        raise bad('"cam"', "is missing its height and width")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise bad('"outputs"', "is missing")
    methods = manifest.get("methods")
    if methods is not None and (not isinstance(methods, list) or not methods
                                or not all(isinstance(m, str) and m for m in methods)):
        raise bad('"methods"', "is not a list of CAM method names")
    # An artifact exported before there were several CAM methods lists no methods and has no `cams` output.
    required = C.OUTPUT_NAMES if methods is not None else tuple(n for n in C.OUTPUT_NAMES if n != C.CAMS)
    missing = [name for name in required if name not in {o["name"] for o in outputs}]
    if missing:
        raise bad('"outputs"', f"lacks {', '.join(missing)}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) for m in files.values()):
        raise bad('"files"', "lists no checksums")


def verify_files(artifact: Artifact, names: Sequence[str]) -> None:
    """Check the sha256 of each named file, or of every file under each named folder: every file there must be
    listed in the manifest, so an emptied or shortened checksum list cannot switch the check off."""
    root, files = artifact.root, artifact.manifest["files"]
    for name in names:
        target = root / name
        on_disk = sorted(q for q in target.rglob("*") if q.is_file()) if target.is_dir() else \
            [target] if target.is_file() else []
        prefix = name.rstrip("/") + "/"
        listed = [rel for rel in files if rel == name or rel.startswith(prefix)]
        if not on_disk and not listed:
            raise ArtifactError(f"{target}: missing from the artifact; re-export the artifact")
        for rel in listed:
            if not (root / rel).is_file():
                raise ArtifactError(f"{root / rel}: listed in the manifest but missing; re-export the artifact")
        for path in on_disk:
            meta = files.get(path.relative_to(root).as_posix())
            if meta is None:
                raise ArtifactError(f"{path}: not covered by the checksums in {C.MANIFEST} (\"files\"); "
                                    "re-export the artifact")
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"{path}: checksum mismatch (file changed since export); re-export the artifact")


@dataclass(frozen=True)
class GraphSignature:
    """A loaded graph's inputs and outputs (name -> (dtype, shape), None or a name for a dynamic dimension) and the
    metadata it carries; each backend describes its graph this way for check_graph."""

    inputs: dict[str, tuple[str, list[Any]]]
    outputs: dict[str, tuple[str, list[Any]]]
    metadata: dict[str, str] = field(default_factory=dict)


def _fixed(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim >= 0 else None


def _same_dims(declared: list[Any], actual: list[Any]) -> bool:
    """Equal rank, and equal wherever both sides name a fixed size."""
    if len(declared) != len(actual):
        return False
    return all(_fixed(d) is None or _fixed(a) is None or d == a for d, a in zip(declared, actual))


def check_graph(artifact: Artifact, graph: GraphSignature, file: str) -> None:
    """Compare the manifest with the graph it describes: input size, number of classes, CAM size, every output's
    name and shape, and the class names, preprocessing and target layer the graph records; ArtifactError on any
    difference, before any image is read."""
    manifest = artifact.manifest
    where = artifact.root / file

    def differs(what: str, in_manifest: Any, in_graph: Any) -> ArtifactError:
        return ArtifactError(f"{artifact.root / C.MANIFEST}: {what} is {in_manifest} but {where} has {in_graph}; "
                             "the manifest does not describe this graph (edited?): re-export the artifact")

    missing = [name for name in (*C.INPUT_NAMES, *C.engine_outputs(artifact.methods))
               if name not in {**graph.inputs, **graph.outputs}]
    if missing:
        raise ArtifactError(f"{where}: the graph has no {', '.join(missing)}; not a gradcam-engine graph")
    height, width = artifact.input_size
    images = graph.inputs[C.IMAGES][1]
    if not _same_dims([None, height, width, 3], images):
        raise differs("the input size", f"{height}x{width}", f"input shape {images}")
    predictions = graph.outputs[C.PREDICTIONS][1]
    if not _same_dims([None, manifest["num_classes"]], predictions):
        raise differs('"num_classes"', manifest["num_classes"], f"predictions of shape {predictions}")
    cam = graph.outputs[C.CAM][1]
    if not _same_dims([None, manifest["cam"]["height"], manifest["cam"]["width"]], cam):
        raise differs("the CAM size", f"{manifest['cam']['height']}x{manifest['cam']['width']}", f"cam of shape {cam}")
    cams = graph.outputs.get(C.CAMS)
    if cams is not None and "methods" in manifest and not _same_dims([None, len(artifact.methods)], cams[1][:2]):
        raise differs('"methods"', f"{len(artifact.methods)} methods", f"cams of shape {cams[1]}")
    for declared in manifest["outputs"]:
        actual = graph.outputs.get(declared["name"])
        if actual is not None and isinstance(declared.get("shape"), list) and \
                not _same_dims(declared["shape"], actual[1]):
            raise differs(f'the shape of output {declared["name"]}', declared["shape"], actual[1])
    recorded = {"gradcam.class_names": ('"class_names"', manifest.get("class_names"), json.loads),
                "gradcam.preprocessing": ('"input.preprocessing"', manifest["input"].get("preprocessing"), str),
                "gradcam.target_layer": ('"target_layer"', manifest.get("target_layer"), str)}
    for key, (what, value, parse) in recorded.items():
        if key in graph.metadata:
            try:
                in_graph = parse(graph.metadata[key])
            except ValueError:
                continue
            if in_graph != value:
                raise differs(what, json.dumps(value), json.dumps(in_graph))
