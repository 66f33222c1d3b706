"""kill -9 in the middle of an extraction, then resume: the store ends up equal to a clean run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from catnet.cli import main
from catnet.features import FeatureStore
from catnet.features.store import read_shard_videos

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
        "--crops", "1", "--short-side", "32", "--crop-size", "32", "--batch", "2", "--no-progress",
        "--workers", "0", "--shard-size", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


# Runs `catnet` with every shard write held open for a moment *between* writing the temporary file
# and renaming it, so the test can kill the process while a half-finished shard is on disk.
SLOW_WRITER = """
import sys, time
import catnet.features.store as store
real_save = store.save_file
def slow_save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    time.sleep(float(sys.argv[1]))
store.save_file = slow_save
from catnet.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_kill9_mid_write_then_resume_equals_clean_run(make_video, tmp_path):
    src = tmp_path / "videos"
    n_good = 4
    for i in range(n_good):
        make_video(f"videos/v{i}.mp4", frames=10 + i, height=32, width=40, seed=i)
    (src / "broken.mp4").write_bytes(b"\x00" * 100)
    out = tmp_path / "killed"

    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "0.5", "extract", str(src), "--out", str(out),
                             *TINY], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    shards_dir = out / "shards"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = list(shards_dir.glob("*.safetensors")) if shards_dir.is_dir() else []
            temps = list(shards_dir.glob(".*.tmp")) if shards_dir.is_dir() else []
            if len(done) >= 2 and temps:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"extraction was not killed mid-run: {err.decode()[-500:]}"

    # the killed store is readable as it is: whole shards only, plus a leftover temporary
    assert list(shards_dir.glob(".*.tmp"))
    before = {p.name: p.read_bytes() for p in shards_dir.glob("*.safetensors")}
    killed = FeatureStore(out)
    assert 2 <= len(killed) < n_good

    assert main(["extract", str(src), "--out", str(out), *TINY]) == 1  # broken.mp4 -> 1
    assert not list(shards_dir.glob(".*.tmp")), "stale temporaries survive a restart"
    after = {p.name: p.read_bytes() for p in shards_dir.glob("*.safetensors")}
    assert all(after[name] == data for name, data in before.items()), "finished shards were rewritten"
    resumed = FeatureStore(out)
    assert len(resumed) == n_good

    # neither redone nor lost: every video is in exactly one shard
    ids_in_shards = [r["id"] for p in resumed.shards for r in read_shard_videos(p)]
    assert sorted(ids_in_shards) == [f"v{i}" for i in range(n_good)]

    clean_out = tmp_path / "clean"
    assert main(["extract", str(src), "--out", str(clean_out), *TINY]) == 1
    clean = FeatureStore(clean_out)
    assert resumed.ids == clean.ids
    assert [f["id"] for f in resumed.failures] == [f["id"] for f in clean.failures] == ["broken"]
    assert resumed.manifest["weights_id"] == clean.manifest["weights_id"]
    for a, b in zip(resumed, clean, strict=True):
        np.testing.assert_array_equal(a.features, b.features)  # each video batched alone: bit for bit
        np.testing.assert_array_equal(a.times, b.times)
        assert (a.label, a.num_clips) == (b.label, b.num_clips)


def test_second_writer_with_same_rank_is_refused(tmp_path, capsys):
    import fcntl

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")  # never decoded: refused before
    out = tmp_path / "store"
    out.mkdir()
    with open(out / ".lock.rank000", "w") as held:  # what a running extraction holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["extract", str(tmp_path / "videos"), "--out", str(out), *TINY]) == 2
    assert "another `catnet extract` is writing" in capsys.readouterr().err
    assert not (out / "shards").exists()
