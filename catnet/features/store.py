"""The feature store: per-video clip features in crash-safe safetensors shards, read lazily.

Layout (see docs/feature_store.md):

    STORE/manifest.json            backbone, weights_id, sampling + spatial config, classes, versions
    STORE/shards/PREFIX-SEQ.safetensors
                                   `features` (sum V, D) fp16, `offsets` (n+1,) int64 rows per video,
                                   `times` (sum K, 2) float32 clip start/end seconds, `labels` (n,) int64;
                                   metadata["videos"] = JSON list of {id, path, label, split, num_clips,
                                   num_crops}
    STORE/shards/PREFIX.journal    finished videos not yet in a shard (append-only, CRC-checked records)
    STORE/failures/PREFIX.jsonl    one JSON line per failed video: {id, path, reason}

A shard is only ever created by an atomic rename, so a reader (or a resumed writer) sees whole shards
or none. Writers name shards by a prefix (one per torchrun rank) so many processes can fill one store.
Each finished video is also appended (and fsynced) to the writer's journal at once, so a kill loses
none of them; the journal is emptied after every shard write and folded into a shard on restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import safetensors
import torch
from safetensors.numpy import save_file

from catnet.errors import CatnetError
from catnet.utils.io import _fsync_dir, atomic_write, atomic_write_json
from catnet.version import __version__

FORMAT = "catnet-feature-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
FAILURES = "failures"
SHARD_SUFFIX = ".safetensors"
JOURNAL_SUFFIX = ".journal"

# Journal record: header (magic, meta bytes, data bytes, CRC32 of meta + data), then the JSON meta
# (the shard's video record plus "shape": [V, D]), then features (V, D) float16 and times (K, 2)
# float32, little-endian. A kill mid-append leaves a torn last record, which the CRC exposes.
JOURNAL_MAGIC = b"CNJ1"
_JOURNAL_HEAD = struct.Struct("<4sIQI")

# Manifest keys that define what the features *are*; a store refuses writers that disagree on any.
COMPAT_KEYS = ("format_version", "backbone", "weights_id", "num_features", "sampling", "spatial", "classes")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class VideoFeatures:
    """One video's clip features. View v of clip k under crop c is row v = k * num_crops + c."""

    id: str
    path: str
    label: int  # index into the store's classes, -1 when unknown
    split: str
    features: np.ndarray  # (V, D) float32, V = num_clips * num_crops
    times: np.ndarray  # (K, 2) float32 clip start/end in seconds
    num_clips: int
    num_crops: int


# --------------------------------------------------------------------------------------------- reading


def read_shard_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, read directly: opening 10^4 shards stays cheap."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, header length n): tensor data starts at byte 8 + n."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError("tensor data beyond end of file (truncated copy?)")
        return header, n
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CatnetError(f"corrupt feature shard {path}: {e}; delete it and rerun extraction") from None


def read_shard_videos(path: Path) -> list[dict[str, Any]]:
    return _videos(path, read_shard_header(path))


def _videos(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    meta = header.get("__metadata__") or {}
    try:
        return json.loads(meta["videos"])
    except (KeyError, ValueError):
        raise CatnetError(f"feature shard {path} has no 'videos' metadata (not a catnet shard)") from None


def journal_record(rec: dict[str, Any], features: np.ndarray, times: np.ndarray) -> bytes:
    """One self-describing journal record for a finished video (see JOURNAL_MAGIC for the layout)."""
    meta = json.dumps({**rec, "shape": list(features.shape)}).encode("utf-8")
    data = np.ascontiguousarray(features, "<f2").tobytes() + np.ascontiguousarray(times, "<f4").tobytes()
    crc = zlib.crc32(data, zlib.crc32(meta))
    return _JOURNAL_HEAD.pack(JOURNAL_MAGIC, len(meta), len(data), crc) + meta + data


def read_journal(path: str | os.PathLike) -> tuple[list[tuple[dict[str, Any], np.ndarray, np.ndarray]], int]:
    """The valid records of a journal as (record, features fp16 (V, D), times (K, 2)), and the bytes they
    span. Reading stops at the first torn or invalid record: everything after it is a killed append."""
    try:
        buf = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    out, pos, head = [], 0, _JOURNAL_HEAD.size
    while pos + head <= len(buf):
        magic, n_meta, n_data, crc = _JOURNAL_HEAD.unpack_from(buf, pos)
        end = pos + head + n_meta + n_data
        if magic != JOURNAL_MAGIC or end > len(buf):
            break
        meta, data = buf[pos + head: pos + head + n_meta], buf[pos + head + n_meta: end]
        if zlib.crc32(data, zlib.crc32(meta)) != crc:
            break
        try:
            rec = json.loads(meta)
            v, d = (int(x) for x in rec.pop("shape"))
            k = int(rec["num_clips"])
            if n_data != v * d * 2 + k * 2 * 4:
                break
            feats = np.frombuffer(data, "<f2", v * d).reshape(v, d).astype(np.float16)
            times = np.frombuffer(data, "<f4", k * 2, offset=v * d * 2).reshape(k, 2).astype(np.float32)
        except (ValueError, KeyError, TypeError):
            break
        out.append((rec, feats, times))
        pos = end
    return out, pos


def _journals(root: Path) -> list[Path]:
    return sorted((root / SHARDS).glob("*" + JOURNAL_SUFFIX))


def _read_failures(root: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((root / FAILURES).glob("*.jsonl")):
        for line in p.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by power loss mid-append; the video is simply retried
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
    return out


_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


@dataclass
class _ShardLayout:
    """Byte positions of a shard's tensors (from its safetensors header) and its per-video row offsets."""

    starts: dict[str, int]
    shapes: dict[str, list[int]]
    dtypes: dict[str, np.dtype]
    row_bytes: dict[str, int]
    rows: np.ndarray | None = None  # feature rows of video i: rows[i]:rows[i + 1]
    clip_rows: np.ndarray | None = None  # same for `times`

    @classmethod
    def parse(cls, path: Path, header: dict[str, Any], n: int) -> _ShardLayout:
        starts, shapes, dtypes = {}, {}, {}
        try:
            for name in ("features", "offsets", "times"):
                t = header[name]
                starts[name] = 8 + n + int(t["data_offsets"][0])
                shapes[name] = [int(x) for x in t["shape"]]
                dtypes[name] = _DTYPES[t["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CatnetError(f"corrupt feature shard {path}: bad or missing tensor entry ({e}); delete it "
                              "and rerun extraction") from None
        row_bytes = {k: dtypes[k].itemsize * int(np.prod(shapes[k][1:], dtype=np.int64)) for k in shapes}
        return cls(starts, shapes, dtypes, row_bytes)

    def video_rows(self, row: int) -> tuple[int, int]:
        """The feature rows [start, stop) of the shard's video number `row`."""
        return int(self.rows[row]), int(self.rows[row + 1])


class FeatureStore:
    """Read a feature store: `store[id_or_index] -> VideoFeatures`, `len`, iteration, splits.

    Opening reads only the manifest and shard headers; features are read per video with one `pread`,
    with at most `max_open` shard files open at a time (LRU). Videos are ordered
    by id, so a store reads the same whichever number of processes wrote it. Videos of an interrupted
    (or running) extraction that are still in a writer's journal are read from it too, read-only.
    """

    def __init__(self, path: str | os.PathLike, max_open: int = 128):
        self.root = Path(path)
        if not (self.root / MANIFEST).is_file():
            if not self.root.exists():
                raise CatnetError(f"feature store not found: {self.root}")
            raise CatnetError(f"{self.root} is not a feature store (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads((self.root / MANIFEST).read_text())
        except ValueError as e:
            raise CatnetError(f"corrupt manifest in {self.root}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise CatnetError(f"{self.root / MANIFEST} is not a catnet feature-store manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CatnetError(f"feature store {self.root} has format version "
                              f"{self.manifest['format_version']}; this catnet reads <= {FORMAT_VERSION}")
        self.max_open = max(1, int(max_open))
        self._index: list[tuple[str, int, dict[str, Any]]] | None = None  # (shard name, row, record)
        self._by_id: dict[str, int] = {}
        self._ids: list[str] = []
        self._labels = np.zeros(0, np.int64)
        self._open: OrderedDict[str, int] = OrderedDict()  # shard name -> file descriptor (LRU)
        self._layouts: dict[str, _ShardLayout] = {}
        self._shard_dir = str(self.root / SHARDS)
        self._journaled: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # id -> (features fp16, times)

    # pickling (DataLoader workers) drops open descriptors; each process reopens its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    @property
    def shards(self) -> list[Path]:
        return sorted((self.root / SHARDS).glob("*" + SHARD_SUFFIX))

    def _build_index(self) -> list[tuple[str, int, dict[str, Any]]]:
        if self._index is None:
            entries: dict[str, tuple[str, int, dict[str, Any]]] = {}
            want = self.manifest.get("num_features")
            # journals before shards: a flush in between moves records into a shard listed afterwards
            journaled = {}
            for journal in _journals(self.root):
                for rec, feats, times in read_journal(journal)[0]:
                    if want and feats.shape[1] != want:
                        raise CatnetError(f"journal {journal} holds {feats.shape[1]}-d features but the "
                                          f"store's manifest says {want}; it does not belong to this store")
                    journaled.setdefault(rec["id"], (rec, feats, times))
            for shard in self.shards:
                # a foreign or hand-edited shard of another width would fail deep inside a head; say so here
                header = read_shard_header(shard)
                shape = (header.get("features") or {}).get("shape") or [0, want]
                if want and len(shape) == 2 and shape[1] != want:
                    raise CatnetError(f"feature shard {shard} holds {shape[1]}-d features but the store's "
                                      f"manifest says {want}; it does not belong to this store")
                for row, rec in enumerate(_videos(shard, header)):
                    entries.setdefault(rec["id"], (shard.name, row, rec))  # first shard wins on duplicates
            # "" marks a journal entry; a shard wins over a journal record (flushed, not yet truncated)
            self._journaled = {vid: (f, t) for vid, (rec, f, t) in journaled.items() if vid not in entries}
            entries.update({vid: ("", -1, journaled[vid][0]) for vid in self._journaled})
            self._index = [entries[k] for k in sorted(entries)]
            self._by_id = {rec["id"]: i for i, (_, _, rec) in enumerate(self._index)}
            self._ids = [rec["id"] for _, _, rec in self._index]
            self._labels = np.array([rec["label"] for _, _, rec in self._index], dtype=np.int64)
        return self._index

    @property
    def ids(self) -> list[str]:
        """Video ids in store order (sorted); a shared list, do not modify."""
        self._build_index()
        return self._ids

    def __len__(self) -> int:
        return len(self._build_index())

    def __contains__(self, video_id: str) -> bool:
        self._build_index()
        return video_id in self._by_id

    def records(self) -> list[dict[str, Any]]:
        """Per-video metadata (id, path, label, split, num_clips, num_crops) without reading features."""
        return [dict(rec) for _, _, rec in self._build_index()]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class indices in store order, -1 for unlabelled videos."""
        self._build_index()
        return self._labels.copy()

    def split(self, name: str) -> list[int]:
        """Indices of the videos in split `name` (e.g. "train", "val", "test1")."""
        return [i for i, (_, _, rec) in enumerate(self._build_index()) if rec.get("split") == name]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Failed videos still missing from the store, one record per id (the latest reason)."""
        self._build_index()
        latest = {rec["id"]: rec for rec in _read_failures(self.root)}
        return [rec for vid, rec in sorted(latest.items()) if vid not in self._by_id]

    def _fd(self, shard: str) -> int:
        fd = self._open.pop(shard, None)
        if fd is None:
            fd = os.open(os.path.join(self._shard_dir, shard), os.O_RDONLY)
            while len(self._open) >= self.max_open:
                os.close(self._open.popitem(last=False)[1])
        self._open[shard] = fd
        return fd

    def _layout(self, shard: str) -> _ShardLayout:
        """Where each tensor's bytes lie in a shard, and its per-video row offsets (cached per shard)."""
        layout = self._layouts.get(shard)
        if layout is None:
            path = self.root / SHARDS / shard
            header, n = _read_header(path)
            layout = _ShardLayout.parse(path, header, n)
            offsets = self._pread(shard, layout, "offsets", 0, layout.shapes["offsets"][0]).astype(np.int64)
            recs = _videos(path, header)
            clips = np.concatenate([[0], np.cumsum([r["num_clips"] for r in recs])]).astype(np.int64)
            layout.rows, layout.clip_rows = offsets, clips
            self._layouts[shard] = layout
        return layout

    def _pread(self, shard: str, layout: _ShardLayout, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name`, read with one pread straight into the result.

        A pread rather than a memory map: no page fault per 4 KB, no shared file position, and an
        uninitialised destination (np.empty), so nothing is written twice.
        """
        out = np.empty((stop - start, *layout.shapes[name][1:]), layout.dtypes[name])
        offset = layout.starts[name] + start * layout.row_bytes[name]
        if out.size and os.preadv(self._fd(shard), [out], offset) != out.nbytes:
            raise CatnetError(f"corrupt feature shard {self.root / SHARDS / shard}: {name} rows "
                              f"{start}-{stop} cut short; delete it and rerun extraction")
        return out

    def read_features(self, key: int | str) -> np.ndarray:
        """One video's (V, D) features in the stored dtype (float16), without the float32 copy.

        Always the whole video in one pread, even when training keeps only a few views: on a cold
        disk, one read of 120 KB beat several reads of 4-20 KB (docs/benchmarks.md).
        """
        shard, row, rec = self._build_index()[self._position(key)]
        if not shard:
            return self._journaled[rec["id"]][0]
        layout = self._layout(shard)
        return self._pread(shard, layout, "features", *layout.video_rows(row))

    def will_need(self, indices: Sequence[int]) -> None:
        """Ask the kernel to start reading these videos' features now (posix_fadvise WILLNEED).

        Returns at once; the reads run in the background, so a loader that names its next batches
        here finds them in the page cache instead of waiting on the disk one video at a time.
        """
        if not hasattr(os, "posix_fadvise"):  # not on macOS: reads are then simply not hinted
            return
        index = self._build_index()
        for i in indices:
            shard, row, _ = index[i]
            if shard:
                layout = self._layout(shard)
                a, b = layout.video_rows(row)
                size = layout.row_bytes["features"]
                os.posix_fadvise(self._fd(shard), layout.starts["features"] + a * size, (b - a) * size,
                                 os.POSIX_FADV_WILLNEED)

    def num_views(self, key: int | str) -> int:
        """How many views (clip x crop feature rows) a video has, without reading its features."""
        shard, row, rec = self._build_index()[self._position(key)]
        if not shard:
            return int(self._journaled[rec["id"]][0].shape[0])
        a, b = self._layout(shard).video_rows(row)
        return b - a

    def _position(self, key: int | str) -> int:
        if isinstance(key, str):
            self._build_index()
            if key not in self._by_id:
                raise KeyError(key)
            return self._by_id[key]
        return key

    def __getitem__(self, key: int | str) -> VideoFeatures:
        shard, row, rec = self._build_index()[self._position(key)]
        feats = self.read_features(key)
        if not shard:
            times = self._journaled[rec["id"]][1]
        else:
            layout = self._layout(shard)
            times = self._pread(shard, layout, "times", int(layout.clip_rows[row]),
                                int(layout.clip_rows[row + 1]))
        return VideoFeatures(id=rec["id"], path=rec.get("path", ""), label=int(rec["label"]),
                             split=rec.get("split", ""), features=np.asarray(feats, dtype=np.float32),
                             times=np.asarray(times, dtype=np.float32), num_clips=int(rec["num_clips"]),
                             num_crops=int(rec["num_crops"]))

    def nonfinite_ids(self, indices: Sequence[int] | None = None) -> list[str]:
        """Ids of the videos (among `indices`, default all) with any NaN/Inf feature, in store order.

        Reads each shard's features once, vectorised: one extra pass per training run (not per epoch),
        so trainers refuse a poisoned store before the first step instead of mid-epoch.
        """
        index = self._build_index()
        wanted = range(len(index)) if indices is None else sorted(set(int(i) for i in indices))
        rows_by_shard: dict[str, list[tuple[int, int]]] = {}
        bad = []
        for i in wanted:
            shard, row, rec = index[i]
            if not shard:
                if not np.isfinite(self._journaled[rec["id"]][0]).all():
                    bad.append(i)
                continue
            rows_by_shard.setdefault(shard, []).append((row, i))
        for shard, rows in rows_by_shard.items():
            layout = self._layout(shard)
            offsets = layout.rows
            feats = self._pread(shard, layout, "features", 0, int(offsets[-1]))
            finite = np.isfinite(feats).all(axis=1)
            bad += [i for row, i in rows if not finite[offsets[row]: offsets[row + 1]].all()]
        return [self._ids[i] for i in sorted(bad)]

    def __iter__(self) -> Iterator[VideoFeatures]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown `os` may already be gone
            self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, backbone={self.manifest.get('backbone')!r})"

    @staticmethod
    def write_synthetic(path: str | os.PathLike, features: np.ndarray | Sequence[np.ndarray],
                        labels: Sequence[int], classes: Sequence[str], *, ids: Sequence[str] | None = None,
                        splits: Sequence[str] | str = "train", times: Sequence[np.ndarray] | None = None,
                        num_crops: int = 1, shard_size: int = 16, backbone: str = "synthetic",
                        **manifest_extra: Any) -> FeatureStore:
        """Fabricate a store from arrays, for tests and toy data.

        `features` is (N, V, D) or a list of (V_i, D); V_i must be a multiple of `num_crops`.
        Clip times default to consecutive one-second clips.
        """
        feats = [np.asarray(x, dtype=np.float32) for x in features]
        n = len(feats)
        if n == 0 or any(x.ndim != 2 for x in feats):
            raise CatnetError("write_synthetic needs a non-empty list of (V, D) feature arrays")
        dims = {x.shape[1] for x in feats}
        if len(dims) != 1:
            raise CatnetError(f"all videos need the same feature dim, got {sorted(dims)}")
        if len(labels) != n:
            raise CatnetError(f"{len(labels)} labels for {n} videos")
        ids = list(ids) if ids is not None else [f"video{i:06d}" for i in range(n)]
        splits = [splits] * n if isinstance(splits, str) else list(splits)
        manifest = make_manifest(backbone=backbone, weights_id=manifest_extra.pop("weights_id", "synthetic"),
                                 num_features=dims.pop(), sampling=manifest_extra.pop("sampling", {}),
                                 spatial=manifest_extra.pop("spatial", {"num_crops": num_crops}),
                                 classes=list(classes), **manifest_extra)
        # no journal: a fabricated store is rewritten from its arrays, not resumed
        with StoreWriter(path, manifest, shard_size=shard_size, flush_seconds=None, journal=False) as writer:
            for i, x in enumerate(feats):
                k = x.shape[0] // num_crops
                t = times[i] if times is not None else np.stack([np.arange(k), np.arange(k) + 1.0], 1)
                writer.add(ids[i], x, t, label=int(labels[i]), split=splits[i], num_crops=num_crops)
        return FeatureStore(path)


# --------------------------------------------------------------------------------------------- writing


def make_manifest(*, backbone: str, weights_id: str, num_features: int, sampling: dict[str, Any],
                  spatial: dict[str, Any], classes: list[str], **extra: Any) -> dict[str, Any]:
    """A manifest dict: what produced the features, plus library versions for provenance."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": backbone,
            "weights_id": weights_id, "num_features": int(num_features), "sampling": dict(sampling),
            "spatial": dict(spatial), "classes": list(classes), "feature_dtype": "float16",
            "versions": {"catnet": __version__, "torch": torch.__version__, "av": av.__version__,
                         "numpy": np.__version__, "safetensors": safetensors.__version__},
            **extra}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))  # tuples -> lists, so comparisons with a stored manifest work


def manifest_mismatch(existing: dict[str, Any], new: dict[str, Any],
                      keys: Sequence[str] = COMPAT_KEYS) -> list[str]:
    """The `keys` on which two manifests disagree, as 'key: old != new' strings."""
    existing, new = _jsonable(existing), _jsonable(new)
    out = []
    for key in keys:
        a, b = existing.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = [f"{key}.{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
                out.extend(diff)
            elif key == "classes":
                out.append(f"classes: {len(a or [])} stored != {len(b or [])} requested (or different names)")
            else:
                out.append(f"{key}: {a!r} != {b!r}")
    return out


class StoreWriter:
    """Append videos to a store; every `shard_size` videos (or `flush_seconds`) become one shard.

    Opening checks `manifest` against an existing store's and refuses a mismatch (CatnetError), writes
    the manifest if the store is new, removes temporaries a killed writer with the same prefix left
    behind, and folds that writer's journal into a shard (`num_recovered` videos). Use one prefix per
    concurrent writer (extraction uses `rank000`, `rank001`, ...).
    Each added video is appended (and fsynced) to shards/PREFIX.journal before `add` returns, unless
    `journal=False`; failures are appended (and fsynced) to failures/PREFIX.jsonl immediately.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any], *, prefix: str = "rank000",
                 shard_size: int = 16, flush_seconds: float | None = 60.0, journal: bool = True):
        if not _PREFIX_RE.match(prefix):
            raise CatnetError(f"shard prefix must be letters, digits or '_', got {prefix!r}")
        if shard_size < 1:
            raise CatnetError(f"shard size must be >= 1, got {shard_size}")
        self.root = Path(path)
        self.prefix = prefix
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        if self.root.exists() and not self.root.is_dir():
            raise CatnetError(f"feature store path {self.root} exists and is not a directory")
        (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.root / FAILURES).mkdir(parents=True, exist_ok=True)
        self.manifest = check_or_write_manifest(self.root, manifest)
        self._remove_stale_temps()
        seqs = [int(p.stem.rsplit("-", 1)[1]) for p in (self.root / SHARDS).glob(f"{prefix}-*{SHARD_SUFFIX}")
                if p.stem.rsplit("-", 1)[1].isdigit()]
        self._seq = max(seqs, default=-1) + 1
        self._buf: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []
        self._last_flush = time.monotonic()
        self.num_written = 0
        self.num_failed = 0
        self.shards_written: list[Path] = []
        self.journal = journal
        self.journal_path = self.root / SHARDS / f"{prefix}{JOURNAL_SUFFIX}"
        self._journal_fd: int | None = None
        self.num_recovered = self._recover_journal()

    def _recover_journal(self) -> int:
        """Fold the valid records a killed writer with our prefix left in its journal into a shard."""
        if not self.journal_path.exists():
            return 0
        records, _ = read_journal(self.journal_path)  # a torn tail (kill mid-append) is dropped
        # a kill between a shard's rename and the journal's truncation leaves records that are also in
        # that shard: the shard wins
        done = set()
        for shard in (self.root / SHARDS).glob("*" + SHARD_SUFFIX):
            done.update(rec["id"] for rec in read_shard_videos(shard))
        for rec, feats, times in records:
            if rec["id"] not in done:
                done.add(rec["id"])
                self._buf.append((rec, feats, times))
        n = len(self._buf)
        if not self.flush():  # nothing new: still drop the duplicates or the torn tail
            self._truncate_journal()
        return n

    def _journal_append(self, record: bytes) -> None:
        if self._journal_fd is None:
            created = not self.journal_path.exists()
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:
                _fsync_dir(self.journal_path.parent)  # the file's name must survive a power loss too
        view = memoryview(record)
        while view:  # os.write may write less than asked for a large record
            view = view[os.write(self._journal_fd, view):]
        os.fsync(self._journal_fd)

    def _truncate_journal(self) -> None:
        if self._journal_fd is not None:
            os.ftruncate(self._journal_fd, 0)
            os.fsync(self._journal_fd)
        elif self.journal_path.exists():
            with open(self.journal_path, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())

    def _remove_stale_temps(self) -> None:
        # only our own prefix: another rank may be mid-write right now
        for p in (self.root / SHARDS).glob(f".{self.prefix}-*.tmp"):
            p.unlink(missing_ok=True)

    def add(self, video_id: str, features: np.ndarray, times: np.ndarray, *, label: int = -1,
            split: str = "", path: str = "", num_crops: int = 1) -> None:
        """Buffer one video's (V, D) features and (K, 2) clip times; flushes when due."""
        features = np.asarray(features)
        times = np.asarray(times, dtype=np.float32).reshape(-1, 2)
        if features.ndim != 2 or features.shape[0] == 0:
            raise CatnetError(f"features of {video_id!r} must be (V, D) with V > 0, got {features.shape}")
        if features.shape[0] != times.shape[0] * num_crops:
            raise CatnetError(f"{video_id!r}: {features.shape[0]} views != {times.shape[0]} clips x "
                              f"{num_crops} crops")
        d = self.manifest.get("num_features")
        if d and features.shape[1] != d:
            raise CatnetError(f"{video_id!r}: feature dim {features.shape[1]} != store's {d}")
        rec = {"id": str(video_id), "path": str(path), "label": int(label), "split": str(split),
               "num_clips": int(times.shape[0]), "num_crops": int(num_crops)}
        features = features.astype(np.float16)
        if self.journal:  # durable before add returns: a kill from here on costs nothing finished
            self._journal_append(journal_record(rec, features, times))
        self._buf.append((rec, features, times))
        if len(self._buf) >= self.shard_size or (
                self.flush_seconds is not None and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def add_failure(self, video_id: str, path: str, reason: str) -> None:
        line = json.dumps({"id": str(video_id), "path": str(path), "reason": str(reason)}) + "\n"
        # one small O_APPEND write + fsync: a kill leaves either the whole line or none of it
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = os.open(self.root / FAILURES / f"{self.prefix}.jsonl", flags, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.num_failed += 1

    def flush(self) -> Path | None:
        """Write the buffered videos as one shard (atomically); returns its path, None if nothing to do."""
        self._last_flush = time.monotonic()
        if not self._buf:
            return None
        recs = [r for r, _, _ in self._buf]
        feats = np.concatenate([f for _, f, _ in self._buf])
        tensors = {
            "features": np.ascontiguousarray(feats),
            "offsets": np.concatenate([[0], np.cumsum([len(f) for _, f, _ in self._buf])]).astype(np.int64),
            "times": np.ascontiguousarray(np.concatenate([t for _, _, t in self._buf])),
            "labels": np.array([r["label"] for r in recs], dtype=np.int64),
        }
        metadata = {"videos": json.dumps(recs), "format": FORMAT, "format_version": str(FORMAT_VERSION)}
        path = self.root / SHARDS / f"{self.prefix}-{self._seq:06d}{SHARD_SUFFIX}"
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        # only once the shard is durable; a kill in between leaves duplicates that recovery drops
        self._truncate_journal()
        self._seq += 1
        self.num_written += len(recs)
        self._buf.clear()
        self.shards_written.append(path)
        return path

    def close(self) -> None:
        """Flush, and remove the (now empty) journal: a finished store has shards only."""
        self.flush()
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self.journal_path.exists() and self.journal_path.stat().st_size == 0:
            self.journal_path.unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an exception keep what was finished (it is in the journal anyway)
        self.close()


def check_manifest(root: str | os.PathLike, manifest: dict[str, Any],
                   keys: Sequence[str] = COMPAT_KEYS) -> dict[str, Any] | None:
    """The existing manifest of store `root` (None if new); CatnetError if it differs on `keys`."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        existing = json.loads(path.read_text())
    except ValueError as e:
        raise CatnetError(f"corrupt manifest {path}: {e}") from None
    diff = manifest_mismatch(existing, manifest, keys)
    if diff:
        raise CatnetError(f"{root} was extracted with different settings ({'; '.join(diff[:4])}); "
                          "use a new --out folder or the same settings")
    return existing


def check_or_write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refuse a store made with different settings; create the manifest of a new store.

    Several ranks may race here on a new store: each writes the same manifest atomically, so the
    last rename wins with identical compat keys.
    """
    existing = check_manifest(root, manifest)
    if existing is not None:
        return existing
    path = root / MANIFEST
    for p in root.glob(f".{MANIFEST}.*.tmp"):
        if time.time() - p.stat().st_mtime > 60:  # a fresh one may be another rank's, mid-write
            p.unlink(missing_ok=True)
    atomic_write_json(path, _jsonable(manifest))
    return _jsonable(manifest)


def done_and_failed(root: str | os.PathLike) -> tuple[set[str], set[str]]:
    """Ids already in the store (shards or journals), and ids recorded as failed (and not since finished)."""
    root = Path(root)
    done = set()
    for journal in _journals(root):  # before the shards, as in FeatureStore
        done.update(rec["id"] for rec, _, _ in read_journal(journal)[0])
    for shard in sorted((root / SHARDS).glob("*" + SHARD_SUFFIX)):
        done.update(rec["id"] for rec in read_shard_videos(shard))
    failed = {rec["id"] for rec in _read_failures(root)} - done
    return done, failed
