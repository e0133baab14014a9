"""Inputs named by URI: `s3://bucket/key`, `gs://...`, `hdfs://...`, or any fsspec protocol.

Storage stays a POSIX path; inputs (URL lists, instruction files, their images) may live in an
object store and are read directly: through pyarrow's own filesystems where it has one (S3, GCS,
HDFS, local), else through fsspec wrapped as a pyarrow filesystem. Credentials and endpoints come
from the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...). Plain paths are left
to the callers' local code, so their behaviour and messages are unchanged.
"""

from __future__ import annotations

import threading
import urllib.parse

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        try:
            import fsspec

            filesystem, inner = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_exc:
            raise ValueError(f"{uri}: no filesystem for this URI ({exc}; {fsspec_exc})") from exc
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), inner


# "s3://bucket" -> (filesystem, its path for the root, whether it decodes %-escapes)
_ROOTS: dict[str, tuple[pafs.FileSystem, str, bool]] = {}
_ROOTS_LOCK = threading.Lock()


def resolve_cached(uri: str) -> tuple[pafs.FileSystem, str]:
    """`resolve`, reusing (in this process) the filesystem of the first URI seen with the same
    scheme and host or bucket: building one can cost a request per URI (pyarrow's S3 asks for
    the bucket's region), which fetching many images one by one would pay each time. Gives what
    `resolve` gives: pyarrow decodes percent-escapes in a URI's path, fsspec does not. Chained
    fsspec URIs (`tar://a.png::file:///x.tar`) and URIs whose path does not map one to one onto
    the filesystem's path (a query string) are resolved every time."""
    parts = urllib.parse.urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}"
    rest = uri[len(root) :]
    cached = _ROOTS.get(root) if "::" not in uri else None
    if cached is not None:
        filesystem, prefix, decodes = cached
        return filesystem, prefix + (urllib.parse.unquote(rest) if decodes else rest)
    filesystem, inner = resolve(uri)
    decodes = not isinstance(filesystem, pafs.PyFileSystem)
    tail = urllib.parse.unquote(rest) if decodes else rest
    if "::" not in uri and inner.endswith(tail):
        with _ROOTS_LOCK:
            _ROOTS.setdefault(root, (filesystem, inner[: len(inner) - len(tail)], decodes))
    return filesystem, inner


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] + "://"


def file_type(uri: str) -> str:
    """'file', 'dir' or 'missing'."""
    filesystem, inner = resolve(uri)
    kind = filesystem.get_file_info(inner).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind, "missing")


def list_files(uri: str, suffix: str) -> list[str]:
    """The files directly under a folder URI whose names end with `suffix`, sorted, as URIs."""
    filesystem, inner = resolve(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=False))
    names = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [_scheme(uri) + name for name in names]


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access reader (parquet needs one)."""
    filesystem, inner = resolve(uri)
    return filesystem.open_input_file(inner)


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such file."""
    filesystem, inner = resolve(uri)
    if filesystem.get_file_info(inner).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as f:
        return f.read()
