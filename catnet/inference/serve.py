"""`catnet serve`: a small web page to upload a video (or pick a sample) and see its top-5 labels,
the attention timeline over its clips and key frames of the clips that mattered most.

Standard library only (ThreadingHTTPServer). Routes:
  GET  /                       the page (catnet/serve_static/index.html, app.js, style.css)
  GET  /api/info               model, settings, samples, upload limits
  POST /api/predict?sample=S   predict a bundled sample
  POST /api/predict            body = the raw video file, header X-Filename = its (URL-encoded) name

Uploads are checked before any decoding: size (413), extension and a PyAV probe of the container (415).
Serving defaults to a cheap setting (4 clips x 1 centre crop x at most 32 frames) so one CPU answers
in seconds.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import struct
import sys
import tempfile
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import torch
import torch.nn.functional as F

from catnet.data.sources import VIDEO_SUFFIXES
from catnet.errors import CatnetError, VideoError
from catnet.utils.paths import catnet_home
from catnet.video import probe, read_frames
from catnet.video.encode import write_video

STATIC = Path(__file__).parent / "serve_static"
SAMPLE_NAME = "moving_square.mp4"
THUMB_HEIGHT = 96
NUM_KEYFRAMES = 3
SERVE_FRAMES = 32  # default cap on frames per clip when serving


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


def png_data_url(rgb: np.ndarray) -> str:
    """uint8 (H, W, 3) -> `data:image/png;base64,...`; a few lines of zlib instead of an image library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def keyframes(path: str | Path, pred, count: int = NUM_KEYFRAMES) -> list[dict]:
    """Middle frames of the highest-attention clips (evenly spaced clips when there is no attention)."""
    num = len(pred.clips)
    if num == 0 or pred.frame_indices is None:
        return []
    if pred.clips[0].attention is None:
        chosen = np.unique(np.linspace(0, num - 1, min(count, num)).round().astype(int)).tolist()
    else:
        chosen = np.argsort([-c.attention for c in pred.clips], kind="stable")[:count].tolist()
    indices = np.asarray(pred.frame_indices)  # (K, L); a second, seeking decode of just these frames
    frames = read_frames(path, indices[chosen, indices.shape[1] // 2].tolist())
    out, clips = [], pred.to_json()["clips"]  # same rounding as the rest of the answer
    for k, frame in zip(chosen, frames, strict=True):
        h, w = frame.shape[:2]
        size = (THUMB_HEIGHT, max(1, round(w * THUMB_HEIGHT / h)))
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        thumb = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        thumb = thumb[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append({"clip": int(k), **clips[k], "image": png_data_url(thumb)})
    return out


# ------------------------------------------------------------------------------------------- server


class App:
    """What the handler needs: a predictor (used by one request at a time) and the limits."""

    def __init__(self, predictor, samples: dict[str, Path], max_bytes: int = 100 << 20,
                 top_k: int = 5, model_name: str = "", verbose: bool = False):
        self.predictor = predictor
        self.samples = samples
        self.max_bytes = max_bytes
        self.top_k = top_k
        self.model_name = model_name
        self.verbose = verbose
        # One inference at a time: torch already uses every core, and concurrent ones multiply memory.
        self.lock = threading.Lock()

    def info(self) -> dict:
        p = self.predictor
        return {
            "model": self.model_name,
            "attention": p.head is not None,
            "settings": {"clips": p.sampling.num_clips, "frames": p.sampling.clip_len,
                         "crops": p.spatial.num_crops, "crop": p.spatial.crop},
            "samples": sorted(self.samples),
            "max_bytes": self.max_bytes,
            "extensions": list(VIDEO_SUFFIXES),
        }

    def predict(self, path: Path, name: str) -> dict:
        try:
            with self.lock:
                pred = self.predictor(path, top_k=self.top_k)
                frames = keyframes(path, pred)
        except (VideoError, OSError) as e:
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot read {name}: {e}") from None
        out = pred.to_json()
        out.update(video=name, seconds=round(pred.seconds, 3), keyframes=frames)
        return out

    def predict_upload(self, body: bytes, name: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="catnet-serve-") as tmp:
            path = Path(tmp) / ("upload" + Path(name).suffix.lower())
            path.write_bytes(body)
            try:  # sniff: the extension is only a claim, the container must really hold video
                probe(path)
            except (VideoError, OSError) as e:
                raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                f"{name} is not a readable video ({e})") from None
            return self.predict(path, name)


class Handler(BaseHTTPRequestHandler):
    server_version = "catnet-serve"
    app: App  # set on the subclass made by make_server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        route = urlparse(self.path).path
        try:
            if route in ("/", "/index.html"):
                self._static("index.html")
            elif route.startswith("/static/"):
                self._static(route[len("/static/"):])
            elif route == "/api/info":
                self._json(HTTPStatus.OK, self.app.info())
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such page: {route}")
        except HttpError as e:
            self._json(e.status, {"error": str(e)})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        try:
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
        except HttpError as e:
            self._json(e.status, {"error": str(e)})

    def _upload_name(self) -> str:
        return Path(unquote(self.headers.get("X-Filename", "") or "upload")).name

    def _upload_body(self) -> bytes:
        """Checks size and extension from the headers, before reading a byte of the body."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "upload needs a Content-Length")
        size, limit = int(length), self.app.max_bytes
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
        return self.rfile.read(size)

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():  # no ../ escapes
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), f"{kind}; charset=utf-8")

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

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
