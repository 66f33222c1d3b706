"""Head training over a feature store (issue 9, item 4): epoch time vs one read of the store.

    python benchmarks/training.py                       # scaled Kinetics-like store (see --videos)
    python benchmarks/training.py --full --store /big/kin-store   # 246k videos x 30 x 2048 fp16 (~30 GB)
    python benchmarks/training.py --device cuda

A store of generated features (fp16, the extraction layout: 30 views = 10 clips x 3 crops per video) is
written once with catnet's StoreWriter (or reused: `--store PATH` keeps it). Then, interleaved round by
round, each pass over the whole store:
  read-raw     every shard file read sequentially into a buffer: the I/O floor of one pass;
  read-store   every video read through FeatureStore.read_features in random order (what an epoch reads:
               all 30 views, of which training keeps TrainConfig.train_views);
  epoch        one `catnet.engine.train.train` epoch per head in --heads and worker count in --workers, each
               in a fresh process, reporting the epoch's time and the process's peak RSS.
With --cold (default) the page cache of the shards is dropped (posix_fadvise DONTNEED) before every
pass, so the figures include disk reads. Then:
  step         one training step of each head alone (no data): achieved GFLOP/s vs a fp32 matmul timed
               in the same rounds - how close a compute-bound epoch is to the machine;
  curves       epoch time and videos/s over K training views and N attention heads (small store).
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
import torch
from bench_utils import (
    count_flops,
    interleaved,
    machine_info,
    pick_device,
    print_table,
    save_results,
    summary,
)

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
    with StoreWriter(path, manifest, shard_size=shard_size, flush_seconds=None, journal=False) as writer:
        for i in range(videos):
            label = i % classes
            feats = pool[i % 64] + centres[label]
            writer.add(f"video{i:07d}", feats, times, label=label, split="train", num_crops=3)
    return store_bytes(path)


def store_bytes(path: Path) -> float:
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
    """Every video through FeatureStore.read_features (what training reads), in an epoch's random order."""
    from catnet.features.store import FeatureStore

    fs = FeatureStore(store)
    n = 0
    for i in np.random.default_rng(0).permutation(len(fs)).tolist():
        n += fs.read_features(i).shape[0]
    return n


def parse_head(spec: str) -> tuple[str, dict]:
    """'catnet:num_heads=8,aggregation=sum' -> ('catnet', {'num_heads': 8, 'aggregation': 'sum'})."""
    from catnet.config import parse_key_values

    name, _, opts = spec.partition(":")
    return name, parse_key_values([o for o in opts.split(",") if o], "--heads")


EPOCH_CHILD = r"""
import json, resource, sys, time
import catnet.engine.train
from catnet.engine.train import TrainConfig, train
store, out, device, views, head, opts, batch, workers, cold, amp, bench_dir, heap = sys.argv[1:13]
if heap == "held":  # what `catnet train` does (catnet/utils/memory.py)
    from catnet.utils.memory import hold_freed_memory
    if not hold_freed_memory():
        raise SystemExit("--heap held: this C library cannot hold freed memory (glibc only)")
if cold == "1":
    # train() reads every feature once before the first epoch (the NaN/Inf check), which warms the
    # page cache; drop it again when the epoch's loader is made, so the epoch itself reads cold.
    from pathlib import Path
    sys.path.insert(0, bench_dir)
    from training import drop_cache
    make_loader = catnet.engine.train.feature_loader
    def cold_loader(*a, **k):
        drop_cache(Path(store))
        return make_loader(*a, **k)
    catnet.engine.train.feature_loader = cold_loader
t0 = time.perf_counter()
res = train(TrainConfig(store=store, out=out, head=head, head_options=json.loads(opts), epochs=1,
                        batch_size=int(batch), train_views=int(views), val_split="none", device=device,
                        num_workers=int(workers), amp=amp or None, progress=False))
print(json.dumps({"epoch_s": res["history"][0]["time_s"], "total_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def epoch(store: Path, work: Path, args, views: int, spec: str, workers: int) -> dict:
    out = work / f"run-{time.monotonic_ns()}"
    name, opts = parse_head(spec)
    try:
        cmd = [sys.executable, "-c", EPOCH_CHILD, str(store), str(out), args.device, str(views), name,
               json.dumps(opts), str(args.batch), str(workers), "1" if args.cold else "0", args.amp or "",
               str(Path(__file__).resolve().parent), args.heap]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"training failed: {res.stderr.strip()[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_epoch_vs_read(store: Path, work: Path, args, videos: int) -> dict:
    passes = {"read-raw": lambda: read_raw(store), "read-store": lambda: read_store(store)}
    for spec in args.heads:
        for w in args.workers:
            passes[f"epoch {spec} workers={w}"] = (spec, w)
    runs: dict[str, list[dict]] = {name: [] for name in passes}
    for r in range(args.rounds):
        for name, what in passes.items():
            if args.cold:
                drop_cache(store)
            if callable(what):
                t0 = time.perf_counter()
                what()
                runs[name].append({"epoch_s": time.perf_counter() - t0})
            else:
                runs[name].append(epoch(store, work, args, args.views, *what))
            print(f"  round {r + 1}: {name}: {runs[name][-1]['epoch_s']:.2f}s", flush=True)
    rows = {}
    for name, rs in runs.items():
        rows[name] = {**summary([x["epoch_s"] for x in rs]),
                      "videos_per_s": videos / statistics.median(x["epoch_s"] for x in rs)}
        if "peak_rss_mb" in rs[0]:
            rows[name]["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
            rows[name]["process_total_s"] = statistics.median(x["total_s"] for x in rs)
    for name in rows:
        rows[name]["ratio_to_read_raw"] = rows[name]["median_s"] / rows["read-raw"]["median_s"]
        rows[name]["ratio_to_read_store"] = rows[name]["median_s"] / rows["read-store"]["median_s"]
    return rows


def bench_step(args, device: torch.device) -> dict:
    """One optimiser step of each head on a random batch: GFLOP/s against a same-rounds fp32 matmul."""
    import torch.nn.functional as F
    from backbone import gemm_fns  # the same two GEMMs as the backbone benchmark (torch.mm and oneDNN)

    from catnet.heads import build_head
    from catnet.utils.amp import amp_dtype, autocast

    gemms = gemm_fns(device)
    fns, flops = {k: fn for k, (fn, _) in gemms.items()}, {k: fl for k, (_, fl) in gemms.items()}
    for spec in args.heads:
        name, opts = parse_head(spec)
        torch.manual_seed(0)
        head = build_head(name, DIM, KINETICS_CLASSES, **opts).to(device).train()
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                              fused=device.type in ("cpu", "cuda"))
        x = torch.randn(args.batch, args.views, DIM, device=device)
        y = torch.randint(0, KINETICS_CLASSES, (args.batch,), device=device)

        def step(head=head, opt=opt, x=x, y=y):
            with autocast(device.type, amp_dtype(args.amp)):
                logits = head(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[spec], flops[spec] = step, count_flops(step)
    times = interleaved(fns, args.step_rounds, device)
    peak = max(flops[k] / statistics.median(times[k]) for k in gemms)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {**summary(ts), "gflop": flops[name] / 1e9, "gflop_per_s": flops[name] / med / 1e9,
                     "pct_of_gemm_peak": 100 * flops[name] / med / peak}
        if name in args.heads:
            out[name]["videos_per_s"] = args.batch / med
    return out


def bench_curves(work: Path, args) -> dict:
    store = work / "curve-store"
    write_store(store, args.curve_videos, VIEWS, DIM, 50, shard_size=256)
    spec = args.heads[-1]
    name, opts = parse_head(spec)
    out = {"videos": args.curve_videos, "head": spec, "views_K": {}, "heads_N": {}}
    for k in args.curve_views:
        r = [epoch(store, work, args, k, spec, 0) for _ in range(args.curve_rounds)]
        out["views_K"][k] = {"epoch_s": statistics.median(x["epoch_s"] for x in r),
                             "videos_per_s": args.curve_videos / statistics.median(x["epoch_s"] for x in r)}
    for n in args.curve_heads:
        with_n = f"{name}:" + ",".join(f"{k}={v}" for k, v in {**opts, "num_heads": n}.items())
        r = [epoch(store, work, args, args.views, with_n, 0) for _ in range(args.curve_rounds)]
        out["heads_N"][n] = {"epoch_s": statistics.median(x["epoch_s"] for x in r),
                             "videos_per_s": args.curve_videos / statistics.median(x["epoch_s"] for x in r)}
    shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help=f"the Kinetics-sized store ({KINETICS_VIDEOS} videos)")
    p.add_argument("--videos", type=int, default=2460, help="videos in the scaled store (1%% of Kinetics)")
    p.add_argument("--store", type=Path, default=None,
                   help="store to use: written there if missing, reused (and kept) if present")
    p.add_argument("--shard-size", type=int, default=16, help="videos per shard (extract's default)")
    p.add_argument("--views", type=int, default=10, help="training views per video (TrainConfig.train_views)")
    p.add_argument("--heads", nargs="+", default=["avgpool", "catnet"],
                   help="heads to train, NAME[:opt=value,...] (default: avgpool and the paper's CATNet)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--amp", default=None, help="head-training autocast: bf16 or fp16 (TrainConfig.amp)")
    p.add_argument("--heap", choices=("held", "system"), default="held",
                   help="held: freed memory stays in the process (as `catnet train`); system: glibc's")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="drop the store's page cache before every pass (default: on)")
    p.add_argument("--step-rounds", type=int, default=5)
    p.add_argument("--curve-videos", type=int, default=500)
    p.add_argument("--curve-views", type=int, nargs="+", default=[1, 10, 30])
    p.add_argument("--curve-heads", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--curve-rounds", type=int, default=1)
    p.add_argument("--skip-curves", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--skip-epochs", action="store_true", help="no reads or epochs (e.g. the step alone)")
    p.add_argument("--workdir", type=Path, default=None, help="temporary files (default: system temp)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = pick_device(args.device)
    args.device = str(device)
    videos = KINETICS_VIDEOS if args.full else args.videos
    work = Path(tempfile.mkdtemp(prefix="catnet-bench-", dir=args.workdir))
    store = args.store or work / "store"
    results = {"benchmark": "training", "machine": machine_info(device),
               "store": {"videos": videos, "views": VIEWS, "dim": DIM, "dtype": "float16",
                         "scale_of_kinetics": videos / KINETICS_VIDEOS, "cold_cache": args.cold},
               "train": {"heads": args.heads, "train_views": args.views, "batch": args.batch, "amp": args.amp,
                         "workers": args.workers, "heap": args.heap}}
    try:
        if (store / "manifest.json").is_file():
            from catnet.features.store import FeatureStore

            if len(FeatureStore(store)) != videos:
                sys.exit(f"error: {store} holds {len(FeatureStore(store))} videos, not {videos}")
            results["store"].update(bytes=store_bytes(store), reused=str(store))
        else:
            need = videos * VIEWS * DIM * 2
            free = shutil.disk_usage(store.parent if store.parent.exists() else work).free
            if need * 1.2 > free:
                sys.exit(f"error: the store needs ~{need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")
            t0 = time.perf_counter()
            size = write_store(store, videos, VIEWS, DIM, KINETICS_CLASSES, args.shard_size)
            results["store"].update(bytes=size, write_s=time.perf_counter() - t0)
        size = results["store"]["bytes"]
        print(f"store: {videos} videos x {VIEWS} x {DIM} fp16 = {size / 1e9:.2f} GB "
              f"({100 * videos / KINETICS_VIDEOS:.1f}% of Kinetics-400)")
        rows = {} if args.skip_epochs else bench_epoch_vs_read(store, work, args, videos)
        results["epoch_vs_read"] = rows
        if rows:
            print_table(f"one pass over the store ({'cold' if args.cold else 'warm'} page cache), median of "
                        f"{args.rounds}",
                        ["pass", "median s", "videos/s", "/ read-raw", "/ read-store", "peak RSS MB"],
                        [[k, v["median_s"], v["videos_per_s"], f"{v['ratio_to_read_raw']:.2f}",
                          f"{v['ratio_to_read_store']:.2f}",
                          f"{v['peak_rss_mb']:.0f}" if "peak_rss_mb" in v else ""] for k, v in rows.items()])
        save_results("training", results, args.out)
        if not args.skip_step:
            st = bench_step(args, device)
            results["step"] = st
            print_table(f"one training step alone (batch {args.batch}, K = {args.views}), median of "
                        f"{args.step_rounds}",
                        ["what", "ms", "GFLOP", "GFLOP/s", "% of GEMM peak", "videos/s"],
                        [[k, 1000 * v["median_s"], v["gflop"], v["gflop_per_s"],
                          f"{v['pct_of_gemm_peak']:.0f}%", v.get("videos_per_s", "")] for k, v in st.items()])
        if not args.skip_curves:
            c = bench_curves(work, args)
            results["curves"] = c
            print_table(f"epoch time over K training views ({c['videos']} videos, {c['head']})",
                        ["K", "epoch s", "videos/s"],
                        [[k, v["epoch_s"], v["videos_per_s"]] for k, v in c["views_K"].items()])
            print_table(f"epoch time over N heads ({c['videos']} videos, K={args.views})",
                        ["N", "epoch s", "videos/s"],
                        [[n, v["epoch_s"], v["videos_per_s"]] for n, v in c["heads_N"].items()])
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a --store outside it is kept
    path = save_results("training", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
