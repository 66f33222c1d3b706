"""Probe a video and decode only the frames the sampled clips need (PyAV / FFmpeg).

Frame index convention: frame i is the i-th frame a full sequential decode produces (presentation
order), the same whether we got there by seeking or by decoding from the start. Seeking maps an index
to a timestamp with the stream's average frame rate, pts_i = pts_0 + i / fps (frame 0 is always decoded
first to learn pts_0), which is exact for constant frame rate streams. Every frame decoded afterwards is
checked against that mapping; if a stream turns out to be variable frame rate (pts and frame count
disagree) or a seek lands past its target, `read_frames` starts again from the beginning and decodes
forwards without seeking. So VFR videos are indexed by decode order too, at the cost of decoding their
prefix.

Memory stays bounded whatever the video's length: frames are converted to RGB only when requested and
everything else is dropped as soon as it is decoded.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from catnet.errors import CatnetError, VideoError

# Seek only when the next wanted frame is further ahead than this; closer frames are cheaper to reach
# by decoding forwards than by seeking back to a keyframe and decoding up to them anyway.
SEEK_GAP = 64
# A container may claim a few frames more than the decoder produces (edit lists, a dropped final
# frame); requests that far past the last decoded frame get that last frame instead of an error.
END_SLACK = 3
DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video. `width`/`height` are of the upright (rotated) frames."""

    path: str
    num_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int
    rotation: int  # counter-clockwise degrees applied to stored frames to show them upright: 0/90/180/270


class _Inconsistent(Exception):
    """Seeking cannot be trusted for this stream; decode sequentially instead."""


def _check_file(path: Path) -> None:
    # FFmpeg's own messages for these are vague ("Invalid data"), and a FIFO would block open() forever.
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoError(f"no such file: {path}") from None
    except OSError as e:
        raise VideoError(f"cannot access {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(f"{path} is a directory, not a video")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(f"{path} is not a regular file")
    if st.st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoError(f"permission denied: {path}")


def _open(path: Path):
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot open {path.name}: {_reason(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path.name} has no video stream")
    return container


def _reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.splitlines()[0]


def _fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return None


def _rotation(frame) -> int:
    """Counter-clockwise degrees (0/90/180/270) of the frame's display matrix; PyAV >= 14 exposes it."""
    deg = getattr(frame, "rotation", 0) or 0
    return int(round(float(deg) / 90.0)) % 4 * 90


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    # `size` (w, h) pins every frame to the first one's size: streams may change resolution mid-way.
    if size is not None and (frame.width, frame.height) != size:
        rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    else:
        rgb = frame.to_ndarray(format="rgb24")
    k = _rotation(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _count_packets(path: Path) -> int:
    """Frames by demuxing (reads the file, decodes nothing): one packet per frame for video codecs."""
    with _open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size > 0)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's metadata, and decode its first frame to be sure it decodes at all.

    `num_frames` comes from the container when it records it (mp4, mov, avi, gif) and otherwise from
    counting packets (mkv, webm), which reads the file but decodes nothing.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"cannot decode {path.name}: {_reason(e)}") from None
        if first is None:
            raise VideoError(f"{path.name} has no decodable frames")
        rotation = _rotation(first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            try:
                num_frames = _count_packets(path)
            except (av.FFmpegError, OSError) as e:
                raise VideoError(f"cannot read {path.name}: {_reason(e)}") from None
        fps = _fps(stream)
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        if fps is None:
            fps = num_frames / duration if duration else DEFAULT_FPS
        if not duration:
            duration = num_frames / fps
        elif num_frames > 1 and abs(num_frames / duration - fps) > 0.1 * fps:
            fps = num_frames / duration  # VFR: a nominal rate (mkv says 25) would misplace clip times
    return VideoInfo(str(path), max(num_frames, 1), fps, duration, width, height, rotation)


def read_frames(path: str | os.PathLike, indices, *, seek_gap: int = SEEK_GAP) -> np.ndarray:
    """Decode frames `indices` (any order, repeats allowed) as uint8 RGB (len(indices), H, W, 3), upright.

    Each distinct frame is decoded once; long gaps between wanted frames are skipped by seeking to the
    keyframe before the next one (`seek_gap` frames or more ahead; tests lower it to force seeking).
    """
    path = Path(path)
    want = np.asarray(indices, dtype=np.int64).reshape(-1)
    if want.size and want.min() < 0:
        raise CatnetError(f"frame indices must be >= 0, got {int(want.min())}")
    if not want.size:
        info = probe(path)
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    uniq, inverse = np.unique(want, return_inverse=True)
    try:
        frames = _decode(path, uniq, seek_gap)
    except _Inconsistent:
        frames = _decode(path, uniq, None)
    return frames[inverse.reshape(-1)]


def _decode(path: Path, uniq: np.ndarray, seek_gap: int | None) -> np.ndarray:
    """Frames `uniq` (sorted, distinct). `seek_gap=None` decodes sequentially from the start."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads; output order is unchanged
        fps, tb = _fps(stream), stream.time_base
        can_seek = seek_gap is not None and fps is not None and tb is not None
        start_pts = 0  # pts of frame 0, set from the first decoded frame

        def to_index(pts: int) -> int:
            return round((pts - start_pts) * tb * Fraction(fps))

        out, size = None, None
        frames = container.decode(stream)  # replaced after each seek
        pos = 0  # next position in `uniq` to fill
        sought = -1  # the target of the last seek
        last, prev = -1, None  # index of the most recently decoded frame (None: just sought), that frame
        while pos < len(uniq):
            target = int(uniq[pos])
            # Frame 0 is always decoded first: its pts anchors the index <-> pts mapping.
            if can_seek and last >= 0 and target - last > seek_gap and target != sought:
                sought = target  # once: the keyframe before it may itself be far behind
                container.seek(start_pts + int(target / Fraction(fps) / tb), stream=stream, backward=True)
                frames, last = container.decode(stream), None
            try:
                frame = next(frames, None)
            except (av.FFmpegError, OSError) as e:
                raise VideoError(f"cannot decode {path.name}: {_reason(e)}") from None
            if frame is None:
                break
            if last is None:  # the first frame after a seek tells where we landed through its pts
                if frame.pts is None or to_index(frame.pts) > target:
                    raise _Inconsistent
                last = to_index(frame.pts)
            else:
                last += 1
                if last == 0:
                    if frame.pts is None:
                        can_seek = False
                    else:
                        start_pts = frame.pts
                # A constant-rate stream keeps pts and frame count in step; if they drift (VFR), seeks
                # would land on the wrong frames.
                elif can_seek and frame.pts is not None and to_index(frame.pts) != last:
                    raise _Inconsistent
            prev = frame
            if last < target:
                continue
            rgb = _to_rgb(frame, size)
            if out is None:
                size = (frame.width, frame.height)
                out = np.empty((len(uniq), *rgb.shape), np.uint8)
            out[pos] = rgb
            pos += 1
        if prev is None:
            raise VideoError(f"{path.name} has no decodable frames")
        if pos < len(uniq):
            if last is None or uniq[-1] - last > END_SLACK:
                raise VideoError(f"{path.name} is truncated or shorter than reported: decoded "
                                 f"{(last or 0) + 1} frames, frame {int(uniq[pos])} requested")
            rgb = _to_rgb(prev, size)
            if out is None:
                out = np.empty((len(uniq), *rgb.shape), np.uint8)
            out[pos:] = rgb
    return out
