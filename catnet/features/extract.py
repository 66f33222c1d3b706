"""`catnet extract`: offline clip features for every video, into a crash-safe, resumable feature store.

The paper extracts features once and trains heads on them (Sec. 4.1, "Local Feature Extraction"):
each video gives K = 10 clips of L = 32 frames at stride 4, each clip 3 crops, i.e. the 30 x_i of
Eq. (1), X = [r(I_1; θ1), ..., r(I_K; θ1)], per video.

Pipeline: DataLoader worker processes decode + crop whole videos (catnet.video.load_clips) while the
main process runs the backbone under inference_mode on batches of views gathered across videos.
Finished videos go to a StoreWriter, which appends each one (fsynced) to its journal at once and
writes a shard atomically every `--shard-size` videos or `--flush-seconds`; so a kill at any instant
loses only the videos in flight, and a rerun folds the journal into a shard and skips every video
already stored. Under torchrun each rank takes every WORLD_SIZE-th video and
writes its own `rankNNN-*` shards into the same store.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from catnet.backbones import build_backbone
from catnet.backbones.common import compile_for_inference, optimize_for_inference
from catnet.config import check_fields, spec
from catnet.data.sources import VideoEntry, list_videos
from catnet.errors import CatnetError
from catnet.features.store import (
    FORMAT_VERSION,
    SHARDS,
    StoreWriter,
    check_manifest,
    done_and_failed,
    make_manifest,
)
from catnet.video import ClipSampling, SpatialConfig, load_clips


@dataclass
class ExtractConfig:
    """Extraction settings; the defaults are the paper's Kinetics ones (10 clips x 32 frames, stride 4,
    3 crops of 224 from a 256 short side)."""

    backbone: str = field(default="i3d_inception", metadata=spec(choices=("i3d_inception", "i3d_r50")))
    checkpoint: str | None = None
    pretrained: bool | None = None  # None: Kinetics weights for i3d_inception unless a checkpoint is given
    sampling: ClipSampling = field(default_factory=ClipSampling)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    batch_size: int = field(default=16, metadata=spec(ge=1))  # views per backbone forward, across videos
    workers: int = field(default=2, metadata=spec(ge=0, le=64))  # decoding processes; 0: in-process
    # videos per shard (finished videos are journaled, so a kill costs none of them)
    shard_size: int = field(default=16, metadata=spec(ge=1))
    flush_seconds: float = field(default=60.0, metadata=spec(gt=0))  # ... or flush this often
    retry_failed: bool = False
    device: str = "auto"
    seed: int = field(default=0, metadata=spec(ge=0, lt=2**63))  # random-init backbones: same everywhere
    # Fold BN into the convs and go channels-last-3d: same features to ~1e-5, faster on CPU
    # (benchmarks/backbone.py, docs/benchmarks.md).
    optimize: bool = True
    # torch.compile the optimized model (backbones.common.compile_for_inference): faster after a one-off
    # compile per run; off by default because short runs and tests would mostly pay for the compile.
    compile: bool = False

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ExtractResult:
    store: str
    total: int = 0  # videos of the source assigned to this process (all ranks after the final reduce)
    already_done: int = 0
    recovered: int = 0  # of already_done: finished by a killed run, found in its journal at start
    extracted: int = 0  # run through the backbone in this run
    failed: int = 0  # failed in this run
    failed_before: int = 0  # recorded as failed by an earlier run and not retried
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)  # this run's, this rank's
    rank: int = 0  # of this process under torchrun

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0


# ---------------------------------------------------------------------------------------- pipeline


class _ClipDataset(torch.utils.data.Dataset):
    """Decodes one whole video per item; a bad video becomes an error string, never an exception."""

    def __init__(self, entries: list[VideoEntry], sampling, spatial):
        self.entries, self.sampling, self.spatial = entries, sampling, spatial

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        path = self.entries[i].path
        try:
            clips = load_clips(path, self.sampling, self.spatial, train=False)
            views = clips.views if torch.is_tensor(clips.views) else torch.from_numpy(np.asarray(clips.views))
            times = np.asarray(clips.clip_times, dtype=np.float32)
            if views.ndim != 5 or views.shape[0] == 0:
                return i, None, None, f"decoder returned views of shape {tuple(views.shape)}"
            return i, views.float(), times, None
        except Exception as e:  # noqa: BLE001 - any decode failure is recorded, not fatal
            reason = str(e) if isinstance(e, CatnetError) else f"{type(e).__name__}: {e}"
            return i, None, None, reason.splitlines()[0] if reason else type(e).__name__


class _Batcher:
    """Feeds views of consecutive videos to the backbone in fixed-size batches; calls `done(i, feats)`
    once all of video i's views are through, in arrival order."""

    def __init__(self, model: torch.nn.Module, batch_size: int, device: torch.device, done,
                 compiled: torch.nn.Module | None = None):
        self.model, self.batch_size, self.device, self.done = model, batch_size, device, done
        self.compiled = compiled
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv3d)), None)
        self.channels_last = conv is not None and conv.weight.is_contiguous(
            memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
        self.items: deque[list] = deque()  # [index, views, outputs, next view]
        self.pending = 0

    def push(self, index: int, views: torch.Tensor) -> None:
        self.items.append([index, views, [], 0])
        self.pending += len(views)
        while self.pending >= self.batch_size:
            self._step()

    def finish(self) -> None:
        while self.pending:
            self._step()

    def _step(self) -> None:
        parts, owners, need = [], [], self.batch_size
        for item in self.items:
            take = min(need, len(item[1]) - item[3])
            if take > 0:
                parts.append(item[1][item[3]: item[3] + take])
                owners.append((item, take))
                item[3] += take
                need -= take
            if need == 0:
                break
        x = torch.cat(parts).to(self.device, non_blocking=True)
        if self.channels_last:  # matches channels-last weights: no layout conversion inside the model
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            y = self._forward(x).float().cpu().numpy()
        start = 0
        for item, take in owners:
            item[2].append(y[start: start + take])
            start += take
        self.pending -= start
        while self.items and self.items[0][3] == len(self.items[0][1]):
            index, _, outs, _ = self.items.popleft()
            self.done(index, np.concatenate(outs))


    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model.forward_features(x)
        n = len(x)
        if n < self.batch_size:  # the last, partial batch: pad it rather than compile a second shape
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        try:
            return self.compiled(x)[:n]
        except Exception as e:  # no C++ compiler, an unsupported op: say so in one line
            why = (str(e).strip().splitlines() or [""])[0][:200]
            raise CatnetError(f"--compile failed ({type(e).__name__}: {why}); run without it") from None


def _dist_env() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise CatnetError("RANK and WORLD_SIZE must be integers") from None


def _lock(root: Path, prefix: str):
    """Refuse a second writer with the same shard prefix on this store (released on any exit, kill -9 too)."""
    f = open(root / f".lock.{prefix}", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CatnetError(f"another `catnet extract` is writing {root} as {prefix}; "
                          "wait for it or stop it") from None
    return f


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CatnetError(f"bad --device {name!r}: {e}") from None


def _wants_pretrained(cfg: ExtractConfig) -> bool:
    if cfg.pretrained is None:
        return cfg.backbone == "i3d_inception" and cfg.checkpoint is None
    return cfg.pretrained


def _build_model(cfg: ExtractConfig, device: torch.device):
    pretrained = _wants_pretrained(cfg)
    if not pretrained and cfg.checkpoint is None:
        print(f"catnet extract: warning: {cfg.backbone} has random weights (seed {cfg.seed}); features are "
              "only useful for tests. Pass --pretrained or --checkpoint.", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg.backbone, pretrained=pretrained, checkpoint=cfg.checkpoint)
    model = model.eval().to(device)
    if cfg.optimize:
        model = optimize_for_inference(model)
    return model


def extract(source: str | os.PathLike, out: str | os.PathLike, cfg: ExtractConfig | None = None,
            progress: bool = True) -> ExtractResult:
    """Extract features of every video in `source` into the store `out`; resumes an existing store."""
    cfg = cfg or ExtractConfig()
    rank, world = _dist_env()
    t0 = time.monotonic()
    entries, classes = list_videos(source)
    sampling, spatial = cfg.sampling, cfg.spatial
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise CatnetError(f"--out {root} exists and is not a directory")
    # refuse a mismatched store before paying for the model (weights_id is checked once it is built)
    check_manifest(root, {"format_version": FORMAT_VERSION, "backbone": cfg.backbone,
                          "sampling": asdict(sampling), "spatial": asdict(spatial), "classes": classes},
                   keys=("format_version", "backbone", "sampling", "spatial", "classes"))
    device = _resolve_device(cfg.device)
    model = _build_model(cfg, device)
    manifest = make_manifest(backbone=cfg.backbone, weights_id=str(model.weights_id),
                             num_features=int(model.num_features), sampling=asdict(sampling),
                             spatial=asdict(spatial), classes=classes,
                             checkpoint=str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None,
                             pretrained=_wants_pretrained(cfg), seed=cfg.seed,
                             source=str(Path(source).resolve()))
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"rank{rank:03d}"
    lock = _lock(root, prefix)  # before the writer, which deletes this prefix's leftover temporaries
    try:
        writer = StoreWriter(root, manifest, prefix=prefix, shard_size=cfg.shard_size,
                             flush_seconds=cfg.flush_seconds)
    except BaseException:
        lock.close()
        raise
    if rank == 0:  # leftovers of ranks that no longer exist (a rerun with fewer processes)
        for p in (root / SHARDS).glob(".rank*.tmp"):
            m = re.match(r"\.rank(\d+)-", p.name)
            if m and int(m.group(1)) >= world:
                p.unlink(missing_ok=True)

    # split the *full* sorted list over ranks, so the split never depends on what other ranks have
    # already written; then drop what is done
    entries = sorted(entries, key=lambda e: e.id)[rank::world]
    done, failed = done_and_failed(root)
    result = ExtractResult(store=str(root), total=len(entries), recovered=writer.num_recovered, rank=rank)
    todo = []
    for e in entries:
        if e.id in done:
            result.already_done += 1
        elif e.id in failed and not cfg.retry_failed:
            result.failed_before += 1
        else:
            todo.append(e)

    try:
        _run(todo, sampling, spatial, model, device, cfg, writer, result, progress and rank == 0)
    finally:
        writer.close()
        lock.close()
    result.seconds = time.monotonic() - t0
    if world > 1:
        _reduce_counts(result)
    return result


def _run(todo, sampling, spatial, model, device, cfg, writer, result, progress) -> None:
    if not todo:
        return
    loader = torch.utils.data.DataLoader(
        _ClipDataset(todo, sampling, spatial), batch_size=None, shuffle=False, num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None, pin_memory=device.type == "cuda")
    times: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(todo), unit="video", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    t0, clips = time.monotonic(), 0

    def done(i: int, feats: np.ndarray) -> None:
        nonlocal clips
        e = todo[i]
        with np.errstate(over="ignore"):  # as stored: values past float16's ±65504 become inf
            finite = np.isfinite(feats.astype(np.float16)).all()
        if not finite:
            fail(i, "non-finite clip features (NaN/Inf, or beyond float16 range)")
            times.pop(i)
            return
        writer.add(e.id, feats, times.pop(i), label=e.label, split=e.split, path=e.path,
                   num_crops=spatial.num_crops)
        result.extracted += 1
        clips += len(feats) // spatial.num_crops
        bar.set_postfix({"clips/s": f"{clips / max(time.monotonic() - t0, 1e-6):.1f}",
                         "failed": result.failed}, refresh=False)
        bar.update(1)

    def fail(i: int, reason: str) -> None:
        e = todo[i]
        writer.add_failure(e.id, e.path, reason)
        result.failed += 1
        result.failures.append({"id": e.id, "path": e.path, "reason": reason})
        bar.update(1)

    compiled = compile_for_inference(model) if cfg.compile else None
    batcher = _Batcher(model, cfg.batch_size, device, done, compiled)
    try:
        for i, views, clip_times, error in loader:
            if error is not None:
                fail(i, error)
                continue
            times[i] = clip_times
            batcher.push(i, views)
        batcher.finish()
    finally:
        bar.close()


def _reduce_counts(result: ExtractResult) -> None:
    """Sum counts over ranks: the only collective, so gloo is set up here and nowhere else."""
    own = not dist.is_initialized()
    if own:
        # ranks finish at different times; wait long rather than fail a finished extraction
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    try:
        keys = ("total", "already_done", "recovered", "extracted", "failed", "failed_before")
        t = torch.tensor([getattr(result, k) for k in keys], dtype=torch.int64)
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist(), strict=True):
            setattr(result, k, int(v))
    finally:
        if own:
            dist.destroy_process_group()
