"""Where input bytes live: one small interface over the local disk and object stores (s3://, gs://, hdfs://, file://).

`engine.inputs` lists and reads every input through `storage_for(location)`, so a directory, a path list, a tar shard
or a single image means the same thing on a laptop's disk and in a bucket. Two adapters implement the interface:

- local paths go through `os`: pyarrow's LocalFileSystem cannot name a file whose name is not valid UTF-8, and it
  cannot tell a broken symlink or a FIFO from a missing file, which the error rows must say;
- URIs go through pyarrow.fs (already the results' writer), which reaches the common stores with credentials from
  the environment. Listed objects are named by full, percent-encoded URIs, so the results say where each image came
  from and any node of a cluster can read it.
"""
from __future__ import annotations

import enum
import os
import posixpath
import re
import stat as _stat
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote, unquote, urlsplit

from gradcam_engine.engine.errors import one_line

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NETLOC_IS_HOST = frozenset({"file", "hdfs", "viewfs"})  # else the netloc is the bucket, part of the object's path


class Kind(enum.Enum):
    """What a location names now."""

    FILE = "file"
    DIRECTORY = "directory"
    MISSING = "missing"
    SPECIAL = "special"  # a FIFO, socket or device: reading it could block forever


@dataclass(frozen=True)
class Stat:
    """A location's kind, its size when a file, and a version that changes when the object is replaced."""

    kind: Kind
    size: int | None = None
    version: tuple[Any, ...] = ()
    note: str = ""  # why a location is MISSING or SPECIAL, in the words of an error row ("broken symlink")


class StorageError(Exception):
    """A store that cannot be reached, or an object that cannot be listed or read; the message is one line."""


class Storage(Protocol):
    """The operations inputs need, whatever holds the bytes."""

    def stat(self, location: str) -> Stat: ...

    def list_files(self, location: str) -> list[str]:
        """Every file under a directory or prefix, recursively, in path order; symlinked directories not followed."""

    def read(self, location: str, limit: int) -> bytes:
        """At most limit + 1 bytes, so a caller can tell "over the limit" without reading it all."""

    def open(self, location: str) -> BinaryIO:
        """A seekable binary file (a tar shard is read member by member)."""

    def resolve(self, list_location: str, entry: str) -> str:
        """A path-list line that is not a URI, relative to the list's own location."""

    def identity(self, location: str) -> str:
        """Equal for two spellings of one object (a//b, a/./b)."""

    def name(self, location: str) -> str:
        """The path part, where the extension and any glob characters are."""


def is_uri(location: str) -> bool:
    """Whether a spec or path-list line names its storage by scheme (s3://...) rather than as a local path."""
    return bool(_SCHEME.match(location))


def storage_for(location: str) -> Storage:
    """The adapter that holds `location`."""
    return OBJECT_STORE if is_uri(location) else LOCAL


# --- local disk -----------------------------------------------------------------------------------------------------
class LocalStorage:
    """Local paths through os: exact names (any bytes the OS allows), symlinks and special files told apart."""

    def stat(self, location: str) -> Stat:
        try:
            info = os.lstat(location)
            if _stat.S_ISLNK(info.st_mode):
                info = os.stat(location)
        except FileNotFoundError:
            broken = os.path.islink(location)
            return Stat(Kind.MISSING, note="broken symlink" if broken else "no such file")
        except OSError as exc:
            raise StorageError(os_error_message(exc)) from None
        if _stat.S_ISDIR(info.st_mode):
            return Stat(Kind.DIRECTORY)
        if not _stat.S_ISREG(info.st_mode):
            return Stat(Kind.SPECIAL, note="not a regular file")
        return Stat(Kind.FILE, info.st_size, (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))

    def list_files(self, location: str) -> list[str]:
        paths = [os.path.join(directory, name)
                 for directory, _subdirs, files in os.walk(location, followlinks=False) for name in files]
        # Sorting by components keeps a directory's contents together ("a/b.jpg" before "a-b.jpg").
        paths.sort(key=lambda path: path.split(os.sep))
        return paths

    def read(self, location: str, limit: int) -> bytes:
        try:
            with open(location, "rb") as file:
                return file.read(limit + 1)
        except OSError as exc:
            raise StorageError(os_error_message(exc)) from None

    def open(self, location: str) -> BinaryIO:
        try:
            return open(location, "rb")
        except OSError as exc:
            raise StorageError(os_error_message(exc)) from None

    def resolve(self, list_location: str, entry: str) -> str:
        return os.path.join(os.path.dirname(list_location), entry)

    def identity(self, location: str) -> str:
        return os.path.normpath(location)

    def name(self, location: str) -> str:
        return location


def os_error_message(exc: OSError) -> str:
    """An OSError in the words of an error row."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return one_line(exc.strerror or exc)


# --- object stores --------------------------------------------------------------------------------------------------
class ObjectStorage:
    """URIs through pyarrow.fs. One filesystem per store and options, shared by all threads (pyarrow's are
    thread-safe), so reading an object does not build a client each time."""

    def __init__(self) -> None:
        self._filesystems: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _open_fs(self, uri: str) -> tuple[Any, str]:
        """(filesystem, path inside it). A store whose paths do not follow _path_in is never cached: correct, only
        slower."""
        import pyarrow.fs

        parts = urlsplit(uri)
        store = f"{parts.scheme}://{parts.netloc}?{parts.query}"
        with self._lock:
            cached = self._filesystems.get(store)
        if cached is not None:
            return cached, _path_in(uri)
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot open ({one_line(exc)})") from exc
        if path.rstrip("/") == _path_in(uri).rstrip("/"):
            with self._lock:
                self._filesystems.setdefault(store, filesystem)
        return filesystem, path

    def stat(self, location: str) -> Stat:
        import pyarrow.fs

        filesystem, path = self._open_fs(location)
        try:
            info = filesystem.get_file_info(path)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot open ({one_line(exc)})") from exc
        if info.type == pyarrow.fs.FileType.NotFound:
            return Stat(Kind.MISSING, note="no such file")
        if info.type == pyarrow.fs.FileType.Directory:
            return Stat(Kind.DIRECTORY)
        return Stat(Kind.FILE, info.size, (info.size, info.mtime_ns))

    def list_files(self, location: str) -> list[str]:
        import pyarrow.fs

        filesystem, path = self._open_fs(location)
        try:
            found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
        except OSError as exc:
            raise StorageError(f"cannot list ({one_line(exc)})") from exc
        paths = sorted((f.path for f in found if f.type == pyarrow.fs.FileType.File), key=lambda p: p.split("/"))
        return [_child_uri(location, p) for p in paths]

    def read(self, location: str, limit: int) -> bytes:
        filesystem, path = self._open_fs(location)
        try:
            with filesystem.open_input_stream(path) as stream:
                return bytes(stream.read(limit + 1))
        except OSError as exc:
            raise StorageError(f"cannot read ({one_line(exc)})") from exc

    def open(self, location: str) -> BinaryIO:
        filesystem, path = self._open_fs(location)
        try:
            return filesystem.open_input_file(path)  # random access: tarfile seeks from member to member
        except OSError as exc:
            raise StorageError(f"cannot read ({one_line(exc)})") from exc

    def resolve(self, list_location: str, entry: str) -> str:
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(_path_in(list_location)), entry))
        return _child_uri(list_location, joined)

    def identity(self, location: str) -> str:
        parts = urlsplit(location)
        path = posixpath.normpath(parts.path) if parts.path else parts.path
        return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")

    def name(self, location: str) -> str:
        return urlsplit(location).path


def _path_in(uri: str) -> str:
    """The path pyarrow.fs uses for a URI: s3://bucket/key -> bucket/key; file:///a/b and hdfs://host/a -> /a/b."""
    parts = urlsplit(uri)
    if parts.scheme in _NETLOC_IS_HOST:
        return unquote(parts.path)
    return unquote(f"{parts.netloc}{parts.path}").rstrip("/")


def _child_uri(spec: str, path: str) -> str:
    """The URI of an object at a store path, keeping spec's scheme, host and options (?region=...); the path is
    percent-encoded, so a name with spaces or '#' is still one valid URI."""
    parts = urlsplit(spec)
    host = parts.netloc if parts.scheme in _NETLOC_IS_HOST else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{quote(path, safe='/', errors='surrogateescape')}{query}"


LOCAL = LocalStorage()
OBJECT_STORE = ObjectStorage()
