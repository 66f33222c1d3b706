"""Feature interchange: a store <-> per-video arrays that other tools read, and merging stores.

* `export_store(STORE, OUT, format="npy"|"hdf5", layout="catnet"|"actionformer")`: one (T, D) float32
  array per video (T rows = windows or clips; (T, crops, D) when a store has several crops), plus the
  metadata temporal-localisation tools need: frame rate, feature stride and window (in frames), the
  (T, 2) start/end seconds of every row, label, split and the store's manifest.
* `import_features(DIR_OR_H5, OUT, labels=CSV)`: a new store from such arrays (a catnet export, or any
  folder of .npy files / .h5 file with a labels CSV).
* `merge_stores([A, B, ...], OUT)`: one store from stores with the same extraction settings.

Stores hold float16 (docs/feature_store.md). Exports widen those values to float32, exactly, and imports
narrow them back, exactly, so import(export(S)) reads back S's float16 rows bit for bit and
export(import(export(S))) writes the same files byte for byte. Features imported from elsewhere are
rounded to float16 once, on import (relative error <= 2^-11); values beyond float16's range are refused.

Every output is built in a hidden sibling folder (or temporary file) and renamed into place when
complete: a refused or killed run leaves no half-written export or store behind, and never touches OUT
unless it succeeds. See docs/long_videos.md for the formats.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from catnet.data.annotations import SPLITS
from catnet.errors import CatnetError, quoted
from catnet.features.store import FORMAT as STORE_FORMAT
from catnet.features.store import FeatureStore, StoreWriter, make_manifest, manifest_mismatch
from catnet.utils.io import _fsync_dir, atomic_write, current_umask
from catnet.video.stream import DenseSampling, is_dense

EXPORT_FORMAT = "catnet-features-export"
EXPORT_VERSION = 1
METADATA = "metadata.json"
INDEX = "index.json"
ANNOTATIONS = "annotations.json"  # ActionFormer's json_file
H5_META = "__catnet__"  # HDF5 group holding catnet's metadata, index and per-video times
FORMATS = ("npy", "hdf5")
LAYOUTS = ("catnet", "actionformer")
# column names a labels CSV may start with (then the first row is a header)
_HEADER = {"id", "video", "video_id", "path", "file", "name"}


# ---------------------------------------------------------------------------------------------- helpers


def _h5py():
    try:
        import h5py  # optional dependency: only the HDF5 export and import need it
    except ImportError:
        raise CatnetError("HDF5 files need h5py (pip install h5py); the npy format needs nothing") from None
    return h5py


def _safe_rel(video_id: str) -> str:
    """A video id as a relative path under an output folder; refuse ids that would escape it."""
    parts = video_id.split("/") if isinstance(video_id, str) else [""]
    if not video_id or "\x00" in video_id or any(p in ("", ".", "..") for p in parts) \
            or video_id.startswith(H5_META):
        raise CatnetError(f"video id {quoted(video_id)} cannot be a file name inside the output (empty, "
                          f"absolute, '.' or '..' parts, or {H5_META!r}); rename it in the store")
    return video_id


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes of a non-UTF-8 file name
        return False
    return True


def _inside(root: Path, rel: str, where: str) -> Path:
    """root / rel, lexically inside root (index files of an import are untrusted input)."""
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, rel)) if rel and "\x00" not in rel else base
    if path == base or not path.startswith(base.rstrip(os.sep) + os.sep):
        raise CatnetError(f"{where}: file {quoted(rel)} is outside {quoted(base)}")
    return Path(path)


def _refuse_existing(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise CatnetError(f"{quoted(out)} exists and is not empty; choose a new output path")
    if out.exists() and not out.is_dir():
        raise CatnetError(f"{quoted(out)} already exists; choose a new output path")


@contextlib.contextmanager
def _staged_dir(out: Path) -> Iterator[Path]:
    """A hidden sibling folder, renamed to `out` on success and deleted on any failure."""
    _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = current_umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above): replaced by the finished folder
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CatnetError(f"cannot write {quoted(path)}: {e.strerror or e}") from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, unit="video", desc=desc, file=sys.stderr, disable=not progress,
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- timing


def _estimate_fps(times: np.ndarray, span: int | None, hop: int | None) -> float | None:
    """A video's frame rate from its rows' times: hop frames between window starts, else the span of
    the first window (exact for a full window). Rounded to 1e-3 (times are float32)."""
    if hop and len(times) >= 2 and times[1, 0] > times[0, 0]:
        return round(float(hop / (float(times[1, 0]) - float(times[0, 0]))), 3)
    if span and times[0, 1] > times[0, 0]:
        return round(float(span / (float(times[0, 1]) - float(times[0, 0]))), 3)
    return None


def _recorded_fps(rec: dict[str, Any]) -> float | None:
    """The frame rate `catnet extract` recorded for the video (the rate its rows are counted in)."""
    fps = rec.get("fps")
    ok = isinstance(fps, (int, float)) and not isinstance(fps, bool) and np.isfinite(fps) and fps > 0
    return float(fps) if ok else None


def _grid(sampling: dict[str, Any], rec: dict[str, Any], times: np.ndarray
          ) -> tuple[float | None, int | None, int | None]:
    """(fps, feature stride in frames, window in frames) of one video of a store.

    Dense stores have a regular grid (stride = hop); K-clip stores spread clips evenly, so their stride
    is None. The frame rate is the record's when it has one, the resampling rate of a dense store, else
    estimated from the row times.
    """
    if is_dense(sampling):
        ds = DenseSampling.from_dict(sampling)
        hop = ds.hop if ds.hop is not None else (None if ds.hop_seconds is not None else ds.span)
        fps = _recorded_fps(rec) or ds.fps or _estimate_fps(times, ds.span, hop)
        if hop is None and fps:
            hop = ds.hop_at(fps)
        return (float(fps) if fps else None), hop, ds.span
    try:
        span = (int(sampling["clip_len"]) - 1) * int(sampling["stride"]) + 1
    except (KeyError, TypeError, ValueError):
        span = None
    fps = _recorded_fps(rec) or _estimate_fps(times, span, None)
    return (float(fps) if fps else None), None, span


def _f32(x: float) -> float:
    """A float32 value as the shortest decimal that reads back as the same float32 (2.4, not
    2.4000000953674316): exact round trips, readable JSON."""
    x = np.float32(x)
    short = float(np.format_float_positional(x, unique=True, trim="0"))
    return short if np.float32(short) == x else float(x)  # (guards against a double-rounding corner)


def _common(values: list[Any]) -> Any:
    """The value all videos share, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


# -------------------------------------------------------------------------------------------- export


@dataclass
class _ExportItem:
    index: int
    rec: dict[str, Any]
    name: str  # file (npy: relative path without .npy) or dataset name (hdf5)
    entry: dict[str, Any]  # the index.json record


_RECORD_KEYS = {"id", "path", "label", "split", "num_clips", "num_crops"}  # every store record's


def _export_plan(store: FeatureStore, layout: str, fmt: str) -> list[_ExportItem]:
    records = store.records()
    classes = store.classes
    sampling = store.manifest.get("sampling") or {}
    items, seen = [], {}
    for i, rec in enumerate(records):
        vid = rec["id"]
        # the id of a video listed by absolute path (outside the CSV's root) is that path: its file goes
        # under OUT/ without the leading "/", the index keeps the id itself
        rel = _safe_rel(vid[1:] if isinstance(vid, str) and vid.startswith("/") and len(vid) > 1 else vid)
        if fmt == "hdf5" and not _is_utf8(rel):
            raise CatnetError(f"video id {quoted(vid)} comes from a non-UTF-8 file name, and HDF5 names "
                              "must be UTF-8; export with --format npy (file names keep their bytes)")
        name = rel.replace("/", "__") if layout == "actionformer" else rel
        if name in seen:
            raise CatnetError(f"video ids {quoted(seen[name])} and {quoted(vid)} both become file "
                              f"{quoted(name)} in the flat {layout} layout; rename one")
        seen[name] = vid
        times = _times(store, i)
        fps, stride, window = _grid(sampling, rec, times)
        label = int(rec["label"])
        crops = int(rec["num_crops"])
        name_of_label = classes[label] if 0 <= label < len(classes) else None
        entry = {"id": vid, "label": label, "label_name": name_of_label,
                 "split": rec.get("split", ""), "path": rec.get("path", ""),
                 "num_windows": int(rec["num_clips"]), "num_crops": 1 if layout == "actionformer" else crops,
                 "fps": fps, "feat_stride": stride,
                 "window": window, "duration": _f32(times[:, 1].max()) if len(times) else 0.0,
                 "times": [[_f32(a), _f32(b)] for a, b in times]}
        if layout == "actionformer" and crops > 1:
            entry["crops_averaged"] = crops
        extra = {k: v for k, v in rec.items() if k not in _RECORD_KEYS}
        if extra:  # what an import gives the record back (e.g. the fps a dense video was windowed at)
            entry["record_extra"] = extra
        entry["file" if fmt == "npy" else "dataset"] = name + ".npy" if fmt == "npy" else name
        items.append(_ExportItem(i, rec, name, entry))
    return items


def _times(store: FeatureStore, i: int) -> np.ndarray:
    return np.asarray(store[i].times, np.float32).reshape(-1, 2)


def _array(store: FeatureStore, item: _ExportItem, layout: str) -> np.ndarray:
    """A video's rows as float32 (exact from the stored float16): (T, D), or (T, crops, D)."""
    x = store.read_features(item.index).astype(np.float32)
    t, c = int(item.rec["num_clips"]), int(item.rec["num_crops"])
    x = x.reshape(t, c, -1)
    if layout == "actionformer":
        return x.mean(axis=1, dtype=np.float32) if c > 1 else x[:, 0]
    return x if c > 1 else x[:, 0]


def _metadata(store: FeatureStore, items: list[_ExportItem], layout: str, fmt: str) -> dict[str, Any]:
    m = store.manifest
    entries = [it.entry for it in items]
    crops = sorted({int(it.rec["num_crops"]) for it in items})
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "layout": layout, "file_format": fmt,
            "array_dtype": "float32", "stored_dtype": m.get("feature_dtype", "float16"),
            "array_shape": "(T, D)" if layout == "actionformer" or crops == [1] else "(T, crops, D)",
            "feature_dim": m.get("num_features"), "num_videos": len(items), "num_crops": crops,
            "classes": store.classes, "sampling": m.get("sampling"),
            "fps": _common([e["fps"] for e in entries]),
            "feat_stride": _common([e["feat_stride"] for e in entries]),
            "window": _common([e["window"] for e in entries]), "manifest": m, "failures": store.failures}
    if layout == "actionformer":
        meta["crops"] = "mean" if crops != [1] else "single"
        # the dataset section of an ActionFormer config for this folder
        meta["actionformer"] = {"feat_folder": ".", "json_file": ANNOTATIONS, "file_prefix": None,
                                "file_ext": ".npy", "feat_stride": meta["feat_stride"],
                                "num_frames": meta["window"], "default_fps": meta["fps"],
                                "input_dim": m.get("num_features"), "num_classes": len(store.classes)}
    return meta


def _annotations(items: list[_ExportItem]) -> dict[str, Any]:
    """ActionFormer's annotation JSON: database -> video -> {subset, duration, fps, annotations}.

    catnet labels are per video, so a labelled video gets one segment spanning it; unlabelled ones none.
    """
    db = {}
    for it in items:
        e = it.entry
        acts = []
        if e["label"] >= 0 and e["label_name"] is not None:
            frames = [0, int(round(e["duration"] * e["fps"]))] if e["fps"] else [0, 0]
            acts.append({"label": e["label_name"], "label_id": e["label"], "segment": [0.0, e["duration"]],
                         "segment(frames)": frames})
        db[it.name] = {"subset": e["split"], "duration": e["duration"], "fps": e["fps"], "annotations": acts}
    return {"version": f"{EXPORT_FORMAT}-{EXPORT_VERSION}", "database": db}


def export_store(store: str | os.PathLike | FeatureStore, out: str | os.PathLike, *, format: str = "npy",
                 layout: str = "catnet", progress: bool = False) -> dict[str, Any]:
    """Write every video of `store` as a float32 array into `out` (a new folder, or a new .h5 file).

    npy, layout "catnet": OUT/<id>.npy (ids with "/" become folders), OUT/index.json (per video: file,
    label, split, path, fps, feat_stride, window, duration, times (T, 2)), OUT/metadata.json (classes,
    sampling, the store manifest and failures). Layout "actionformer": flat OUT/<id with / -> __>.npy
    (T, C), crops averaged, plus OUT/annotations.json in ActionFormer's format. hdf5: one dataset per
    video named by its id (+ attributes), catnet's metadata under /__catnet__.
    """
    if format not in FORMATS:
        raise CatnetError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise CatnetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "actionformer" and format != "npy":
        raise CatnetError("the actionformer layout is a folder of .npy files: use --format npy")
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    out = Path(out)
    _refuse_existing(out)
    items = _export_plan(store, layout, format)
    meta = _metadata(store, items, layout, format)
    bar = _bar(len(items), progress, "export")
    try:
        if format == "npy":
            with _staged_dir(out) as tmp:
                for it in items:
                    arr = _array(store, it, layout)
                    _write_file(tmp / (it.name + ".npy"), lambda f, a=arr: np.save(f, a, allow_pickle=False))
                    bar.update(1)
                index = {"videos": [it.entry for it in items]}
                _write_file(tmp / INDEX, lambda f: f.write(_json_bytes(index)))
                _write_file(tmp / METADATA, lambda f: f.write(_json_bytes(meta)))
                if layout == "actionformer":
                    _write_file(tmp / ANNOTATIONS, lambda f: f.write(_json_bytes(_annotations(items))))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda tmp: _write_h5(tmp, store, items, meta, bar))
    finally:
        bar.close()
    return {"out": str(out), "format": format, "layout": layout, "videos": len(items),
            "feature_dim": meta["feature_dim"], "fps": meta["fps"], "feat_stride": meta["feat_stride"],
            "window": meta["window"]}


def _write_h5(tmp: str, store: FeatureStore, items: list[_ExportItem], meta: dict[str, Any], bar) -> None:
    h5py = _h5py()
    with h5py.File(tmp, "w", track_order=True) as f:
        for it in items:
            e = it.entry
            ds = f.create_dataset(it.name, data=_array(store, it, "catnet"), track_times=False)
            for key in ("label", "split", "path", "num_crops", "num_windows", "duration"):
                ds.attrs[key] = e[key]
            ds.attrs["label_name"] = e["label_name"] or ""
            for key in ("fps", "feat_stride", "window"):  # HDF5 attributes cannot be None: left out
                if e[key] is not None:
                    ds.attrs[key] = e[key]
            times = np.asarray(e["times"], np.float32).reshape(-1, 2)
            f.create_dataset(f"{H5_META}/times/{it.name}", data=times, track_times=False)
            bar.update(1)
        index = [{k: v for k, v in it.entry.items() if k != "times"} for it in items]
        for name, obj in ((INDEX, {"videos": index}), (METADATA, meta)):
            f.create_dataset(f"{H5_META}/{name}", data=np.frombuffer(_json_bytes(obj), np.uint8),
                             track_times=False)


# -------------------------------------------------------------------------------------------- import


@dataclass
class _ImportItem:
    id: str
    load: Callable[[], np.ndarray]  # the raw array, read when written (one video in memory at a time)
    where: str  # file or dataset, for messages
    times: np.ndarray | None = None  # (T, 2) when the source records them
    label: int = -1
    split: str = ""
    path: str = ""
    num_crops: int | None = None  # from the index; else from the array's shape
    extra: dict[str, Any] | None = None  # the store record's other facts (e.g. fps), from the index


def _load_npy(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False, mmap_mode=None)
        except (OSError, ValueError, EOFError) as e:
            raise CatnetError(f"cannot read {quoted(path)}: {str(e).splitlines()[0] if str(e) else e}") \
                from None
    return load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CatnetError(f"cannot read {quoted(path)}: {e}") from None


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    """A catnet export's metadata, with the store manifest it carries."""
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CatnetError(f"{where} is not a catnet export's metadata")
    if meta.get("format_version", 0) > EXPORT_VERSION:
        raise CatnetError(f"{where} has export format version {meta['format_version']}; this catnet reads "
                          f"<= {EXPORT_VERSION}")
    manifest = meta.get("manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise CatnetError(f"{where} carries no feature-store manifest")
    return meta


def _index_items(videos: Any, where: str, locate: Callable[[dict[str, Any]], tuple[Callable, str]],
                 times_of: Callable[[dict[str, Any]], np.ndarray | None]) -> list[_ImportItem]:
    if not isinstance(videos, list):
        raise CatnetError(f"{where}: 'videos' must be a list")
    items = []
    for n, e in enumerate(videos):
        if not isinstance(e, dict) or not isinstance(e.get("id"), str):
            raise CatnetError(f"{where}: entry {n} has no string 'id'")
        load, loc = locate(e)
        extra = e.get("record_extra")
        if extra is not None and not isinstance(extra, dict):
            raise CatnetError(f"{where}: entry {n} ({quoted(e['id'])}): 'record_extra' is not an object")
        try:
            items.append(_ImportItem(e["id"], load, loc, times_of(e), int(e.get("label", -1)),
                                     str(e.get("split") or ""), str(e.get("path") or ""),
                                     int(e.get("num_crops") or 1), extra))
        except (TypeError, ValueError) as err:
            raise CatnetError(f"{where}: entry {n} ({quoted(e['id'])}): {err}") from None
    return items


def _entry_times(e: dict[str, Any]) -> np.ndarray | None:
    if e.get("times") is None:
        return None
    try:
        return np.asarray(e["times"], np.float32).reshape(-1, 2)
    except (TypeError, ValueError):
        raise CatnetError(f"index entry {quoted(e['id'])}: 'times' is not a (T, 2) list") from None


def _folder_source(root: Path) -> tuple[list[_ImportItem], dict[str, Any] | None]:
    meta_path, index_path = root / METADATA, root / INDEX
    if meta_path.is_file() and index_path.is_file():
        meta = _check_meta(_read_json(meta_path), quoted(meta_path))
        index = _read_json(index_path)

        def locate(e):
            path = _inside(root, str(e.get("file") or ""), quoted(index_path))
            return _load_npy(path), str(path)

        videos = index.get("videos") if isinstance(index, dict) else None
        return _index_items(videos, quoted(index_path), locate, _entry_times), meta
    files = sorted(p for p in root.rglob("*.npy")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise CatnetError(f"no .npy files in {quoted(root)}")
    items = [_ImportItem(p.relative_to(root).with_suffix("").as_posix(), _load_npy(p), str(p)) for p in files]
    return items, None


def _h5_source(f, path: Path) -> tuple[list[_ImportItem], dict[str, Any] | None]:
    h5py = _h5py()

    def dataset(name: str):
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise CatnetError(f"{quoted(path)}: no dataset {quoted(name)}")
        return obj

    def text(name: str) -> Any:
        try:
            return json.loads(bytes(np.asarray(dataset(name)[()], np.uint8)).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise CatnetError(f"{quoted(path)}: {name} is not valid JSON ({e})") from None

    if f.get(f"{H5_META}/{INDEX}") is not None:
        meta = _check_meta(text(f"{H5_META}/{METADATA}"), f"{quoted(path)}:/{H5_META}/{METADATA}")
        index = text(f"{H5_META}/{INDEX}")

        def locate(e):
            name = str(e.get("dataset") or e["id"])
            return (lambda: np.asarray(dataset(name)[()])), f"{path}:{name}"

        def times_of(e):
            return np.asarray(dataset(f"{H5_META}/times/{e.get('dataset') or e['id']}")[()], np.float32)

        videos = index.get("videos") if isinstance(index, dict) else None
        return _index_items(videos, f"{quoted(path)}:/{H5_META}/{INDEX}", locate, times_of), meta
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                 and not name.startswith(H5_META) else None)
    if not names:
        raise CatnetError(f"no datasets in {quoted(path)}")
    items = [_ImportItem(n, (lambda n=n: np.asarray(dataset(n)[()])), f"{path}:{n}") for n in sorted(names)]
    return items, None


def _match_id(key: str, ids: set[str]) -> str | None:
    """A labels-CSV key as a video id: the id itself, or a path whose trailing components (without the
    suffix) are one, longest first: 'videos/abseiling/x.mp4' finds 'abseiling/x' or 'x'."""
    if key in ids:
        return key
    p = key.replace("\\", "/").strip("/")
    stem = p.rsplit(".", 1)[0] if "." in p.rsplit("/", 1)[-1] else p
    parts = [x for x in stem.split("/") if x not in ("", ".")]
    for start in range(len(parts)):
        cand = "/".join(parts[start:])
        if cand in ids:
            return cand
    return None


def read_labels_csv(path: str | os.PathLike, ids: Sequence[str]) -> dict[str, tuple[str | None, str | None]]:
    """Rows `id,label[,split]` (the id may be a path, see `_match_id`; an optional header row starts with
    id/path/video): {video id: (label name or None, split or None)}. Refuses unknown and repeated ids."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), start=1)
                    if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CatnetError(f"cannot read labels {quoted(path)}: {getattr(e, 'strerror', None) or e}") from None
    if rows and rows[0][1][0].lower() in _HEADER:
        rows = rows[1:]
    known, out, line_of = set(ids), {}, {}
    for n, row in rows:
        where = f"{quoted(path.name)} line {n}"
        if len(row) > 3:
            raise CatnetError(f"{where}: expected id,label[,split], got {len(row)} columns")
        vid = _match_id(row[0], known)
        if vid is None:
            raise CatnetError(f"{where}: no features for video {quoted(row[0])}")
        if vid in out:
            raise CatnetError(f"{where}: video {quoted(vid)} is listed twice (also line {line_of[vid]})")
        label = row[1] if len(row) > 1 and row[1] else None
        split = SPLITS.get(row[2].lower(), row[2]) if len(row) > 2 and row[2] else None
        out[vid], line_of[vid] = (label, split), n
    return out


def _check_rows(item: _ImportItem, arr: np.ndarray, dim: int | None, first: str | None
                ) -> tuple[np.ndarray, int]:
    """(rows (T * crops, D) float16, crops): refuse non-float, empty, ragged or non-finite features."""
    where = f"video {quoted(item.id)} ({quoted(item.where)})"
    if arr.dtype.kind != "f":
        raise CatnetError(f"{where}: features must be floating point, got {arr.dtype}")
    if arr.ndim == 2:
        crops = item.num_crops or 1
        if crops > 1 and arr.shape[0] % crops:
            raise CatnetError(f"{where}: {arr.shape[0]} rows are not a multiple of {crops} crops")
        t = arr.shape[0] // crops
    elif arr.ndim == 3:
        t, crops = arr.shape[0], arr.shape[1]
        if item.num_crops is not None and crops != item.num_crops:
            raise CatnetError(f"{where}: {crops} crops in the array, {item.num_crops} in the index")
    else:
        raise CatnetError(f"{where}: features must be (T, D) or (T, crops, D), got shape {arr.shape}")
    d = arr.shape[-1]
    if t == 0 or d == 0 or crops == 0:
        raise CatnetError(f"{where}: no features (shape {arr.shape})")
    if dim is not None and d != dim:
        raise CatnetError(f"ragged feature dims: {where} has D = {d}, {quoted(first)} has {dim}")
    with np.errstate(over="ignore", invalid="ignore"):
        rows = arr.reshape(t * crops, d).astype(np.float16)
    if not np.isfinite(rows).all():
        raise CatnetError(f"{where}: NaN or Inf in its features (or values beyond float16's +-65504)")
    if item.times is not None and item.times.shape != (t, 2):
        raise CatnetError(f"{where}: {t} rows but {len(item.times)} timestamps")
    return rows, crops


@dataclass
class _ImportPlan:
    """What an import writes: the items (labels applied), the class names, and where the manifest and
    row times come from (a catnet export's metadata, else the foreign grid `sampling`)."""

    source: Path
    items: list[_ImportItem]
    meta: dict[str, Any] | None
    names: list[str]
    relabelled: bool
    sampling: DenseSampling | None
    backbone: str | None
    weights_id: str | None

    def manifest(self, dim: int, first: str) -> dict[str, Any]:
        if self.meta is not None:
            manifest = dict(self.meta["manifest"])
            if self.relabelled:
                manifest["classes"] = self.names
        else:
            manifest = make_manifest(backbone=self.backbone or "unknown",
                                     weights_id=self.weights_id or "unknown", num_features=dim,
                                     sampling=self.sampling.to_dict(), spatial={}, classes=self.names,
                                     imported_from=str(self.source.resolve()))
        if manifest.get("num_features") != dim:
            raise CatnetError(f"video {quoted(first)} has D = {dim} but the export's manifest says "
                              f"{manifest.get('num_features')}")
        return manifest

    def times(self, it: _ImportItem, t: int) -> np.ndarray:
        if it.times is not None:
            return it.times
        s = self.sampling
        start = np.arange(t, dtype=np.float64) * s.hop
        return np.stack([start / s.fps, (start + s.window) / s.fps], axis=1)


def _check_unique(items: list[_ImportItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise CatnetError(f"video id {quoted(it.id)} appears twice ({quoted(seen[it.id])}, "
                              f"{quoted(it.where)})")
        seen[it.id] = it.where


def _apply_labels(items: list[_ImportItem], labels: str | os.PathLike | None, classes: Sequence[str] | None,
                  meta: dict[str, Any] | None) -> list[str]:
    """The class names of the new store; a labels CSV relabels (and re-splits) the items it lists."""
    names = list(meta["manifest"].get("classes") or []) if meta else []
    if labels is None:
        return list(classes) if meta is None and classes is not None else names
    table = read_labels_csv(labels, [it.id for it in items])
    given = [x for x, _ in table.values() if x is not None]
    names = list(classes) if classes is not None else sorted(set(given))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CatnetError(f"label {quoted(unknown[0])} (and {len(unknown) - 1} more) is not among "
                          f"the {len(names)} classes given")
    label_of = {c: i for i, c in enumerate(names)}
    for it in items:
        label, split = table.get(it.id, (None, None))
        it.label = label_of[label] if label is not None else -1
        if split is not None:
            it.split = split
    return names


def _write_import(plan: _ImportPlan, tmp: Path, shard_size: int, bar, stack: contextlib.ExitStack
                  ) -> dict[str, Any]:
    """Check and write every item into the staged store `tmp`; one video in memory at a time."""
    result = {"videos": 0, "labelled": 0, "feature_dim": None}
    writer, dim, first, n = None, None, None, len(plan.names)
    for it in plan.items:
        if not -1 <= it.label < n:
            raise CatnetError(f"video {quoted(it.id)}: label {it.label} is not one of the {n} classes")
        rows, crops = _check_rows(it, np.asarray(it.load()), dim, first)
        if writer is None:
            dim, first = rows.shape[1], it.id
            writer = stack.enter_context(StoreWriter(tmp, plan.manifest(dim, first), shard_size=shard_size,
                                                     flush_seconds=None, journal=False))
        writer.add(it.id, rows, plan.times(it, rows.shape[0] // crops), label=it.label, split=it.split,
                   path=it.path, num_crops=crops, extra=it.extra)
        result["videos"] += 1
        result["labelled"] += it.label >= 0
        bar.update(1)
    if writer is None:  # no items cannot happen (sources refuse empty), but keep the store valid
        raise CatnetError(f"nothing to import from {quoted(plan.source)}")
    for fail in (plan.meta or {}).get("failures") or []:
        if isinstance(fail, dict) and isinstance(fail.get("id"), str):
            writer.add_failure(fail["id"], fail.get("path", ""), fail.get("reason", ""))
    writer.close()
    result["feature_dim"] = dim
    return result


def import_features(source: str | os.PathLike, out: str | os.PathLike, *,
                    labels: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                    feat_stride: int | None = None, window: int | None = None, fps: float | None = None,
                    backbone: str | None = None, weights_id: str | None = None, shard_size: int = 64,
                    progress: bool = False) -> dict[str, Any]:
    """Build a new store `out` from a folder of .npy files or an .h5 file.

    A catnet export brings its own manifest, labels, splits, times and failures (a labels CSV then only
    overrides labels and splits). Other features need `feat_stride` and `fps` (and `window`, default
    `feat_stride`, all in frames): row t then spans [t * stride, t * stride + window) / fps seconds.
    `labels`: CSV `id,label[,split]` (see `read_labels_csv`); its labels become the classes (sorted, or
    `classes` in that order); videos it does not list are unlabelled.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise CatnetError(f"no such file or folder: {quoted(source)}")
    if shard_size < 1:
        raise CatnetError(f"shard size must be >= 1, got {shard_size}")
    _refuse_existing(out)
    with contextlib.ExitStack() as stack:
        if source.is_dir():
            items, meta = _folder_source(source)
        else:
            items, meta = _h5_source(stack.enter_context(_open_h5(source)), source)
        _check_unique(items)
        names = _apply_labels(items, labels, classes, meta)
        sampling = None
        if meta is None:
            if feat_stride is None or fps is None:
                raise CatnetError(f"{quoted(source)} has no catnet metadata: give the feature stride and fps "
                                  "(--feat-stride FRAMES --fps FPS, and --window FRAMES) to time each row")
            sampling = DenseSampling(window=window or feat_stride, hop=feat_stride, fps=float(fps))
        plan = _ImportPlan(source, items, meta, names, labels is not None, sampling, backbone, weights_id)
        bar = stack.enter_context(_bar(len(items), progress, "import"))
        tmp = stack.enter_context(_staged_dir(out))
        result = _write_import(plan, tmp, shard_size, bar, stack)
    return {"out": str(out), **result, "source": str(source), "from_catnet_export": meta is not None}


@contextlib.contextmanager
def _open_h5(path: Path):
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CatnetError(f"cannot open {quoted(path)} as HDF5: {str(e).splitlines()[0]}") from None
    with f:
        yield f


# --------------------------------------------------------------------------------------------- merge


def _same_video(a: FeatureStore, ra: dict[str, Any], i: int, b: FeatureStore, rb: dict[str, Any],
                j: int) -> bool:
    keys = ("label", "split", "num_clips", "num_crops")
    if any(ra.get(k) != rb.get(k) for k in keys):
        return False
    return (np.array_equal(a.read_features(i).view(np.uint16), b.read_features(j).view(np.uint16))
            and np.array_equal(a[i].times, b[j].times))


def merge_stores(sources: Sequence[str | os.PathLike | FeatureStore], out: str | os.PathLike, *,
                 shard_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """One new store `out` holding every video of `sources`, which must share their extraction settings
    (the manifest's compat keys: backbone, weights, feature dim, sampling, spatial, classes).

    A video id in several stores is kept once if its features, times, label, split and views are
    identical (the path may differ), and refused otherwise. Failures not since finished carry over.
    """
    stores = [s if isinstance(s, FeatureStore) else FeatureStore(s) for s in sources]
    if len(stores) < 2:
        raise CatnetError("merge needs at least two stores")
    if shard_size < 1:
        raise CatnetError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out)
    _refuse_existing(out)
    base = stores[0]
    for s in stores[1:]:
        diff = manifest_mismatch(base.manifest, s.manifest)
        if diff:
            raise CatnetError(f"cannot merge {quoted(s.root)} with {quoted(base.root)}: different extraction "
                              f"settings ({diff[0]})")
    owner: dict[str, tuple[int, int]] = {}
    duplicates = 0
    records = [s.records() for s in stores]
    for si, s in enumerate(stores):
        for pos, vid in enumerate(s.ids):
            if vid in owner:
                sj, pj = owner[vid]
                if not _same_video(stores[sj], records[sj][pj], pj, s, records[si][pos], pos):
                    raise CatnetError(f"video {quoted(vid)} is in {quoted(stores[sj].root)} and "
                                      f"{quoted(s.root)} with different features or labels; drop it from one")
                duplicates += 1
            else:
                owner[vid] = (si, pos)
    manifest = {**base.manifest, "merged_from": [str(Path(s.root).resolve()) for s in stores]}
    failures: dict[str, dict[str, Any]] = {}
    for s in stores:
        failures.update({f["id"]: f for f in s.failures if f["id"] not in owner})
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_bar(len(owner), progress, "merge"))
        tmp = stack.enter_context(_staged_dir(out))
        writer = stack.enter_context(StoreWriter(tmp, manifest, shard_size=shard_size, flush_seconds=None,
                                                 journal=False))
        for vid in sorted(owner):
            si, pos = owner[vid]
            s = stores[si]
            v = s[pos]
            writer.add(vid, s.read_features(pos), v.times, label=v.label, split=v.split, path=v.path,
                       num_crops=v.num_crops)
            bar.update(1)
        for f in failures.values():
            writer.add_failure(f["id"], f.get("path", ""), f.get("reason", ""))
        writer.close()
    return {"out": str(out), "videos": len(owner), "duplicates_identical": duplicates,
            "failures": len(failures), "sources": [str(s.root) for s in stores]}


