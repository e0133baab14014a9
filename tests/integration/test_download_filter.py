"""download -> filter on a loopback HTTP server that serves every kind of bad input."""

import contextlib
import io
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.step import StepContext, StepInput
from pipelines.steps import download
from pipelines.steps import filter as filter_step
from tests.integration import bad_images

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


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
    # Decoders get these wrong; each must arrive as the colours it shows (see EXPECTED_COLOURS).
    "/grey16.png": bad_images.grey16_png(0x8000),
    "/rgb16.png": bad_images.rgb16_png(),
    "/rgba16.png": bad_images.rgba16_png(),
    "/palette.png": bad_images.palette_alpha_png(),
    "/cmyk.jpg": bad_images.cmyk_jpeg(),
    "/exif.jpg": bad_images.sideways_jpeg(),
    "/trailing.jpg": bad_images.trailing_bytes_jpeg(),
    # Fetched only if the request percent-encodes the URL list's spaces / non-ASCII characters.
    "/with space.png": _png((0, 0, 250), noise_seed=11),
    "/caf\u00e9 \u6771.png": _png((250, 250, 0), noise_seed=12),
}
# (x, y) -> RGB of the image as stored by the download step (32x32, border-padded).
EXPECTED_COLOURS = {
    "grey16.png": {(16, 16): (128, 128, 128)},
    "rgb16.png": {(16, 16): (64, 128, 192)},
    "rgba16.png": {(16, 16): (192, 64, 128)},
    "palette.png": {(4, 16): (255, 255, 255), (28, 16): bad_images.RED},
    "cmyk.jpg": {(16, 16): (30, 160, 60)},
    "exif.jpg": {(16, 4): bad_images.RED, (16, 28): bad_images.BLUE},  # upright: 16 wide, 32 high
}


class _Handler(BaseHTTPRequestHandler):
    changing = 0  # /changing.png serves a different image on every request
    trickle_s: list[float] = []  # how long each /trickle.png client stayed connected
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.path = urllib.parse.unquote(self.path)  # what the client percent-encoded
        if self.path == "/slow.png":
            time.sleep(6)  # > the download timeout below, with margin for a loaded machine
        if self.path == "/trickle.png":  # every read gets a byte in time; the whole takes 20 s
            self._trickle(GOOD["/good2.png"][:80])
            return
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

    def _trickle(self, body: bytes) -> None:
        """One byte every 0.25 s; records how long the client stayed (`trickle_s`)."""
        start = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(0.25)
        _Handler.trickle_s.append(time.monotonic() - start)

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
        (f"{base}/trickle.png", "a trickling server", 0.4),
        *[(f"{base}/{name}", f"decoders get {name} wrong", 0.4) for name in EXPECTED_COLOURS],
        (f"{base}/trailing.jpg", "bytes after the end marker", 0.4),
        (f"{base}/with space.png", "a space in the url", 0.4),
        (f"{base}/caf\u00e9 \u6771.png", "non-ascii characters in the url", 0.4),
    ]
    path = tmp / "urls.parquet"
    url, caption, similarity = zip(*rows)
    pq.write_table(pa.table({"url": url, "caption": caption, "similarity": similarity}), path)
    return path


DOWNLOAD_DROPS = {
    "download.404": 1,
    "download.connection_refused": 1,
    "download.timeout": 2,
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
    assert manifest.stats["num_urls"] == 29
    assert manifest.stats["num_images"] == 29 - sum(DOWNLOAD_DROPS.values())
    tars = [f for f in manifest.files if f.path.endswith(".tar")]
    assert [f.path for f in tars] == [f"shards/0000{i}.tar" for i in range(4)]
    assert sum(f.rows for f in tars) == manifest.stats["num_images"]
    assert manifest.verify(data.dir, full=True) == []
    assert not (data.dir / "_work").exists()


def test_filter_counts_every_rule_and_dedups_across_shards(steps):
    _, url_list, data, filtered = steps
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
    # Each row's url is its URL list row's, as given (not percent-encoded): they join back.
    given = set(pq.read_table(url_list).column("url").to_pylist())
    assert set(table.column("url").to_pylist()) <= given
    rows = {r["url"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(
        ["changing.png", "good0.png", "good1.png", "good5.png", "local.png", "trailing.jpg"]
        + list(EXPECTED_COLOURS)
        + ["with space.png", "caf\u00e9 \u6771.png"]
    )
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


def test_images_decoders_get_wrong_arrive_with_their_colours(steps):
    _, _, _, filtered = steps
    table = pa.concat_tables(pq.read_table(filtered.dir / f.path) for f in filtered.manifest.files)
    images = {r["url"].rsplit("/", 1)[1]: r["image"] for r in table.to_pylist()}
    for name, points in EXPECTED_COLOURS.items():
        pixels = np.asarray(Image.open(io.BytesIO(images[name])).convert("RGB"), np.int32)
        for (x, y), rgb in points.items():
            assert np.abs(pixels[y, x] - np.array(rgb)).max() <= 24, (name, (x, y), pixels[y, x])


def test_trickling_server_hits_the_total_deadline(steps):
    """/trickle.png sends a byte every 0.25 s: every socket read is in time, the whole takes 20 s."""
    for _ in range(50):  # the server notices the closed connection at its next write or two
        if _Handler.trickle_s:
            break
        time.sleep(0.1)
    # The first request is the `steps` download's (timeout 3 s), counted as download.timeout.
    assert _Handler.trickle_s and _Handler.trickle_s[0] < 8, _Handler.trickle_s


def test_text_a_retry_cannot_fix_names_file_column_and_row(tmp_path):
    def run_on(table: pa.Table) -> None:
        path = tmp_path / "urls.parquet"
        pq.write_table(table, path)
        download.run(_ctx("download", tmp_path / "out"), download.Config(url_list=str(path)), {})

    not_utf8 = pa.array([b"http://x/1.png", b"http://x/\xff.png"], pa.binary()).view(pa.string())
    with pytest.raises(ValueError, match=r"urls\.parquet: column 'url' \(url_col\) row 1: not val"):
        run_on(pa.table({"url": not_utf8, "caption": ["a", "b"]}))
    binary = pa.array([b"fine", b"\xfe\xff"], pa.binary())
    with pytest.raises(
        ValueError, match=r"column 'caption' \(caption_col\) row 1: not valid UTF-8"
    ):
        run_on(pa.table({"url": ["http://x/1.png", "http://x/2.png"], "caption": binary}))
    with pytest.raises(ValueError, match=r"column 'url' \(url_col\) holds int64, not text URLs"):
        run_on(pa.table({"url": [1, 2], "caption": ["a", "b"]}))


def test_every_download_failing_fails_the_step_with_counts(tmp_path, server):
    from pipelines.step import EmptyOutput, check_not_empty

    path = tmp_path / "urls.parquet"
    urls = [f"{server}/missing{i}.png" for i in range(3)] + [f"{server}/html"]
    pq.write_table(pa.table({"url": urls, "caption": ["a"] * 4}), path)
    data = _download(tmp_path, path, "multiprocessing")
    expected = (
        r"download kept no samples of 4 read \(num_urls\); dropped by reason: download\.404=3"
    )
    with pytest.raises(EmptyOutput, match=expected + r", download\.not_an_image=1"):
        check_not_empty("download", data.manifest)
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": []}), path)
    empty = _download(tmp_path / "empty", path, "multiprocessing")
    with pytest.raises(EmptyOutput, match=r"of 0 read \(num_urls\); dropped by reason: no input"):
        check_not_empty("download", empty.manifest)
