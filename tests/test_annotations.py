"""Annotation readers on fabricated dataset trees (and the real UCF101 split files when present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catnet.data import load_annotations
from catnet.data.annotations import name_group, read_kinetics
from catnet.errors import CatnetError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")
    return path


def test_kinetics_csv_layouts_and_missing(tmp_path):
    root = tmp_path / "k400"
    csv = tmp_path / "validate.csv"
    csv.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "air drumming,aaa,0,10,validate\n"  # root/split/label/
        "abseiling,-bb,14,24,validate\n"  # root/split/ (youtube ids may start with '-')
        "abseiling,ccc,3,13,train\n"  # root/
        "air drumming,ddd,1,11,validate\n"  # not downloaded
        "air drumming,aaa,0,10,validate\n"  # a verbatim repeat, as in the real CSVs
    )
    a = touch(root / "validate" / "air drumming" / "aaa_000000_000010.mp4")
    b = touch(root / "validate" / "-bb_000014_000024.mp4")
    c = touch(root / "ccc_000003_000013.mkv")
    ann = load_annotations(csv, root=root)
    assert ann.classes == ["abseiling", "air drumming"]
    assert [(it.id, it.path, it.label, it.split) for it in ann.items] == [
        ("aaa_000000_000010", a, "air drumming", "val"),
        ("-bb_000014_000024", b, "abseiling", "val"),
        ("ccc_000003_000013", c, "abseiling", "train"),
    ]
    assert [it.id for it in ann.missing] == ["ddd_000001_000011"]
    assert all(it.path.is_absolute() for it in ann.items + ann.missing)
    assert len(read_kinetics(csv, root, check_files=False).items) == 4

    test_csv = tmp_path / "test.csv"  # the Kinetics test CSVs have no label column
    test_csv.write_text("youtube_id,time_start,time_end,split\naaa,0,10,test\n")
    ann = load_annotations(test_csv, root=root)
    assert ann.items[0].label is None and ann.items[0].split == "test" and ann.classes == []


def test_ucf101_split_files(tmp_path):
    splits, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 Zoom\n2 ApplyLipstick\n")  # classInd order, not sorted
    for n in (1, 2):
        (splits / f"trainlist0{n}.txt").write_text("Zoom/v_Zoom_g01_c01.avi 1\nApplyLipstick/v_A_g01.avi 2\n")
        (splits / f"testlist0{n}.txt").write_text("zoom/v_Zoom_g02_c01.avi\n")
    touch(root / "Zoom" / "v_Zoom_g01_c01.avi")
    touch(root / "zoom" / "v_Zoom_g02_c01.avi")
    ann = load_annotations(splits, root=root, split_id=2)
    assert ann.classes == ["Zoom", "ApplyLipstick"]
    assert [(it.id, it.label, it.split) for it in ann.items] == [
        ("Zoom/v_Zoom_g01_c01", "Zoom", "train"), ("zoom/v_Zoom_g02_c01", "Zoom", "test")]
    assert [it.id for it in ann.missing] == ["ApplyLipstick/v_A_g01"]
    with pytest.raises(CatnetError, match="missing trainlist03.txt"):
        load_annotations(splits, root=root, split_id=3)


def test_ucf101_real_split_files(shared_dir):
    splits = shared_dir / "data" / "splits" / "ucf101"
    if not splits.is_dir():
        pytest.skip("no UCF101 split files in ../shared")
    ann = load_annotations(splits, root="/nonexistent/UCF-101", check_files=False)
    assert len(ann.classes) == 101 and ann.classes[0] == "ApplyEyeMakeup" and ann.classes[-1] == "YoYo"
    assert len(ann.split("train")) == 9537 and len(ann.split("test")) == 3783
    assert all(it.label in ann.classes for it in ann.items)
    assert len({it.id for it in ann.items}) == 9537 + 3783
    assert len(load_annotations(splits, root="/nonexistent", split_id=3, check_files=False).items) == 13320
    missing = load_annotations(splits, root=shared_dir / "nothing-here")
    assert missing.items == [] and len(missing.missing) == 13320  # reported, not fatal


def test_hmdb51_split_files(tmp_path):
    splits, root = tmp_path / "testTrainMulti_7030_splits", tmp_path / "hmdb51"
    splits.mkdir()
    (splits / "wave_test_split1.txt").write_text("w1.avi 1\nw2.avi 2\nw3.avi 0\n")
    (splits / "brush_hair_test_split1.txt").write_text("b1.avi 2 \n")
    (splits / "brush_hair_test_split2.txt").write_text("b1.avi 1\n")
    for p in ("wave/w1.avi", "wave/w2.avi", "wave/w3.avi", "brush_hair/b1.avi"):
        touch(root / p)
    ann = load_annotations(splits, root=root)
    assert ann.classes == ["brush_hair", "wave"]
    assert [(it.id, it.label, it.split) for it in ann.items] == [
        ("brush_hair/b1", "brush_hair", "test"), ("wave/w1", "wave", "train"), ("wave/w2", "wave", "test")]
    assert load_annotations(splits, root=root, split_id=2).items[0].split == "train"
    (splits / "wave_test_split1.txt").write_text("w1.avi 7\n")
    with pytest.raises(CatnetError, match="line 1"):
        load_annotations(splits, root=root)


def test_folder_per_class(tmp_path):
    for p in ("run/a.mp4", "jump/b.avi", "jump/sub/c.webm", "jump/notes.txt", ".hidden/d.mp4", "jump/.e.mp4"):
        touch(tmp_path / "data" / p)
    (tmp_path / "data" / "empty").mkdir()
    ann = load_annotations(tmp_path / "data")
    assert ann.classes == ["jump", "run"]
    assert [(it.id, it.label) for it in ann.items] == [("jump/b", "jump"), ("jump/sub/c", "jump"),
                                                        ("run/a", "run")]
    assert all(it.path.is_file() and it.split is None for it in ann.items)


def test_symlinked_class_folders_are_classes_and_link_cycles_end(tmp_path):
    touch(tmp_path / "elsewhere" / "jump" / "a.mp4")
    touch(tmp_path / "data" / "run" / "b.mp4")
    (tmp_path / "data" / "jump").symlink_to(tmp_path / "elsewhere" / "jump", target_is_directory=True)
    (tmp_path / "data" / "run" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    ann = load_annotations(tmp_path / "data")
    assert ann.classes == ["jump", "run"]
    assert [it.id for it in ann.items] == ["jump/a", "run/b"]


def test_split_lists_that_are_not_utf8_are_one_line_errors(tmp_path):
    ucf = tmp_path / "ucf"
    ucf.mkdir()
    (ucf / "classInd.txt").write_bytes(b"1 Caf\xe9\n")
    with pytest.raises(CatnetError, match="not UTF-8 text") as e:
        load_annotations(ucf)
    assert "\n" not in str(e.value)
    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "run_test_split1.txt").write_bytes(b"caf\xe9.avi 1\n")
    with pytest.raises(CatnetError, match="not UTF-8 text"):
        load_annotations(hmdb)


def test_extract_sources_include_ucf101_and_hmdb51_split_folders(tmp_path):
    from catnet.data.sources import list_videos

    splits, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 Zoom\n")
    (splits / "trainlist01.txt").write_text("Zoom/v_Zoom_g01_c01.avi 1\n")
    (splits / "testlist01.txt").write_text("Zoom/v_Zoom_g02_c01.avi\n")
    for g in (1, 2):
        touch(root / "Zoom" / f"v_Zoom_g0{g}_c01.avi")
    entries, classes = list_videos(splits, root=root)
    assert classes == ["Zoom"]
    assert [(e.id, e.split, e.group, e.label) for e in entries] == [
        ("Zoom/v_Zoom_g01_c01", "train", "Zoom_g01", 0), ("Zoom/v_Zoom_g02_c01", "test", "Zoom_g02", 0)]
    with pytest.raises(CatnetError, match="not a folder"):
        list_videos(splits, root=tmp_path / "nope")


def test_plain_csv(tmp_path):
    touch(tmp_path / "clips" / "a.mp4")
    touch(tmp_path / "clips" / "b.mp4")
    (tmp_path / "list.csv").write_text("path,label,split\nclips/a.mp4,run,train\n"
                                       "clips/b.mp4,jump,validation\nclips/gone.mp4,run,test\n")
    ann = load_annotations(tmp_path / "list.csv")
    assert ann.classes == ["jump", "run"]
    assert [(it.id, it.label, it.split) for it in ann.items] == [("clips/a", "run", "train"),
                                                                 ("clips/b", "jump", "val")]
    assert ann.items[0].path == tmp_path / "clips" / "a.mp4"
    assert [it.id for it in ann.missing] == ["clips/gone"]
    # no header, an absolute path inside the root, an unlabelled row
    (tmp_path / "nohead.csv").write_text(f"{tmp_path}/clips/a.mp4,run\nclips/b.mp4,\n")
    ann = load_annotations(tmp_path / "nohead.csv")
    assert [(it.id, it.label) for it in ann.items] == [("clips/a", "run"), ("clips/b", None)]
    assert ann.classes == ["run"]


@pytest.mark.parametrize("bad", ["../outside.mp4", "clips/../../outside.mp4", "/etc/passwd"])
def test_dataset_lists_cannot_escape_the_root_but_plain_csvs_may(tmp_path, bad):
    kin = tmp_path / "k.csv"
    kin.write_text(f"label,youtube_id,time_start,time_end,split\n../../{bad},x,0,10,train\n")
    with pytest.raises(CatnetError, match="outside the dataset root .*meant to be relative"):
        load_annotations(kin, root=tmp_path / "k400")
    # a plain CSV is the user's own list: absolute paths and paths outside its folder are accepted
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.csv").write_text(f"{bad},run\n")
    ann = load_annotations(tmp_path / "data" / "list.csv", check_files=False)
    want = Path(os.path.normpath(tmp_path / "data" / bad))
    assert ann.items[0].path == want and ann.items[0].id == want.with_suffix("").as_posix()


def test_plain_csv_root_absolute_paths_and_group_column(tmp_path):
    videos = tmp_path / "videos"
    a, b = touch(videos / "x" / "a.mp4"), touch(videos / "x" / "b.mp4")
    lists = tmp_path / "lists"
    lists.mkdir()
    # a header names the columns in any order; group carries the source video
    (lists / "mine.csv").write_text(f"group,split,path,label\ns1,train,x/a.mp4,run\ns1,val,{b},run\n")
    ann = load_annotations(lists / "mine.csv", root=videos)
    assert [(it.id, it.path, it.split, it.group) for it in ann.items] == [
        ("x/a", a, "train", "s1"), ("x/b", b, "val", "s1")]
    # positional path,label,split,group; without a group the UCF101 name rule applies
    (lists / "pos.csv").write_text("x/a.mp4,run,train,g7\nx/v_Run_g03_c02.avi,run,val\nx/b.mp4,run\n")
    ann = load_annotations(lists / "pos.csv", root=videos, check_files=False)
    assert [it.group for it in ann.items] == ["g7", "Run_g03", None]
    (lists / "bad.csv").write_text("path,label,camera\nx/a.mp4,run,2\n")
    with pytest.raises(CatnetError, match="header columns"):
        load_annotations(lists / "bad.csv", root=videos)


@pytest.mark.parametrize("row", [".", "./", "clips/", "clips/.."])
def test_a_folder_instead_of_a_video_is_a_one_line_error(tmp_path, row):
    (tmp_path / "clips").mkdir()
    (tmp_path / "list.csv").write_text(f"{row},run\n")
    with pytest.raises(CatnetError, match="line 1: path .* names a folder, not a video file"):
        load_annotations(tmp_path / "list.csv")


@pytest.mark.parametrize("start", ["inf", "-inf", "nan", "1e999"])
def test_kinetics_non_finite_times_are_one_line_errors(tmp_path, start):
    kin = tmp_path / "k.csv"
    kin.write_text(f"label,youtube_id,time_start,time_end,split\nabseiling,aaa,{start},10,train\n")
    with pytest.raises(CatnetError, match="line 2: time_start/time_end must be finite numbers"):
        load_annotations(kin, root=tmp_path)


def test_groups_from_ucf101_hmdb51_kinetics_and_folder_names(tmp_path):
    assert name_group("v_ApplyEyeMakeup_g08_c03") == "ApplyEyeMakeup_g08"
    hmdb = [("April_09_brush_hair_u_nm_np1_ba_goo_2", "brush_hair", "April_09"),
            ("brushing_raychel_s_hair_brush_hair_u_cm_np2_ri_goo_2", "brush_hair",
             "brushing_raychel_s_hair"),
            ("20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0", "wave", "20060723sfjffbartsinger"),
            ("Prelinger_HabitPat1954_brush_hair_h_nm_np1_fr_med_26", "brush_hair", "Prelinger_HabitPat1954")]
    for name, cls, source in hmdb:
        assert name_group(name, cls) == source
    # anything else is its own group: no guessing from a trailing number
    assert name_group("run_2024") is None
    assert name_group("April_09_brush_hair_u_nm_np1_ba_goo_2", "wave") is None  # the class is in the name

    splits = tmp_path / "hmdb_splits"
    splits.mkdir()
    (splits / "wave_test_split1.txt").write_text(
        "20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0.avi 1\n"
        "20060723sfjffbartsinger_wave_f_cm_np1_ba_med_1.avi 1\nother.avi 2\n")
    ann = load_annotations(splits, root=tmp_path / "hmdb51", check_files=False)
    assert [it.group for it in ann.items] == ["20060723sfjffbartsinger"] * 2 + [None]

    for p in ("Run/v_Run_g01_c01.avi", "Run/v_Run_g01_c02.avi", "Run/clip.mp4"):
        touch(tmp_path / "folder" / p)
    assert [it.group for it in load_annotations(tmp_path / "folder").items] == [None, "Run_g01", "Run_g01"]

    kin = tmp_path / "k.csv"
    kin.write_text("label,youtube_id,time_start,time_end,split\nrun,aaa,0,10,train\nrun,aaa,20,30,train\n")
    assert [it.group for it in read_kinetics(kin, tmp_path, check_files=False).items] == ["aaa", "aaa"]


def test_ucf101_real_split_files_groups_never_straddle_train_and_test(shared_dir):
    splits = shared_dir / "data" / "splits" / "ucf101"
    if not splits.is_dir():
        pytest.skip("no UCF101 split files in ../shared")
    for k in (1, 2, 3):
        ann = load_annotations(splits, root="/nonexistent", split_id=k, check_files=False)
        groups = {s: {it.group for it in ann.split(s)} for s in ("train", "test")}
        assert None not in groups["train"] | groups["test"]
        assert len(groups["train"] | groups["test"]) == 101 * 25  # 25 groups per class
        assert not groups["train"] & groups["test"]  # the official splits are by group, and so are ours


def test_auto_detection_and_bad_sources(tmp_path):
    with pytest.raises(CatnetError, match="not found"):
        load_annotations(tmp_path / "missing.csv")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(CatnetError, match="cannot tell"):
        load_annotations(tmp_path / "notes.txt")
    with pytest.raises(CatnetError, match="unknown annotation format"):
        load_annotations(tmp_path, fmt="imagenet")
    (tmp_path / "s.csv").write_text("clips/a.mp4,run,holdout\n")
    with pytest.raises(CatnetError, match="unknown split"):
        load_annotations(tmp_path / "s.csv")
