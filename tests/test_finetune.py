"""`catnet finetune-backbone` on tiny videos: a shallow random-init i3d_r50, 4 frames of 32x32."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from catnet.backbones import build_backbone
from catnet.cli import main as cli
from catnet.config import from_dict
from catnet.engine.finetune import FinetuneConfig, build_model, finetune, video_probabilities
from catnet.errors import CatnetError
from catnet.video import ClipSampling, SpatialConfig

# One bottleneck per stage keeps the i3d_r50 graph (and its checkpoint format) at a fifth of the cost.
SHALLOW = {"layers": [1, 1, 1, 1], "temporal_kernels": [[3], [3], [3], [1]]}
TINY = ["--frames", "4", "--stride", "2", "--short-side", "32", "--crop-size", "32",
        "--train-short", "32", "40", "--batch-size", "2", "--test-clips", "2",
        "--test-crops", "1", "--workers", "0", "--no-progress",
        "--backbone-opt", "layers=[1,1,1,1]", "--backbone-opt", "temporal_kernels=[[3],[3],[3],[1]]"]


@pytest.fixture
def videos(make_video, tmp_path):
    """Two classes x two videos, in class folders (no split labels: a held-out split is made)."""
    root = tmp_path / "videos"
    for c, cls in enumerate(("left", "right")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            path = make_video(f"{cls}{i}.mp4", frames=12, height=36, width=48, seed=10 * c + i)
            path.rename(root / cls / path.name)
    return root


def _cfg(videos, out, **kw) -> FinetuneConfig:
    base = dict(source=str(videos), out=str(out), backbone_options=SHALLOW,
                sampling={"num_clips": 2, "clip_len": 4, "stride": 2},
                spatial={"short_side": 32, "crop": 32, "num_crops": 1, "train_short": (32, 40)}, batch_size=2,
                num_workers=0, progress=False, val_split="none", epochs=2)
    if "crop" in kw:
        base["spatial"]["crop"] = kw.pop("crop")
    return from_dict(FinetuneConfig, {**base, **kw})


def test_cli_run_saves_a_checkpoint_that_extract_accepts(videos, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli(["finetune-backbone", str(videos), "--out", str(out), "--epochs", "2", "--eval-every", "1",
                "--holdout-fraction", "0.5", "--json", *TINY])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # one held-out video per class, each scored from its 2 clips x 1 crop
    assert all(r["val_n"] == "2" and 0.0 <= float(r["val_top1"]) <= 1.0 for r in rows)
    info = json.loads((out / "run.json").read_text())
    assert info["classes"] == ["left", "right"] and info["splits"]["num_train"] == 2
    assert info["sampling"]["train"]["num_clips"] == 1 and info["spatial"]["test"]["num_crops"] == 1

    # backbone.safetensors = best.pt's weights, classifier and class names included
    model = build_backbone("i3d_r50", checkpoint=out / "backbone.safetensors")
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    assert model.num_classes == 2 and model.labels == ["left", "right"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k]), k
    assert model.forward_features(torch.rand(1, 3, 4, 32, 32)).shape == (1, 2048)

    from catnet.features.extract import ExtractConfig, extract
    from catnet.features.store import FeatureStore

    cfg = ExtractConfig(backbone="i3d_r50", checkpoint=str(out / "backbone.safetensors"),
                        sampling=ClipSampling(num_clips=2, clip_len=4, stride=2),
                        spatial=SpatialConfig(short_side=32, crop=32, num_crops=1), workers=0)
    result = extract(videos, tmp_path / "store", cfg, progress=False)
    store = FeatureStore(tmp_path / "store")
    assert result.extracted == 4 and store.manifest["weights_id"] == model.weights_id
    assert store[0].features.shape == (2, 2048)


def test_resume_continues_bit_identically(videos, tmp_path):
    straight = finetune(_cfg(videos, tmp_path / "a", batch_size=4))  # one step per epoch
    finetune(_cfg(videos, tmp_path / "b", batch_size=4, epochs=1))
    resumed = finetune(_cfg(videos, tmp_path / "b", batch_size=4, resume=True))
    drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in straight["history"]]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in resumed["history"]] == drop_time
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(CatnetError, match="already holds a run"):
        finetune(_cfg(videos, tmp_path / "b", batch_size=4))
    with pytest.raises(CatnetError, match="differ from the run's: lr"):
        finetune(_cfg(videos, tmp_path / "b", batch_size=4, resume=True, lr=0.5))


def test_refusals(videos, tmp_path):
    with pytest.raises(CatnetError, match="nothing to resume"):
        finetune(_cfg(videos, tmp_path / "none", resume=True))
    with pytest.raises(CatnetError, match="only applies to --backbone i3d_r50"):
        _cfg(videos, tmp_path / "x", backbone="i3d_inception", inflate_from="r.pth").check()
    with pytest.raises(CatnetError, match="at most one"):
        _cfg(videos, tmp_path / "x", checkpoint="a.pt", inflate_from="r.pth").check()
    with pytest.raises(CatnetError, match="crop"):
        _cfg(videos, tmp_path / "x", crop=64).check()
    assert cli(["finetune-backbone", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2


def test_inflate_from_a_2d_resnet(videos, tmp_path):
    # a "2-D ResNet-50" in torchvision names: the shallow 3-D model's kernels summed over time
    ref = build_backbone("i3d_r50", seed=1, num_classes=1000, **SHALLOW)
    state2d = {k: (v.sum(2) if v.dim() == 5 else v) for k, v in ref.state_dict().items()
               if not k.startswith("normalize.")}
    torch.save(state2d, tmp_path / "resnet2d.pth")
    model = build_model(_cfg(videos, tmp_path / "r", inflate_from=str(tmp_path / "resnet2d.pth")), ["a", "b"])
    assert model.weights_source.startswith("resnet2d:") and model.num_classes == 2
    w = model.conv1.weight  # (64, 3, 5, 7, 7): every time slice is w2d / 5
    assert torch.allclose(w.sum(2), state2d["conv1.weight"], atol=1e-5)
    assert torch.allclose(w[:, :, 0], w[:, :, 4])

    from catnet.backbones.i3d_resnet import save_weights

    save_weights(ref, tmp_path / "catnet3d.safetensors")  # 3-D weights are not an ImageNet inflation source
    with pytest.raises(CatnetError, match="not a 2-D ResNet-50"):
        build_model(_cfg(videos, tmp_path / "r", inflate_from=str(tmp_path / "catnet3d.safetensors")), ["a"])


def test_video_prediction_averages_softmax_over_views():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 4 * 4, 5))
    views = torch.randn(7, 3, 2, 4, 4) * 5
    p = video_probabilities(model, views, batch_size=3, device="cpu")  # chunks of 3, 3, 1 views
    expected = model(views).softmax(1).mean(0)
    assert torch.allclose(p, expected, atol=1e-6) and abs(float(p.sum()) - 1) < 1e-5
    assert not torch.allclose(p, model(views).mean(0).softmax(0))  # not the softmax of averaged logits


def test_a_failed_videos_blank_clip_stays_out_of_batchnorm_and_the_loss():
    """A video that fails to decode becomes a blank clip labelled IGNORE: it must change neither the
    loss of the others nor BatchNorm's running statistics (which the saved backbone keeps)."""
    from catnet.engine.finetune import IGNORE, BackboneJob
    from catnet.engine.optim import Criterion

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                             nn.Linear(4, 2)).train()

    x = torch.rand(2, 3, 2, 4, 4)
    alone, mixed = net(), net()
    loss_a, *_ = BackboneJob.loss(None, alone, (x, torch.tensor([0, 1])), "cpu", Criterion())
    blank = torch.cat([x, torch.zeros(1, 3, 2, 4, 4)])
    loss_m, _, _, valid = BackboneJob.loss(None, mixed, (blank, torch.tensor([0, 1, IGNORE])), "cpu",
                                           Criterion())
    assert int(valid) == 2 and torch.equal(loss_a, loss_m)
    assert torch.equal(alone[1].running_mean, mixed[1].running_mean)
    assert torch.equal(alone[1].running_var, mixed[1].running_var)
