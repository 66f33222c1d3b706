"""Metrics vs hand counts, evaluating runs on stores, label maps, the 3-split protocol, predict_store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catnet.cli import main as cli
from catnet.engine.evaluate import EVAL_FOLDERS, evaluate, evaluate_splits, predict_store
from catnet.engine.metrics import (
    MetricAccumulator,
    confusion_matrix,
    mean_class_accuracy,
    per_class_accuracy,
    topk_correct,
)
from catnet.engine.runs import load_run
from catnet.engine.train import TrainConfig, train
from catnet.errors import CatnetError
from catnet.features import FeatureStore
from catnet.features.loader import HintedBatches, ReadAhead, nonfinite_ids, pad_collate
from catnet.heads import build_head


def make_store(path, n_train=12, n_test=7, d=8, classes=("a", "b", "c"), seed=0, order=None):
    """Class-separable clip features with 1-4 clips x 2 crops per video; `order` permutes the class list."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(classes), d)) * 3
    feats, labels, splits = [], [], []
    for i in range(n_train + n_test):
        y = i % len(classes)
        feats.append((centers[y] + rng.standard_normal((2 * int(rng.integers(1, 5)), d))).astype(np.float32))
        labels.append(y)
        splits.append("train" if i < n_train else "test")
    names = list(classes)
    if order is not None:  # same videos, class list stored in another order
        names = [classes[j] for j in order]
        labels = [order.index(y) for y in labels]
    return FeatureStore.write_synthetic(path, feats, labels, names, splits=splits, num_crops=2, shard_size=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    store = make_store(root / "store")
    train(TrainConfig(store=str(store.root), out=str(root / "run"), epochs=2, batch_size=4, lr=0.05,
                      head_options={"num_heads": 2}, train_views=3, progress=False))
    return root, store


def test_metrics_match_hand_counts():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5, 1, 0, 0, 0], [0, 1, 5, 0, 0, 0],
                           [3, 2, 1, 0, 0, 4.0]])
    y = torch.tensor([0, 2, 2, 1])
    # row 1: true 2 predicted 1 (2nd best); row 3: true 1 ranked 3rd
    assert topk_correct(logits, y, (1, 2, 5)) == [2, 3, 4]
    cm = confusion_matrix(logits.argmax(1), y, 6).numpy()
    assert cm[0, 0] == 1 and cm[2, 1] == 1 and cm[2, 2] == 1 and cm[1, 5] == 1 and cm.sum() == 4
    accs = per_class_accuracy(cm)
    assert accs[:3] == [1.0, 0.0, 0.5] and accs[3:] == [None, None, None]
    assert mean_class_accuracy(cm) == pytest.approx(0.5)
    acc = MetricAccumulator(6)
    acc.update(logits[:3], y[:3], loss_sum=3.0)
    acc.update(logits[3:], y[3:], loss_sum=1.0)
    out = acc.compute()
    assert out["n"] == 4 and out["top1"] == 0.5 and out["top5"] == 1.0 and out["loss"] == 1.0
    assert np.array_equal(out["confusion"], cm)


def test_topk_caps_k_at_num_classes():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_correct(logits, torch.tensor([0, 0]), (1, 5)) == [1, 2]


def test_pad_collate_masks_padding():
    batch = pad_collate([(np.ones((2, 3), np.float32), 1, 7), (np.full((4, 3), 2, np.float32), 0, 3)])
    assert batch["x"].shape == (2, 4, 3)
    assert batch["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["x"][0, 2:].abs().sum() == 0 and batch["index"].tolist() == [7, 3]


def test_pad_collate_same_length_widens_float16():
    feats = [np.full((3, 2), i, np.float16) for i in range(4)]
    batch = pad_collate([(f, i, 10 + i) for i, f in enumerate(feats)])
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (4, 3, 2)
    assert batch["mask"].all() and batch["x"][:, 0, 0].tolist() == [0, 1, 2, 3]


def test_read_ahead_keeps_order_and_raises_in_the_consumer():
    import threading

    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(10)), batch_size=3)
    ra = ReadAhead(loader, depth=2)
    assert len(ra) == 4
    assert [b.tolist() for b in ra] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]

    class Bad:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 3:
                raise CatnetError("corrupt feature shard x")
            return i

    seen = []
    with pytest.raises(CatnetError, match="corrupt feature shard"):
        for b in ReadAhead(DataLoader(Bad(), batch_size=1)):
            seen.append(int(b))
    assert seen == [0, 1, 2]
    # leaving early (a failed step, a break) stops the reader instead of leaving it blocked
    for _ in ReadAhead(DataLoader(list(range(1000)), batch_size=1), depth=1):
        break
    assert not any(t.name == "catnet-readahead" for t in threading.enumerate())


def test_hinted_batches_name_each_batch_once_before_it_is_read():
    class Store:
        hinted: list = []

        def will_need(self, idx):
            self.hinted.append(list(idx))

    store = Store()
    sampler = HintedBatches([5, 3, 9, 1, 7, 0, 2], batch_size=2, store=store, ahead=2)
    assert len(sampler) == 4
    seen = []
    for batch in sampler:
        assert batch in store.hinted  # hinted no later than handed out
        seen.append(batch)
        assert len(store.hinted) == min(len(seen) + 2, 4)  # and at most `ahead` batches early
    assert seen == store.hinted == [[5, 3], [9, 1], [7, 0], [2]]


def test_batch_nonfinite_check_names_the_videos(tmp_path):
    store = FeatureStore.write_synthetic(tmp_path / "s", [np.ones((2, 3), np.float32)] * 5, [0] * 5, ["a"])
    x = torch.full((5, 2, 3), 65504.0)  # float16's largest: finite videos must stay finite when summed
    x[1, 0, 0] = float("nan")
    x[2, 1, 2] = float("inf")
    x[3, 0, 1], x[3, 1, 1] = float("inf"), float("-inf")
    batch = {"x": x, "index": torch.arange(5)}
    assert nonfinite_ids(batch, store) == [store.ids[i] for i in (1, 2, 3)]


def test_evaluate_matches_manual_loop(trained):
    root, store = trained
    head, info = load_run(root / "run")
    res = evaluate(head, store, "test", classes=info["classes"], batch_size=3)
    test = store.split("test")
    correct = 0
    with torch.no_grad():
        for i in test:
            v = store[i]
            correct += int(head(torch.from_numpy(v.features)[None]).argmax() == v.label)
    assert res["n"] == len(test) == 7
    assert res["top1"] == correct / len(test)
    assert np.asarray(res["confusion"]).sum() == 7 and res["split"] == "test"


def test_class_order_is_mapped_by_name_and_foreign_classes_refused(trained, tmp_path):
    root, store = trained
    head, info = load_run(root / "run")
    base = evaluate(head, store, "test", classes=info["classes"])
    permuted = make_store(tmp_path / "perm", order=[2, 0, 1])
    assert permuted.classes != store.classes
    again = evaluate(head, permuted, "test", classes=info["classes"])
    for k in ("n", "top1", "top5", "mean_class_acc", "confusion"):
        assert again[k] == base[k]
    foreign = make_store(tmp_path / "foreign", classes=("a", "b", "zebra"))
    with pytest.raises(CatnetError, match="zebra"):
        evaluate(head, foreign, "test", classes=info["classes"])


def test_eval_refuses_empty_split_and_wrong_dim(trained, tmp_path):
    root, store = trained
    head, info = load_run(root / "run")
    with pytest.raises(CatnetError, match="'val' .* is empty"):
        evaluate(head, store, "val", classes=info["classes"])
    wide = make_store(tmp_path / "wide", d=12)
    with pytest.raises(CatnetError, match="12-d features"):
        evaluate(head, wide, "test", classes=info["classes"])


def test_eval_of_the_last_checkpoint_does_not_overwrite_the_best_ones(trained, capsys):
    root, store = trained
    for which in ("best", "last"):
        assert cli(["eval", str(root / "run"), "--store", str(store.root), "--which", which, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert Path(out["saved_to"]) == root / "run" / EVAL_FOLDERS[which] / "store" / "test"
    for which in ("best", "last"):
        saved = root / "run" / EVAL_FOLDERS[which] / "store" / "test" / "metrics.json"
        assert json.loads(saved.read_text())["checkpoint"] == which


def test_eval_cli_writes_files_and_json(trained, capsys):
    root, store = trained
    assert cli(["eval", str(root / "run"), "--store", str(store.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    folder = root / "run" / "eval" / "store" / "test"
    saved = json.loads((folder / "metrics.json").read_text())
    assert out["top1"] == saved["top1"] and out["n"] == 7
    per_class = (folder / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,accuracy,support" and len(per_class) == 4
    confusion = (folder / "confusion.csv").read_text().splitlines()
    assert sum(int(x) for line in confusion[1:] for x in line.split(",")[1:]) == 7


def test_three_split_protocol_mean_std(trained, tmp_path):
    root, store = trained
    runs, stores = [], []
    for s in range(3):
        st = make_store(tmp_path / f"split{s}", seed=s)
        train(TrainConfig(store=str(st.root), out=str(tmp_path / f"run{s}"), epochs=1, batch_size=4,
                          head="avgpool", seed=s, progress=False))
        runs.append(tmp_path / f"run{s}")
        stores.append(st.root)
    out = evaluate_splits(runs, stores)
    top1 = [r["top1"] for r in out["splits"]]
    assert out["summary"]["top1"]["mean"] == pytest.approx(np.mean(top1))
    assert out["summary"]["top1"]["std"] == pytest.approx(np.std(top1))
    assert [r["store"] for r in out["splits"]] == [str(s) for s in stores]
    with pytest.raises(CatnetError, match="3 runs but 2 stores"):
        evaluate_splits(runs, stores[:2])


def test_predict_store_probabilities_and_attention(tmp_path):
    store = make_store(tmp_path / "s")
    head = build_head("catnet", 8, 3, num_heads=2).eval()
    pred = predict_store(head, store, [4, 0, 9], batch_size=2)
    assert pred.ids == [store.ids[i] for i in (4, 0, 9)]
    assert pred.probs.shape == (3, 3) and np.allclose(pred.probs.sum(1), 1, atol=1e-5)
    for a, i in zip(pred.alpha, (4, 0, 9), strict=True):
        assert a.shape == (2, store[i].features.shape[0])  # padding trimmed: (N, V_i)
        assert np.allclose(a.sum(1), 1, atol=1e-5)
    assert pred.beta.shape == (3, 2)
    assert predict_store(build_head("lstm", 8, 3), store, [0]).alpha is None
