"""The inputs of a run: which images, in which order, and how to read their bytes.

A run takes specs (directories, glob patterns, path lists, tar shards, single files, and the same as URIs such as
s3://bucket/prefix/ through engine/remote_files.py) and turns them into one deterministic list of items. Each item's
key is how the image is named in the results, so the same specs always give the same rows in the same order.
"""
from __future__ import annotations

import glob
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import remote_files as remote

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
PATH_LIST_EXTENSIONS = frozenset({".txt", ".lst"})
TAR_EXTENSION = ".tar"
TAR_SEPARATOR = "::"  # key of a tar member: f"{tar_path}::{member_name}"

FILE = "file"
TAR = "tar"
MAX_PATH_LIST_BYTES = 1 << 30  # a path list is read whole: 1 GiB is tens of millions of paths


@dataclass(frozen=True)
class InputItem:
    """One image to process; key names it in the results, kind says how to read it ("file", "tar" or "uri")."""

    key: str
    kind: str


@dataclass
class InputListing:
    """The items of a run, plus how many files were passed over because they are not images."""

    items: list[InputItem]
    skipped_non_image: int


class InputError(ValueError):
    """A spec that names nothing usable; the run cannot start."""


class ReadError(Exception):
    """The bytes of one item cannot be read; the message names the cause in one line."""


def _is_image_name(name: str) -> bool:
    """Tell whether a file name has an image extension, so non-images are skipped before any read."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_inputs(specs: Sequence[str]) -> InputListing:
    """Expand the specs, in the order given, into one deduplicated list of items so every run is reproducible."""
    items: list[InputItem] = []
    seen: set[tuple[str, str]] = set()
    skipped = 0
    for spec in specs:
        found, spec_skipped = _expand_spec(spec)
        skipped += spec_skipped
        for item in found:
            identity = _identity(item)
            if identity not in seen:
                seen.add(identity)
                items.append(item)
    return InputListing(items=items, skipped_non_image=skipped)


def _expand_spec(spec: str) -> tuple[list[InputItem], int]:
    if remote.is_uri(spec):
        return _expand_uri(spec)
    # A path that exists wins over glob syntax, so a file literally named "a[1].jpg" is still found.
    if not os.path.lexists(spec) and glob.has_magic(spec):
        return _expand_glob(spec)
    if not os.path.exists(spec):
        raise InputError(f"{spec}: no such file or directory")
    if os.path.isdir(spec):
        return _walk_directory(spec)
    extension = os.path.splitext(spec)[1].lower()
    if extension in PATH_LIST_EXTENSIONS:
        return _read_path_list(spec), 0
    if extension == TAR_EXTENSION:
        return _list_tar(spec)
    return [InputItem(spec, FILE)], 0


def _expand_uri(spec: str) -> tuple[list[InputItem], int]:
    """A URI means what the same local path would: a prefix is walked, a .txt/.lst object is a path list."""
    if glob.has_magic(remote.uri_path(spec)):
        raise InputError(f"{spec}: glob patterns are not supported in URIs; name a prefix or a path list")
    try:
        info = remote.stat(spec)
        if info.kind == remote.MISSING:
            raise InputError(f"{spec}: no such file, directory or prefix")
        if info.kind == remote.DIRECTORY:
            uris = remote.list_files(spec)
            images = [uri for uri in uris if _is_image_name(remote.uri_path(uri))]
            return [InputItem(uri, remote.URI) for uri in images], len(uris) - len(images)
        extension = os.path.splitext(remote.uri_path(spec))[1].lower()
        if extension in PATH_LIST_EXTENSIONS:
            text = remote.read(spec, MAX_PATH_LIST_BYTES)
            if len(text) > MAX_PATH_LIST_BYTES:
                raise InputError(f"{spec}: path list over {MAX_PATH_LIST_BYTES} bytes; split it")
            return _path_list_items(text.decode("utf-8"), lambda line: InputItem(remote.resolve(spec, line),
                                                                                 remote.URI)), 0
    except (remote.UriError, UnicodeDecodeError) as exc:
        raise InputError(f"{spec}: {_one_line(exc)}") from exc
    if extension == TAR_EXTENSION:
        raise InputError(f"{spec}: tar shards are read from local paths only; copy it locally or list its images")
    return [InputItem(spec, remote.URI)], 0


def _expand_glob(pattern: str) -> tuple[list[InputItem], int]:
    """Each match is expanded like a directory entry: directories are walked, tar shards listed, images kept."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise InputError(f"{pattern}: no file matches this pattern")
    items: list[InputItem] = []
    skipped = 0
    for path in matches:
        if os.path.isdir(path):
            if os.path.islink(path):  # not followed, as in a directory walk
                continue
            found, found_skipped = _walk_directory(path)
        elif path.lower().endswith(TAR_EXTENSION) and os.path.isfile(path):
            found, found_skipped = _list_tar(path)
        elif _is_image_name(path):
            found, found_skipped = [InputItem(path, FILE)], 0
        else:
            found, found_skipped = [], 1
        items.extend(found)
        skipped += found_skipped
    return items, skipped


def _walk_directory(root: str) -> tuple[list[InputItem], int]:
    """Image files under root, sorted by path; symlinked directories are not followed."""
    paths: list[str] = []
    skipped = 0
    for directory, _subdirs, files in os.walk(root, followlinks=False):
        for name in files:
            if _is_image_name(name):
                paths.append(os.path.join(directory, name))
            else:
                skipped += 1
    # Sorting by components keeps a directory's contents together ("a/b.jpg" before "a-b.jpg").
    paths.sort(key=lambda path: path.split(os.sep))
    return [InputItem(path, FILE) for path in paths], skipped


def _read_path_list(list_path: str) -> list[InputItem]:
    """A local path list; its relative lines are relative to the list's own directory."""
    base = os.path.dirname(list_path)
    try:
        with open(list_path, encoding="utf-8") as lines:
            text = lines.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_path}: cannot read the path list ({_one_line(exc)})") from exc
    return _path_list_items(text, lambda line: InputItem(line, remote.URI) if remote.is_uri(line)
                            else InputItem(os.path.join(base, line), FILE))


def _path_list_items(text: str, item: Callable[[str], InputItem]) -> list[InputItem]:
    """One item per non-blank, non-comment line, whatever the path holds, so every listed path gets a result row."""
    lines = (line.strip() for line in text.splitlines())
    return [item(line) for line in lines if line and not line.startswith("#")]


def _list_tar(tar_path: str) -> tuple[list[InputItem], int]:
    """Regular image members in archive order; other non-directory members are counted as skipped."""
    items = []
    skipped = 0
    try:
        with tarfile.open(tar_path) as archive:
            for member in archive:
                if member.isfile() and _is_image_name(member.name):
                    items.append(InputItem(f"{tar_path}{TAR_SEPARATOR}{member.name}", TAR))
                elif not member.isdir():
                    skipped += 1
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{tar_path}: not a readable tar archive ({_one_line(exc)})") from exc
    return items, skipped


def _identity(item: InputItem) -> tuple[str, str]:
    if item.kind == remote.URI:
        return item.kind, remote.identity(item.key)
    if item.kind == TAR:
        tar_path, member = split_tar_key(item.key)
        return item.kind, os.path.normpath(tar_path) + TAR_SEPARATOR + member
    return item.kind, os.path.normpath(item.key)


def split_tar_key(key: str) -> tuple[str, str]:
    """Split a tar item's key into the archive path and the member name."""
    # The archive path ends in ".tar", so the first ".tar::" is the boundary even if the member name holds "::".
    boundary = key.lower().find(TAR_EXTENSION + TAR_SEPARATOR)
    if boundary < 0:
        raise ValueError(f"not a tar member key: {key!r}")
    end = boundary + len(TAR_EXTENSION)
    return key[:end], key[end + len(TAR_SEPARATOR):]


def read_bytes(item: InputItem, max_bytes: int) -> bytes:
    """Read one item's bytes, turning every failure into a ReadError so it becomes an error row, not a crash."""
    if item.kind == TAR:
        return _read_tar_member(item.key, max_bytes)
    if item.kind == remote.URI:
        return _read_uri(item.key, max_bytes)
    return _read_file(item.key, max_bytes)


def _read_uri(uri: str, max_bytes: int) -> bytes:
    """An object's bytes, with the same messages as a local file's for the same failures."""
    try:
        info = remote.stat(uri)
        if info.kind == remote.MISSING:
            raise ReadError("no such file")
        if info.kind == remote.DIRECTORY:
            raise ReadError("is a directory")
        if info.size is not None and info.size > max_bytes:
            raise ReadError(f"file is {info.size} bytes, over the limit of {max_bytes}")
        data = remote.read(uri, max_bytes)
    except remote.UriError as exc:
        raise ReadError(str(exc)) from exc
    if len(data) > max_bytes:  # grew since stat
        raise ReadError(f"file is over the limit of {max_bytes} bytes")
    return data


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        link_info = os.lstat(path)
    except FileNotFoundError:
        raise ReadError("no such file") from None
    except OSError as exc:
        raise ReadError(_os_error_message(exc)) from exc
    try:
        info = os.stat(path) if stat.S_ISLNK(link_info.st_mode) else link_info
    except FileNotFoundError:
        raise ReadError("broken symlink") from None
    except OSError as exc:
        raise ReadError(_os_error_message(exc)) from exc
    _check_kind_and_size(info.st_mode, info.st_size, max_bytes)
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ReadError(_os_error_message(exc)) from exc
    if len(data) > max_bytes:  # grew since stat
        raise ReadError(f"file is over the limit of {max_bytes} bytes")
    return data


def _check_kind_and_size(mode: int, size: int, max_bytes: int) -> None:
    if stat.S_ISDIR(mode):
        raise ReadError("is a directory")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise ReadError("not a regular file")
    if size > max_bytes:
        raise ReadError(f"file is {size} bytes, over the limit of {max_bytes}")


def _os_error_message(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return _one_line(exc.strerror or exc)


@dataclass
class _OpenTar:
    archive: tarfile.TarFile
    members: dict[str, tarfile.TarInfo]
    identity: tuple[int, int, int, int]


class _ThreadTars(dict[str, _OpenTar]):
    """The archives one thread has open; they are closed when the thread ends and this is collected."""

    def __del__(self) -> None:
        for open_tar in self.values():
            open_tar.archive.close()


# Each thread keeps its own open archives: a TarFile shares one file position and is not safe across threads.
_thread_tars = threading.local()


def _open_tars() -> _ThreadTars:
    tars = getattr(_thread_tars, "tars", None)
    if tars is None:
        tars = _thread_tars.tars = _ThreadTars()
    return tars


def _read_tar_member(key: str, max_bytes: int) -> bytes:
    tar_path, member_name = split_tar_key(key)
    open_tar = _open_tar(tar_path)
    member = open_tar.members.get(member_name)
    if member is None:
        raise ReadError("no such member in the tar archive")
    if member.isdir():
        raise ReadError("is a directory")
    if not member.isfile():
        raise ReadError("not a regular file")
    if member.size > max_bytes:
        raise ReadError(f"file is {member.size} bytes, over the limit of {max_bytes}")
    try:
        extracted = open_tar.archive.extractfile(member)
        assert extracted is not None  # isfile() members always extract
        data = extracted.read()
    except (tarfile.TarError, OSError) as exc:
        raise ReadError(f"cannot read the tar member ({_one_line(exc)})") from exc
    if len(data) != member.size:
        raise ReadError(f"tar archive is truncated ({len(data)} of {member.size} bytes)")
    return data


def _open_tar(tar_path: str) -> _OpenTar:
    try:
        info = os.stat(tar_path)
    except FileNotFoundError:
        raise ReadError("no such file") from None
    except OSError as exc:
        raise ReadError(_os_error_message(exc)) from exc
    # A tar replaced since it was opened (same path, new file) must be reopened, not read at stale offsets.
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    tars = _open_tars()
    cached = tars.get(tar_path)
    if cached is not None and cached.identity == identity:
        return cached
    if cached is not None:
        cached.archive.close()
        del tars[tar_path]
    archive = None
    try:
        archive = tarfile.open(tar_path)
        # A dict, because TarFile.getmember scans the whole member list on every call; later entries win, as in tar.
        members = {member.name: member for member in archive.getmembers()}
    except (tarfile.TarError, OSError) as exc:
        if archive is not None:
            archive.close()
        if isinstance(exc, PermissionError):
            raise ReadError("permission denied") from None
        raise ReadError(f"not a readable tar archive ({_one_line(exc)})") from exc
    tars[tar_path] = _OpenTar(archive, members, identity)
    return tars[tar_path]


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
