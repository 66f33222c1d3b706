"""`catnet serve`: a small web page to upload a video (or pick a sample) and see its top-5 labels,
the attention timeline over its clips, Grad-CAM maps over the key frames of the clips that mattered
most (explain.py) and, with a window length, the label timeline under the video (timeline.py).

Standard library only (ThreadingHTTPServer). Routes:
  GET  /                       the page (catnet/inference/serve_static/index.html, app.js, style.css)
  GET  /api/info               model, settings, samples, upload limits
  GET  /samples/NAME           a sample video itself (the page plays it)
  POST /api/predict?sample=S   predict a bundled sample
  POST /api/predict            body = the raw video file, header X-Filename = its (URL-encoded) name

Uploads are checked before any decoding: Content-Length (411 missing, 400 malformed, 413 too large),
extension and a PyAV probe of the container (415: also frames beyond the video layer's size limits).
Every error is a JSON `{"error": ...}`, an unexpected one a 500, never an empty reply. Serving uses the
`fast` profile by default (predict.PROFILES) so that one CPU answers in seconds; the model is loaded
once per process.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import re
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import torch
import torch.nn.functional as F

from catnet.data.sources import VIDEO_SUFFIXES
from catnet.errors import CatnetError, VideoError
from catnet.inference.explain import png_data_url
from catnet.inference.predict import ranked_clips
from catnet.inference.timeline import Timeline, iter_window_predictions
from catnet.utils.paths import catnet_home
from catnet.video import probe, read_frames
from catnet.video.encode import write_video

STATIC = Path(__file__).parent / "serve_static"
SAMPLE_NAME = "moving_square.mp4"
THUMB_HEIGHT = 96
NUM_KEYFRAMES = 3


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ samples


def ensure_sample(folder: Path | None = None) -> Path:
    """A tiny synthetic clip (a square crossing the frame), generated once into catnet_home()."""
    path = (folder or catnet_home() / "samples") / SAMPLE_NAME
    if path.is_file():
        return path
    t, h, w = 48, 96, 128
    video = np.full((t, h, w, 3), (30, 60, 90), np.uint8)
    for i in range(t):
        x = int(i / (t - 1) * (w - 24))
        video[i, h // 2 - 12: h // 2 + 12, x: x + 24] = (240, 200, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Encode beside the target, then rename: a killed first start never leaves half a sample.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        os.replace(write_video(Path(tmp) / SAMPLE_NAME, video, fps=12.0), path)
    return path


def find_samples(extra_dirs: list[str] | None = None) -> dict[str, Path]:
    samples = {SAMPLE_NAME: ensure_sample()}
    for folder in extra_dirs or []:
        if not Path(folder).is_dir():
            raise CatnetError(f"--samples folder not found: {folder}")
        for p in sorted(Path(folder).iterdir()):
            if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
                samples.setdefault(p.name, p)
    return samples


# --------------------------------------------------------------------------------------- key frames


def keyframes(path: str | Path, pred, count: int = NUM_KEYFRAMES) -> list[dict]:
    """Middle frames of the clips that mattered most (predict.ranked_clips: by attention, else by the top
    class's score per clip, else evenly spaced)."""
    if not pred.clips or pred.frame_indices is None:
        return []
    chosen = ranked_clips(pred, count)
    have = {s.clip: s.frame for s in pred.explain or []}  # Grad-CAM already decoded these key frames
    missing = [k for k in chosen if k not in have]
    if missing:
        indices = np.asarray(pred.frame_indices)  # (K, L); a second, seeking decode of just these frames
        have.update(zip(missing, read_frames(path, indices[missing, indices.shape[1] // 2].tolist()),
                        strict=True))
    out = []
    for k in chosen:
        frame = have[k]
        h, w = frame.shape[:2]
        size = (THUMB_HEIGHT, max(1, round(w * THUMB_HEIGHT / h)))
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        thumb = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        thumb = thumb[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append({"clip": int(k), **pred.clips[k].to_json(), "image": png_data_url(thumb)})
    return out


# ------------------------------------------------------------------------------------------- server


class App:
    """What the handler needs: a predictor (used by one request at a time), the limits, and whether to add
    Grad-CAM maps (`explain`) and a label timeline (`window` seconds, `hop`) to each answer."""

    def __init__(self, predictor, samples: dict[str, Path], max_bytes: int = 100 << 20,
                 top_k: int = 5, model_name: str = "", verbose: bool = False, explain: bool = True,
                 window: float | None = None, hop: float | None = None):
        self.predictor = predictor
        self.samples = samples
        self.max_bytes = max_bytes
        self.top_k = top_k
        self.model_name = model_name
        self.verbose = verbose
        self.explain = explain
        self.window, self.hop = window, hop
        # One inference at a time: torch already uses every core, and concurrent ones multiply memory.
        self.lock = threading.Lock()

    def info(self) -> dict:
        p = self.predictor
        return {
            "model": self.model_name,
            "attention": p.head is not None,
            "settings": {"clips": p.sampling.num_clips, "frames": p.sampling.clip_len,
                         "crops": p.spatial.num_crops, "crop": p.spatial.crop},
            "profile": p.describe(),
            "explain": self.explain,
            "window": None if self.window is None else {"seconds": self.window,
                                                        "hop": self.hop or self.window},
            "samples": sorted(self.samples),
            "max_bytes": self.max_bytes,
            "extensions": list(VIDEO_SUFFIXES),
        }

    def predict(self, path: Path, name: str) -> dict:
        try:
            with self.lock:
                pred = self.predictor(path, top_k=self.top_k, explain=self.explain)
                frames = keyframes(path, pred)
                timeline = self.label_timeline(path) if self.window is not None else None
        except (CatnetError, OSError) as e:  # VideoError included: it fails while decoding
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot read {name}: {reason}") from None
        out = pred.to_json()
        out.update(video=name, seconds=round(pred.seconds, 3), keyframes=frames)
        if timeline is not None:
            out.update(timeline)
        return out

    def label_timeline(self, path: Path) -> dict:
        """The `windows` and merged `timeline` of `catnet predict --window` (predict's JSON schema)."""
        timeline, windows = Timeline(self.predictor.labels), []
        for w in iter_window_predictions(self.predictor, str(path), self.window, self.hop, self.top_k):
            timeline.add(w)
            windows.append(w.to_json())
        return {"windows": windows, "timeline": [seg.to_json() for seg in timeline.segments]}

    def predict_upload(self, body: bytes, name: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="catnet-serve-") as tmp:
            path = Path(tmp) / _safe_name(name)  # messages from the video layer then name the user's file
            path.write_bytes(body)
            try:  # sniff: the extension is only a claim, the container must really hold video
                probe(path)
            except (VideoError, OSError) as e:  # also frames beyond the video layer's geometry limits
                raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                f"{name} is not a readable video ({e})") from None
            return self.predict(path, name)


def _safe_name(name: str) -> str:
    """A file name for an upload: the user's, reduced to plain characters (no path, no control codes)."""
    stem = re.sub(r"[^A-Za-z0-9._ -]", "_", Path(name).stem)[:80].strip(" .") or "upload"
    return stem + Path(name).suffix.lower()


class Handler(BaseHTTPRequestHandler):
    server_version = "catnet-serve"
    app: App  # set on the subclass made by make_server

    def handle(self) -> None:
        """One connection; a client that hangs up (while we read its request or write the answer) ends it
        quietly instead of printing socketserver's traceback."""
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, route) -> None:
        """Run a route; every failure becomes a JSON error reply, never an empty one or a traceback."""
        try:
            try:
                route()
            except HttpError as e:
                self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client went away mid-answer: nobody is left to tell
        except Exception as e:  # noqa: BLE001 - a bug must still answer the browser, in one line
            self.close_connection = True
            reason = (str(e).splitlines() or [""])[0][:200]
            sys.stderr.write(f"catnet serve: {self.path[:200]!r}: internal error: {type(e).__name__}: "
                             f"{reason}\n")
            with contextlib.suppress(OSError):  # the connection may be gone as well
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}"})

    def _get(self) -> None:
        route = urlparse(self.path).path
        if route in ("/", "/index.html"):
            self._static("index.html")
        elif route.startswith("/static/"):
            self._static(route[len("/static/"):])
        elif route.startswith("/samples/"):
            name = unquote(route[len("/samples/"):])
            if name not in self.app.samples:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such sample: {name}")
            path = self.app.samples[name]
            self._send(HTTPStatus.OK, path.read_bytes(),
                       mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        elif route == "/api/info":
            self._json(HTTPStatus.OK, self.app.info())
        else:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such page: {route}")

    def _post(self) -> None:
        url = urlparse(self.path)
        if url.path != "/api/predict":
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}")
        sample = parse_qs(url.query).get("sample", [None])[0]
        if sample is not None:
            if sample not in self.app.samples:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such sample: {sample}")
            result = self.app.predict(self.app.samples[sample], sample)
        else:
            result = self.app.predict_upload(self._upload_body(), self._upload_name())
        self._json(HTTPStatus.OK, result)

    def _upload_name(self) -> str:
        return Path(unquote(self.headers.get("X-Filename", "") or "upload")).name

    def _content_length(self) -> int:
        """The body size from the header: 411 without one, 400 unless it is one plain ASCII number."""
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "upload needs a Content-Length")
        text = values[0].strip()
        # str.isdigit() accepts '²' and other Unicode digits that int() refuses: ASCII digits only
        if len(set(values)) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 18:
            self.close_connection = True  # the body's extent is unknown: do not read another request
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed Content-Length: {values[0][:40]!r}")
        return int(text)

    def _upload_body(self) -> bytes:
        """Checks size and extension from the headers, before reading a byte of the body."""
        size, limit = self._content_length(), self.app.max_bytes
        if size > limit:
            self.close_connection = True  # the unread body must not be parsed as a next request
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"file is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")
        if size == 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, "empty upload")
        name = self._upload_name()
        if Path(name).suffix.lower() not in VIDEO_SUFFIXES:
            self.close_connection = True
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"{name}: unsupported file type; allowed: {' '.join(VIDEO_SUFFIXES)}")
        body = self.rfile.read(size)
        if len(body) < size:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, f"upload ended after {len(body)} of {size} bytes")
        return body

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():  # no ../ escapes
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), f"{kind}; charset=utf-8")

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
        if self.app.verbose:
            sys.stderr.write(f"catnet serve: {self.address_string()} {format % args}\n")


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free one: see `server.server_address`); call serve_forever()."""
    handler = type("CatnetHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
