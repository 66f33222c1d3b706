"""The training recipe's pieces (catnet.engine.optim) and options: run length, schedules, class-balanced
sampling and loss, early stopping, the linear reference, and old configs keeping their meaning."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from catnet.cli import main
from catnet.config import from_dict, to_dict
from catnet.engine.finetune import FinetuneConfig
from catnet.engine.optim import BalancedSampler, Criterion, LRSchedule, balanced_weights
from catnet.engine.runs import load_run
from catnet.engine.train import TrainConfig, train
from catnet.experiments.stages import Row, derived_store, run_finished, train_cached
from catnet.features import FeatureStore
from catnet.heads import build_head


def test_run_length_gives_tiny_stores_enough_steps_and_big_ones_90_epochs():
    cfg = TrainConfig()
    assert cfg.epochs is None and cfg.min_steps == 1000
    assert LRSchedule.plan(cfg, 3).epochs == 334  # 144 videos, batch 64: 1002 steps
    assert LRSchedule.plan(cfg, 1).epochs == 1000
    assert LRSchedule.plan(cfg, 63).epochs == 90  # 4000 videos: the paper's 90 epochs
    assert LRSchedule.plan(TrainConfig(epochs=7), 3).epochs == 7  # an explicit --epochs is kept
    assert FinetuneConfig().epochs == 90 and FinetuneConfig().schedule == "step"


def test_warmup_then_cosine_per_step_and_the_papers_step_schedule():
    s = LRSchedule.plan(TrainConfig(lr=0.1, epochs=10), 10)  # 100 steps, 5 of warmup
    lrs = [s.lr(e, k) for e in range(10) for k in range(10)]
    assert s.warmup_steps == 5 and lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))  # cosine: monotone down
    paper = LRSchedule.plan(TrainConfig(lr=0.01, epochs=90, schedule="step", warmup_fraction=0.0), 7)
    assert [paper.lr(e, 3) for e in (0, 29, 30, 60, 89)] == pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-4])
    warm = LRSchedule.plan(TrainConfig(epochs=4, warmup_epochs=0.5), 4)
    assert warm.warmup_steps == 2


def test_class_balanced_weights_sampler_and_loss():
    labels = np.array([0] * 18 + [1] * 2)
    w = balanced_weights(labels, 3)
    assert w.tolist() == pytest.approx([20 / 36, 5.0, 0.0])  # absent class: weight 0
    sampler = BalancedSampler(list(range(20)), labels, torch.Generator().manual_seed(0))
    drawn = np.concatenate([labels[sampler.epoch_order()] for _ in range(50)])
    assert 0.4 < drawn.mean() < 0.6  # the minority class about as often as the majority
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 2, 1])
    cfg = TrainConfig(label_smoothing=0.1, class_weights="balanced")
    crit = Criterion.of(cfg, labels, 3)
    want = F.cross_entropy(logits, y, weight=torch.tensor(w, dtype=torch.float32), label_smoothing=0.1)
    torch.testing.assert_close(crit(logits, y), want)


def make_store(path, n=24):
    rng = np.random.default_rng(0)
    feats = [(rng.standard_normal((4, 6)) + 3 * (i % 3)).astype(np.float32) for i in range(n)]
    return FeatureStore.write_synthetic(path, feats, [i % 3 for i in range(n)], ["a", "b", "c"],
                                        splits=["train"] * (n - 6) + ["val"] * 6)


def test_early_stopping_stops_records_and_resumes_as_finished(tmp_path):
    store = make_store(tmp_path / "s")
    cfg = TrainConfig(store=str(store.root), out=str(tmp_path / "r"), epochs=12, batch_size=6, lr=1e-9,
                      head="avgpool", early_stop=2, progress=False)
    result = train(cfg)  # lr ~ 0: validation never improves after epoch 1
    assert result["stopped_early"] and result["epochs_run"] == 3 and result["best_epoch"] == 1
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["result"] == {"epochs_run": 3, "stopped_early": True, "best_epoch": 1}
    assert run_finished(tmp_path / "r", None)
    again = train(TrainConfig(**{**to_dict(cfg), "resume": True}))
    assert again["epochs_run"] == 3 and again["history"] == result["history"]


def test_linear_reference_head_and_default_recipe_from_the_cli(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    assert main(["train", str(store.root), "--out", str(tmp_path / "lin"), "--head", "linear",
                 "--min-steps", "200", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    info = json.loads((tmp_path / "lin" / "run.json").read_text())
    conf, tr = info["head"]["config"], info["train"]
    assert (conf["dropout"], conf["logit_scale"], conf["standardize"]) == (0.0, 1.0, True)
    assert (tr["schedule"], tr["nesterov"], tr["lr"], tr["weight_decay"]) == ("cosine", True, 0.1, 5e-3)
    assert info["standardized_on"] == "train" and summary["val"] == "val"  # the store's val split
    assert summary["epochs"] == 200  # 18 videos = 1 step per epoch: max(90, --min-steps)
    assert summary["final"]["train_loss"] < math.log(3) / 2


def test_avgpool_is_a_linear_probe_and_cached_runs_of_the_older_preset_are_retrained(tmp_path):
    # no dropout on a linear model of frozen features; the attention heads keep 0.5 (docs/heads.md "Dropout")
    assert build_head("avgpool", 6, 3).config.dropout == 0.0 == build_head("linear", 6, 3).config.dropout
    assert build_head("catnet", 6, 3).config.dropout == build_head("local", 6, 3).config.dropout == 0.5
    store = make_store(tmp_path / "s")
    cfg = TrainConfig(store=str(store.root), out=str(tmp_path / "r"), epochs=2, batch_size=6, head="avgpool",
                      progress=False)
    assert train_cached(cfg) and not train_cached(cfg)  # trained, then reused
    run_json = tmp_path / "r" / "run.json"
    info = json.loads(run_json.read_text())
    info["head"]["config"]["dropout"] = 0.5  # what catnet 0.3's avgpool preset recorded
    run_json.write_text(json.dumps(info))
    assert load_run(tmp_path / "r", which="last")[0].config.dropout == 0.5  # old runs load as they trained
    train(TrainConfig(**{**to_dict(cfg), "epochs": 3, "resume": True}))  # and resume as they trained
    assert json.loads(run_json.read_text())["head"]["config"]["dropout"] == 0.5
    assert train_cached(cfg)  # but the demo's cache sees that the same flags now build another head
    assert json.loads(run_json.read_text())["head"]["config"]["dropout"] == 0.0


def test_the_demo_cache_reuses_a_run_only_at_the_same_length_and_on_the_same_features(tmp_path):
    store = make_store(tmp_path / "s")
    cfg = TrainConfig(store=str(store.root), out=str(tmp_path / "r"), epochs=2, batch_size=6, head="avgpool",
                      progress=False, min_steps=30)
    assert train_cached(cfg) and not train_cached(cfg)
    shorter = TrainConfig(**{**to_dict(cfg), "epochs": 1})
    assert train_cached(shorter)  # not the 2-epoch run
    assert json.loads((tmp_path / "r" / "run.json").read_text())["result"]["epochs_run"] == 1
    default = TrainConfig(**{**to_dict(cfg), "epochs": None})  # the recipe's length: max(90, 30 steps)
    assert train_cached(default) and not train_cached(default)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["result"]["epochs_run"] == 90
    # the same store path, other features (another backbone): retrained
    shutil.rmtree(store.root)
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(24)]
    FeatureStore.write_synthetic(store.root, feats, [i % 3 for i in range(24)], ["a", "b", "c"],
                                 backbone="other", splits=["train"] * 18 + ["val"] * 6)
    assert train_cached(default)


def test_a_derived_store_is_rebuilt_when_what_it_comes_from_changes(tmp_path):
    manifest = FeatureStore(make_store(tmp_path / "s").root).manifest

    def rows(value):
        return lambda: [Row(f"v{i}", np.full((2, 6), value, np.float32), np.zeros((2, 2)), i % 3, "train",
                            f"v{i}.mp4", 1) for i in range(6)]

    dst, _ = derived_store(tmp_path / "d", manifest, rows(1.0), identity={"from": "a"})
    digest = FeatureStore(dst).manifest["derived"]
    derived_store(tmp_path / "d", manifest, rows(2.0), identity={"from": "a"})  # same source: reused
    assert FeatureStore(dst)[0].features[0, 0] == 1.0
    derived_store(tmp_path / "d", manifest, rows(2.0), identity={"from": "b"})
    assert FeatureStore(dst)[0].features[0, 0] == 2.0 and FeatureStore(dst).manifest["derived"] != digest


def test_old_configs_keep_their_meaning():
    old = {"epochs": 2, "lr": 0.01, "lr_step": 30, "weight_decay": 1e-4, "head": "avgpool"}  # catnet 0.1
    cfg = from_dict(TrainConfig, TrainConfig.upgrade(old))
    assert (cfg.schedule, cfg.nesterov, cfg.warmup_fraction, cfg.standardize) == ("step", False, 0.0, False)
    assert (cfg.label_smoothing, cfg.class_weights, cfg.sampler, cfg.early_stop) == (0.0, "none", "shuffle",
                                                                                      0)
    assert TrainConfig.upgrade(to_dict(TrainConfig())) == to_dict(TrainConfig())  # today's: untouched


@pytest.mark.parametrize("argv,match", [
    (["--optimizer", "lbfgs"], "invalid choice"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be < 1"),
    (["--early-stop", "-1"], "--early-stop must be >= 0"),
    (["--head-opt", "standardize=false"], "use --standardize / --no-standardize"),
    (["--val-split", "none", "--early-stop", "2"], "--early-stop needs validation"),
])
def test_bad_recipe_options_are_one_line_errors(tmp_path, capsys, argv, match):
    store = make_store(tmp_path / "s")
    try:
        code = main(["train", str(store.root), "--out", str(tmp_path / "r"), "--epochs", "1", *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
