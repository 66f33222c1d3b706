"""`catnet extract`: offline clip features for every video, into a crash-safe, resumable feature store.

The paper extracts features once and trains heads on them (Sec. 4.1, "Local Feature Extraction"):
each video gives K = 10 clips of L = 32 frames at stride 4, each clip 3 crops, i.e. the 30 x_i of
Eq. (1), X = [r(I_1; θ1), ..., r(I_K; θ1)], per video. With `dense` set (`--dense`), a video gives one
row per fixed-stride window instead (catnet.video.stream, docs/long_videos.md), so row counts vary.

Pipeline: DataLoader worker processes decode + crop whole videos (catnet.video.load_clips) or, dense,
stream each video's windows in pieces of about a batch (`iter_windows`: a rolling decoder, so a 2-hour
video never sits in memory), while the main process runs the backbone under inference_mode. Each
video's views go through the backbone in batches of that video alone (`_Batcher`), so its features
depend on the video and `--batch` only, never on its neighbours or on where a resumed run started.
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from catnet.backbones import build_backbone
from catnet.backbones.common import compile_for_inference, optimize_for_inference
from catnet.config import check_fields, spec
from catnet.data.sources import VideoEntry, list_videos
from catnet.errors import CatnetError, quoted
from catnet.features.store import (
    FORMAT_VERSION,
    SHARDS,
    StoreWriter,
    check_manifest,
    done_and_failed,
    make_manifest,
)
from catnet.utils.memory import fix_mmap_threshold
from catnet.video import ClipSampling, SpatialConfig, load_clips, probe
from catnet.video.stream import DenseSampling, iter_windows
from catnet.video.transforms import test_views


@dataclass
class ExtractConfig:
    """Extraction settings; the defaults are the paper's Kinetics ones (10 clips x 32 frames, stride 4,
    3 crops of 224 from a 256 short side)."""

    backbone: str = field(default="i3d_inception", metadata=spec(choices=("i3d_inception", "i3d_r50")))
    checkpoint: str | None = None
    pretrained: bool | None = None  # None: Kinetics weights for i3d_inception unless a checkpoint is given
    sampling: ClipSampling = field(default_factory=ClipSampling)
    # dense windows instead of K clips: one row per window, `sampling` unused (docs/long_videos.md)
    dense: DenseSampling | None = None
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    batch_size: int = field(default=16, metadata=spec(ge=1))  # views per backbone forward, of one video
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

    def sampling_record(self) -> dict[str, Any]:
        """What the manifest records under "sampling": the dense windows, or the K-clip sampling."""
        return self.dense.to_dict() if self.dense is not None else asdict(self.sampling)


@dataclass
class ExtractResult:
    store: str
    total: int = 0  # videos of the source assigned to this process (all ranks after the final reduce)
    already_done: int = 0
    recovered: int = 0  # of already_done: finished by a killed run, found in its journal at start
    extracted: int = 0  # run through the backbone in this run
    rows: int = 0  # clips (or dense windows) of the extracted videos
    failed: int = 0  # failed in this run
    failed_before: int = 0  # recorded as failed by an earlier run and not retried
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)  # this run's, this rank's
    rank: int = 0  # of this process under torchrun

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0


# ---------------------------------------------------------------------------------------- pipeline


def _reason(e: Exception) -> str:
    reason = str(e) if isinstance(e, CatnetError) else f"{type(e).__name__}: {e}"
    return reason.splitlines()[0] if reason else type(e).__name__


class _ClipDataset(torch.utils.data.Dataset):
    """Decodes one whole video per item: (index, views, clip times, fps, error); a bad video becomes an
    error string, never an exception."""

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
                return i, None, None, None, f"decoder returned views of shape {tuple(views.shape)}"
            return i, views.float(), times, float(clips.info.fps), None
        except Exception as e:  # noqa: BLE001 - any decode failure is recorded, not fatal
            return i, None, None, None, _reason(e)


class _WindowStream(torch.utils.data.IterableDataset):
    """Dense windows of each video as pieces of at least `piece` views (whole windows):
    (index, views, window times, fps, final, error). A video is read by one rolling decoder
    (`iter_windows`), so only a ring of frames and a piece of views are ever held for it; worker w of
    W takes videos w, w + W, ... A video that fails, even after some pieces, ends with an error item."""

    def __init__(self, entries: list[VideoEntry], dense: DenseSampling, spatial: SpatialConfig, piece: int):
        self.entries, self.dense, self.spatial, self.piece = entries, dense, spatial, piece

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, len(self.entries), step):
            yield from self._video(i)

    def _video(self, i: int):
        d, path = self.dense, self.entries[i].path
        try:
            fps = probe(path).fps  # its VFR correction, so window times match K-clip clip times
            views, times, n = [], [], 0
            for w in iter_windows(path, d.window, d.hop, d.stride, hop_seconds=d.hop_seconds, fps=d.fps,
                                  short_side=self.spatial.short_side, input_fps=fps, timestamps="index"):
                views.append(test_views(w.frames, self.spatial))  # frames are resized: crops only
                times.append((w.start_s, w.end_s))
                n += len(views[-1])
                if n >= self.piece:
                    yield i, torch.cat(views), np.asarray(times, np.float32), None, False, None
                    views, times, n = [], [], 0
            out_fps = d.output_fps(fps)
            yield i, (torch.cat(views) if views else None), np.asarray(times, np.float32).reshape(-1, 2), \
                out_fps, True, None
        except Exception as e:  # noqa: BLE001 - any decode failure is recorded, not fatal
            yield i, None, None, None, True, _reason(e)


class _Batcher:
    """Runs the backbone on each video's views in batches of `batch_size` views of that video alone,
    the last one smaller (padded to full size when compiled): a video's features depend only on it and
    on `batch_size`, never on which videos came before it (so a resumed run equals an uninterrupted
    one bit for bit). Views may arrive in pieces (`final=False`); `done(i, feats)` once all are through.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, device: torch.device,
                 done: Callable[[int, np.ndarray], None], compiled: torch.nn.Module | None = None):
        self.model, self.batch_size, self.device, self.done = model, batch_size, device, done
        self.compiled = compiled
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv3d)), None)
        self.channels_last = conv is not None and conv.weight.is_contiguous(
            memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
        self.pending: dict[int, torch.Tensor] = {}  # views of a video not yet run (< batch_size)
        self.outputs: dict[int, list[np.ndarray]] = {}

    def push(self, index: int, views: torch.Tensor | None, final: bool = True) -> None:
        x = self.pending.pop(index, None)
        if views is not None and len(views):
            x = views if x is None else torch.cat([x, views])
        outs = self.outputs.setdefault(index, [])
        b, start = self.batch_size, 0
        n = 0 if x is None else len(x)
        while n - start >= b or (final and start < n):
            outs.append(self._run(x[start: start + b]))
            start += b
        if start < n:
            self.pending[index] = x[start:].clone()  # not a view: the piece it came from can go
        if final:
            del self.outputs[index]
            self.done(index, np.concatenate(outs) if outs else np.zeros((0, 0), np.float32))

    def drop(self, index: int) -> None:
        """Forget a video that failed part-way (its earlier pieces went through already)."""
        self.pending.pop(index, None)
        self.outputs.pop(index, None)

    def _run(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:  # matches channels-last weights: no layout conversion inside the model
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            return self._forward(x).float().cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model.forward_features(x)
        n = len(x)
        if n < self.batch_size:  # a video's last, partial batch: pad it rather than compile a second shape
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
    try:
        f = open(root / f".lock.{prefix}", "w")  # noqa: SIM115 - held for the whole run
    except OSError as e:
        raise CatnetError(f"cannot write --out {quoted(root)}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CatnetError(f"another `catnet extract` is writing {quoted(root)} as {prefix}; "
                          "wait for it or stop it") from None
    return f


def _resolve_device(name: str) -> torch.device:
    """cpu, or a GPU: under torchrun a bare "cuda" (or "auto") is this rank's GPU (LOCAL_RANK), so that
    the ranks of one machine do not all load their model onto GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CatnetError(f"bad --device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise CatnetError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CatnetError(f"--device {name}: no GPU is available (PyTorch sees none)")
        if device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CatnetError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(device)
    return device


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


def _prepare_out(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CatnetError(f"--out {quoted(root)} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CatnetError(f"cannot create --out {quoted(root)}: {e.strerror or e}") from None


def _open_writer(root: Path, manifest: dict[str, Any], cfg: ExtractConfig, rank: int, world: int):
    """(lock, writer) for this rank's shard prefix; removes temporaries of ranks that no longer exist."""
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
    return lock, writer


def extract(source: str | os.PathLike, out: str | os.PathLike, cfg: ExtractConfig | None = None,
            progress: bool = True, root: str | os.PathLike | None = None) -> ExtractResult:
    """Extract features of every video in `source` into the store `out`; resumes an existing store.
    `root`: where an annotation file's relative paths start (default: its folder)."""
    cfg = cfg or ExtractConfig()
    rank, world = _dist_env()
    t0 = time.monotonic()
    entries, classes = list_videos(source, root=root)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise CatnetError(f"--out {quoted(root)} exists and is not a directory")
    # refuse a mismatched store before paying for the model (weights_id is checked once it is built)
    early = {"format_version": FORMAT_VERSION, "backbone": cfg.backbone, "sampling": cfg.sampling_record(),
             "spatial": asdict(cfg.spatial), "classes": classes}
    check_manifest(root, early, keys=tuple(early))
    device = _resolve_device(cfg.device)
    model = _build_model(cfg, device)
    manifest = make_manifest(backbone=cfg.backbone, weights_id=str(model.weights_id),
                             num_features=int(model.num_features), sampling=cfg.sampling_record(),
                             spatial=asdict(cfg.spatial), classes=classes,
                             checkpoint=str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None,
                             pretrained=_wants_pretrained(cfg), seed=cfg.seed,
                             source=str(Path(source).resolve()))
    _prepare_out(root)
    lock, writer = _open_writer(root, manifest, cfg, rank, world)
    try:
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
            _Run(todo, cfg, model, device, writer, result, progress and rank == 0).run()
        finally:
            writer.close()
    finally:
        lock.close()
    result.seconds = time.monotonic() - t0
    if world > 1:
        _reduce_counts(result)
    return result


class _Run:
    """One process's extraction loop: decoded views -> `_Batcher` -> the writer, with a progress bar."""

    def __init__(self, todo: list[VideoEntry], cfg: ExtractConfig, model, device: torch.device,
                 writer: StoreWriter, result: ExtractResult, progress: bool):
        self.todo, self.cfg, self.writer, self.result = todo, cfg, writer, result
        self.crops = cfg.spatial.num_crops
        self.times: dict[int, list[np.ndarray]] = {}  # clip / window times per video in progress
        self.fps: dict[int, float] = {}
        self.device = device
        compiled = compile_for_inference(model) if cfg.compile and todo else None
        self.batcher = _Batcher(model, cfg.batch_size, device, self.done, compiled)
        self.progress = progress
        self.t0 = time.monotonic()

    def run(self) -> None:
        if not self.todo:
            return
        fix_mmap_threshold()
        workers = self.cfg.workers
        kw = dict(batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                  pin_memory=self.device.type == "cuda")
        self.bar = tqdm(total=len(self.todo), unit="video", file=sys.stderr, disable=not self.progress,
                        dynamic_ncols=True)
        try:
            if self.cfg.dense is None:
                loader = torch.utils.data.DataLoader(
                    _ClipDataset(self.todo, self.cfg.sampling, self.cfg.spatial), shuffle=False, **kw)
                items: Iterator = ((i, v, t, fps, True, err) for i, v, t, fps, err in loader)
            else:
                # workers of an iterable dataset interleave their videos' pieces; pieces of about a
                # batch keep each worker's prefetched views (2 pieces) small
                stream = _WindowStream(self.todo, self.cfg.dense, self.cfg.spatial, self.cfg.batch_size)
                items = iter(torch.utils.data.DataLoader(stream, **kw))
            for i, views, times, fps, final, error in items:
                if error is not None:
                    self.batcher.drop(i)
                    self.times.pop(i, None)
                    self.fail(i, error)
                    continue
                self.times.setdefault(i, []).append(times)
                if final:
                    self.fps[i] = fps
                self.batcher.push(i, views, final)
        finally:
            self.bar.close()

    def done(self, i: int, feats: np.ndarray) -> None:
        e = self.todo[i]
        times = np.concatenate(self.times.pop(i)).reshape(-1, 2)
        fps = self.fps.pop(i, None)
        with np.errstate(over="ignore"):  # as stored: values past float16's ±65504 become inf
            finite = np.isfinite(feats.astype(np.float16)).all()
        if len(feats) == 0:
            self.fail(i, "no windows or clips to extract")
            return
        if not finite:
            self.fail(i, "non-finite clip features (NaN/Inf, or beyond float16 range)")
            return
        self.writer.add(e.id, feats, times, label=e.label, split=e.split, path=e.path, num_crops=self.crops,
                        extra={"fps": fps} if fps else None, group=e.group)
        self.result.extracted += 1
        self.result.rows += len(times)
        rate = self.result.rows / max(time.monotonic() - self.t0, 1e-6)
        self.bar.set_postfix({"rows/s": f"{rate:.1f}", "failed": self.result.failed}, refresh=False)
        self.bar.update(1)

    def fail(self, i: int, reason: str) -> None:
        e = self.todo[i]
        self.writer.add_failure(e.id, e.path, reason)
        self.result.failed += 1
        self.result.failures.append({"id": e.id, "path": e.path, "reason": reason})
        self.bar.update(1)


def _reduce_counts(result: ExtractResult) -> None:
    """Sum counts over ranks: the only collective, so gloo is set up here and nowhere else."""
    own = not dist.is_initialized()
    if own:
        # ranks finish at different times; wait long rather than fail a finished extraction
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    try:
        keys = ("total", "already_done", "recovered", "extracted", "rows", "failed", "failed_before")
        t = torch.tensor([getattr(result, k) for k in keys], dtype=torch.int64)
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist(), strict=True):
            setattr(result, k, int(v))
    finally:
        if own:
            dist.destroy_process_group()
