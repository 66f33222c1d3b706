"""The one split rule (catnet.engine.splits): the test split never selects unless asked, groups never
straddle train and validation (nor k folds), and what a run selected on is recorded and reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catnet.cli import main
from catnet.engine.splits import group_kfold, holdout, plan_splits, resolve_split, selection_note
from catnet.engine.train import TrainConfig, train
from catnet.errors import CatnetError
from catnet.features import FeatureStore
from catnet.features.inspect import summarize


def plan(splits, labels, groups=None, **kw):
    n = len(splits)
    args = dict(train_split="train", val_split=None, holdout_fraction=0.2, where="test data")
    return plan_splits(splits, [f"v{i}" for i in range(n)], np.asarray(labels), groups=groups,
                       **{**args, **kw})


@st.composite
def groupings(draw):
    """Items with labels and random groups; some groups span classes, some items have no group."""
    n = draw(st.integers(2, 60))
    labels = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    groups = draw(st.lists(st.sampled_from(["", "a", "b", "c", "d", "e", "f", "g", "h"]), min_size=n,
                           max_size=n))
    fraction = draw(st.floats(0.05, 0.9))
    return labels, groups, fraction


@settings(max_examples=300, deadline=None)
@given(groupings())
def test_a_group_never_straddles_train_and_validation(data):
    labels, groups, fraction = data
    p = plan(["train"] * len(labels), labels, groups, holdout_fraction=fraction)
    side = {}
    for i in p.train + p.val:
        key = groups[i] or f"own{i}"
        assert side.setdefault(key, i in p.val) == (i in p.val), f"group {key!r} on both sides"
    assert sorted(p.train + p.val) == list(range(len(labels)))
    # validation never takes a class's last training group
    assert {labels[i] for i in p.train} == set(labels)
    assert p.val_name == ("none" if not p.val else f"holdout{fraction:g}")


@settings(max_examples=200, deadline=None)
@given(groupings(), st.integers(2, 5))
def test_k_folds_keep_every_group_in_one_fold(data, k):
    labels, groups, _ = data
    ids = [f"v{i}" for i in range(len(labels))]
    distinct = len({g or f"own{i}" for i, g in enumerate(groups)})
    if distinct < k:
        with pytest.raises(CatnetError, match="cannot fill"):
            group_kfold(np.asarray(labels), k, ids, groups)
        return
    folds = group_kfold(np.asarray(labels), k, ids, groups)
    assert sorted(i for f in folds for i in f) == list(range(len(labels))) and all(folds)
    fold_of = {}
    for f, members in enumerate(folds):
        for i in members:
            assert fold_of.setdefault(groups[i] or f"own{i}", f) == f
    assert group_kfold(np.asarray(labels), k, ids, groups) == folds  # deterministic


def test_without_groups_the_holdout_is_catnet_0_1s():
    labels = np.repeat([0, 1, 2], 10)
    ids = [f"video{i:06d}" for i in range(30)]
    held = holdout(ids, labels, 0.2)
    assert sum(held) == 6 and sorted(labels[np.flatnonzero(held)].tolist()) == [0, 0, 1, 1, 2, 2]
    assert holdout(ids, labels, 0.2, groups=[""] * 30) == held


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 25), min_size=1, max_size=5), st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5]))
def test_each_class_holds_out_the_rounded_down_fraction_of_its_groups(sizes, fraction):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    ids = [f"v{i}" for i in range(len(labels))]
    held = np.asarray(holdout(ids, labels, fraction))
    for c, n in enumerate(sizes):
        assert held[labels == c].sum() == int(round(fraction * n * 1000)) // 1000  # floor, exactly
    old = np.asarray(holdout(ids, labels, fraction, rule="at_least_one"))  # catnet 0.3's rule
    for c, n in enumerate(sizes):
        assert old[labels == c].sum() == (max(1, round(fraction * n)) if n > 1 else 0)


def test_too_few_groups_per_class_train_on_all_of_them():
    labels = np.repeat([0, 1], 9)  # 9 videos per class: a tenth of each rounds down to none
    p = plan(["train"] * 18, labels, holdout_fraction=0.1)
    assert p.val == [] and p.val_name == "none" and len(p.train) == 18
    assert "no class has the 10 groups" in p.note and "--holdout-fraction" in p.note
    p = plan(["train"] * 20, np.repeat([0, 1], 10), holdout_fraction=0.1)
    assert len(p.val) == 2 and p.val_name == "holdout0.1"
    with pytest.raises(CatnetError, match="unknown hold-out rule"):
        holdout(["a", "b"], np.array([0, 0]), 0.5, rule="round")


def test_runs_recorded_before_the_rule_resume_with_their_own_hold_out(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((3, 6)).astype(np.float32) + (i % 2) * 2 for i in range(16)]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [i % 2 for i in range(16)], ["a", "b"],
                                         splits=["train"] * 12 + ["test"] * 4)
    train(quick(store.root, tmp_path / "r", holdout_rule="at_least_one"))  # 6 per class: 1 held out each
    run_json = tmp_path / "r" / "run.json"
    info = json.loads(run_json.read_text())
    assert info["splits"]["num_val"] == 2
    del info["train"]["holdout_rule"]  # as catnet 0.3 wrote it
    run_json.write_text(json.dumps(info))
    assert main(["train", str(store.root), "--out", str(tmp_path / "r"), "--resume", "--epochs", "3",
                 "--no-progress"]) == 0
    info = json.loads(run_json.read_text())
    assert info["train"]["holdout_rule"] == "at_least_one" and info["splits"]["num_val"] == 2
    fresh = train(quick(store.root, tmp_path / "new"))  # today's rule: 6 per class hold out none
    assert fresh["val"] == "none"


def test_test_split_selects_nothing_unless_asked():
    splits = ["train"] * 8 + ["test"] * 4
    labels = [0, 1] * 6
    p = plan(splits, labels, holdout_fraction=0.5)  # no val split: a hold-out of train, never test videos
    assert p.val and not set(p.val) & set(range(8, 12)) and p.selected_on == "train"
    p = plan(splits + ["val", "val"], labels + [0, 1])
    assert p.val == [12, 13] and p.selected_on == "val" and len(p.train) == 8
    p = plan(splits, labels, val_split="test")  # asked: allowed, and recorded
    assert p.val == list(range(8, 12)) and p.selected_on == "test"
    p = plan(["train", "train", "test"], [0, 1, 0])  # one video per class: nothing to hold out
    assert p.val == [] and p.val_name == "none" and "without validation" in p.note


def make_store(path, groups=None):
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((3, 6)).astype(np.float32) + (i % 2) * 2 for i in range(20)]
    return FeatureStore.write_synthetic(path, feats, [i % 2 for i in range(20)], ["a", "b"],
                                        splits=["train"] * 16 + ["test"] * 4, groups=groups)


def quick(store, out, **kw):
    return TrainConfig(store=str(store), out=str(out), epochs=2, batch_size=4, head="avgpool",
                       progress=False, **kw)


def test_store_groups_reach_the_split(tmp_path):
    groups = [f"src{i // 4}" for i in range(20)]  # 4 clips per source video
    store = make_store(tmp_path / "s", groups)
    result = train(quick(store.root, tmp_path / "r", holdout_fraction=0.5))
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["selected_on"] == "train" and info["selected_on_test"] is False
    val = info["splits"]["num_val"]
    assert val % 4 == 0 and val > 0 and result["history"][0]["val_n"] == val  # whole sources only


def test_eval_marks_numbers_selected_on_the_split_they_measure(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    train(quick(store.root, tmp_path / "held"))
    train(quick(store.root, tmp_path / "ontest", val_split="test"))
    assert json.loads((tmp_path / "ontest" / "run.json").read_text())["selected_on_test"] is True
    for run, which, marked in (("held", "best", False), ("ontest", "last", False), ("ontest", "best", True)):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / run), "--store", str(store.root), "--which", which,
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["split"] == "test" and out["selected_on_measured_split"] is marked
        assert (out["note"] is not None) is marked
    assert main(["eval", str(tmp_path / "ontest"), "--store", str(store.root)]) == 0
    assert "note: ontest: selected on 'test'" in capsys.readouterr().out


def test_legacy_runs_validated_on_test_are_marked():
    info = {"splits": {"train": "train", "val": "test"}, "train": {}}  # catnet <= 0.2: val defaulted to test
    assert "selected on 'test'" in selection_note(info, "best", "test")
    assert selection_note(info, "last", "test") is None
    assert selection_note({**info, "train": {"early_stop": 3}}, "last", "test") is not None
    assert selection_note({"splits": {"val": "none"}}, "best", "test") is None


def test_inspect_counts_groups_per_split_as_training_does(tmp_path, capsys):
    """A video without a group is its own group (as the hold-out treats it), and a split of only such
    videos is still listed."""
    feats = [np.ones((2, 4), np.float32)] * 6
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [0, 1, 0, 1, 0, 1], ["a", "b"],
                                         splits=["train"] * 4 + ["val"] * 2,
                                         groups=["g1", "g1", "g2", "", "", ""])
    groups = summarize(store)["groups"]
    assert groups["per_split"] == {"train": 3, "val": 2} and groups["ungrouped"] == {"train": 1, "val": 2}
    assert groups["in_several_splits"] == 0
    assert main(["inspect", str(store.root)]) == 0
    assert "train: 3 (1 without a group), val: 2 (2 without a group)" in capsys.readouterr().out


def test_evaluation_falls_back_test_then_val_then_a_store_without_split_names(tmp_path):
    def store(name, splits):
        feats = [np.ones((2, 4), np.float32)] * len(splits)
        return FeatureStore.write_synthetic(tmp_path / name, feats, [i % 2 for i in range(len(splits))],
                                            ["a", "b"], splits=splits)

    assert resolve_split(store("tv", ["train", "val", "val"]), None) == ("val", [1, 2])
    assert resolve_split(store("none", ["", "", ""]), None) == ("", [0, 1, 2])
    with pytest.raises(CatnetError, match="splits present: train"):
        resolve_split(store("train_only", ["train", "train"]), None)
    with pytest.raises(CatnetError, match="--split '' takes all its videos"):
        resolve_split(store("none2", ["", ""]), "test")
