"""One CATNet head training step (N = 32, concat, 64 videos x 10 views x 2048-d, 400 classes) through
the paths that could route its matmuls past MKL (issue 17, item 2): eager fp32, bf16 autocast,
torch.compile of forward + loss, and torch.compile with max-autotune's C++ GEMM templates; each with
glibc's default allocator (`system`) and with freed memory held in the process (`held`,
catnet.utils.memory, what `catnet train` does).

    python benchmarks/head_step.py --modes eager bf16 compile compile-autotune --heaps system held

Each (mode, heap) runs in a fresh process (compilation and allocator state do not leak), one warm-up
step (the compile for compiled modes, reported as `first_s`), then the median and minimum of 6 steps,
with the page faults per step and the peak RSS. Losses are checked against eager (bit-equal for the
allocator, within 1e-4 compiled). Writes benchmarks/results/head_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from bench_utils import RESULTS, machine_info

from catnet.heads import build_head
from catnet.utils.memory import hold_freed_memory

D, C, B, K = 2048, 400, 64, 10


def one_mode(mode: str, heap: str) -> dict:
    if heap == "held" and not hold_freed_memory():
        raise SystemExit("--heaps held: this C library cannot hold freed memory (glibc only)")
    torch.manual_seed(0)
    head = build_head("catnet", D, C, dropout=0.0)  # no dropout: the compiled loss must equal eager
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, fused=True)
    x, y = torch.randn(B, K, D), torch.randint(0, C, (B,))
    mask = torch.ones(B, K, dtype=torch.bool)

    def loss_of(x, mask, y):
        return F.cross_entropy(head(x, mask).float(), y)

    with torch.no_grad():
        reference = float(loss_of(x, mask, y))
    fn = loss_of
    if mode.startswith("compile"):
        if mode == "compile-autotune":
            inductor_config.max_autotune = True
            inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
        fn = torch.compile(loss_of, dynamic=False)
    amp = torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16")

    def step() -> float:
        with amp:
            loss = fn(x, mask, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t0
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    return {"mode": mode, "heap": heap, "first_s": first, "median_ms": 1000 * times[3],
            "min_ms": 1000 * times[0], "faults_per_step": (usage.ru_minflt - faults) // 6,
            "peak_rss_mb": usage.ru_maxrss // 1024, "first_loss": first_loss, "eager_loss": reference,
            "load1": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["eager", "bf16", "compile", "compile-autotune"])
    p.add_argument("--heaps", nargs="+", choices=("system", "held"), default=["system", "held"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # the child: MODE HEAP, one JSON line
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_mode(*args.one)))
        return 0
    rows = []
    for mode in args.modes:
        for heap in args.heaps:
            out = subprocess.run([sys.executable, __file__, "--one", mode, heap, "--threads",
                                  str(args.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.splitlines()[-1]))
    print("| mode | heap | one step, median ms | min ms | page faults / step | peak RSS MB | first step s "
          "| loss vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['heap']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
              f"{r['faults_per_step']:,} | {r['peak_rss_mb']:,} | {r['first_s']:.1f} | "
              f"{abs(r['first_loss'] - r['eager_loss']):.1e} |")
    out = {"rows": rows, "machine": machine_info(torch.device("cpu"))}
    (RESULTS / "head_step.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
