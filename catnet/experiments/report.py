"""`catnet report RUN`: the paper's analysis figures for any trained run, as Markdown + PNGs.

- Fig. 4: per-class top-1 change against a baseline run (largest gains and losses);
- Fig. 5: per-class accuracy, sorted in descending order;
- Fig. 6: for a few test videos, frames of the clips with the highest, medium and lowest local attention,
  where a clip's weight is sum_i alpha_ij over the N heads (Eq. 2) and, with several crops, over crops;
- training curves from RUN/metrics.csv;
- when the videos come with ground-truth action segments (the synthetic dataset's segments.json): how
  much attention mass falls on clips that overlap the action, against the share of such clips.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The object-oriented API draws straight to files: no pyplot state, no GUI backend to choose.
from matplotlib.figure import Figure

from catnet.engine.evaluate import predict_store
from catnet.engine.runs import load_run, read_history
from catnet.engine.splits import resolve_split, selection, selection_note, training_note, validation_words
from catnet.errors import CatnetError
from catnet.experiments.variants import variant_label
from catnet.features.loader import mapped_labels
from catnet.features.store import FeatureStore
from catnet.heads.common import clip_weights as _clip_weights
from catnet.utils.io import atomic_write_json, atomic_write_text
from catnet.video import probe, read_frames


@dataclass
class Analysis:
    """One run's predictions on one store split, plus everything the figures need."""

    name: str
    classes: list[str]
    ids: list[str]
    paths: list[str]
    labels: np.ndarray  # (n,) in the run's class order
    probs: np.ndarray  # (n, C)
    times: list[np.ndarray]  # per video (K, 2) clip start/end seconds
    clip_weights: list[np.ndarray] | None  # per video (K,) sum over heads (and crops) of alpha
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows
    # set when the checkpoint was selected on the split analysed (catnet.engine.splits.selection_note)
    note: str | None = None
    split: str | None = None  # the store split analysed ("" = a store without split names)
    checkpoint: str | None = None  # "best" | "last"
    selected_on: str | None = None  # the split the run validated on (None: no validation)
    validation: str = "none"  # the same in words (catnet.engine.splits.validation_words)

    def measured(self, info: dict[str, Any], which: str, split: str, store_root: str | os.PathLike) -> None:
        """Record where these numbers come from, from the run's run.json `info`: the split and checkpoint,
        what validated the run, and any warning (selected on, or trained on, the measured split)."""
        notes = (selection_note(info, which, split), training_note(info, store_root, split))
        self.note = "; ".join(n for n in notes if n) or None
        self.split, self.checkpoint = split, which
        self.selected_on, self.validation = selection(info)[0], validation_words(info)

    def provenance(self) -> str:
        """"measured on the 'test' split, last checkpoint; validation: held-out 'train' videos", or ""."""
        if self.split is None:
            return ""
        where = f"the {self.split!r} split" if self.split else "the store's videos"
        checkpoint = f", {self.checkpoint} checkpoint" if self.checkpoint else ""
        return f"measured on {where}{checkpoint}; validation: {self.validation}"

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    def topk(self, k: int) -> float:
        k = min(k, self.probs.shape[1])
        top = np.argsort(-self.probs, 1)[:, :k]
        return float((top == self.labels[:, None]).any(1).mean()) if len(self.labels) else float("nan")

    def per_class(self) -> np.ndarray:
        """(C,) top-1 accuracy per class; NaN for classes without test videos."""
        out = np.full(len(self.classes), np.nan)
        for c in range(len(self.classes)):
            m = self.labels == c
            if m.any():
                out[c] = float((self.preds[m] == c).mean())
        return out


def clip_weights(alpha: np.ndarray, num_clips: int, num_crops: int) -> np.ndarray:
    """Fig. 6's per-clip weight: sum_i alpha_ij over heads, then over the crops of each clip
    (heads.common.clip_weights; views are clip-major, v = k * num_crops + c)."""
    return _clip_weights(np.asarray(alpha)[:, : num_clips * num_crops], num_clips)


def analyse(head, store, indices: list[int], classes: list[str], name: str,
            history: list[dict[str, float]] | None = None) -> Analysis:
    """Run `head` on store videos `indices` (catnet.engine.evaluate.predict_store); keep what the figures
    need."""
    pred = predict_store(head, store, indices)
    labels = mapped_labels(store, classes, indices)[indices]  # all store videos -> the chosen ones
    recs = [store[i] for i in indices]
    weights = None
    if pred.alpha is not None:
        weights = [clip_weights(a, r.num_clips, r.num_crops) for a, r in zip(pred.alpha, recs, strict=True)]
    return Analysis(name=name, classes=list(classes), ids=pred.ids, paths=[r.path for r in recs],
                    labels=np.asarray(labels), probs=pred.probs, times=[np.asarray(r.times) for r in recs],
                    clip_weights=weights, history=history or [])


def analyse_run(run_dir: str | os.PathLike, store: str | os.PathLike | None = None, split: str | None = None,
                which: str = "last") -> tuple[Analysis, Any]:
    """Load a run and analyse it on `store` (default: the store it trained on), on `split` (default:
    test, else val; catnet.engine.splits.resolve_split)."""
    head, info = load_run(run_dir, which=which)
    store_path = store or info.get("store", {}).get("path")
    if not store_path or not Path(store_path).is_dir():
        raise CatnetError(f"feature store {store_path} not found; pass --store")
    fs = FeatureStore(store_path)
    split, indices = resolve_split(fs, split)
    name = variant_label(info["head"]["name"], info["head"].get("options") or {})
    a = analyse(head, fs, indices, info["classes"], name, read_history(run_dir))
    a.measured(info, which, split, fs.root)
    return a, fs


# ------------------------------------------------------------------------------------- segments


def find_segments(store) -> dict[str, dict]:
    """Ground-truth action segments (synthetic data's segments.json) for a store's videos, if any."""
    candidates = []
    src = store.manifest.get("source")
    if src:
        src = Path(src)
        candidates.append(src if src.is_dir() else src.parent)
    for rec in store.records()[:1]:
        p = Path(rec["path"])
        candidates += [p.parent.parent, p.parent]
    for c in candidates:
        f = c / "segments.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


def segment_of(segments: dict[str, dict], video_id: str) -> dict | None:
    return segments.get(video_id) or segments.get(Path(video_id).name)


def attention_on_action(a: Analysis, segments: dict[str, dict]) -> dict[str, float] | None:
    """Mean share of clip weight on clips overlapping the action, vs the mean share of such clips.

    A ratio above 1 means local attention prefers the action over the distractor motion around it."""
    if a.clip_weights is None or not segments:
        return None
    mass, share = [], []
    for vid, w, t in zip(a.ids, a.clip_weights, a.times, strict=True):
        s = segment_of(segments, vid)
        if s is None or len(w) == 0:
            continue
        inside = (t[:, 1] > s["action_start_s"]) & (t[:, 0] < s["action_end_s"])
        mass.append(float(w[inside].sum() / max(w.sum(), 1e-12)))
        share.append(float(inside.mean()))
    if not mass:
        return None
    m, s = float(np.mean(mass)), float(np.mean(share))
    return {"attention_on_action": m, "clips_on_action": s, "ratio": m / max(s, 1e-12), "videos": len(mass)}


# ------------------------------------------------------------------------------------- figures


def fig_class_delta(a: Analysis, base: Analysis, path: Path, top: int = 10) -> dict[str, float]:
    """Fig. 4: per-class top-1 change vs the baseline; the `top` largest gains and losses."""
    delta = a.per_class() - base.per_class()
    order = [i for i in np.argsort(-np.nan_to_num(delta, nan=0.0)) if not np.isnan(delta[i])]
    shown = order if len(order) <= 2 * top else order[:top] + order[-top:]
    vals = [100 * delta[i] for i in shown]
    fig = Figure(figsize=(max(6, 0.45 * len(shown) + 2), 4))
    ax = fig.subplots()
    ax.bar(range(len(shown)), vals, color=["tab:red" if v > 0 else "tab:blue" for v in vals])
    ax.set_xticks(range(len(shown)), [a.classes[i] for i in shown], rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("top-1 change (points)")
    ax.set_title(f"{a.name} vs {base.name}: per-class top-1 change")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    valid = delta[~np.isnan(delta)]
    return {"improved": int((valid > 0).sum()), "degraded": int((valid < 0).sum()),
            "unchanged": int((valid == 0).sum())}


def fig_accuracy_distribution(a: Analysis, path: Path) -> None:
    """Fig. 5: per-class accuracy sorted in descending order."""
    acc = a.per_class()
    order = [i for i in np.argsort(-np.nan_to_num(acc, nan=-1)) if not np.isnan(acc[i])]
    fig = Figure(figsize=(max(6, 0.35 * len(order) + 2), 4))
    ax = fig.subplots()
    ax.bar(range(len(order)), [100 * acc[i] for i in order], color="tab:green")
    if len(order) <= 60:
        ax.set_xticks(range(len(order)), [a.classes[i] for i in order], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{a.name}: per-class accuracy, sorted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def fig_curves(runs: list[Analysis], path: Path) -> bool:
    """Training loss and validation top-1 per epoch for every run that has metrics.csv."""
    runs = [r for r in runs if r.history]
    if not runs:
        return False
    fig = Figure(figsize=(11, 4))
    l, r = fig.subplots(1, 2)
    for run in runs:
        ep = [h["epoch"] for h in run.history]
        l.plot(ep, [h.get("train_loss", np.nan) for h in run.history], label=run.name)
        # validation runs every few epochs (and not at all without a val split): plot only those epochs,
        # with markers, so a line of isolated points is not drawn as nothing
        val = [(h["epoch"], 100 * h["val_top1"]) for h in run.history
               if np.isfinite(h.get("val_top1", np.nan))]
        if val:
            r.plot([e for e, _ in val], [v for _, v in val], marker="o", markersize=3, label=run.name)
    l.set(xlabel="epoch", ylabel="training loss", title="training loss")
    r.set(xlabel="epoch", ylabel="top-1 (%)",
          title="validation top-1" if r.lines else "validation top-1 (no validation)")
    if r.lines:
        r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def pick_videos(a: Analysis, n: int) -> list[int]:
    """Up to `n` correctly classified test videos from different classes (then any others)."""
    correct = [i for i in range(len(a.ids)) if a.preds[i] == a.labels[i]]
    picked, seen = [], set()
    for i in correct + [i for i in range(len(a.ids)) if i not in correct]:
        if a.labels[i] not in seen or len(seen) >= len(set(a.labels.tolist())):
            picked.append(i)
            seen.add(a.labels[i])
        if len(picked) == n:
            break
    return picked


def fig_attention(a: Analysis, videos: list[int], path: Path, segments: dict[str, dict],
                  root: Path | None = None) -> int:
    """Fig. 6: per video, the middle frame of the 3 highest-, 4 medium- and 3 lowest-weight clips, plus a
    timeline of clip weights (the ground-truth action shaded when known). Returns rows drawn."""
    if a.clip_weights is None or not videos:
        return 0
    shown = min(10, max(len(a.clip_weights[i]) for i in videos))
    cols = shown + 1  # frames + a timeline
    fig = Figure(figsize=(1.5 * cols + 2, 1.7 * len(videos)))
    axes = fig.subplots(len(videos), cols, squeeze=False,
                             gridspec_kw={"width_ratios": [1] * shown + [3]})
    drawn = 0
    for row, i in zip(axes, videos, strict=True):
        w, t = a.clip_weights[i], a.times[i]
        order = list(np.argsort(-w))
        k = len(order)
        if k > 10:  # the paper's 3 highest, 4 medium, 3 lowest
            order = order[:3] + order[k // 2 - 2: k // 2 + 2] + order[-3:]
        picks = [(j, "high" if r < 3 else "low" if r >= len(order) - 3 and len(order) > 6 else "mid")
                 for r, j in enumerate(order)]
        seg = segment_of(segments, a.ids[i])
        vpath = a.paths[i]
        if root is not None and not Path(vpath).is_absolute():
            vpath = str(root / vpath)
        try:
            fps = probe(vpath).fps
            idx = [int(round(t[j].mean() * fps)) for j, _ in picks]
            frames = read_frames(vpath, idx)
        except Exception:  # a moved or unreadable video: still draw the timeline
            frames = None
        for c in range(shown):
            ax = row[c]
            ax.axis("off")
            if c >= len(picks):
                continue
            j, kind = picks[c]
            if frames is not None:
                ax.imshow(frames[c])
            on = seg is not None and t[j, 1] > seg["action_start_s"] and t[j, 0] < seg["action_end_s"]
            ax.set_title(f"{kind} {w[j]:.2f}" + (" *" if on else ""), fontsize=7,
                         color="tab:red" if on else "black")
        tl = row[shown]
        centres = t.mean(1)
        tl.bar(centres, w, width=max(0.8 * float(np.diff(centres).min()) if k > 1 else 0.1, 1e-3),
               color="tab:orange")
        if seg is not None:
            tl.axvspan(seg["action_start_s"], seg["action_end_s"], color="tab:red", alpha=0.2)
        tl.set_title(f"{a.ids[i]}: true {a.classes[a.labels[i]]}, pred {a.classes[a.preds[i]]}", fontsize=7)
        tl.tick_params(labelsize=6)
        tl.set_xlabel("time (s)", fontsize=6)
        drawn += 1
    known = any(segment_of(segments, a.ids[i]) is not None for i in videos)
    fig.suptitle("local attention per clip: highest | medium | lowest"
                 + ("  (* = clip overlaps the action; shaded = action segment)" if known else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return drawn


# ------------------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return "-" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def write_report(out: str | os.PathLike, run: Analysis, baseline: Analysis | None = None,
                 segments: dict[str, dict] | None = None, num_videos: int = 4, extra_md: str = "",
                 video_root: Path | None = None, title: str = "catnet report") -> Path:
    """Write OUT/report.md, OUT/report.json and the PNGs it embeds; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segments = segments or {}
    summary: dict[str, Any] = {"run": run.name, "n": len(run.ids), "top1": run.topk(1), "top5": run.topk(5),
                               "mean_class_acc": float(np.nanmean(run.per_class()))}
    notes = [f"{a.name}: {a.note}" for a in (baseline, run) if a is not None and a.note]
    summary["selected_on_measured_split"] = bool(notes)
    analysed = [a for a in (baseline, run) if a is not None]
    summary.update(split=run.split, checkpoint=run.checkpoint, selected_on=run.selected_on)
    where = list(dict.fromkeys(f"{a.name}: {a.provenance()}" for a in analysed if a.provenance()))
    md = [f"# {title}", "", extra_md, "" if extra_md else "", "## Accuracy", "",
          *[f"{w}." for w in where], "" if where else "",
          *[f"**Note** ({n})" for n in notes], "" if notes else "",
          "| model | videos | top-1 (%) | top-5 (%) | mean class acc (%) |", "|---|---|---|---|---|"]
    for a in [x for x in (baseline, run) if x is not None]:
        md.append(f"| {a.name} | {len(a.ids)} | {_pct(a.topk(1))} | {_pct(a.topk(5))} | "
                  f"{_pct(float(np.nanmean(a.per_class())))} |")
    md.append("")
    if baseline is not None:
        if baseline.classes != run.classes:
            raise CatnetError("the baseline run has different classes from the run")
        summary["baseline"] = {"run": baseline.name, "top1": baseline.topk(1), "top5": baseline.topk(5)}
        counts = fig_class_delta(run, baseline, out / "fig4_class_delta.png")
        summary["class_delta"] = counts
        md += ["## Per-class change vs the baseline (Fig. 4)", "",
               f"{counts['improved']} classes improved, {counts['degraded']} degraded, "
               f"{counts['unchanged']} unchanged.", "", "![Fig. 4](fig4_class_delta.png)", ""]
    fig_accuracy_distribution(run, out / "fig5_accuracy_distribution.png")
    acc = run.per_class()
    valid = acc[~np.isnan(acc)]
    summary["classes_over_80"] = float((valid > 0.8).mean()) if len(valid) else None
    summary["classes_over_50"] = float((valid > 0.5).mean()) if len(valid) else None
    md += ["## Per-class accuracy, sorted (Fig. 5)", "",
           f"{_pct(summary['classes_over_80'])}% of classes above 80% top-1, "
           f"{_pct(summary['classes_over_50'])}% above 50%.", "",
           "![Fig. 5](fig5_accuracy_distribution.png)", ""]
    hit = attention_on_action(run, segments)
    if hit is not None:
        summary["attention"] = hit
        md += ["## Does local attention find the action?", "",
               f"On {hit['videos']} {'test' if run.split is None else repr(run.split)} videos, "
               f"{_pct(hit['attention_on_action'])}% of the attention mass "
               f"(sum over heads of alpha, Eq. 2) falls on clips that overlap the ground-truth action, which "
               f"make up {_pct(hit['clips_on_action'])}% of the clips (ratio {hit['ratio']:.2f}; 1 = no "
               "preference).", ""]
    rows = fig_attention(run, pick_videos(run, num_videos), out / "fig6_attention.png", segments, video_root)
    if rows:
        md += ["## Clips with the highest, medium and lowest attention (Fig. 6)", "",
               "Per row: middle frames of the 3 highest-, 4 medium- and 3 lowest-weighted clips (weight = "
               "sum over heads of alpha_ij), then the weight of every clip over time.", "",
               "![Fig. 6](fig6_attention.png)", ""]
    elif run.clip_weights is None:
        md += ["(No Fig. 6: this head has no local attention.)", ""]
    if fig_curves([x for x in (baseline, run) if x is not None], out / "training_curves.png"):
        md += ["## Training curves", "", "![curves](training_curves.png)", ""]
    atomic_write_json(out / "report.json", summary)
    return atomic_write_text(out / "report.md", "\n".join(md) + "\n")
