"""`catnet predict`: a new video -> top-k labels and which moments made the decision.

With a trained run, clip features from the run's backbone go through its head; the head's local
attention α (Eq. 2) says how much each clip contributed. We report, per clip I_j, Σ_i α_ij (summed
over the N heads, as in the paper's Fig. 6 analysis), averaged over the crops of that clip and
normalised to sum to 1 over the clips.

Without a run, the pretrained Inception-I3D classifies every view and the softmax scores are averaged
over the 10 clips x 3 crops (the paper's I3D baseline): real Kinetics-400 predictions, no attention.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catnet.backbones import build_backbone
from catnet.config import from_dict
from catnet.engine.runs import load_run
from catnet.errors import CatnetError, VideoError
from catnet.heads.common import clip_weights
from catnet.video import ClipSampling, SpatialConfig, load_clips, sample_clips

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class ClipScore:
    start: float  # seconds
    end: float
    attention: float | None  # share of the decision, sums to 1 over clips; None without attention


@dataclass
class Prediction:
    video: str
    predictions: list[tuple[str, float]]  # (label, probability), best first
    clips: list[ClipScore]
    seconds: float = 0.0  # wall time for this video (decode + inference)
    frame_indices: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (K, L) sampled frames

    def to_json(self) -> dict:
        return {
            "video": self.video,
            "predictions": [{"label": lab, "score": round(s, 6)} for lab, s in self.predictions],
            "clips": [{"start": round(c.start, 3), "end": round(c.end, 3),
                       "attention": None if c.attention is None else round(c.attention, 6)}
                      for c in self.clips],
        }


def clip_attention(alpha: torch.Tensor, num_clips: int) -> np.ndarray:
    """α (N heads, V views) -> (K,) each clip's share of Fig. 6's weight (heads.common.clip_weights)."""
    w = clip_weights(alpha, num_clips)
    return w / max(w.sum(), 1e-12)


def sparkline(values: np.ndarray) -> str:
    """Attention as a row of block characters, scaled to the largest value."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or values.max() <= 0:
        return SPARK[0] * values.size
    levels = np.ceil(values / values.max() * len(SPARK)).astype(int) - 1
    return "".join(SPARK[i] for i in np.clip(levels, 0, len(SPARK) - 1))


class Predictor:
    """A backbone (+ an optional trained head) with the sampling it expects; call it on a video path.

    `head=None` means the backbone's own classifier, scores averaged over all views.
    """

    def __init__(self, backbone: nn.Module, labels: list[str], sampling, spatial,
                 head: nn.Module | None = None, batch_size: int = 4):
        if head is None and not getattr(backbone, "num_classes", 0):
            raise CatnetError("backbone has no classifier and no trained head was given")
        self.backbone = backbone.eval()
        self.head = head.eval() if head is not None else None
        self.labels = list(labels)
        self.sampling = sampling
        self.spatial = spatial
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def pretrained(cls, **overrides) -> Predictor:
        """The Kinetics-400 Inception-I3D baseline (needs `catnet weights fetch` once): 10 clips x 3 crops
        laid out as its weights were trained (backbone.pretrained_cfg: 64 consecutive frames, 224 crops)."""
        backbone = build_backbone("i3d_inception", pretrained=True)
        cfg = backbone.pretrained_cfg
        sampling = ClipSampling(num_clips=10, clip_len=cfg.clip_len, stride=cfg.stride)
        spatial = SpatialConfig(short_side=cfg.short_side, crop=cfg.crop, num_crops=3)
        return cls(backbone, backbone.labels, *_override(sampling, spatial, **overrides))

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "best", **overrides) -> Predictor:
        """A trained run: its head and classes, and the backbone + sampling its feature store used."""
        head, info = load_run(run_dir, which=which)
        backbone, sampling, spatial = backbone_from_manifest(store_manifest(info))
        if backbone.num_features != head.config.in_dim:
            raise CatnetError(f"run {run_dir}: head expects {head.config.in_dim}-d features but backbone "
                              f"{store_manifest(info)['backbone']} gives {backbone.num_features}-d")
        return cls(backbone, info["classes"], *_override(sampling, spatial, **overrides), head=head)

    @torch.inference_mode()
    def __call__(self, path: str | Path, top_k: int = 5) -> Prediction:
        t0 = time.perf_counter()
        if not Path(path).is_file():  # callers name the video; the reason alone keeps lines short
            raise VideoError("no such file" if not Path(path).exists() else "not a file")
        clips = load_clips(path, self.sampling, self.spatial)
        num_clips = len(clips.clip_times)
        views = torch.as_tensor(clips.views).float()
        chunks = views.split(self.batch_size)  # bounds peak memory: 30 views of 64x224² are >1 GB
        attention = None
        if self.head is None:
            logits = torch.cat([self.backbone(c) for c in chunks])
            probs = logits.softmax(-1).mean(0)  # score averaging over the views, as the I3D baseline
        else:
            feats = torch.cat([self.backbone.forward_features(c) for c in chunks])  # X of Eq. 1
            out = self.head.forward_attention(feats[None])
            probs = out["logits"][0].softmax(-1)
            if out.get("alpha") is not None:
                attention = clip_attention(out["alpha"][0], num_clips)
        k = min(top_k, probs.numel())
        scores, idx = probs.topk(k)
        times = np.asarray(clips.clip_times, dtype=np.float64)
        top = zip(scores.tolist(), idx.tolist(), strict=True)
        return Prediction(
            video=str(path),
            predictions=[(self.labels[i], float(s)) for s, i in top],
            clips=[ClipScore(float(a), float(b), None if attention is None else float(attention[j]))
                   for j, (a, b) in enumerate(times)],
            seconds=time.perf_counter() - t0,
            frame_indices=sample_clips(clips.info.num_frames, self.sampling),
        )


def _override(sampling, spatial, num_clips: int | None = None, num_crops: int | None = None,
              clip_len: int | None = None):
    """Cheaper settings for CPU users; None keeps the run's (or baseline's) value."""
    for name, value in (("clips", num_clips), ("crops", num_crops), ("frames", clip_len)):
        if value is not None and value < 1:
            raise CatnetError(f"--{name} must be >= 1, got {value}")
    if num_clips is not None:
        sampling = dataclasses.replace(sampling, num_clips=num_clips)
    if clip_len is not None:
        sampling = dataclasses.replace(sampling, clip_len=clip_len)
    if num_crops is not None:
        if num_crops not in (1, 3):
            raise CatnetError(f"--crops must be 1 (centre) or 3, got {num_crops}")
        spatial = dataclasses.replace(spatial, num_crops=num_crops)
    return sampling, spatial


def store_manifest(info: dict) -> dict:
    """The feature-store manifest recorded in a run.json (`catnet train`): what made the features."""
    manifest = (info.get("store") or {}).get("manifest")
    if not isinstance(manifest, dict) or "backbone" not in manifest:
        raise CatnetError("run has no store manifest: cannot tell which backbone made its features")
    return manifest


def backbone_from_manifest(manifest: dict):
    """Rebuild the backbone and test-time sampling recorded in a feature-store manifest (`catnet extract`)."""
    name, checkpoint = manifest["backbone"], manifest.get("checkpoint")
    # Same defaults as `catnet extract`: Kinetics weights for i3d_inception unless a checkpoint is given.
    pretrained = manifest.get("pretrained")
    if pretrained is None:
        pretrained = name == "i3d_inception" and checkpoint is None
    with torch.random.fork_rng():
        # Random-weight backbones (tests) are reproducible from extract's seed; no effect otherwise.
        torch.manual_seed(int(manifest.get("seed", 0)))
        backbone = build_backbone(name, pretrained=bool(pretrained), checkpoint=checkpoint)
    want, got = manifest.get("weights_id"), getattr(backbone, "weights_id", None)
    # Features from other weights would silently give wrong predictions, so refuse.
    if want and got and str(want) != str(got):
        raise CatnetError(f"backbone {name} weights {got} differ from the weights {want} the run's "
                          f"features came from (checkpoint {checkpoint!r})")
    sampling = from_dict(ClipSampling, manifest.get("sampling") or {})
    spatial = from_dict(SpatialConfig, manifest.get("spatial") or {})
    return backbone.eval(), sampling, spatial


def format_human(pred: Prediction) -> str:
    lines = [f"{pred.video}"]
    width = max((len(lab) for lab, _ in pred.predictions), default=0)
    for rank, (label, score) in enumerate(pred.predictions, 1):
        lines.append(f"  {rank}. {label:<{width}}  {score:6.1%}")
    if pred.clips:
        span = f"{pred.clips[0].start:.1f}-{pred.clips[-1].end:.1f} s, {len(pred.clips)} clips"
        if pred.clips[0].attention is None:
            lines.append(f"  timeline  (no attention: baseline classifier)  {span}")
        else:
            att = np.array([c.attention for c in pred.clips])
            top = int(att.argmax())
            lines.append(f"  timeline  {sparkline(att)}  {span}; peak {pred.clips[top].start:.1f}-"
                         f"{pred.clips[top].end:.1f} s ({att[top]:.0%})")
    return "\n".join(lines)
