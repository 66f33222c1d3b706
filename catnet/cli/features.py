"""`catnet features {export,import,merge}`: feature stores to and from per-video arrays, and merging.

    catnet features export STORE --out feats/ [--format npy|hdf5] [--layout catnet|actionformer]
    catnet features import feats/ --out STORE [--labels labels.csv] [--feat-stride 4 --window 16 --fps 30]
    catnet features merge STORE_A STORE_B [...] --out STORE

Thin wrapper over catnet.features.interchange (docs/long_videos.md). `--json` prints the summary as one
JSON object on stdout; the progress bar goes to stderr (`--no-progress` turns it off).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from catnet.errors import CatnetError
from catnet.features.interchange import FORMATS, LAYOUTS, export_store, import_features, merge_stores


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True

    e = sub.add_parser("export", help="write a store as one float32 array per video (+ metadata)",
                       description="Write every video of a store as a (T, D) float32 array (the stored "
                                   "float16 values, exactly) with its times, fps, stride and window.")
    e.add_argument("store", help="feature store folder")
    e.add_argument("--out", required=True, help="new folder (npy) or new .h5 file (hdf5)")
    e.add_argument("--format", default="npy", choices=FORMATS)
    e.add_argument("--layout", default="catnet", choices=LAYOUTS,
                   help="catnet: <id>.npy mirroring ids as folders + index.json; actionformer: flat "
                        "<id>.npy (T, C) + annotations.json, as ActionFormer's loaders read them")
    _common(e)

    i = sub.add_parser("import", help="build a new store from a folder of .npy files or an .h5 file",
                       description="Build a new store from per-video arrays: a catnet export (metadata "
                                   "included) or any (T, D) .npy files / HDF5 datasets with a labels CSV. "
                                   "Features are stored as float16, like every store.")
    i.add_argument("source", help="folder of .npy files or an .h5/.hdf5 file")
    i.add_argument("--out", required=True, help="the new store folder (must not exist, or be empty)")
    i.add_argument("--labels", help="CSV id,label[,split] (ids may be paths; optional header row)")
    i.add_argument("--classes", help="text file, one class name a line, fixing the class order "
                                     "(default: the sorted labels of --labels)")
    i.add_argument("--feat-stride", type=int, help="frames between rows (features without catnet metadata)")
    i.add_argument("--window", type=int, help="frames each row spans (default: --feat-stride)")
    i.add_argument("--fps", type=float, help="frame rate the strides are counted in")
    i.add_argument("--backbone", help="backbone name to record in the manifest (default: unknown)")
    i.add_argument("--weights-id", help="weights id to record in the manifest (default: unknown)")
    i.add_argument("--shard-size", type=int, default=64, help="videos per shard")
    _common(i)

    m = sub.add_parser("merge", help="merge stores with the same extraction settings into a new one",
                       description="Merge stores extracted with the same backbone, weights, sampling, "
                                   "spatial settings and classes; refuses any difference, naming it.")
    m.add_argument("stores", nargs="+", help="two or more feature store folders")
    m.add_argument("--out", required=True, help="the new store folder (must not exist, or be empty)")
    m.add_argument("--shard-size", type=int, default=64, help="videos per shard")
    _common(m)


def _read_classes(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CatnetError(f"cannot read --classes {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(set(names)) != len(names):
        raise CatnetError(f"--classes {path} names a class twice")
    return names


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress  # stderr: never mixed into --json stdout
    if args.action == "export":
        summary = export_store(args.store, args.out, format=args.format, layout=args.layout,
                               progress=progress)
        human = (f"exported {summary['videos']} videos ({summary['feature_dim']}-d, {args.format}, "
                 f"{args.layout} layout) -> {summary['out']}")
    elif args.action == "import":
        for flag in ("feat_stride", "window", "shard_size"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise CatnetError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        if args.fps is not None and not args.fps > 0:
            raise CatnetError(f"--fps must be > 0, got {args.fps}")
        classes = _read_classes(args.classes)
        summary = import_features(args.source, args.out, labels=args.labels, classes=classes,
                                  feat_stride=args.feat_stride, window=args.window, fps=args.fps,
                                  backbone=args.backbone, weights_id=args.weights_id,
                                  shard_size=args.shard_size, progress=progress)
        human = (f"imported {summary['videos']} videos ({summary['labelled']} labelled, "
                 f"{summary['feature_dim']}-d, stored as float16) -> {summary['out']}")
    else:
        summary = merge_stores(args.stores, args.out, shard_size=args.shard_size, progress=progress)
        human = (f"merged {summary['videos']} videos from {len(summary['sources'])} stores "
                 f"({summary['duplicates_identical']} identical duplicates kept once) -> {summary['out']}")
    print(json.dumps(summary, sort_keys=True) if args.json else human)
    return 0
