"""Download step vs the raw img2dataset CLI on the same URL list from a loopback HTTP server.

Both run as fresh processes (interpreter start and imports included on both sides), alternating,
with the same img2dataset settings; the script prints images/s for each and the ratio
step / CLI of the best runs (target >= 0.9).

    .venv/bin/python bench/bench_download.py --num-images 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

VENV_BIN = Path(sys.executable).parent
STEP_SNIPPET = """
import sys
from pathlib import Path
from pipelines.step import StepContext
from pipelines.steps import download
cfg = download.Config(**{cfg})
ctx = StepContext(step="download", out_dir=Path(sys.argv[1]), job_name="bench", model=None)
manifest = download.run(ctx, cfg, {{}})
print("IMAGES", int(manifest.stats["num_images"]))
"""


def _images(num_distinct: int, size: int) -> list[bytes]:
    out = []
    for i in range(num_distinct):
        image = Image.effect_noise((size, size), 30 + i % 50).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _serve(images: list[bytes]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = images[int(self.path.strip("/").split(".")[0]) % len(images)]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def _count_cli_images(folder: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in folder.glob("*_stats.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    repo = Path(__file__).resolve().parent.parent
    server = _serve(_images(200, args.source_size))
    base = f"http://127.0.0.1:{server.server_port}"
    work = Path(tempfile.mkdtemp(prefix="bench_download_"))
    url_list = work / "urls.parquet"
    urls = [f"{base}/{i}.jpg" for i in range(args.num_images)]
    captions = [f"image number {i}" for i in range(args.num_images)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)

    common = {"image_size": args.image_size, "processes_count": args.processes,
              "thread_count": args.threads, "number_sample_per_shard": args.per_shard}  # fmt: skip
    step_cfg = {"url_list": str(url_list), "distributor": "multiprocessing", **common}
    cli = [str(VENV_BIN / "img2dataset"), "--url_list", str(url_list), "--input_format", "parquet",
           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
           "--resize_mode", "border", "--extract_exif", "False", "--enable_wandb", "False"]  # fmt: skip
    for name, value in common.items():
        cli += [f"--{name}", str(value)]

    best = {"cli": float("inf"), "step": float("inf")}
    for r in range(args.repeats):
        out = work / f"cli{r}"
        seconds, _ = _run([*cli, "--output_folder", str(out)], repo)
        assert _count_cli_images(out) == args.num_images, "the CLI did not download every image"
        best["cli"] = min(best["cli"], seconds)
        snippet = STEP_SNIPPET.format(cfg=repr(step_cfg))
        seconds, stdout = _run([sys.executable, "-c", snippet, str(work / f"step{r}")], repo)
        assert f"IMAGES {args.num_images}" in stdout, "the step did not download every image"
        best["step"] = min(best["step"], seconds)
        print(
            f"repeat {r}: cli {best['cli']:.1f}s, step {best['step']:.1f}s (best so far)",
            flush=True,
        )
    server.shutdown()

    rate = {k: args.num_images / v for k, v in best.items()}
    print(f"images: {args.num_images} ({args.source_size}px jpeg -> {args.image_size}px), "
          f"processes {args.processes}, threads {args.threads}")  # fmt: skip
    print(f"img2dataset CLI : {rate['cli']:8.1f} images/s")
    print(f"download step   : {rate['step']:8.1f} images/s")
    print(f"ratio step/CLI  : {rate['step'] / rate['cli']:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
