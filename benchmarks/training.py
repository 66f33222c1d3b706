"""Head training over a feature store (issue 9, item 4): epoch time vs one read of the store.

    python benchmarks/training.py                       # scaled Kinetics-like store (see --videos)
    python benchmarks/training.py --full                # 246k videos x 30 x 2048 fp16 (~30 GB on disk)
    python benchmarks/training.py --device cuda

A store of generated features (fp16, the extraction layout: 30 views = 10 clips x 3 crops per video) is
written once with catnet's StoreWriter. Then, interleaved round by round:
  read-raw     every shard file read sequentially into a buffer: the I/O floor of one pass;
  read-store   every video read through FeatureStore (memory-mapped, fp16 -> fp32): what training reads;
  epoch        one `catnet.train.train` epoch (CATNet head, paper recipe, no validation) in a fresh
               process, reporting the epoch's time and the process's peak RSS.
With --cold the page cache of the shards is dropped (posix_fadvise DONTNEED) before every pass, so the
figures include disk reads; otherwise a store smaller than RAM is read from the page cache.
The curves (epoch time and videos/s over K training views and N attention heads) run on a small store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_utils import machine_info, pick_device, print_table, save_results, summary

KINETICS_VIDEOS, KINETICS_CLASSES, VIEWS, DIM = 246_000, 400, 30, 2048


def write_store(path: Path, videos: int, views: int, dim: int, classes: int, shard_size: int) -> float:
    """Generated features in the extraction layout; returns the bytes on disk.

    A pool of random blocks plus a per-class offset keeps generation cheap (no 30 GB of fresh random
    numbers) while every video still differs and the labels are learnable.
    """
    from catnet.features.store import StoreWriter, make_manifest

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((64, views, dim), dtype=np.float32).astype(np.float16)
    centres = rng.standard_normal((classes, dim), dtype=np.float32).astype(np.float16)
    times = np.stack([np.arange(views // 3), np.arange(views // 3) + 1.0], 1).astype(np.float32)
    manifest = make_manifest(backbone="synthetic", weights_id="bench", num_features=dim,
                             sampling={"num_clips": views // 3}, spatial={"num_crops": 3},
                             classes=[f"class{c:03d}" for c in range(classes)])
    with StoreWriter(path, manifest, shard_size=shard_size, flush_seconds=None) as writer:
        for i in range(videos):
            label = i % classes
            feats = pool[i % 64] + centres[label]
            writer.add(f"video{i:07d}", feats, times, label=label, split="train", num_crops=3)
    return float(sum(p.stat().st_size for p in (path / "shards").glob("*")))


def drop_cache(store: Path) -> None:
    for p in (store / "shards").glob("*"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_raw(store: Path) -> int:
    buf = bytearray(64 << 20)
    total = 0
    for p in sorted((store / "shards").glob("*")):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def read_store(store: Path) -> int:
    from catnet.features.store import FeatureStore

    fs = FeatureStore(store)
    n = 0
    for i in range(len(fs)):
        n += fs[i].features.shape[0]
    return n


EPOCH_CHILD = r"""
import json, resource, sys, time
from catnet.train import TrainConfig, train
store, out, device, views, heads, batch, workers = sys.argv[1:8]
t0 = time.perf_counter()
res = train(TrainConfig(store=store, out=out, head="catnet", head_options={"num_heads": int(heads)},
                        epochs=1, batch_size=int(batch), train_views=int(views), val_split="none",
                        device=device, num_workers=int(workers), progress=False))
print(json.dumps({"epoch_s": res["history"][0]["time_s"], "total_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def epoch(store: Path, work: Path, args, views: int, heads: int) -> dict:
    out = work / f"run-{time.monotonic_ns()}"
    try:
        cmd = [sys.executable, "-c", EPOCH_CHILD, str(store), str(out), args.device, str(views), str(heads),
               str(args.batch), str(args.workers)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"training failed: {res.stderr.strip()[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_epoch_vs_read(store: Path, work: Path, args, videos: int) -> dict:
    runs: dict[str, list] = {"read-raw": [], "read-store": [], "epoch": []}
    for _ in range(args.rounds):
        for name in runs:
            if args.cold:
                drop_cache(store)
            t0 = time.perf_counter()
            if name == "read-raw":
                read_raw(store)
            elif name == "read-store":
                read_store(store)
            else:
                r = epoch(store, work, args, args.views, args.heads)
                runs[name].append(r)
                continue
            runs[name].append({"epoch_s": time.perf_counter() - t0})
    rows = {}
    for name, rs in runs.items():
        rows[name] = {**summary([r["epoch_s"] for r in rs]),
                      "videos_per_s": videos / statistics.median(r["epoch_s"] for r in rs)}
        if name == "epoch":
            rows[name]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
            rows[name]["process_total_s"] = statistics.median(r["total_s"] for r in rs)
    for name in ("read-store", "epoch"):
        rows[name]["ratio_to_read_raw"] = rows[name]["median_s"] / rows["read-raw"]["median_s"]
    rows["epoch"]["ratio_to_read_store"] = rows["epoch"]["median_s"] / rows["read-store"]["median_s"]
    return rows


def bench_curves(work: Path, args) -> dict:
    store = work / "curve-store"
    write_store(store, args.curve_videos, VIEWS, DIM, 50, shard_size=256)
    out = {"videos": args.curve_videos, "views_K": {}, "heads_N": {}}
    for k in args.curve_views:
        r = [epoch(store, work, args, k, args.heads) for _ in range(args.curve_rounds)]
        out["views_K"][k] = {"epoch_s": statistics.median(x["epoch_s"] for x in r),
                             "videos_per_s": args.curve_videos / statistics.median(x["epoch_s"] for x in r)}
    for n in args.curve_heads:
        r = [epoch(store, work, args, args.views, n) for _ in range(args.curve_rounds)]
        out["heads_N"][n] = {"epoch_s": statistics.median(x["epoch_s"] for x in r),
                             "videos_per_s": args.curve_videos / statistics.median(x["epoch_s"] for x in r)}
    shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help=f"the Kinetics-sized store ({KINETICS_VIDEOS} videos)")
    p.add_argument("--videos", type=int, default=2460, help="videos in the scaled store (1%% of Kinetics)")
    p.add_argument("--shard-size", type=int, default=16, help="videos per shard (extract's default)")
    p.add_argument("--views", type=int, default=10, help="training views per video (TrainConfig.train_views)")
    p.add_argument("--heads", type=int, default=32, help="CATNet attention heads N")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the training run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="drop the store's page cache before every pass (default: on)")
    p.add_argument("--curve-videos", type=int, default=500)
    p.add_argument("--curve-views", type=int, nargs="+", default=[1, 10, 30])
    p.add_argument("--curve-heads", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--curve-rounds", type=int, default=1)
    p.add_argument("--skip-curves", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="where the store goes (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = pick_device(args.device)
    args.device = str(device)
    videos = KINETICS_VIDEOS if args.full else args.videos
    need = videos * VIEWS * DIM * 2
    work = Path(tempfile.mkdtemp(prefix="catnet-bench-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if need * 1.2 > free:
        sys.exit(f"error: the store needs ~{need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free under {work}")
    results = {"benchmark": "training", "machine": machine_info(device),
               "store": {"videos": videos, "views": VIEWS, "dim": DIM, "dtype": "float16",
                         "scale_of_kinetics": videos / KINETICS_VIDEOS, "cold_cache": args.cold},
               "train": {"head": "catnet", "num_heads": args.heads, "train_views": args.views,
                         "batch": args.batch, "workers": args.workers}}
    try:
        t0 = time.perf_counter()
        size = write_store(work / "store", videos, VIEWS, DIM, KINETICS_CLASSES, args.shard_size)
        results["store"].update(bytes=size, write_s=time.perf_counter() - t0)
        print(f"store: {videos} videos x {VIEWS} x {DIM} fp16 = {size / 1e9:.2f} GB "
              f"({100 * videos / KINETICS_VIDEOS:.1f}% of Kinetics-400), written in "
              f"{results['store']['write_s']:.0f}s")
        rows = bench_epoch_vs_read(work / "store", work, args, videos)
        results["epoch_vs_read"] = rows
        print_table(f"one pass over the store ({'cold' if args.cold else 'warm'} page cache), median of "
                    f"{args.rounds}",
                    ["pass", "median s", "videos/s", "/ read-raw", "/ read-store", "peak RSS MB"],
                    [[k, v["median_s"], v["videos_per_s"], f"{v.get('ratio_to_read_raw', 1):.2f}",
                      f"{v['ratio_to_read_store']:.2f}" if "ratio_to_read_store" in v else "",
                      f"{v['peak_rss_mb']:.0f}" if "peak_rss_mb" in v else ""] for k, v in rows.items()])
        save_results("training", results, args.out)
        shutil.rmtree(work / "store", ignore_errors=True)
        if not args.skip_curves:
            c = bench_curves(work, args)
            results["curves"] = c
            print_table(f"epoch time over K training views ({c['videos']} videos, N={args.heads})",
                        ["K", "epoch s", "videos/s"],
                        [[k, v["epoch_s"], v["videos_per_s"]] for k, v in c["views_K"].items()])
            print_table(f"epoch time over N heads ({c['videos']} videos, K={args.views})",
                        ["N", "epoch s", "videos/s"],
                        [[n, v["epoch_s"], v["videos_per_s"]] for n, v in c["heads_N"].items()])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = save_results("training", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
