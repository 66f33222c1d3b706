"""Feature interchange (catnet.features.interchange, `catnet features`): npy / HDF5 / ActionFormer exports,
bit-identical export -> import round trips, imports of foreign features with a labels CSV, merging, and
the one-line refusals (NaN/Inf, ragged dims, unknown or repeated ids, unsafe ids, mismatched stores)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

import catnet.cli as front
from catnet.cli import features as cli
from catnet.errors import CatnetError
from catnet.features import FeatureStore, StoreWriter, make_manifest
from catnet.features.interchange import export_store, import_features, merge_stores, read_labels_csv
from catnet.video.stream import DenseSampling, dense_windows

h5py = pytest.importorskip("h5py")

CLASSES = ["jump", "run", "swim"]
VIDEOS = [  # id, T windows, label, split: variable row counts, ids with "/", one unlabelled video
    ("run/a", 5, 1, "train"), ("jump/b", 1, 0, "val"), ("swim/deep/c", 12, 2, "train"), ("d", 3, -1, "")]


def dense_manifest(hop=4, **extra):
    return make_manifest(backbone="i3d_inception", weights_id="abc123", num_features=8,
                         sampling=DenseSampling(window=16, hop=hop).to_dict(),
                         spatial={"short_side": 128, "crop": 112, "num_crops": 1}, classes=CLASSES, **extra)


def dense_times(t: int, hop=4, window=16, fps=25.0) -> np.ndarray:
    idx = dense_windows(max(1, (t - 1) * hop + window), window, hop)[:t]
    return np.stack([idx[:, 0] / fps, (idx[:, -1] + 1) / fps], axis=1)


def make_store(path: Path, videos=VIDEOS, crops=1, seed=0, hop=4, scale=3.0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    man = dense_manifest(hop)
    man["spatial"]["num_crops"] = crops
    with StoreWriter(path, man, shard_size=2) as w:
        for vid, t, label, split in videos:
            w.add(vid, rng.standard_normal((t * crops, 8)).astype(np.float32) * scale, dense_times(t, hop),
                  label=label, split=split, path=f"/videos/{vid}.mp4", num_crops=crops)
        w.add_failure("broken", "/videos/broken.mp4", "cannot decode broken.mp4: Invalid data")
    return FeatureStore(path)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids and a.records() == b.records() and a.manifest == b.manifest
    assert a.failures == b.failures
    for i in range(len(a)):
        fa, fb = a.read_features(i), b.read_features(i)
        assert fa.dtype == fb.dtype == np.float16
        np.testing.assert_array_equal(fa.view(np.uint16), fb.view(np.uint16))  # bit for bit
        np.testing.assert_array_equal(a[i].times, b[i].times)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


# ---------------------------------------------------------------------------------------------- export


def test_npy_export_layout_and_metadata(store, tmp_path):
    summary = export_store(store, tmp_path / "out")
    assert summary["videos"] == 4
    assert (summary["fps"], summary["feat_stride"], summary["window"]) == (25.0, 4, 16)
    out = tmp_path / "out"
    index = json.loads((out / "index.json").read_text())["videos"]
    meta = json.loads((out / "metadata.json").read_text())
    assert [e["id"] for e in index] == store.ids
    for i, e in enumerate(index):
        arr = np.load(out / e["file"])
        assert e["file"] == e["id"] + ".npy" and arr.dtype == np.float32
        assert arr.shape == (e["num_windows"], 8)
        np.testing.assert_array_equal(arr, store.read_features(i).astype(np.float32))  # widened exactly
        np.testing.assert_array_equal(np.asarray(e["times"], np.float32), store[i].times)
        assert (e["fps"], e["feat_stride"], e["window"]) == (25.0, 4, 16)
        assert e["duration"] == pytest.approx(store[i].times[-1, 1])
        assert e["label_name"] == (CLASSES[e["label"]] if e["label"] >= 0 else None)
    assert (out / "swim" / "deep" / "c.npy").is_file()  # ids with "/" become folders
    assert meta["manifest"] == store.manifest and meta["classes"] == CLASSES
    assert meta["stored_dtype"] == "float16" and meta["array_dtype"] == "float32"
    assert [f["id"] for f in meta["failures"]] == ["broken"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
@pytest.mark.parametrize("crops", [1, 3])
def test_export_import_round_trip_is_bit_identical(tmp_path, fmt, crops):
    s = make_store(tmp_path / "s", crops=crops)
    first = tmp_path / ("e1.h5" if fmt == "hdf5" else "e1")
    second = tmp_path / ("e2.h5" if fmt == "hdf5" else "e2")
    export_store(s, first, format=fmt)
    summary = import_features(first, tmp_path / "s2")
    assert summary["from_catnet_export"] and summary["videos"] == 4 and summary["labelled"] == 3
    s2 = FeatureStore(tmp_path / "s2")
    assert_same_store(s, s2)  # import(export(S)) reads back S's float16 rows
    export_store(s2, second, format=fmt)
    if fmt == "npy":
        assert tree(first) == tree(second)  # export(import(export(S))) == export(S), byte for byte
    else:
        assert first.read_bytes() == second.read_bytes()
        with h5py.File(first, "r") as f:  # as ActionFormer's ActivityNet loader reads an HDF5 file
            x = np.asarray(f["run/a"][()], dtype=np.float32)
            assert x.shape == ((5, 3, 8) if crops == 3 else (5, 8))
            assert f["run/a"].attrs["fps"] == 25.0 and f["run/a"].attrs["label_name"] == "run"


def test_actionformer_layout_opens_like_their_loader(tmp_path):
    s = make_store(tmp_path / "s", crops=3)
    export_store(s, tmp_path / "af", layout="actionformer")
    af = tmp_path / "af"
    meta = json.loads((af / "metadata.json").read_text())
    cfg = meta["actionformer"]
    assert (cfg["feat_stride"], cfg["num_frames"], cfg["default_fps"], cfg["input_dim"]) == (4, 16, 25.0, 8)
    # ActionFormer's THUMOS14Dataset._load_json_db / __getitem__, reduced to what it reads
    db = json.loads((af / cfg["json_file"]).read_text())["database"]
    label_dict = {act["label"]: act["label_id"] for v in db.values() for act in v["annotations"]}
    assert label_dict == {c: i for i, c in enumerate(CLASSES)}  # len(label_dict) == num_classes
    flat = ["d.npy", "jump__b.npy", "run__a.npy", "swim__deep__c.npy"]
    assert sorted(p.name for p in af.glob("*.npy")) == flat
    for key, value in db.items():
        feats = np.load(os.path.join(af, key + cfg["file_ext"])).astype(np.float32)
        vid = key.replace("__", "/")
        assert feats.shape == (s[vid].num_clips, 8)  # (T, C): crops averaged
        np.testing.assert_allclose(feats, s[vid].features.reshape(-1, 3, 8).mean(1), rtol=1e-6)
        assert value["subset"] == s[vid].split and value["fps"] == 25.0 and value["duration"] > 0
        for act in value["annotations"]:
            seg = (np.asarray(act["segment"]) * value["fps"] - 0.5 * cfg["num_frames"]) / cfg["feat_stride"]
            assert seg[1] <= feats.shape[0] + 1
    # and back: a store of the averaged (T, C) rows
    import_features(af, tmp_path / "back")
    back = FeatureStore(tmp_path / "back")
    assert back.ids == s.ids and {r["num_crops"] for r in back.records()} == {1}


def test_export_refuses_ids_that_would_escape_the_folder(tmp_path):
    for n, bad in enumerate(("../evil", "a/../../x", "//abs/x", "/abs/../../x", "a//b", "__catnet__/x")):
        root = tmp_path / f"s{n}"
        with StoreWriter(root, dense_manifest(), journal=False) as w:
            w.add(bad, np.ones((1, 8), np.float32), [[0, 1]])
        with pytest.raises(CatnetError, match="cannot be a file name") as e:
            export_store(root, tmp_path / "out")
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil.npy").exists() and not (tmp_path / "x.npy").exists()
    root = tmp_path / "flat"
    with StoreWriter(root, dense_manifest(), journal=False) as w:
        for vid in ("a/b", "a__b"):
            w.add(vid, np.ones((1, 8), np.float32), [[0, 1]])
    with pytest.raises(CatnetError, match="both become file"):
        export_store(root, tmp_path / "out", layout="actionformer")


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_ids_of_videos_listed_by_absolute_path_export_inside_and_round_trip(tmp_path, fmt):
    """A CSV of absolute paths (outside its folder) gives ids that are those paths: their files go under
    OUT/ without the leading '/', and an import gives the ids back."""
    root = tmp_path / "s"
    with StoreWriter(root, dense_manifest(), journal=False) as w:
        w.add("/archive/2024/take_1", np.ones((2, 8), np.float32), [[0, 1], [1, 2]])
    out = tmp_path / ("e.h5" if fmt == "hdf5" else "e")
    export_store(root, out, format=fmt)
    if fmt == "npy":
        assert (out / "archive" / "2024" / "take_1.npy").is_file()
    import_features(out, tmp_path / "back")
    assert FeatureStore(tmp_path / "back").ids == ["/archive/2024/take_1"]


def test_export_refusals(store, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for kwargs, match in [({"format": "csv"}, "unknown export format"),
                          ({"layout": "tridet"}, "unknown layout"),
                          ({"format": "hdf5", "layout": "actionformer"}, "use --format npy")]:
        with pytest.raises(CatnetError, match=match):
            export_store(store, tmp_path / "o", **kwargs)
    with pytest.raises(CatnetError, match="not empty"):
        export_store(store, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "x"


# ---------------------------------------------------------------------------------------------- import


def foreign_folder(root: Path, dims=(8, 8, 8), nested=True) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((t, d)).astype(np.float64) for t, d in zip((4, 7, 2), dims, strict=True)]
    names = ["cls1/v1", "cls2/v2", "v3"] if nested else ["v1", "v2", "v3"]
    for name, a in zip(names, arrays, strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / f"{name}.npy", a)
    return arrays


def test_import_foreign_npy_with_labels_csv(tmp_path):
    src = tmp_path / "feats"
    arrays = foreign_folder(src)
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n/data/videos/cls1/v1.mp4,walk,training\ncls2/v2,sit,validation\n")
    summary = import_features(src, tmp_path / "s", labels=tmp_path / "labels.csv", feat_stride=4, window=16,
                              fps=30, backbone="videomae", weights_id="w1")
    assert summary == {"out": str(tmp_path / "s"), "videos": 3, "labelled": 2, "feature_dim": 8,
                       "source": str(src), "from_catnet_export": False}
    s = FeatureStore(tmp_path / "s")
    assert s.ids == ["cls1/v1", "cls2/v2", "v3"] and s.classes == ["sit", "walk"]
    assert [(r["label"], r["split"]) for r in s.records()] == [(1, "train"), (0, "val"), (-1, "")]
    assert s.manifest["sampling"] == {"mode": "dense", "window": 16, "hop": 4, "stride": 1,
                                      "hop_seconds": None, "fps": 30.0}
    assert (s.manifest["backbone"], s.manifest["weights_id"]) == ("videomae", "w1")
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(s.read_features(i), a.astype(np.float16))  # rounded once, to fp16
        t = np.arange(len(a)) * 4
        np.testing.assert_allclose(s[i].times, np.stack([t / 30, (t + 16) / 30], 1), rtol=1e-6)
    export_store(s, tmp_path / "e")  # an imported store exports with its grid
    assert json.loads((tmp_path / "e" / "metadata.json").read_text())["fps"] == 30.0


def test_import_foreign_hdf5(tmp_path):
    rng = np.random.default_rng(2)
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f["v_a"] = rng.standard_normal((6, 8)).astype(np.float32)
        f["group/v_b"] = rng.standard_normal((3, 8)).astype(np.float32)
    (tmp_path / "labels.csv").write_text("v_a,x\ngroup/v_b,y,test\n")
    import_features(tmp_path / "feats.h5", tmp_path / "s", labels=tmp_path / "labels.csv", feat_stride=2,
                    fps=10)
    s = FeatureStore(tmp_path / "s")
    assert s.ids == ["group/v_b", "v_a"] and [v.label for v in s] == [1, 0]
    assert s["group/v_b"].split == "test"
    np.testing.assert_allclose(s["v_a"].times[:2], [[0, 0.2], [0.2, 0.4]])


@pytest.mark.parametrize("case", ["nan", "inf", "overflow", "ragged", "int", "1d", "unknown_id", "twice",
                                  "no_grid", "empty_array"])
def test_import_refusals_leave_nothing_behind(tmp_path, case):
    src = tmp_path / "feats"
    foreign_folder(src, dims=(8, 6, 8) if case == "ragged" else (8, 8, 8), nested=False)
    labels = None
    if case in ("nan", "inf", "overflow"):
        a = np.load(src / "v2.npy")
        a[1, 3] = {"nan": np.nan, "inf": np.inf, "overflow": 1e6}[case]  # 1e6 is inf in float16
        np.save(src / "v2.npy", a)
    elif case == "int":
        np.save(src / "v2.npy", np.ones((3, 8), np.int64))
    elif case == "1d":
        np.save(src / "v2.npy", np.ones(8, np.float32))
    elif case == "empty_array":
        np.save(src / "v2.npy", np.ones((0, 8), np.float32))
    elif case in ("unknown_id", "twice"):
        labels = tmp_path / "labels.csv"
        labels.write_text("v1,a\nv9,b\n" if case == "unknown_id" else "v1,a\nv2,b\nclips/v1.mp4,c\n")
    grid = {} if case == "no_grid" else {"feat_stride": 1, "fps": 25}
    match = {"nan": "NaN or Inf", "inf": "NaN or Inf", "overflow": "beyond float16",
             "ragged": "ragged feature dims", "int": "floating point", "1d": r"\(T, D\)",
             "unknown_id": "no features for video v9",
             "twice": "listed twice", "no_grid": "--feat-stride", "empty_array": "no features"}[case]
    with pytest.raises(CatnetError, match=match) as e:
        import_features(src, tmp_path / "s", labels=labels, **grid)
    assert "\n" not in str(e.value)
    left = sorted(p.name for p in tmp_path.iterdir())  # no store, no hidden staging folder
    assert left == sorted(["feats"] + (["labels.csv"] if labels else []))


def test_import_refuses_index_files_outside_the_folder(tmp_path, store):
    export_store(store, tmp_path / "e")
    index = json.loads((tmp_path / "e" / "index.json").read_text())
    index["videos"][0]["file"] = "../../../etc/passwd"
    (tmp_path / "e" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CatnetError, match="outside"):
        import_features(tmp_path / "e", tmp_path / "s")
    index["videos"][0]["file"] = index["videos"][1]["file"]
    index["videos"][0]["id"] = index["videos"][1]["id"]
    (tmp_path / "e" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CatnetError, match="appears twice"):
        import_features(tmp_path / "e", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_import_refuses_damaged_export_metadata(tmp_path, store):
    export_store(store, tmp_path / "e")
    meta_path = tmp_path / "e" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for damage, match in [(lambda m: m.pop("manifest"), "no feature-store manifest"),
                          (lambda m: m.update(format_version=99), "format version 99"),
                          (lambda m: m.update(format="other"), "not a catnet export")]:
        broken = json.loads(json.dumps(meta))
        damage(broken)
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(CatnetError, match=match):
            import_features(tmp_path / "e", tmp_path / "s")
    meta_path.write_text("{not json")
    with pytest.raises(CatnetError, match="cannot read"):
        import_features(tmp_path / "e", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_labels_csv_matching(tmp_path):
    ids = ["abseiling/x", "y", "deep/z/w"]
    (tmp_path / "l.csv").write_text("id,label\n/data/k400/train/abseiling/x.mp4,a\ny.npy,b\n\nw,c,val\n")
    with pytest.raises(CatnetError, match="no features for video w"):  # a tail must be a whole id
        read_labels_csv(tmp_path / "l.csv", ids)
    (tmp_path / "l.csv").write_text("id,label\n/data/k400/train/abseiling/x.mp4,a\ny.npy,b\nz/w.mp4,c,val\n")
    with pytest.raises(CatnetError, match="no features"):
        read_labels_csv(tmp_path / "l.csv", ids)
    (tmp_path / "l.csv").write_text("abseiling/x.mp4,a\ny.npy,b\ndeep/z/w,c,val\n")
    assert read_labels_csv(tmp_path / "l.csv", ids) == {"abseiling/x": ("a", None), "y": ("b", None),
                                                        "deep/z/w": ("c", "val")}


# ----------------------------------------------------------------------------------------------- merge


def test_merge_union_identical_duplicates_and_refusals(tmp_path):
    a = make_store(tmp_path / "a", videos=VIDEOS[:3])
    b = make_store(tmp_path / "b", videos=VIDEOS[3:])
    dup = make_store(tmp_path / "dup", videos=VIDEOS[:1])  # same seed: "run/a" identical to a's
    summary = merge_stores([a, b, dup], tmp_path / "m")
    assert (summary["videos"], summary["duplicates_identical"], summary["failures"]) == (4, 1, 1)
    m = FeatureStore(tmp_path / "m")
    assert m.ids == sorted(v[0] for v in VIDEOS) and [f["id"] for f in m.failures] == ["broken"]
    for vid in m.ids:
        src = a if vid in a else b
        np.testing.assert_array_equal(m.read_features(vid).view(np.uint16),
                                      src.read_features(vid).view(np.uint16))
        np.testing.assert_array_equal(m[vid].times, src[vid].times)
    assert m.manifest["sampling"] == a.manifest["sampling"] and len(m.manifest["merged_from"]) == 3

    other = make_store(tmp_path / "hop8", videos=VIDEOS[3:], hop=8)
    with pytest.raises(CatnetError, match=r"different extraction settings \(sampling.hop: 4 != 8\)") as e:
        merge_stores([a, other], tmp_path / "m2")
    assert "\n" not in str(e.value)
    clash = make_store(tmp_path / "clash", videos=VIDEOS[:1], seed=5)
    with pytest.raises(CatnetError, match="run/a.*different features"):
        merge_stores([a, clash], tmp_path / "m3")
    with pytest.raises(CatnetError, match="at least two"):
        merge_stores([a], tmp_path / "m4")
    assert not any((tmp_path / n).exists() for n in ("m2", "m3", "m4"))


# ------------------------------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="catnet features")
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_cli_export_import_merge_json(store, tmp_path, capsys):
    assert cli.run(parse(["export", str(store.root), "--out", str(tmp_path / "e"), "--json",
                          "--no-progress"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["videos"] == 4 and out["format"] == "npy"
    assert cli.run(parse(["import", str(tmp_path / "e"), "--out", str(tmp_path / "s2"), "--json"])) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["videos"] == 4  # the bar went to stderr, not into the JSON
    assert_same_store(store, FeatureStore(tmp_path / "s2"))
    b = make_store(tmp_path / "b", videos=[("extra", 2, 0, "test")], seed=3)
    assert cli.run(parse(["merge", str(store.root), str(b.root), "--out", str(tmp_path / "m"),
                          "--no-progress"])) == 0
    assert "merged 5 videos from 2 stores" in capsys.readouterr().out
    (tmp_path / "classes.txt").write_text("b\na\n")
    foreign_folder(tmp_path / "f", nested=False)
    (tmp_path / "l.csv").write_text("v1,a\nv2,b\n")
    assert cli.run(parse(["import", str(tmp_path / "f"), "--out", str(tmp_path / "s3"), "--labels",
                          str(tmp_path / "l.csv"), "--classes", str(tmp_path / "classes.txt"),
                          "--feat-stride", "8", "--fps", "25", "--no-progress"])) == 0
    assert FeatureStore(tmp_path / "s3").classes == ["b", "a"]
    with pytest.raises(CatnetError, match="--feat-stride must be >= 1"):
        cli.run(parse(["import", str(tmp_path / "f"), "--out", str(tmp_path / "s4"), "--feat-stride", "0",
                       "--fps", "25"]))
    with pytest.raises(SystemExit):
        parse(["export", str(store.root)])  # --out is required


def test_through_the_catnet_front_door(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(front.VERBS, "features", ("catnet.cli.features", "export, import and merge features"))
    a = make_store(tmp_path / "a", videos=VIDEOS[:2])
    b = make_store(tmp_path / "b", videos=VIDEOS[2:], hop=8)
    assert front.main(["features", "merge", str(a.root), str(b.root), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("catnet features: error: cannot merge")
    assert "sampling.hop: 4 != 8" in err and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as e:
        front.main(["features", "export", str(a.root), "--out", str(tmp_path / "e"), "--format", "csv"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert front.main(["features", "export", str(a.root), "--out", str(tmp_path / "e"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["videos"] == 2
