"""Data parallel under torchrun (2 CPU processes, gloo) and the samplers behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catnet.engine.evaluate import evaluate
from catnet.engine.runs import load_run
from catnet.features import FeatureStore
from catnet.utils.distributed import ShardSampler, TrainSampler

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, world", [(7, 2), (10, 3), (2, 4), (0, 2)])
def test_shard_sampler_neither_duplicates_nor_drops(n, world):
    indices = list(range(100, 100 + n))
    shards = [list(ShardSampler(indices, rank=r, world=world)) for r in range(world)]
    assert sorted(sum(shards, [])) == indices
    assert [len(ShardSampler(indices, rank=r, world=world)) for r in range(world)] == [len(s) for s in shards]


def test_train_sampler_equal_steps_and_shared_order():
    indices = list(range(11))
    orders = [TrainSampler(indices, torch.Generator().manual_seed(3), rank=r, world=2).epoch_order()
              for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == 6  # padded by wrapping: DDP needs equal step counts
    assert set(orders[0]) | set(orders[1]) == set(indices)
    g = torch.Generator().manual_seed(3)
    s = TrainSampler(indices, g)
    assert s.epoch_order() != s.epoch_order()  # a new permutation each epoch


def test_torchrun_two_processes_reduce_eval_exactly(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 2
    n_train, n_test = 14, 7  # 7 eval videos: not divisible by 2 ranks nor by the eval batch of 2
    feats = [(centers[i % 3] + rng.standard_normal((2 * int(rng.integers(1, 5)), 8))).astype(np.float32)
             for i in range(n_train + n_test)]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [i % 3 for i in range(len(feats))],
                                         ["a", "b", "c"], splits=["train"] * n_train + ["test"] * n_test,
                                         num_crops=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "catnet", "train", str(store.root), "--out", str(tmp_path / "run"), "--epochs", "2",
           "--batch-size", "4", "--eval-batch-size", "2", "--lr", "0.1", "--train-views", "3",
           "--val-split", "test",
           "--head-opt", "num_heads=2", "--no-progress", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert summary["world_size"] == 2
    final = summary["final"]
    assert final["val_n"] == n_test

    # the 2-process evaluation of the final weights equals a 1-process evaluation of them
    head, info = load_run(tmp_path / "run", which="last")
    assert info["world_size"] == 2
    single = evaluate(head, store, "test", classes=info["classes"], batch_size=3)
    assert single["n"] == n_test
    for k in ("top1", "top5", "mean_class_acc"):
        assert final[f"val_{k}"] == single[k]
    assert final["val_loss"] == pytest.approx(single["loss"], rel=1e-5)
    rngs = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # per-rank RNG kept

    # `catnet eval` under torchrun: same confusion matrix as in one process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "catnet", "eval", str(tmp_path / "run"), "--store", str(store.root), "--which", "last",
           "--batch-size", "2", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_eval = json.loads(proc.stdout)
    assert ddp_eval["n"] == n_test and ddp_eval["confusion"] == single["confusion"]
    assert ddp_eval["per_class_acc"] == single["per_class_acc"] and ddp_eval["checkpoint"] == "last"
    saved = json.loads((tmp_path / "run" / "eval-last" / "s" / "test" / "metrics.json").read_text())
    assert saved["confusion"] == single["confusion"]


def test_torchrun_resume_is_exact(tmp_path):
    """Two processes: 3 epochs straight == 2 epochs, then --resume to 3 (weights and metrics)."""
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 8)) * 2
    feats = [(centers[i % 3] + rng.standard_normal((2 * int(rng.integers(1, 5)), 8))).astype(np.float32)
             for i in range(18)]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [i % 3 for i in range(18)], ["a", "b", "c"],
                                         splits=["train"] * 13 + ["test"] * 5, num_crops=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(out, epochs, *extra):
        # dropout (per-rank RNG), view subsets, momentum and an lr step all carry state across epochs
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "catnet", "train", str(store.root), "--out", str(out), "--epochs", str(epochs),
               "--batch-size", "4", "--lr", "0.1", "--schedule", "step", "--lr-step", "2",
               "--train-views", "3",
               "--head-opt", "num_heads=2", "--dropout", "0.5", "--seed", "5", "--no-progress", "--json",
               *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "full", 3)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 3, "--resume")
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)
            for r in ("full", "split"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = [[{k: v for k, v in h.items() if k != "time_s"} for h in c["history"]] for c in (a, b)]
    assert strip[0] == strip[1] and len(strip[0]) == 3


def test_torchrun_class_weighted_loss_is_the_global_batchs(tmp_path):
    """With --class-weights balanced each rank's own weighted mean would weigh only its half of the batch;
    two processes must train as one does on the same global batches (no dropout, all views)."""
    labels = [0, 0, 0, 0, 0, 0, 1, 2] * 2 + [0, 1, 2]  # imbalanced: 12 / 2 / 2 training videos
    rng = np.random.default_rng(0)
    feats = [(rng.standard_normal((4, 8)) + label).astype(np.float32) for label in labels]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, labels, ["a", "b", "c"],
                                         splits=["train"] * 16 + ["test"] * 3, num_crops=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(out, *launcher):
        cmd = [sys.executable, *launcher, "-m", "catnet", "train", str(store.root), "--out", str(out),
               "--epochs", "1", "--batch-size", "8", "--lr", "0.5", "--train-views", "8", "--dropout", "0",
               "--head-opt", "num_heads=2", "--val-split", "none", "--warmup-fraction", "0",
               "--class-weights", "balanced", "--no-progress"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]

    one = run(tmp_path / "one")
    two = run(tmp_path / "two", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-5, msg=k)


def _broadcast_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    from catnet.utils.distributed import broadcast_buffers

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank + 1))  # each rank's last training step moved its own statistics
    broadcast_buffers(bn)
    torch.save(bn.running_mean, f"{out}.{rank}")
    td.destroy_process_group()


def test_broadcast_buffers_gives_every_rank_rank0s_batchnorm_statistics(tmp_path):
    """What a fine-tuning run's DDP validation does first: all ranks score with the saved statistics."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "mean")
    mp.spawn(_broadcast_worker, args=(f"file://{tmp_path / 'init'}", out), nprocs=2)
    for rank in (0, 1):
        assert torch.load(f"{out}.{rank}").tolist() == [1.0, 1.0, 1.0]


def _loss_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    from catnet.engine.finetune import IGNORE, BackboneJob
    from catnet.engine.optim import Criterion

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    logits = torch.randn(4, 3)  # a global batch of 4 clips, 2 per rank
    y = torch.tensor([0, 1, 2, IGNORE])  # rank 1's second video failed to decode
    mine = slice(2 * rank, 2 * rank + 2)
    _, loss_sum, _, n = BackboneJob.loss(None, lambda x: x, (logits[mine], y[mine]), "cpu",
                                         Criterion(world_size=2))
    total = torch.stack([loss_sum.double(), n.double()])
    td.all_reduce(total)  # what the loop does with every rank's statistics
    torch.save(total, f"{out}.{rank}")
    td.destroy_process_group()


def test_a_fine_tunes_logged_loss_under_ddp_is_the_batch_mean_with_failed_clips(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "loss")
    mp.spawn(_loss_worker, args=(f"file://{tmp_path / 'init'}", out), nprocs=2)
    total = torch.load(f"{out}.0")
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, -100]), ignore_index=-100)
    assert float(total[0] / total[1]) == pytest.approx(float(want), rel=1e-6)
