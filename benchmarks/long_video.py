"""Generated long videos, encoded frame by frame (memory stays flat however long the video is).

* `long_video(path, minutes)`: a textured, moving test pattern (what benchmarks/dense.py times and
  measures peak memory on); cached: an existing file of the same settings is reused.
* `spliced_video(path, classes)`: several `catnet synth` actions one after the other in one file, with the
  label timeline (which action, from when to when) returned and written beside it as `<path>.json`. The
  worked example of docs/long_videos.md, and a fixture for temporal localisation and `predict --window`.

    python benchmarks/long_video.py /tmp/long.mp4 --minutes 10
    python benchmarks/long_video.py /tmp/spliced.mp4 --splice move_left rise orbit shrink
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from catnet.data.synth import CLASSES, SynthConfig, VideoSpec, render


def encode_frames(path: str | os.PathLike, frames: Iterator[np.ndarray], width: int, height: int,
                  fps: float = 25.0, options: dict[str, str] | None = None) -> Path:
    """Encode uint8 RGB frames (H, W, 3), or chunks (T, H, W, 3), as H.264 one at a time, into a temporary
    file renamed to `path` when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options or {"preset": "ultrafast", "crf": "23"}
        for chunk in frames:
            for frame in (chunk if chunk.ndim == 4 else chunk[None]):
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                                      format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def _pattern(num_frames: int, height: int, width: int, seed: int, chunk: int = 250) -> Iterator[np.ndarray]:
    """A texture of 4x4 blocks scrolling sideways plus a bright square moving around: real work for the
    codec (flat frames decode unrealistically fast), produced `chunk` frames at a time."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), np.uint8)
    tex = np.repeat(np.repeat(blocks, 4, 0), 4, 1)
    for start in range(0, num_frames, chunk):
        t = np.arange(start, min(start + chunk, num_frames))
        out = np.empty((len(t), height, width, 3), np.uint8)
        for j, i in enumerate(t):
            dx = int(i) % (tex.shape[1] - width)
            out[j] = tex[:height, dx: dx + width]
            y = int((height - 24) * (0.5 + 0.5 * np.sin(i / 40)))
            x = int((width - 24) * (0.5 + 0.5 * np.cos(i / 55)))
            out[j, y: y + 24, x: x + 24] = (250, 220, 40)
        yield out


def long_video(path: str | os.PathLike, minutes: float, *, height: int = 240, width: int = 320,
               fps: float = 25.0, seed: int = 0) -> Path:
    """A `minutes`-long test-pattern video at `path` (reused if a previous call made it with the same
    settings: the settings are kept in `<path>.json`)."""
    path = Path(path)
    settings = {"minutes": minutes, "height": height, "width": width, "fps": fps, "seed": seed}
    meta = path.with_name(path.name + ".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        return path
    n = int(round(minutes * 60 * fps))
    encode_frames(path, _pattern(n, height, width, seed), width, height, fps)
    meta.write_text(json.dumps(settings))
    return path


def spliced_video(path: str | os.PathLike, classes: Sequence[str] = ("move_left", "rise", "orbit", "shrink"),
                  *, seconds: float = 8.0, action: float = 0.5, size: int = 128, fps: float = 25.0,
                  seed: int = 0) -> dict[str, Any]:
    """One video of len(classes) synthetic pieces of `seconds` each; in piece i, the middle `action` share
    shows class i's motion (the rest is the synth dataset's class-independent drift). Returns (and writes
    to `<path>.json`) {"path", "fps", "num_frames", "duration", "segments": [{label, start_s, end_s,
    start_frame, end_frame}]}: the label timeline, end exclusive."""
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown synth classes {unknown}; choose from {CLASSES}")
    cfg = SynthConfig(height=size, width=size, fps=fps, min_frames=8, max_frames=10**6)
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    length = max(4, int(round(n * action)))
    specs, segments = [], []
    for i, label in enumerate(classes):
        start = (n - length) // 2
        specs.append(VideoSpec(label, int(rng.integers(2**31)), int(rng.integers(2**31)), n, start,
                               start + length))
        a, b = i * n + start, i * n + start + length
        segments.append({"label": label, "start_frame": a, "end_frame": b, "start_s": a / fps,
                         "end_s": b / fps})
    encode_frames(path, (render(s, cfg) for s in specs), size, size, fps,
                  {"preset": "veryfast", "crf": "18"})
    timeline = {"path": str(path), "fps": fps, "num_frames": n * len(classes),
                "duration": n * len(classes) / fps, "segments": segments,
                "pieces": [asdict(s) for s in specs]}
    Path(str(path) + ".json").write_text(json.dumps(timeline, indent=1))
    return timeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="video file to write (.mp4)")
    p.add_argument("--minutes", type=float, default=1.0, help="length of the test-pattern video")
    p.add_argument("--splice", nargs="+", metavar="CLASS", help="write a spliced synth video of these "
                   "classes")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per spliced piece")
    args = p.parse_args()
    if args.splice:
        print(json.dumps(spliced_video(args.out, args.splice, seconds=args.seconds)["segments"], indent=1))
    else:
        print(long_video(args.out, args.minutes))


if __name__ == "__main__":
    main()
