"""A download killed half-way, re-run, fetches only the shards it had not finished.

A loopback HTTP server counts the requests per URL; one URL of the second shard hangs until the
test has killed the first run (SIGKILL to its whole process group, as a lost node would).
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dag import STEPS
from pipelines.step import StepContext
from pipelines.steps import download

pytestmark = pytest.mark.integration

PER_SHARD = 4


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (20 * i % 256, 7 * i % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # /hang.png answers only once this is set


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.counts[self.path] += 1
        if self.path == "/hang.png":
            self.server.release.wait(120)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        body = _png(sum(self.path.encode()))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a killed client
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


# shard 0: 3 images + a 404 | shard 1: 2 images, the hanging URL, a 404 | shard 2: 4 images
PATHS = [
    ["/img0.png", "/img1.png", "/missing0.png", "/img2.png"],
    ["/img3.png", "/hang.png", "/img4.png", "/missing1.png"],
    ["/img5.png", "/img6.png", "/img7.png", "/img8.png"],
]

RUN = """
import sys
from pathlib import Path
from pipelines.step import StepContext
from pipelines.steps import download
cfg = download.Config(url_list=sys.argv[1], image_size=16, timeout=60, number_sample_per_shard={n},
                      thread_count=4, processes_count=1, distributor="multiprocessing")
download.run(StepContext("download", Path(sys.argv[2]), "test", None), cfg, {{}})
"""


def _wait(proc, predicate, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the download exited ({proc.returncode}) before {what}"
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_killed_download_resumes_with_only_the_missing_shards(tmp_path, server):
    base = f"http://127.0.0.1:{server.server_port}"
    paths = [p for shard in PATHS for p in shard]
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [base + p for p in paths], "caption": paths}), url_list)
    out = tmp_path / "download"
    shards = out / download.SHARDS_DIR
    assert STEPS["download"].resumable  # the runner keeps the folder of a killed attempt

    # Run 1: killed (SIGKILL, the whole process group) while shard 1 waits on /hang.png.
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN.format(n=PER_SHARD), str(url_list), str(out)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait(proc, lambda: (shards / "00000_stats.json").exists(), "shard 0 finished")
        _wait(proc, lambda: server.counts["/hang.png"] == 1, "shard 1 started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (shards / "00001_stats.json").exists()
    assert not (shards / "00002_stats.json").exists()
    shard0_stats = (shards / "00000_stats.json").read_text()
    server.release.set()
    first = Counter(server.counts)
    assert all(first[p] == 1 for p in PATHS[0])
    assert all(first[p] == 0 for p in PATHS[2])

    # Run 2: the step as the runner re-runs it (same folder, kept).
    server.counts.clear()
    cfg = download.Config(
        url_list=str(url_list), image_size=16, timeout=60, number_sample_per_shard=PER_SHARD,
        thread_count=4, processes_count=1, distributor="multiprocessing",
    )  # fmt: skip
    manifest = download.run(StepContext("download", out, "test", None), cfg, {})
    again = Counter(server.counts)
    assert [again[p] for p in PATHS[0]] == [0, 0, 0, 0]  # finished shard: not fetched again
    assert [again[p] for p in PATHS[1] + PATHS[2]] == [1] * 8  # the others: exactly once
    assert manifest.info["resumed_shards"] == 1
    assert (shards / "00000_stats.json").read_text() == shard0_stats
    # The failure counts of the finished shard are kept: both 404s are counted.
    assert manifest.dropped == {"download.404": 2}
    assert manifest.stats["num_urls"] == 12
    assert manifest.stats["num_images"] == 10
    tars = [f for f in manifest.files if f.path.endswith(".tar")]
    assert [f.rows for f in tars] == [3, 3, 4]
    assert manifest.verify(out, full=True) == []
    stats = [json.loads((shards / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [3, 3, 4]

    # A third run finds every shard done and fetches nothing; another URL list starts over.
    server.counts.clear()
    manifest = download.run(StepContext("download", out, "test", None), cfg, {})
    assert sum(server.counts.values()) == 0
    assert manifest.info["resumed_shards"] == 3 and manifest.stats["num_images"] == 10
    pq.write_table(pa.table({"url": [base + p for p in PATHS[2]], "caption": PATHS[2]}), url_list)
    manifest = download.run(StepContext("download", out, "test", None), cfg, {})
    assert manifest.info["resumed_shards"] == 0
    assert [server.counts[p] for p in PATHS[2]] == [1] * 4
    assert sorted(p.name for p in shards.glob("*_stats.json")) == ["00000_stats.json"]
