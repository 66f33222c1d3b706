"""Backbone forward speed (issue 9, items 1, 2 and 5): clips/s, achieved GFLOP/s and % of the GEMM peak.

    python benchmarks/backbone.py                         # CPU, fp32, both backbones + PyTorchVideo
    python benchmarks/backbone.py --device cuda --amp bf16 --batch 8

For each backbone (i3d_r50 on 32x224², i3d_inception on 64x224²) builds of the same weights run
interleaved in one process: `eager` (as `build_backbone` returns it), `channels_last` (5-D weights and input
channels-last-3d), `optimized` (`optimize_for_inference`: BN folded into the convs + channels-last) and,
with --compile, `compiled` (`compile_for_inference` on top: torch.compile with frozen weights).
Achieved GFLOP/s = FlopCounterMode FLOPs of one forward / median seconds; the peak is the faster of two
fp32 GEMMs (torch.mm and a oneDNN linear, 4096x2048x2048) timed in the same rounds (same machine
load). `--amp bf16` runs every variant under autocast (reported separately: the goal is fp32).

The PyTorchVideo comparison builds PyTorchVideo's i3d_r50 (create_resnet with the hub settings, 400
classes, random weights with randomised BN statistics), saves its state dict as a .pyth checkpoint, loads
that through catnet's checkpoint import, and times both on the same input; it reports the speed ratio and
the largest logit difference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import types
from pathlib import Path

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
from torch import nn

from catnet.backbones import build_backbone
from catnet.backbones.common import (
    KINETICS_MEAN,
    KINETICS_STD,
    autocast,
    compile_for_inference,
    optimize_for_inference,
)

SHAPES = {"i3d_r50": 32, "i3d_inception": 64}  # frames per clip, the paper's / each model's default


def gemm_fns(device: torch.device, n: int = 2048, reps: int = 4) -> dict[str, tuple]:
    """fp32 GEMM workloads of a few seconds on CPU: {name: (fn, FLOPs per call)}.

    On CPU two libraries: `torch.mm` (MKL) and a oneDNN linear layer (the library PyTorch's convs use).
    MKL takes a slower code path on AMD CPUs, so on the benchmark machine oneDNN's GEMM ran 2x faster;
    the peak is the faster of the two, measured in the same rounds.
    """
    a, b = torch.randn(2 * n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(2 * n, n, device=device)
    flops = 2.0 * 2 * n * n * n * reps

    def mm():
        for _ in range(reps):
            torch.mm(a, b, out=out)

    fns = {"gemm torch.mm": (mm, flops)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        from torch.utils import mkldnn

        lin = mkldnn.to_mkldnn(nn.Linear(n, n, bias=False).eval())
        am = a.to_mkldnn()

        def onednn():
            with torch.inference_mode():
                for _ in range(reps):
                    lin(am)

        fns["gemm oneDNN"] = (onednn, flops)
    return fns


def variants(model: nn.Module, compiled: bool) -> dict[str, nn.Module]:
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    out = {"eager": model, "channels_last": cl, "optimized": optimize_for_inference(copy.deepcopy(model))}
    if compiled:
        out["compiled"] = compile_for_inference(optimize_for_inference(copy.deepcopy(model)))
    return out


def forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device, amp: torch.dtype | None,
               features: bool = True):
    def fn():
        with torch.inference_mode(), autocast(device.type, amp):
            if not hasattr(model, "forward_features"):  # compile_for_inference's module: features only
                return model(x)
            return model.forward_features(x) if features else model(x)

    return fn


def bench_backbone(name: str, args, device: torch.device) -> dict:
    frames = SHAPES[name]
    torch.manual_seed(0)
    model = build_backbone(name).to(device)
    x = torch.rand(args.batch, 3, frames, args.size, args.size, device=device)
    models = variants(model, args.compile)
    fns = {}
    for vname, m in models.items():
        xin = x.contiguous(memory_format=torch.channels_last_3d) if vname != "eager" else x
        fns[vname] = forward_fn(m, xin, device, args.amp)
    flops = count_flops(fns["eager"])  # doubles as a warm-up of the eager variant
    with torch.inference_mode():
        ref = fns["eager"]().float()  # the first call of "compiled" compiles it: not timed below
        diffs = {v: float((fn().float() - ref).abs().max()) for v, fn in fns.items()}
        scale = float(ref.abs().max())
    # the GEMM peak is timed inside the same rounds: under a shared machine's changing load it then
    # sees the same contention as the model runs it normalises
    gemms = gemm_fns(device)
    times = interleaved({**fns, **{k: fn for k, (fn, _) in gemms.items()}}, args.rounds, device,
                        warmup=0 if args.rounds > 1 else 1)
    gemm_rates = {k: fl / statistics.median(times.pop(k)) / 1e9 for k, (_, fl) in gemms.items()}
    peak = max(gemm_rates.values())
    rows = {}
    for vname, secs in times.items():
        med = statistics.median(secs)
        gflops = flops / med / 1e9
        rows[vname] = {**summary(secs), "clips_per_s": args.batch / med, "gflops": gflops,
                       "pct_of_gemm_peak": 100 * gflops / peak, "max_abs_diff_vs_eager": diffs[vname],
                       "max_rel_diff_vs_eager": diffs[vname] / scale}
    base = rows["eager"]["median_s"]
    for r in rows.values():
        r["speedup_vs_eager"] = base / r["median_s"]
    return {"frames": frames, "size": args.size, "batch": args.batch, "gflop_per_forward": flops / 1e9,
            "gemm_peak_gflops": peak, "gemm_gflops": gemm_rates, "variants": rows}


# -------------------------------------------------------------------------------------- PyTorchVideo


def _pytorchvideo_create_resnet():
    """pytorchvideo.models.resnet.create_resnet, importable without torchvision / fvcore.

    Its package imports torchvision.ops.RoIAlign (detection heads) and fvcore's init helpers; neither is
    used for a classification ResNet whose weights are overwritten, so inert stand-ins are enough.
    """
    stubs = {"torchvision": {}, "torchvision.ops": {"RoIAlign": object}, "fvcore": {}, "fvcore.nn": {},
             "fvcore.nn.weight_init": {"c2_msra_fill": lambda m: None, "c2_xavier_fill": lambda m: None}}
    for mod_name, attrs in stubs.items():
        try:
            __import__(mod_name)
        except ImportError:
            mod = types.ModuleType(mod_name)
            mod.__dict__.update(attrs)
            sys.modules[mod_name] = mod
    from pytorchvideo.models.resnet import create_resnet

    return create_resnet


def _randomise_small_tensors(module: nn.Module, seed: int) -> None:
    """Random BN statistics/affine and classifier, so that a wrongly mapped tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, t in module.state_dict().items():
            if not t.is_floating_point() or t.dim() > 2:
                continue
            if pname.endswith(("running_var", "weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def bench_pytorchvideo(args, device: torch.device) -> dict:
    try:
        create_resnet = _pytorchvideo_create_resnet()
    except ImportError as e:
        return {"skipped": f"pytorchvideo not importable ({e}); pip install --no-deps pytorchvideo==0.1.5"}
    frames, size = SHAPES["i3d_r50"], args.size
    torch.manual_seed(0)
    # the hub's i3d_r50 settings (pytorchvideo/models/hub/resnet.py), head pool sized for 32 x size²
    ptv = create_resnet(
        stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
        stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)],
                                  [(1, 1, 1), (3, 1, 1)]),
        model_num_class=400, head_pool_kernel_size=(frames // 2, size // 32, size // 32), dropout_rate=0.0)
    for m in ptv.modules():  # PyTorch's default conv init; stubbed fvcore init left them as created
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    _randomise_small_tensors(ptv, 1)
    ptv = ptv.eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "I3D_R50_ptv.pyth"
        torch.save({"model_state": {k: v.cpu() for k, v in ptv.state_dict().items()}}, path)
        ours = build_backbone("i3d_r50", checkpoint=path).to(device)
    opt = optimize_for_inference(copy.deepcopy(ours))
    x = torch.rand(args.batch, 3, frames, size, size, device=device)
    mean = torch.tensor(KINETICS_MEAN, device=device).view(1, 3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD, device=device).view(1, 3, 1, 1, 1)

    def ptv_fn():
        with torch.inference_mode(), autocast(device.type, args.amp):
            return ptv((x - mean) / std)  # PyTorchVideo expects normalised input; we normalise inside

    xcl = x.contiguous(memory_format=torch.channels_last_3d)
    fns = {"pytorchvideo": ptv_fn, "catnet_eager": forward_fn(ours, x, device, args.amp, features=False),
           "catnet_optimized": forward_fn(opt, xcl, device, args.amp, features=False)}
    with torch.inference_mode():
        want = ptv_fn().float()
        scale = float(want.abs().max())
        diffs = {k: float((fn().float() - want).abs().max()) for k, fn in fns.items()}
    times = interleaved(fns, args.rounds, device, warmup=0)
    base = statistics.median(times["pytorchvideo"])
    rows = {k: {**summary(v), "clips_per_s": args.batch / statistics.median(v),
                "speedup_vs_pytorchvideo": base / statistics.median(v), "max_abs_logit_diff": diffs[k],
                "max_rel_logit_diff": diffs[k] / scale}
            for k, v in times.items()}
    return {"frames": frames, "size": size, "batch": args.batch, "max_abs_logit": scale, "variants": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--backbones", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=1, help="clips per forward")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-pytorchvideo", action="store_true", help="skip the PyTorchVideo comparison")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time compile_for_inference (torch.compile; compiling is not timed)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    results = {"benchmark": "backbone", "machine": machine_info(device),
               "precision": str(args.amp or torch.float32).replace("torch.", "")}
    print(f"{results['machine']['cpu']}, {results['machine']['torch_threads']} threads, load "
          f"{results['machine']['load_avg_1_5_15']}")
    results["backbones"] = {}
    for name in args.backbones:
        r = bench_backbone(name, args, device)
        results["backbones"][name] = r
        print_table(f"{name}: {r['batch']} x 3 x {r['frames']} x {r['size']}², {r['gflop_per_forward']:.1f} "
                    f"GFLOP/forward; fp32 GEMM peak in the same rounds {r['gemm_peak_gflops']:.1f} GFLOP/s ("
                    + ", ".join(f"{k} {v:.0f}" for k, v in r["gemm_gflops"].items()) + ")",
                    ["variant", "median s", "clips/s", "GFLOP/s", "% GEMM peak", "speed-up", "max |diff|",
                     "rel"],
                    [[k, v["median_s"], v["clips_per_s"], v["gflops"], f"{v['pct_of_gemm_peak']:.0f}%",
                      f"{v['speedup_vs_eager']:.2f}x", f"{v['max_abs_diff_vs_eager']:.1e}",
                      f"{v['max_rel_diff_vs_eager']:.1e}"]
                     for k, v in r["variants"].items()])
        save_results("backbone", results, args.out)
    if not args.no_pytorchvideo and "i3d_r50" in args.backbones:
        r = bench_pytorchvideo(args, device)
        results["pytorchvideo"] = r
        if "skipped" in r:
            print(f"\nPyTorchVideo comparison skipped: {r['skipped']}")
        else:
            print_table(f"i3d_r50 vs PyTorchVideo i3d_r50 (same weights, {r['batch']} x 3 x 32 x "
                        f"{r['size']}², max |logit| {r['max_abs_logit']:.3g})",
                        ["model", "median s", "clips/s", "speed-up", "max |logit diff|", "rel"],
                        [[k, v["median_s"], v["clips_per_s"], f"{v['speedup_vs_pytorchvideo']:.2f}x",
                          f"{v['max_abs_logit_diff']:.1e}", f"{v['max_rel_logit_diff']:.1e}"]
                         for k, v in r["variants"].items()])
    path = save_results("backbone", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
