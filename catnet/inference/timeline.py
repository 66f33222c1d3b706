"""Labels over time: per-window top-k for long videos and live sources, and the merged label timeline.

A window is W seconds of video on a hop grid (video/stream.py's `iter_windows`: decoded once, front to
back, in a ring buffer of one window's frames, so memory does not grow with the video's length). Each
window is classified as a short video on its own: min(K, window frames // clip span) clips (at least
one; K and the clip span from the predictor's settings) spread evenly inside it (sampling.sample_clips),
cropped as the predictor crops, through the backbone and the trained head with those clips as its K,
or the baseline classifier's averaged scores.

The label timeline merges consecutive windows with the same top-1 into segments. Window t "owns" the time
from the midpoint between its centre and the previous window's to the midpoint with the next one's (the
first from its start, the last to its end), so segments tile the video without overlap; with hop =
window they are exactly the windows' spans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from catnet.errors import CatnetError
from catnet.inference.predict import ClipScore, Predictor
from catnet.video import probe, sample_clips, test_views
from catnet.video.stream import hop_frames, iter_windows

DEFAULT_LIVE_FPS = 25.0  # live sources are resampled to the model's frame rate, else to this
DEFAULT_LIVE_WINDOW = 2.0  # seconds, for --source without --window


@dataclass
class WindowPrediction:
    index: int
    start: float  # seconds
    end: float
    partial: bool  # the tail window (its last frames repeat the video's last)
    predictions: list[tuple[str, float]]  # top-k (label, probability)
    clips: list[ClipScore]  # the window's clips; attention shares sum to 1 within the window
    probs: torch.Tensor = dataclasses.field(repr=False)  # (C,) all classes
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # decode, backbone, head

    def to_json(self) -> dict:
        return {"index": self.index, "start": round(self.start, 3), "end": round(self.end, 3),
                "partial": self.partial,
                "predictions": [{"label": lab, "score": round(s, 6)} for lab, s in self.predictions],
                "clips": [c.to_json() for c in self.clips]}


@dataclass
class Segment:
    label: str
    start: float
    end: float
    score: float  # mean top-1 probability over the segment's windows
    first: int  # window indices, inclusive
    last: int

    def to_json(self) -> dict:
        return {"label": self.label, "start": round(self.start, 3), "end": round(self.end, 3),
                "score": round(self.score, 6), "windows": [self.first, self.last]}


class Timeline:
    """Builds the label timeline (and the video-level mean probabilities) one window at a time, keeping
    only the segments and a running sum: flat in the number of windows."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.segments: list[Segment] = []
        self.sum: torch.Tensor | None = None
        self.count = 0
        self._prev: tuple[float, float] | None = None  # the previous window's (centre, end)
        self._scores: list[float] = []  # top-1 probabilities of the current segment's windows

    def add(self, w: WindowPrediction) -> None:
        self.sum = w.probs.clone() if self.sum is None else self.sum + w.probs
        self.count += 1
        label, score = w.predictions[0]
        centre = (w.start + w.end) / 2
        if self._prev is None:
            boundary = w.start
        else:  # the midpoint of the centres, kept inside the overlap (a short tail window's centre is
            # early: without the clamp it would take time from a window it does not overlap)
            prev_centre, prev_end = self._prev
            boundary = min(max((prev_centre + centre) / 2, w.start), max(prev_end, w.start))
        self._prev = (centre, w.end)
        if self.segments and self.segments[-1].label == label:
            seg = self.segments[-1]
            self._scores.append(score)
            seg.last, seg.score = w.index, float(np.mean(self._scores))
        else:
            if self.segments:
                self.segments[-1].end = boundary
            self._scores = [score]
            self.segments.append(Segment(label, boundary, w.end, score, w.index, w.index))
        self.segments[-1].end = w.end

    def predictions(self, top_k: int) -> list[tuple[str, float]]:
        """The video-level top-k: window probabilities averaged (each window weighs the same)."""
        if self.sum is None:
            return []
        probs = self.sum / self.count
        scores, idx = probs.topk(min(top_k, probs.numel()))
        return [(self.labels[i], float(s)) for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]


def check_seconds(seconds: float, what: str) -> float:
    if not (seconds > 0 and np.isfinite(seconds)):
        raise CatnetError(f"{what} must be a number of seconds > 0, got {seconds}")
    return float(seconds)


def window_frames(seconds: float, fps: float) -> int:
    """A window of `seconds` as whole frames at `fps` (nearest, at least 1), rounded as the hop is
    (catnet.video.stream.hop_frames: halves up), so a hop equal to the window tiles the video."""
    return hop_frames(check_seconds(seconds, "--window"), fps)


def clips_per_window(predictor: Predictor, frames: int) -> int:
    """min(K, window frames // clip span), at least 1: clips spread over the window, without repeats."""
    s = predictor.sampling
    span = (s.clip_len - 1) * s.stride + 1
    return max(1, min(s.num_clips, frames // span))


def iter_window_predictions(predictor: Predictor, source: str, window: float, hop: float | None = None,
                            top_k: int = 5, live: bool = False, timeout: float = 10.0,
                            fps: float | None = None, fmt: str | None = None) -> Iterator[WindowPrediction]:
    """Per-window predictions of `source`, each yielded as soon as its last frame is decoded.

    A file keeps its own frame rate (probe's, so times match `catnet predict`'s clip times); a live source
    (`live=True`: a URL, device, pipe or growing file) is resampled to `fps` (default: the backbone's
    training rate, else DEFAULT_LIVE_FPS) so that seconds become frames before the first frame arrives.
    """
    hop = check_seconds(window if hop is None else hop, "--hop")
    if live:
        rate = fps or getattr(getattr(predictor.backbone, "pretrained_cfg", None), "fps", None) \
            or DEFAULT_LIVE_FPS
        frames = window_frames(window, rate)
        stream = iter_windows(source, frames, hop_seconds=hop, short_side=predictor.spatial.short_side,
                              fps=rate, timeout=timeout, follow=not _is_url(source), format=fmt)
    else:
        rate = probe(source).fps
        frames = window_frames(window, rate)
        stream = iter_windows(source, frames, hop_seconds=hop, short_side=predictor.spatial.short_side,
                              input_fps=rate, timestamps="index")
    try:
        t_wait = time.perf_counter()
        for w in stream:
            decode = time.perf_counter() - t_wait  # waiting on the decoding thread
            yield _classify_window(predictor, w, rate, top_k, decode)
            t_wait = time.perf_counter()
    finally:
        stream.close()


def _classify_window(predictor: Predictor, w, fps: float, top_k: int, decode: float) -> WindowPrediction:
    # clips spread over the window's real frames: a partial (tail) window's repeats of the last frame
    # are padding, and sampling them would make a longer window predict from a frozen frame
    frames = len(w.frames) if w.real_frames is None else max(1, w.real_frames)
    sampling = dataclasses.replace(predictor.sampling, num_clips=clips_per_window(predictor, frames))
    idx = sample_clips(frames, sampling)  # (k, L) positions inside the window
    views = torch.cat([test_views(w.frames[row], predictor.spatial) for row in idx])
    scores, timing = predictor.classify(views, len(idx))
    probs = scores.probs
    top, order = probs.topk(min(top_k, probs.numel()))
    att = scores.attention
    # frame i of a window starts i / fps after it (clamped to its end, a guard against rounding)
    clips = [ClipScore(min(w.start_s + row[0] / fps, w.end_s), min(w.start_s + (row[-1] + 1) / fps, w.end_s),
                       None if att is None else float(att[j])) for j, row in enumerate(idx)]
    return WindowPrediction(w.index, w.start_s, w.end_s, w.partial,
                            [(predictor.labels[i], float(s)) for s, i in zip(top.tolist(), order.tolist(),
                                                                               strict=True)],
                            clips, probs, {"decode": decode, **timing})


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith(("pipe:", "lavfi:"))


def format_timeline(segments: list[Segment], indent: str = "  ") -> list[str]:
    """The label timeline as lines: `0.0-6.0 s  playing cricket  91%`."""
    if not segments:
        return []
    spans = [f"{s.start:.1f}-{s.end:.1f} s" for s in segments]
    width, span_width = max(len(s.label) for s in segments), max(len(t) for t in spans)
    return [f"{indent}{t:>{span_width}}  {s.label:<{width}}  {s.score:6.1%}" for t, s in zip(spans, segments,
                                                                                             strict=True)]


def format_window(w: WindowPrediction) -> str:
    """One live window as a line: `12.0-14.0 s  playing cricket  91%  (bowling 5%)`."""
    (label, score), rest = w.predictions[0], w.predictions[1:3]
    others = ", ".join(f"{lab} {s:.0%}" for lab, s in rest)
    tail = " (partial)" if w.partial else ""
    return f"  {w.start:.1f}-{w.end:.1f} s  {label}  {score:.1%}" + (f"  ({others})" * bool(others)) + tail
