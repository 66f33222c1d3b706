"""Feature store: round trip, lazy reads, plain-numpy readability, crash leftovers, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from catnet.errors import CatnetError
from catnet.features import FeatureStore, StoreWriter, make_manifest
from catnet.features.store import done_and_failed
from catnet.utils.io import current_umask


def _feats(n=5, v=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((v, d)).astype(np.float32) for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    feats = _feats()
    s = FeatureStore.write_synthetic(tmp_path / "s", feats, [0, 1, 0, 1, 1], ["a", "b"], num_crops=3,
                                     shard_size=2, splits=["train", "train", "val", "train", "val"],
                                     ids=["e", "d", "c", "b", "a"])
    return s, feats


def test_round_trip_and_access(store):
    s, feats = store
    assert len(s) == 5
    assert s.ids == ["a", "b", "c", "d", "e"]  # ordered by id, whatever the write order
    assert len(s.shards) == 3  # 2 + 2 + 1
    v = s["b"]
    assert v.features.dtype == np.float32 and v.features.shape == (6, 8)
    np.testing.assert_allclose(v.features, feats[3], atol=2e-3)  # stored as fp16
    assert (v.num_clips, v.num_crops, v.label, v.split) == (2, 3, 1, "train")
    np.testing.assert_array_equal(v.times, [[0, 1], [1, 2]])
    assert s[1].id == "b" and s[-1].id == "e"
    assert [x.id for x in s] == s.ids
    assert s.split("val") == [0, 2]  # "a" and "c"
    assert s.classes == ["a", "b"]
    np.testing.assert_array_equal(s.labels, [1, 1, 0, 1, 0])
    with pytest.raises(KeyError):
        s["nope"]


def test_read_features_is_the_stored_float16(store, tmp_path):
    s, feats = store
    for key in range(len(s)):
        full = s.read_features(key)
        assert full.dtype == np.float16 and s.num_views(key) == full.shape[0] == 6 and full.flags.writeable
        np.testing.assert_array_equal(full.astype(np.float32), s[key].features)
    # a video still in a writer's journal (killed extraction) reads the same way
    man = make_manifest(backbone="b", weights_id="w", num_features=8, sampling={}, spatial={}, classes=["a"])
    w = StoreWriter(tmp_path / "j", man, shard_size=100, flush_seconds=None)
    w.add("v", feats[0], np.zeros((2, 2)), num_crops=3)
    j = FeatureStore(tmp_path / "j")
    assert j.num_views("v") == 6
    np.testing.assert_array_equal(j.read_features("v"), feats[0].astype(np.float16))


def test_scan_features_yields_each_wanted_video_once_with_its_own_rows(store, tmp_path):
    """Whole-pass reads (finiteness, standardisation) group videos by shard, whose rows here run against
    the store's id order; each asked video comes once with exactly its features, journaled ones too."""
    s, _ = store
    for wanted in (None, [4, 3, 0], [2], []):
        got = dict(s.scan_features(wanted))
        assert sorted(got) == (list(range(len(s))) if wanted is None else sorted(wanted))
        for i, x in got.items():
            np.testing.assert_array_equal(x, s.read_features(i))
    man = make_manifest(backbone="b", weights_id="w", num_features=8, sampling={}, spatial={}, classes=["a"])
    w = StoreWriter(tmp_path / "j", man, shard_size=100, flush_seconds=None)
    w.add("v", np.full((2, 8), np.nan, np.float32), np.zeros((2, 2)))
    j = FeatureStore(tmp_path / "j")
    assert [i for i, _ in j.scan_features()] == [0] and j.nonfinite_ids() == ["v"]


def test_will_need_hints_exactly_each_videos_bytes(store, tmp_path, monkeypatch):
    import os

    s, _ = store
    hints = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: hints.append((os.readlink(
        f"/proc/self/fd/{fd}"), off, n, how)), raising=False)
    s.will_need([4, 0, 2])
    assert [h[3] for h in hints] == [os.POSIX_FADV_WILLNEED] * 3
    for (path, off, n, _), i in zip(hints, [4, 0, 2], strict=True):
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == s.read_features(i).tobytes()
    # journal videos are in memory already: nothing to hint
    man = make_manifest(backbone="b", weights_id="w", num_features=8, sampling={}, spatial={}, classes=["a"])
    StoreWriter(tmp_path / "j", man, flush_seconds=None).add("v", np.ones((1, 8)), np.zeros((1, 2)))
    hints.clear()
    FeatureStore(tmp_path / "j").will_need([0])
    assert hints == []


def test_truncated_shard_is_a_one_line_error(store):
    s, _ = store
    shard = s.shards[0]
    data = shard.read_bytes()
    fresh, opened = FeatureStore(s.root), FeatureStore(s.root)
    assert len(fresh.ids) == 5  # index built from the intact header
    for i in range(len(opened)):
        opened.read_features(i)  # shard layouts cached too
    shard.write_bytes(data[:-200])  # then the file is cut (a copy in progress, a full disk)
    for reader, why in ((fresh, "beyond end of file"), (opened, "cut short")):
        with pytest.raises(CatnetError, match=f"corrupt feature shard .*{why}"):
            for i in range(len(reader)):
                reader.read_features(i)


def test_open_shards_are_bounded(tmp_path):
    feats = _feats(n=8)
    s = FeatureStore.write_synthetic(tmp_path / "s", feats, [0] * 8, ["x"], shard_size=1)
    s = FeatureStore(s.root, max_open=2)
    for i in range(8):
        np.testing.assert_allclose(s[i].features, feats[i], atol=2e-3)
        assert len(s._open) <= 2


def test_store_pickles_for_dataloader_workers(store):
    import pickle

    s, feats = store
    _ = s[0]
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2["b"].features, s["b"].features)


def test_readable_with_plain_numpy_and_json(store):
    """A shard is read with safetensors.numpy + json only: no catnet code."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    s, feats = store
    manifest = json.loads((s.root / "manifest.json").read_text())
    assert manifest["num_features"] == 8 and manifest["classes"] == ["a", "b"]
    seen = {}
    for shard in sorted((s.root / "shards").glob("*.safetensors")):
        t = load_file(str(shard))
        with safe_open(str(shard), framework="numpy") as f:
            videos = json.loads(f.metadata()["videos"])
        assert t["features"].dtype == np.float16 and t["offsets"][-1] == len(t["features"])
        for i, rec in enumerate(videos):
            seen[rec["id"]] = t["features"][t["offsets"][i]: t["offsets"][i + 1]]
            assert t["labels"][i] == rec["label"]
    ids = ["e", "d", "c", "b", "a"]
    for i, vid in enumerate(ids):
        np.testing.assert_allclose(seen[vid].astype(np.float32), feats[i], atol=2e-3)


def test_stale_temps_removed_and_numbering_continues(tmp_path):
    man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={}, spatial={}, classes=[])
    with StoreWriter(tmp_path / "s", man, shard_size=1) as w:
        w.add("v0", np.ones((2, 4)), np.zeros((2, 2)))
    stale = tmp_path / "s" / "shards" / ".rank000-000001.safetensors.abc.tmp"
    other = tmp_path / "s" / "shards" / ".rank001-000000.safetensors.abc.tmp"  # another rank, maybe live
    stale.write_bytes(b"half a shard")
    other.write_bytes(b"half a shard")
    with StoreWriter(tmp_path / "s", man, shard_size=1) as w:
        w.add("v1", np.ones((2, 4)), np.zeros((2, 2)))
    assert not stale.exists() and other.exists()
    names = sorted(p.name for p in (tmp_path / "s" / "shards").glob("*.safetensors"))
    assert names == ["rank000-000000.safetensors", "rank000-000001.safetensors"]
    assert FeatureStore(tmp_path / "s").ids == ["v0", "v1"]


def test_mismatched_manifest_refused(tmp_path):
    man = make_manifest(backbone="i3d_r50", weights_id="w1", num_features=4,
                        sampling={"num_clips": 10}, spatial={}, classes=["a"])
    StoreWriter(tmp_path / "s", man)
    StoreWriter(tmp_path / "s", dict(man, versions={"torch": "other"}))  # provenance only: accepted
    for change in ({"weights_id": "w2"}, {"sampling": {"num_clips": 5}}, {"classes": ["a", "b"]}):
        with pytest.raises(CatnetError, match="different settings"):
            StoreWriter(tmp_path / "s", dict(man, **change))


def test_failures_latest_reason_and_finished_excluded(tmp_path):
    man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={}, spatial={}, classes=[])
    w = StoreWriter(tmp_path / "s", man, shard_size=1)
    w.add_failure("x", "x.mp4", "truncated")
    w.add_failure("y", "y.mp4", "no video stream")
    w.add_failure("x", "x.mp4", "still truncated")
    w.add("y", np.ones((1, 4)), np.zeros((1, 2)))  # retried and succeeded
    with open(tmp_path / "s" / "failures" / "rank000.jsonl", "a") as f:
        f.write('{"id": "z", "pa')  # a line cut by power loss is ignored
    s = FeatureStore(tmp_path / "s")
    assert s.failures == [{"id": "x", "path": "x.mp4", "reason": "still truncated"}]
    assert done_and_failed(s.root) == ({"y"}, {"x"})


def test_bad_inputs(tmp_path):
    with pytest.raises(CatnetError, match="not found"):
        FeatureStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatnetError, match="not a feature store"):
        FeatureStore(tmp_path / "empty")
    man = make_manifest(backbone="b", weights_id="w", num_features=4, sampling={}, spatial={}, classes=[])
    w = StoreWriter(tmp_path / "s", man)
    with pytest.raises(CatnetError, match="feature dim"):
        w.add("v", np.ones((2, 5)), np.zeros((2, 2)))
    with pytest.raises(CatnetError, match="views"):
        w.add("v", np.ones((3, 4)), np.zeros((2, 2)))
    w.add("v", np.ones((2, 4)), np.zeros((2, 2)))
    w.close()
    shard = next((tmp_path / "s" / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated copy, e.g. a failed rsync
    with pytest.raises(CatnetError, match="corrupt feature shard"):
        len(FeatureStore(tmp_path / "s"))


def test_the_umask_is_read_without_being_set():
    """Reading it with os.umask(0) would, for an instant, give files other threads create mode 0666."""
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and os.umask(0o027) == 0o027  # still set, never zeroed
    finally:
        os.umask(previous)
