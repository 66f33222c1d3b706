"""CLI misuse — missing paths, bad option values, conflicting options — for every verb in catnet.cli.VERBS:
exit status 2 and exactly one line on stderr, never a traceback.

One case per verb runs as a real `python -m catnet ...` subprocess (all verbs at once, to share the cost
of importing torch); the other cases call `catnet.cli.main` in-process and capture the file descriptors,
which sees the same code path minus the 3-line `__main__`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import cfg, make_store

from catnet.cli import VERBS, main
from catnet.engine.train import train

REPO = Path(__file__).resolve().parents[1]
NOPE = "/nonexistent/catnet-misuse"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A store, a trained run, a text file posing as a video, and an empty CATNET_HOME."""
    root = tmp_path_factory.mktemp("misuse")
    store = make_store(root / "store", n=12)
    train(cfg(store.root, root / "run", epochs=1))
    (root / "notes.mp4").write_text("not a video")
    (root / "bad.yaml").write_text("epochs: [1\n")
    (root / "home").mkdir()
    (root / "ftrun").mkdir()  # what `catnet finetune-backbone` leaves: a run.json without a head
    (root / "ftrun" / "run.json").write_text('{"kind": "backbone", "backbone": "i3d_r50"}')
    (root / "listname.yaml").write_text("name: [catnet]\n")
    return {"store": str(store.root), "run": str(root / "run"), "text": str(root / "notes.mp4"),
            "yaml": str(root / "bad.yaml"), "home": str(root / "home"), "tmp": str(root),
            "ftrun": str(root / "ftrun"), "listname": str(root / "listname.yaml")}


# verb -> misuse cases: (argv after the verb, a substring of the one error line). The first case of each
# verb is the one run as a subprocess. {store}, {run}, ... are filled from the `files` fixture.
CASES: dict[str, list[tuple[str, str]]] = {
    "weights": [("fetch --force --source {nope}.tar.gz", "not found"),
                ("", "required"), ("fetch --timeout soon", "invalid float")],
    "synth": [("{tmp}/synth --classes 1", "--classes"), ("{tmp}/synth --videos-per-class -2", "videos"),
              ("", "required"), ("{tmp}/synth --size 33", "even")],
    "extract": [("{nope} --out {tmp}/x", "not found"), ("{tmp} --out {tmp}/x --clips 0", "--clips must be"),
                ("{tmp} --out {tmp}/x --crops 2", "invalid choice"), ("{tmp}", "--out"),
                ("{tmp} --out {tmp}/x --crop-size 300 --short-side 256", "larger than short side"),
                ("{tmp} --out {tmp}/x --device cuda:99", "--device cuda:99"),
                ("{tmp} --out {tmp}/x --device meta", "must be auto, cpu, cuda")],
    "inspect": [("{nope}", "not found"), ("{store} --max-failures many", "invalid int")],
    "features": [("export {nope} --out {tmp}/fx", "not found"), ("", "required"),
                 ("import {nope} --out {tmp}/fy", "no such file"),
                 ("export {store} --out {tmp}/fz --format zip", "invalid choice")],
    "train": [("{nope} --out {tmp}/t1", "not found"), ("{store} --out {tmp}/t2 --epochs 0", "epochs"),
              ("{store} --out {tmp}/t3 --lr fast", "invalid float"),
              ("{store} --out {tmp}/t4 --head nosuch", "nosuch"),
              ("{store} --out {tmp}/t5 --config {yaml}", "invalid YAML"),
              ("{store} --out {tmp}/t6 --init-from {run} --head-opt num_heads=4", "cannot be combined"),
              ("{store} --out {tmp}/t7 --resume", "nothing to resume"),
              ("{store} --out {run}", "already holds a run"),
              ("{store} --out {tmp}/t8 --head-opt oops", "key=value"),
              ("{store} --out {tmp}/t9 --init-from {ftrun}", "backbone fine-tuning run"),
              ("{store} --out {tmp}/t10 --head-preset {listname}", "must be a head name")],
    "eval": [("{run} --store {nope}", "not found"), ("{nope} --store {store}", "not a catnet run"),
             ("{run}", "--store"), ("{run} --store {store} --which middle", "invalid choice"),
             ("{run} --store {store} --split nosuch", "empty"),
             ("{ftrun} --store {store}", "backbone fine-tuning run"),
             ("{run} --store {store} --num-workers -1", "--num-workers")],
    "finetune-backbone": [("{nope} --out {tmp}/ft", "not found"), ("{tmp}", "--out")],
    "predict": [("{text} --checkpoint {nope}", "not a catnet run"),
                ("{text} --checkpoint {run} --top-k 0", "--top-k"),
                ("{text} --checkpoint {run} --which middle", "invalid choice"), ("", "required"),
                ("{text} --checkpoint {ftrun}", "backbone fine-tuning run")],
    "export": [("{nope} --format onnx --out {tmp}/h.onnx", "not a catnet run"),
               ("{run} --format zip --out {tmp}/h.zip", "invalid choice"),
               ("{run} --out {tmp}/h", "--format")],
    "report": [("{nope}", "not a catnet run"), ("{run} --videos few", "invalid int")],
    "demo": [("--config {nope}.yaml", "not found"), ("--seeds several", "invalid int")],
    "reproduce": [("ucf101 --root {nope}", "does not exist"), ("imagenet --root {tmp}", "invalid choice"),
                  ("ucf101", "--root"), ("ucf101 --root {tmp} --epochs 0", "epochs must be >= 1")],
    "serve": [("--checkpoint {nope}", "not a catnet run"), ("--port http", "invalid int")],
}


def _argv(verb: str, case: str, files) -> list[str]:
    return [verb, *case.format(nope=NOPE, **files).split()]


def _check(code: int, err: str, match: str, argv: list[str]) -> None:
    lines = err.splitlines()
    assert "Traceback" not in err, (argv, err)
    assert code == 2, (argv, code, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith(f"catnet {argv[0]}") and ": error: " in lines[0], (argv, err)
    assert match.lower() in lines[0].lower(), (argv, match, err)


def test_every_verb_has_cases():
    assert set(CASES) == set(VERBS)


def test_first_case_of_every_verb_as_a_subprocess(files):
    env = {**os.environ, "CATNET_HOME": files["home"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = {}
    for verb, cases in CASES.items():
        argv = _argv(verb, cases[0][0], files)
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[verb] = (argv, subprocess.Popen([sys.executable, "-m", "catnet", *argv], cwd=files["tmp"],
                                              env=env, **pipes))
    for verb, (argv, proc) in procs.items():
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        _check(proc.returncode, err, CASES[verb][0][1], argv)


@pytest.mark.parametrize("verb, case, match", [(v, c, m) for v, cases in CASES.items() for c, m in cases[1:]])
def test_misuse_in_process(files, monkeypatch, capfd, verb, case, match):
    monkeypatch.setenv("CATNET_HOME", files["home"])
    monkeypatch.chdir(files["tmp"])
    argv = _argv(verb, case, files)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _check(code, capfd.readouterr().err, match, argv)


def test_sigterm_is_a_clean_interrupt_for_every_verb(files, tmp_path):
    """Schedulers send SIGTERM before SIGKILL: like Ctrl-C, one line and exit 130 (train here)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "long"
    proc = subprocess.Popen([sys.executable, "-m", "catnet", "train", files["store"], "--out", str(out),
                             "--epochs", "100000", "--batch-size", "4", "--no-progress"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "run.json").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "catnet train: interrupted" and "Traceback" not in err


def test_no_verb_and_unknown_verb(capfd):
    with pytest.raises(SystemExit) as e:
        main(["nosuchverb"])
    err = capfd.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice" in err
