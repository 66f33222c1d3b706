"""What `catnet predict` costs and what it gets right, per profile (issue 17): the table behind the
`fast` default (docs/benchmarks.md, "Prediction profiles").

    python benchmarks/predict.py time [VIDEO] --variants fast accurate --rounds 3
    python benchmarks/predict.py accuracy ../shared/data/ucf6/videos.csv --split val \
        --variants accurate fast fast,frames=64
    python benchmarks/predict.py accuracy ../shared/data/ucf6/videos.csv --split val --run RUN \
        --variants accurate fast

A variant is a profile name with optional overrides: `fast,frames=64,clips=2,crops=3,precision=fp32`;
for `time` also `heap=system` (the process runs with CATNET_MALLOC=system: glibc's default allocator
instead of catnet's held freed memory, catnet/utils/memory.py).

`time` runs `catnet predict VIDEO --profile P [--clips/--crops/--frames] --json` in a fresh process per
call (interpreter start to exit: what a user waits for), the variants interleaved round by round, and
reports the median wall time with the predictor's own split into decode / backbone / head. Without
VIDEO it times the issue's case, a 10-s 340 x 256 25-fps H.264 clip: ucf6's first Surfing val video,
looped to 250 frames and resized (made once under /tmp).

`accuracy` classifies every video of an annotation file's split in one process. Without `--run` the
pretrained Kinetics-400 I3D answers and a UCF101 class counts as right when the top-1 (top-5) Kinetics
label is its counterpart (KINETICS_NAME; classes without one are skipped); with `--run` the trained
head answers in the run's classes. It also reports how often each variant's top-1 agrees with the first
variant's. Nothing is selected here: the numbers describe fixed variants on the split named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_utils import RESULTS, machine_info

from catnet.data.annotations import load_annotations
from catnet.inference.predict import PROFILES, Predictor
from catnet.video import probe, read_frames
from catnet.video.encode import write_video

REPO = Path(__file__).resolve().parents[1]
UCF6 = REPO.parent / "shared" / "data" / "ucf6" / "videos.csv"
# UCF101 class -> its Kinetics-400 counterpart, for the pretrained classifier (ucf6's six classes)
KINETICS_NAME = {"Archery": "archery", "BasketballDunk": "dunking basketball",
                 "HorseRace": "riding or walking with horse", "PlayingPiano": "playing piano",
                 "PlayingViolin": "playing violin", "Surfing": "surfing water"}
OVERRIDES = {"clips": "num_clips", "crops": "num_crops", "frames": "clip_len"}


def parse_variant(text: str) -> tuple[str, dict[str, int], str | None]:
    """'fast,frames=64,precision=fp32' -> ('fast', {'clip_len': 64}, 'fp32')."""
    name, *items = text.split(",")
    if name not in PROFILES:
        raise SystemExit(f"unknown profile {name!r} in variant {text!r}; choose from {', '.join(PROFILES)}")
    overrides, precision = {}, None
    for item in items:
        key, _, value = item.partition("=")
        if key == "precision":
            precision = value
        elif key == "heap":
            continue  # read by time_variants
        elif key in OVERRIDES:
            overrides[OVERRIDES[key]] = int(value)
        else:
            raise SystemExit(f"unknown override {key!r} in variant {text!r}")
    return name, overrides, precision


def make_predictor(variant: str, run: Path | None) -> Predictor:
    name, overrides, precision = parse_variant(variant)
    if precision is not None:  # a profile with another precision, everything else the same
        PROFILES[f"{name}-{precision}"] = dataclasses.replace(PROFILES[name], precision=precision)
        name = f"{name}-{precision}"
    if run is not None:
        return Predictor.from_run(run, profile=name, **overrides)
    return Predictor.pretrained(profile=name, **overrides)


def cli_args(variant: str) -> list[str]:
    name, overrides, precision = parse_variant(variant)
    if precision is not None:
        raise SystemExit("`time` runs the CLI, which has no precision flag: use a profile's precision")
    flags = {v: k for k, v in OVERRIDES.items()}
    return ["--profile", name, *[a for k, v in overrides.items() for a in (f"--{flags[k]}", str(v))]]


def ten_second_clip(out: Path) -> Path:
    """A 10-s 340 x 256 clip at 25 fps from ucf6's first Surfing val video (looped, resized)."""
    if out.is_file():
        return out
    items = load_annotations(UCF6).items
    src = next((it for it in items if it.label == "Surfing" and it.split == "val"), None)
    if src is None:
        raise SystemExit(f"{UCF6} has no Surfing val video: pass a VIDEO")
    n = probe(src.path).num_frames
    frames = torch.from_numpy(read_frames(src.path, [i % n for i in range(250)])).permute(0, 3, 1, 2)
    frames = F.interpolate(frames.float(), size=(256, 340), mode="bilinear", antialias=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_video(out, frames.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(), fps=25.0)


def stage_times(stderr: str) -> dict[str, float]:
    """The seconds `catnet predict --verbose` prints per video: in total and per stage."""
    line = next(ln for ln in stderr.splitlines() if re.match(r"catnet predict: .*: [0-9.]+ s \(", ln))
    total, parts = re.search(r": ([0-9.]+) s \((.*)\)$", line).groups()
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", parts)}
    return {"predict_s": float(total),
            **{f"{k}_s": stages.get(k, 0.0) for k in ("decode", "backbone", "head")}}


def time_variants(args) -> dict:
    args.video = args.video or ten_second_clip(Path("/tmp/catnet-predict-bench/clip_10s_340x256.mp4"))
    rows = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, "-m", "catnet", "predict", str(args.video), "--json", "--verbose",
                   *cli_args(variant)]
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            env = {**os.environ, "CATNET_MALLOC": "system"} if "heap=system" in variant else None
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode:
                raise SystemExit(f"{variant}: {proc.stderr.strip().splitlines()[-1]}")
            out = json.loads(proc.stdout.splitlines()[-1])
            top = out["predictions"][0]
            rows[variant].append({"wall_s": wall, "load1": load, **stage_times(proc.stderr),
                                  "top1": [top["label"], top["score"]]})
    summary = {}
    for variant, runs in rows.items():
        summary[variant] = {k: statistics.median(r[k] for r in runs)
                            for k in ("wall_s", "predict_s", "decode_s", "backbone_s", "head_s")}
        summary[variant].update(top1=runs[-1]["top1"], load1=[r["load1"] for r in runs])
    print("| variant | wall s (process) | in predict s | decode s | backbone s | top-1 |")
    print("|---|---|---|---|---|---|")
    for variant, s in summary.items():
        print(f"| {variant} | {s['wall_s']:.1f} | {s['predict_s']:.1f} | {s['decode_s']:.2f} | "
              f"{s['backbone_s']:.1f} | {s['top1'][0]} {100 * s['top1'][1]:.1f} % |")
    return {"video": str(args.video), "rounds": args.rounds, "runs": rows, "summary": summary}


def accuracy(args) -> dict:
    items = [it for it in load_annotations(args.annotations).items if args.split in (None, it.split)]
    per: dict[str, dict[str, dict]] = {}
    for variant in args.variants:
        predictor = make_predictor(variant, args.run)
        per[variant] = {}
        t0 = time.perf_counter()
        for it in items:
            truth = it.label if args.run is not None else KINETICS_NAME.get(it.label)
            if truth is None:
                continue
            labels = [lab for lab, _ in predictor(it.path, top_k=5).predictions]
            per[variant][it.id] = {"top1": labels[0] == truth, "top5": truth in labels, "pred": labels[0]}
        per[variant]["_seconds"] = time.perf_counter() - t0
        print(f"{variant}: {predictor.describe()}", file=sys.stderr)
    ref = args.variants[0]
    summary = {}
    for variant, videos in per.items():
        seconds = videos.pop("_seconds")
        n = len(videos)
        summary[variant] = {
            "n": n, "top1": sum(v["top1"] for v in videos.values()) / n,
            "top5": sum(v["top5"] for v in videos.values()) / n,
            "agree_with_" + ref: sum(v["pred"] == per[ref][k]["pred"] for k, v in videos.items()) / n,
            "seconds_per_video": seconds / n}
    print(f"| variant | top-1 (n) | top-5 | top-1 agrees with {ref} | s / video |")
    print("|---|---|---|---|---|")
    for variant, s in summary.items():
        print(f"| {variant} | {100 * s['top1']:.1f} ({round(s['top1'] * s['n'])}/{s['n']}) | "
              f"{100 * s['top5']:.1f} | {100 * s['agree_with_' + ref]:.1f} | {s['seconds_per_video']:.1f} |")
    return {"annotations": str(args.annotations), "split": args.split,
            "run": None if args.run is None else str(args.run), "videos": per, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("time")
    t.add_argument("video", type=Path, nargs="?", default=None)
    t.add_argument("--rounds", type=int, default=3)
    a = sub.add_parser("accuracy")
    a.add_argument("annotations", type=Path)
    a.add_argument("--split", default=None)
    a.add_argument("--run", type=Path, default=None, help="a trained run (default: the pretrained I3D)")
    for q in (t, a):
        q.add_argument("--variants", nargs="+", default=["accurate", "fast"])
        q.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = time_variants(args) if args.mode == "time" else accuracy(args)
    result["machine"] = machine_info(torch.device("cpu"))
    out = args.out or RESULTS / f"predict_{args.mode}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
