"""Write frames to a real encoded video file with PyAV (used by `catnet synth` and the tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: float = 25.0, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
                pts: list[int] | None = None, rotation: int = 0, hflip: bool = False) -> Path:
    """Encode uint8 frames (T, H, W, 3) RGB into `path`; the container follows the file suffix.

    `pts` (increasing, in units of 1/fps) gives frame timestamps for a variable frame rate file;
    `rotation` (counter-clockwise degrees) writes display-matrix metadata, as phones do; `hflip` adds a
    left-right mirror after the rotation (as some front cameras record).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1000)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = pix_fmt
        if options:
            stream.options = options
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = int(pts[i]), 1 / rate
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
