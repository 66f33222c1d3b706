"""Real sequence datasets as "videos of K clips": a check of the video heads on data we did not make.

BasicMotions (smart-watch accelerometer + gyroscope, 6 channels, 4 activities) and PickupGestureWiimoteZ
(Wii remote z-axis, 1 channel, variable length: one gesture, "pick-up", made by 10 people, and the class
is the person) from the UEA/UCR archive ship as `.ts` files inside the `aeon` wheel (`pip install
--no-deps aeon`: only its data files are read, aeon itself is never imported). Each sequence is cut into
K equal windows - the analogue of the paper's K clips I_1..I_K sampled over a video (Eq. 1) - and each
window becomes one clip feature, so a sequence is a (K, F)
"video" that every head in catnet.heads accepts.

    train, test = load_sequences("BasicMotions", num_clips=10)      # SequenceSplit each
    # a FeatureStore for `catnet train`: catnet.features.sequences.write_sequence_store
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catnet.errors import CatnetError

DATASETS = ("BasicMotions", "PickupGestureWiimoteZ")
FEATURE_MODES = ("raw", "stats", "both")
NUM_STATS = 5  # mean, std, min, max, mean first difference (per channel)


@dataclass
class TSData:
    """The contents of one .ts file: per-sequence (D, T_i) float arrays and integer labels."""

    name: str
    series: list[np.ndarray]
    labels: np.ndarray  # (N,) int64 indices into `classes`
    classes: list[str]


@dataclass
class WindowConfig:
    """How a (D, T) sequence becomes K clip features."""

    num_clips: int = 10  # K windows, equal length, covering the whole sequence
    points: int = 10  # samples per channel and window (linear resampling, so any T works)
    features: str = "both"  # raw: resampled values; stats: per-channel summary; both: concatenated

    def check(self) -> None:
        if self.num_clips < 1 or self.points < 1:
            raise CatnetError(f"num_clips and points must be >= 1, got {self.num_clips}, {self.points}")
        if self.features not in FEATURE_MODES:
            raise CatnetError(f"features must be one of {', '.join(FEATURE_MODES)}, got {self.features!r}")

    def dim(self, channels: int) -> int:
        raw = channels * self.points if self.features in ("raw", "both") else 0
        stats = channels * NUM_STATS if self.features in ("stats", "both") else 0
        return raw + stats


@dataclass
class SequenceSplit:
    """One split as clip features: x (N, K, F) float32, y (N,) int64, window times (N, K, 2) in samples."""

    x: np.ndarray
    y: np.ndarray
    times: np.ndarray
    classes: list[str]


# --------------------------------------------------------------------------------------------- files


def aeon_data_dir() -> Path | None:
    """aeon's bundled data folder, found without importing aeon (its import pulls numba, sklearn, ...)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return path if path.is_dir() else None


def dataset_files(name: str, data_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(TRAIN.ts, TEST.ts) of a dataset, from `data_dir` or `$CATNET_SEQUENCES_DIR` or aeon's wheel."""
    root = data_dir or os.environ.get("CATNET_SEQUENCES_DIR") or aeon_data_dir()
    if root is None:
        raise CatnetError(f"dataset {name!r} not found: install the data with `pip install --no-deps aeon` "
                          "or pass a folder holding NAME/NAME_TRAIN.ts")
    root = Path(root)
    out = []
    for split in ("TRAIN", "TEST"):
        candidates = [root / name / f"{name}_{split}.ts", root / f"{name}_{split}.ts"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise CatnetError(f"{name}_{split}.ts not found under {root}")
        out.append(found)
    return out[0], out[1]


def read_ts(path: str | os.PathLike, classes: list[str] | None = None) -> TSData:
    """Parse a sktime/aeon `.ts` file (header `@key value` lines, then one `dim:dim:...:label` per line).

    Values are comma-separated; `?` and `NaN` are missing and are filled by linear interpolation.
    `classes` fixes the label order (pass the TRAIN file's to read its TEST file); by default it is the
    header's `@classLabel true ...` list.
    """
    path = Path(path)
    if not path.is_file():
        raise CatnetError(f"sequence file not found: {path}")
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    names: list[str] = []
    in_data = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise CatnetError(f"{path}:{lineno}: expected a @header line before @data")
                key, _, value = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                else:
                    header[key] = value.strip()
                continue
            if header.get("timestamps", "false").lower() == "true":
                raise CatnetError(f"{path}: .ts files with timestamps are not supported")
            *dims, label = line.split(":")
            if not dims:
                raise CatnetError(f"{path}:{lineno}: a data line needs values and a class label")
            try:
                chans = [np.array([_value(v) for v in d.split(",")], dtype=np.float64) for d in dims]
            except ValueError as e:
                raise CatnetError(f"{path}:{lineno}: bad value ({e})") from None
            length = max(len(c) for c in chans)
            series.append(np.stack([_fill_missing(np.pad(c, (0, length - len(c)), constant_values=np.nan))
                                    for c in chans]))
            names.append(label.strip())
    if not in_data or not series:
        raise CatnetError(f"{path}: no @data section with sequences")
    if classes is None:
        declared = header.get("classlabel", "").split()
        classes = declared[1:] if declared[:1] == ["true"] else sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise CatnetError(f"{path}: class label(s) {', '.join(unknown)} not among {', '.join(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return TSData(header.get("problemname", path.stem), series, np.array([index[n] for n in names]),
                  list(classes))


def _value(v: str) -> float:
    v = v.strip()
    return np.nan if v in ("?", "") or v.lower() == "nan" else float(v)


def _fill_missing(c: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(c)
    if not bad.any():
        return c
    if bad.all():
        return np.zeros_like(c)
    idx = np.arange(len(c))
    out = c.copy()
    out[bad] = np.interp(idx[bad], idx[~bad], c[~bad])  # ends are held at the nearest value
    return out


# --------------------------------------------------------------------------------------------- windows


def window_times(length: int, num_clips: int) -> np.ndarray:
    """(K, 2) [start, end) of K equal windows over a sequence of `length` samples (fractional ends)."""
    edges = np.linspace(0.0, float(length), num_clips + 1)
    return np.stack([edges[:-1], edges[1:]], 1)


def window_values(series: np.ndarray, num_clips: int, points: int) -> np.ndarray:
    """(K, D, points): each of K equal windows resampled at `points` evenly spaced positions.

    Sample j of window k sits at the centre of its 1/points share of the window; values between samples
    are linearly interpolated. When T = K * points this reads the samples themselves, unchanged.
    """
    series = np.asarray(series, dtype=np.float64)
    if series.ndim == 1:
        series = series[None]
    d, t = series.shape
    if t == 0:
        raise CatnetError("cannot window an empty sequence")
    pos = (np.arange(num_clips)[:, None] + (np.arange(points)[None] + 0.5) / points) * (t / num_clips) - 0.5
    grid = np.arange(t)
    out = np.stack([np.interp(pos.ravel(), grid, series[c]) for c in range(d)])  # (D, K * points)
    return out.reshape(d, num_clips, points).transpose(1, 0, 2)


def window_features(series: np.ndarray, cfg: WindowConfig) -> np.ndarray:
    """(K, F) clip features of one (D, T) sequence: raw window values and/or per-channel statistics."""
    cfg.check()
    w = window_values(series, cfg.num_clips, cfg.points)  # (K, D, P)
    parts = []
    if cfg.features in ("raw", "both"):
        parts.append(w.reshape(cfg.num_clips, -1))
    if cfg.features in ("stats", "both"):
        diff = np.diff(w, axis=2).mean(2) if cfg.points > 1 else np.zeros(w.shape[:2])
        stats = np.stack([w.mean(2), w.std(2), w.min(2), w.max(2), diff], 2)  # (K, D, NUM_STATS)
        parts.append(stats.reshape(cfg.num_clips, -1))
    return np.concatenate(parts, 1).astype(np.float32)


def _split(data: TSData, cfg: WindowConfig) -> SequenceSplit:
    x = np.stack([window_features(s, cfg) for s in data.series])
    times = np.stack([window_times(s.shape[1], cfg.num_clips) for s in data.series]).astype(np.float32)
    return SequenceSplit(x, data.labels.astype(np.int64), times, data.classes)


def load_sequences(name: str, cfg: WindowConfig | None = None, *, data_dir: str | os.PathLike | None = None,
                   standardize: bool = True) -> tuple[SequenceSplit, SequenceSplit]:
    """(train, test) of a dataset as (N, K, F) clip features.

    `standardize` z-scores every feature with the TRAIN split's mean and std over all sequences and
    windows (test never informs it), so raw values and statistics of different scales train alike.
    """
    cfg = cfg or WindowConfig()
    cfg.check()
    train_path, test_path = dataset_files(name, data_dir)
    train_ts = read_ts(train_path)
    train, test = _split(train_ts, cfg), _split(read_ts(test_path, classes=train_ts.classes), cfg)
    if standardize:
        flat = train.x.reshape(-1, train.x.shape[-1])
        mean, std = flat.mean(0), flat.std(0)
        std[std < 1e-8] = 1.0  # a constant feature stays 0 instead of blowing up
        train.x, test.x = (train.x - mean) / std, (test.x - mean) / std
    return train, test
