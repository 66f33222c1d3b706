"""`catnet <verb>`: one argparse sub-command per job, each a thin module over a library function.

Each verb module here has `add_arguments(parser)` and `run(args) -> int`; only the module of the verb
being run is imported, so `catnet --help` stays fast. Errors reach the user as one line
(`catnet VERB: error: ...`) with exit status 2, never as a traceback (set CATNET_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading

from catnet.errors import CatnetError
from catnet.utils.memory import hold_freed_memory
from catnet.version import __version__

# verb -> (module, one-line help). Order is the order of the data flow.
VERBS: dict[str, tuple[str, str]] = {
    "weights": ("catnet.cli.weights", "fetch and convert the pretrained Kinetics-400 Inception-I3D weights"),
    "synth": ("catnet.cli.synth", "generate the synthetic action-video dataset"),
    "extract": ("catnet.cli.extract", "extract clip features from videos into a feature store"),
    "inspect": ("catnet.cli.inspect", "summarise a feature store"),
    "features": ("catnet.cli.features", "export a store's features to npy/HDF5, import existing ones, merge"),
    "train": ("catnet.cli.train", "train a video-level head on a feature store"),
    "eval": ("catnet.cli.eval", "evaluate a trained run on a feature store"),
    "finetune-backbone": ("catnet.cli.finetune_backbone",
                          "fine-tune a backbone on clips (the paper's baseline)"),
    "predict": ("catnet.cli.predict", "predict actions on videos, with the moments that mattered"),
    "export": ("catnet.cli.export", "export a trained head or a backbone to ONNX / torch.export (.pt2)"),
    "report": ("catnet.cli.report", "write the analysis report (Figs. 4-6) for a run"),
    "demo": ("catnet.cli.demo", "run the whole pipeline on the embedded synthetic dataset"),
    "reproduce": ("catnet.cli.reproduce", "run the paper's protocol end to end on a dataset"),
    "serve": ("catnet.cli.serve", "web page: upload a video, see its top-5, attention timeline and Grad-CAM"),
}

# Verbs whose process keeps freed memory (catnet/utils/memory.py): their large blocks recur in the same
# sizes step after step. The others hold whole decoded videos of varying size one after another, which
# fragment a heap that is never trimmed (extract at the paper's settings: 2.1x the peak RSS for 1.09x the
# speed; docs/benchmarks.md section 4).
HOLDS_MEMORY = frozenset({"train", "eval", "predict"})


class _Parser(argparse.ArgumentParser):
    """argparse that reports misuse in one line (exit status 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_cost_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, profiles, default: str) -> None:
    """The predictor's cost flags, shared by `predict` and `serve`: --profile and what overrides it."""
    p.add_argument("--profile", choices=tuple(profiles), default=default,
                   help="; ".join(f"{n}: {pr.describe()}" for n, pr in profiles.items())
                   + f" (default {default})")
    p.add_argument("--clips", type=int, help="clips per video K (default: the profile's)")
    p.add_argument("--crops", type=int, help="spatial crops per clip, 1 or 3 (default: the profile's)")
    p.add_argument("--frames", type=int, help="frames per clip L (default: the profile's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the backbone (one-off compile, cached in $CATNET_HOME/inductor; "
                        "default: the profile's)")


def cost_overrides(args: argparse.Namespace) -> dict:
    """Predictor.pretrained / from_run keyword arguments from add_cost_arguments' flags."""
    return dict(profile=args.profile, num_clips=args.clips, num_crops=args.crops, clip_len=args.frames,
                compile=args.compile)


def check_seconds(args: argparse.Namespace, *names: str) -> None:
    """Each named option, when given, is a finite number of seconds > 0 (NaN and inf refused)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise CatnetError(f"--{name} must be a finite number of seconds > 0, got {value}")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="catnet", description="CATNet video action recognition toolkit.")
    parser.add_argument("--version", action="version", version=f"catnet {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module, help_) in VERBS.items():
        p = sub.add_parser(verb, help=help_, description=help_)
        if verb == selected:
            importlib.import_module(module).add_arguments(p)
    return parser


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt  # schedulers send SIGTERM first: unwind as Ctrl-C does (partial outputs removed)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    name = f"catnet {selected}" if selected in VERBS else "catnet"
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:  # from the first moment: Ctrl-C while torch imports is one line too
        return _main(argv, selected)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], selected: str | None) -> int:
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    module = importlib.import_module(VERBS[args.verb][0])
    if args.verb in HOLDS_MEMORY:
        hold_freed_memory()
    try:
        return int(module.run(args) or 0)
    except CatnetError as e:
        print(f"catnet {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"catnet {args.verb}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except Exception as e:  # last line of defence: one line, never a traceback
        if os.environ.get("CATNET_DEBUG"):
            raise
        print(f"catnet {args.verb}: internal error: {type(e).__name__}: {e} "
              "(set CATNET_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
