"""The inputs of a run: which images, in which order, and how to read their bytes.

A run takes specs (directories, glob patterns, path lists, tar shards, single images; local paths or URIs such as
s3://bucket/prefix/) and turns them into one deterministic list of items. Every spec is expanded by the same rules
through `engine.storage`, whatever holds its bytes: a directory or prefix is walked, a `.txt`/`.lst` file is a path
list, a `.tar` file is a shard of images. Each item's key is how the image is named in the results, so the same specs
always give the same rows in the same order. Two spellings of one input (relative or absolute, `a/./b`, a folder
reached through a symlink) have one `identity`, which is what deduplicates a listing and tells a resumed run what is
done.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
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

__all__ = ["IMAGE", "TAR_MEMBER", "InputError", "InputItem", "InputListing", "ReadError", "identity",
           "list_inputs", "normalise_spec", "read_bytes", "split_tar_key"]


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
    identities: list[str]  # identity() of each item, in order: what dedupes the listing and what resume checks


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
    keys: list[str] = []
    seen: set[str] = set()
    skipped = 0
    identities = Identities(os.getcwd())
    for spec in specs:
        try:
            found, spec_skipped = _expand_spec(spec)
        except StorageError as exc:
            raise InputError(f"{spec}: {exc}") from None
        skipped += spec_skipped
        for item in found:
            key = identities(item.key)
            if key not in seen:
                seen.add(key)
                items.append(item)
                keys.append(key)
    return InputListing(items=items, skipped_non_image=skipped, identities=keys)


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
    matches = sorted(set(glob_matches(pattern)))
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


def glob_matches(pattern: str) -> Iterator[str]:
    """What glob.glob(pattern, recursive=True) matches, except that a wildcard never enters a symlinked directory:
    glob follows them, so a link to a parent folder repeats every image under it (or never ends). Names typed
    without wildcards are followed, as the user named them; hidden names match only a pattern that starts with '.'.
    """
    drive_root = os.sep if pattern.startswith(os.sep) else ""
    parts = [part for part in pattern.split(os.sep) if part]
    return _glob_from(drive_root, parts)


def _glob_from(root: str, parts: list[str]) -> Iterator[str]:
    if not parts:
        yield root
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _glob_from(root, rest)  # ** matches no directory at all
        for entry in _scan(root):
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                yield from _glob_from(entry.path if root else entry.name, parts)
        if not rest:  # a trailing ** also matches the files under it
            for entry in _scan(root):
                if not entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                    yield entry.path if root else entry.name
        return
    if not glob.has_magic(head):
        path = os.path.join(root, head) if root else head
        if not rest:
            if os.path.lexists(path):
                yield path
        elif os.path.isdir(path):
            yield from _glob_from(path, rest)
        return
    for entry in _scan(root):
        if entry.name.startswith(".") and not head.startswith("."):
            continue
        if not fnmatch.fnmatchcase(entry.name, head):
            continue
        path = entry.path if root else entry.name
        if not rest:
            yield path
        elif entry.is_dir(follow_symlinks=False):
            yield from _glob_from(path, rest)


def _scan(root: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(root or ".") as entries:
            return list(entries)
    except OSError:
        return []


def _walk(storage: Storage, root: str) -> tuple[list[InputItem], int]:
    """Image files under root, in path order; symlinked directories are not followed."""
    files = storage.list_files(root)
    images = [path for path in files if _is_image(storage, path)]
    return [InputItem(path, IMAGE) for path in images], len(files) - len(images)


def _read_path_list(storage: Storage, list_location: str) -> list[InputItem]:
    """One item per non-empty line, taken verbatim (spaces and a leading '#' are part of the name), so every listed
    path gets a result row. Lines end in \\n or \\r\\n; bytes that are not UTF-8 stay the exact bytes of a file name
    (a NUL byte, which no name holds, marks a file that is not a list). A line that is not a URI is relative to the
    list's own location."""
    try:
        data = storage.read(list_location, MAX_PATH_LIST_BYTES)
        if len(data) > MAX_PATH_LIST_BYTES:
            raise InputError(f"{list_location}: path list over {MAX_PATH_LIST_BYTES} bytes; split it")
    except StorageError as exc:
        raise InputError(f"{list_location}: cannot read the path list ({one_line(exc)})") from None
    if b"\0" in data:  # no file name holds one: this is not a list of paths
        raise InputError(f"{list_location}: cannot read the path list (it holds NUL bytes: not text)")
    items = []
    for raw in data.split(b"\n"):
        line = os.fsdecode(raw[:-1] if raw.endswith(b"\r") else raw)
        if line:
            items.append(InputItem(line if is_uri(line) else storage.resolve(list_location, line), IMAGE))
    return items


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


class Identities:
    """identity() with a cache of resolved folders, for listing or checking many keys at once."""

    def __init__(self, base: str):
        self.base = base
        self._folders: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        try:
            location, member = split_tar_key(key)
        except ValueError:
            return self._location(key)
        return self._location(location) + TAR_SEPARATOR + member

    def _location(self, location: str) -> str:
        if is_uri(location):
            return storage_for(location).identity(location)
        path = os.path.normpath(os.path.join(self.base, location))
        folder, name = os.path.split(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return os.path.join(real, name)


def identity(key: str, base: str) -> str:
    """One name for every spelling of an input's key: absolute, normalised, its folder's symlinks resolved (the file
    itself is not: two links to one image are two inputs); `base` is the directory a relative key starts from."""
    return Identities(base)(key)


def normalise_spec(spec: str) -> str:
    """An input spec as a run's fingerprint compares it: absolute and resolved (a trailing slash, a relative path or
    a symlinked folder name the same input)."""
    if is_uri(spec):
        return storage_for(spec).identity(spec)
    return os.path.realpath(spec)


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
