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
import hashlib
import json
import math
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

from catnet.errors import CatnetError, quoted
from catnet.utils.io import _fsync_dir, atomic_write, atomic_write_json, current_umask
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
# Of those, what made the feature values themselves: a reader refuses a shard whose recorded digest
# differs from its manifest on any of these. Class names are labels: renaming them in a manifest by hand
# relabels a store, it does not make its features wrong.
FEATURE_KEYS = ("backbone", "weights_id", "num_features", "sampling", "spatial")

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


def _json(data: bytes | str, what: str) -> Any:
    """Parsed JSON, or a one-line CatnetError naming `what`: bad syntax, bad UTF-8, or nesting deep enough
    to exhaust the parser's recursion limit (a hand-made or damaged file)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError, TypeError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise CatnetError(f"{what}: not valid JSON ({why})") from None


def _dumps(obj: Any) -> str:
    # ASCII escapes: a non-UTF-8 file name arrives as a surrogate-escaped str (os.fsdecode) and would make
    # any UTF-8 encoder fail; "\udcff" in JSON reads back as the same str, so ids round-trip exactly.
    return json.dumps(obj, ensure_ascii=True)


def _is_int(x: Any, low: int = 0, high: int = 2**62) -> bool:
    """An int (not a bool) in [low, high): what int64 arrays and their sums hold safely."""
    return isinstance(x, int) and not isinstance(x, bool) and low <= x < high


def read_shard_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, read directly: opening 10^4 shards stays cheap."""
    return _read_header(Path(path))[0]


def _corrupt(path: Path, why: str) -> CatnetError:
    return CatnetError(f"corrupt feature shard {quoted(path)}: {why}; delete it and rerun extraction")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, header length n): tensor data starts at byte 8 + n. Every tensor entry is checked (dtype,
    shape, byte range that fits the file and matches its shape), so reads at its offsets are safe."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise _corrupt(path, "file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise _corrupt(path, "header length beyond end of file")
            raw = f.read(n)
    except OSError as e:
        raise _corrupt(path, e.strerror or str(e)) from None
    try:
        header = _json(raw, "header")
    except CatnetError as e:
        raise _corrupt(path, str(e)) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
                raise _corrupt(path, "__metadata__ is not a mapping of strings")
            continue
        end = max(end, _tensor_end(path, name, t))
    if 8 + n + end > size:
        raise _corrupt(path, "tensor data beyond end of file (truncated copy?)")
    return header, n


def _tensor_end(path: Path, name: str, t: Any) -> int:
    """The end of tensor `name`'s bytes, after checking its header entry."""
    if not isinstance(t, dict):
        raise _corrupt(path, f"tensor {name!r} entry is not an object")
    shape, offsets, dtype = t.get("shape"), t.get("data_offsets"), t.get("dtype")
    if not isinstance(shape, list) or not all(_is_int(x) for x in shape):
        raise _corrupt(path, f"tensor {name!r} has a bad shape {shape!r}"[:200])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has bad data_offsets {offsets!r}"[:200])
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r} has a bad dtype {dtype!r}"[:200])
    if dtype in _DTYPES and offsets[1] - offsets[0] != _DTYPES[dtype].itemsize * math.prod(shape):
        raise _corrupt(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape}")
    return offsets[1]


def read_shard_videos(path: Path) -> list[dict[str, Any]]:
    return _videos(path, read_shard_header(path))


def _check_record(rec: Any) -> str | None:
    """Why a video record (shard metadata, journal) is malformed, or None."""
    if not isinstance(rec, dict):
        return "a video record is not an object"
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        return "a video record has no string id"
    if not _is_int(rec.get("label"), -1, 2**31) or not _is_int(rec.get("num_clips"), 1, 2**31) \
            or not _is_int(rec.get("num_crops"), 1, 2**31):
        return f"video {quoted(rec['id'])} has a bad label, num_clips or num_crops"
    if not all(isinstance(rec.get(k, ""), str) for k in ("path", "split", "group")):
        return f"video {quoted(rec['id'])} has a non-string path, split or group"
    return None


def _videos(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    meta = header.get("__metadata__") or {}
    if "videos" not in meta:
        raise CatnetError(f"feature shard {quoted(path)} has no 'videos' metadata (not a catnet shard)")
    try:
        videos = _json(meta["videos"], "'videos' metadata")
    except CatnetError as e:
        raise _corrupt(path, str(e)) from None
    if not isinstance(videos, list):
        raise _corrupt(path, "'videos' metadata is not a list")
    for rec in videos:
        why = _check_record(rec)
        if why:
            raise _corrupt(path, why)
    return videos


def shard_compat(header: dict[str, Any]) -> dict[str, str] | None:
    """The compat digest a shard was written with (`compat_digest`), None for shards older than it."""
    raw = (header.get("__metadata__") or {}).get("compat")
    if raw is None:
        return None
    digest = _json(raw, "'compat' metadata")
    return digest if isinstance(digest, dict) else {}


def journal_record(rec: dict[str, Any], features: np.ndarray, times: np.ndarray) -> bytes:
    """One self-describing journal record for a finished video (see JOURNAL_MAGIC for the layout)."""
    meta = _dumps({**rec, "shape": list(features.shape)}).encode("ascii")
    data = np.ascontiguousarray(features, "<f2").tobytes() + np.ascontiguousarray(times, "<f4").tobytes()
    crc = zlib.crc32(data, zlib.crc32(meta))
    return _JOURNAL_HEAD.pack(JOURNAL_MAGIC, len(meta), len(data), crc) + meta + data


def _journal_entry(meta: bytes, data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray] | None:
    """A record's (rec, features, times), or None when its meta does not describe its data."""
    try:
        rec = _json(meta, "journal record")
    except CatnetError:
        return None
    shape = rec.pop("shape", None) if isinstance(rec, dict) else None
    if _check_record(rec) or not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_int, shape))):
        return None
    if not isinstance(rec.get("compat", {}), dict):
        return None
    (v, d), k = shape, rec["num_clips"]
    if len(data) != v * d * 2 + k * 2 * 4 or v != k * rec["num_crops"]:
        return None
    feats = np.frombuffer(data, "<f2", v * d).reshape(v, d).astype(np.float16)
    times = np.frombuffer(data, "<f4", k * 2, offset=v * d * 2).reshape(k, 2).astype(np.float32)
    return rec, feats, times


def read_journal(path: str | os.PathLike) -> tuple[list[tuple[dict[str, Any], np.ndarray, np.ndarray]], int]:
    """The valid records of a journal as (record, features fp16 (V, D), times (K, 2)), and the bytes they
    span. Reading stops at the first torn or invalid record: everything after it is a killed append."""
    try:
        buf = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise CatnetError(f"cannot read journal {quoted(path)}: {e.strerror or e}") from None
    out, pos, head = [], 0, _JOURNAL_HEAD.size
    while pos + head <= len(buf):
        magic, n_meta, n_data, crc = _JOURNAL_HEAD.unpack_from(buf, pos)
        end = pos + head + n_meta + n_data
        if magic != JOURNAL_MAGIC or end > len(buf):
            break
        meta, data = buf[pos + head: pos + head + n_meta], buf[pos + head + n_meta: end]
        if zlib.crc32(data, zlib.crc32(meta)) != crc:
            break
        entry = _journal_entry(meta, data)
        if entry is None:
            break
        out.append(entry)
        pos = end
    return out, pos


def _journals(root: Path) -> list[Path]:
    return sorted((root / SHARDS).glob("*" + JOURNAL_SUFFIX))


def _read_failures(root: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((root / FAILURES).glob("*.jsonl")):
        try:
            text = p.read_text(errors="replace")
        except OSError as e:
            raise CatnetError(f"cannot read failures file {quoted(p)}: {e.strerror or e}") from None
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut by power loss mid-append; the video is simply retried
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):  # anything else is not ours
                out.append({"id": rec["id"], "path": str(rec.get("path", "")),
                            "reason": str(rec.get("reason", ""))})
    return out


_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "I64": np.dtype("<i8")}
# the tensors a shard must have: (dtypes allowed, number of dimensions)
_TENSORS = {"features": (("F16",), 2), "offsets": (("I64",), 1), "times": (("F32",), 2)}


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
        """Tensor positions from a header `_read_header` checked; refuses missing or misshapen tensors."""
        starts, shapes, dtypes = {}, {}, {}
        for name, (allowed, ndim) in _TENSORS.items():
            t = header.get(name)
            if t is None or t["dtype"] not in allowed or len(t["shape"]) != ndim:
                raise _corrupt(path, f"bad or missing tensor {name!r}")
            starts[name] = 8 + n + t["data_offsets"][0]
            shapes[name] = list(t["shape"])
            dtypes[name] = _DTYPES[t["dtype"]]
        if shapes["times"][1] != 2:
            raise _corrupt(path, f"times has shape {shapes['times']}, not (K, 2)")
        row_bytes = {k: dtypes[k].itemsize * math.prod(shapes[k][1:]) for k in shapes}
        return cls(starts, shapes, dtypes, row_bytes)

    def attach(self, path: Path, offsets: np.ndarray, recs: list[dict[str, Any]]) -> None:
        """Per-video rows from the `offsets` tensor, checked against the records and tensor shapes."""
        clips = np.concatenate([[0], np.cumsum([r["num_clips"] for r in recs])]).astype(np.int64)
        views = np.array([r["num_clips"] * r["num_crops"] for r in recs], np.int64)
        if len(offsets) != len(recs) + 1 or offsets[0] != 0 or not np.array_equal(np.diff(offsets), views) \
                or offsets[-1] != self.shapes["features"][0] or clips[-1] != self.shapes["times"][0]:
            raise _corrupt(path, "row offsets disagree with its videos' clips and crops or its tensors")
        self.rows, self.clip_rows = offsets, clips

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
                raise CatnetError(f"feature store not found: {quoted(self.root)}")
            raise CatnetError(f"{quoted(self.root)} is not a feature store (no {MANIFEST})")
        self.manifest: dict[str, Any] = read_manifest(self.root)
        self._digest = compat_digest(self.manifest, FEATURE_KEYS)
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

    def _journal_entries(self) -> dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]]:
        """The valid records of every journal (read-only), checked against the manifest."""
        want, journaled = self.manifest.get("num_features"), {}
        for journal in _journals(self.root):
            for rec, feats, times in read_journal(journal)[0]:
                if want and feats.shape[1] != want:
                    raise CatnetError(f"journal {quoted(journal)} holds {feats.shape[1]}-d features but the "
                                      f"store's manifest says {want}; it does not belong to this store")
                _check_provenance(journal, rec.pop("compat", None), self._digest)
                journaled.setdefault(rec["id"], (rec, feats, times))
        return journaled

    def _build_index(self) -> list[tuple[str, int, dict[str, Any]]]:
        if self._index is None:
            entries: dict[str, tuple[str, int, dict[str, Any]]] = {}
            want = self.manifest.get("num_features")
            # journals before shards: a flush in between moves records into a shard listed afterwards
            journaled = self._journal_entries()
            for shard in self.shards:
                # a foreign or hand-edited shard of another width would fail deep inside a head; say so here
                header = read_shard_header(shard)
                shape = (header.get("features") or {}).get("shape") or [0, want]
                if want and len(shape) == 2 and shape[1] != want:
                    raise CatnetError(f"feature shard {quoted(shard)} holds {shape[1]}-d features but the "
                                      f"store's manifest says {want}; it does not belong to this store")
                _check_provenance(shard, shard_compat(header), self._digest)
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
        """Per-video metadata (id, path, label, split, num_clips, num_crops, and group / fps where recorded)
        without reading features."""
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
            layout.attach(path, offsets, _videos(path, header))
            self._layouts[shard] = layout
        return layout

    def _pread(self, shard: str, layout: _ShardLayout, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name`, read with one pread straight into the result.

        A pread rather than a memory map: no page fault per 4 KB, no shared file position, and an
        uninitialised destination (np.empty), so nothing is written twice.
        """
        out = np.empty((stop - start, *layout.shapes[name][1:]), layout.dtypes[name])
        offset = layout.starts[name] + start * layout.row_bytes[name]
        try:
            got = os.preadv(self._fd(shard), [out], offset) if out.size else 0
        except OSError as e:  # deleted or replaced under us, an I/O error
            raise _corrupt(self.root / SHARDS / shard, e.strerror or str(e)) from None
        if got != out.nbytes:
            raise _corrupt(self.root / SHARDS / shard, f"{name} rows {start}-{stop} cut short")
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

    def scan_features(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(index, (V, D) stored-dtype features) of the `indices` videos (default all), each once, with one
        read per shard: grouped by shard, not in store order. For whole passes (finiteness, statistics),
        where a pread per video would cost a disk seek each."""
        index = self._build_index()
        wanted = range(len(index)) if indices is None else sorted(set(int(i) for i in indices))
        rows_by_shard: dict[str, list[tuple[int, int]]] = {}
        for i in wanted:
            shard, row, rec = index[i]
            if shard:
                rows_by_shard.setdefault(shard, []).append((row, i))
            else:
                yield i, self._journaled[rec["id"]][0]
        for shard, rows in rows_by_shard.items():
            layout = self._layout(shard)
            offsets = layout.rows
            low, high = min(row for row, _ in rows), max(row for row, _ in rows)
            first, stop = int(offsets[low]), int(offsets[high + 1])
            feats = self._pread(shard, layout, "features", first, stop)
            for row, i in rows:
                yield i, feats[offsets[row] - first: offsets[row + 1] - first]

    def nonfinite_ids(self, indices: Sequence[int] | None = None) -> list[str]:
        """Ids of the videos (among `indices`, default all) with any NaN/Inf feature, in store order: one
        extra pass per training run (not per epoch), so trainers refuse a poisoned store before the first
        step instead of mid-epoch."""
        bad = [i for i, x in self.scan_features(indices) if not np.isfinite(x).all()]
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
                        groups: Sequence[str] | None = None,
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
                writer.add(ids[i], x, t, label=int(labels[i]), split=splits[i], num_crops=num_crops,
                           group=groups[i] if groups is not None else "")
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


def compat_digest(manifest: dict[str, Any], keys: Sequence[str] = COMPAT_KEYS) -> dict[str, str]:
    """A short hash of each compat key's value. Every shard (metadata "compat") and journal record carries
    it, so the shards themselves say which settings made them, whatever happens to the manifest."""
    m = _jsonable(manifest)
    return {k: hashlib.sha256(json.dumps(m.get(k), sort_keys=True, separators=(",", ":")).encode("ascii"))
            .hexdigest()[:16] for k in keys}


def _check_provenance(where: Path, digest: dict[str, str] | None, want: dict[str, str],
                      orphan_of: Path | None = None) -> None:
    """Refuse a shard or journal whose compat digest differs from `want` on any of want's keys. None
    (written before digests existed) passes: the manifest vouches for it. `orphan_of`: the store whose
    manifest is missing (the message then says so)."""
    if digest is None:
        return
    bad = ", ".join(k for k in want if digest.get(k) != want[k])
    if not bad:
        return
    if orphan_of is not None:
        raise CatnetError(f"{quoted(orphan_of)} has no {MANIFEST}, and {quoted(where.name)} was written "
                          f"with other extraction settings ({bad} differ); restore the manifest or use a new "
                          "--out")
    raise CatnetError(f"{quoted(where)} was written with other extraction settings than {MANIFEST} ({bad} "
                      "differ); it does not belong to this store")


def _check_manifest_types(m: Any, path: Path) -> dict[str, Any]:
    """A manifest's JSON, checked for the types readers rely on."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CatnetError(f"{quoted(path)} is not a catnet feature-store manifest")
    version = m.get("format_version", 0)
    if not _is_int(version):
        raise CatnetError(f"corrupt manifest {quoted(path)}: format_version {version!r:.40} is not an "
                          "integer")
    if version > FORMAT_VERSION:
        shown = str(version) if version < 10**12 else "beyond 10^12"
        raise CatnetError(f"feature store {quoted(path.parent)} has format version {shown}; this "
                          f"catnet reads <= {FORMAT_VERSION}")
    types = {"backbone": str, "weights_id": str, "sampling": dict, "spatial": dict, "classes": list,
             "versions": dict}
    for key, tp in types.items():
        if m.get(key) is not None and not isinstance(m[key], tp):
            raise CatnetError(f"corrupt manifest {quoted(path)}: {key} must be a {tp.__name__}")
    if not all(isinstance(c, str) for c in m.get("classes") or []):
        raise CatnetError(f"corrupt manifest {quoted(path)}: classes must be strings")
    if m.get("num_features") is not None and not _is_int(m["num_features"], 1):
        raise CatnetError(f"corrupt manifest {quoted(path)}: num_features must be a positive integer")
    return m


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """Store `root`'s manifest, checked (one-line CatnetError if damaged); None if it has none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CatnetError(f"cannot read {quoted(path)}: {e.strerror or e}") from None
    return _check_manifest_types(_json(raw, f"corrupt manifest {quoted(path)}"), path)


def manifest_mismatch(existing: dict[str, Any], new: dict[str, Any],
                      keys: Sequence[str] = COMPAT_KEYS) -> list[str]:
    """The `keys` on which two manifests disagree, as 'key: old != new' strings."""
    existing, new = _jsonable(existing), _jsonable(new)
    out = []
    for key in keys:
        a, b = existing.get(key), new.get(key)
        if a != b:
            if key == "sampling" and _is_dense(a) != _is_dense(b):  # never mixed: rows mean other things
                out.append(f"sampling: {_describe_sampling(a)} != {_describe_sampling(b)}")
            elif isinstance(a, dict) and isinstance(b, dict):
                diff = [f"{key}.{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
                out.extend(diff)
            elif key == "classes":
                out.append(f"classes: {len(a or [])} stored != {len(b or [])} requested (or different names)")
            else:
                out.append(f"{key}: {a!r} != {b!r}")
    return out


def _is_dense(sampling: Any) -> bool:
    return isinstance(sampling, dict) and sampling.get("mode") == "dense"


def _describe_sampling(sampling: Any) -> str:
    if not isinstance(sampling, dict):
        return repr(sampling)
    if _is_dense(sampling):
        hop = sampling.get("hop") or (f"{sampling['hop_seconds']} s" if sampling.get("hop_seconds")
                                      else "= span")
        return f"dense windows of {sampling.get('window')} frames, hop {hop}"
    return f"K clips ({sampling.get('num_clips')} clips x {sampling.get('clip_len')} frames)"


def _check_orphans(root: Path, manifest: dict[str, Any], keys: Sequence[str]) -> None:
    """A store without a manifest may be rebuilt only from shards and journals that record (and agree
    with) the new settings: refuse any of unknown or other provenance."""
    want = compat_digest(manifest, keys)
    for shard in sorted((root / SHARDS).glob("*" + SHARD_SUFFIX)):
        header = read_shard_header(shard)
        digest = shard_compat(header)
        if digest is None:
            raise CatnetError(f"{quoted(root)} has shards but no {MANIFEST}, and {quoted(shard.name)} does "
                              "not record its extraction settings; restore the manifest or use a new --out")
        _check_provenance(shard, digest, want, root)
    for journal in _journals(root):
        for rec, _, _ in read_journal(journal)[0]:
            if rec.get("compat") is None:
                raise CatnetError(f"{quoted(root)} has a journal but no {MANIFEST}, and "
                                  f"{quoted(journal.name)} does not record its settings; restore the "
                                  "manifest or use a new --out")
            _check_provenance(journal, rec["compat"], want, root)


def check_manifest(root: str | os.PathLike, manifest: dict[str, Any],
                   keys: Sequence[str] = COMPAT_KEYS) -> dict[str, Any] | None:
    """The existing manifest of store `root` (None if new); CatnetError if it differs on `keys`, or if
    the manifest is missing and shards of unknown or other settings are there."""
    root = Path(root)
    existing = read_manifest(root)
    if existing is None:
        _check_orphans(root, manifest, keys)
        return None
    diff = manifest_mismatch(existing, manifest, keys)
    if diff:
        raise CatnetError(f"{quoted(root)} was extracted with different settings ({'; '.join(diff[:4])}); "
                          "use a new --out folder or the same settings")
    return existing


def check_or_write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refuse a store made with different settings; create the manifest of a new store (or of one whose
    manifest was lost, from shards that record these very settings).

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


def _file_mode() -> int:
    """What open() would give a new file under the current umask (usually 0644)."""
    umask = current_umask()
    return 0o666 & ~umask


@contextlib.contextmanager
def _writing(root: Path) -> Iterator[None]:
    """A full disk, a read-only or vanished folder: one line. What was finished stays in the journal
    (a torn last record is dropped on the next run), so nothing is lost."""
    try:
        yield
    except OSError as e:
        raise CatnetError(f"cannot write feature store {quoted(root)}: {e.strerror or e}; what was finished "
                          "is kept, rerun to resume") from None


class StoreWriter:
    """Append videos to a store; every `shard_size` videos (or `flush_seconds`) become one shard.

    Opening checks `manifest` against an existing store's and refuses a mismatch (CatnetError), writes
    the manifest if the store is new, removes temporaries a killed writer with the same prefix left
    behind, and folds that writer's journal into a shard (`num_recovered` videos). Use one prefix per
    concurrent writer (extraction uses `rank000`, `rank001`, ...).
    Each added video is appended (and fsynced) to shards/PREFIX.journal before `add` returns, unless
    `journal=False`; failures are appended (and fsynced) to failures/PREFIX.jsonl immediately. Every
    shard and journal record carries `compat_digest(manifest)`; OSErrors (a full disk) are CatnetErrors.
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
            raise CatnetError(f"feature store path {quoted(self.root)} exists and is not a directory")
        with _writing(self.root):
            (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
            (self.root / FAILURES).mkdir(parents=True, exist_ok=True)
            self.manifest = check_or_write_manifest(self.root, manifest)
            self.compat = compat_digest(self.manifest)
            self._features_digest = compat_digest(self.manifest, FEATURE_KEYS)
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
        self._mode = _file_mode()
        with _writing(self.root):
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
            header = read_shard_header(shard)
            _check_provenance(shard, shard_compat(header), self._features_digest)
            done.update(rec["id"] for rec in _videos(shard, header))
        for rec, feats, times in records:
            _check_provenance(self.journal_path, rec.pop("compat", None), self._features_digest)
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
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
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
            split: str = "", path: str = "", num_crops: int = 1, extra: dict[str, Any] | None = None,
            group: str = "") -> None:
        """Buffer one video's (V, D) features and (K, 2) clip times; flushes when due.

        `extra`: more per-video facts for its record (JSON values), e.g. a dense video's `fps`.
        `group`: the source video the clip was cut from (recorded only when known)."""
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
        rec = {**_jsonable(extra or {}), "id": str(video_id), "path": str(path), "label": int(label),
               "split": str(split), "num_clips": int(times.shape[0]), "num_crops": int(num_crops)}
        if group:
            rec["group"] = str(group)
        features = features.astype(np.float16)
        with _writing(self.root):
            if self.journal:  # durable before add returns: a kill from here on costs nothing finished
                self._journal_append(journal_record({**rec, "compat": self.compat}, features, times))
            self._buf.append((rec, features, times))
            due = self.flush_seconds is not None and time.monotonic() - self._last_flush >= self.flush_seconds
            if len(self._buf) >= self.shard_size or due:
                self.flush()

    def add_failure(self, video_id: str, path: str, reason: str) -> None:
        line = _dumps({"id": str(video_id), "path": str(path), "reason": str(reason)}) + "\n"
        # one small O_APPEND write + fsync: a kill leaves either the whole line or none of it
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        with _writing(self.root):
            fd = os.open(self.root / FAILURES / f"{self.prefix}.jsonl", flags, 0o666)
            try:
                os.write(fd, line.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
        self.num_failed += 1

    def _save(self, tensors: dict[str, np.ndarray], metadata: dict[str, str], tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, self._mode)  # safetensors recreates the file 0600: a store must be shareable

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
        metadata = {"videos": _dumps(recs), "format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "compat": _dumps(self.compat)}
        path = self.root / SHARDS / f"{self.prefix}-{self._seq:06d}{SHARD_SUFFIX}"
        with _writing(self.root):
            atomic_write(path, lambda tmp: self._save(tensors, metadata, tmp))
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
