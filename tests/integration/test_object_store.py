"""Inputs on an S3-compatible object store, read directly: URL lists, instruction files, images.

The store is a real S3 server (moto's server mode) that the test starts on loopback and stops at
the end; the code under test reaches it through pyarrow's S3 filesystem like any S3 endpoint.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl.data.sources import SourceSpec, check_source, read_source
from owl.data.url_lists import UrlListSpec, read_url_list
from pipelines.step import StepContext
from pipelines.steps import download
from pipelines.steps.tokenize_instructions import _read_image
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto's S3 server exited"
                assert time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="owl")
        yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(30)


def _put(client, key: str, body: bytes) -> str:
    client.put_object(Bucket="owl", Key=key, Body=body)
    return f"s3://owl/{key}"


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (shade, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_url_list_folder_and_files_on_s3(s3, tmp_path) -> None:
    parts = [
        pa.table({"url": [f"http://x/{i}.png" for i in range(k, k + 3)], "caption": ["a"] * 3,
                  "similarity": [0.3] * 3})
        for k in (0, 3)
    ]  # fmt: skip
    for i, table in enumerate(parts):
        _put(s3, f"urls/part-{i}.parquet", _parquet(table))
    _put(s3, "urls/README.txt", b"not a URL list")
    got = list(read_url_list("s3://owl/urls/", UrlListSpec()))
    assert [file for file, _, _ in got] == [
        "s3://owl/urls/part-0.parquet",
        "s3://owl/urls/part-1.parquet",
    ]
    urls = [u for _, table, _ in got for u in table.column("url").to_pylist()]
    assert urls == [f"http://x/{i}.png" for i in range(6)]
    assert got[0][1].column_names == ["url", "caption", "similarity"]
    csv = _put(s3, "lists/cc.tsv", b"a dog\thttp://x/d.png\n\thttp://x/e.png\n")
    spec = UrlListSpec("tsv", column_names=("caption", "url"))
    [(_, table, missing)] = list(read_url_list(csv, spec))
    assert table.column("caption").to_pylist() == ["a dog", ""] and missing == 0
    with pytest.raises(ValueError, match="s3://owl/nope.parquet: URL list not found"):
        list(read_url_list("s3://owl/nope.parquet", UrlListSpec()))
    with pytest.raises(ValueError, match=r"no column 'url'"):
        list(read_url_list(_put(s3, "bad.parquet", _parquet(pa.table({"u": [1]}))), UrlListSpec()))


def test_instruction_files_and_their_images_on_s3(s3) -> None:
    records = [
        {"id": "a", "image": "img/0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]},
        {"id": "b", "image": "img/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "B."}]},
    ]  # fmt: skip
    image = _png(7)
    _put(s3, "instr/img/0.png", image)
    for name, body in (
        ("data.json", json.dumps(records).encode()),
        ("data.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode()),
    ):
        spec = SourceSpec("llava", _put(s3, f"instr/{name}", body))
        check_source(spec)
        got = list(read_source(spec))
        assert [r.sample_id for r in got] == ["a", "b"]
        # Images are relative to the file's folder on the store, and read from there.
        assert got[0].images == ["s3://owl/instr/img/0.png"]
        assert _read_image(got[0].images[0]) == image
        assert _read_image(got[1].images[0]) is None  # counted as a missing image by the step
    with pytest.raises(ValueError, match="s3://owl/instr/none.json: instruction file not found"):
        check_source(SourceSpec("llava", "s3://owl/instr/none.json"))
    bad = _put(s3, "instr/object.json", b'{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON array of samples, got an object"):
        list(read_source(SourceSpec("llava", bad)))


def test_download_step_reads_its_url_list_and_images_from_s3(s3, tmp_path) -> None:
    """The URL list is an object on the store, and so may be the images it names (s3://,
    through pyarrow's S3 filesystem), or any fsspec URL (tar://, through the fsspec fallback),
    beside file:// ones."""
    import tarfile

    _put(s3, "img/0.png", _png(10))
    _put(s3, "img/a b.png", _png(60))  # requested as `s3://owl/img/a%20b.png`
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("img/2.png")
        body = _png(110)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    local = tmp_path / "3.png"
    local.write_bytes(_png(160))
    urls = {
        "s3 plain": "s3://owl/img/0.png",
        "s3 space": "s3://owl/img/a b.png",
        "s3 missing": "s3://owl/img/missing.png",
        "fsspec tar": f"tar://img/2.png::{archive.as_uri()}",
        "local": local.as_uri(),
        "no filesystem": "nope://owl/img/0.png",
    }
    table = pa.table({"url": list(urls.values()), "caption": list(urls)})
    url_list = _put(s3, "download/urls.parquet", _parquet(table))
    cfg = download.Config(url_list=url_list, image_size=16, encode_format="png", encode_quality=9,
                          number_sample_per_shard=3, thread_count=2, processes_count=1,
                          distributor="multiprocessing")  # fmt: skip
    out = tmp_path / "download"
    manifest = download.run(StepContext("download", out, "test", None), cfg, {})
    assert manifest.stats["num_images"] == 4 and manifest.info["url_list"] == url_list
    assert manifest.dropped == {"download.bad_url": 1, "download.file_not_found": 1}
    pixels = {}
    for shard, captions in ((0, list(urls)[:3]), (1, list(urls)[3:])):
        meta = pq.read_table(out / "shards" / f"{shard:05d}.parquet").to_pylist()
        assert sorted(row["caption"] for row in meta) == sorted(captions)  # rows in list order
        with tarfile.open(out / "shards" / f"{shard:05d}.tar") as tar:
            for row in meta:
                if row["status"] == "success":
                    png = tar.extractfile(f"{row['key']}.png").read()
                    rgb = Image.open(io.BytesIO(png)).convert("RGB").getpixel((8, 8))
                    pixels[row["caption"]] = rgb[0]
    # Each image is the one its URL names (its red channel).
    assert pixels == {"s3 plain": 10, "s3 space": 60, "fsspec tar": 110, "local": 160}
