"""Bad videos (tests/reliability_corpus.py): each is skipped with its reason by extraction and gets a
one-line error from predict; the job completes and no good video is lost."""

from __future__ import annotations

import json
import os

import pytest
import torch
from reliability_corpus import deny_access, make_corpus, restore_access, write_annotations
from test_predict import shared_tiny_run

from catnet.cli import main
from catnet.errors import CatnetError
from catnet.features import FeatureStore
from catnet.features.extract import ExtractConfig, extract
from catnet.video import ClipSampling, SpatialConfig, load_clips

TINY = ExtractConfig(backbone="i3d_r50", pretrained=False,
                     sampling=ClipSampling(num_clips=2, clip_len=4, stride=2),
                     spatial=SpatialConfig(short_side=32, crop=32, num_crops=1), batch_size=4, workers=0,
                     shard_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = make_corpus(root)
    yield root, cases
    restore_access(root)


def _outcome(root, case):
    try:
        load_clips(root / case.name, ClipSampling(2, 4, 2), SpatialConfig(32, 32, 1))
        return "ok", ""
    except CatnetError as e:
        return "skip", str(e)


def test_every_case_decodes_or_fails_with_a_reason(corpus, monkeypatch):
    root, cases = corpus
    deny_access(cases, root, monkeypatch)
    for case in cases:
        got, reason = _outcome(root, case)  # anything but a CatnetError propagates and fails the test
        if case.expect != "any":
            assert got == case.expect, f"{case.name} ({case.what}): {got} {reason}"
        if got == "skip":
            assert reason and "\n" not in reason
            assert case.reason.lower() in reason.lower(), f"{case.name}: {reason}"


def test_extraction_skips_each_with_its_reason_and_keeps_the_rest(corpus, tmp_path, monkeypatch):
    root, cases = corpus
    deny_access(cases, root, monkeypatch)
    listing = write_annotations(cases, root, root / "all.csv")
    result = extract(listing, tmp_path / "store", TINY, progress=False)
    store = FeatureStore(tmp_path / "store")
    reasons = {f["id"]: f["reason"] for f in store.failures}
    stem = {c.name: c.name.rsplit(".", 1)[0] for c in cases}

    assert result.total == len(cases) and result.extracted + result.failed == len(cases)
    assert result.exit_code == 1  # some failed, the job completed
    for case in cases:
        vid = stem[case.name]
        assert (vid in store) != (vid in reasons), f"{case.name} is neither stored nor failed (or both)"
        if case.expect == "ok":
            assert vid in store, f"{case.name} ({case.what}) failed: {reasons.get(vid)}"
            assert store[vid].features.shape == (2, 2048)
        elif case.expect == "skip":
            assert case.reason.lower() in reasons[vid].lower(), (case.name, reasons[vid])
    assert len(store) + len(reasons) == len(cases)

    # a rerun redoes nothing: failures are remembered, stored videos are skipped
    again = extract(listing, tmp_path / "store", TINY, progress=False)
    assert again.extracted == 0 and again.failed == 0
    assert again.already_done == len(store) and again.failed_before == len(reasons)


def test_folder_source_ignores_a_directory_named_like_a_video(corpus, tmp_path, monkeypatch):
    root, cases = corpus
    src = tmp_path / "videos" / "cls"
    src.mkdir(parents=True)
    for name in ("good0.mp4", "cut30.mp4", "empty.mp4"):
        os.link(root / name, src / name)
    (src / "folder.mp4").mkdir()
    (src / "folder.mp4" / "notes.txt").write_text("not a video")
    result = extract(tmp_path / "videos", tmp_path / "store", TINY, progress=False)
    assert (result.total, result.extracted, result.failed) == (3, 1, 2)
    assert [f["id"] for f in FeatureStore(tmp_path / "store").failures] == ["cls/cut30", "cls/empty"]


def test_predict_prints_one_line_per_bad_video_and_runs_the_good_ones(corpus, monkeypatch, capsys):
    root, cases = corpus
    deny_access(cases, root, monkeypatch)
    run = shared_tiny_run()
    capsys.readouterr()
    paths = [str(root / c.name) for c in cases]
    code = main(["predict", *paths, "--checkpoint", str(run), "--json", "--clips", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    predicted = [json.loads(line)["video"] for line in out.splitlines()]
    errors = [line for line in err.splitlines() if line.startswith("catnet predict: error: ")]
    assert "Traceback" not in err
    assert len(predicted) + len(errors) == len(cases)
    assert err.splitlines()[-1] == f"catnet predict: {len(predicted)} ok, {len(errors)} failed"
    for case in cases:
        path = str(root / case.name)
        mine = [e for e in errors if e.startswith(f"catnet predict: error: {path}: ")]
        if case.expect == "ok":
            assert path in predicted, f"{case.name}: {mine}"
        elif case.expect == "skip":
            assert len(mine) == 1 and len(mine[0]) > len(f"catnet predict: error: {path}: "), mine


def test_big_frames_decode_in_bounded_chunks_with_identical_views(tmp_path, monkeypatch):
    """Frames too big to hold all at once (4K: 25 MB each) are decoded a budget's worth at a time and
    resized straight away; the views are the same as from one full decode."""
    import numpy as np
    from reliability_corpus import encode, moving_square

    from catnet.video import clips

    path = encode(tmp_path / "big.mp4", moving_square(30, 48, 64))
    sampling, spatial = ClipSampling(3, 6, 1), SpatialConfig(short_side=24, crop=24, num_crops=3)
    whole = load_clips(path, sampling, spatial)
    calls = []
    real = clips.read_frames

    def spy(p, idx, **kw):
        calls.append(len(idx))
        return real(p, idx, **kw)

    monkeypatch.setattr(clips, "read_frames", spy)
    monkeypatch.setattr(clips, "DECODE_BUDGET", 4 * 48 * 64 * 3)  # four frames' worth
    chunked = load_clips(path, sampling, spatial)
    assert len(calls) > 1 and max(calls) <= 4 and sum(calls) == len(np.unique(whole.indices))
    assert torch.equal(chunked.views, whole.views)
