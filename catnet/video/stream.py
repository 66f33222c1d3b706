"""Dense fixed-stride windows over long videos and live sources, decoded in a rolling window.

Two halves, one definition of a window (docs/long_videos.md):

* Index math (`dense_windows`, `DenseSampling.plan`): which frames make up window t. Window t starts at
  output frame `t * hop` and takes `window` frames at `stride` (span `(window - 1) * stride + 1`).
  **Tail rule**: every window that fits entirely is kept; if frames after the last full window remain
  uncovered, one more window on the hop grid is kept when it starts before the end, with its indices
  past the end clamped to the last frame (the rule `sampling.sample_clips` uses for short videos). So a
  video shorter than one window gives exactly one window, and there is at most one partial window.
* `iter_windows(source, ...)`: decodes sequentially with PyAV (no seeking: works for pipes, live
  network streams, devices and files still being written), resizes each needed frame to the short side
  at once and keeps only a ring buffer of the last `span` resized frames, yielding each `Window` as soon
  as its last frame is decoded. Peak memory is the ring plus a couple of windows, whatever the length.

Resampling (`fps=`): output frame i (at `fps`) is source frame `floor(i * fps_in / fps + 0.5)`, clamped
to the last frame; a video of N source frames gives `ceil(N * fps / fps_in)` output frames. Indices are
decode-order positions, as everywhere in catnet.video, so for a file window t's frames equal
`read_frames(path, plan.indices[t])` resized the same way (tested).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from catnet.config import check_fields, spec
from catnet.errors import CatnetError, VideoError, quoted
from catnet.utils.threads import Stopped, threaded
from catnet.video.decode import DEFAULT_FPS, _check_file, _fps, _orientation, _reason, _to_rgb, check_geometry
from catnet.video.transforms import resize_short

# How long `iter_windows` waits for the decoding thread to close its container after the consumer
# stopped (Ctrl-C, break). A thread still blocked in a network read closes it when the read times out.
JOIN_SECONDS = 0.5
# Resampled lengths are ceil(N * fps_out / fps_in); this absorbs float error in exact ratios (30 -> 15).
_EPS = 1e-6


# ------------------------------------------------------------------------------------------ index math


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise CatnetError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def dense_windows(num_frames: int, window: int, hop: int, stride: int = 1) -> np.ndarray:
    """Frame positions int64 (T, window) of fixed-stride windows covering `num_frames` frames.

    Window t starts at `t * hop`; all full windows, plus (tail rule) one partial window on the hop grid
    if frames after the last full one remain uncovered and it starts before the end, its indices past
    the end clamped to the last frame. Sorted within and across windows, all in [0, num_frames).
    """
    n = _check_int("num_frames", num_frames)
    window, hop, stride = _check_int("window", window), _check_int("hop", hop), _check_int("stride", stride)
    span = (window - 1) * stride + 1
    n_full = (n - span) // hop + 1 if n >= span else 0
    starts = list(range(0, n_full * hop, hop))
    covered = (n_full - 1) * hop + span if n_full else 0
    if covered < n and n_full * hop < n:
        starts.append(n_full * hop)
    idx = np.asarray(starts, np.int64)[:, None] + stride * np.arange(window, dtype=np.int64)[None]
    return np.minimum(idx, n - 1)


def resampled_length(num_frames: int, fps_in: float, fps_out: float) -> int:
    """Frames at `fps_out` of a video of `num_frames` frames at `fps_in`: ceil(N * fps_out / fps_in)."""
    return max(1, math.ceil(num_frames * fps_out / fps_in - _EPS))


def _source_of(i: int, ratio: float) -> int:
    """The source frame of output frame i (unclamped): floor(i * fps_in / fps_out + 0.5)."""
    return math.floor(i * ratio + 0.5)


def resample_indices(num_frames: int, fps_in: float, fps_out: float) -> np.ndarray:
    """Source frame int64 (N_out,) of each output frame at `fps_out`: round(i * fps_in / fps_out), clamped."""
    n = _check_int("num_frames", num_frames)
    if not (fps_in > 0 and fps_out > 0):
        raise CatnetError(f"frame rates must be > 0, got {fps_in} -> {fps_out}")
    ratio = fps_in / fps_out
    src = np.floor(np.arange(resampled_length(n, fps_in, fps_out), dtype=np.float64) * ratio + 0.5)
    return np.minimum(src.astype(np.int64), n - 1)


def hop_frames(hop_seconds: float, fps: float) -> int:
    """A hop in seconds as whole frames at `fps` (nearest, at least 1): off by at most half a frame."""
    if not hop_seconds > 0 or not fps > 0:
        raise CatnetError(f"hop seconds and fps must be > 0, got {hop_seconds} s at {fps} fps")
    return max(1, math.floor(hop_seconds * fps + 0.5))


@dataclass(frozen=True)
class DensePlan:
    """Dense windows of one video: source frames, output positions, times, the rate and hop used."""

    indices: np.ndarray  # (T, L) int64 source frame indices (what read_frames takes)
    positions: np.ndarray  # (T, L) int64 output frame positions (== indices without resampling)
    times: np.ndarray  # (T, 2) float64 seconds: first frame start, last frame end (positions / fps)
    fps: float  # output frame rate (the resampling target, else the source's)
    hop: int  # hop in output frames


@dataclass(frozen=True)
class DenseSampling:
    """Fixed-stride windows: `window` frames at `stride`, a new window every `hop` frames (or
    `hop_seconds`, rounded to whole frames), optionally after resampling the video to `fps`.

    Without a hop the windows tile the video (hop = span). `to_dict()` is what a dense store's manifest
    records under "sampling" (with "mode": "dense"), so stores of different settings refuse to mix.
    """

    window: int = field(default=16, metadata=spec(ge=1))
    hop: int | None = field(default=None, metadata=spec(ge=1))
    stride: int = field(default=1, metadata=spec(ge=1))
    hop_seconds: float | None = field(default=None, metadata=spec(gt=0))
    fps: float | None = field(default=None, metadata=spec(gt=0))

    def __post_init__(self):
        _check_int("window", self.window)
        _check_int("stride", self.stride)
        if self.hop is not None and self.hop_seconds is not None:
            raise CatnetError("give a hop in frames or in seconds, not both")
        if self.hop is not None:
            _check_int("hop", self.hop)
        for name in ("hop_seconds", "fps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 0):
                raise CatnetError(f"{name.replace('_', ' ')} must be a number > 0, got {value!r}")
        check_fields(self)  # the bounds above, as `config.spec` metadata (what CLI flags are checked by)

    @property
    def span(self) -> int:
        """Output frames from a window's first to its last, inclusive."""
        return (self.window - 1) * self.stride + 1

    def hop_at(self, fps: float) -> int:
        """The hop in output frames for a video whose output rate is `fps`."""
        if self.hop_seconds is not None:
            return hop_frames(self.hop_seconds, fps)
        return self.hop if self.hop is not None else self.span

    def output_fps(self, fps_in: float) -> float:
        return float(self.fps) if self.fps is not None else float(fps_in)

    def plan(self, num_frames: int, fps: float) -> DensePlan:
        """The windows of a video of `num_frames` frames at `fps` (e.g. from `probe`)."""
        if not fps > 0:
            raise CatnetError(f"fps must be > 0, got {fps}")
        fps_out = self.output_fps(fps)
        src = resample_indices(num_frames, fps, fps_out) if self.fps is not None else None
        n_out = len(src) if src is not None else int(num_frames)
        hop = self.hop_at(fps_out)
        positions = dense_windows(n_out, self.window, hop, self.stride)
        indices = src[positions] if src is not None else positions
        times = np.stack([positions[:, 0] / fps_out, (positions[:, -1] + 1) / fps_out], axis=1)
        return DensePlan(indices, positions, times.astype(np.float64), fps_out, hop)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "dense", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseSampling:
        d = {k: v for k, v in d.items() if k != "mode"}
        try:
            return cls(**d)
        except TypeError as e:
            raise CatnetError(f"not a dense sampling config: {d} ({e})") from None


def is_dense(sampling: dict[str, Any] | None) -> bool:
    """Whether a store manifest's "sampling" entry describes dense windows (else K clips)."""
    return isinstance(sampling, dict) and sampling.get("mode") == "dense"


# -------------------------------------------------------------------------------------- rolling reader


@dataclass
class Window:
    """One dense window, yielded as soon as its last frame is decoded."""

    index: int  # t: the window's position on the hop grid (0, 1, 2, ...)
    start_s: float  # start of its first frame, seconds from the first frame of the source
    end_s: float  # end of its last frame (last frame time + 1 / fps)
    frames: np.ndarray  # uint8 (L, h, w, 3), upright, resized to the short side
    frame_indices: np.ndarray  # int64 (L,) source frame indices (decode order), clamped at the tail
    partial: bool = False  # the tail window, past the end of the source (last frame repeated)
    real_frames: int | None = None  # frames before the repeats of a partial window (None: all of them)


class _FollowFile:
    """A file still being written, read as a stream: at its current end, wait for more bytes; after
    `idle` seconds without growth (or when asked to stop) report end of file."""

    def __init__(self, path: Path, idle: float, stop: threading.Event):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close(), called when the container closes
        self.idle, self.stop, self.ended = idle, stop, False

    def read(self, n: int) -> bytes:
        t0 = time.monotonic()
        while True:
            data = self._f.read(n)
            if data or self.ended:
                return data
            if self.stop.is_set() or time.monotonic() - t0 > self.idle:
                self.ended = True  # later reads (the demuxer probes the end more than once) return at once
                return b""
            time.sleep(0.02)

    def close(self) -> None:
        self._f.close()


@dataclass
class _Source:
    name: str  # as given, for messages
    target: str
    is_file: bool  # a regular file: never stalls; times default to index / fps


def _classify(source: str | os.PathLike, follow: bool) -> _Source:
    name = os.fspath(source)
    if "://" in name or name.startswith(("pipe:", "lavfi:")):
        return _Source(name, name, False)
    path = Path(name)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):  # V4L2 device, named pipe
        return _Source(name, name, False)
    _check_file(path)  # no such file, a directory, empty, permission denied: the one-line messages
    return _Source(name, name, not follow)


@contextlib.contextmanager
def _open(src: _Source, follow: bool, timeout: float, open_timeout: float, fmt: str | None,
          options: dict[str, str] | None, stop: threading.Event) -> Iterator[Any]:
    """The source's container (closed on exit), with a video stream."""
    with contextlib.ExitStack() as stack:
        if follow and not src.is_file and "://" not in src.target and Path(src.target).is_file():
            fobj = _FollowFile(Path(src.target), timeout, stop)
            stack.callback(fobj.close)  # after the container (callbacks run last in, first out)
            target = fobj
        else:
            target = src.target
        container = _open_container(src, target, timeout, open_timeout, fmt, options)
        with container:
            if not container.streams.video:
                raise VideoError(f"{quoted(src.name)} has no video stream")
            yield container


def _open_container(src: _Source, target: Any, timeout: float, open_timeout: float, fmt: str | None,
                    options: dict[str, str] | None):
    try:
        if not isinstance(target, str):  # a followed file: our reader decides when it ends
            container = av.open(target, mode="r", format=fmt, options=options)
        elif src.is_file:
            container = av.open(src.target, mode="r", format=fmt, options=options)
        else:
            container = av.open(src.target, mode="r", format=fmt, options=options,
                                timeout=(open_timeout, timeout))
    except av.error.ExitError:
        raise VideoError(f"no frames from {quoted(src.name)} for {open_timeout:g} s (open timed out)") \
            from None
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"cannot open {quoted(src.name)}: {_reason(e)}") from None
    return container


def _needed(i: int, hop: int, span: int, stride: int) -> bool:
    """Whether output frame i belongs to some window of the hop grid."""
    k = i // hop
    while k >= 0 and k * hop + span > i:
        if (i - k * hop) % stride == 0:
            return True
        k -= 1
    return False


class _WindowReader:
    """The sequential decoder behind `iter_windows` (runs in its thread): the ring buffer of the last
    `span` resized output frames, and the bookkeeping of which window completes when.

    Output frame i lives in ring slot i % span; `owner[slot]` says which output frame a slot holds, so a
    window is assembled by gathering its positions' slots (checked against `owner`).
    """

    def __init__(self, src: _Source, sampling: DenseSampling, stream, *, short_side: int | None,
                 timeout: float, input_fps: float | None, use_pts: bool, stop: threading.Event):
        self.src, self.short_side, self.timeout, self.stop = src, short_side, timeout, stop
        self.fps_in = float(input_fps) if input_fps else (_fps(stream) or DEFAULT_FPS)
        self.fps = sampling.output_fps(self.fps_in)
        self.resample = sampling.fps is not None
        self.ratio = self.fps_in / self.fps
        self.hop, self.span = sampling.hop_at(self.fps), sampling.span
        self.window_len, self.stride = sampling.window, sampling.stride
        self.use_pts, self.tb = use_pts, stream.time_base
        self.ring: np.ndarray | None = None  # (span, h, w, 3) uint8
        self.owner = np.full(self.span, -1, np.int64)  # output frame held by each slot
        self.src_of = np.zeros(self.span, np.int64)  # its source frame
        self.t_of = np.zeros((self.span, 2), np.float64)  # its start, end seconds
        self.size = None  # (w, h) of the first frame: later frames are scaled to it (mid-stream changes)
        self.orient = (0, False)  # the first frame's display matrix (turn, mirror), as decode.py reads it
        self.pts0 = None
        self.k = 0  # the next window to complete

    def _convert(self, frame) -> np.ndarray:
        rgb = _to_rgb(frame, self.size, self.orient)  # may be a rotated / mirrored view
        if self.short_side is None:
            return rgb
        return resize_short(torch.from_numpy(np.ascontiguousarray(rgb)[None]), self.short_side)[0].numpy()

    def _store(self, i: int, j: int, t: tuple[float, float], frame) -> None:
        rgb = self._convert(frame)
        if self.ring is None:
            self.ring = np.empty((self.span, *rgb.shape), np.uint8)
        slot = i % self.span
        self.ring[slot], self.owner[slot], self.src_of[slot], self.t_of[slot] = rgb, i, j, t
        if self.stop.is_set():
            raise Stopped  # the consumer went away: unwind and close the container

    def _window(self, k: int, positions: np.ndarray, partial: bool, real: int | None = None) -> Window:
        slots = positions % self.span
        if not (self.owner[slots] == positions).all():  # a bookkeeping bug, never bad input
            raise RuntimeError(f"ring buffer lost frames of window {k}")
        return Window(k, float(self.t_of[slots[0], 0]), float(self.t_of[slots[-1], 1]), self.ring[slots],
                      self.src_of[slots].copy(), partial, real)

    def _offer(self, i: int, j: int, t: tuple[float, float], frame) -> Iterator[Window]:
        """Output frame i (source frame j): kept if some window needs it; completes window k at its end."""
        if not _needed(i, self.hop, self.span, self.stride):
            return
        self._store(i, j, t, frame)
        if i == self.k * self.hop + self.span - 1:  # the last frame of window k: it is complete
            k, self.k = self.k, self.k + 1
            yield self._window(k, k * self.hop + self.stride * np.arange(self.window_len, dtype=np.int64),
                               False)

    def _time_of(self, i: int, frame=None) -> tuple[float, float]:
        """(start, end) seconds of output frame i: i / fps and (i + 1) / fps (as clip_times has it), or
        from the frame's pts relative to the first frame's, when the source's pts are used."""
        if frame is None or self.resample or not self.use_pts or frame.pts is None or self.tb is None:
            return i / self.fps, (i + 1) / self.fps
        if self.pts0 is None:
            self.pts0 = frame.pts
        t = float((frame.pts - self.pts0) * Fraction(self.tb))
        return t, t + 1.0 / self.fps

    def _decoded(self, container, stream) -> Iterator[Any]:
        """The source's frames in decode order; decoder failures and stalls as one-line VideoErrors."""
        frames = container.decode(stream)
        while not self.stop.is_set():
            try:
                frame = next(frames, None)
            except av.error.ExitError:
                raise VideoError(f"no frames from {quoted(self.src.name)} for {self.timeout:g} s (stalled "
                                 "source)") from None
            except (av.FFmpegError, OSError) as e:
                raise VideoError(f"cannot decode {quoted(self.src.name)}: {_reason(e)}") from None
            if frame is None:
                return
            if self.size is None:
                check_geometry(Path(self.src.name), frame.width, frame.height)
                self.size, self.orient = (frame.width, frame.height), _orientation(frame)
            yield frame

    def windows(self, container, stream) -> Iterator[Window]:
        n_src, next_i, last = 0, 0, None  # source frames seen, next output frame, the last frame
        for frame in self._decoded(container, stream):
            j, n_src, last = n_src, n_src + 1, frame
            if not self.resample:
                yield from self._offer(j, j, self._time_of(j, frame), frame)
                next_i = j + 1
                continue
            while _source_of(next_i, self.ratio) <= j:
                i, next_i = next_i, next_i + 1
                yield from self._offer(i, j, self._time_of(i), frame)
        if self.stop.is_set():
            return
        if last is None:
            raise VideoError(f"{quoted(self.src.name)} has no decodable frames")
        yield from self._tail(n_src, next_i, last)

    def _tail(self, n_src: int, next_i: int, last) -> Iterator[Window]:
        """End of stream: output frames past the last source frame repeat it (resampling upwards), then
        the tail rule's one partial window, its positions clamped to the last output frame."""
        n_out = resampled_length(n_src, self.fps_in, self.fps) if self.resample else n_src
        while next_i < n_out:
            i, next_i = next_i, next_i + 1
            yield from self._offer(i, n_src - 1, self._time_of(i), last)
        k, hop = self.k, self.hop
        covered = (k - 1) * hop + self.span if k else 0
        if covered < n_out and k * hop < n_out:
            if self.owner[(n_out - 1) % self.span] != n_out - 1:  # the frame the clamped indices repeat
                self._store(n_out - 1, n_src - 1, self._time_of(n_out - 1, last), last)
            wanted = k * hop + self.stride * np.arange(self.window_len, dtype=np.int64)
            yield self._window(k, np.minimum(wanted, n_out - 1), True, int((wanted < n_out).sum()))


def _read_windows(src: _Source, sampling: DenseSampling, *, short_side: int | None, timeout: float,
                  open_timeout: float, input_fps: float | None, use_pts: bool, follow: bool,
                  fmt: str | None, options: dict[str, str] | None,
                  stop: threading.Event) -> Iterator[Window]:
    """Open the source and run a `_WindowReader` over its first video stream (in the decoding thread)."""
    with _open(src, follow, timeout, open_timeout, fmt, options, stop) as container:
        stream = container.streams.video[0]
        if src.is_file:
            stream.thread_type = "AUTO"  # frame + slice threads; live sources keep the lower latency default
        reader = _WindowReader(src, sampling, stream, short_side=short_side, timeout=timeout,
                               input_fps=input_fps, use_pts=use_pts, stop=stop)
        yield from reader.windows(container, stream)


def iter_windows(source: str | os.PathLike, window: int, hop: int | None = None, stride: int = 1, *,
                 hop_seconds: float | None = None, short_side: int | None = 256, fps: float | None = None,
                 timeout: float = 10.0, open_timeout: float | None = None, input_fps: float | None = None,
                 timestamps: str = "auto", follow: bool = False, format: str | None = None,
                 options: dict[str, str] | None = None, prefetch: int = 1) -> Iterator[Window]:
    """Dense windows of any source FFmpeg opens, decoded once, front to back, in bounded memory.

    `source`: a file, a URL (udp://, tcp://, rtsp://, http://, ...), a device (/dev/video0 with
    `format="v4l2"`) or a named pipe. Windows follow `DenseSampling(window, hop, stride, hop_seconds,
    fps)` and the tail rule of `dense_windows`; frames are upright (rotation metadata applied), pinned to
    the first frame's geometry if the stream changes resolution, and resized to `short_side` (None: as
    decoded). For a file, window t is `read_frames(path, DenseSampling(...).plan(n, fps).indices[t])`
    resized the same way.

    `timestamps`: "index" (t = frame / fps, the K-clip store convention), "pts" (the frame's timestamp
    relative to the first frame: right for live sources that drop frames), "auto" (index for regular
    files, pts otherwise). With `fps` resampling times are always output frame / fps. `input_fps`
    overrides the stream's average rate (pass `probe(path).fps` to match K-clip clip times exactly).

    A live source that sends nothing for `timeout` seconds raises VideoError("no frames from SOURCE for
    N s"); `open_timeout` (default: `timeout`) bounds connecting and probing. `follow=True` reads a file
    that is still being written and ends when it has not grown for `timeout` seconds.

    Decoding runs in a thread `prefetch` windows ahead, so Ctrl-C (KeyboardInterrupt) reaches the caller
    at once even while a network read blocks; the container is closed on every exit (end of stream,
    error, `break`, Ctrl-C: within JOIN_SECONDS, or when a blocked read times out).
    """
    sampling = DenseSampling(window, hop, stride, hop_seconds, fps)
    if timestamps not in ("auto", "pts", "index"):
        raise CatnetError(f"timestamps must be auto, pts or index, got {timestamps!r}")
    if short_side is not None:
        _check_int("short side", short_side)
    if not timeout > 0:
        raise CatnetError(f"timeout must be > 0 seconds, got {timeout}")
    open_timeout = timeout if open_timeout is None else open_timeout
    src = _classify(source, follow)
    use_pts = timestamps == "pts" or (timestamps == "auto" and not src.is_file)
    reader = functools.partial(_read_windows, src, sampling, short_side=short_side, timeout=timeout,
                               open_timeout=open_timeout, input_fps=input_fps, use_pts=use_pts,
                               follow=follow, fmt=format, options=options)
    return threaded(reader, max(1, int(prefetch)), f"catnet-windows:{src.name}", JOIN_SECONDS,
                    lost=lambda: VideoError(f"decoding {quoted(src.name)} stopped without a reason"))
