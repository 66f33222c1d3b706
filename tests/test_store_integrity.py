"""Feature-store integrity (issue #18): non-UTF-8 file names, shards that record their provenance, file
modes others can read, one-line errors for damaged stores (a property test) and for an --out that cannot
be written (read-only, full, a file)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catnet.features.extract as extract_module
import catnet.features.store as store_module
from catnet.cli import main
from catnet.errors import CatnetError
from catnet.features import FeatureStore, StoreWriter, make_manifest
from catnet.features.extract import ExtractConfig, extract
from catnet.features.inspect import summarize
from catnet.features.loader import feature_loader
from catnet.features.store import JOURNAL_MAGIC, compat_digest, read_shard_header
from catnet.video import ClipSampling, SpatialConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
        "--crops", "1", "--short-side", "32", "--crop-size", "32", "--batch", "2", "--no-progress",
        "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_error_line(capsys, *expected: str) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if ": warning: " not in x]
    assert len(err) == 1 and ": error: " in err[0] and "internal error" not in err[0], err
    assert all(e in err[0] for e in expected), err
    return err[0]


@pytest.fixture
def videos(make_video, tmp_path):
    for i, vid in enumerate(["jump/a", "jump/b", "run/c", "run/d"]):
        make_video(f"videos/{vid}.mp4", frames=12 + 2 * i, height=32, width=40, seed=i)
    return tmp_path / "videos"


# --------------------------------------------------------------------------------------- file names


def test_non_utf8_file_names_extract_train_eval(videos, tmp_path, capsys):
    """Names os.listdir gives as surrogate escapes ('\\udcff') travel through shards, journals, failures,
    training and evaluation; HDF5 (UTF-8 names only) refuses them in one line."""
    for good, bad in ((b"jump/a.mp4", b"jump/\xffa.mp4"), (b"run/c.mp4", b"run/c\xe9.mp4")):
        os.rename(os.fsencode(videos) + b"/" + good, os.fsencode(videos) + b"/" + bad)
    (Path(os.fsdecode(os.fsencode(videos) + b"/run/broken\xff.mp4"))).write_bytes(b"\x00" * 64)
    out = tmp_path / "store"
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--shard-size", "100"]) == 1
    store = FeatureStore(out)
    assert store.ids == sorted(["jump/\udcffa", "jump/b", "run/c\udce9", "run/d"])
    assert [f["id"] for f in store.failures] == ["run/broken\udcff"]
    assert all(Path(r["path"]).is_file() for r in store.records())  # the original bytes, back
    for p in [*store.shards, *(out / "failures").iterdir()]:  # plain ASCII JSON inside: any tool reads it
        text = json.dumps(read_shard_header(p)["__metadata__"]) if p.suffix == ".safetensors" \
            else p.read_bytes().decode("ascii")
        assert "\\udcff" in text or "\\udce9" in text or p.name.endswith(".jsonl")

    batch = next(iter(feature_loader(store, store.labels, list(range(len(store))), batch_size=4)))
    assert tuple(batch["x"].shape) == (4, 2, store.manifest["num_features"])
    assert main(["inspect", str(out)]) == 0  # the failure's name printed quoted, on one line
    assert "'run/broken\\udcff'" in capsys.readouterr().out
    assert main(["train", str(out), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
                 "--head", "avgpool", "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run"), "--store", str(out), "--split", "", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["features", "export", str(out), "--out", str(tmp_path / "npy"), "--no-progress"]) == 0
    assert (Path(os.fsdecode(os.fsencode(tmp_path / "npy") + b"/jump/\xffa.npy"))).is_file()
    pytest.importorskip("h5py")
    capsys.readouterr()
    assert main(["features", "export", str(out), "--out", str(tmp_path / "x.h5"), "--format", "hdf5",
                 "--no-progress"]) == 2
    _one_error_line(capsys, "non-UTF-8 file name", "--format npy")


# --------------------------------------------------------------------------------------- provenance


def test_lost_manifest_is_rebuilt_only_from_shards_that_agree(videos, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--shard-size", "1"]) == 0
    original = json.loads((out / "manifest.json").read_text())
    shard = FeatureStore(out).shards[0]
    assert json.loads(read_shard_header(shard)["__metadata__"]["compat"]) == compat_digest(original)
    shards = {p.name: p.read_bytes() for p in FeatureStore(out).shards}
    (out / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--clips", "3"]) == 2  # other clips
    _one_error_line(capsys, "has no manifest.json, and rank000-000000.safetensors was written with other "
                    "extraction settings (sampling differ)")
    cfg = ExtractConfig(pretrained=False, sampling=ClipSampling(2, 4, 2), workers=0, batch_size=2, seed=1,
                        spatial=SpatialConfig(short_side=32, crop=32, num_crops=1))
    with pytest.raises(CatnetError, match=r"other extraction settings.*\(weights_id differ\)"):
        extract(videos, out, cfg, progress=False)  # other (random) weights
    assert not (out / "manifest.json").exists()
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--json"]) == 0  # the same settings
    assert json.loads(capsys.readouterr().out)["already_done"] == 4
    rebuilt = json.loads((out / "manifest.json").read_text())
    keys = list(compat_digest(original))
    assert {k: rebuilt[k] for k in keys} == {k: original[k] for k in keys}
    assert {p.name: p.read_bytes() for p in FeatureStore(out).shards} == shards

    # a manifest swapped for one of other weights: readers refuse the shards; renamed classes only relabel
    swapped = dict(original, weights_id="0123456789ab")
    (out / "manifest.json").write_text(json.dumps(swapped))
    with pytest.raises(CatnetError, match=r"other extraction settings than manifest.json \(weights_id dif"):
        len(FeatureStore(out))
    (out / "manifest.json").write_text(json.dumps(dict(original, classes=["hop", "walk"])))
    assert len(FeatureStore(out)) == 4


def test_lost_manifest_with_journal_or_legacy_shards(tmp_path):
    man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={"num_clips": 2}, spatial={},
                        classes=["a"])
    w = StoreWriter(tmp_path / "j", man, shard_size=100, flush_seconds=None)
    w.add("v", np.ones((2, 4)), np.zeros((2, 2)))  # journaled, never flushed: as if killed
    (tmp_path / "j" / "manifest.json").unlink()
    with pytest.raises(CatnetError, match=r"no manifest.json, and rank000.journal was written .*weights_id"):
        StoreWriter(tmp_path / "j", dict(man, weights_id="x"))
    again = StoreWriter(tmp_path / "j", man)
    assert again.num_recovered == 1 and FeatureStore(tmp_path / "j").ids == ["v"]

    legacy = tmp_path / "legacy"  # catnet 0.1.0 shards record no settings: readable, never adopted
    shutil.copytree(REPO / "tests" / "data" / "legacy_0.1.0" / "store", legacy)
    old = json.loads((legacy / "manifest.json").read_text())
    assert len(FeatureStore(legacy)) == 4
    (legacy / "manifest.json").unlink()
    with pytest.raises(CatnetError, match="does not record its extraction settings"):
        StoreWriter(legacy, old)


# --------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_store_files_get_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={}, spatial={}, classes=[])
        w = StoreWriter(tmp_path / "s", man, shard_size=2, flush_seconds=None)
        w.add("v0", np.ones((1, 4)), np.zeros((1, 2)))
        w.add_failure("x", "x.mp4", "broken")
        journal = w.journal_path
        modes = {"journal": journal.stat().st_mode}
        w.add("v1", np.ones((1, 4)), np.zeros((1, 2)))  # a shard now
        w.close()
    finally:
        os.umask(previous)
    root = tmp_path / "s"
    modes.update(manifest=(root / "manifest.json").stat().st_mode,
                 shard=next((root / "shards").glob("*.safetensors")).stat().st_mode,
                 failures=(root / "failures" / "rank000.jsonl").stat().st_mode)
    assert {k: stat.S_IMODE(m) for k, m in modes.items()} == dict.fromkeys(modes, 0o666 & ~umask)


# --------------------------------------------------------------------------------------- CLI refusals


def test_inspect_refuses_negative_max_failures(tmp_path, capsys):
    s = FeatureStore.write_synthetic(tmp_path / "s", np.ones((2, 1, 4)), [0, 0], ["a"])
    assert main(["inspect", str(s.root), "--max-failures", "-1"]) == 2
    _one_error_line(capsys, "--max-failures must be >= 0, got -1")
    assert main(["inspect", str(s.root), "--max-failures", "0"]) == 0


def test_extract_into_read_only_full_or_file_out(videos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "store"
    (tmp_path / "file").write_text("x")
    assert main(["extract", str(videos), "--out", str(tmp_path / "file"), *TINY]) == 2
    _one_error_line(capsys, "exists and is not a directory")

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)  # tests run as root: chmod would not stop a write
    assert main(["extract", str(videos), "--out", str(out), *TINY]) == 2
    _one_error_line(capsys, "cannot create --out", "Read-only file system")
    monkeypatch.undo()
    out.mkdir()
    monkeypatch.setattr(extract_module, "open", lambda *a, **k: read_only(None), raising=False)
    assert main(["extract", str(videos), "--out", str(out), *TINY]) == 2
    _one_error_line(capsys, "cannot write --out", "Read-only file system")
    monkeypatch.undo()

    real_write, written = os.write, []

    def full_after_two(fd, data):  # the journal's third append finds the disk full
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".journal"):
            written.append(len(data))
            if len(written) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", full_after_two)
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--shard-size", "100"]) == 2
    _one_error_line(capsys, "cannot write feature store", "No space left on device", "rerun to resume")
    monkeypatch.undo()
    assert len(FeatureStore(out)) == 2  # the two journaled videos are kept

    def no_room(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", no_room)  # now the first shard cannot be written
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--shard-size", "1"]) == 2
    _one_error_line(capsys, "No space left on device")
    monkeypatch.undo()
    # no half-written shard; the video whose shard failed is in the journal
    assert not list((out / "shards").glob(".*.tmp")) and len(FeatureStore(out)) == 3
    assert main(["extract", str(videos), "--out", str(out), *TINY, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["already_done"], summary["recovered"], summary["extracted"]) == (3, 1, 1)
    assert len(FeatureStore(out)) == 4  # nothing lost, nothing redone


# --------------------------------------------------------------------------------- damaged stores


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store with two shards, a journal (an interrupted writer) and a failures file."""
    root = tmp_path_factory.mktemp("pristine") / "store"
    rng = np.random.default_rng(0)
    man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={"num_clips": 2},
                        spatial={"num_crops": 2}, classes=["a", "b"])
    w = StoreWriter(root, man, shard_size=2, flush_seconds=None)
    for i in range(5):
        w.add(f"v{i}", rng.standard_normal((4, 4)), np.arange(4.0).reshape(2, 2), label=i % 2,
              split="train", num_crops=2)
    w.add_failure("bad", "bad.mp4", "cannot decode")
    return root  # never closed: v4 stays in the journal


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
DEEP = "[" * 50000 + "]" * 50000  # deeper than the JSON parser's recursion limit


def _mutate_json(obj, data):
    """obj with one value (at a random path) replaced by random JSON, or obj itself replaced."""
    if not isinstance(obj, (dict, list)) or not obj or data.draw(st.booleans()):
        return data.draw(json_values | st.just("__deep__"))
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    k = data.draw(st.sampled_from(keys))
    obj[k] = _mutate_json(obj[k], data)
    return obj


def _dump(obj) -> bytes:
    return json.dumps(obj).replace('"__deep__"', DEEP).encode()


def _damage_shard(path: Path, data) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8: 8 + n]), raw[8 + n:]
    how = data.draw(st.sampled_from(["header", "videos", "length", "bytes", "truncate"]))
    if how == "header":
        header = _mutate_json(header, data)
    elif how == "videos":
        header["__metadata__"]["videos"] = _dump(_mutate_json(json.loads(header["__metadata__"]["videos"]),
                                                              data)).decode()
    if how in ("header", "videos"):
        text = _dump(header)
        raw = struct.pack("<Q", len(text)) + text + body
    elif how == "length":
        raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "bytes":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1:]
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(raw)


def _damage_journal(path: Path, data) -> None:
    """A record whose meta is replaced by random JSON, with a valid CRC (the content itself is wrong)."""
    raw = path.read_bytes()
    head = struct.Struct("<4sIQI")
    _, n_meta, n_data, _ = head.unpack_from(raw, 0)
    meta, rest = json.loads(raw[head.size: head.size + n_meta]), raw[head.size + n_meta:]
    new = _dump(_mutate_json(meta, data))
    payload = rest[:n_data]
    crc = zlib.crc32(payload, zlib.crc32(new))
    path.write_bytes(head.pack(JOURNAL_MAGIC, len(new), n_data, crc) + new + payload + rest[n_data:])


def _damage(root: Path, data) -> None:
    what = data.draw(st.sampled_from(["shard", "manifest", "failures", "journal"]))
    if what == "shard":
        _damage_shard(data.draw(st.sampled_from(sorted((root / "shards").glob("*.safetensors")))), data)
    elif what == "manifest":
        m = root / "manifest.json"
        m.write_bytes(_dump(_mutate_json(json.loads(m.read_text()), data)))
    elif what == "journal":
        _damage_journal(next((root / "shards").glob("*.journal")), data)
    else:
        lines = [_dump(_mutate_json({"id": "bad", "path": "bad.mp4", "reason": "x"}, data)),
                 data.draw(st.binary(max_size=40))]
        (root / "failures" / "rank000.jsonl").write_bytes(b"\n".join(lines))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_stores_give_one_line_errors(pristine, tmp_path, data, capsys):
    """Whatever is damaged (shard headers, lengths, offsets, dtypes, shapes, video records, manifests of the
    wrong types or depth, huge numbers, NaN, failure files, journal records), opening the store, reading
    every video and `catnet inspect --json` either work or raise CatnetError: never another exception."""
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
    shutil.copytree(pristine, root)
    _damage(root, data)
    try:
        store = FeatureStore(root)
        for i in range(len(store)):
            v = store[i]
            assert v.features.shape == (v.num_clips * v.num_crops, 4) and v.times.shape == (v.num_clips, 2)
        assert summarize(store)["videos"] == len(store)
    except CatnetError as e:
        assert "\n" not in str(e)
    capsys.readouterr()
    code = main(["inspect", str(root), "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "internal error" not in err and len(err.strip().splitlines()) <= 1, err
    if code == 0:
        json.loads(out)
    shutil.rmtree(root)
