"""Fine-tuning a clip backbone end to end on videos - the paper's baseline (Sec. 4.1) - through the one loop.

    result = finetune(FinetuneConfig(source="VIDEOS", out="RUN", inflate_from="resnet50_2d.pth"))
    torchrun --nproc_per_node=8 -m catnet finetune-backbone VIDEOS --out RUN      # data parallel
    catnet extract VIDEOS --backbone i3d_r50 --checkpoint RUN/backbone.safetensors --out STORE

The paper initialises ResNet-50 I3D from ImageNet and fine-tunes it on clips of the training videos
before extracting the features CATNet is trained on. Training sees one random clip per video per step
(a random slot of the test `ClipSampling`, random short side in `train_short`, random crop, random flip:
`catnet.video.train_view`). Evaluation is the "ResNet-50 I3D (Baseline)" row of Table 1: each video's
10 clips x 3 crops = 30 views go through the network and their softmax probabilities are averaged
(probabilities, not logits, so that no single over-confident view dominates the vote).

RUN (same layout as `catnet train`, docs/training.md), plus RUN/backbone.safetensors: best.pt's weights,
classifier included, as `build_backbone(checkpoint=...)` and `catnet extract --checkpoint` read them.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catnet.backbones import build_backbone
from catnet.backbones.common import save_safetensors
from catnet.backbones.i3d_resnet import save_weights
from catnet.config import spec, to_dict
from catnet.data.sources import VideoEntry, list_videos
from catnet.engine.loop import Job, Recipe, check_run_folder, fit, run_folder
from catnet.engine.metrics import MetricAccumulator
from catnet.engine.runs import BACKBONE_FILE, seed_everything
from catnet.engine.splits import SplitPlan, plan_splits
from catnet.errors import CatnetError, VideoError
from catnet.utils import distributed as dist
from catnet.utils.amp import amp_dtype, autocast
from catnet.version import __version__
from catnet.video import ClipSampling, SpatialConfig, load_clips

IGNORE = -100  # label of a clip that failed to decode: cross-entropy skips it
# Fields of catnet 0.1's flat FinetuneConfig -> where they live now (old run.json files still resume).
_V01_KEYS = {"clip_len": ("sampling", "clip_len"), "stride": ("sampling", "stride"),
             "test_clips": ("sampling", "num_clips"), "short_side": ("spatial", "short_side"),
             "crop": ("spatial", "crop"), "test_crops": ("spatial", "num_crops"),
             "train_short": ("spatial", "train_short")}


@dataclass
class FinetuneConfig(Recipe):
    """One backbone fine-tuning run: the recipe (Recipe) plus the backbone, its initial weights and the
    clips. Paper values where it gives them (Sec. 4.1); the rest are marked."""

    # The paper's schedule, spelled out: Recipe's defaults are the paper's, but this is what they mean here.
    schedule: str = field(default="step", metadata=spec(choices=("step", "cosine")))
    source: str = ""  # folder of videos (one sub-folder per class) or an annotation file
    root: str | None = None  # where an annotation file's relative paths start (default: its folder)
    backbone: str = field(default="i3d_r50", metadata=spec(choices=("i3d_r50", "i3d_inception")))
    backbone_options: dict[str, Any] = field(default_factory=dict)  # e.g. {variant: mmaction2} for i3d_r50
    checkpoint: str | None = None  # initial weights; the classifier is replaced for this dataset's classes
    pretrained: bool = False  # the backbone's own pretrained weights (i3d_inception: Kinetics-400)
    inflate_from: str | None = None  # i3d_r50 only: a 2-D ImageNet ResNet-50, inflated (paper's init)
    dropout: float = field(default=0.5, metadata=spec(ge=0, lt=1))  # before the classifier; ours
    # Test-time views: the baseline's 10 clips x 32 frames (stride 4 on Kinetics, 1 on UCF101/HMDB51:
    # "32 successive frames") x 3 crops of 224; training draws one clip and one crop from these.
    sampling: ClipSampling = field(default_factory=ClipSampling)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    eval_every: int = field(default=5, metadata=spec(ge=1))  # 30 views per video: not every epoch
    eval_batch_size: int = field(default=30, metadata=spec(ge=1))  # views per forward pass at evaluation
    num_workers: int = field(default=4, metadata=spec(ge=0, le=64))  # decoding processes

    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = (*Recipe.RESUME_MUTABLE, "source", "root", "num_workers",
                                                 "eval_batch_size")
    LEGACY: ClassVar[dict[str, Any]] = {**Recipe.LEGACY, "root": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum([self.checkpoint is not None, self.pretrained, self.inflate_from is not None]) > 1:
            raise CatnetError("give at most one of --checkpoint, --pretrained and --inflate-from")
        if self.inflate_from is not None and self.backbone != "i3d_r50":
            raise CatnetError("--inflate-from (2-D ImageNet ResNet-50) only applies to --backbone i3d_r50")
        if self.spatial.crop > self.spatial.train_short[0]:
            raise CatnetError(f"crop {self.spatial.crop} is larger than the smallest training short side "
                              f"{self.spatial.train_short[0]}")

    @classmethod
    def upgrade(cls, data: dict[str, Any], recorded: bool = True) -> dict[str, Any]:
        """A FinetuneConfig dict in today's shape, from any earlier catnet's run.json (or a YAML)."""
        data = super().upgrade(data, recorded)
        for old, (part, key) in _V01_KEYS.items():
            if old in data:
                data.setdefault(part, {})[key] = data.pop(old)
        return data

    def train_sampling(self) -> ClipSampling:
        return dataclasses.replace(self.sampling, num_clips=1)

    def train_spatial(self) -> SpatialConfig:
        return dataclasses.replace(self.spatial, num_crops=1)


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: FinetuneConfig, classes: list[str]) -> nn.Module:
    """The backbone with a fresh `len(classes)`-way classifier on the chosen initial weights."""
    n = len(classes)
    if cfg.backbone == "i3d_r50":
        options: dict[str, Any] = {**cfg.backbone_options, "num_classes": n, "dropout": cfg.dropout}
        if cfg.checkpoint is None and cfg.inflate_from is None and not cfg.pretrained:
            options["seed"] = cfg.seed  # reproducible random init
        model = build_backbone("i3d_r50", pretrained=cfg.pretrained,
                               checkpoint=cfg.inflate_from or cfg.checkpoint, **options)
        if cfg.inflate_from is not None and not model.weights_source.startswith("resnet2d:"):
            raise CatnetError(f"--inflate-from {cfg.inflate_from} is not a 2-D ResNet-50 checkpoint "
                              f"(found {model.weights_source.split(':')[0]} weights); use --checkpoint")
    elif cfg.backbone == "i3d_inception":
        model = build_backbone("i3d_inception", pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                               **{**cfg.backbone_options, "num_classes": n, "drop_rate": cfg.dropout})
    else:
        raise CatnetError(f"cannot fine-tune backbone {cfg.backbone!r}; choose i3d_r50 or i3d_inception")
    model.labels = list(classes)
    return model


def save_backbone(model: nn.Module, path: str | Path, backbone: str) -> Path:
    """Weights in the format `build_backbone(backbone, checkpoint=path)` loads (safetensors)."""
    if backbone == "i3d_r50":
        return save_weights(model, path)
    meta = {"catnet_backbone": backbone, "labels": list(model.labels or [])}
    return save_safetensors(model.state_dict(), path, meta)


# ------------------------------------------------------------------------------------------ data


class TrainClips(torch.utils.data.Dataset):
    """One augmented random clip of video i: (3, L, S, S), label; a bad video gives a blank clip + IGNORE.

    The clip depends only on (seed, epoch, video), never on the worker or on a resume.
    """

    def __init__(self, entries: list[VideoEntry], cfg: FinetuneConfig):
        self.entries, self.seed = entries, cfg.seed
        self.sampling, self.spatial = cfg.train_sampling(), cfg.train_spatial()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        e = self.entries[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            clips = load_clips(e.path, self.sampling, self.spatial, train=True, rng=rng)
            return clips.views[0], e.label
        except VideoError as err:
            print(f"warning: skipping {e.path} this step: {err}", file=sys.stderr)
            s = self.spatial.crop
            return torch.zeros(3, self.sampling.clip_len, s, s), IGNORE


def select_splits(entries: list[VideoEntry], cfg: FinetuneConfig) -> SplitPlan:
    """Train and validation videos among the labelled ones, by the rules of `catnet train`."""
    labelled = [i for i, e in enumerate(entries) if e.label >= 0]
    if not labelled:
        raise CatnetError(f"{cfg.source} has no labelled videos; fine-tuning needs class labels")
    plan = plan_splits([entries[i].split for i in labelled], [entries[i].id for i in labelled],
                       np.array([entries[i].label for i in labelled]), train_split=cfg.train_split,
                       val_split=cfg.val_split, holdout_fraction=cfg.holdout_fraction,
                       where=str(cfg.source), groups=[entries[i].group for i in labelled],
                       holdout_rule=cfg.holdout_rule)
    return dataclasses.replace(plan, train=[labelled[i] for i in plan.train],
                               val=[labelled[i] for i in plan.val])


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def video_probabilities(model: nn.Module, views: torch.Tensor, batch_size: int, device: str,
                        amp: torch.dtype | None = None) -> torch.Tensor:
    """(C,) the mean over views of softmax(model(view)): the baseline's 30-view video prediction."""
    probs = []
    for chunk in views.split(batch_size):
        with autocast(torch.device(device).type, amp):
            logits = model(chunk.to(device, non_blocking=True))
        probs.append(logits.float().softmax(1))
    return torch.cat(probs).mean(0)


@torch.no_grad()
def evaluate_videos(model: nn.Module, entries: list[VideoEntry], indices: list[int], cfg: FinetuneConfig,
                    device: str, progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5/mean-class accuracy of the view-averaged predictions, sharded over DDP ranks.

    Videos that fail to decode are counted (`failed`) and left out of the metrics.
    """
    model.eval()
    sampling, spatial = cfg.sampling, cfg.spatial
    acc = MetricAccumulator(model.num_classes)
    failed = torch.zeros((), dtype=torch.int64)
    shard = list(dist.ShardSampler(indices))
    loader = torch.utils.data.DataLoader(_EvalClips(entries, shard, sampling, spatial), batch_size=None,
                                         num_workers=cfg.num_workers)
    for views, label in tqdm(loader, desc="eval", leave=False, file=sys.stderr,
                             disable=not (progress and dist.is_main())):
        if views is None:
            failed += 1
            continue
        p = video_probabilities(model, views, cfg.eval_batch_size, device, amp_dtype(cfg.amp))
        logp = p.clamp_min(1e-12).log()[None]
        y = torch.tensor([label])
        acc.update(logp, y, float(-logp[0, label]))
    out = acc.compute()
    out["failed"] = int(dist.all_reduce_sum(failed))
    return out


class _EvalClips(torch.utils.data.Dataset):
    """All test views of one video per item (V, 3, L, S, S), or None when it cannot be decoded."""

    def __init__(self, entries, indices, sampling, spatial):
        self.entries, self.indices, self.sampling, self.spatial = entries, indices, sampling, spatial

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        e = self.entries[self.indices[j]]
        try:
            return load_clips(e.path, self.sampling, self.spatial).views, e.label
        except VideoError as err:
            print(f"warning: evaluation skips {e.path}: {err}", file=sys.stderr)
            return None, e.label


# ------------------------------------------------------------------------------------------ training


class BackboneJob(Job):
    """A backbone on decoded clips: one random clip per video per step; 30-view validation."""

    def __init__(self, cfg: FinetuneConfig, entries: list[VideoEntry], model: nn.Module, plan: SplitPlan,
                 info: dist.DistInfo):
        self.cfg, self.entries, self.model, self.plan, self.info = cfg, entries, model, plan, info
        self.dataset = TrainClips(entries, cfg)
        self.num_classes = model.num_classes
        self.what = f"fine-tuning {cfg.backbone} ({model.num_classes} classes)"

    def train_labels(self) -> np.ndarray:
        return np.array([self.entries[i].label for i in self.plan.train], dtype=np.int64)

    def batches(self, epoch: int, order: list[int], batch_size: int):
        self.dataset.set_epoch(epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=order,
                                           num_workers=self.cfg.num_workers,
                                           pin_memory=self.info.device.startswith("cuda"))

    def loss(self, net, batch, device, criterion):
        x, y = (t.to(device, non_blocking=True) for t in batch)
        keep = y != IGNORE
        valid = keep.sum()
        if 0 < int(valid) < len(y):  # failed videos' blank clips stay out of BatchNorm's batch statistics
            x, y = x[keep], y[keep]
        logits = net(x).float()
        # the criterion's mean skips IGNORE (criterion.ignore_index); a batch of only failed clips steps
        # with zero gradient rather than 0/0 (under DDP the criterion itself does, and every rank calls
        # it); only such a batch, all blank, still reaches BatchNorm
        loss = criterion(logits, y) if criterion.world_size > 1 or bool(valid) else logits.sum() * 0.0
        # the logged loss: under DDP this rank's own sum (its `loss` is scaled by the global count)
        total = criterion.local_sum(logits.detach(), y) if criterion.world_size > 1 else loss.detach() * valid
        return loss, total, (logits.argmax(1) == y).sum(), valid

    def validate(self, epoch: int, last: bool, epochs: int):
        if (epoch + 1) % self.cfg.eval_every and not last:
            return None
        if self.info.world_size > 1:  # each rank's last step moved its own BatchNorm running stats:
            dist.broadcast_buffers(self.model)  # validate rank 0's, the ones the checkpoint saves
        return evaluate_videos(self.model, self.entries, self.plan.val, self.cfg, self.info.device,
                               progress=self.cfg.progress)

    def on_best(self, out: Path) -> None:
        save_backbone(self.model, out / BACKBONE_FILE, self.cfg.backbone)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune `cfg.backbone` on the videos of `cfg.source` into `cfg.out`; returns the run summary."""
    if not cfg.source or not cfg.out:
        raise CatnetError("a video source and an --out run folder are required")
    with dist.session(cfg.device) as info:
        entries, classes = list_videos(cfg.source, root=cfg.root)
        if not classes:
            raise CatnetError(f"{cfg.source} has no class names; fine-tuning needs labelled videos")
        plan = select_splits(entries, cfg)
        with run_folder(cfg, info):
            prev = check_run_folder(cfg, "finetune", {"classes": classes})
            result = _finetune(cfg, info, entries, classes, plan, prev)
    if info.rank == 0:
        print(f"extract features with --checkpoint {Path(cfg.out) / BACKBONE_FILE}", file=sys.stderr)
    return {**result, "backbone_checkpoint": str(Path(cfg.out) / BACKBONE_FILE),
            "best_top1": result["best_top1"] if plan.val else None}


def _finetune(cfg: FinetuneConfig, info: dist.DistInfo, entries: list[VideoEntry], classes: list[str],
              plan: SplitPlan, prev: dict[str, Any] | None) -> dict[str, Any]:
    seed_everything(cfg.seed + info.rank)
    if info.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: let cuDNN pick the fastest 3-D convs
    model = build_model(cfg, classes)
    run_info = {
        "catnet_version": __version__, "kind": "backbone", "backbone": cfg.backbone,
        "init": {"weights_id": model.weights_id, "source": getattr(model, "weights_source", None)},
        "classes": classes, "num_classes": len(classes),
        "sampling": {"train": to_dict(cfg.train_sampling()), "test": to_dict(cfg.sampling)},
        "spatial": {"train": to_dict(cfg.train_spatial()), "test": to_dict(cfg.spatial)},
        "splits": {"train": plan.train_name, "val": plan.val_name, "num_train": len(plan.train),
                   "num_val": len(plan.val)}}
    return fit(BackboneJob(cfg, entries, model, plan, info), cfg, info, plan, run_info, prev, "finetune")
