"""Objects named by URI (s3://, gs://, hdfs://, file://): what one is, what lies under a prefix, and its bytes.

A cluster's images usually live in object storage, not on the node's disk. pyarrow (already the results' writer)
reaches the common stores with credentials from the environment. This module only talks to the store; what a URI
spec means (a prefix, a path list, one image) is decided in engine.inputs exactly as for local paths. Listed objects
are named by full, percent-encoded URIs, so the results say where each image came from and any node can read it.
"""
from __future__ import annotations

import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

URI = "uri"  # InputItem.kind of an item read through this module
FILE, DIRECTORY, MISSING = "file", "directory", "missing"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NETLOC_IS_HOST = frozenset({"file", "hdfs", "viewfs"})  # else the netloc is the bucket, part of the object's path

_filesystems: dict[str, Any] = {}
_lock = threading.Lock()


class UriError(Exception):
    """A store that cannot be reached or an object that cannot be listed or read; the message is one line."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a URI names: a file (with its size), a directory or prefix, or nothing."""

    kind: str
    size: int | None = None


def is_uri(spec: str) -> bool:
    """Whether a spec or path-list line names its storage by scheme (s3://...) rather than as a local path."""
    return bool(_SCHEME.match(spec))


def uri_path(uri: str) -> str:
    """The URI's path part, without its options: where its extension and any glob characters are."""
    return urlsplit(uri).path


def _path_in(uri: str) -> str:
    """The path pyarrow.fs uses for a URI: s3://bucket/key -> bucket/key; file:///a/b and hdfs://host/a -> /a/b."""
    parts = urlsplit(uri)
    if parts.scheme in _NETLOC_IS_HOST:
        return unquote(parts.path)
    return unquote(f"{parts.netloc}{parts.path}").rstrip("/")


def _open(uri: str) -> tuple[Any, str]:
    """(filesystem, path inside it). One filesystem per store and options, shared by all threads (pyarrow's are
    thread-safe), so reading an object does not build an S3 client each time. A store whose paths do not follow
    _path_in is never cached: correct, only slower."""
    import pyarrow.fs

    parts = urlsplit(uri)
    store = f"{parts.scheme}://{parts.netloc}?{parts.query}"
    with _lock:
        cached = _filesystems.get(store)
    if cached is not None:
        return cached, _path_in(uri)
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise UriError(f"cannot open ({_one_line(exc)})") from exc
    if path.rstrip("/") == _path_in(uri).rstrip("/"):
        with _lock:
            _filesystems.setdefault(store, filesystem)
    return filesystem, path


def _child_uri(spec: str, path: str) -> str:
    """The URI of an object at a store path, keeping spec's scheme, host and options (?region=...); the path is
    percent-encoded, so a name with spaces or '#' is still one valid URI."""
    parts = urlsplit(spec)
    host = parts.netloc if parts.scheme in _NETLOC_IS_HOST else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{quote(path, safe='/')}{query}"


def stat(uri: str) -> ObjectInfo:
    """What the URI names now."""
    import pyarrow.fs

    filesystem, path = _open(uri)
    try:
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise UriError(f"cannot open ({_one_line(exc)})") from exc
    if info.type == pyarrow.fs.FileType.NotFound:
        return ObjectInfo(MISSING)
    if info.type == pyarrow.fs.FileType.Directory:
        return ObjectInfo(DIRECTORY)
    return ObjectInfo(FILE, info.size)


def list_files(uri: str) -> list[str]:
    """The URIs of every object under a prefix, recursively, in path order (a directory's contents together)."""
    import pyarrow.fs

    filesystem, path = _open(uri)
    try:
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UriError(f"cannot list ({_one_line(exc)})") from exc
    paths = sorted((f.path for f in found if f.type == pyarrow.fs.FileType.File), key=lambda p: p.split("/"))
    return [_child_uri(uri, p) for p in paths]


def resolve(list_uri: str, entry: str) -> str:
    """A line of a path list stored at list_uri: a URI as it is, anything else relative to the list's prefix."""
    if is_uri(entry):
        return entry
    return _child_uri(list_uri, posixpath.normpath(posixpath.join(posixpath.dirname(_path_in(list_uri)), entry)))


def read(uri: str, limit: int) -> bytes:
    """At most limit + 1 bytes of the object, so a caller can tell "over the limit" without reading it all."""
    filesystem, path = _open(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return bytes(stream.read(limit + 1))
    except OSError as exc:
        raise UriError(f"cannot read ({_one_line(exc)})") from exc


def identity(uri: str) -> str:
    """Two spellings of one object (a//b, a/./b) are one input."""
    parts = urlsplit(uri)
    path = posixpath.normpath(parts.path) if parts.path else parts.path
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
