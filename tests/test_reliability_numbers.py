"""Issue 18: numbers that are not numbers. Non-finite or absurd option values are refused with one line,
a diverging run stops with one line instead of saving NaN weights, and --json output is always JSON."""

from __future__ import annotations

import json
import math

import pytest
from test_train import make_store

from catnet.cli import main
from catnet.utils.io import finite_json, to_json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("numbers") / "store")


def _train(store, out, *flags):
    return main(["train", str(store.root), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                 "--head-opt", "num_heads=2", "--no-progress", *flags])


@pytest.mark.parametrize("flags, match", [
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"), (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--momentum", "inf"], "--momentum must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--dropout", "1.5"], "--dropout must be < 1"), (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", str(2**64)], "--seed must be <"), (["--num-workers", "100000"], "--num-workers must be <="),
    (["--holdout-fraction", "inf"], "--holdout-fraction must be a finite number"),
])
def test_bad_numbers_are_refused_before_any_work(store, tmp_path, capfd, flags, match):
    assert _train(store, tmp_path / "run", *flags) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "run").exists()


def test_yaml_infinity_is_refused(store, tmp_path, capfd):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: .inf\n")
    assert _train(store, tmp_path / "run", "--config", str(preset)) == 2
    assert "lr must be a finite number" in capfd.readouterr().err


def test_a_diverging_run_stops_with_one_line_and_saves_no_nan(store, tmp_path, capfd):
    assert _train(store, tmp_path / "run", "--lr", "1e308", "--json") == 2
    cap = capfd.readouterr()
    lines = [ln for ln in cap.err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "non-finite" in lines[0] and cap.out == ""
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_json_output_never_holds_nan(store, tmp_path, capfd):
    # a run without validation reports NaN-free JSON (no val metrics are null, not NaN)
    assert _train(store, tmp_path / "run", "--val-split", "none", "--json", "--epochs", "1") == 0
    json.loads(capfd.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert finite_json({"a": [math.nan, 1.0, {"b": math.inf}]}) == {"a": [None, 1.0, {"b": None}]}
    assert to_json(float("-inf")) == "null"


BOMB = """a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


@pytest.mark.parametrize("key", ["train_split", "val_split"])
def test_yaml_alias_bombs_are_refused_at_once(store, tmp_path, capfd, key):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(BOMB.replace("a: &a", f"{key}: &a"))
    assert _train(store, tmp_path / "run", "--config", str(preset)) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aliases" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, match", [("train_split: [train, val]\n", "train_split' must be a string"),
                                         ("val_split: {a: 1}\n", "val_split' must be a string"),
                                         ("epochs: 1.5\n", "must be an integer"),
                                         ("head_options: 3\n", "must be a mapping"),
                                         ("batch_size: true\n", "must be int")])
def test_yaml_values_of_the_wrong_type_are_refused(store, tmp_path, capfd, text, match):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    argv = ["train", str(store.root), "--out", str(tmp_path / "run"), "--config", str(preset),
            "--no-progress"]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
