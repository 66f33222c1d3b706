"""Bad stores and configs: refused with one clear line *before any work starts* (no run folder written,
no optimiser step taken). Complements tests/test_train.py and tests/test_evaluate.py, which cover the
empty-split, foreign-class and wrong-dim refusals of a well-formed store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_train import cfg, make_store

from catnet.cli import main
from catnet.errors import CatnetError
from catnet.evaluate import evaluate
from catnet.features import FeatureStore
from catnet.train import load_run, train


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_steps(monkeypatch):
    """Fails the test if training takes a single optimiser step."""
    def step(*a, **k):
        raise AssertionError("an optimiser step ran before the bad input was refused")

    monkeypatch.setattr(torch.optim.SGD, "step", step)


def _poison(store: FeatureStore, video_id: str, value: float) -> None:
    """Overwrite one value of one video in its shard (as bit rot or a buggy writer would)."""
    shard = next(p for p in store.shards if video_id in {r["id"] for r in json.loads(
        __import__("safetensors").safe_open(str(p), "numpy").metadata()["videos"])})
    from safetensors import safe_open

    with safe_open(str(shard), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    row = [r["id"] for r in json.loads(meta["videos"])].index(video_id)
    tensors["features"][int(tensors["offsets"][row]) + 1, 3] = value
    save_file(tensors, str(shard), metadata=meta)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("split", ["train", "test"])
def test_nonfinite_features_refused_before_training(tmp_path, no_steps, value, split):
    store = make_store(tmp_path / "s")
    bad = store.ids[store.split(split)[-1]]  # the last video: met only at the end of an epoch
    _poison(store, bad, value)
    with pytest.raises(CatnetError, match=rf"non-finite .*{bad}"):
        train(cfg(store.root, tmp_path / "run", epochs=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonfinite_features_refused_before_evaluating(tmp_path):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    bad = store.ids[store.split("test")[0]]
    _poison(store, bad, np.nan)
    head, info = load_run(tmp_path / "run")
    with pytest.raises(CatnetError, match=rf"non-finite .*{bad}"):
        evaluate(FeatureStore(store.root) and head, FeatureStore(store.root), "test", classes=info["classes"])


def test_fp16_overflow_is_caught_when_writing_the_store(tmp_path):
    feats = [np.ones((2, 4), np.float32), np.full((2, 4), 1e6, np.float32)]  # 1e6 is inf in fp16
    with pytest.raises(CatnetError, match="non-finite"):
        FeatureStore.write_synthetic(tmp_path / "s", feats, [0, 1], ["a", "b"])


def test_shard_with_another_feature_width_is_refused_up_front(tmp_path, no_steps):
    store = make_store(tmp_path / "s")
    shard = store.shards[-1]
    from safetensors import safe_open

    with safe_open(str(shard), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    tensors["features"] = np.zeros((tensors["features"].shape[0], 5), np.float16)  # store says 8
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(CatnetError, match=r"5-d features.*8"):
        train(cfg(store.root, tmp_path / "run", epochs=1))
    with pytest.raises(CatnetError, match=r"5-d features.*8"):
        len(FeatureStore(store.root))


def test_label_outside_the_class_list_is_refused(tmp_path, no_steps):
    feats = [np.ones((2, 4), np.float32) * i for i in range(6)]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [0, 1, 2, 0, 1, 7], ["a", "b", "c"],
                                         splits=["train"] * 4 + ["test"] * 2)
    with pytest.raises(CatnetError, match="without a valid label.*video000005"):
        train(cfg(store.root, tmp_path / "run", epochs=1))


def test_store_and_checkpoint_label_maps_disagree(tmp_path, no_steps):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    renamed = make_store(tmp_path / "renamed")
    manifest = json.loads((renamed.root / "manifest.json").read_text())
    manifest["classes"] = ["class0", "class1", "zebra"]
    (renamed.root / "manifest.json").write_text(json.dumps(manifest))
    # eval: the run knows no 'zebra'; resume: the classes changed under the run
    assert main(["eval", str(tmp_path / "run"), "--store", str(renamed.root)]) == 2
    with pytest.raises(CatnetError, match="does not match the resumed run"):
        train(cfg(renamed.root, tmp_path / "run", epochs=2, resume=True))
    # the same names in another order are not a disagreement: labels are mapped by name
    shuffled = make_store(tmp_path / "shuffled")
    manifest = json.loads((shuffled.root / "manifest.json").read_text())
    manifest["classes"] = ["class1", "class0", "class2"]
    (shuffled.root / "manifest.json").write_text(json.dumps(manifest))
    head, info = load_run(tmp_path / "run")
    assert evaluate(head, shuffled.root, "test", classes=info["classes"])["n"] == len(shuffled.split("test"))


def test_empty_store_is_refused_by_train_and_eval(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((store.root / "manifest.json").read_text())
    capsys.readouterr()
    assert main(["train", str(empty), "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert main(["eval", str(tmp_path / "run"), "--store", str(empty)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(": error: " in line for line in err), err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("text, match", [
    ("epochs: ten\n", "epochs.*integer"),
    ("epochz: 10\n", "unknown TrainConfig key"),
    ("- a\n- b\n", "mapping"),
    ("epochs: [1\n", "invalid YAML"),
    ("lr: -1\n", "lr must be > 0"),
])
def test_bad_config_files_are_refused(tmp_path, capsys, text, match):
    store = make_store(tmp_path / "s")
    (tmp_path / "c.yaml").write_text(text)
    capsys.readouterr()
    code = main(["train", str(store.root), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "run").exists()
