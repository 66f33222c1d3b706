"""The README's laptop flow on folder-per-class videos: a training folder and a held-out test folder, each
extracted into its own store (no split names), then train, eval, report on the held-out store."""

from __future__ import annotations

import json

import pytest
from test_extract import TINY

from catnet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_folder_stores_train_eval_report(make_video, tmp_path, capsys):
    for folder, seeds in (("videos", range(4)), ("test_videos", range(4, 6))):
        for cls in ("jump", "run"):
            for s in seeds:
                make_video(f"{folder}/{cls}/{cls}_{s}.mp4", frames=12, height=36, width=48,
                           seed=s + (10 if cls == "run" else 0))
    for folder, store in (("videos", "store"), ("test_videos", "test_store")):
        assert main(["extract", str(tmp_path / folder), "--out", str(tmp_path / store), *TINY]) == 0
    for head in ("catnet", "avgpool"):
        assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "runs" / head), "--head", head,
                     "--epochs", "2", "--batch-size", "4", "--head-opt", "num_heads=2" if head == "catnet"
                     else "dropout=0", "--no-progress"]) == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    # held-out store: a store without split names is evaluated whole, and nothing warns
    assert main(["eval", str(runs / "catnet"), "--store", str(tmp_path / "test_store"), "--json"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert (held_out["split"], held_out["n"], held_out["note"]) == ("", 4, None)
    # the training store itself: evaluated whole too, but said to be a training number
    assert main(["eval", str(runs / "catnet"), "--store", str(tmp_path / "store"), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["trained_on_measured_split"] and "training number" in own["note"]
    assert main(["report", str(runs / "catnet"), "--baseline", str(runs / "avgpool"),
                 "--store", str(tmp_path / "test_store"), "--videos", "1"]) == 0
    md = (runs / "catnet" / "report" / "report.md").read_text()
    assert "measured on the store's videos, last checkpoint" in md and "training number" not in md
