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

import argparse
import fcntl
import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from catnet.data.annotations import VIDEO_SUFFIXES
from catnet.errors import CatnetError
from catnet.features.store import (
    FORMAT_VERSION,
    SHARDS,
    StoreWriter,
    check_manifest,
    done_and_failed,
    make_manifest,
)


@dataclass
class ExtractConfig:
    """Extraction settings; the defaults are the paper's Kinetics ones (10 clips x 32 frames, stride 4,
    3 crops of 224 from a 256 short side)."""

    backbone: str = "i3d_inception"
    checkpoint: str | None = None
    pretrained: bool | None = None  # None: Kinetics weights for i3d_inception unless a checkpoint is given
    num_clips: int = 10
    clip_len: int = 32
    stride: int = 4
    num_crops: int = 3
    short_side: int = 256
    crop_size: int = 224
    batch_size: int = 16  # views per backbone forward, gathered across videos
    workers: int = 2  # decoding processes; 0 decodes in the main process
    shard_size: int = 16  # videos per shard (finished videos are journaled, so a kill costs none of them)
    flush_seconds: float = 60.0  # ... or flush at least this often, for slow (long-video) runs
    retry_failed: bool = False
    device: str = "auto"
    seed: int = 0  # random-init backbones must be identical across ranks and reruns
    # Fold BN into the convs and go channels-last-3d: same features to ~1e-5, about 2x faster on CPU
    # for i3d_r50 (benchmarks/backbone.py, docs/benchmarks.md).
    optimize: bool = True
    # torch.compile the optimized model (backbones.common.compile_for_inference): a further 1.2-1.9x on
    # CPU after a one-off compile per run; off by default because short runs and tests would mostly pay
    # for the compile.
    compile: bool = False


@dataclass
class VideoEntry:
    id: str
    path: str
    label: int = -1
    split: str = ""


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

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.failed_before else 0


# ------------------------------------------------------------------------------------------- sources


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")


def list_videos(source: str | os.PathLike) -> tuple[list[VideoEntry], list[str]]:
    """Videos and class names of a folder (one sub-folder per class) or an annotation file.

    Folder ids are relative paths without suffix ("class/name"), as `catnet.data.annotations`
    makes them; videos directly in the folder have no label (-1).
    """
    source = Path(source)
    if source.is_file():
        return _from_annotations(source)
    if not source.is_dir():
        raise CatnetError(f"source not found: {source}")
    classes = sorted(d.name for d in source.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and any(map(_is_video, d.rglob("*"))))
    label_of = {c: i for i, c in enumerate(classes)}
    entries, seen = [], {}
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if not _is_video(p) or any(part.startswith(".") for part in rel.parts):
            continue
        vid = rel.with_suffix("").as_posix()
        if vid in seen:  # "a.mp4" next to "a.avi"
            raise CatnetError(f"two videos map to id {vid!r}: {seen[vid]} and {p}; rename one")
        seen[vid] = p
        label = label_of.get(rel.parts[0], -1) if len(rel.parts) > 1 else -1
        entries.append(VideoEntry(vid, os.path.abspath(p), label))
    if not entries:
        raise CatnetError(f"no videos found in {source} (looked for {', '.join(sorted(VIDEO_SUFFIXES))})")
    return entries, classes


def _from_annotations(path: Path) -> tuple[list[VideoEntry], list[str]]:
    from catnet.data.annotations import load_annotations

    ann = load_annotations(path)
    label_of = {c: i for i, c in enumerate(ann.classes)}
    entries, seen = [], set()
    # listed-but-missing files go through the pipeline too: they fail as "not found" and are recorded
    for it in [*ann.items, *ann.missing]:
        if it.id in seen:
            raise CatnetError(f"annotation file {path} lists video id {it.id!r} twice")
        seen.add(it.id)
        label = -1 if it.label is None else label_of.get(it.label, -1)
        entries.append(VideoEntry(str(it.id), os.path.abspath(it.path), label, it.split or ""))
    if not entries:
        raise CatnetError(f"annotation file {path} lists no videos")
    return entries, list(ann.classes)


# ---------------------------------------------------------------------------------------- pipeline


class _ClipDataset(torch.utils.data.Dataset):
    """Decodes one whole video per item; a bad video becomes an error string, never an exception."""

    def __init__(self, entries: list[VideoEntry], sampling, spatial):
        self.entries, self.sampling, self.spatial = entries, sampling, spatial

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from catnet.video import load_clips

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
    from catnet.backbones import build_backbone

    pretrained = _wants_pretrained(cfg)
    if not pretrained and cfg.checkpoint is None:
        print(f"catnet extract: warning: {cfg.backbone} has random weights (seed {cfg.seed}); features are "
              "only useful for tests. Pass --pretrained or --checkpoint.", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg.backbone, pretrained=pretrained, checkpoint=cfg.checkpoint)
    model = model.eval().to(device)
    if cfg.optimize:
        from catnet.backbones.common import optimize_for_inference

        model = optimize_for_inference(model)
    return model


# ExtractConfig fields that must be >= 1, and the `catnet extract` flag that sets each
_FLAGS = {"num_clips": "--clips", "clip_len": "--frames", "stride": "--stride", "num_crops": "--crops",
          "short_side": "--short-side", "crop_size": "--crop-size", "batch_size": "--batch",
          "shard_size": "--shard-size"}


def extract(source: str | os.PathLike, out: str | os.PathLike, cfg: ExtractConfig | None = None,
            progress: bool = True) -> ExtractResult:
    """Extract features of every video in `source` into the store `out`; resumes an existing store."""
    from catnet.video import ClipSampling, SpatialConfig

    cfg = cfg or ExtractConfig()
    for name, flag in _FLAGS.items():  # name the flag the user typed, not the config field
        if getattr(cfg, name) < 1:
            raise CatnetError(f"{flag} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise CatnetError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.crop_size > cfg.short_side:
        raise CatnetError(f"crop size {cfg.crop_size} is larger than short side {cfg.short_side}")
    rank, world = _dist_env()
    t0 = time.monotonic()
    entries, classes = list_videos(source)
    sampling = ClipSampling(num_clips=cfg.num_clips, clip_len=cfg.clip_len, stride=cfg.stride)
    spatial = SpatialConfig(short_side=cfg.short_side, crop=cfg.crop_size, num_crops=cfg.num_crops)
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
    result = ExtractResult(store=str(root), total=len(entries), recovered=writer.num_recovered)
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
    from tqdm import tqdm

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
                   num_crops=cfg.num_crops)
        result.extracted += 1
        clips += len(feats) // cfg.num_crops
        bar.set_postfix({"clips/s": f"{clips / max(time.monotonic() - t0, 1e-6):.1f}",
                         "failed": result.failed}, refresh=False)
        bar.update(1)

    def fail(i: int, reason: str) -> None:
        e = todo[i]
        writer.add_failure(e.id, e.path, reason)
        result.failed += 1
        result.failures.append({"id": e.id, "path": e.path, "reason": reason})
        bar.update(1)

    compiled = None
    if cfg.compile:
        from catnet.backbones.common import compile_for_inference

        compiled = compile_for_inference(model)
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
    import datetime

    import torch.distributed as dist

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


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ExtractConfig()
    p.add_argument("source", help="folder of videos (one sub-folder per class) or an annotation file")
    p.add_argument("--out", required=True, help="feature store folder (created, or resumed if it exists)")
    p.add_argument("--backbone", default=d.backbone, choices=["i3d_inception", "i3d_r50"])
    p.add_argument("--checkpoint", default=None, help="backbone weights (.safetensors or weights-only .pt)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="Kinetics-400 weights (default: on for i3d_inception without --checkpoint)")
    p.add_argument("--clips", type=int, default=d.num_clips, help="clips per video (K)")
    p.add_argument("--frames", type=int, default=d.clip_len, help="frames per clip (L)")
    p.add_argument("--stride", type=int, default=d.stride, help="frame stride inside a clip")
    p.add_argument("--crops", type=int, default=d.num_crops, choices=[1, 3], help="spatial crops per clip")
    p.add_argument("--short-side", type=int, default=d.short_side)
    p.add_argument("--crop-size", type=int, default=d.crop_size)
    p.add_argument("--batch", type=int, default=d.batch_size, help="views per backbone forward pass")
    p.add_argument("--workers", type=int, default=d.workers, help="decoding processes (0: in-process)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="videos per shard (flush interval)")
    p.add_argument("--flush-seconds", type=float, default=d.flush_seconds,
                   help="also flush a shard at least this often")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry videos an earlier run recorded as failed (default: skip them)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=d.optimize,
                   help="fold BN into convs + channels-last weights for speed (default: on)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the backbone: faster on long runs, ~5-25 s to compile first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt  # flushes finished videos on the way out (schedulers send SIGTERM first)


def run(args: argparse.Namespace) -> int:
    cfg = ExtractConfig(backbone=args.backbone, checkpoint=args.checkpoint, pretrained=args.pretrained,
                        num_clips=args.clips, clip_len=args.frames, stride=args.stride, num_crops=args.crops,
                        short_side=args.short_side, crop_size=args.crop_size, batch_size=args.batch,
                        workers=args.workers, shard_size=args.shard_size, flush_seconds=args.flush_seconds,
                        retry_failed=args.retry_failed, device=args.device,
                        optimize=getattr(args, "optimize", True), compile=getattr(args, "compile", False))
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        result = extract(args.source, args.out, cfg, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    rank, _ = _dist_env()
    for f in result.failures[:20]:
        print(f"failed: {f['path']}: {f['reason']}", file=sys.stderr)
    if len(result.failures) > 20:
        print(f"... and {len(result.failures) - 20} more failures this run", file=sys.stderr)
    if rank == 0:
        summary = {k: v for k, v in asdict(result).items() if k != "failures"}
        summary["videos_per_s"] = round(result.extracted / max(result.seconds, 1e-9), 3)
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            print(f"{result.extracted} extracted, {result.already_done} already in store, "
                  f"{result.failed} failed, {result.failed_before} failed earlier (not retried; "
                  f"--retry-failed) of {result.total} videos in {result.seconds:.1f}s -> {result.store}")
    return result.exit_code
