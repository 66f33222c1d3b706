"""Scale-out: a 2-rank torchrun extraction reads as the same store as a single-process one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catnet.cli import main
from catnet.features import FeatureStore

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
        "--crops", "1", "--short-side", "32", "--crop-size", "32", "--batch", "4", "--no-progress",
        "--workers", "0", "--shard-size", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_two_rank_torchrun_equals_single_process(make_video, tmp_path):
    src = tmp_path / "videos"
    ids = ["a/v0", "a/v1", "b/v2", "b/v3"]
    for i, vid in enumerate(ids):
        make_video(f"videos/{vid}.mp4", frames=9 + 2 * i, height=32, width=40, seed=i)

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    out2 = tmp_path / "two"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "catnet", "extract", str(src),
           "--out", str(out2), *TINY, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints the all-rank totals
    assert (summary["total"], summary["extracted"], summary["failed"]) == (4, 4, 0)

    out1 = tmp_path / "one"
    assert main(["extract", str(src), "--out", str(out1), *TINY]) == 0
    one, two = FeatureStore(out1), FeatureStore(out2)
    assert {p.name.split("-")[0] for p in two.shards} == {"rank000", "rank001"}  # each rank its own shards
    assert two.ids == one.ids == sorted(ids)
    assert two.manifest["weights_id"] == one.manifest["weights_id"]
    for a, b in zip(two, one, strict=True):
        assert (a.id, a.label, a.features.shape) == (b.id, b.label, b.features.shape)
        np.testing.assert_array_equal(a.features, b.features)  # each video batched alone: bit for bit
        np.testing.assert_array_equal(a.times, b.times)
