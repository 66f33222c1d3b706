"""`catnet demo --tiny` end to end (synth -> extract -> train Table 1/2 variants -> tables -> report),
then again from its caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from catnet.cli import main
from catnet.config import from_dict
from catnet.experiments.demo import DemoConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_cached_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "Table 1" in printed.out and "Table 2" in printed.out and "local w/ FC-Norm" in printed.out
    res = json.loads((out / "results.json").read_text())
    labels = [row[0] for row in res["table1"]]
    assert labels == ["avgpool (baseline)", "attention_clusters", "local w/o FC-Norm", "local w/ FC-Norm",
                      "catnet"]
    assert [row[0] for row in res["table2"]] == ["1"]
    assert len(res["runs"]) == 7  # 5 Table-1 rows + N=1 x {concat, sum}, one seed
    for r in res["runs"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["n"] == 3
        assert r["selected_on"] != "test"  # validation came from training videos
    assert res["selected_on_test"] == [] and "selected on test" not in printed.err
    md = (out / "report" / "report.md").read_text()
    for png in ("fig4_class_delta.png", "fig5_accuracy_distribution.png", "fig6_attention.png"):
        assert (out / "report" / png).is_file() and png in md
    assert "### Table 1" in md and "random weights" in md
    # 3 training videos per class: a tenth of them rounds down to no hold-out (docs/training.md "Splits")
    assert "without validation (nothing selected)" in md and "validating on" not in md
    assert "measured on the 'test' split, last checkpoint; validation: none" in md
    assert "attention" in json.loads((out / "report" / "report.json").read_text())

    # a re-run reuses the dataset, the store and every run: no run is trained again
    ckpts = sorted((out / "runs").glob("*/seed0/checkpoints/last.pt"))
    assert len(ckpts) == 7
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]


def test_configs_demo_yaml_matches_the_defaults():
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert from_dict(DemoConfig, data) == DemoConfig()


def test_bad_demo_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clases: 3\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "clases" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2


@pytest.mark.slow
def test_changed_learning_rate_retrains_instead_of_reusing(tmp_path):
    out = tmp_path / "demo"
    cfg = tmp_path / "demo.yaml"
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    ckpt = out / "runs" / "avgpool" / "seed0" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    cfg.write_text("train: {lr: 0.001}\n")
    assert main(["demo", "--tiny", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "runs" / "avgpool" / "seed0" / "run.json").read_text())
    assert run["train"]["lr"] == 0.001 and ckpt.stat().st_mtime_ns != before


def test_another_synthetic_dataset_gets_its_own_store():
    from dataclasses import replace

    from catnet.experiments.demo import dataset_key
    from catnet.experiments.stages import store_key

    default = DemoConfig()
    assert dataset_key(default.synth) == {}  # the default demo's store keeps its name
    other = replace(default.synth, seed=1)
    assert store_key(default.extract, **dataset_key(other)) != store_key(default.extract)


def test_runs_validated_on_test_are_named():
    from catnet.experiments.demo import selected_on_test

    results = {("catnet", 0): {"selected_on": "test"}, ("avgpool", 0): {"selected_on": "train"},
               ("local", 1): {"selected_on": None}}
    assert selected_on_test(results) == ["catnet/seed0"]
