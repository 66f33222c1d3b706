"""`catnet reproduce` end to end on tiny fabricated UCF101, HMDB51 and Kinetics trees (random-weight
backbone, 2 clips x 4 frames of 32 px, 1 epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catnet.cli import main
from catnet.features.store import FeatureStore
from catnet.video.encode import write_video

TINY = ["--skip-finetune", "--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4",
        "--crops", "1", "--crop-size", "32", "--epochs", "1", "--heads", "avgpool", "catnet",
        "--workers", "0", "--gpus", "0"]
CLASSES = ["Jump", "Wave"]


def _video(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (10, 40, 48, 3), dtype=np.uint8)
    write_video(path, frames, codec="mpeg4" if path.suffix == ".avi" else "libx264")


def _ucf_tree(root: Path) -> dict[int, set[str]]:
    """3 videos per class; split k tests video k of each class. Returns split -> test ids."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    tests = {}
    for k in (1, 2, 3):
        train, test = [], []
        for ci, c in enumerate(CLASSES):
            for g in (1, 2, 3):
                rel = f"{c}/v_{c}_g{g:02d}_c01.avi"
                (test if g == k else train).append(rel)
                if k == 1:
                    _video(root / rel, 10 * ci + g)
        (lists / f"trainlist{k:02d}.txt").write_text("".join(
            f"{r} {CLASSES.index(r.split('/')[0]) + 1}\n" for r in train))
        (lists / f"testlist{k:02d}.txt").write_text("".join(f"{r}\n" for r in test))
        tests[k] = {r[:-4] for r in test}
    return tests


def test_reproduce_ucf101_three_splits(tmp_path, capsys):
    tests = _ucf_tree(tmp_path / "ucf")
    out = tmp_path / "out"
    assert main(["reproduce", "ucf101", "--root", str(tmp_path / "ucf"), "--out", str(out), *TINY]) == 0
    assert "ucf101: 3 split(s)" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["splits"]) == ["1", "2", "3"]
    for h in ("avgpool", "catnet"):
        s = res["summary"][h]["top1"]
        per_split = [res["splits"][k]["heads"][h]["top1"] for k in ("1", "2", "3")]
        assert s["mean"] == pytest.approx(np.mean(per_split)) and s["std"] == pytest.approx(np.std(per_split))
    # one extraction, three relabelled stores that follow the split files
    assert len(list(out.glob("features-*"))) == 1
    for k in (1, 2, 3):
        store = FeatureStore(out / f"store-split{k}")
        assert {store.ids[i] for i in store.split("test")} == tests[k]
        assert store.classes == CLASSES and len(store.split("train")) == 4
        assert (out / "runs" / f"split{k}" / "catnet" / "seed0" / "checkpoints" / "last.pt").is_file()
    assert res["measured"] == {"split": ["test"], "checkpoint": "last", "selected_on": [None], "notes": []}
    assert all(r["heads"][h]["measured_on"] == "test" for r in res["splits"].values() for h in ("avgpool",))

    # other clip settings: new features, so split 1's store and its runs are rebuilt, not reused
    argv = [a if a != "2" else "3" for a in TINY]  # --clips 3
    assert main(["reproduce", "ucf101", "--root", str(tmp_path / "ucf"), "--out", str(out), "--splits", "1",
                 *argv]) == 0
    assert "measured on the test split" in capsys.readouterr().out
    assert len(list(out.glob("features-*"))) == 2
    store = FeatureStore(out / "store-split1")
    assert store.manifest["sampling"]["num_clips"] == 3 and store.num_views(0) == 3
    run = json.loads((out / "runs" / "split1" / "catnet" / "seed0" / "run.json").read_text())
    assert run["store"]["manifest"]["sampling"]["num_clips"] == 3


def test_reproduce_hmdb51_and_kinetics(tmp_path, capsys):
    hmdb = tmp_path / "hmdb"
    (hmdb / "splits").mkdir(parents=True)
    for ci, c in enumerate(CLASSES):
        flags = {"a.avi": 1, "b.avi": 1, "c.avi": 2, "d.avi": 0}
        for j, name in enumerate(flags):
            _video(hmdb / c / f"{c}_{name}", 10 * ci + j)
        for k in (1, 2, 3):
            (hmdb / "splits" / f"{c}_test_split{k}.txt").write_text(
                "".join(f"{c}_{n} {f}\n" for n, f in flags.items()))
    # with the fine-tuning stage (catnet.engine.finetune): features come from the fine-tuned backbone
    assert main(["reproduce", "hmdb51", "--root", str(hmdb), "--out", str(tmp_path / "h"), "--splits", "2",
                 *TINY[1:]]) == 0
    res = json.loads((tmp_path / "h" / "results.json").read_text())
    assert list(res["splits"]) == ["2"] and res["splits"]["2"]["heads"]["catnet"]["n"] == 2  # flag 0 unused
    ckpt = json.loads((tmp_path / "h" / "finetune-split2" / "reproduce_done.json").read_text())["checkpoint"]
    assert Path(ckpt).is_file()
    store = next((tmp_path / "h").glob("features-*"))
    assert json.loads((store / "manifest.json").read_text())["checkpoint"] == ckpt
    # the same command reuses the fine-tuned backbone; another length fine-tunes it again
    argv = ["reproduce", "hmdb51", "--root", str(hmdb), "--out", str(tmp_path / "h"), "--splits", "2"]
    before = Path(ckpt).stat().st_mtime_ns
    assert main([*argv, *TINY[1:]]) == 0 and Path(ckpt).stat().st_mtime_ns == before
    at = TINY.index("--epochs") + 1
    longer = [*TINY[1:at], "2", *TINY[at + 1:]]
    assert main([*argv, *longer]) == 0 and Path(ckpt).stat().st_mtime_ns != before
    run = json.loads((tmp_path / "h" / "finetune-split2" / "run" / "run.json").read_text())
    assert run["finetune"]["epochs"] == 2

    kin = tmp_path / "kinetics"
    for split, csv_name in (("train", "train.csv"), ("val", "validate.csv")):
        rows = ["label,youtube_id,time_start,time_end,split"]
        for ci, c in enumerate(CLASSES):
            for j in range(2 if split == "train" else 1):
                yt = f"{split}{c}{j}xxxxxx"[:11]
                rows.append(f"{c},{yt},0,10,{'validate' if split == 'val' else 'train'}")
                _video(kin / split / c / f"{yt}_000000_000010.mp4", 100 + 10 * ci + j)
        (kin / csv_name).write_text("\n".join(rows) + "\n")
    assert main(["reproduce", "kinetics400", "--root", str(kin), "--out", str(tmp_path / "k"), *TINY]) == 0
    res = json.loads((tmp_path / "k" / "results.json").read_text())
    assert list(res["splits"]) == ["1"] and res["splits"]["1"]["heads"]["avgpool"]["n"] == 2  # val videos
    assert "kinetics400: 1 split(s)" in capsys.readouterr().out


def test_reproduce_refuses_bad_input(tmp_path, capsys):
    assert main(["reproduce", "ucf101", "--root", str(tmp_path / "nope"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["reproduce", "ucf101", "--root", str(tmp_path), "--splits", "4", *TINY]) == 2
    assert "not [4]" in capsys.readouterr().err
    assert main(["reproduce", "ucf101", "--root", str(tmp_path), "--checkpoint", "x.pt"]) == 2
    assert "--skip-finetune" in capsys.readouterr().err
