"""Real sequence datasets as K-clip "videos": .ts parsing, windowing, and a tiny head training run."""

from __future__ import annotations

import numpy as np
import pytest

from catnet.data.sequences import (
    NUM_STATS,
    WindowConfig,
    aeon_data_dir,
    load_sequences,
    read_ts,
    window_features,
    window_times,
    window_values,
)
from catnet.errors import CatnetError
from catnet.features.sequences import write_sequence_store

needs_aeon = pytest.mark.skipif(aeon_data_dir() is None,
                                reason="aeon's data files not installed (pip install --no-deps aeon)")

TS_HEADER = """# a comment
@problemName Toy
@timeStamps false
@univariate false
@dimensions 2
@equalLength false
@classLabel true up down
@data
"""


def _write_toy(path, n_per_class=6, seed=0):
    """Two classes of 2-channel sequences: a rising or a falling ramp plus noise, lengths 20..40."""
    rng = np.random.default_rng(seed)
    lines = []
    for label, sign in (("up", 1.0), ("down", -1.0)):
        for _ in range(n_per_class):
            t = np.linspace(0, 1, int(rng.integers(20, 41)))
            dims = [sign * t + 0.1 * rng.standard_normal(len(t)), rng.standard_normal(len(t))]
            lines.append(":".join(",".join(f"{v:.4f}" for v in d) for d in dims) + f":{label}")
    path.write_text(TS_HEADER + "\n".join(lines) + "\n")
    return path


def test_read_ts_header_values_missing_and_labels(tmp_path):
    path = tmp_path / "X_TRAIN.ts"
    path.write_text(TS_HEADER + "1,2,3,4:5,?,7,8:down\n0.5,NaN,1.5:9,9,9:up\n")
    data = read_ts(path)
    assert data.name == "Toy" and data.classes == ["up", "down"]
    assert data.labels.tolist() == [1, 0]
    np.testing.assert_allclose(data.series[0], [[1, 2, 3, 4], [5, 6, 7, 8]])  # ? interpolated
    np.testing.assert_allclose(data.series[1], [[0.5, 1.0, 1.5], [9, 9, 9]])
    with pytest.raises(CatnetError, match="not among"):
        read_ts(path, classes=["up"])
    (tmp_path / "bad.ts").write_text(TS_HEADER + "1,x,3:up\n")
    with pytest.raises(CatnetError, match="bad.ts:9: bad value"):
        read_ts(tmp_path / "bad.ts")


@pytest.mark.parametrize("k,points", [(10, 10), (4, 5), (1, 20)])
def test_windows_read_the_samples_when_length_divides(k, points):
    series = np.random.default_rng(k).standard_normal((3, k * points))
    w = window_values(series, k, points)
    assert w.shape == (k, 3, points)
    for i in range(k):
        np.testing.assert_array_equal(w[i], series[:, i * points:(i + 1) * points])


@pytest.mark.parametrize("length", [1, 2, 7, 361])
def test_windows_cover_any_length_in_order(length):
    ramp = np.arange(length, dtype=float)[None]  # linear interpolation reproduces a ramp exactly
    k, points = 5, 4
    w = window_values(ramp, k, points)[:, 0]
    pos = (np.arange(k)[:, None] + (np.arange(points) + 0.5) / points) * length / k - 0.5
    np.testing.assert_allclose(w, np.clip(pos, 0, length - 1))
    assert np.all(np.diff(w.ravel()) >= 0)  # windows in temporal order, like clips
    times = window_times(length, k)
    assert times[0, 0] == 0 and times[-1, 1] == length and np.allclose(times[1:, 0], times[:-1, 1])


def test_window_features_raw_and_stats():
    series = np.random.default_rng(0).standard_normal((2, 30))
    cfg = WindowConfig(num_clips=3, points=10, features="both")
    f = window_features(series, cfg)
    assert f.shape == (3, cfg.dim(2)) == (3, 2 * 10 + 2 * NUM_STATS)
    win = series[:, 10:20]  # window 1
    np.testing.assert_allclose(f[1, :20], win.ravel(), rtol=1e-6)
    stats = f[1, 20:].reshape(2, NUM_STATS)
    expected = np.stack([win.mean(1), win.std(1), win.min(1), win.max(1), np.diff(win, axis=1).mean(1)], 1)
    np.testing.assert_allclose(stats, expected, rtol=1e-5, atol=1e-6)
    assert window_features(series, WindowConfig(3, 10, "stats")).shape == (3, 2 * NUM_STATS)
    with pytest.raises(CatnetError, match="features must be one of"):
        window_features(series, WindowConfig(3, 10, "fft"))


def test_tiny_training_run_on_ts_files(tmp_path):
    from catnet.engine.evaluate import evaluate
    from catnet.engine.runs import load_run
    from catnet.engine.train import TrainConfig, train

    _write_toy(tmp_path / "Toy_TRAIN.ts", seed=0)
    _write_toy(tmp_path / "Toy_TEST.ts", n_per_class=5, seed=1)
    cfg = WindowConfig(num_clips=4, points=5)
    store = write_sequence_store("Toy", tmp_path / "store", cfg, data_dir=tmp_path)
    assert len(store.split("train")) == 12 and len(store.split("test")) == 10
    assert store[0].features.shape == (4, cfg.dim(2)) and store.classes == ["up", "down"]
    train(TrainConfig(store=str(store.root), out=str(tmp_path / "run"), head="catnet", epochs=6,
                      batch_size=4, lr=0.1, train_views=4, val_split="none", progress=False, device="cpu"))
    head, _ = load_run(tmp_path / "run", which="last")
    result = evaluate(head, store, "test")
    assert result["n"] == 10 and result["top1"] >= 0.9  # ramp direction is trivially separable


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(CatnetError, match="Nope_TRAIN.ts not found"):
        load_sequences("Nope", data_dir=tmp_path)


@needs_aeon
def test_real_datasets_load_with_their_official_splits():
    train, test = load_sequences("BasicMotions", WindowConfig(num_clips=10, points=10))
    assert train.x.shape == test.x.shape == (40, 10, 6 * 10 + 6 * NUM_STATS)
    assert train.classes == ["Standing", "Running", "Walking", "Badminton"]
    assert np.bincount(train.y).tolist() == np.bincount(test.y).tolist() == [10] * 4
    flat = train.x.reshape(-1, train.x.shape[-1])
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)  # standardised with train statistics

    train, test = load_sequences("PickupGestureWiimoteZ", WindowConfig(num_clips=10, points=4))
    assert train.x.shape == (50, 10, 4 + NUM_STATS) and test.x.shape[0] == 50
    assert np.bincount(test.y).tolist() == [5] * 10
    lengths = train.times[:, -1, 1]  # the last window ends at each sequence's own length
    assert lengths.min() < lengths.max() and np.isfinite(train.x).all() and np.isfinite(test.x).all()
