"""download -> filter on a loopback HTTP server that serves every kind of bad input."""

import contextlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipelines.step import StepContext, StepInput
from pipelines.steps import download
from pipelines.steps import filter as filter_step

pytestmark = pytest.mark.integration


def _png(colour, size=32, noise_seed=None) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    if noise_seed is not None:  # distinct, incompressible content per seed
        noise = Image.effect_noise((size, size), 60 + noise_seed).convert("RGB")
        image = Image.blend(image, noise, 0.5)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _png_bomb() -> bytes:
    """A small PNG whose header declares 50000 x 50000 pixels."""
    data = bytearray(_png((0, 0, 0), size=16))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", 50_000, 50_000)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


GOOD = {f"/good{i}.png": _png((40 * i, 0, 0), noise_seed=i) for i in range(6)}
ROUTES = {
    **GOOD,
    "/copy.png": GOOD["/good0.png"],
    "/small.png": _png((0, 200, 0), size=8),
    "/html": b"<html><body>Not an image</body></html>",
    "/trunc.jpg": _truncated_jpeg(),
    "/bomb.png": _png_bomb(),
    "/empty.png": b"",
}


class _Handler(BaseHTTPRequestHandler):
    changing = 0  # /changing.png serves a different image on every request
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow.png":
            time.sleep(6)  # > the download timeout below, with margin for a loaded machine
        if self.path == "/changing.png":
            with _Handler.lock:
                _Handler.changing += 1
                body = _png((0, 0, (37 * _Handler.changing) % 256))
        elif self.path in ROUTES or self.path == "/slow.png":
            body = ROUTES.get(self.path, GOOD["/good1.png"])
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _url_list(tmp: Path, base: str) -> Path:
    file_image = tmp / "local.png"
    file_image.write_bytes(_png((0, 90, 90), noise_seed=9))
    rows = [  # (url, caption, similarity); shards of 8 rows: duplicates cross shard boundaries
        (f"{base}/good0.png", "a red <b>square</b> see https://example.com/x", 0.4),
        (f"{base}/good1.png", "a photo of one thing", 0.4),
        (f"{base}/missing.png", "a 404", 0.4),
        (f"http://127.0.0.1:{_closed_port()}/x.png", "refused", 0.4),
        (f"{base}/slow.png", "too slow", 0.4),
        (f"{base}/html", "not an image", 0.4),
        (f"{base}/trunc.jpg", "truncated", 0.4),
        (f"{base}/bomb.png", "a bomb", 0.4),
        (f"{base}/empty.png", "zero bytes", 0.4),
        (f"{base}/good2.png", "", 0.4),
        (f"{base}/good3.png", "  \t ", 0.4),
        (f"{base}/small.png", "a tiny image", 0.4),
        (f"{base}/good4.png", "low clip score", 0.1),
        (f"{base}/changing.png", "same url and caption", 0.4),
        (f"{base}/copy.png", "the same image as good0", 0.4),
        (file_image.as_uri(), "a local file", 0.4),
        ((tmp / "absent.png").as_uri(), "a local file that is not there", 0.4),
        (f"{base}/good5.png", "the last good one", 0.4),
        (f"{base}/changing.png", "same url and caption", 0.4),
    ]
    path = tmp / "urls.parquet"
    url, caption, similarity = zip(*rows)
    pq.write_table(pa.table({"url": url, "caption": caption, "similarity": similarity}), path)
    return path


DOWNLOAD_DROPS = {
    "download.404": 1,
    "download.connection_refused": 1,
    "download.timeout": 1,
    "download.not_an_image": 1,
    "download.truncated_image": 1,
    "download.decompression_bomb": 1,
    "download.empty_file": 1,
    "download.file_not_found": 1,
}
FILTER_DROPS = {
    "filter.caption_empty": 2,
    "filter.min_side": 1,
    "filter.similarity": 1,
    "filter.duplicate_image": 1,
    "filter.duplicate_url_caption": 1,
}


def _ctx(step: str, out: Path) -> StepContext:
    return StepContext(step=step, out_dir=out, job_name="test", model=None)


def _download(tmp: Path, url_list: Path, distributor: str) -> StepInput:
    out = tmp / f"download-{distributor}"
    cfg = download.Config(
        url_list=str(url_list), image_size=32, timeout=3, number_sample_per_shard=8,
        thread_count=8, distributor=distributor,
    )  # fmt: skip
    manifest = download.run(_ctx("download", out), cfg, {})
    return StepInput("download", out, manifest)


def _filter(tmp: Path, data: StepInput, name: str) -> StepInput:
    cfg = filter_step.Config(min_side=16, min_similarity=0.2)
    out = tmp / name
    manifest = filter_step.run(_ctx("filter", out), cfg, {"data": data})
    return StepInput("filter", out, manifest)


@pytest.fixture(scope="module")
def steps(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("dl")
    url_list = _url_list(tmp, server)
    data = _download(tmp, url_list, "multiprocessing")
    return tmp, url_list, data, _filter(tmp, data, "filter-a")


def test_download_counts_every_failure_by_reason(steps):
    _, _, data, _ = steps
    manifest = data.manifest
    assert manifest.dropped == DOWNLOAD_DROPS
    assert manifest.stats["num_urls"] == 19
    assert manifest.stats["num_images"] == 19 - sum(DOWNLOAD_DROPS.values())
    tars = [f for f in manifest.files if f.path.endswith(".tar")]
    assert [f.path for f in tars] == ["shards/00000.tar", "shards/00001.tar", "shards/00002.tar"]
    assert sum(f.rows for f in tars) == manifest.stats["num_images"]
    assert manifest.verify(data.dir, full=True) == []
    assert not (data.dir / "_work").exists()


def test_filter_counts_every_rule_and_dedups_across_shards(steps):
    _, _, data, filtered = steps
    manifest = filtered.manifest
    assert manifest.dropped == FILTER_DROPS
    table = pa.concat_tables(pq.read_table(filtered.dir / f.path) for f in manifest.files)
    assert table.column_names == [
        "key",
        "url",
        "caption",
        "image",
        "width",
        "height",
        "sha256",
        "similarity",
    ]
    assert table.num_rows == data.manifest.stats["num_images"] - sum(FILTER_DROPS.values())
    assert manifest.stats["num_out"] == table.num_rows
    rows = {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert sorted(rows) == ["changing.png", "good0.png", "good1.png", "good5.png", "local.png"]
    assert rows["good0.png"]["caption"] == "a red square see"
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    image = Image.open(io.BytesIO(rows["good1.png"]["image"]))
    assert image.size == (rows["good1.png"]["width"], rows["good1.png"]["height"]) == (32, 32)


def test_filter_is_deterministic(steps):
    tmp, _, data, filtered = steps
    again = _filter(tmp, data, "filter-b")
    assert again.manifest.digest == filtered.manifest.digest


def test_ray_distributor_gives_the_same_counts(steps):
    tmp, url_list, _, _ = steps
    data = _download(tmp, url_list, "ray")
    assert data.manifest.dropped == DOWNLOAD_DROPS
    assert data.manifest.info["distributor"] == "ray"
    assert _filter(tmp, data, "filter-ray").manifest.dropped == FILTER_DROPS


def test_structural_errors_stop_before_work(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("link,text\nhttp://x/1.png,a\n")
    cfg = download.Config(url_list=str(path), input_format="csv")
    with pytest.raises(ValueError, match=r"urls\.csv: no column 'url' \(url_col\)"):
        download.run(_ctx("download", tmp_path / "out"), cfg, {})
    assert not (tmp_path / "out" / "shards").exists()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="bad.parquet: cannot read it as parquet"):
        download.run(_ctx("download", tmp_path / "out"), download.Config(url_list=str(bad)), {})
    with pytest.raises(ValueError, match="preset='laion5b'"):
        download.run(_ctx("download", tmp_path / "out"), download.Config(preset="laion5b"), {})
