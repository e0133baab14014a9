"""Caption URL lists as users bring them: LAION / COYO / CC3M style parquet, csv, tsv, json, jsonl.

`read_url_list` checks the structure of every file first (a missing column or an unreadable file is
a ValueError naming the file and the column), then yields normalised Arrow tables with the columns
`url`, `caption` and the kept extra columns (scores such as `similarity`, `punsafe`, `pwatermark`).
Rows without a URL are counted, not yielded. A URL list (a file or a folder of files) may be
an object-store URI (`s3://bucket/urls/`, see `owl.data.uri`), read directly. URLs are kept
exactly as the list has them (spaces, non-ASCII characters, surrounding blanks), so that every
output row's `url` joins back to its input row; `fetch_url` is what the downloader asks for
(trimmed, percent-encoded, an internationalised host name in IDNA). Text that is not UTF-8, or a
URL column that does not hold text, is a ValueError naming the file, the column and the first
bad row: a retry cannot fix it.
"""

from __future__ import annotations

import glob
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from owl.data import uri

INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl")

# Column names img2dataset writes itself; a source column with one of these names is kept as
# `source_<name>` (COYO lists have `width` and `height`, for example).
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)  # fmt: skip


@dataclass(frozen=True)
class UrlListSpec:
    """How to read one URL list: its format and which columns hold what."""

    input_format: str = "parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    # Extra columns to keep; None keeps every other column of the file.
    extra_cols: tuple[str, ...] | None = None
    # Column names for csv/tsv files without a header line (the CC3M release has none).
    column_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"input_format={self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}"
            )
        if self.column_names is not None and self.input_format not in ("csv", "tsv"):
            raise ValueError("column_names is only for csv/tsv files without a header line")


# Defaults for the public caption datasets (their released column names).
PRESETS: dict[str, UrlListSpec] = {
    "laion": UrlListSpec(
        "parquet", url_col="URL", caption_col="TEXT",
        extra_cols=("similarity", "punsafe", "pwatermark"),
    ),
    "coyo": UrlListSpec(
        "parquet", url_col="url", caption_col="text",
        extra_cols=("clip_similarity_vitb32", "watermark_score", "nsfw_score_opennsfw2"),
    ),
    "cc3m": UrlListSpec("tsv", url_col="url", caption_col="caption", column_names=("caption", "url")),
}  # fmt: skip


def list_url_files(path: str, input_format: str) -> list[str]:
    """The files of a URL list: `path` itself, or the sorted `*.<input_format>` files in a folder."""
    if uri.is_uri(path):
        kind = uri.file_type(path)
        if kind == "missing":
            raise ValueError(f"{path}: URL list not found")
        if kind == "file":
            return [path]
        files = uri.list_files(path, f".{input_format}")
        if not files:
            raise ValueError(f"{path}: folder has no *.{input_format} files")
        return files
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, f"*.{input_format}")))
        if not files:
            raise ValueError(f"{path}: folder has no *.{input_format} files")
        return files
    if not os.path.exists(path):
        raise ValueError(f"{path}: URL list not found")
    return [path]


def _source(path: str) -> str | pa.NativeFile:
    """What pyarrow's readers take: the local path, or an open object-store file."""
    return uri.open_input_file(path) if uri.is_uri(path) else path


def _file_columns(path: str, spec: UrlListSpec) -> list[str]:
    if spec.input_format == "parquet":
        return pq.read_schema(_source(path)).names
    if spec.column_names is not None:
        return list(spec.column_names)
    if spec.input_format in ("csv", "tsv"):  # the header line only
        delimiter = "\t" if spec.input_format == "tsv" else ","
        options = pa_csv.ParseOptions(delimiter=delimiter)
        with pa_csv.open_csv(_source(path), parse_options=options) as r:
            return r.schema.names
    return _read_table(path, spec).column_names


def _read_table(path: str, spec: UrlListSpec) -> pa.Table:
    fmt = spec.input_format
    if fmt == "parquet":
        return pq.read_table(_source(path))
    if fmt in ("csv", "tsv"):
        return pa_csv.read_csv(
            _source(path),
            read_options=pa_csv.ReadOptions(column_names=spec.column_names),
            parse_options=pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
        )
    if fmt == "jsonl":
        return pa_json.read_json(_source(path))
    if uri.is_uri(path):
        with uri.open_input_file(path) as f:
            return pa.Table.from_pylist(json.loads(f.read()))
    with open(path) as f:  # a JSON array of objects
        return pa.Table.from_pylist(json.load(f))


def kept_columns(path: str, spec: UrlListSpec) -> list[str]:
    """The extra columns kept from this file. Raises ValueError naming a missing column."""
    try:
        names = _file_columns(path, spec)
    except (OSError, pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"{path}: cannot read it as {spec.input_format}: {exc}") from exc
    for role, col in (("url_col", spec.url_col), ("caption_col", spec.caption_col)):
        if col not in names:
            raise ValueError(f"{path}: no column {col!r} ({role}); the file has columns {names}")
    if spec.extra_cols is None:
        return [n for n in names if n not in (spec.url_col, spec.caption_col)]
    missing = [c for c in spec.extra_cols if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (extra_cols); the file has {names}")
    return list(spec.extra_cols)


# Characters left as they are in each part of a URL (RFC 3986 reserved ones, and '%' so that an
# already-encoded URL is not encoded twice).
_SAFE_PATH = "/%:@!$&'()*+,;=~-._"
_SAFE_QUERY = _SAFE_PATH + "?"


def fetch_url(url: str) -> str:
    """The URL to request for a URL list's `url` as given: without surrounding blanks, encoded."""
    return encode_url(url.strip())


def encode_url(url: str) -> str:
    """`url` with spaces and non-ASCII characters percent-encoded (UTF-8) and a non-ASCII host
    name in IDNA; a URL that needs neither is returned unchanged."""
    if url.isascii() and " " not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = urllib.parse.quote(host, safe="")
        netloc = f"{userinfo}{at}{host}{colon}{port}"
    return urllib.parse.urlunsplit(
        (
            parts.scheme,
            netloc,
            urllib.parse.quote(parts.path, safe=_SAFE_PATH),
            urllib.parse.quote(parts.query, safe=_SAFE_QUERY),
            urllib.parse.quote(parts.fragment, safe=_SAFE_QUERY),
        )
    )


def _text_column(table: pa.Table, col: str, role: str, file: str) -> pa.ChunkedArray:
    """Column `col` as UTF-8 strings; ValueError naming the file, column and first bad row when it
    holds bytes that are not UTF-8, or (the URL column) values that are not text at all."""
    column = table.column(col)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if role == "url_col" and not (text or binary or pa.types.is_null(kind)):
        raise ValueError(f"{file}: column {col!r} ({role}) holds {kind}, not text URLs")
    try:
        if text:
            column.validate(full=True)  # checks UTF-8, in C++
        return column.cast(pa.string())  # binary: checks UTF-8 too
    except pa.ArrowInvalid as exc:
        if not (text or binary):
            raise ValueError(f"{file}: column {col!r} ({role}): {exc}") from exc
        raw = column.cast(pa.large_binary()) if text else column
        for row, value in enumerate(raw.to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError as bad:
                raise ValueError(
                    f"{file}: column {col!r} ({role}) row {row}: not valid UTF-8 "
                    f"({value[:40]!r}: {bad.reason} at byte {bad.start}); re-encode it as UTF-8"
                ) from bad
        raise ValueError(f"{file}: column {col!r} ({role}): {exc}") from exc


def normalise(
    table: pa.Table, spec: UrlListSpec, extras: list[str], file: str = "URL list"
) -> tuple[pa.Table, int]:
    """(table with url, caption, extras; number of rows dropped for a missing URL)."""
    url = _text_column(table, spec.url_col, "url_col", file)  # as given (encoded when fetched)
    caption = pc.fill_null(_text_column(table, spec.caption_col, "caption_col", file), "")
    columns = {"url": url, "caption": caption}
    for name in extras:
        columns[f"source_{name}" if name in RESERVED_COLUMNS else name] = table.column(name)
    out = pa.table(columns)
    has_url = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(url)), 0), False)
    kept = out.filter(has_url)
    return kept, out.num_rows - kept.num_rows


def check_url_list(path: str, spec: UrlListSpec) -> dict[str, list[str]]:
    """Check every file before any work: file -> kept extra columns. Raises ValueError otherwise."""
    return {file: kept_columns(file, spec) for file in list_url_files(path, spec.input_format)}


def read_url_list(path: str, spec: UrlListSpec) -> Iterator[tuple[str, pa.Table, int]]:
    """Yield (file, normalised table, rows dropped for a missing URL) per file, after checking all."""
    for file, extras in check_url_list(path, spec).items():
        try:
            table = _read_table(file, spec)
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            utf8 = "; is it UTF-8?" if "utf" in str(exc).lower() else ""
            raise ValueError(f"{file}: cannot read it as {spec.input_format}: {exc}{utf8}") from exc
        table, num_missing = normalise(table, spec, extras, file)
        yield file, table, num_missing
