"""Autocast options shared by extraction, training and fine-tuning: one parser, one context manager."""

from __future__ import annotations

import contextlib

import torch

from catnet.errors import CatnetError

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}


def amp_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Parse an autocast dtype option: None, 'bfloat16'/'bf16', 'float16'/'fp16' (or a torch dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in AMP_DTYPES:
        raise CatnetError(f"unknown autocast dtype {name!r}; choose from {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[name]


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose gradients underflow without it; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
