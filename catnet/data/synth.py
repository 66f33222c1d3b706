"""`catnet synth`: a synthetic action-video dataset whose classes are decided by motion alone.

Every video shows two large, bright "actor" objects and one or two smaller distractors slowly drifting
over a dark, faintly textured background, under camera shake and pixel noise. For one stretch of the
video (20-30% of it, anywhere in it) actor A (and for two-actor classes B) performs the class motion -
move left, rise, approach, grow, orbit, ... - and for the rest of the video the actors only drift like the
distractors. Colour, size, shape, position, drift, background, shake and noise are drawn independently of
the class, so appearance cannot decide it, and averaging all clips of a video dilutes the action with
drift: temporal attention has something to find.

The appearance and the drift are drawn from a random stream that does not depend on the class, so two
videos with the same appearance seed are identical, frame for frame, until the action starts. After the
action the actors stay where (and as large as) the action left them.

Layout written to OUT:

    OUT/<class>/<class>_<nnn>.mp4   H.264 videos, folder per class
    OUT/annotations.csv             path,label,split (path relative to OUT)
    OUT/segments.json               per video: frames, fps, action start/end (frames and seconds)
    OUT/synth.json                  the generation config; written last, so its presence means "complete"
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from catnet.config import check_fields
from catnet.errors import CatnetError
from catnet.utils.io import atomic_write_json, atomic_write_text
from catnet.video.encode import write_video

# An offset function maps the action phase u in [0, 1] (array) and per-video motion parameters to the
# (len(u), 2) displacement of actors A and B (in frame units) and A's size multiplier. Offsets are 0 at
# u = 0, so the action starts where the drift left the actors, with no jump.
Motion = Callable[[np.ndarray, dict], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _zeros(u: np.ndarray) -> np.ndarray:
    return np.zeros((len(u), 2))


def _ones(u: np.ndarray) -> np.ndarray:
    return np.ones(len(u))


def _ease(u: np.ndarray) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * u)  # 0 -> 1 with zero speed at both ends


def _to_edge(axis: int, target: float) -> Motion:
    """A travels to `target` (frame units) along one axis: a long, one-directional displacement, the
    kind of motion a Kinetics backbone's direction-selective filters respond to."""
    def motion(u, p):
        off = np.zeros((len(u), 2))
        off[:, axis] = (target - p["a0"][axis]) * _ease(u)
        return off, _zeros(u), _ones(u)
    return motion


def _approach(u, p):
    # A and B meet halfway
    d = p["gap"][None, :] * (0.5 * _ease(u))[:, None]
    return d, -d, _ones(u)


def _separate(u, p):
    # A and B fly apart along the line joining them
    gap = p["gap"] / (np.linalg.norm(p["gap"]) + 1e-9)
    d = gap[None, :] * (0.3 * _ease(u))[:, None]
    return -d, d, _ones(u)


def _grow(u, p):
    return _zeros(u), _zeros(u), 1 + 1.2 * _ease(u)


def _shrink(u, p):
    return _zeros(u), _zeros(u), 1 - 0.65 * _ease(u)


def _orbit(u, p):
    a = 2 * np.pi * p["cycles"] * u * p["sign"]
    r = p["amp"] * 0.5
    off = np.stack([r * (np.cos(a) - 1), r * np.sin(a)], 1)
    return off, _zeros(u), _ones(u)


def _vibrate(u, p):
    # fast, large side-to-side shaking
    x = 0.1 * np.sin(2 * np.pi * 4 * p["cycles"] * u)
    return np.stack([x, np.zeros_like(u)], 1), _zeros(u), _ones(u)


def _bounce(u, p):
    # equal-height hops upward from the start position
    y = -p["amp"] * np.abs(np.sin(np.pi * p["cycles"] * u))
    return np.stack([np.zeros_like(u), y], 1), _zeros(u), _ones(u)


def _swap(u, p):
    # A and B exchange places along opposite arcs
    gap = p["gap"]
    normal = np.array([-gap[1], gap[0]])
    arc = 0.5 * np.sin(np.pi * u)[:, None] * normal[None, :]
    d = gap[None, :] * u[:, None]
    return d + arc, -d - arc, _ones(u)


# Order matters: `--classes N` takes the first N. The first ten differ in the kind of motion (direction,
# convergence, scale change, rotation, oscillation) rather than in the shape of one trajectory, which a
# frozen Kinetics backbone's pooled features separate far better (measured: docs/demo.md).
MOTIONS: dict[str, Motion] = {
    "move_left": _to_edge(0, 0.12),
    "move_right": _to_edge(0, 0.88),
    "rise": _to_edge(1, 0.12),
    "fall": _to_edge(1, 0.88),
    "approach": _approach,
    "separate": _separate,
    "grow": _grow,
    "shrink": _shrink,
    "orbit": _orbit,
    "vibrate": _vibrate,
    "bounce": _bounce,
    "swap": _swap,
}
CLASSES: list[str] = list(MOTIONS)


@dataclass
class SynthConfig:
    num_classes: int = 12
    videos_per_class: int = 20
    seed: int = 0
    height: int = 128
    width: int = 128
    fps: float = 25.0
    min_frames: int = 160
    max_frames: int = 240
    action_min: float = 0.2  # fraction of the video the action occupies: 2-3 of 10 clips see it
    action_max: float = 0.3
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_fields(self)  # every float finite (a YAML .nan or .inf is refused here)

    def check(self) -> None:
        if not 2 <= self.num_classes <= len(CLASSES):
            raise CatnetError(f"--classes must be between 2 and {len(CLASSES)}, got {self.num_classes}")
        if self.videos_per_class < 2:
            raise CatnetError(f"--videos-per-class must be >= 2 (one train, one test), got "
                              f"{self.videos_per_class}")
        if min(self.height, self.width) < 32:
            raise CatnetError(f"frame size must be at least 32x32, got {self.height}x{self.width}")
        if self.height % 2 or self.width % 2:  # H.264 in yuv420p halves the colour planes
            raise CatnetError(f"frame size must be even, got {self.height}x{self.width}")
        if not 8 <= self.min_frames <= self.max_frames:
            raise CatnetError(f"need 8 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if not 0 < self.action_min <= self.action_max < 1:
            raise CatnetError("need 0 < action_min <= action_max < 1")
        if not 0 < self.test_fraction < 1:
            raise CatnetError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if not 1 <= self.fps <= 240:
            raise CatnetError(f"fps must be between 1 and 240, got {self.fps}")


# ------------------------------------------------------------------------------------- rendering


def _smooth_walk(rng: np.random.Generator, t: int, speed: float, lo: float, hi: float) -> np.ndarray:
    """(t, 2) positions of a smooth random walk that reflects off the box [lo, hi]^2."""
    pos = np.empty((t, 2))
    p = rng.uniform(lo, hi, 2)
    v = rng.normal(0, 1, 2)
    v *= speed / (np.linalg.norm(v) + 1e-9)
    for i in range(t):
        v = 0.92 * v + rng.normal(0, 0.35 * speed, 2)
        n = np.linalg.norm(v)
        if n > speed:
            v *= speed / n
        p = p + v
        for k in range(2):  # reflect
            if p[k] < lo:
                p[k], v[k] = 2 * lo - p[k], abs(v[k])
            elif p[k] > hi:
                p[k], v[k] = 2 * hi - p[k], -abs(v[k])
        pos[i] = p
    return pos


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark float (h, w, 3) background: faint stripes, checks or blotches of two close colours. Low
    contrast on purpose: a busy or flipping (dark/light) background swamps the objects' motion in a frozen
    backbone's features (measured in docs/demo.md)."""
    c0 = rng.uniform(20, 80, 3)
    c1 = np.clip(c0 + rng.uniform(-25, 25, 3), 0, 255)
    strength = rng.uniform(0.2, 0.6)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:
        ang, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        t = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(ang) + yy * np.sin(ang)))
    elif kind == 1:
        cell = int(rng.integers(6, 20))
        t = ((xx // cell + yy // cell) % 2).astype(np.float64)
    else:
        g = rng.uniform(0, 1, (h // 16 + 2, w // 16 + 2))
        t = np.kron(g, np.ones((16, 16)))[:h, :w]
    t = strength * t
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _draw(frames: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, color: np.ndarray,
          square: bool) -> None:
    """Paint one object per frame (antialiased edge) into float frames (T, H, W, 3), in place."""
    h, w = frames.shape[1:3]
    color = color.astype(np.float32)
    for i in range(len(frames)):  # only the object's bounding box: objects are small
        x0, x1 = max(int(cx[i] - r[i]) - 1, 0), min(int(cx[i] + r[i]) + 3, w)
        y0, y1 = max(int(cy[i] - r[i]) - 1, 0), min(int(cy[i] + r[i]) + 3, h)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx[i])
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy[i])
        d = np.maximum(np.abs(dx), np.abs(dy)) if square else np.sqrt(dx * dx + dy * dy)
        alpha = np.clip(np.float32(r[i]) - d + 0.5, 0, 1)[..., None]
        patch = frames[i, y0:y1, x0:x1]
        patch += alpha * (color - patch)


@dataclass
class VideoSpec:
    """Everything that decides one video; `appearance_seed` alone decides all but the action."""

    label: str
    appearance_seed: int
    motion_seed: int
    num_frames: int
    action_start: int
    action_end: int  # exclusive


def render(spec: VideoSpec, cfg: SynthConfig) -> np.ndarray:
    """uint8 frames (T, H, W, 3) of one video."""
    h, w, t = cfg.height, cfg.width, spec.num_frames
    app = np.random.default_rng(spec.appearance_seed)  # class-independent stream
    mot = np.random.default_rng(spec.motion_seed)

    margin = 6
    bg = _background(app, h + 2 * margin, w + 2 * margin)
    shake_amp = app.uniform(0, 2)
    shake = np.cumsum(app.normal(0, 1, (t, 2)), 0)
    shake = np.round(shake_amp * shake / (np.abs(shake).max() + 1e-9)).astype(int) + margin
    noise = app.uniform(0, 5)
    size = min(h, w)
    drift = app.uniform(0.001, 0.004)  # slow: the class motion must stand out from the drift

    # actors A, B then 1-2 distractors; positions in frame units
    n_distract = int(app.integers(1, 3))
    objs = []
    for k in range(2 + n_distract):
        actor = k < 2
        objs.append(dict(
            pos=_smooth_walk(app, t, drift, 0.35 if actor else 0.1,
                             0.65 if actor else 0.9),
            # actors span 24-34% of the frame: large enough for a 112 px, stride-8 backbone to track
            r=np.full(t, size * (app.uniform(0.12, 0.17) if actor else app.uniform(0.06, 0.1))),
            color=app.uniform(150, 255, 3),  # bright on the dark background: high contrast
            square=bool(app.integers(2)),
        ))

    # the action: displacements of A and B (and A's size) over the action frames only
    s, e = spec.action_start, spec.action_end
    u = np.clip((np.arange(t) - s) / max(e - s - 1, 1), 0, 1)
    a0, b0 = objs[0]["pos"][s], objs[1]["pos"][s]
    gap = b0 - a0
    if np.linalg.norm(gap) < 0.2:  # two-actor motions need room between the actors
        gap = gap / (np.linalg.norm(gap) + 1e-9) * 0.2 if np.linalg.norm(gap) > 1e-6 else np.array([0.2, 0])
    params = dict(a0=a0, amp=mot.uniform(0.3, 0.45), cycles=int(mot.integers(2, 4)),
                  sign=float(mot.choice([-1, 1])), gap=gap)
    off_a, off_b, scale = MOTIONS[spec.label](u, params)
    objs[0]["pos"] = objs[0]["pos"] + off_a
    objs[1]["pos"] = objs[1]["pos"] + off_b
    objs[0]["r"] = objs[0]["r"] * scale

    frames = np.empty((t, h, w, 3), np.float32)
    for i in range(t):
        oy, ox = shake[i]
        frames[i] = bg[oy: oy + h, ox: ox + w]
    for o in reversed(objs):  # distractors first, actor A on top
        r = o["r"]
        cx = np.clip(o["pos"][:, 0] * w, r, w - 1 - r) + shake[:, 1] - margin
        cy = np.clip(o["pos"][:, 1] * h, r, h - 1 - r) + shake[:, 0] - margin
        _draw(frames, cx, cy, r, o["color"], o["square"])
    # luminance noise: one field per frame, shared by the channels (a third of the cost of RGB noise)
    frames += app.standard_normal((t, h, w, 1), dtype=np.float32) * np.float32(noise)
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8)


# ------------------------------------------------------------------------------------- dataset


def plan(cfg: SynthConfig) -> list[tuple[str, str, VideoSpec]]:
    """(video id, split, spec) for every video, deterministic from cfg.seed."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    out = []
    for label in CLASSES[: cfg.num_classes]:
        n = cfg.videos_per_class
        n_test = min(max(1, round(n * cfg.test_fraction)), n - 1)
        test = set(rng.permutation(n)[:n_test].tolist())
        for i in range(n):
            t = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
            length = max(4, int(round(t * rng.uniform(cfg.action_min, cfg.action_max))))
            start = int(rng.integers(0, t - length + 1))
            spec = VideoSpec(label, int(rng.integers(2 ** 31)), int(rng.integers(2 ** 31)), t, start,
                             start + length)
            out.append((f"{label}_{i:03d}", "test" if i in test else "train", spec))
    return out


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    # encode beside the target, then rename: a killed run never leaves a half-written video.
    # Note: the encoded bytes are not bit-exact from run to run on this PyAV/x264 build (seen even with
    # threads=1); the rendered pixels, labels, splits and segments are exact.
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write_video(tmp, frames, fps=fps, options={"preset": "veryfast", "crf": "18"})
    os.replace(tmp, path)


def generate(out: str | os.PathLike, cfg: SynthConfig | None = None, progress: bool = True) -> Path:
    """Write the dataset to `out` (see module docstring); an existing complete copy with the same
    config is reused as is. Returns the annotation file."""
    cfg = cfg or SynthConfig()
    out = Path(out)
    items = plan(cfg)
    marker, pending = out / "synth.json", out / "synth.pending.json"
    if marker.is_file():
        if _config_of(marker) == asdict(cfg):
            return out / "annotations.csv"
        marker.unlink()  # a different config: regenerate over it, without its videos
        _remove_videos(out)
    elif pending.is_file() and _config_of(pending) != asdict(cfg):  # an interrupted run of another config
        _remove_videos(out)
    if out.exists() and not out.is_dir():
        raise CatnetError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(pending, {"config": asdict(cfg)})  # whose videos these are, until complete
    segments = {}
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for vid, split, spec in tqdm(items, desc="synth videos", unit="video", disable=not progress,
                                 file=sys.stderr):
        rel = f"{spec.label}/{vid}.mp4"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():  # a file present here was renamed into place complete
            _write_mp4(path, render(spec, cfg), cfg.fps)
        writer.writerow([rel, spec.label, split])
        segments[vid] = dict(path=rel, label=spec.label, split=split, num_frames=spec.num_frames,
                             fps=cfg.fps, action_start=spec.action_start, action_end=spec.action_end,
                             action_start_s=spec.action_start / cfg.fps,
                             action_end_s=spec.action_end / cfg.fps)
    atomic_write_text(out / "annotations.csv", rows.getvalue())
    atomic_write_json(out / "segments.json", segments)
    atomic_write_json(marker, {"config": asdict(cfg), "classes": CLASSES[: cfg.num_classes]})
    pending.unlink(missing_ok=True)
    return out / "annotations.csv"


def _config_of(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_videos(out: Path) -> None:
    """The videos an earlier config wrote (a video present is otherwise reused as complete)."""
    for label in CLASSES:
        folder = out / label
        if folder.is_dir():
            for path in folder.glob("*.mp4"):
                path.unlink()
            with contextlib.suppress(OSError):  # not empty: something else lives there, keep it
                folder.rmdir()


def load_segments(root: str | os.PathLike) -> dict[str, dict]:
    """The action segments of a synthetic dataset, keyed by video id (file stem); {} if there are none."""
    path = Path(root) / "segments.json"
    return json.loads(path.read_text()) if path.is_file() else {}
