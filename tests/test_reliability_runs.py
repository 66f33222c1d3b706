"""Issue 18: run folders. One writer at a time, resumes that cannot silently change a run, a killed
checkpoint write leaves nothing behind, a one-class store is refused, BOM-headed CSVs read right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import cfg, make_store

from catnet.cli import main
from catnet.data.annotations import read_csv
from catnet.engine.train import train
from catnet.errors import CatnetError
from catnet.features import FeatureStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = make_store(root / "store")
    train(cfg(store.root, root / "run", epochs=2))
    return root, store


def test_a_second_writer_into_the_same_run_is_refused(trained, tmp_path):
    _, store = trained
    out = tmp_path / "run"
    # a first `catnet train` that holds the run folder for a while (a long epoch); the second is refused
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(REPO / 'tests')!r})
import catnet.engine.train as t
def slow(*a, **k):
    print("started", flush=True)
    time.sleep(30)
t.fit = slow
t.train(__import__('test_train').cfg({str(store.root)!r}, {str(out)!r}))
"""], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "started"
        with pytest.raises(CatnetError, match="another catnet run is writing"):
            train(cfg(store.root, out))
    finally:
        child.kill()
        child.wait()
    train(cfg(store.root, out, epochs=1))  # the lock went with the killed process


def test_resume_cannot_shrink_the_run(trained, capfd):
    root, store = trained
    before = (root / "run" / "run.json").read_text()
    code = main(["train", str(store.root), "--out", str(root / "run"), "--resume", "--epochs", "1",
                 "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and "already trained 2 epochs" in err[-1]
    assert (root / "run" / "run.json").read_text() == before  # run.json still says 2 epochs


def test_resume_refuses_features_from_other_weights(trained, tmp_path):
    root, store = trained
    other = tmp_path / "other"
    feats = [store[i].features for i in range(len(store))]
    FeatureStore.write_synthetic(other, feats, store.labels, store.classes, ids=store.ids,
                                 splits=[r["split"] for r in store.records()], num_crops=2,
                                 weights_id="someoneelse")
    with pytest.raises(CatnetError, match="does not match the resumed run.*weights_id"):
        train(cfg(other, root / "run", resume=True, epochs=3))


def test_a_killed_checkpoint_write_leaves_no_temporary(trained, tmp_path):
    root, store = trained
    run = tmp_path / "run"
    train(cfg(store.root, run, epochs=1))
    junk = run / "checkpoints" / ".last.pt.abc123.tmp"
    junk.write_bytes(b"\0" * 1024)  # what a kill during save_checkpoint leaves
    train(cfg(store.root, run, epochs=2, resume=True))
    assert not junk.exists()


def test_a_one_class_store_is_refused(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    FeatureStore.write_synthetic(tmp_path / "s", x, [0] * 6, ["only"], splits=["train"] * 4 + ["test"] * 2)
    with pytest.raises(CatnetError, match="at least 2"):
        train(cfg(tmp_path / "s", tmp_path / "run"))


def test_a_csv_with_a_byte_order_mark_keeps_its_header(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "list.csv").write_bytes("\ufeffpath,label,split\na.mp4,wave,train\n".encode())
    ann = read_csv(tmp_path / "list.csv")
    assert ann.classes == ["wave"] and [it.id for it in ann.items] == ["a"]

