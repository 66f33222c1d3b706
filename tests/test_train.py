"""Training on a store: learning, run folder contents, refusals, presets + CLI overrides, transfer."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from catnet.cli import main as cli
from catnet.engine.evaluate import evaluate
from catnet.engine.runs import load_run, transfer_head
from catnet.engine.splits import store_splits
from catnet.engine.train import TrainConfig, train
from catnet.errors import CatnetError
from catnet.features import FeatureStore

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_store(path, n=24, d=8, num_classes=3, splits=True, seed=0, nan_video=None):
    """Class-separable features, 1-5 clips x 2 crops per video, 3/4 train and 1/4 test."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, d)) * 3
    feats, labels = [], []
    for i in range(n):
        y = i % num_classes
        x = centers[y] + rng.standard_normal((2 * int(rng.integers(1, 6)), d))
        if i == nan_video:
            x[0, 0] = np.nan
        feats.append(x.astype(np.float32))
        labels.append(y)
    split = [("train" if i < 3 * n // 4 else "test") for i in range(n)] if splits else ""
    return FeatureStore.write_synthetic(path, feats, labels, [f"class{j}" for j in range(num_classes)],
                                        splits=split, num_crops=2, shard_size=7)


def cfg(store, out, **kw):
    """A short run on the paper's kind of schedule (x0.1 every 2 epochs, no warmup), validated on a
    quarter of each class's training videos (a tenth holds out nothing from these few)."""
    base = dict(store=str(store), out=str(out), epochs=3, batch_size=4, lr=0.1, lr_step=2, schedule="step",
                warmup_fraction=0.0, head_options={"num_heads": 2}, train_views=3, progress=False,
                holdout_fraction=0.25)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    store = make_store(root / "store")
    result = train(cfg(store.root, root / "run"))
    return root, store, result


def test_training_learns_and_logs(run):
    root, store, result = run
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_top1"] > 1 / 3  # better than chance on separable classes
    assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1, 0.01])  # x0.1 every lr_step epochs
    # no val split: a held-out part of train validates, never the test videos
    assert hist[-1]["val_n"] == 3 and result["val"] == "holdout0.25" and result["selected_on"] == "train"
    rows = list(csv.DictReader((root / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_top1"]) == pytest.approx(hist[-1]["val_top1"])
    assert any((root / "run" / "tb").glob("events.out.tfevents.*"))
    best = max(hist, key=lambda h: h["val_top1"])  # first of the ties
    assert result["best_epoch"] == best["epoch"]


def test_run_json_and_weights_only_checkpoints(run):
    root, store, result = run
    info = json.loads((root / "run" / "run.json").read_text())
    assert info["head"]["name"] == "catnet" and info["head"]["config"]["num_heads"] == 2
    assert info["in_dim"] == 8 and info["classes"] == store.classes
    assert info["store"]["manifest"]["backbone"] == store.manifest["backbone"]
    assert info["train"]["epochs"] == 3 and info["catnet_version"]
    assert info["selected_on"] == "train" and info["selected_on_test"] is False
    assert info["schedule"]["epochs"] == 3 and info["result"]["epochs_run"] == 3
    last = torch.load(root / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and set(last) >= {"model", "optimizer", "scheduler", "rng", "data_generator"}
    best = torch.load(root / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == result["best_epoch"]
    head, _ = load_run(root / "run", which="last")
    for k, v in head.state_dict().items():
        assert torch.equal(v, last["model"][k])
    held = [i for i in store.split("train") if i not in store_splits(store, cfg(store.root, "x")).train]
    again = evaluate(head, store, "train", classes=info["classes"])  # all train videos, hold-out included
    assert again["n"] == len(store.split("train")) and len(held) == result["history"][-1]["val_n"]


def test_refusals_before_work(run, tmp_path):
    root, store, _ = run
    with pytest.raises(CatnetError, match="already holds a run"):
        train(cfg(store.root, root / "run"))
    with pytest.raises(CatnetError, match="training split 'nope' .* is empty"):
        train(cfg(store.root, tmp_path / "a", train_split="nope"))
    with pytest.raises(CatnetError, match="validation split 'val' .* is empty"):
        train(cfg(store.root, tmp_path / "b", val_split="val"))
    with pytest.raises(CatnetError, match="is the training split"):
        train(cfg(store.root, tmp_path / "b", val_split="train"))
    with pytest.raises(CatnetError, match="nothing to resume"):
        train(cfg(store.root, tmp_path / "c", resume=True))
    with pytest.raises(CatnetError, match="resume with settings that differ.*lr"):
        train(cfg(store.root, root / "run", resume=True, lr=0.5))
    wide = make_store(tmp_path / "wide", d=12)
    with pytest.raises(CatnetError, match="does not match the resumed run"):
        train(cfg(wide.root, root / "run", resume=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nan_features_refused_with_video_id(tmp_path):
    store = make_store(tmp_path / "s", nan_video=2)
    with pytest.raises(CatnetError, match=r"non-finite .*video000002"):
        train(cfg(store.root, tmp_path / "r", epochs=1))


def test_store_without_splits_gets_a_deterministic_holdout(tmp_path):
    store = make_store(tmp_path / "s", n=30, splits=False)
    c = cfg(store.root, tmp_path / "r", holdout_fraction=0.2)
    plan = store_splits(store, c)
    tr, val, name = plan.train, plan.val, plan.val_name
    assert name == "holdout0.2" and store_splits(store, c) == plan
    assert sorted(tr + val) == list(range(30)) and not set(tr) & set(val)
    assert sorted(store.labels[val].tolist()) == [0, 0, 1, 1, 2, 2]  # 20% of each class
    assert store_splits(store, cfg(store.root, "x", val_split="none")).val == []


def test_presets_and_cli_overrides(tmp_path, capsys):
    from catnet.config import from_dict, load_yaml

    for name in ("kinetics400", "ucf101", "hmdb51"):  # every preset is a valid TrainConfig
        from_dict(TrainConfig, load_yaml(CONFIGS / f"{name}.yaml"))
    k400 = load_yaml(CONFIGS / "kinetics400.yaml")
    assert (k400["epochs"], k400["lr"], k400["lr_step"], k400["batch_size"], k400["momentum"]) == (
        90, 0.01, 30, 64, 0.9)
    store = make_store(tmp_path / "s", n=12)
    code = cli(["train", str(store.root), "--out", str(tmp_path / "r"),
                "--config", str(CONFIGS / "ucf101.yaml"), "--epochs", "1", "--batch-size", "4",
                "--head", "catnet", "--head-opt", "num_heads=3",
                "--head-opt", "aggregation=sum", "--dropout", "0.1", "--no-progress", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 1
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    ucf = load_yaml(CONFIGS / "ucf101.yaml")
    assert info["train"]["lr"] == ucf["lr"] and info["train"]["epochs"] == 1
    conf = info["head"]["config"]
    assert (conf["num_heads"], conf["aggregation"], conf["dropout"]) == (3, "sum", 0.1)
    assert cli(["train", str(store.root), "--out", str(tmp_path / "q"), "--head-opt", "bogus"]) == 2


def test_transfer_copies_all_but_classifier(run, tmp_path):
    root, _, _ = run
    small = make_store(tmp_path / "ucf", n=10, num_classes=5, seed=3)
    out = tmp_path / "ft"
    train(cfg(small.root, out, epochs=1, lr=1e-9, momentum=0.0, weight_decay=0.0, head_options={},
              init_from=str(root / "run")))
    assert json.loads((out / "run.json").read_text())["standardized_on"] == "init_from"
    src, _ = load_run(root / "run", which="best")
    dst, info = load_run(out, which="last")
    assert info["init_from"]["run"] == str(root / "run") and dst.config.num_classes == 5
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    copied = [k for k in src_sd if not k.startswith("classifier.")]
    assert copied
    for k in copied:  # lr ~ 0: one epoch leaves the copied weights where they started
        torch.testing.assert_close(dst_sd[k], src_sd[k], rtol=0, atol=1e-6)
    assert dst_sd["classifier.weight"].shape == (5, src_sd["classifier.weight"].shape[1])
    fresh, _ = transfer_head(root / "run", num_classes=3, in_dim=8)  # same shape: still not copied
    assert not torch.equal(fresh.classifier.weight, src.classifier.weight)
    assert all(torch.equal(fresh.state_dict()[k], src_sd[k]) for k in copied)
    with pytest.raises(CatnetError, match="8-d"):
        wide = make_store(tmp_path / "wide", n=8, d=12)
        train(cfg(wide.root, tmp_path / "ft2", head_options={}, init_from=str(root / "run")))


def test_resumed_transfer_is_exact_without_its_source_run(run, tmp_path):
    # a resume rebuilds the head from run.json, so the --init-from run is not read again (nor needed)
    root, _, _ = run
    source = tmp_path / "source"
    shutil.copytree(root / "run", source)
    small = make_store(tmp_path / "ucf", n=10, num_classes=5, seed=3)
    whole = train(cfg(small.root, tmp_path / "whole", head_options={}, init_from=str(source)))
    train(cfg(small.root, tmp_path / "cut", epochs=2, head_options={}, init_from=str(source)))
    shutil.rmtree(source)
    resumed = train(cfg(small.root, tmp_path / "cut", head_options={}, init_from=str(source), resume=True))
    strip = [[{k: v for k, v in h.items() if k != "time_s"} for h in r["history"]] for r in (whole, resumed)]
    assert strip[0] == strip[1]
    a, info = load_run(tmp_path / "whole", which="last")
    b, _ = load_run(tmp_path / "cut", which="last")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["init_from"] == info["init_from"]


def test_worker_count_does_not_change_results(tmp_path):
    store = make_store(tmp_path / "s", n=12)
    a = train(cfg(store.root, tmp_path / "w0", epochs=1))
    b = train(cfg(store.root, tmp_path / "w1", epochs=1, num_workers=1))
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in (a["history"][0], b["history"][0])]
    assert strip[0] == strip[1]


def test_head_preset_flag(tmp_path):
    store = make_store(tmp_path / "s", n=12)
    out = tmp_path / "r"
    assert cli(["train", str(store.root), "--out", str(out), "--head-preset",
                str(CONFIGS / "heads" / "catnet_sum.yaml"),
                "--head-opt", "num_heads=2", "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    conf = json.loads((out / "run.json").read_text())["head"]["config"]
    assert (conf["name"], conf["aggregation"], conf["num_heads"]) == ("catnet", "sum", 2)


def test_bf16_autocast_trains_close_to_fp32_and_resumes_exactly(tmp_path):
    store = make_store(tmp_path / "s", n=16)
    fp32 = train(cfg(store.root, tmp_path / "fp32", epochs=2))
    bf16 = train(cfg(store.root, tmp_path / "bf16", epochs=2, amp="bf16"))
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["train"]["amp"] == "bf16"
    # bf16 keeps ~3 digits; the gap grows once the loss has fallen a lot (logits x16, docs/heads.md)
    for a, b, rel in zip(fp32["history"], bf16["history"], (0.05, 0.2), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=rel)
        assert math.isfinite(b["val_loss"])
    # the loss scaler's state (trivial for bf16) travels in the checkpoint; a resumed run is exact
    half = train(cfg(store.root, tmp_path / "half", epochs=1, amp="bf16"))
    assert half["history"][0]["train_loss"] == bf16["history"][0]["train_loss"]
    resumed = train(cfg(store.root, tmp_path / "half", epochs=2, amp="bf16", resume=True))
    last = (resumed["history"][1], bf16["history"][1])
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in last]
    assert strip[0] == strip[1]


def test_fp16_loss_scaling_on_cpu_skips_overflowed_steps_and_trains(tmp_path):
    """fp16's scaler starts at 2**16, so the first steps overflow and must be skipped; torch's fused CPU
    SGD did not skip them (it wrote Inf into the momentum) and every fp16 run diverged."""
    store = make_store(tmp_path / "s", n=16)
    fp32 = train(cfg(store.root, tmp_path / "fp32", epochs=3))
    fp16 = train(cfg(store.root, tmp_path / "fp16", epochs=3, amp="fp16"))
    for h in fp16["history"]:
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
    assert fp16["history"][-1]["train_loss"] < fp16["history"][0]["train_loss"]
    assert fp16["history"][-1]["train_loss"] == pytest.approx(fp32["history"][-1]["train_loss"], rel=0.5)


def test_bad_amp_is_a_one_line_error(tmp_path, capsys):
    store = make_store(tmp_path / "s", n=8)
    assert cli(["train", str(store.root), "--out", str(tmp_path / "r"), "--amp", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown autocast dtype 'fp8'" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_resume_removes_temporaries_a_killed_write_left_in_the_run_folder(tmp_path):
    store = make_store(tmp_path / "s", n=12)
    train(cfg(store.root, tmp_path / "r", epochs=1))
    leftovers = [tmp_path / "r" / ".run.json.k1ll3d.tmp", tmp_path / "r" / "checkpoints" / ".last.pt.x.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    train(cfg(store.root, tmp_path / "r", epochs=2, resume=True))
    assert not any(p.exists() for p in leftovers) and (tmp_path / "r" / "run.json").is_file()


def _recorded_head(tmp_path, name, *argv):
    store = make_store(tmp_path / "s", n=12)
    assert cli(["train", str(store.root), "--out", str(tmp_path / name), "--epochs", "1", "--batch-size", "4",
                "--no-progress", *argv]) == 0
    return json.loads((tmp_path / name / "run.json").read_text())


def test_precedence_defaults_config_head_preset_flags_head_opt(tmp_path):
    """TrainConfig defaults < --config < --head-preset < flags < --head-opt, dropout included."""
    heads = CONFIGS / "heads"
    info = _recorded_head(tmp_path, "a", "--head-preset", str(heads / "catnet.yaml"), "--head", "avgpool")
    assert info["head"]["config"]["name"] == "avgpool" and info["head"]["options"] == {}  # preset's dropped
    assert info["head"]["config"]["dropout"] == 0.0
    info = _recorded_head(tmp_path, "b", "--head", "avgpool", "--dropout", "0.1", "--head-opt", "dropout=0.3")
    assert info["head"]["config"]["dropout"] == 0.3
    info = _recorded_head(tmp_path, "c", "--config", str(CONFIGS / "ucf101.yaml"),
                          "--head-preset", str(heads / "avgpool.yaml"))
    assert info["head"]["config"]["dropout"] == 0.0  # the preset's, not ucf101.yaml's 0.5
    partial = tmp_path / "partial.yaml"
    partial.write_text("epochs: 1\n")  # a user's partial preset: today's defaults for the rest
    info = _recorded_head(tmp_path, "d", "--config", str(partial))
    assert (info["train"]["schedule"], info["train"]["nesterov"], info["train"]["standardize"]) == (
        "cosine", True, True)


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n"])
def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, capsys, text):
    store = make_store(tmp_path / "s", n=8)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert cli(["train", str(store.root), "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
