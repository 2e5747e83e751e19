"""Inputs named by URI (s3://, gs://, hdfs://, abfs://, file://): listed and read through pyarrow.fs.

A cluster's images usually live in object storage, not on the node's disk. pyarrow (already the results' writer)
reaches the common stores with credentials from the environment, so a URI spec works like a local one: a prefix is
listed recursively in sorted order, a `.txt`/`.lst` object is a path list, any other object is one image. Every
item's key is a full URI, so the results name where each image came from and any node can read it again.
"""
from __future__ import annotations

import posixpath
import re
import threading
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from engine.inputs import (PATH_LIST_EXTENSIONS, TAR_EXTENSION, InputError, InputItem, ReadError, _is_image_name,
                           _one_line)

URI = "uri"  # InputItem.kind of an item read through pyarrow.fs
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_filesystems: dict[str, Any] = {}
_lock = threading.Lock()


def is_uri(spec: str) -> bool:
    """Whether a spec or path-list line names its storage by scheme (s3://...) rather than as a local path."""
    return bool(_SCHEME.match(spec))


_NETLOC_IS_HOST = frozenset({"file", "hdfs", "viewfs"})  # else the netloc is the bucket, part of the object's path


def _path_in(uri: str) -> str:
    """The path pyarrow.fs uses for a URI: s3://bucket/key -> bucket/key; file:///a/b and hdfs://host/a -> /a/b."""
    parts = urlsplit(uri)
    if parts.scheme in _NETLOC_IS_HOST:
        return unquote(parts.path)
    return unquote(f"{parts.netloc}{parts.path}").rstrip("/")


def _filesystem(uri: str) -> tuple[Any, str]:
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
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if path.rstrip("/") == _path_in(uri).rstrip("/"):
        with _lock:
            _filesystems.setdefault(store, filesystem)
    return filesystem, path


def _child_uri(spec: str, path: str) -> str:
    """The URI of an object listed under spec, keeping its scheme, host and options (?region=..., etc.); the path
    is percent-encoded, so a name with spaces or '#' is still one valid URI."""
    parts = urlsplit(spec)
    host = parts.netloc if parts.scheme in _NETLOC_IS_HOST else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{quote(path, safe='/')}{query}"


def list_uri(spec: str) -> tuple[list[InputItem], int]:
    """Expand one URI spec into items (and the count of non-image objects skipped under a prefix)."""
    import pyarrow.fs

    if any(ch in urlsplit(spec).path for ch in "*?["):
        raise InputError(f"{spec}: glob patterns are not supported in URIs; name a prefix or a path list")
    try:
        filesystem, path = _filesystem(spec)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{spec}: cannot open ({_one_line(exc)})") from exc
    if info.type == pyarrow.fs.FileType.NotFound:
        raise InputError(f"{spec}: no such file, directory or prefix")
    if info.type == pyarrow.fs.FileType.Directory:
        try:
            found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
        except OSError as exc:
            raise InputError(f"{spec}: cannot list ({_one_line(exc)})") from exc
        files = sorted((f.path for f in found if f.type == pyarrow.fs.FileType.File), key=lambda p: p.split("/"))
        images = [p for p in files if _is_image_name(p)]
        return [InputItem(_child_uri(spec, p), URI) for p in images], len(files) - len(images)
    extension = posixpath.splitext(path)[1].lower()
    if extension in PATH_LIST_EXTENSIONS:
        return _read_uri_path_list(spec, filesystem, path), 0
    if extension == TAR_EXTENSION:
        raise InputError(f"{spec}: tar shards are read from local paths only; copy it locally or list its images")
    return [InputItem(spec, URI)], 0


def _read_uri_path_list(spec: str, filesystem: Any, path: str) -> list[InputItem]:
    """A path list stored remotely: absolute URIs are kept, other lines are relative to the list's own prefix."""
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{spec}: cannot read the path list ({_one_line(exc)})") from exc
    base = posixpath.dirname(path)
    items = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_uri(entry):
            items.append(InputItem(entry, URI))
        else:
            items.append(InputItem(_child_uri(spec, posixpath.normpath(posixpath.join(base, entry))), URI))
    return items


def read_uri(uri: str, max_bytes: int) -> bytes:
    """One object's bytes; a missing object, a prefix, an oversized object or a failed read is a ReadError."""
    import pyarrow.fs

    try:
        filesystem, path = _filesystem(uri)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise ReadError(f"cannot open ({_one_line(exc)})") from exc
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ReadError("no such file")
    if info.type == pyarrow.fs.FileType.Directory:
        raise ReadError("is a directory")
    if info.size is not None and info.size > max_bytes:
        raise ReadError(f"file is {info.size} bytes, over the limit of {max_bytes}")
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise ReadError(f"cannot read ({_one_line(exc)})") from exc
    if len(data) > max_bytes:
        raise ReadError(f"file is over the limit of {max_bytes} bytes")
    return bytes(data)


def identity(uri: str) -> str:
    """Two spellings of one object (a//b, a/./b) are one input."""
    parts = urlsplit(uri)
    path = posixpath.normpath(parts.path) if parts.path else parts.path
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")

