"""`catnet report` on a tiny fabricated run: real synthetic videos, fabricated features, real heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catnet.cli import main
from catnet.data.synth import SynthConfig, generate, load_segments
from catnet.experiments.report import Analysis, attention_on_action, clip_weights
from catnet.features.store import FeatureStore, StoreWriter, make_manifest

TINY = SynthConfig(num_classes=3, videos_per_class=4, height=48, width=48, min_frames=16, max_frames=24)
K, D = 4, 8


def _fabricate_store(root: Path, out: Path) -> FeatureStore:
    """Features that carry the class only in clips overlapping the action segment."""
    segs = load_segments(root)
    classes = json.loads((root / "synth.json").read_text())["classes"]
    rng = np.random.default_rng(0)
    manifest = make_manifest(backbone="synthetic", weights_id="none", num_features=D, sampling={},
                             spatial={"num_crops": 1}, classes=classes, source=str(root))
    with StoreWriter(out, manifest, flush_seconds=None) as w:
        for vid, s in sorted(segs.items()):
            dur = s["num_frames"] / s["fps"]
            starts = np.linspace(0, dur * 0.75, K)
            times = np.stack([starts, starts + dur / 4], 1)
            inside = (times[:, 1] > s["action_start_s"]) & (times[:, 0] < s["action_end_s"])
            x = rng.normal(0, 0.3, (K, D))
            x[inside, classes.index(s["label"])] += 3.0
            w.add(vid, x, times, label=classes.index(s["label"]), split=s["split"],
                  path=str(root / s["path"]))
    return FeatureStore(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from catnet.engine.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "synth"
    generate(root, TINY, progress=False)
    store = _fabricate_store(root, tmp / "store")
    out = {}
    for head, opts in (("avgpool", {}), ("catnet", {"num_heads": 2})):
        cfg = TrainConfig(store=str(store.root), out=str(tmp / head), head=head, head_options=opts, epochs=3,
                          batch_size=4, lr=0.1, lr_step=10, train_views=K, device="cpu", progress=False)
        train(cfg)
        out[head] = tmp / head
    return tmp, out


def test_report_cli_writes_all_figures(runs, capsys):
    tmp, r = runs
    out = tmp / "rep"
    assert main(["report", str(r["catnet"]), "--baseline", str(r["avgpool"]), "--out", str(out),
                 "--videos", "2"]) == 0
    md = (out / "report.md").read_text()
    for png in ("fig4_class_delta.png", "fig5_accuracy_distribution.png", "fig6_attention.png",
                "training_curves.png"):
        assert (out / png).stat().st_size > 1000 and png in md
    summary = json.loads((out / "report.json").read_text())
    assert summary["n"] == 3 and 0 <= summary["top1"] <= summary["top5"] <= 1
    assert (summary["split"], summary["checkpoint"]) == ("test", "last")  # what measured, which weights
    assert "measured on the 'test' split, last checkpoint; validation: " in md
    delta = summary["class_delta"]
    assert delta["improved"] + delta["degraded"] + delta["unchanged"] == 3
    att = summary["attention"]  # found the segments through the store manifest's source
    assert att["videos"] == 3 and 0 <= att["attention_on_action"] <= 1 and 0 < att["clips_on_action"] <= 1


def test_report_defaults_to_run_folder_and_no_attention_head(runs):
    _, r = runs
    assert main(["report", str(r["avgpool"])]) == 0
    md = (r["avgpool"] / "report" / "report.md").read_text()
    assert "no local attention" in md and not (r["avgpool"] / "report" / "fig6_attention.png").exists()


def test_clip_weights_sum_heads_and_crops():
    # N = 2 heads over 3 clips x 2 crops
    alpha = np.array([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]])
    w = clip_weights(alpha, num_clips=3, num_crops=2)
    np.testing.assert_allclose(w, [0.3, 1.7, 0.0])
    assert w.sum() == pytest.approx(2.0)  # each head's alpha sums to 1 over views (Eq. 2)


def test_attention_on_action_prefers_the_segment():
    times = np.array([[0, 1], [1, 2], [2, 3], [3, 4]], float)
    a = Analysis("x", ["a"], ["v"], ["v.mp4"], np.array([0]), np.ones((1, 1)), [times],
                 [np.array([0.1, 0.1, 1.7, 0.1])])
    hit = attention_on_action(a, {"v": {"action_start_s": 2.2, "action_end_s": 2.8}})
    assert hit["clips_on_action"] == 0.25 and hit["attention_on_action"] == pytest.approx(0.85)
    assert hit["ratio"] == pytest.approx(3.4)


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a catnet run" in capsys.readouterr().err
