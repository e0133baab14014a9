"""Inputs named by URI: `s3://bucket/key`, `gs://...`, `hdfs://...`, or any fsspec protocol.

Storage stays a POSIX path; inputs (URL lists, instruction files, their images) may live in an
object store and are read directly: through pyarrow's own filesystems where it has one (S3, GCS,
HDFS, local), else through fsspec wrapped as a pyarrow filesystem. Credentials and endpoints come
from the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...). Plain paths are left
to the callers' local code, so their behaviour and messages are unchanged.
"""

from __future__ import annotations

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
