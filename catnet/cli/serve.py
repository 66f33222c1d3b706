"""`catnet serve`: a web page to upload a video and see its top-5, attention timeline and key frames."""

from __future__ import annotations

import argparse
import dataclasses

from catnet.errors import CatnetError
from catnet.inference.predict import Predictor
from catnet.inference.serve import SERVE_FRAMES, App, find_samples, make_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--checkpoint", metavar="RUN", help="trained run (default: pretrained Inception-I3D)")
    p.add_argument("--samples", action="append", metavar="DIR", help="extra folder of sample videos")
    p.add_argument("--max-mb", type=float, default=100.0, help="upload size limit in MB (default 100)")
    p.add_argument("--clips", type=int, default=4, help="clips per video (default 4: cheap on CPU)")
    p.add_argument("--crops", type=int, default=1, help="crops per clip, 1 or 3 (default 1)")
    p.add_argument("--frames", type=int,
                   help=f"frames per clip (default: the model's, at most {SERVE_FRAMES})")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")


def build_app(args: argparse.Namespace) -> App:
    """The model (cheap settings unless asked otherwise), samples and limits from the command line."""
    if args.max_mb <= 0:
        raise CatnetError(f"--max-mb must be > 0, got {args.max_mb}")
    overrides = dict(num_clips=args.clips, num_crops=args.crops, clip_len=args.frames)
    if args.checkpoint:
        predictor, model = Predictor.from_run(args.checkpoint, **overrides), f"run {args.checkpoint}"
    else:
        predictor, model = Predictor.pretrained(**overrides), "Inception-I3D (Kinetics-400)"
    if args.frames is None:  # I3D's 64-frame clips cost 2x the 32 frames that already work well
        clip_len = min(SERVE_FRAMES, predictor.sampling.clip_len)
        predictor.sampling = dataclasses.replace(predictor.sampling, clip_len=clip_len)
    return App(predictor, find_samples(args.samples), max_bytes=int(args.max_mb * 2**20),
               model_name=model, verbose=args.verbose)


def run(args: argparse.Namespace) -> int:
    app = build_app(args)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise CatnetError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"catnet serve: {app.model_name} on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
