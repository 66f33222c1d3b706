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
everything else is dropped as soon as it is decoded. Frame geometry is bounded too (`MAX_PIXELS`,
`MAX_ASPECT`): absurd frames are refused before they are converted or resized.

Every frame comes out in the geometry and orientation of frame 0 (which every decode starts with): a
stream that changes resolution mid-way is scaled back to frame 0's size, and the display matrix (rotation
and mirroring, as a player applies it) is read from frame 0.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

try:
    from av.sidedata.sidedata import Type as _SideDataType
except ImportError:  # older PyAV: VideoFrame.rotation only
    _SideDataType = None

from catnet.errors import CatnetError, VideoError, quoted

# Seek only when the next wanted frame is further ahead than this; closer frames are cheaper to reach
# by decoding forwards than by seeking back to a keyframe and decoding up to them anyway.
SEEK_GAP = 64
# A container may claim a few frames more than the decoder produces (edit lists, a dropped final
# frame); requests that far past the last decoded frame get that last frame instead of an error.
END_SLACK = 3
# containers whose timestamps cannot anchor a seek (see _decode)
UNSEEKABLE_FORMATS = frozenset({"mpeg", "mpegts", "mpegvideo"})
DEFAULT_FPS = 25.0
# Geometry limits, far beyond real video (8K UHD is 7680x4320 = 33 Mpx, 12K 360-degree 11520x5760 = 66 Mpx;
# a 32:9 panorama is 3.6:1): larger frames would not fit the decode budget, and a more extreme aspect
# ratio would blow up when its short side is resized to 256 (2x16384 -> 256x2097152 px, 1.6 GB a frame).
MAX_PIXELS = 2**26  # 67 Mpx, e.g. 8192x8192: 192 MB as RGB
MAX_ASPECT = 16  # long side / short side
# Each of FFmpeg's frame threads holds about one decoded (YUV) frame: fewer threads for huge frames keep
# the decoder's own memory near this (4000x4000: 5 threads; 8K: 2), whatever the number of cores.
DECODER_FRAMES_BUDGET = 128 * 2**20


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
    hflip: bool = False  # then mirrored left-right (display matrices with a flip, e.g. a selfie camera's)


class _Inconsistent(Exception):
    """Seeking cannot be trusted for this stream; decode sequentially instead."""


def _check_file(path: Path) -> None:
    # FFmpeg's own messages for these are vague ("Invalid data"), and a FIFO would block open() forever.
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoError(f"no such file: {quoted(path)}") from None
    except OSError as e:
        raise VideoError(f"cannot access {quoted(path)}: {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(f"{quoted(path)} is a directory, not a video")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(f"{quoted(path)} is not a regular file")
    if st.st_size == 0:
        raise VideoError(f"{quoted(path)} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoError(f"permission denied: {quoted(path)}")


def _open(path: Path):
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot open {quoted(path.name)}: {_reason(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{quoted(path.name)} has no video stream")
    ctx = container.streams.video[0].codec_context  # None when no decoder knows the codec
    width, height = (ctx.width or 0, ctx.height or 0) if ctx is not None else (0, 0)
    if width > 0 and height > 0:  # the container's frame size, before the decoder allocates such a frame
        try:
            check_geometry(path, width, height)
        except VideoError:
            container.close()
            raise
    return container


def check_geometry(path: Path, width: int, height: int) -> None:
    """Refuse frames larger than MAX_PIXELS or with a long side more than MAX_ASPECT times the short."""
    if width * height > MAX_PIXELS:
        raise VideoError(f"{quoted(Path(path).name)} has {width}x{height} frames, more than catnet's limit "
                         f"of {MAX_PIXELS / 1e6:.0f} megapixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise VideoError(f"{quoted(Path(path).name)} has {width}x{height} frames, an aspect ratio beyond "
                         f"catnet's limit of {MAX_ASPECT}:1")


def _reason(e: Exception) -> str:
    """FFmpeg's / the OS's reason, without the file name (which may hold a newline), on one line."""
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg if msg.isprintable() else repr(msg)[1:-1]


def _fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return None


# The eight axis-aligned display matrices: (a, b, c, d) of FFmpeg's DISPLAYMATRIX [a b u; c d v; x y w]
# (a point (x, y) of the stored frame, y pointing down, shows at (a x + c y, b x + d y)) for "turn
# counter-clockwise by k * 90 degrees, then mirror left-right if f", as av_display_rotation_set(-90 k) and
# av_display_matrix_flip(hflip=f) build them.
_ORIENTATIONS = {(k, f): ((-1 if f else 1) * [1, 0, -1, 0][k], -[0, 1, 0, -1][k],
                          (-1 if f else 1) * [0, 1, 0, -1][k], [1, 0, -1, 0][k])
                 for k in range(4) for f in (False, True)}


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's DISPLAYMATRIX side data as 9 int32 (16.16 fixed point, last column 2.30), if any."""
    if _SideDataType is None:
        return None
    try:
        data = frame.side_data.get(_SideDataType.DISPLAYMATRIX)
    except (AttributeError, KeyError, TypeError):
        return None
    if data is None or len(bytes(data)) != 36:
        return None
    return np.frombuffer(bytes(data), "<i4")


def _orientation(frame) -> tuple[int, bool]:
    """(k, hflip): turn the stored frame k * 90 degrees counter-clockwise, then mirror it left-right if
    hflip, to show it as a player does. The nearest axis-aligned transform of the display matrix (rotation
    alone used to come from `VideoFrame.rotation`, which reads a mirror as a 180-degree turn)."""
    m = _display_matrix(frame)
    if m is None:
        deg = getattr(frame, "rotation", 0) or 0
        return int(round(float(deg) / 90.0)) % 4, False
    abcd = m[[0, 1, 3, 4]].astype(np.float64)
    if not abcd.any():
        return 0, False
    return max(_ORIENTATIONS, key=lambda o: float(np.dot(_ORIENTATIONS[o], abcd)))


def _to_rgb(frame, size: tuple[int, int] | None, orient: tuple[int, bool]) -> np.ndarray:
    """Frame -> upright uint8 RGB (possibly a strided view). `size` (w, h) and `orient` are frame 0's:
    streams may change resolution mid-way, and every frame must come out alike."""
    if size is not None and (frame.width, frame.height) != size:
        rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    else:
        rgb = frame.to_ndarray(format="rgb24")
    k, hflip = orient
    if k:
        rgb = np.rot90(rgb, k)
    return rgb[:, ::-1] if hflip else rgb


def _scan_packets(path: Path) -> tuple[int, float | None]:
    """(frames, seconds) of the video stream by demuxing (reads the file, decodes nothing): one packet
    per frame for video codecs, and the span of their timestamps, which a container's own duration is
    not (the longest stream's in mkv/webm, a bitrate guess in MPEG-PS). Seconds None without timestamps."""
    with _open(path) as container:
        stream = container.streams.video[0]
        count, lo, hi, timed = 0, None, None, True
        for p in container.demux(stream):
            if p.size <= 0:
                continue
            count += 1
            if p.pts is not None:
                timed = timed and bool(p.duration)
                lo = p.pts if lo is None else min(lo, p.pts)
                hi = p.pts + (p.duration or 0) if hi is None else max(hi, p.pts + (p.duration or 0))
        tb = stream.time_base
        if lo is None or tb is None or hi <= lo:
            return count, None
        seconds = float((hi - lo) * tb)
        # without packet durations the span ends at the last frame's start: one frame short
        return count, seconds if timed or count < 2 else seconds * count / (count - 1)


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
            raise VideoError(f"cannot decode {quoted(path.name)}: {_reason(e)}") from None
        if first is None:
            raise VideoError(f"{quoted(path.name)} has no decodable frames")
        check_geometry(path, first.width, first.height)
        k, hflip = _orientation(first)
        width, height = first.width, first.height
        if k % 2:
            width, height = height, width
        num_frames, duration = int(stream.frames or 0), None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if num_frames <= 0 or duration is None:
            try:
                counted, duration = _scan_packets(path)
            except (av.FFmpegError, OSError) as e:
                raise VideoError(f"cannot read {quoted(path.name)}: {_reason(e)}") from None
            num_frames = num_frames if num_frames > 0 else counted
        fps = _fps(stream)
        if fps is None:
            fps = num_frames / duration if duration else DEFAULT_FPS
        if not duration:
            duration = num_frames / fps
        elif num_frames > 1 and abs(num_frames / duration - fps) > 0.1 * fps:
            fps = num_frames / duration  # VFR: a nominal rate (mkv says 25) would misplace clip times
    return VideoInfo(str(path), max(num_frames, 1), fps, duration, width, height, k * 90, hflip)


def read_frames(path: str | os.PathLike, indices, *, seek_gap: int = SEEK_GAP) -> np.ndarray:
    """Decode frames `indices` (any order, repeats allowed) as uint8 RGB (len(indices), H, W, 3), upright.

    Each distinct frame is decoded once; long gaps between wanted frames are skipped by seeking to the
    keyframe before the next one (`seek_gap` frames or more ahead; tests lower it to force seeking). All
    frames have frame 0's size and orientation (that of `probe`), whichever frames are asked for.
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
    if len(uniq) == len(want) and np.array_equal(uniq, want):
        return frames  # sorted and distinct already: no copy (the caller may be holding a budget's worth)
    return frames[inverse.reshape(-1)]


def _decode(path: Path, uniq: np.ndarray, seek_gap: int | None) -> np.ndarray:
    """Frames `uniq` (sorted, distinct). `seek_gap=None` decodes sequentially from the start."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads; output order is unchanged
        ctx = stream.codec_context
        yuv = (ctx.width or 0) * (ctx.height or 0) * 3 // 2 if ctx is not None else 0
        if yuv * (os.cpu_count() or 1) > DECODER_FRAMES_BUDGET:
            stream.thread_count = max(1, DECODER_FRAMES_BUDGET // yuv)
        fps, tb = _fps(stream), stream.time_base
        # MPEG program/transport streams stamp the frames after a seek a few frames off while later ones
        # step by one, so the pts check below cannot catch it: decode those front to back
        can_seek = (seek_gap is not None and fps is not None and tb is not None
                    and container.format.name not in UNSEEKABLE_FORMATS)
        start_pts = 0  # pts of frame 0, set from the first decoded frame

        def to_index(pts: int) -> int:
            return round((pts - start_pts) * tb * Fraction(fps))

        out, size, orient = None, None, (0, False)
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
                raise VideoError(f"cannot decode {quoted(path.name)}: {_reason(e)}") from None
            if frame is None:
                if last is None:  # a seek that lands past the last frame: decode from the start
                    raise _Inconsistent
                break
            if size is None:  # frame 0 (decoding always starts there): every frame gets its geometry
                check_geometry(path, frame.width, frame.height)
                size, orient = (frame.width, frame.height), _orientation(frame)
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
            rgb = _to_rgb(frame, size, orient)
            if out is None:
                out = np.empty((len(uniq), *rgb.shape), np.uint8)
            out[pos] = rgb
            pos += 1
        if prev is None:
            raise VideoError(f"{quoted(path.name)} has no decodable frames")
        if pos < len(uniq):
            if last is None or uniq[-1] - last > END_SLACK:
                raise VideoError(f"{quoted(path.name)} is truncated or shorter than reported: decoded "
                                 f"{(last or 0) + 1} frames, frame {int(uniq[pos])} requested")
            rgb = _to_rgb(prev, size, orient)
            if out is None:
                out = np.empty((len(uniq), *rgb.shape), np.uint8)
            out[pos:] = rgb
    return out
