"""Ground truth for a run: class labels and object boxes, read from CSV or COCO JSON and matched to the run's inputs.

An entry names an input in one of two ways: exactly as the results' `path` column spells it, or by a path that
names the same file once resolved as the run resolves the lines of a path list: relative to the annotation file's
own folder (or to `root` when given), compared after normalising (`a/./b`, `a//b`) and, for local paths, made
absolute (a relative results path from the directory the run read it from). A tar member is `ARCHIVE.tar::MEMBER`,
the archive part resolved the same way. Nothing is matched by file name alone: two inputs may share one.

Labels: a class name or index. Boxes: x0, y0, x1, y1 in original pixels after EXIF orientation (x1, y1 exclusive).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import numpy as np

from gradcam_engine.engine.errors import UserError
from gradcam_engine.engine.inputs import TAR_SEPARATOR, split_tar_key
from gradcam_engine.engine.storage import is_uri, storage_for

_SHOWN = 5  # offending entries quoted in one error message


class AnnotationError(UserError):
    """A labels or boxes file that cannot be used as given; the message names the file, the line and the fix."""


def file_digest(path: str | Path) -> str:
    """sha256 of an annotation file, so evaluating against an edited file is noticed."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _identity(location: str) -> str:
    """One spelling per file: URIs normalised by their store, local paths made absolute and normalised."""
    if is_uri(location):
        return storage_for(location).identity(location)
    return os.path.normpath(os.path.abspath(location))


def _key_identity(key: str) -> str:
    try:
        archive, member = split_tar_key(key)
    except ValueError:
        return _identity(key)
    return _identity(archive) + TAR_SEPARATOR + posixpath.normpath(member)


class PathMatcher:
    """Finds the input of the run an annotation entry names (see the module docstring for the rules)."""

    def __init__(self, keys: Iterable[str], locate: Callable[[str], str] = lambda key: key):
        self.keys = set(keys)
        self.locate = locate  # results path -> where the run read it (engine.run_view.RunView.item)
        self._identities: dict[str, str] | None = None  # built on the first entry that is not spelt as a key

    @property
    def _by_identity(self) -> dict[str, str]:
        if self._identities is None:
            self._identities = {}
            for key in sorted(self.keys):
                self._identities.setdefault(_key_identity(self.locate(key)), key)
        return self._identities

    def match(self, entry: str, base_dir: str) -> str | None:
        """The results path `entry` names, or None; `base_dir` is where relative entries start."""
        if entry in self.keys:
            return entry
        try:
            archive, member = split_tar_key(entry)
        except ValueError:
            archive, member = entry, None
        if not is_uri(archive) and not os.path.isabs(archive):
            archive = storage_for(base_dir).resolve(_as_list_location(base_dir), archive)
        identity = _identity(archive) + ("" if member is None else TAR_SEPARATOR + posixpath.normpath(member))
        return self._by_identity.get(identity)


def _as_list_location(base_dir: str) -> str:
    """A location inside base_dir: storage.resolve takes the path of a list file and uses its folder."""
    return base_dir.rstrip("/") + "/_" if is_uri(base_dir) else os.path.join(base_dir, "_")


def base_dir_of(path: str | Path, root: str | None) -> str:
    """Where an annotation file's relative paths start: `root` when given, else the file's own folder."""
    return root if root else os.path.dirname(os.path.abspath(path))


# --- labels -----------------------------------------------------------------------------------------------------------

@dataclass
class Labels:
    """Class index per results path, and what the source held that matched no input."""

    by_path: dict[str, int]
    source: str
    listed: int = 0      # entries in the file (or inputs looked at)
    unmatched: int = 0   # entries naming no input of the run
    unlabelled: list[str] = field(default_factory=list)  # inputs the source gives no label (folders: no parent)


def class_index(value: str, class_names: list[str]) -> int | None:
    """A label as written -> the class index: a class name first, else an index in range; None if neither."""
    value = value.strip()
    if value in class_names:
        return class_names.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(class_names):
        return int(value)
    return None


def _unknown_labels(unknown: dict[str, str], class_names: list[str], what: str) -> AnnotationError:
    shown = ", ".join(f"{label!r} ({where})" for label, where in list(unknown.items())[:_SHOWN])
    more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
    names = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    return AnnotationError(f"{what}: labels that are neither a class name nor an index 0..{len(class_names) - 1} of "
                           f"the model: {shown}{more}; the model's classes are {names}")


def read_labels(path: str | Path, matcher: PathMatcher, class_names: list[str], root: str | None = None) -> Labels:
    """A CSV with a header holding `path` and `label` (other columns are ignored)."""
    rows = _csv_rows(path, ("path", "label"))
    base = base_dir_of(path, root)
    labels = Labels(by_path={}, source=str(path))
    unknown: dict[str, str] = {}
    seen_at: dict[str, int] = {}
    lookup = {str(i): i for i in range(len(class_names))} | {name: i for i, name in enumerate(class_names)}
    for line, (entry, label) in rows:
        labels.listed += 1
        index = lookup.get(label)
        if index is None:
            index = class_index(label, class_names)
        if index is None:
            unknown.setdefault(label, f"line {line}")
            continue
        key = matcher.match(entry, base)
        if key is None:
            labels.unmatched += 1
            continue
        if labels.by_path.setdefault(key, index) != index:
            raise AnnotationError(f"{path}: line {line}: {entry} is labelled again, differently (first on line "
                                  f"{seen_at[key]}); give each image one label")
        seen_at.setdefault(key, line)
    if unknown:
        raise _unknown_labels(unknown, class_names, str(path))
    _require_some(labels.by_path, labels.listed, path, "labels")
    return labels


def labels_from_folders(keys: Iterable[str], class_names: list[str]) -> Labels:
    """Each input's label is the name of the folder that holds it (ImageFolder: ROOT/CLASS/IMAGE); a tar member's
    is the folder inside the archive. An input with no such folder is unlabelled, not guessed."""
    labels = Labels(by_path={}, source="folders")
    unknown: dict[str, str] = {}
    for key in keys:
        labels.listed += 1
        folder = parent_folder(key)
        if not folder:
            labels.unlabelled.append(key)
            continue
        if folder not in class_names:
            unknown.setdefault(folder, key)
            continue
        labels.by_path[key] = class_names.index(folder)
    if unknown:
        raise _unknown_labels(unknown, class_names, "--labels-from-folders: folder names")
    return labels


def parent_folder(key: str) -> str:
    """Name of the folder holding an input: the member's folder for a tar member ('' at the archive's top)."""
    try:
        _, member = split_tar_key(key)
        return posixpath.basename(posixpath.dirname(member))
    except ValueError:
        pass
    if is_uri(key):
        return posixpath.basename(posixpath.dirname(urlsplit(key).path))
    return os.path.basename(os.path.dirname(os.path.normpath(key)))


# --- boxes ------------------------------------------------------------------------------------------------------------

@dataclass
class Boxes:
    """Boxes per results path as float [k, 4] (x0, y0, x1, y1), and what the source held that matched nothing."""

    by_path: dict[str, np.ndarray]
    source: str
    listed: int = 0              # box entries (or annotated images, for COCO) in the file
    unmatched: int = 0           # entries naming no input of the run
    empty: int = 0               # zero-area boxes, ignored
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # COCO's width, height per path

    def owner_arrays(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For a batch of results paths: (boxes [M, 4], owner [M] = position in `paths`, has_boxes [len(paths)])."""
        found = [(i, self.by_path[p]) for i, p in enumerate(paths) if p in self.by_path]
        has = np.zeros(len(paths), bool)
        if not found:
            return np.zeros((0, 4)), np.zeros(0, np.int64), has
        has[[i for i, _ in found]] = True
        boxes = np.concatenate([b for _, b in found])
        owner = np.repeat([i for i, _ in found], [len(b) for _, b in found])
        return boxes, owner, has


def read_boxes(path: str | Path, matcher: PathMatcher, root: str | None = None) -> Boxes:
    """A CSV with header `path,x0,y0,x1,y1` (one row per box; other columns ignored) or a COCO JSON file."""
    text = _read_text(path)
    if str(path).lower().endswith(".json") or text.lstrip().startswith("{"):
        return _coco_boxes(path, text, matcher, root)
    base = base_dir_of(path, root)
    found: dict[str, list[tuple[float, ...]]] = {}
    result = Boxes(by_path={}, source=str(path))
    for line, (entry, *corners) in _csv_rows(path, ("path", "x0", "y0", "x1", "y1"), text):
        result.listed += 1
        try:
            x0, y0, x1, y1 = map(float, corners)
        except ValueError:
            raise AnnotationError(f"{path}: line {line}: x0, y0, x1, y1 must be numbers, got "
                                  f"{', '.join(corners)}") from None
        if not math.isfinite(x0 + y0 + x1 + y1):
            raise AnnotationError(f"{path}: line {line}: box coordinates must be finite numbers")
        if x1 < x0 or y1 < y0:
            raise AnnotationError(f"{path}: line {line}: x1 < x0 or y1 < y0 ({x0:g}, {y0:g}, {x1:g}, {y1:g}); the "
                                  "columns are two corners, not a corner with a width and height")
        key = matcher.match(entry, base)
        if key is None:
            result.unmatched += 1
        elif x1 == x0 or y1 == y0:
            result.empty += 1
        else:
            found.setdefault(key, []).append((x0, y0, x1, y1))
    result.by_path = {k: np.asarray(v, np.float64) for k, v in found.items()}
    _require_some(result.by_path, result.listed - result.empty, path, "boxes")
    return result


def _coco_boxes(path: str | Path, text: str, matcher: PathMatcher, root: str | None) -> Boxes:
    """COCO detection JSON: `images` (id, file_name, width, height) and `annotations` (image_id, bbox = [x, y, w,
    h]); every annotation of an image is one of its boxes, crowd regions included."""
    try:
        data: Any = json.loads(text)
        images = {int(im["id"]): im for im in data["images"]}
        annotations = data.get("annotations") or []
    except (ValueError, KeyError, TypeError) as e:
        raise AnnotationError(f"{path}: not a COCO file with images (id, file_name) and annotations ({e})") from None
    base = base_dir_of(path, root)
    keys: dict[int, str | None] = {}
    result = Boxes(by_path={}, source=str(path))
    for image_id, image in images.items():
        key = matcher.match(str(image.get("file_name", "")), base)
        keys[image_id] = key
        result.listed += 1
        if key is None:
            result.unmatched += 1
        elif image.get("width") and image.get("height"):
            result.sizes[key] = (int(image["width"]), int(image["height"]))
    found: dict[str, list[tuple[float, ...]]] = {}
    for n, annotation in enumerate(annotations):
        try:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            key = keys[int(annotation["image_id"])]
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{path}: annotations[{n}]: needs image_id of a listed image and bbox [x, y, w, h]"
                                  ) from None
        if not np.isfinite([x, y, w, h]).all() or w < 0 or h < 0:
            raise AnnotationError(f"{path}: annotations[{n}]: bbox {annotation['bbox']} is not [x, y, w, h] with "
                                  "w, h >= 0")
        if key is None:
            continue
        if w == 0 or h == 0:
            result.empty += 1
        else:
            found.setdefault(key, []).append((x, y, x + w, y + h))
    result.by_path = {k: np.asarray(v, np.float64) for k, v in found.items()}
    _require_some({k: 1 for k, v in keys.items() if v is not None}, result.listed, path, "boxes")
    return result


# --- reading ----------------------------------------------------------------------------------------------------------

def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror})") from None


def _csv_rows(path: str | Path, required: tuple[str, ...],
              text: str | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, the required columns' values in order) of a CSV whose header names them; blank lines skipped."""
    reader = csv.reader(io.StringIO(_read_text(path) if text is None else text))
    header = next(reader, None)
    columns = [c.strip() for c in header] if header else []
    missing = [c for c in required if c not in columns]
    if missing:
        found = ",".join(columns) if columns else "an empty file"
        raise AnnotationError(f"{path}: the first line must be a header with columns {','.join(required)} "
                              f"(found {found!r})")
    index = [columns.index(c) for c in required]
    rows = []
    width = len(columns)
    for record in reader:
        if len(record) < width:
            if not "".join(record).strip():
                continue  # a blank line
            raise AnnotationError(f"{path}: line {reader.line_num}: {len(record)} fields, the header has {width}")
        rows.append((reader.line_num, tuple(record[i].strip() for i in index)))
    return rows


def _require_some(matched: dict[str, Any], listed: int, path: str | Path, what: str) -> None:
    """A file none of whose entries names an input of the run is a mistake (other paths, other root), not data."""
    if listed and not matched:
        raise AnnotationError(f"{path}: none of its {listed} {what} names an input of the run; paths must be as in "
                              "the results' path column, or relative to the file's folder (or to --root)")
