"""Dense extraction (`catnet extract --dense`): throughput against K-clip extraction, and peak memory
against video length (issue #16).

    python benchmarks/dense.py                          # both parts, CPU-sized settings (see --help)
    python benchmarks/dense.py --skip-rss               # throughput only (a few minutes)
    python benchmarks/dense.py --minutes 1 10 60        # peak RSS for these lengths (60 min: ~20 min here)

Throughput: the same generated videos extracted dense (`--window L --hop L`: windows tile each video) and
K-clip with K = the number of dense windows of each video's length and L frames at stride 1 (so both
run the same number of views, of the same frames, through the same backbone), plus the backbone alone
on views already in memory (the ceiling). Each variant runs in the same process, interleaved round by
round; views/s is the median over rounds.

Peak RSS: each length runs `extract(..., dense)` in a fresh child process with `--workers 0` (decoding in
that process's decoder thread, so one process holds everything), which reports its VmHWM from
/proc/self/status; a child that only builds the model gives the fixed cost (interpreter, torch, weights).
Videos are 320x240 test patterns at 25 fps, encoded once into --cache and reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_utils import interleaved, machine_info, print_table, save_results
from long_video import long_video

from catnet.features.extract import ExtractConfig, _build_model, extract
from catnet.video import ClipSampling, SpatialConfig
from catnet.video.stream import DenseSampling, dense_windows

HERE = Path(__file__).resolve().parent


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _config(args, dense: DenseSampling | None, clips: int | None = None) -> ExtractConfig:
    spatial = SpatialConfig(short_side=args.short_side, crop=args.crop, num_crops=1)
    sampling = ClipSampling(num_clips=clips or 1, clip_len=args.window, stride=1)
    return ExtractConfig(pretrained=False, sampling=sampling, dense=dense, spatial=spatial,
                         batch_size=args.batch, workers=args.workers, shard_size=64)


# ------------------------------------------------------------------------------------------ throughput


def throughput(args, machine) -> dict:
    src = Path(args.cache) / f"tput-{args.videos}x{args.seconds}s"
    for i in range(args.videos):
        long_video(src / f"class{i % 2}" / f"v{i:02d}.mp4", args.seconds / 60, seed=i)
    frames = int(round(args.seconds * 25))
    windows = len(dense_windows(frames, args.window, args.window))
    views = windows * args.videos
    dense_cfg = _config(args, DenseSampling(window=args.window, hop=args.window))
    clip_cfg = _config(args, None, clips=windows)
    model_cfg = replace(dense_cfg, dense=None)
    work = Path(tempfile.mkdtemp(prefix="catnet-dense-bench-"))

    def run(cfg, name):
        def fn():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            r = extract(src, out, cfg, progress=False)
            assert r.extracted == args.videos and r.rows == views, r
        return fn

    model = _build_model(model_cfg, torch.device("cpu"))
    x = torch.rand(args.batch, 3, args.window, args.crop, args.crop).contiguous(
        memory_format=torch.channels_last_3d)

    def backbone():
        with torch.inference_mode():
            for _ in range(-(-views // args.batch)):
                model.forward_features(x)

    fns = {"dense": run(dense_cfg, "dense"), "K clips": run(clip_cfg, "clips"), "backbone only": backbone}
    times = interleaved(fns, rounds=args.rounds, device=torch.device("cpu"), warmup=0)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    result = {"videos": args.videos, "seconds_each": args.seconds, "views": views, "variants": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        result["variants"][name] = {"seconds": ts, "median_s": med, "views_per_s": views / med}
    ceiling = result["variants"]["backbone only"]["views_per_s"]
    for name, v in result["variants"].items():
        v["of_backbone"] = v["views_per_s"] / ceiling
        rows.append([name, f"{v['median_s']:.1f}", v["views_per_s"], f"{100 * v['of_backbone']:.0f}%"])
    print_table(f"{args.videos} videos x {args.seconds:g} s, {windows} views each ({args.window} frames, "
                f"{args.crop} px, 1 crop), batch {args.batch}, workers {args.workers}",
                ["variant", "median s", "views/s", "of backbone"], rows)
    return result


# ------------------------------------------------------------------------------------------ peak RSS


def child(args) -> None:
    """In a fresh process: extract one video dense (or only build the model), print time + VmHWM."""
    t0 = time.monotonic()
    cfg = _config(args, DenseSampling(window=args.window, hop=args.window))
    if args.child == "model":
        _build_model(cfg, torch.device("cpu"))
        out = {"windows": 0}
    else:
        work = Path(tempfile.mkdtemp(prefix="catnet-dense-rss-"))
        src = work / "src"
        src.mkdir()
        (src / Path(args.child).name).symlink_to(Path(args.child).resolve())
        r = extract(src, work / "store", cfg, progress=False)
        assert r.extracted == 1, r
        out = {"windows": r.rows, "extract_seconds": r.seconds}
        shutil.rmtree(work)
    print(json.dumps({**out, "seconds": time.monotonic() - t0, "vm_hwm_mb": vm_hwm_mb()}))


def _run_child(args, what: str) -> dict:
    cmd = [sys.executable, str(HERE / "dense.py"), "--child", what, "--window", str(args.window),
           "--crop", str(args.crop), "--short-side", str(args.short_side), "--batch", str(args.batch),
           "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss(args) -> dict:
    result = {"model_only": _run_child(args, "model"), "lengths": {}}
    rows = [["(model only)", "-", "-", "-", f"{result['model_only']['vm_hwm_mb']:.0f}"]]
    for minutes in args.minutes:
        path = long_video(Path(args.cache) / f"long_{minutes:g}min.mp4", minutes)
        r = _run_child(args, str(path))
        r["minutes"] = minutes
        r["windows_per_s"] = r["windows"] / r["extract_seconds"]
        result["lengths"][f"{minutes:g}"] = r
        rows.append([f"{minutes:g} min", r["windows"], f"{r['seconds']:.0f}", r["windows_per_s"],
                     f"{r['vm_hwm_mb']:.0f}"])
        print(f"  {minutes:g} min: {json.dumps(r)}", file=sys.stderr, flush=True)
    print_table(f"peak RSS, dense --window {args.window} --hop {args.window}, {args.crop} px, batch "
                f"{args.batch}, workers 0 (one process)",
                ["video", "windows", "s", "windows/s", "VmHWM MB"], rows)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=16, help="frames per window (= hop: windows tile)")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--short-side", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="decoding workers for the throughput part")
    p.add_argument("--videos", type=int, default=6, help="videos in the throughput part")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each throughput video")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--minutes", type=float, nargs="*", default=[1, 10, 60], help="lengths for peak RSS")
    p.add_argument("--rss-crop", type=int, default=64,
                   help="crop (= short side) of the peak-RSS runs: a cheaper backbone, so 60 min fits in "
                   "~20 min")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--cache", default="/tmp/catnet-bench", help="generated videos are kept here")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.child:
        return child(args)
    machine = machine_info(torch.device("cpu"))
    payload = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.skip_throughput:
        payload["throughput"] = throughput(args, machine)
    if not args.skip_rss:
        args.crop = args.short_side = args.rss_crop
        payload["peak_rss"] = peak_rss(args)
    payload["machine_after"] = {"load_avg_1_5_15": machine_info(torch.device("cpu"))["load_avg_1_5_15"]}
    print(f"\nwrote {save_results('dense', payload, args.out)}")


if __name__ == "__main__":
    main()
