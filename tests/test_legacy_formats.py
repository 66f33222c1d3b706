"""Stores and runs written by catnet 0.1.0 still load, evaluate, predict and resume.

The files are in tests/data/legacy_0.1.0 (see its README).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from catnet.cli import main
from catnet.features.store import FeatureStore

LEGACY = Path(__file__).parent / "data" / "legacy_0.1.0"


@pytest.fixture
def legacy(tmp_path) -> Path:
    dst = tmp_path / "legacy"
    shutil.copytree(LEGACY, dst)
    (dst / "store" / "failures").mkdir(exist_ok=True)  # git keeps no empty folders
    return dst


def test_legacy_store_reads(legacy):
    store = FeatureStore(legacy / "store")
    assert len(store) == 4 and store.classes == ["jump", "run"]
    v = store[0]
    assert v.features.shape == (9, 2048) and v.times.shape == (3, 2)


def test_legacy_run_evaluates_to_the_same_numbers(legacy, capsys):
    assert main(["eval", str(legacy / "run"), "--store", str(legacy / "store"), "--split", "", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((legacy / "eval_expected.json").read_text())
    for key in ("n", "top1", "top5", "mean_class_acc", "confusion", "classes"):
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_legacy_run_predicts_the_same(legacy, capsys, monkeypatch):
    monkeypatch.chdir(legacy)
    # the run's own sampling (the default `fast` profile would use fewer clips than 0.1.0 did)
    argv = ["predict", "videos/jump/a.mp4", "--checkpoint", "run", "--profile", "accurate", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    want = json.loads((legacy / "predict_expected.jsonl").read_text().splitlines()[0])
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    assert got["clips"] == want["clips"]


def test_legacy_run_resumes(legacy):
    run = legacy / "run"
    assert main(["train", str(legacy / "store"), "--out", str(run), "--resume", "--epochs", "3",
                 "--no-progress"]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 epochs


def test_legacy_finetune_run_json_is_understood(legacy, tmp_path):
    from catnet.config import from_dict
    from catnet.engine.finetune import FinetuneConfig

    info = json.loads((legacy / "finetune_run.json").read_text())
    cfg = from_dict(FinetuneConfig, FinetuneConfig.upgrade(info["finetune"]))
    assert (cfg.sampling.clip_len, cfg.spatial.crop, cfg.sampling.num_clips) == (4, 32, 2)
    assert cfg.spatial.train_short == (32, 40)
