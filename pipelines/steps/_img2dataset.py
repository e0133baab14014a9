"""img2dataset's parts with two changes:
- `CheckedResizer`: img2dataset's resizer preceded by our own decode, which names bad bytes
  precisely and normalises the rest (`owl.data.image.checked_image_bytes`: EXIF orientation,
  16-bit, alpha, CMYK, bytes after a JPEG's end marker) before img2dataset's OpenCV decoder sees
  them;
- `DeadlineDownloader`: img2dataset's downloader, whose urllib fetches (in each download process
  or Ray task) go through an opener that gives each URL a total deadline. urllib's `timeout`
  bounds each socket operation only: a server trickling a byte every few seconds would hold a
  download thread for as long as it likes. The same opener reads image URLs of the schemes
  urllib has no handler for (`s3://`, `gs://`, `hdfs://`, any fsspec protocol) through
  `owl.data.uri`, where img2dataset's urllib call would refuse them as an unknown URL type.
  The opener requests `owl.data.url_lists.fetch_url(url)` (percent-encoded): the URL list's `url`
  stays as given in every output.

In its own module so that `pipelines.steps.download` imports (for its `Config`) without
img2dataset, while the class still pickles by reference into download processes and Ray tasks.
"""

from __future__ import annotations

import email.message
import functools
import http.client
import io
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from typing import Any

from pipelines.steps._img2dataset_env import set_worker_env

set_worker_env()  # before img2dataset imports albumentations

import pyarrow.fs as pafs  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402

from owl.data import uri  # noqa: E402
from owl.data.image import ImageProblem, checked_image_bytes  # noqa: E402
from owl.data.url_lists import fetch_url  # noqa: E402


class CheckedResizer(Resizer):
    """Names a truncated image, a decompression bomb (from its header), a 0-byte file or HTML
    bytes; hands plain images' bytes as they are, and others normalised to 8-bit RGB PNG, to
    img2dataset's own resizer."""

    def __init__(self, max_image_pixels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_image_pixels = max_image_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):  # noqa: ANN001 (img2dataset's API)
        try:
            data = checked_image_bytes(img_stream.getvalue(), self.max_image_pixels)
        except ImageProblem as exc:  # the message maps to download.<reason> (download_reason)
            return None, None, None, None, None, exc.reason.replace("_", " ")
        return super().__call__(io.BytesIO(data), blurring_bbox_list)


class _DeadlineResponse(http.client.HTTPResponse):
    """Reads the body in pieces and stops with a timeout once the connection's deadline passed."""

    deadline: float = float("inf")
    total_s: float = 0.0

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            self._check_deadline()
            return super().read(amt)
        pieces = []
        while True:
            self._check_deadline()
            piece = self.read1(1 << 16)  # what has arrived, without waiting for more
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            self.close()
            raise TimeoutError(f"timed out: the whole download took over {self.total_s:g}s")


class _DeadlineMixin:
    """An http.client connection whose response must be complete `total_s` after it started."""

    response_class = _DeadlineResponse

    def __init__(self, *args: Any, total_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.total_s = total_s
        self.started = time.monotonic()

    def getresponse(self) -> http.client.HTTPResponse:
        response = super().getresponse()
        response.deadline = self.started + self.total_s
        response.total_s = self.total_s
        return response


class _DeadlineHTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, total_s: float) -> None:
        super().__init__()
        self.total_s = total_s

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, total_s=self.total_s), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, total_s: float) -> None:
        super().__init__()
        self.total_s = total_s

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_DeadlineHTTPSConnection, total_s=self.total_s)
        return self.do_open(connection, req, context=self._context)


class _ObjectStoreHandler(urllib.request.BaseHandler):
    """Image URLs whose scheme urllib has no handler for, read through `owl.data.uri` (pyarrow's
    S3/GCS/HDFS filesystems, else fsspec's), whole, within the same total deadline (checked
    between 1 MiB reads). Like `file://` URLs they are URLs: percent-escapes in them are decoded
    (`_EncodingOpener` requests a space in a key as `%20`). A scheme no filesystem knows
    falls through to urllib's "unknown url type" (download.bad_url); a missing object is
    download.file_not_found."""

    handler_order = 400  # before urllib's UnknownHandler (500), which refuses every such URL

    def __init__(self, total_s: float) -> None:
        super().__init__()
        self.total_s = total_s

    def unknown_open(self, req: urllib.request.Request) -> urllib.response.addinfourl | None:
        url = req.full_url
        try:
            filesystem, inner = uri.resolve_cached(url)
        except ValueError:
            return None
        if isinstance(filesystem, pafs.PyFileSystem):  # fsspec's: pyarrow's decode them already
            inner = urllib.parse.unquote(inner)
        deadline = time.monotonic() + self.total_s
        pieces = []
        try:
            with filesystem.open_input_stream(inner) as f:
                while piece := f.read(1 << 20):
                    pieces.append(piece)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"timed out: the whole read took over {self.total_s:g}s")
        except FileNotFoundError as exc:
            raise urllib.error.URLError(f"No such file or directory: {url}") from exc
        body = io.BytesIO(b"".join(pieces))
        return urllib.response.addinfourl(body, email.message.Message(), req.full_url, 200)


class _EncodingOpener:
    """urllib's opener for img2dataset's `urlopen(Request(url))`, asking for `fetch_url(url)`:
    http.client refuses a space and cannot send non-ASCII, while the row keeps `url` as given."""

    def __init__(self, opener: urllib.request.OpenerDirector) -> None:
        self.opener = opener

    def open(self, request: urllib.request.Request | str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(request, str):
            request = urllib.request.Request(request)
        request.full_url = fetch_url(request.full_url)
        return self.opener.open(request, *args, **kwargs)


class DeadlineDownloader(Downloader):
    """img2dataset's Downloader; each URL's fetch must finish within `timeout` seconds in total;
    object-store image URLs (`s3://...`) are read too (`_ObjectStoreHandler`).

    The opener is installed where the shard is downloaded (a download process or a Ray task):
    urllib's process-wide default opener, through its public `install_opener`."""

    def __call__(self, row):  # noqa: ANN001, ANN204 (img2dataset's API)
        opener = urllib.request.build_opener(
            _DeadlineHTTPHandler(self.timeout),
            _DeadlineHTTPSHandler(self.timeout),
            _ObjectStoreHandler(self.timeout),
        )
        urllib.request.install_opener(_EncodingOpener(opener))  # type: ignore[arg-type]
        return super().__call__(row)
