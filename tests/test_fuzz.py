"""Property tests for "internal error" (issue 18): config values of any YAML type or value, and any text
given to any numeric command-line option of any verb, end in a clear one-line error (exit 2) or are
accepted; never in `catnet VERB: internal error: ...` or a traceback. Store headers, manifests and
journals are fuzzed in tests/test_store_integrity.py."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import inspect
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from catnet.cli import VERBS, build_parser, main
from catnet.config import from_dict, load_yaml
from catnet.data.synth import SynthConfig
from catnet.engine.finetune import FinetuneConfig
from catnet.engine.train import TrainConfig
from catnet.errors import CatnetError
from catnet.experiments.demo import DemoConfig
from catnet.experiments.reproduce import ReproduceConfig
from catnet.features import FeatureStore
from catnet.features.extract import ExtractConfig
from catnet.heads import build_head
from catnet.video import ClipSampling, SpatialConfig
from catnet.video.stream import DenseSampling

CONFIGS = [TrainConfig, FinetuneConfig, ExtractConfig, DemoConfig, ReproduceConfig, SynthConfig,
           ClipSampling, SpatialConfig, DenseSampling]

# Values that broke earlier versions, beside the generated ones: Unicode digits, huge and tiny
# numbers, non-finite spellings, Python-only literals, empty text.
NASTY = ["0", "-1", "1", "2", "nan", "NaN", "inf", "-inf", "+inf", "1e308", "1e999", "1e-320", "²", "٣",
         "0x10", "1_000", "", " ", " 3", "3.5", "-0.0", "99999999999999999999999", "2**63", "1e9", "True",
         "None", "[1]", "{a: 1}", "!!python/none", "&a [*a]"]

yaml_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
                | st.sampled_from(NASTY))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
texts = (st.sampled_from(NASTY) | st.integers(-2**70, 2**70).map(str)
         | st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.text(max_size=6))


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_config_value_is_accepted_or_refused_in_one_line(data):
    cls = data.draw(st.sampled_from(CONFIGS))
    key = data.draw(st.sampled_from(_keys(cls)) | st.text(max_size=6))
    value = data.draw(yaml_values)
    try:
        cfg = from_dict(cls, {key: value})
    except CatnetError as e:
        assert "\n" not in str(e).strip(), str(e)
        return
    for f in dataclasses.fields(cfg):  # accepted: every float that survived is finite
        v = getattr(cfg, f.name)
        if isinstance(v, float):
            assert math.isfinite(v), (f.name, v)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.sampled_from(NASTY).map(lambda v: f"epochs: {v}\n"))
def test_any_yaml_text_is_read_or_refused_in_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = load_yaml(path)
        from_dict(TrainConfig, data)
    except CatnetError as e:
        assert "\n" not in str(e).strip(), str(e)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["catnet", "local", "avgpool", "linear", "attention_clusters", "netvlad",
                             "lstm"]),
       key=st.sampled_from(["num_heads", "dropout", "logit_scale", "fc_dim", "aggregation", "attention",
                            "num_clusters", "hidden_dim", "standardize", "global_features", "nope"]),
       value=yaml_values)
@example(name="catnet", key="fc_dim", value=2.401919801264265e16)  # found by hypothesis: past torch's sizes
def test_any_head_option_is_accepted_or_refused_in_one_line(name, key, value):
    try:
        build_head(name, 4, 3, **{key: value})
    except CatnetError as e:
        assert "\n" not in str(e).strip(), str(e)


class Reached(BaseException):
    """The verb got past argument checking to its work: stop it there (the fuzz is about the checks)."""


def _stop(*args, **kwargs):
    raise Reached


def _numeric_options(verb: str) -> list[argparse.Action]:
    """The verb's options that take one value and convert it (type=int/float/a parser function)."""
    sub = next(a for a in build_parser(verb)._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[verb]
    return [a for a in parser._actions if a.option_strings and a.type not in (None, str, Path)
            and a.nargs in (None, "?")]


def _positionals(verb: str, root: Path) -> list[str]:
    """A real tiny store for the verbs that read one (so their options are checked past the path),
    else a path that does not exist."""
    sub = next(a for a in build_parser(verb)._actions if isinstance(a, argparse._SubParsersAction))
    out = [str(tiny_store(root))] if verb in ("train", "inspect") else []
    for a in sub.choices[verb]._actions:
        if a.option_strings and a.required:  # e.g. --out: a fresh folder name
            out += [a.option_strings[-1], str(root / f"out-{verb}")]
        if a.option_strings or isinstance(a, argparse._SubParsersAction):
            continue
        if a.choices:
            out.append(next(iter(a.choices)))
        elif a.nargs not in ("?", "*") and not (out and verb in ("train", "inspect")):
            out.append(str(root / "missing"))
    return out


def tiny_store(root: Path) -> Path:
    if not (root / "store" / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        FeatureStore.write_synthetic(root / "store", [rng.standard_normal((2, 4)).astype(np.float32)
                                                      for _ in range(8)], [i % 2 for i in range(8)],
                                     ["a", "b"], splits=["train"] * 6 + ["test"] * 2)
    return root / "store"


FUZZED = {verb: _numeric_options(verb) for verb in VERBS}
ROOT = Path(tempfile.mkdtemp(prefix="catnet-fuzz-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


# The library call that does each verb's work, which the fuzz stops at: everything before it (flags,
# config classes, presets, paths) runs for real.
WORK = {"weights": ["fetch_weights", "verify_weights"], "synth": ["generate"], "extract": ["extract"],
        "inspect": ["summarize"], "features": ["export_store", "import_features", "merge_stores"],
        "train": ["train"], "eval": ["evaluate_splits"], "finetune-backbone": ["finetune"],
        "predict": ["iter_window_predictions"], "export": ["export_backbone", "export_head"],
        "report": ["analyse_run", "write_report"], "demo": ["run_demo"], "reproduce": ["reproduce"],
        "serve": ["make_server"]}


@pytest.fixture
def no_work(monkeypatch):
    for verb, (module_name, _) in VERBS.items():
        module = importlib.import_module(module_name)
        for name in WORK[verb]:
            assert inspect.isfunction(getattr(module, name)), (verb, name)
            monkeypatch.setattr(module, name, _stop)


@pytest.mark.parametrize("verb", [v for v in VERBS if FUZZED[v]])
def test_numeric_options_never_give_an_internal_error(verb, no_work, capfd):
    @settings(max_examples=40, deadline=None)
    @given(action=st.sampled_from(FUZZED[verb]), value=texts)
    def check(action, value):
        argv = [verb, *_positionals(verb, ROOT), action.option_strings[-1], value]
        try:
            code = main(argv)
        except Reached:
            code = 0
        except SystemExit as e:  # argparse's refusal of a value its type function rejected
            code = e.code
        err = capfd.readouterr().err
        assert "internal error" not in err and "Traceback" not in err, (argv, err)
        assert code in (0, 1, 2), (argv, code, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (argv, err)

    check()


def test_the_fuzz_reaches_every_verb_with_numbers():
    """Guard: the option discovery above found the numeric options (a refactor must not silently empty it)."""
    found = {v for v, actions in FUZZED.items() if actions}
    assert {"extract", "train", "predict", "serve", "synth", "eval"} <= found, found
    assert any("--lr" in a.option_strings for a in FUZZED["train"])


def test_yaml_dump_of_nasty_values_round_trips_to_one_line_errors(tmp_path, capsys):
    """A deterministic spot check of the worst earlier offenders through `catnet train --config`."""
    for value in ["²", ".inf", "1e999", "-.nan", "99999999999999999999999"]:
        path = tmp_path / "c.yaml"
        path.write_text(f"seed: {value}\n")
        code = main(["train", str(tiny_store(ROOT)), "--out", str(tmp_path / "run"), "--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "'seed'" in err[0], (value, err)
    assert yaml.safe_load("a: .inf")["a"] == math.inf  # what YAML itself makes of it


def test_absurd_sizes_are_refused_before_allocating():
    """Found by the fuzz: a typo'd head size used to exhaust memory, a >64-bit one to overflow in torch."""
    with pytest.raises(CatnetError, match="parameters"):
        build_head("catnet", 4, 3, num_heads=10**9)
    with pytest.raises(CatnetError, match="63 bits"):
        build_head("catnet", 4, 3, fc_dim=2**70)
    with pytest.raises(CatnetError, match="needs key"):
        from_dict(ReproduceConfig, {})
    with pytest.raises(CatnetError, match="finite"):  # found by the fuzz: float("NAN") of a YAML string
        from_dict(SynthConfig, {"fps": "NAN"})
    assert main(["demo", "--seeds", "180617215", "--out", str(ROOT / "demo")]) == 2
    for argv in (["--port", "70000"], ["--max-mb", "inf"], ["--max-mb", "nan"], ["--window", "inf"]):
        assert main(["serve", *argv]) == 2, argv  # refused before the model loads
    assert main(["predict", str(ROOT / "v.mp4"), "--window", "1e999"]) == 2
