"""A standardised run carries its training split's feature mean/std inside the head (buffers), so
`catnet eval`, `catnet predict` and the exported ONNX / .pt2 graphs give the same logits on the same
clip features, with nothing to apply by hand."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_predict import shared_tiny_run
from torch import nn

from catnet.engine.evaluate import predict_store
from catnet.engine.runs import load_run
from catnet.features import FeatureStore
from catnet.inference.export import export_head
from catnet.inference.predict import Predictor
from catnet.video import ClipSampling, SpatialConfig


class StoredFeatures(nn.Module):
    """Stand-in backbone that returns one video's stored clip features whatever the frames."""

    num_classes, labels = 0, None

    def __init__(self, features: np.ndarray):
        super().__init__()
        self.features = torch.as_tensor(features)
        self.num_features = self.features.shape[1]

    def forward_features(self, x):
        return self.features.to(x.dtype)


@pytest.fixture(scope="module")
def standardised():
    run = shared_tiny_run()  # `catnet train` with no recipe flags: standardised by default
    head, info = load_run(run, which="best")
    store = FeatureStore(run.parent / "store")
    assert head.config.standardize and info["standardized_on"] == ""  # a folder store: no split names
    assert head.input_mean.abs().max() > 0
    assert not torch.allclose(head.input_std, torch.ones_like(head.input_std))
    return head, info, store


def eval_logits(head, store) -> list[torch.Tensor]:
    """What `catnet eval` computes per video: the head on all of its views."""
    with torch.no_grad():
        return [head(torch.as_tensor(store[i].features)[None])[0] for i in range(len(store))]


def test_predict_gives_the_logits_of_eval(standardised):
    head, info, store = standardised
    ref = eval_logits(head, store)
    probs = predict_store(head, store).probs  # the report's and demo's path
    for i, logits in enumerate(ref):
        np.testing.assert_allclose(probs[i], logits.softmax(-1).numpy(), atol=1e-6)
        v = store[i]
        predictor = Predictor(StoredFeatures(v.features), info["classes"], ClipSampling(v.num_clips, 2, 1),
                              SpatialConfig(8, 8, v.num_crops), head=head, precision="fp32", optimize=False)
        scores, _ = predictor.classify(torch.zeros(len(v.features), 3, 2, 8, 8), v.num_clips)
        np.testing.assert_allclose(scores.probs.numpy(), logits.softmax(-1).numpy(), atol=1e-6)
    # the buffers matter: the same weights without them give other logits
    raw = load_run(shared_tiny_run(), which="best")[0]
    raw.input_mean.zero_()
    raw.input_std.fill_(1.0)
    assert not torch.allclose(eval_logits(raw, store)[0], ref[0], atol=1e-3)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_head_gives_the_logits_of_eval(standardised, tmp_path, fmt):
    head, info, store = standardised
    path = export_head(head, fmt, tmp_path / f"head.{fmt}", classes=info["classes"])
    ref = eval_logits(head, store)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # noqa: E731
    else:
        module = torch.export.load(str(path)).module()

        def run(x):
            with torch.no_grad():
                out = module(x)
            return (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    for i, logits in enumerate(ref):
        got = run(torch.as_tensor(store[i].features)[None])
        np.testing.assert_allclose(got[0], logits.numpy(), atol=1e-4)


def test_statistics_come_from_the_training_videos_only(tmp_path):
    """Held-out validation videos and the test split, shifted far away here, do not move the mean/std."""
    from catnet.engine.splits import store_splits
    from catnet.engine.train import TrainConfig, train

    rng = np.random.default_rng(0)
    feats = [rng.normal(2.0, 1.0, (4, 6)).astype(np.float32) for _ in range(16)]
    splits = ["train"] * 10 + ["test"] * 6
    for i in range(10, 16):
        feats[i] += 50.0
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [i % 2 for i in range(16)], ["a", "b"],
                                         splits=splits)
    cfg = TrainConfig(store=str(store.root), out=str(tmp_path / "run"), epochs=1, batch_size=4,
                      progress=False, holdout_fraction=0.2)
    train(cfg)
    head, info = load_run(tmp_path / "run")
    plan = store_splits(FeatureStore(store.root), cfg)
    assert plan.val and not set(plan.val) & set(plan.train)  # a hold-out of train validated
    x = np.concatenate([store[i].features for i in plan.train]).astype(np.float64)
    np.testing.assert_allclose(head.input_mean.numpy(), x.mean(0), atol=1e-4)
    np.testing.assert_allclose(head.input_std.numpy(), x.std(0), rtol=1e-3)
    assert info["standardized_on"] == "train"
