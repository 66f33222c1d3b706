"""`catnet serve`: a web page to upload a video and see its top-5, attention timeline, where the model
looked (Grad-CAM over key frames) and, with --window, the label timeline under the video."""

from __future__ import annotations

import argparse

from catnet.cli import add_cost_arguments, check_seconds, cost_overrides
from catnet.errors import CatnetError
from catnet.inference.predict import DEFAULT_PROFILE, PROFILES, Predictor
from catnet.inference.serve import App, find_samples, make_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--checkpoint", metavar="RUN", help="trained run (default: pretrained Inception-I3D)")
    p.add_argument("--samples", action="append", metavar="DIR", help="extra folder of sample videos")
    p.add_argument("--max-mb", type=float, default=100.0, help="upload size limit in MB (default 100)")
    add_cost_arguments(p, PROFILES, DEFAULT_PROFILE)
    p.add_argument("--no-explain", action="store_true",
                   help="skip the Grad-CAM maps (a backward pass of the backbone for each of 3 clips)")
    p.add_argument("--window", type=float, metavar="S",
                   help="also show the label timeline of S-second windows under the video")
    p.add_argument("--hop", type=float, metavar="H", help="a new window every H seconds (default S)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")


def build_app(args: argparse.Namespace) -> App:
    """The model (loaded once for the whole process), samples and limits from the command line."""
    if not 0 < args.max_mb <= 2**20:  # NaN and inf too; a TiB is no upload limit
        raise CatnetError(f"--max-mb must be > 0 and at most {2**20}, got {args.max_mb}")
    if not 0 <= args.port <= 65535:
        raise CatnetError(f"--port must be between 0 and 65535, got {args.port}")
    check_seconds(args, "window", "hop")
    if args.hop is not None and args.window is None:
        raise CatnetError("--hop needs --window")
    overrides = cost_overrides(args)
    if args.checkpoint:
        predictor, model = Predictor.from_run(args.checkpoint, **overrides), f"run {args.checkpoint}"
    else:
        predictor, model = Predictor.pretrained(**overrides), "Inception-I3D (Kinetics-400)"
    return App(predictor, find_samples(args.samples), max_bytes=int(args.max_mb * 2**20),
               model_name=model, verbose=args.verbose, explain=not args.no_explain,
               window=args.window, hop=args.hop)


def run(args: argparse.Namespace) -> int:
    app = build_app(args)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise CatnetError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"catnet serve: {app.model_name} on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    if args.verbose:
        print(f"catnet serve: {app.predictor.describe()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
