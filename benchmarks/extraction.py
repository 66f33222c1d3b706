"""Extraction pipeline vs backbone alone (issue 9, item 3), and decoders compared on the same files.

    python benchmarks/extraction.py                  # small CPU-sized setting (see --help)
    python benchmarks/extraction.py --device cuda --crop 224 --short-side 256 --clips 10 --crops 3

Pipeline: `catnet.features.extract.extract` end to end (list videos, decode + sample + crop in DataLoader
workers, backbone, fp16 shards written atomically) on generated videos. Backbone-only: the same model on
the same views, already decoded and in memory, in the same batch size. Both count views (clip x crop forwards)
per second; their ratio says how much of the decoding the pipeline hides behind compute (goal >= 0.9).
Each pipeline setting (model eager / optimised, decoding workers) runs in the same process, interleaved
round by round with its backbone-only twin.

Decoders: for every file, the frames a K x L x stride sampling needs are read by catnet's seeking
decoder (`catnet.video.read_frames`), by a naive full PyAV decode (every frame to RGB, then indexed) and
by decord (when installed); each read runs in a fresh subprocess, which reports its time (imports
excluded) and peak RSS (VmHWM, including the interpreter and imports: catnet's includes torch).
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
from pathlib import Path

import numpy as np
import torch
from bench_utils import interleaved, machine_info, pick_device, print_table, save_results, summary

from catnet.video.encode import write_video

SHARED_CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips" / "arm_wrestling_demo.mp4"


def make_videos(root: Path, n: int, frames: int, height: int, width: int, seed: int = 0,
                prefix: str = "video") -> list[Path]:
    """n textured, moving videos in two class folders (textures keep the codec honest: flat frames decode
    unrealistically fast)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        tex = rng.integers(0, 256, size=(height // 4 + 8, width // 4 + frames + 8, 3), dtype=np.uint8)
        tex = np.repeat(np.repeat(tex, 4, axis=0), 4, axis=1)  # 4x4 blocks: structure, not pure noise
        video = np.stack([tex[:height, 4 * t: 4 * t + width] for t in range(frames)])
        paths.append(write_video(root / f"class{i % 2}" / f"{prefix}{i:03d}.mp4", video, fps=25.0))
    return paths


# --------------------------------------------------------------------------------- pipeline vs model


def pipeline_fn(src: Path, work: Path, cfg):
    from catnet.features.extract import extract

    def fn():
        out = work / f"store-{time.monotonic_ns()}"
        try:
            result = extract(src, out, cfg, progress=False)
            if result.extracted == 0 or result.failed:
                raise RuntimeError(f"extraction failed: {result.failures[:1]}")
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return fn


def backbone_fn(views: torch.Tensor, cfg, device: torch.device):
    from catnet.backbones import build_backbone
    from catnet.backbones.common import optimize_for_inference

    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg.backbone).eval().to(device)
    if cfg.optimize:
        model = optimize_for_inference(model)

    def fn():
        with torch.inference_mode():
            for start in range(0, len(views), cfg.batch_size):
                x = views[start: start + cfg.batch_size].to(device)
                if cfg.optimize:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                model.forward_features(x)

    return fn


def bench_pipeline(args, device: torch.device, src: Path, work: Path) -> dict:
    from catnet.data.sources import list_videos
    from catnet.features.extract import ExtractConfig, extract
    from catnet.video import ClipSampling, SpatialConfig, load_clips

    base = dict(backbone=args.backbone, pretrained=False,
                sampling=ClipSampling(num_clips=args.clips, clip_len=args.frames, stride=args.stride),
                spatial=SpatialConfig(short_side=args.short_side, crop=args.crop, num_crops=args.crops),
                batch_size=args.batch, device=str(device))
    # the old default (eager model, 2 workers) and the optimised model with each worker count
    most = max(args.workers)
    settings = {f"eager-w{most}": ExtractConfig(**base, optimize=False, workers=most)}
    for w in args.workers:
        settings[f"optimized-w{w}"] = ExtractConfig(**base, optimize=True, workers=w)
    entries, _ = list_videos(src)
    sampling = ClipSampling(num_clips=args.clips, clip_len=args.frames, stride=args.stride)
    spatial = SpatialConfig(short_side=args.short_side, crop=args.crop, num_crops=args.crops)
    views = torch.cat([load_clips(e.path, sampling, spatial).views for e in entries])
    n_views = len(views)
    fns = {}
    for opt in (False, True):
        cfg = next(c for c in settings.values() if c.optimize == opt)
        fns[f"backbone-{'optimized' if opt else 'eager'}"] = backbone_fn(views, cfg, device)
    for name, cfg in settings.items():
        fns[f"pipeline-{name}"] = pipeline_fn(src, work, cfg)
    # the parts a pipeline adds: decoding + cropping alone (in this process, one thread, as a worker
    # runs it) and the fixed start-up (list videos, build the model, open the store) measured as a run
    # over a store that already holds every video
    done = work / "store-complete"
    startup_cfg = settings[f"optimized-w{most}"]
    extract(src, done, startup_cfg, progress=False)

    def decode_only():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for e in entries:
                load_clips(e.path, sampling, spatial)
        finally:
            torch.set_num_threads(threads)

    fns["decode+crop only (1 thread)"] = decode_only
    fns["startup only"] = lambda: extract(src, done, startup_cfg, progress=False)
    times = interleaved(fns, args.rounds, device, warmup=0)
    rows = {}
    for name, secs in times.items():
        rows[name] = {**summary(secs), "views_per_s": n_views / statistics.median(secs)}
    startup = rows["startup only"]["median_s"]
    for name, cfg in settings.items():
        ref = rows[f"backbone-{'optimized' if cfg.optimize else 'eager'}"]["views_per_s"]
        row = rows[f"pipeline-{name}"]
        row["ratio_to_backbone"] = row["views_per_s"] / ref
        row["ratio_to_backbone_without_startup"] = n_views / max(row["median_s"] - startup, 1e-9) / ref
    return {"videos": len(entries), "views": n_views, "view_shape": list(views.shape[1:]),
            "config": {**base, "workers": args.workers}, "runs": rows}


# --------------------------------------------------------------------------------------------- decoders


DECODE_CHILD = r"""
import json, sys, time
import numpy as np
method, path, idx = sys.argv[1], sys.argv[2], np.array(json.loads(sys.argv[3]), dtype=np.int64)
# imports before the clock starts: catnet.video pulls in torch, which is not decoding time
if method == "catnet":
    from catnet.video import read_frames
elif method == "pyav_full":
    import av
elif method == "decord":
    import decord
else:
    raise SystemExit(f"unknown method {method}")
def hwm_mb():  # VmHWM restarts at exec, unlike ru_maxrss, which keeps the parent's peak
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
base = hwm_mb()
t0 = time.perf_counter()
if method == "catnet":
    out = read_frames(path, idx)
elif method == "pyav_full":
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = np.stack(frames)[np.minimum(idx, len(frames) - 1)]
else:
    vr = decord.VideoReader(path, num_threads=1)
    out = vr.get_batch(list(np.minimum(idx, len(vr) - 1))).asnumpy()
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "peak_rss_mb": hwm_mb(), "rss_before_mb": base,
                  "shape": list(out.shape), "checksum": int(out[:, ::7, ::7].astype(np.int64).sum())}))
"""


def decode_methods() -> list[str]:
    methods = ["catnet", "pyav_full"]
    try:
        import decord  # noqa: F401

        methods.append("decord")
    except ImportError:
        pass
    return methods


def bench_decoders(args, files: list[Path]) -> dict:
    from catnet.video import ClipSampling, probe, sample_clips

    sampling = ClipSampling(num_clips=args.decode_clips, clip_len=args.frames, stride=args.stride)
    methods = decode_methods()
    out = {}
    for path in files:
        info = probe(path)
        idx = np.unique(sample_clips(info.num_frames, sampling)).tolist()
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m in methods:  # interleaved, each in a fresh process (peak RSS is per process)
                res = subprocess.run([sys.executable, "-c", DECODE_CHILD, m, str(path), json.dumps(idx)],
                                     capture_output=True, text=True, check=True)
                runs[m].append(json.loads(res.stdout.strip().splitlines()[-1]))
        checks = {m: r[0]["checksum"] for m, r in runs.items()}
        out[path.name] = {
            "frames_in_file": info.num_frames, "frames_needed": len(idx), "size": [info.width, info.height],
            "same_frames_as_catnet": {m: c == checks["catnet"] for m, c in checks.items()},
            "methods": {m: {"median_s": statistics.median(x["seconds"] for x in r),
                            "peak_rss_mb": max(x["peak_rss_mb"] for x in r),
                            "rss_before_decode_mb": max(x["rss_before_mb"] for x in r)}
                        for m, r in runs.items()}}
    return {"sampling": {"num_clips": args.decode_clips, "clip_len": args.frames, "stride": args.stride},
            "files": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="i3d_r50", choices=["i3d_r50", "i3d_inception"])
    p.add_argument("--videos", type=int, default=6, help="generated videos")
    p.add_argument("--video-frames", type=int, default=160)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--clips", type=int, default=2, help="clips per video (K)")
    p.add_argument("--frames", type=int, default=32, help="frames per clip (L)")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--crops", type=int, default=3, choices=[1, 3])
    p.add_argument("--short-side", type=int, default=128)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch", type=int, default=6, help="views per backbone forward")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decoding worker counts to try")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--decode-clips", type=int, default=10, help="K of the decoder comparison's sampling")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-decoders", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = pick_device(args.device)
    results = {"benchmark": "extraction", "machine": machine_info(device)}
    with tempfile.TemporaryDirectory(prefix="catnet-bench-") as tmp:
        work = Path(tmp)
        files = make_videos(work / "videos", args.videos, args.video_frames, args.height, args.width)
        if not args.skip_pipeline:
            r = bench_pipeline(args, device, work / "videos", work)
            results["pipeline"] = r
            print_table(f"extraction: {r['videos']} videos, {r['views']} views of {r['view_shape']} "
                        f"({args.backbone}, batch {args.batch})",
                        ["run", "median s", "views/s", "pipeline / backbone", "same, start-up excluded"],
                        [[k, v["median_s"], v["views_per_s"] if not k.endswith("only") else "",
                          f"{v['ratio_to_backbone']:.2f}" if "ratio_to_backbone" in v else "",
                          f"{v['ratio_to_backbone_without_startup']:.2f}" if "ratio_to_backbone" in v else ""]
                         for k, v in r["runs"].items()])
            save_results("extraction", results, args.out)
        if not args.skip_decoders:
            dec_files = files[:1] + ([SHARED_CLIP] if SHARED_CLIP.is_file() else [])
            # a 30 s video, where seeking pays off
            long = make_videos(work / "long", 1, 750, 256, 340, seed=1, prefix="long")
            r = bench_decoders(args, dec_files + long)
            results["decoders"] = r
            rows = []
            for fname, fr in r["files"].items():
                for m, v in fr["methods"].items():
                    rows.append([fname, f"{fr['frames_needed']}/{fr['frames_in_file']}", m, v["median_s"],
                                 f"{v['median_s'] / fr['methods']['catnet']['median_s']:.2f}x",
                                 v["peak_rss_mb"], v["peak_rss_mb"] - v["rss_before_decode_mb"],
                                 fr["same_frames_as_catnet"][m]])
            print_table(f"decoders: frames for {args.decode_clips} x {args.frames} @ stride {args.stride}",
                        ["file", "needed/total", "decoder", "median s", "time vs catnet", "peak RSS MB",
                         "growth MB", "same frames"], rows)
    path = save_results("extraction", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
