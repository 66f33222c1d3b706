"""kill -9 at random points of an extraction and of a training run, then resume.

tests/test_extract_resume.py and tests/test_resume.py kill once at a hand-picked point (mid shard write,
a given optimiser step); here the same runs are killed repeatedly at seeded random moments (which may
fall in decoding, the forward pass, a checkpoint write, a log write ...) and resumed each time. Goals:
every kill survived, no store entry or checkpoint corrupted, at most the one video / epoch in flight
redone, and the resumed result identical to an uninterrupted run's.
"""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
from reliability_corpus import EXTRACT_TINY, kill_extraction, kill_training, moving_square, stored_ids

from catnet.cli import main
from catnet.features import FeatureStore
from catnet.video.encode import write_video

SEED = 20240610  # fixed: a failure must be reproducible


# The killed children run one thread too: same float sums as this process.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_extraction_killed_at_random_points_resumes_to_the_clean_store(tmp_path):
    rng = random.Random(SEED)
    src = tmp_path / "videos"
    n = 10
    for i in range(n):
        write_video(src / f"c{i % 2}" / f"v{i}.mp4", moving_square(10 + 2 * i, seed=i))
    (src / "c0" / "broken.mp4").write_text("not a video")
    store, log = tmp_path / "store", tmp_path / "work.log"

    kills = []
    for _ in range(3):  # kill while decoding, in the forward pass or writing the k-th video of the run
        units, delay = rng.randint(1, 2), rng.uniform(0, 0.1)
        kills.append(kill_extraction(src, store, log, units, delay, pace=0.1))
    assert all(k.killed for k in kills), kills  # each run gets <= 3 units done: the kill always lands
    for k in kills:
        assert k.redone <= 1, k  # default shard size, nothing flushed yet: only the video in flight is lost

    assert main(["extract", str(src), "--out", str(store), *EXTRACT_TINY]) == 1  # broken.mp4 -> 1
    ids = stored_ids(store)  # every shard loads in full: none torn
    assert sorted(ids) == sorted(set(ids)) == sorted(f"c{i % 2}/v{i}" for i in range(n))
    assert not list((store / "shards").glob(".*.tmp"))

    clean = tmp_path / "clean"
    assert main(["extract", str(src), "--out", str(clean), *EXTRACT_TINY]) == 1
    a, b = FeatureStore(store), FeatureStore(clean)
    assert a.ids == b.ids and [f["id"] for f in a.failures] == [f["id"] for f in b.failures] == ["c0/broken"]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.features, y.features)  # same fp16 bits: nothing mixed up
        np.testing.assert_array_equal(x.times, y.times)
        assert (x.label, x.path) == (y.label, y.path)


def _store(path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 2
    feats = [(centers[i % 3] + rng.standard_normal((4, 8))).astype(np.float32) for i in range(36)]
    return FeatureStore.write_synthetic(path, feats, [i % 3 for i in range(36)], ["x", "y", "z"],
                                        splits=["train"] * 28 + ["test"] * 8, num_crops=2, shard_size=8)


TRAIN = ["--epochs", "10", "--batch-size", "4", "--lr", "0.05", "--lr-step", "2", "--train-views", "3",
         "--head-opt", "num_heads=2", "--dropout", "0.5", "--seed", "3", "--no-progress"]


def _rows(run):
    rows = csv.DictReader((run / "metrics.csv").open())
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_training_killed_at_random_points_resumes_to_identical_metrics(tmp_path):
    rng = random.Random(SEED)
    store = _store(tmp_path / "store").root
    run, log = tmp_path / "killed", tmp_path / "work.log"

    kills = []
    for _ in range(3):  # kill in a step, in validation or writing checkpoints/logs of the k-th epoch
        units, delay = rng.randint(1, 2), rng.uniform(0, 0.05)
        kills.append(kill_training(store, run, log, TRAIN, units, delay, pace=0.05))
    assert all(k.killed for k in kills), kills  # each run gets <= 3 units done: the kill always lands
    for k in kills:
        assert k.redone <= 1, k  # only the epoch in flight
    if (run / "checkpoints" / "last.pt").is_file():
        assert main(["train", str(store), "--out", str(run), *TRAIN, "--resume"]) == 0
    assert main(["train", str(store), "--out", str(tmp_path / "full"), *TRAIN]) == 0

    assert _rows(run) == _rows(tmp_path / "full") and len(_rows(run)) == 10
    for which in ("last", "best"):
        a = torch.load(run / "checkpoints" / f"{which}.pt", weights_only=True)
        b = torch.load(tmp_path / "full" / "checkpoints" / f"{which}.pt", weights_only=True)
        assert a["epoch"] == b["epoch"]
        for key in b["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (which, key)
