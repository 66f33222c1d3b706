"""A run SIGKILLed mid-epoch and resumed ends bit-identical to an uninterrupted one (weights and metrics),
with the default recipe and with each optimisation option (catnet.engine.optim)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from catnet.engine.train import TrainConfig, train
from catnet.features import FeatureStore

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 5  # 20 train videos / batch 4

# Trains like the parent test, but SIGKILLs itself on optimiser step `kill_at`: mid-epoch, at an exact,
# reproducible point, with no hook in catnet itself.
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    from catnet.engine.train import TrainConfig, train
    kill_at, calls = int(sys.argv[3]), [0]
    def killing(step):
        def killing_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *a, **k)
        return killing_step
    torch.optim.SGD.step = killing(torch.optim.SGD.step)
    torch.optim.AdamW.step = killing(torch.optim.AdamW.step)
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def make_store(path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 2
    feats = [(centers[i % 3] + rng.standard_normal((2 * int(rng.integers(2, 6)), 8))).astype(np.float32)
             for i in range(27)]
    return FeatureStore.write_synthetic(path, feats, [i % 3 for i in range(27)], ["x", "y", "z"],
                                        splits=["train"] * 20 + ["test"] * 7, num_crops=2, shard_size=6)


def _metrics(run: Path) -> list[dict]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


OPTIONS = {
    # the default recipe: Nesterov SGD, warmup + per-step cosine, standardised features
    "recipe": {},
    # the paper's step schedule with an epoch warmup, AdamW, and every loss / sampling option
    "options": {"schedule": "step", "lr_step": 3, "warmup_epochs": 1.5, "optimizer": "adamw", "lr": 0.01,
                "label_smoothing": 0.1, "class_weights": "balanced", "sampler": "balanced",
                "early_stop": 3, "standardize": False},
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, options):
    store = make_store(tmp_path / "s")
    # dropout, random view subsets, momentum and the schedule all carry state across epochs
    base = TrainConfig(**{**dict(store=str(store.root), out="", epochs=4, batch_size=4, lr=0.05,
                                 train_views=3, head_options={"num_heads": 2, "dropout": 0.5}, seed=7,
                                 val_split="test", progress=False), **options})
    full = train(TrainConfig(**{**asdict(base), "out": str(tmp_path / "full")}))

    killed = TrainConfig(**{**asdict(base), "out": str(tmp_path / "killed")})
    kill_at = 2 * STEPS_PER_EPOCH + 3  # third step of epoch 3
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(asdict(killed)),
                           str(torch.get_num_threads()), str(kill_at)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2  # epochs 1-2 saved, epoch 3 lost mid-way
    assert len(_metrics(tmp_path / "killed")) == 2

    resumed = train(TrainConfig(**{**asdict(killed), "resume": True}))
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in full["history"]]
    assert [{k: v for k, v in h.items() if k != "time_s"} for h in resumed["history"]] == strip
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "full")
    assert resumed["best_epoch"] == full["best_epoch"]
    for which in ("last", "best"):
        a = torch.load(tmp_path / "full" / "checkpoints" / f"{which}.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "killed" / "checkpoints" / f"{which}.pt", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)


@pytest.mark.parametrize("warmup", [{"warmup_fraction": 0.3}, {"warmup_epochs": 1.5}],
                         ids=["fraction", "epochs"])
def test_extended_epochs_keep_the_recorded_warmup(tmp_path, warmup):
    """--resume with a larger --epochs continues the run with the warmup it had; with the step schedule
    and a warmup in epochs that is exactly a run started with the longer length."""
    store = make_store(tmp_path / "s")
    base = dict(store=str(store.root), batch_size=4, lr=0.05, schedule="step", lr_step=2, train_views=3,
                head_options={"num_heads": 2}, seed=3, val_split="test", progress=False, **warmup)
    train(TrainConfig(**base, out=str(tmp_path / "short"), epochs=2))
    short = json.loads((tmp_path / "short" / "run.json").read_text())["schedule"]["warmup_steps"]
    resumed = train(TrainConfig(**base, out=str(tmp_path / "short"), epochs=6, resume=True))
    assert json.loads((tmp_path / "short" / "run.json").read_text())["schedule"]["warmup_steps"] == short
    straight = train(TrainConfig(**base, out=str(tmp_path / "long"), epochs=6))
    same = [{k: v for k, v in h.items() if k != "time_s"} for h in resumed["history"]] == \
        [{k: v for k, v in h.items() if k != "time_s"} for h in straight["history"]]
    assert same == ("warmup_epochs" in warmup)  # a fraction of a longer run is a longer warmup
