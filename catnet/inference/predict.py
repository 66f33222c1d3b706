"""`catnet predict`: a new video -> top-k labels, which moments made the decision and (`explain`) where.

With a trained run, clip features from the run's backbone go through its head; the head's local
attention α (Eq. 2) says how much each clip contributed. We report, per clip I_j, Σ_i α_ij (summed
over the N heads and over the crops of that clip, as in the paper's Fig. 6 analysis) and
normalised to sum to 1 over the clips.

Without a run, the pretrained Inception-I3D classifies every view and the softmax scores are averaged
over the views (the paper's I3D baseline): real Kinetics-400 predictions, no attention.

What a prediction costs is a named profile (PROFILES: views = clips x crops, frames, crop, precision,
compile); explicit clips / crops / frames override it. `explain` adds Grad-CAM maps (explain.py).
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
from catnet.inference.explain import (
    NUM_EXPLAINED,
    OVERLAY_HEIGHT,
    Saliency,
    grad_cam,
    key_frame_map,
    png_data_url,
    supports_grad_cam,
    to_frame,
)
from catnet.inference.runtime import BackboneRunner
from catnet.video import ClipSampling, SpatialConfig, load_clips, read_frames

SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Profile:
    """What one prediction costs. None = the model's own setting: for the pretrained I3D the paper's 10
    clips x 64 frames x 224 px; for a trained run the clips, frames and crop its features were made with."""

    clips: int | None  # clips per video (K)
    crops: int  # spatial crops per clip: 1 (centre) or 3
    max_frames: int | None  # frames per clip, at most this many (never more than the model's)
    crop: int | None  # crop side in pixels (the short side is scaled with it)
    precision: str  # "fp32" or "bf16" (CPU autocast; fp32 where the CPU has no native bf16)
    compile: bool = False  # torch.compile the backbone (inductor cache in $CATNET_HOME/inductor)
    # With `clips` None: the most of the model's views that fit in this many frame-pixels per video
    # (views x frames x crop^2): first clips with `crops` crop(s), then 3 crops once every clip fits.
    budget: int | None = None

    def describe(self) -> str:
        def own(v, unit):
            return f"{v}{unit}" if v is not None else f"model's{unit}"

        frames = own(self.max_frames, " frames")
        clips = own(self.clips, " clips") if self.budget is None else "views within the budget"
        return (f"{clips} x {self.crops} crop(s) x {frames} (at most), "
                f"{own(self.crop, ' px')}, {self.precision}, compile {'on' if self.compile else 'off'}")


def fit_budget(budget: int, num_clips: int, clip_len: int, crop: int, crops: int) -> tuple[int, int]:
    """(clips, crops) of the model's `num_clips` clips that fit in `budget` frame-pixels: as many clips
    as fit with `crops` crop(s) (at least 1), and 3 crops when all clips fit three times."""
    per_view = clip_len * crop * crop
    views = max(1, budget // per_view)
    if crops == 1 and 3 * num_clips <= views:
        return num_clips, 3
    return max(1, min(num_clips, views // crops)), crops


# The profiles `--profile` names. `fast` was picked from the accuracy/time table of
# benchmarks/predict.py (docs/benchmarks.md, "Prediction profiles"): the cheapest setting measured whose
# top-1 stays within a point of `accurate` (the paper's 10 x 3 views) on ucf6 val and the shared clips.
# Its budget is 4 views of 32 frames at 224 px: for the pretrained I3D 4 clips x 1 crop; for a run on
# smaller features (e.g. 16 frames at 112 px) all of its clips x 3 crops, which an attention head needs.
FAST_BUDGET = 4 * 32 * 224 * 224
PROFILES: dict[str, Profile] = {
    "accurate": Profile(clips=None, crops=3, max_frames=None, crop=None, precision="fp32"),
    "fast": Profile(clips=None, crops=1, max_frames=32, crop=None, precision="bf16", budget=FAST_BUDGET),
}
DEFAULT_PROFILE = "fast"


@dataclass
class ClipScore:
    start: float  # seconds
    end: float
    attention: float | None  # share of the decision, sums to 1 over clips; None without attention

    def to_json(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3),
                "attention": None if self.attention is None else round(self.attention, 6)}


@dataclass
class Prediction:
    video: str
    predictions: list[tuple[str, float]]  # (label, probability), best first
    clips: list[ClipScore]
    seconds: float = 0.0  # wall time for this video (decode + inference)
    frame_indices: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (K, L) sampled frames
    # the top-1 class's probability per clip (the baseline classifier only): ranks clips without attention
    clip_class_scores: np.ndarray | None = dataclasses.field(default=None, repr=False)
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # decode, backbone, head, explain
    explain: list[Saliency] | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        out = {
            "video": self.video,
            "predictions": [{"label": lab, "score": round(s, 6)} for lab, s in self.predictions],
            "clips": [c.to_json() for c in self.clips],
        }
        if self.explain is not None:
            out["explain"] = [self.explain_json(s) for s in self.explain]
        return out

    def explain_json(self, s: Saliency, image: bool = True) -> dict:
        clip = self.clips[s.clip]
        out = {"clip": s.clip, "start": round(clip.start, 3), "end": round(clip.end, 3),
               "frame_index": s.frame_index, "label": s.label, "map": s.grid()}
        if image:
            out["image"] = png_data_url(s.overlay(min(OVERLAY_HEIGHT, s.frame.shape[0])))
        return out


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


def ranked_clips(pred: Prediction, count: int) -> list[int]:
    """The clips that mattered most: by attention, else by the top class's score per clip (baseline
    classifier), else evenly spaced (heads without attention)."""
    num = len(pred.clips)
    if num == 0:
        return []
    if pred.clips[0].attention is not None:
        return np.argsort([-c.attention for c in pred.clips], kind="stable")[:count].tolist()
    if pred.clip_class_scores is not None:
        return np.argsort(-np.asarray(pred.clip_class_scores), kind="stable")[:count].tolist()
    return np.unique(np.linspace(0, num - 1, min(count, num)).round().astype(int)).tolist()


@dataclass
class Scores:
    """One set of views classified: the video-level probabilities and what explains them."""

    probs: torch.Tensor  # (C,)
    attention: np.ndarray | None  # (K,) clip shares, heads with local attention only
    clip_probs: torch.Tensor | None  # (K, C) per-clip probabilities, the baseline classifier only
    features: torch.Tensor  # (V, D)


class Predictor:
    """A backbone (+ an optional trained head) with the sampling it expects; call it on a video path.

    `head=None` means the backbone's own classifier, scores averaged over all views. The backbone is
    optimised in place for inference (BN folding, channels-last: runtime.BackboneRunner), so pass one
    that is not trained further.
    """

    def __init__(self, backbone: nn.Module, labels: list[str], sampling, spatial,
                 head: nn.Module | None = None, batch_size: int = 4, precision: str = "fp32",
                 compile: bool = False, optimize: bool = True, profile: str | None = None):
        if head is None and not getattr(backbone, "num_classes", 0):
            raise CatnetError("backbone has no classifier and no trained head was given")
        _check_finite(head, "the trained head")
        _check_finite(backbone, "the backbone")
        self.runner = BackboneRunner(backbone, batch_size, precision, compile, optimize)
        self.head = head.eval() if head is not None else None
        self.labels = list(labels)
        self.sampling = sampling
        self.spatial = spatial
        self.profile = profile

    @property
    def backbone(self) -> nn.Module:
        return self.runner.backbone

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.runner.batch_size = max(1, int(value))

    @classmethod
    def pretrained(cls, profile: str | None = DEFAULT_PROFILE, **overrides) -> Predictor:
        """The Kinetics-400 Inception-I3D baseline (needs `catnet weights fetch` once), laid out as its
        weights were trained (backbone.pretrained_cfg: 64 consecutive frames, 224 crops), 10 clips x 3
        crops before the profile applies."""
        backbone = build_backbone("i3d_inception", pretrained=True)
        cfg = backbone.pretrained_cfg
        sampling = ClipSampling(num_clips=10, clip_len=cfg.clip_len, stride=cfg.stride)
        spatial = SpatialConfig(short_side=cfg.short_side, crop=cfg.crop, num_crops=3)
        return cls(backbone, backbone.labels, **resolve(profile, sampling, spatial, **overrides))

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "best", profile: str | None = DEFAULT_PROFILE,
                 **overrides) -> Predictor:
        """A trained run: its head and classes, and the backbone + sampling its feature store used."""
        head, info = load_run(run_dir, which=which)
        backbone, sampling, spatial = backbone_from_manifest(store_manifest(info))
        if backbone.num_features != head.config.in_dim:
            raise CatnetError(f"run {run_dir}: head expects {head.config.in_dim}-d features but backbone "
                              f"{store_manifest(info)['backbone']} gives {backbone.num_features}-d")
        return cls(backbone, info["classes"], head=head, **resolve(profile, sampling, spatial, **overrides))

    def describe(self) -> str:
        """The settings in use, for --verbose and the web page."""
        s, sp, r = self.sampling, self.spatial, self.runner
        name = f"profile {self.profile}: " if self.profile else ""
        compiled = "on" if r.compiled is not None else "off"
        text = (f"{name}{s.num_clips} clips x {sp.num_crops} crop(s) x {s.clip_len} frames (stride "
                f"{s.stride}), {sp.crop} px, {r.precision}, compile {compiled}")
        return text + (f" ({r.note})" if r.note else "")

    @torch.inference_mode()
    def classify(self, views: torch.Tensor, num_clips: int) -> tuple[Scores, dict[str, float]]:
        """Views (K * crops, 3, L, S, S), clip-major -> Scores, and the seconds spent per stage."""
        t0 = time.perf_counter()
        feats = self.runner.features(views)  # X of Eq. 1
        t1 = time.perf_counter()
        attention = clip_probs = None
        if self.head is None:
            view_probs = self.backbone.forward_head(feats).float().softmax(-1)
            probs = view_probs.mean(0)  # score averaging over the views, as the I3D baseline
            clip_probs = view_probs.view(num_clips, -1, view_probs.shape[-1]).mean(1)
        else:
            out = self.head.forward_attention(feats[None])
            probs = out["logits"][0].float().softmax(-1)
            if out.get("alpha") is not None:
                attention = clip_attention(out["alpha"][0], num_clips)
        if not bool(torch.isfinite(probs).all()):
            raise CatnetError("the model gave non-finite scores (NaN/Inf): its weights or this input are "
                              "broken; nothing was predicted")
        return Scores(probs, attention, clip_probs, feats), {"backbone": t1 - t0,
                                                              "head": time.perf_counter() - t1}

    def __call__(self, path: str | Path, top_k: int = 5, explain: bool = False,
                 explain_label: str | None = None) -> Prediction:
        t0 = time.perf_counter()
        if not Path(path).is_file():  # callers name the video; the reason alone keeps lines short
            raise VideoError("no such file" if not Path(path).exists() else "not a file")
        clips = load_clips(path, self.sampling, self.spatial)
        timing = {"decode": time.perf_counter() - t0}
        num_clips = len(clips.clip_times)
        scores, stages = self.classify(clips.views, num_clips)
        timing.update(stages)
        k = min(top_k, scores.probs.numel())
        top_scores, idx = scores.probs.topk(k)
        att = scores.attention
        pred = Prediction(
            video=str(path),
            predictions=[(self.labels[i], float(s)) for s, i in zip(top_scores.tolist(), idx.tolist(),
                                                                      strict=True)],
            clips=[ClipScore(float(a), float(b), None if att is None else float(att[j]))
                   for j, (a, b) in enumerate(np.asarray(clips.clip_times, dtype=np.float64))],
            frame_indices=clips.indices,
            clip_class_scores=None if scores.clip_probs is None else scores.clip_probs[:, idx[0]].numpy(),
            timing=timing,
        )
        if explain:
            t1 = time.perf_counter()
            label = explain_label if explain_label is not None else pred.predictions[0][0]
            pred.explain = self.saliency(path, pred, clips.views, scores.features, label)
            timing["explain"] = time.perf_counter() - t1
        pred.seconds = time.perf_counter() - t0
        return pred

    def saliency(self, path: str | Path, pred: Prediction, views: torch.Tensor, features: torch.Tensor,
                 label: str, count: int = NUM_EXPLAINED) -> list[Saliency]:
        """Grad-CAM over the key frames of the `count` clips that mattered most (ranked_clips), for
        `label`, each on its centre crop; [] for a backbone without forward_map."""
        if label not in self.labels:
            raise CatnetError(f"cannot explain {label!r}: not one of the model's classes")
        if not supports_grad_cam(self.backbone) or pred.frame_indices is None:
            return []
        chosen = ranked_clips(pred, count)
        crops, length = self.spatial.num_crops, pred.frame_indices.shape[1]
        frames = read_frames(path, pred.frame_indices[chosen, length // 2].tolist())
        out = []
        for k, frame in zip(chosen, frames, strict=True):
            v = k * crops + crops // 2  # the centre crop (views are clip-major)
            cam = grad_cam(self.backbone, views[v], self.labels.index(label), self.head, features, v)
            heat, box = to_frame(key_frame_map(cam, length, self.spatial.crop), frame.shape[:2],
                                 self.spatial.short_side, crops, crops // 2)
            out.append(Saliency(int(k), int(v), label, int(pred.frame_indices[k, length // 2]), heat,
                                np.ascontiguousarray(frame), box))
        return out


def _check_finite(module: nn.Module | None, what: str) -> None:
    """Refuse weights with NaN/Inf up front: they would turn every score into NaN."""
    if module is None:
        return
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CatnetError(f"{what} has non-finite weights (NaN/Inf in {name}); retrain or re-export it")


def resolve(profile: str | None, sampling: ClipSampling, spatial: SpatialConfig,
            num_clips: int | None = None, num_crops: int | None = None,
            clip_len: int | None = None, compile: bool | None = None) -> dict:
    """Predictor keyword arguments for `profile` (None: the model's own settings, fp32) over the model's
    sampling/spatial config; explicit clips / crops / frames / compile override the profile."""
    for name, value in (("clips", num_clips), ("crops", num_crops), ("frames", clip_len)):
        if value is not None and value < 1:
            raise CatnetError(f"--{name} must be >= 1, got {value}")
    if num_crops is not None and num_crops not in (1, 3):
        raise CatnetError(f"--crops must be 1 (centre) or 3, got {num_crops}")
    if profile is not None and profile not in PROFILES:
        raise CatnetError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    p = PROFILES[profile] if profile is not None else Profile(None, spatial.num_crops, None, None, "fp32")
    frames = clip_len or (min(p.max_frames, sampling.clip_len) if p.max_frames else sampling.clip_len)
    if p.crop is not None and p.crop != spatial.crop:  # keep the short side : crop ratio of the model
        short = max(p.crop, round(spatial.short_side * p.crop / spatial.crop))
        spatial = dataclasses.replace(spatial, crop=p.crop, short_side=short)
    clips, crops = p.clips or sampling.num_clips, p.crops
    if p.budget is not None and p.clips is None:
        clips, crops = fit_budget(p.budget, sampling.num_clips, frames, spatial.crop,
                                  num_crops or p.crops)
    sampling = dataclasses.replace(sampling, num_clips=num_clips or clips, clip_len=frames)
    spatial = dataclasses.replace(spatial, num_crops=num_crops or crops)
    return dict(sampling=sampling, spatial=spatial, precision=p.precision, profile=profile,
                compile=p.compile if compile is None else bool(compile))


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
    for s in pred.explain or []:
        clip = pred.clips[s.clip]
        lines.append(f"  where     clip {s.clip + 1} ({clip.start:.1f}-{clip.end:.1f} s), frame "
                     f"{s.frame_index}: {describe_region(s)}")
    return "\n".join(lines)


def describe_region(s: Saliency) -> str:
    """Where the map peaks, in words a terminal can show (top-left ... bottom-right, as % of the frame)."""
    h, w = s.heat.shape
    y, x = np.unravel_index(int(np.argmax(s.heat)), s.heat.shape)
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    where = f"{rows[min(2, 3 * y // h)]} {cols[min(2, 3 * x // w)]}"
    return f"peak at {where} ({x / w:.0%}, {y / h:.0%}) for {s.label!r}"
