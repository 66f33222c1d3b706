"""The per-writer journal: each finished video is durable at once, so a kill redoes at most the one in flight.

(a) a torn journal tail (a kill mid-append) is dropped, the valid records become a shard;
(b) a real SIGKILL of `catnet extract` with nothing flushed: the resume redoes at most one video and ends
    equal to a clean run;
(c) a kill between a shard's rename and the journal's truncation leaves no duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from catnet.cli import main
from catnet.features import FeatureStore, StoreWriter, make_manifest
from catnet.features.store import (
    JOURNAL_SUFFIX,
    done_and_failed,
    journal_record,
    read_journal,
    read_shard_videos,
)

REPO = Path(__file__).resolve().parents[1]
D = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _manifest():
    return make_manifest(backbone="synthetic", weights_id="w", num_features=D, sampling={},
                         spatial={"num_crops": 1}, classes=["a", "b"])


def _video(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    k = 2 + i % 3
    return rng.standard_normal((k, D)).astype(np.float32), np.stack([np.arange(k), np.arange(k) + 1.0], 1)


def _fill(path: Path, n: int, **kw) -> StoreWriter:
    """A writer that has journaled `n` videos and flushed none (shard_size 100), left open as if killed."""
    w = StoreWriter(path, _manifest(), shard_size=100, flush_seconds=None, **kw)
    for i in range(n):
        feats, times = _video(i)
        w.add(f"v{i}", feats, times, label=i % 2, split="train")
    return w


def _shard_ids(path: Path) -> list[str]:
    return [r["id"] for p in sorted((path / "shards").glob("*.safetensors")) for r in read_shard_videos(p)]


def test_record_roundtrip_and_torn_tail_recovery(tmp_path):
    store = tmp_path / "s"
    w = _fill(store, 4)
    journal = w.journal_path
    assert journal.name == "rank000" + JOURNAL_SUFFIX and _shard_ids(store) == []
    records, end = read_journal(journal)
    assert [r["id"] for r, _, _ in records] == ["v0", "v1", "v2", "v3"] and end == journal.stat().st_size
    feats, times = _video(2)
    np.testing.assert_array_equal(records[2][1], feats.astype(np.float16))
    np.testing.assert_array_equal(records[2][2], times.astype(np.float32))
    assert b"".join(journal_record(*r) for r in records) == journal.read_bytes()  # self-describing

    # readers already see the journaled videos (read-only), and a resume would skip them
    assert FeatureStore(store).ids == ["v0", "v1", "v2", "v3"]
    assert done_and_failed(store)[0] == {"v0", "v1", "v2", "v3"}

    # kill mid-append of the 4th record: cut it in its payload; a flipped byte fails the CRC the same way
    size_before_last = end - len(journal_record(*records[3]))
    with open(journal, "r+b") as f:
        f.truncate(size_before_last + 30)
    assert [r["id"] for r, _, _ in read_journal(journal)[0]] == ["v0", "v1", "v2"]
    data = bytearray(journal.read_bytes())
    data[size_before_last - 5] ^= 0xFF  # inside v2's features
    assert [r["id"] for r, _, _ in read_journal_bytes(tmp_path, bytes(data))] == ["v0", "v1"]

    w2 = StoreWriter(store, _manifest(), shard_size=100, flush_seconds=None)
    assert w2.num_recovered == 3
    assert _shard_ids(store) == ["v0", "v1", "v2"]  # compacted into one shard ...
    assert journal.stat().st_size == 0  # ... and the torn tail is gone, so new appends are readable
    feats, times = _video(7)
    w2.add("v7", feats, times)
    assert [r["id"] for r, _, _ in read_journal(journal)[0]] == ["v7"]
    w2.close()
    assert not journal.exists()  # a finished store is shards only
    s = FeatureStore(store)
    assert s.ids == ["v0", "v1", "v2", "v7"]
    for i in (0, 1, 2, 7):
        feats, times = _video(i)
        np.testing.assert_array_equal(s[f"v{i}"].features, feats.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(s[f"v{i}"].times, times)
    for p in s.shards:  # every shard still loads with plain safetensors
        assert load_file(str(p))["features"].dtype == np.float16


def read_journal_bytes(tmp_path: Path, data: bytes):
    p = tmp_path / "copy.journal"
    p.write_bytes(data)
    return read_journal(p)[0]


def test_kill_between_shard_write_and_journal_truncate_leaves_no_duplicates(tmp_path, monkeypatch):
    store = tmp_path / "s"
    w = _fill(store, 3)
    monkeypatch.setattr(StoreWriter, "_truncate_journal", lambda self: None)  # the kill lands right here
    w.flush()
    monkeypatch.undo()
    assert _shard_ids(store) == ["v0", "v1", "v2"] and len(read_journal(w.journal_path)[0]) == 3
    assert FeatureStore(store).ids == ["v0", "v1", "v2"]  # the shard wins over the journal copies

    w2 = StoreWriter(store, _manifest(), shard_size=100, flush_seconds=None)
    assert w2.num_recovered == 0
    w2.close()
    assert _shard_ids(store) == ["v0", "v1", "v2"]  # nothing written twice
    assert len(list((store / "shards").glob("*.safetensors"))) == 1 and not w2.journal_path.exists()


def test_writer_without_journal_writes_none(tmp_path):
    w = _fill(tmp_path / "s", 2, journal=False)
    assert not w.journal_path.exists()
    w.close()
    assert _shard_ids(tmp_path / "s") == ["v0", "v1"]


TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
        "--crops", "1", "--short-side", "32", "--crop-size", "32", "--batch", "2", "--no-progress",
        "--workers", "0", "--shard-size", "100", "--flush-seconds", "1000"]

# Logs (fsynced) each video as its decode starts, so the test knows what was in flight at the kill, then
# dawdles a little so the kill lands inside that video even on a loaded machine.
CHILD = """
import os, sys, time
import catnet.features.extract as extract
log = open(sys.argv[1], "a")
getitem = extract._ClipDataset.__getitem__
def logged(self, i):
    log.write(self.entries[i].id + "\\n"); log.flush(); os.fsync(log.fileno())
    time.sleep(0.3)
    return getitem(self, i)
extract._ClipDataset.__getitem__ = logged
from catnet.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def kill_at_third_video(child: str, log: Path, argv: list[str], settle: float = 0.0) -> list[str]:
    """Run `catnet argv` under `child` (which logs each video id it starts to `log`), SIGKILL it once
    the 3rd video is in flight (2 finished and journaled) plus `settle` seconds; the ids started."""
    proc = subprocess.Popen([sys.executable, "-c", child, str(log), *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and len(log.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline, "extraction never reached its 3rd video"
            time.sleep(0.01)
        time.sleep(settle)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"extraction was not killed mid-run: {err.decode()[-500:]}"
    return log.read_text().split()


def test_sigkill_with_nothing_flushed_redoes_at_most_one_video(make_video, tmp_path, capsys):
    src, n = tmp_path / "videos", 5
    for i in range(n):
        make_video(f"videos/c{i % 2}/v{i}.mp4", frames=10 + i, height=32, width=40, seed=i)
    out, log = tmp_path / "killed", tmp_path / "started.log"
    log.write_text("")
    started = kill_at_third_video(CHILD, log, ["extract", str(src), "--out", str(out), *TINY])
    assert not list((out / "shards").glob("*.safetensors")), "a shard was flushed: nothing to test"
    saved = set(FeatureStore(out).ids)  # the journal, read-only
    assert len(saved) >= 2 and saved <= set(started)
    assert len(set(started) - saved) <= 1  # at most the video in flight is lost

    capsys.readouterr()
    assert main(["extract", str(src), "--out", str(out), *TINY, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovered"] == summary["already_done"] == len(saved)
    assert summary["extracted"] == n - len(saved)  # the resume ran only what was not finished
    redone = set(started) - saved
    assert len(redone) <= 1

    assert sorted(_shard_ids(out)) == sorted(f"c{i % 2}/v{i}" for i in range(n))  # once each
    assert not list((out / "shards").glob("*" + JOURNAL_SUFFIX))
    clean = tmp_path / "clean"
    assert main(["extract", str(src), "--out", str(clean), *TINY]) == 0
    a, b = FeatureStore(out), FeatureStore(clean)
    assert a.ids == b.ids
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.times, y.times)
        assert (x.label, x.path, x.num_clips) == (y.label, y.path, y.num_clips)
