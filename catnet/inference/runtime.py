"""How `predict` and `serve` run the backbone: BN-folded + channels-last (exact), optionally bf16 autocast
and torch.compile with the inductor cache kept under $CATNET_HOME. Speed figures: docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from catnet.backbones.common import compile_for_inference, optimize_for_inference
from catnet.errors import CatnetError
from catnet.utils.paths import catnet_home

PRECISIONS = ("fp32", "bf16")
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def bf16_supported() -> tuple[bool, str]:
    """(whether CPU bf16 autocast runs on native instructions, why not). Without AVX512-BF16 or AMX, oneDNN
    emulates bf16 and is slower than fp32, so the caller falls back to fp32."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch has no oneDNN (mkldnn)"
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False, f"this CPU has no AVX512-BF16 or AMX (torch: {torch.backends.cpu.get_cpu_capability()})"
    return True, ""


def effective_precision(precision: str) -> tuple[str, str | None]:
    """(the precision that will run, a note for --verbose when it differs from the one asked for)."""
    if precision not in PRECISIONS:
        raise CatnetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        ok, why = bf16_supported()
        if not ok:
            return "fp32", f"bf16 asked for, running fp32: {why}"
    return precision, None


def use_inductor_cache() -> Path:
    """Point inductor's on-disk cache at $CATNET_HOME/inductor, so that a second process reuses the
    compiled kernels; a TORCHINDUCTOR_CACHE_DIR the user set is kept. Call before compiling."""
    if os.environ.get(INDUCTOR_ENV):
        return Path(os.environ[INDUCTOR_ENV])
    path = catnet_home() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_ENV] = str(path)  # inductor reads it at each lookup (runtime/cache_dir_utils.py)
    return path


def _channels_last(model: nn.Module) -> bool:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv3d)), None)
    return conv is not None and conv.weight.dim() == 5 and not conv.weight.is_contiguous() and \
        conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


class BackboneRunner:
    """Views -> clip features in fixed-size batches, with the optimisations chosen once per process.

    `backbone` is optimised in place (optimize_for_inference: exact to float rounding); `compile=True`
    adds compile_for_inference, whose one-off compile per input shape is why the last, partial batch is
    padded to the full batch size. `backbone` itself stays an eager module (Grad-CAM runs through it).
    """

    def __init__(self, backbone: nn.Module, batch_size: int = 4, precision: str = "fp32",
                 compile: bool = False, optimize: bool = True):
        self.backbone = optimize_for_inference(backbone) if optimize else backbone.eval()
        self.batch_size = max(1, int(batch_size))
        self.precision, self.note = effective_precision(precision)
        self.channels_last = _channels_last(self.backbone)
        self.compiled, self.cache_dir = None, None
        if compile:
            self.cache_dir = use_inductor_cache()
            self.compiled = compile_for_inference(self.backbone)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def features(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, T, S, S) in [0, 1] -> (V, D) float32, `batch_size` views at a time (bounds peak memory:
        30 views of 64 x 224² are > 1 GB)."""
        out = [self._forward(chunk) for chunk in views.split(self.batch_size)]
        return torch.cat(out).float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.compiled is not None and n < self.batch_size:
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
        if self.channels_last:  # matches channels-last weights: no layout conversion inside the model
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self.autocast():
            if self.compiled is None:
                return self.backbone.forward_features(x).float()
            try:
                return self.compiled(x)[:n].float()
            except Exception as e:  # no C++ compiler, an unsupported op: one line
                why = (str(e).strip().splitlines() or [""])[0][:200]
                raise CatnetError(f"compiling the backbone failed ({type(e).__name__}: {why}); use a "
                                  "profile without compile") from None
