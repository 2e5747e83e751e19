"""Reading an exported artifact: its manifest, checked against the sha256 of every file it lists.

Lives in engine/ (no TensorFlow) because the engine loads artifacts; export/ writes them with the same helpers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import ArtifactError

__all__ = ["Artifact", "ArtifactError", "file_table", "load_artifact", "sha256_file"]

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
    """Open an artifact directory; check the sha256 of the listed files (all of them when verify is None)."""
    root = Path(root)
    manifest_path = root / C.MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: not an artifact directory (no {C.MANIFEST}); create one with `gradcam export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({e})") from None
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    for rel, meta in files.items():
        if verify is not None and not any(rel == v or rel.startswith(v.rstrip("/") + "/") for v in verify):
            continue
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in the manifest but missing; re-export the artifact")
        if sha256_file(p) != meta["sha256"]:
            raise ArtifactError(f"{p}: checksum mismatch (file changed since export); re-export the artifact")
    return Artifact(root=root, manifest=manifest)
