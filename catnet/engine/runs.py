"""A run folder's files, shared by `catnet train` and `catnet finetune-backbone`, and reading runs back.

    RUN/run.json             what was trained and how (RUN_JSON)
    RUN/checkpoints/*.pt     weights-only-loadable checkpoints (save_checkpoint / load_checkpoint)
    RUN/metrics.csv          one row per epoch (write_metrics / read_history)
    RUN/tb/                  TensorBoard events (open_writer / log_scalars)

plus the RNG states a checkpoint carries for bit-exact resumes, `load_run` (a trained head back, for
eval, predict, export and the report) and `transfer_head` (Sec. 4.3).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from catnet.errors import CatnetError, unpickling_refused
from catnet.heads import head_from_config
from catnet.utils.io import atomic_write, atomic_write_text

RUN_JSON = "run.json"
BACKBONE_FILE = "backbone.safetensors"  # what a backbone fine-tuning run (engine/finetune.py) saves
CHECKPOINTS = "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG training touches, as tensors and primitives only (weights-only loadable)."""
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(mt.astype(np.int64)),
             "numpy_extra": [int(pos), int(has_gauss), float(gauss)],
             "python": torch.tensor(py_state, dtype=torch.int64), "python_extra": [int(version), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_extra"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = state["python_extra"]
    random.setstate((version, tuple(state["python"].tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CatnetError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # code or foreign objects inside: never fall back to a full unpickle
        raise unpickling_refused(path, e) from None
    except Exception as e:  # a damaged file
        raise CatnetError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise CatnetError(f"{run_dir} is not a catnet run (no {RUN_JSON})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CatnetError(f"corrupt {path}: {e}") from None


def uniform_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same columns (epochs without validation get empty cells), for the CSV."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    return [{k: row.get(k, "") for k in keys} for row in history]


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """metrics.csv as rows of floats (empty cells left out); [] without one."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def fmt_metric(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def wrap_ddp(model: torch.nn.Module, device: str, local_rank: int, world_size: int) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun, else itself."""
    if world_size == 1:
        return model
    device_ids = [local_rank] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def open_writer(out: Path, start: int):
    """The run's TensorBoard writer; a resumed run drops events logged after its checkpoint."""
    return SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)


def log_scalars(writer, row: dict[str, Any], epoch: int) -> None:
    """One epoch's float metrics to TensorBoard, `train_loss` as `train/loss`; NaNs skipped."""
    for k, v in row.items():
        if k != "epoch" and isinstance(v, float) and not math.isnan(v):
            writer.add_scalar(k.replace("_", "/", 1), v, epoch)
    writer.flush()


# ------------------------------------------------------------------------------------------ reading runs


def load_run(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The trained head of a run (eval mode, CPU) and its run.json; `which` is "best" or "last"."""
    if which not in ("best", "last"):
        raise CatnetError(f"which must be 'best' or 'last', got {which!r}")
    info = read_run_info(run_dir)
    if isinstance(info, dict) and info.get("kind") == "backbone":
        raise CatnetError(f"{run_dir} is a backbone fine-tuning run, not a trained head: extract features "
                          f"with it (catnet extract --checkpoint {Path(run_dir) / BACKBONE_FILE}) "
                          "and train a head on them")
    config = (info.get("head") or {}).get("config") if isinstance(info, dict) else None
    if not isinstance(config, dict):
        raise CatnetError(f"{Path(run_dir) / RUN_JSON} records no head config: not a run of catnet train")
    head = head_from_config(config)
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINTS / f"{which}.pt")
    head.load_state_dict(ckpt["model"])
    return head.eval(), info


def transfer_head(run_dir: str | Path, num_classes: int, in_dim: int,
                  dropout: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Paper Sec. 4.3: the head of a (Kinetics-)trained run with a fresh `num_classes`-way classifier."""
    head, info = load_run(run_dir, which="best")
    if head.config.in_dim != in_dim:
        raise CatnetError(f"--init-from run {run_dir} was trained on {head.config.in_dim}-d features, "
                          f"this store has {in_dim}-d")
    head.reset_classifier(num_classes)
    if dropout is not None:
        head.config = dataclasses.replace(head.config, dropout=dropout)
        head.drop.p = dropout
    return head.train(), info
