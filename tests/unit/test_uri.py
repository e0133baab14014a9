"""owl.data.uri: the fsspec fallback (a protocol pyarrow has no filesystem for: fsspec's in-memory
one here) and the per-bucket filesystem cache the download step uses for image URLs."""

from __future__ import annotations

import io

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from owl.data import uri
from owl.data.url_lists import UrlListSpec, read_url_list


@pytest.fixture
def memory():
    fs = fsspec.filesystem("memory")  # one store per process: leave it as it was
    yield fs
    for folder in ("/owl-test", "/other"):
        if fs.exists(folder):
            fs.rm(folder, recursive=True)


def _parquet(urls: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), sink)
    return sink.getvalue()


def test_fsspec_fallback_reads_lists_and_files(memory) -> None:
    memory.pipe("/owl-test/urls/b.parquet", _parquet(["http://x/2.png"]))
    memory.pipe("/owl-test/urls/a.parquet", _parquet(["http://x/0.png", "http://x/1.png"]))
    memory.pipe("/owl-test/urls/notes.txt", b"not a list")
    filesystem, inner = uri.resolve("memory://owl-test/urls/a.parquet")
    assert isinstance(filesystem, pafs.PyFileSystem)  # not one of pyarrow's own
    assert inner == "/owl-test/urls/a.parquet"
    assert uri.file_type("memory://owl-test/urls") == "dir"
    assert uri.file_type("memory://owl-test/urls/a.parquet") == "file"
    assert uri.file_type("memory://owl-test/none") == "missing"
    files = uri.list_files("memory://owl-test/urls", ".parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.parquet", "b.parquet"]
    assert uri.read_bytes(files[1]) == _parquet(["http://x/2.png"])
    assert uri.read_bytes("memory://owl-test/urls/none.parquet") is None
    got = list(read_url_list("memory://owl-test/urls", UrlListSpec()))
    assert [u for _, t, _ in got for u in t.column("url").to_pylist()] == [
        "http://x/0.png", "http://x/1.png", "http://x/2.png"]  # fmt: skip
    with pytest.raises(ValueError, match="nope://x/y: no filesystem for this URI"):
        uri.resolve("nope://x/y")


def test_resolve_cached_gives_what_resolve_gives(memory, tmp_path) -> None:
    (tmp_path / "a b.png").write_bytes(b"1")
    uris = [
        f"file://{tmp_path}/x.png",  # pyarrow's LocalFileSystem: first of its root, cached
        f"file://{tmp_path}/a%20b.png",  # then from the cache; pyarrow decodes the escape
        "memory://owl-test/img/0.png",  # fsspec's: the path stays as written
        "memory://owl-test/img/a%20b.png",
        "memory://other/1.png",  # another root
        f"tar://img/0.png::file://{tmp_path}/x.tar",  # chained: never cached
    ]
    for u in uris:
        if u.startswith("tar://"):
            continue
        filesystem, inner = uri.resolve_cached(u)
        assert (type(filesystem), inner) == (type(uri.resolve(u)[0]), uri.resolve(u)[1]), u
    assert uri.resolve_cached(f"file://{tmp_path}/a%20b.png")[1] == f"{tmp_path}/a b.png"
    cached = uri.resolve_cached("memory://owl-test/img/1.png")[0]
    assert cached is uri.resolve_cached("memory://owl-test/img/2.png")[0]  # one per root
    assert "tar://img" not in uri._ROOTS
