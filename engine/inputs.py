"""The inputs of a run: which images, in which order, and how to read their bytes.

A run takes specs (directories, glob patterns, path lists, tar shards, single images; local paths or URIs such as
s3://bucket/prefix/) and turns them into one deterministic list of items. Every spec is expanded by the same rules
through `engine.storage`, whatever holds its bytes: a directory or prefix is walked, a `.txt`/`.lst` file is a path
list, a `.tar` file is a shard of images. Each item's key is how the image is named in the results, so the same specs
always give the same rows in the same order.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradcam_engine.engine.errors import InputError, one_line
from gradcam_engine.engine.storage import Kind, Storage, StorageError, is_uri, storage_for

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
PATH_LIST_EXTENSIONS = frozenset({".txt", ".lst"})
TAR_EXTENSION = ".tar"
TAR_SEPARATOR = "::"  # key of a tar member: f"{tar_location}::{member_name}"
MAX_PATH_LIST_BYTES = 1 << 30  # a path list is read whole: 1 GiB is tens of millions of paths

# InputItem kinds
IMAGE = "file"        # an image file or object, named by its path or URI
TAR_MEMBER = "tar"    # an image inside a tar shard

__all__ = ["IMAGE", "TAR_MEMBER", "InputError", "InputItem", "InputListing", "ReadError", "list_inputs",
           "read_bytes", "split_tar_key"]


@dataclass(frozen=True)
class InputItem:
    """One image to process; key names it in the results, kind says how to read it (IMAGE or TAR_MEMBER)."""

    key: str
    kind: str


@dataclass
class InputListing:
    """The items of a run, plus how many files were passed over because they are not images."""

    items: list[InputItem]
    skipped_non_image: int


class ReadError(Exception):
    """The bytes of one item cannot be read; the message names the cause in one line."""


def _extension(storage: Storage, location: str) -> str:
    return os.path.splitext(storage.name(location))[1].lower()


def _is_image(storage: Storage, location: str) -> bool:
    """Tell whether a name has an image extension, so non-images are skipped before any read."""
    return _extension(storage, location) in IMAGE_EXTENSIONS


def list_inputs(specs: Sequence[str]) -> InputListing:
    """Expand the specs, in the order given, into one deduplicated list of items so every run is reproducible."""
    items: list[InputItem] = []
    seen: set[tuple[str, str]] = set()
    skipped = 0
    for spec in specs:
        try:
            found, spec_skipped = _expand_spec(spec)
        except StorageError as exc:
            raise InputError(f"{spec}: {exc}") from None
        skipped += spec_skipped
        for item in found:
            identity = _identity(item)
            if identity not in seen:
                seen.add(identity)
                items.append(item)
    return InputListing(items=items, skipped_non_image=skipped)


def _expand_spec(spec: str) -> tuple[list[InputItem], int]:
    storage = storage_for(spec)
    if is_uri(spec) and glob.has_magic(storage.name(spec)):
        raise InputError(f"{spec}: glob patterns are not supported in URIs; name a prefix or a path list")
    # A path that exists wins over glob syntax, so a file literally named "a[1].jpg" is still found.
    if not is_uri(spec) and not os.path.lexists(spec) and glob.has_magic(spec):
        return _expand_glob(spec)
    info = storage.stat(spec)
    if info.kind == Kind.MISSING:
        raise InputError(f"{spec}: no such file, directory or prefix" if is_uri(spec)
                         else f"{spec}: no such file or directory")
    return _expand_entry(storage, spec, info.kind, explicit=True)


def _expand_entry(storage: Storage, location: str, kind: Kind, explicit: bool) -> tuple[list[InputItem], int]:
    """One named location: a directory is walked, a list read, a shard listed, an image kept (an image named
    explicitly is kept whatever its extension, so it gets a row)."""
    if kind == Kind.DIRECTORY:
        return _walk(storage, location)
    extension = _extension(storage, location)
    if extension in PATH_LIST_EXTENSIONS and explicit:
        if kind != Kind.FILE:  # a FIFO would block the run forever
            raise InputError(f"{location}: a path list must be a regular file")
        return _read_path_list(storage, location), 0
    if extension == TAR_EXTENSION and (explicit or kind == Kind.FILE):
        if kind != Kind.FILE:
            raise InputError(f"{location}: a tar shard must be a regular file")
        return _list_tar(storage, location)
    if explicit or _is_image(storage, location):
        return [InputItem(location, IMAGE)], 0
    return [], 1


def _expand_glob(pattern: str) -> tuple[list[InputItem], int]:
    """Each match is expanded like a directory entry: directories are walked, tar shards listed, images kept."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise InputError(f"{pattern}: no file matches this pattern")
    storage = storage_for(pattern)
    items: list[InputItem] = []
    skipped = 0
    for path in matches:
        if os.path.isdir(path) and os.path.islink(path):  # not followed, as in a directory walk
            continue
        info = storage.stat(path)
        if info.kind == Kind.MISSING:
            continue
        found, found_skipped = _expand_entry(storage, path, info.kind, explicit=False)
        items.extend(found)
        skipped += found_skipped
    return items, skipped


def _walk(storage: Storage, root: str) -> tuple[list[InputItem], int]:
    """Image files under root, in path order; symlinked directories are not followed."""
    files = storage.list_files(root)
    images = [path for path in files if _is_image(storage, path)]
    return [InputItem(path, IMAGE) for path in images], len(files) - len(images)


def _read_path_list(storage: Storage, list_location: str) -> list[InputItem]:
    """One item per non-blank, non-comment line, so every listed path gets a result row; a line that is not a URI
    is relative to the list's own location."""
    try:
        data = storage.read(list_location, MAX_PATH_LIST_BYTES)
        if len(data) > MAX_PATH_LIST_BYTES:
            raise InputError(f"{list_location}: path list over {MAX_PATH_LIST_BYTES} bytes; split it")
        text = data.decode("utf-8")
    except (StorageError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_location}: cannot read the path list ({one_line(exc)})") from None
    lines = (line.strip() for line in text.splitlines())
    return [InputItem(line if is_uri(line) else storage.resolve(list_location, line), IMAGE)
            for line in lines if line and not line.startswith("#")]


def _list_tar(storage: Storage, tar_location: str) -> tuple[list[InputItem], int]:
    """Regular image members in archive order; other non-directory members are counted as skipped."""
    items = []
    skipped = 0
    try:
        with storage.open(tar_location) as raw, tarfile.open(fileobj=raw, mode="r:") as archive:
            for member in archive:
                if member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS:
                    items.append(InputItem(f"{tar_location}{TAR_SEPARATOR}{member.name}", TAR_MEMBER))
                elif not member.isdir():
                    skipped += 1
    except (tarfile.TarError, OSError, StorageError) as exc:
        raise InputError(f"{tar_location}: not a readable tar archive ({one_line(exc)})") from None
    return items, skipped


def _identity(item: InputItem) -> tuple[str, str]:
    if item.kind == TAR_MEMBER:
        tar_location, member = split_tar_key(item.key)
        return item.kind, storage_for(tar_location).identity(tar_location) + TAR_SEPARATOR + member
    return item.kind, storage_for(item.key).identity(item.key)


# The archive's name ends in ".tar" (a URI's may carry options after it), so the first separator after that is the
# boundary, even if the member name holds "::".
_TAR_BOUNDARY = re.compile(r"\.tar(\?[^:]*)?" + re.escape(TAR_SEPARATOR), re.IGNORECASE)


def split_tar_key(key: str) -> tuple[str, str]:
    """Split a tar item's key into the archive's location and the member name."""
    match = _TAR_BOUNDARY.search(key)
    if match is None:
        raise ValueError(f"not a tar member key: {key!r}")
    return key[:match.end() - len(TAR_SEPARATOR)], key[match.end():]


def read_bytes(item: InputItem, max_bytes: int) -> bytes:
    """Read one item's bytes, turning every failure into a ReadError so it becomes an error row, not a crash."""
    if item.kind == TAR_MEMBER:
        return _read_tar_member(item.key, max_bytes)
    storage = storage_for(item.key)
    try:
        info = storage.stat(item.key)
        _check(info.kind, info.size, max_bytes, info.note)
        data = storage.read(item.key, max_bytes)
    except StorageError as exc:
        raise ReadError(str(exc)) from None
    if len(data) > max_bytes:  # grew since stat
        raise ReadError(f"file is over the limit of {max_bytes} bytes")
    return data


def _check(kind: Kind, size: int | None, max_bytes: int, note: str = "") -> None:
    if kind == Kind.MISSING:
        raise ReadError(note or "no such file")
    if kind == Kind.DIRECTORY:
        raise ReadError("is a directory")
    if kind == Kind.SPECIAL:  # a FIFO or device would block or never end
        raise ReadError(note or "not a regular file")
    if size is not None and size > max_bytes:
        raise ReadError(f"file is {size} bytes, over the limit of {max_bytes}")


# --- tar shards -------------------------------------------------------------------------------------------------------
@dataclass
class _OpenTar:
    archive: tarfile.TarFile
    raw: Any
    members: dict[str, tarfile.TarInfo]
    version: tuple[Any, ...]

    def close(self) -> None:
        self.archive.close()
        self.raw.close()


class _ThreadTars(dict[str, _OpenTar]):
    """The archives one thread has open; they are closed when the thread ends and this is collected."""

    def __del__(self) -> None:
        for open_tar in self.values():
            open_tar.close()


# Each thread keeps its own open archives: a TarFile shares one file position and is not safe across threads.
_thread_tars = threading.local()


def _open_tars() -> _ThreadTars:
    tars = getattr(_thread_tars, "tars", None)
    if tars is None:
        tars = _thread_tars.tars = _ThreadTars()
    return tars


def _read_tar_member(key: str, max_bytes: int) -> bytes:
    tar_location, member_name = split_tar_key(key)
    open_tar = _open_tar(tar_location)
    member = open_tar.members.get(member_name)
    if member is None:
        raise ReadError("no such member in the tar archive")
    _check(Kind.DIRECTORY if member.isdir() else Kind.FILE if member.isfile() else Kind.SPECIAL, member.size,
           max_bytes)
    try:
        extracted = open_tar.archive.extractfile(member)
        assert extracted is not None  # isfile() members always extract
        data = extracted.read()
    except (tarfile.TarError, OSError) as exc:
        raise ReadError(f"cannot read the tar member ({one_line(exc)})") from None
    if len(data) != member.size:
        raise ReadError(f"tar archive is truncated ({len(data)} of {member.size} bytes)")
    return data


def _open_tar(tar_location: str) -> _OpenTar:
    storage = storage_for(tar_location)
    try:
        info = storage.stat(tar_location)
    except StorageError as exc:
        raise ReadError(str(exc)) from None
    if info.kind != Kind.FILE:
        _check(info.kind, None, 0, info.note)
    # A tar replaced since it was opened (same location, new object) must be reopened, not read at stale offsets.
    tars = _open_tars()
    cached = tars.get(tar_location)
    if cached is not None and cached.version == info.version:
        return cached
    if cached is not None:
        cached.close()
        del tars[tar_location]
    raw = archive = None
    try:
        raw = storage.open(tar_location)
        archive = tarfile.open(fileobj=raw, mode="r:")
        # A dict, because TarFile.getmember scans the whole member list on every call; later entries win, as in tar.
        members = {member.name: member for member in archive.getmembers()}
    except (tarfile.TarError, OSError, StorageError) as exc:
        for handle in (archive, raw):
            if handle is not None:
                handle.close()
        if isinstance(exc, StorageError):
            raise ReadError(str(exc)) from None
        raise ReadError(f"not a readable tar archive ({one_line(exc)})") from None
    tars[tar_location] = _OpenTar(archive, raw, members, info.version)
    return tars[tar_location]
