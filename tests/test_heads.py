"""Video-level heads: each equation against a hand computation, invariances, masking, configs.

The references below are written with explicit numpy loops, one line per symbol of the paper, and
read the module's parameters, so they check the tensor code rather than re-running it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from catnet.config import to_dict
from catnet.errors import CatnetError
from catnet.experiments.variants import table1_variants, table2_variants, variant_label
from catnet.heads import (
    HEADS,
    build_head,
    head_from_config,
    load_head_preset,
)
from catnet.heads.catnet import FCNorm, GlobalAttention, LocalAttention, aggregate
from catnet.heads.common import Dropout, masked_softmax

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "heads"
D, C = 6, 5

# One small configuration of every head and of the options that change the computation.
VARIANTS = [
    ("catnet", {"num_heads": 3}),
    ("catnet", {"num_heads": 3, "aggregation": "sum"}),
    ("catnet", {"num_heads": 3, "per_head_fc": True, "fc_dim": 4}),
    ("catnet", {"num_heads": 2, "global_features": "raw"}),
    ("catnet", {"num_heads": 8}),  # more heads than clips: Eq. 4's FC runs on the clips (see below)
    ("local", {"num_heads": 8, "fc_norm": True, "aggregation": "sum"}),
    ("local", {"num_heads": 3, "fc_norm": False}),
    ("local", {"num_heads": 3, "fc_norm": True}),
    ("avgpool", {}),
    ("attention_clusters", {"num_heads": 3}),
    ("netvlad", {"num_clusters": 3}),
    ("lstm", {"hidden_size": 5}),
    ("lstm", {"hidden_size": 5, "pooling": "mean", "num_layers": 2}),
]
ORDERLESS = [v for v in VARIANTS if v[0] != "lstm"]


def _ids(variants):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in variants]


def make_head(name, options, seed=0, dtype=torch.float64):
    """A head in eval mode with parameters moved off their init (no structural zeros, e.g. b_i = 0)."""
    torch.manual_seed(seed)
    head = build_head(name, D, C, **options).to(dtype).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


def P(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- hand computations (numpy loops)


def ref_local(x, m, W):
    """Eqs. 2-3 for one video: x (K, D), m (K,) bool, W (N, D) -> alpha (N, K), y (N, D)."""
    N, K = W.shape[0], x.shape[0]
    alpha, y = np.zeros((N, K)), np.zeros((N, x.shape[1]))
    for i in range(N):
        e = [math.exp(float(x[j] @ W[i])) if m[j] else 0.0 for j in range(K)]
        for j in range(K):
            alpha[i, j] = e[j] / sum(e)
            y[i] += alpha[i, j] * x[j]
    return alpha, y


def ref_fc_norm(y, Ws, bs):
    """Eq. 4: Ws/bs are per-head lists (the same FC repeated when it is shared)."""
    N = len(y)
    raw = [Ws[i] @ y[i] + bs[i] for i in range(N)]
    normed = [r / (math.sqrt(N) * math.sqrt(sum(v * v for v in r))) for r in raw]
    return np.array(raw), np.array(normed)


def ref_global(z, w, b):
    """Eqs. 5-6: G = (1/N) sum_i z_i; beta_i = sigmoid(w^T [z_i; G] + b)."""
    N = len(z)
    G = sum(z[i] for i in range(N)) / N
    return np.array([sigmoid(float(w @ np.concatenate([z[i], G])) + b) for i in range(N)])


def classify(head, v):
    """The classifier on the scaled representation: W (logit_scale * V) + b (docs/heads.md)."""
    return P(head.classifier.weight) @ (head.config.logit_scale * v) + P(head.classifier.bias)


def ref_aggregate(z, beta, how):
    if how == "sum":  # Eq. 7
        return sum(beta[i] * z[i] for i in range(len(z))) / sum(beta)
    return np.concatenate([beta[i] * z[i] for i in range(len(z))])  # Eq. 8


def ref_catnet(head, x, m):
    """Full CATNet-family head for one video -> (logits, alpha | None, beta | None)."""
    c = head.config
    if c.attention == "learned":
        alpha, y = ref_local(x, m, P(head.local.score.weight))
    else:
        alpha, y = None, np.tile(x[m].mean(0), (c.num_heads, 1))
    if c.fc_norm:
        f = head.fc_norm
        if c.per_head_fc:
            Ws, bs = P(f.weight), P(f.bias)
        else:
            Ws, bs = [P(f.fc.weight)] * c.num_heads, [P(f.fc.bias)] * c.num_heads
        raw, normed = ref_fc_norm(y, Ws, bs)
        y = normed if c.global_features == "normalized" else raw
    beta = None
    if c.global_attention:
        beta = ref_global(y, P(head.global_att.fc.weight)[0], float(P(head.global_att.fc.bias)[0]))
    v = ref_aggregate(y, beta if beta is not None else np.ones(len(y)), c.aggregation)
    return classify(head, v), alpha, beta


def ref_attention_clusters(head, x, m):
    alpha, y = ref_local(x, m, P(head.local.score.weight))
    N, w, b = len(y), P(head.shift.weight), P(head.shift.bias)
    parts = []
    for i in range(N):
        o = w[i] * y[i] + b[i]  # the shifting operation: scalar weight and bias per head
        parts.append(o / (math.sqrt(N) * np.linalg.norm(o)))
    return classify(head, np.concatenate(parts)), alpha


def ref_netvlad(head, x, m):
    Wa, ba, centers = P(head.vlad.assign.weight), P(head.vlad.assign.bias), P(head.vlad.centers)
    Kc = len(centers)
    V = np.zeros_like(centers)
    for j in range(len(x)):
        if not m[j]:
            continue
        e = [math.exp(float(Wa[k] @ x[j] + ba[k])) for k in range(Kc)]
        for k in range(Kc):
            V[k] += e[k] / sum(e) * (x[j] - centers[k])
    V = np.concatenate([V[k] / np.linalg.norm(V[k]) for k in range(Kc)])  # intra-normalisation
    V = V / np.linalg.norm(V)  # global normalisation
    return classify(head, V)


def ref_lstm(head, x, m):
    c = head.config
    H = c.hidden_size
    seq = [x[j] for j in range(len(x)) if m[j]]  # masked clips are skipped
    for layer in range(c.num_layers):
        Wi, Wh = P(getattr(head.lstm, f"weight_ih_l{layer}")), P(getattr(head.lstm, f"weight_hh_l{layer}"))
        b = P(getattr(head.lstm, f"bias_ih_l{layer}")) + P(getattr(head.lstm, f"bias_hh_l{layer}"))
        h, cell, outs = np.zeros(H), np.zeros(H), []
        for xt in seq:
            g = Wi @ xt + Wh @ h + b
            i, f = 1 / (1 + np.exp(-g[:H])), 1 / (1 + np.exp(-g[H : 2 * H]))
            cand, o = np.tanh(g[2 * H : 3 * H]), 1 / (1 + np.exp(-g[3 * H :]))
            cell = f * cell + i * cand
            h = o * np.tanh(cell)
            outs.append(h)
        seq = outs
    v = seq[-1] if c.pooling == "last" else sum(seq) / len(seq)
    return classify(head, v)


# ---------------------------------------------------------------- equations, one by one


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]])
    return x, mask


def test_local_attention_eqs_2_3(batch):
    x, mask = batch
    torch.manual_seed(0)
    local = LocalAttention(D, 3).double()
    y, alpha = local(torch.where(mask[..., None], x, 0), mask)
    for b in range(2):
        ref_alpha, ref_y = ref_local(P(x[b]), P(mask[b]).astype(bool), P(local.score.weight))
        np.testing.assert_allclose(P(alpha[b]), ref_alpha, atol=1e-12)
        np.testing.assert_allclose(P(y[b]), ref_y, atol=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_fc_norm_eq_4(per_head):
    torch.manual_seed(0)
    N, out = 3, 4
    fc = FCNorm(D, out, N, per_head).double()
    y = torch.randn(2, N, D, dtype=torch.float64)
    raw, normed = fc(y)
    if per_head:
        Ws, bs = P(fc.weight), P(fc.bias)
    else:
        Ws, bs = [P(fc.fc.weight)] * N, [P(fc.fc.bias)] * N
    for b in range(2):
        ref_raw, ref_normed = ref_fc_norm(P(y[b]), Ws, bs)
        np.testing.assert_allclose(P(raw[b]), ref_raw, atol=1e-12)
        np.testing.assert_allclose(P(normed[b]), ref_normed, atol=1e-12)
    # The concatenation of the N normalised heads has unit norm (the reason for the sqrt(N)).
    np.testing.assert_allclose(P(normed.flatten(1).norm(dim=1)), np.ones(2), atol=1e-12)


def test_global_attention_eqs_5_6():
    torch.manual_seed(0)
    glob = GlobalAttention(D).double()
    z = torch.randn(2, 4, D, dtype=torch.float64)
    beta = glob(z)
    for b in range(2):
        ref = ref_global(P(z[b]), P(glob.fc.weight)[0], float(P(glob.fc.bias)[0]))
        np.testing.assert_allclose(P(beta[b]), ref, atol=1e-12)


@pytest.mark.parametrize("how", ["sum", "concat"])
def test_aggregation_eqs_7_8(how):
    torch.manual_seed(0)
    z = torch.randn(2, 4, D, dtype=torch.float64)
    beta = torch.rand(2, 4, dtype=torch.float64) + 0.05
    v = aggregate(z, beta, how)
    assert v.shape == ((2, 4 * D) if how == "concat" else (2, D))
    for b in range(2):
        np.testing.assert_allclose(P(v[b]), ref_aggregate(P(z[b]), P(beta[b]), how), atol=1e-12)


# ---------------------------------------------------------------- every head end to end


@pytest.mark.parametrize("name,options", VARIANTS, ids=_ids(VARIANTS))
def test_head_matches_hand_computation(name, options, batch):
    x, mask = batch
    head = make_head(name, options)
    out = head.forward_attention(x, mask)
    for b in range(2):
        xb, mb = P(x[b]), P(mask[b]).astype(bool)
        alpha = beta = None
        if name in ("catnet", "local", "avgpool"):
            logits, alpha, beta = ref_catnet(head, xb, mb)
        elif name == "attention_clusters":
            logits, alpha = ref_attention_clusters(head, xb, mb)
        elif name == "netvlad":
            logits = ref_netvlad(head, xb, mb)
        else:
            logits = ref_lstm(head, xb, mb)
        np.testing.assert_allclose(P(out["logits"][b]), logits, atol=1e-10)
        for key, ref in (("alpha", alpha), ("beta", beta)):
            if ref is None:
                assert out[key] is None
            else:
                np.testing.assert_allclose(P(out[key][b]), ref, atol=1e-12)
    assert torch.equal(head(x, mask), out["logits"])


@pytest.mark.parametrize("num_heads", [3, 8])
def test_fc_on_clips_equals_fc_on_heads(num_heads, batch, monkeypatch):
    """FC(sum_j alpha_ij x_j) = sum_j alpha_ij FC(x_j): both orders give the same logits and gradients."""
    x, mask = batch
    head = make_head("catnet", {"num_heads": num_heads}).train()
    head.drop.p = 0.0
    assert head._fc_before_pooling(x.shape[1]) == (x.shape[1] < num_heads)

    def run(fc_first):
        monkeypatch.setattr(head, "_fc_before_pooling", lambda k: fc_first)
        head.zero_grad()
        out = head.forward_attention(x, mask)
        out["logits"].square().sum().backward()
        return out, {n: p.grad.clone() for n, p in head.named_parameters()}

    (a, ga), (b, gb) = run(True), run(False)
    for key in ("logits", "alpha", "beta"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-10)


def test_per_head_fc_never_runs_on_clips():
    head = build_head("catnet", D, C, num_heads=8, per_head_fc=True)
    assert not head._fc_before_pooling(1)


def test_dropout_cpu_mask():
    torch.manual_seed(0)
    drop = Dropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_avgpool_is_mean_of_clip_features_then_fc(batch):
    x, mask = batch
    head = make_head("avgpool", {})
    for b in range(2):
        mean = P(x[b])[P(mask[b]).astype(bool)].mean(0)
        ref = classify(head, mean)
        np.testing.assert_allclose(P(head(x, mask)[b]), ref, atol=1e-12)


# ---------------------------------------------------------------- invariances and masking


@pytest.mark.parametrize("name,options", ORDERLESS, ids=_ids(ORDERLESS))
def test_clip_order_invariance(name, options, batch):
    x, mask = batch
    head = make_head(name, options)
    perm = torch.tensor([3, 0, 4, 2, 1])
    a, b = head.forward_attention(x, mask), head.forward_attention(x[:, perm], mask[:, perm])
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-10, rtol=0)
    if a["alpha"] is not None:
        torch.testing.assert_close(a["alpha"][..., perm], b["alpha"], atol=1e-12, rtol=0)
    if a["beta"] is not None:
        torch.testing.assert_close(a["beta"], b["beta"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,options", VARIANTS, ids=_ids(VARIANTS))
def test_mask_equivalence_with_garbage_padding(name, options):
    """Videos of 4, 1 and 3 clips padded to 7 with garbage (huge, inf, NaN) at scattered positions."""
    head = make_head(name, options, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    lengths, K = [4, 1, 3], 7
    videos = [torch.randn(n, D, generator=g) for n in lengths]
    x = torch.randn(3, K, D, generator=g) * 1e6
    x[0, 0, 0], x[1, 2, 1], x[2, 6, 2] = float("inf"), float("nan"), -float("inf")
    mask = torch.zeros(3, K, dtype=torch.bool)
    slots = [[0, 2, 3, 6], [4], [1, 2, 5]]  # valid clips keep their order, with holes between them
    for b, (v, s) in enumerate(zip(videos, slots, strict=True)):
        x[b, s], mask[b, s] = v, True
    padded = head.forward_attention(x, mask)
    assert torch.isfinite(padded["logits"]).all()
    for b, (v, s) in enumerate(zip(videos, slots, strict=True)):
        alone = head.forward_attention(v[None])
        torch.testing.assert_close(padded["logits"][b], alone["logits"][0], atol=1e-5, rtol=1e-5)
        if alone["alpha"] is not None:
            torch.testing.assert_close(padded["alpha"][b][:, s], alone["alpha"][0], atol=1e-6, rtol=1e-5)
            assert padded["alpha"][b][:, ~mask[b]].abs().max() == 0
        if alone["beta"] is not None:
            torch.testing.assert_close(padded["beta"][b], alone["beta"][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,options", VARIANTS, ids=_ids(VARIANTS))
def test_fully_masked_video_is_finite(name, options):
    head = make_head(name, options, dtype=torch.float32)
    x = torch.randn(2, 3, D)
    mask = torch.tensor([[False] * 3, [True, True, False]])
    out = head.forward_attention(x, mask)
    for v in out.values():
        assert v is None or torch.isfinite(v).all()
    if out["alpha"] is not None:
        assert out["alpha"][0].abs().max() == 0  # no valid clip gets no attention, not NaN


def test_masked_softmax_rows():
    s = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[True, False, True], [True, True, True], [False, False, False]])
    p = masked_softmax(s, m)
    e = [math.exp(1.0), math.exp(3.0)]
    np.testing.assert_allclose(P(p[0]), [e[0] / sum(e), 0.0, e[1] / sum(e)], atol=1e-6)
    assert p[1].sum().item() == pytest.approx(1.0)
    assert p[2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["catnet", "local", "attention_clusters"])
def test_attention_rows_sum_to_one_and_beta_in_unit_interval(name, batch):
    x, mask = batch
    out = make_head(name, {"num_heads": 4}).forward_attention(x, mask)
    assert out["alpha"].shape == (2, 4, 5)
    torch.testing.assert_close(out["alpha"].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert (out["alpha"] >= 0).all()
    if name == "catnet":
        assert out["beta"].shape == (2, 4)
        assert ((out["beta"] > 0) & (out["beta"] < 1)).all()
    else:
        assert out["beta"] is None


# ---------------------------------------------------------------- widths, gradients


@pytest.mark.parametrize(
    "options,width",
    [
        ({"num_heads": 4}, 4 * D),
        ({"num_heads": 4, "fc_dim": 10}, 4 * 10),
        ({"num_heads": 4, "aggregation": "sum"}, D),
        ({"num_heads": 4, "aggregation": "sum", "fc_dim": 10}, 10),
        ({"num_heads": 4, "fc_norm": False, "global_attention": False}, 4 * D),
    ],
)
def test_representation_width(options, width, batch):
    x, mask = batch
    head = make_head("catnet", options)
    v, _, _ = head.forward_features(x, mask)
    assert v.shape == (2, width)
    assert head.num_features == width == head.classifier.in_features


@pytest.mark.parametrize("name,options", VARIANTS, ids=_ids(VARIANTS))
def test_gradients_reach_every_parameter(name, options, batch):
    x, mask = batch
    head = make_head(name, options)
    head.train()
    loss = torch.nn.functional.cross_entropy(head(x, mask), torch.tensor([1, 3]))
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------- configs and API


@pytest.mark.parametrize("name", HEADS)
def test_config_round_trip(name, batch):
    x, mask = batch
    head = make_head(name, {"dropout": 0.2})
    again = head_from_config(to_dict(head.config)).double().eval()
    again.load_state_dict(head.state_dict())
    assert again.config == head.config and again.config.name == name
    torch.testing.assert_close(again(x, mask), head(x, mask))


def test_presets_match_table_1():
    avg = build_head("avgpool", D, C).config
    assert (avg.num_heads, avg.attention, avg.fc_norm, avg.global_attention) == (1, "uniform", False, False)
    rows = [build_head(n, D, C, **o).config for n, o in table1_variants()]
    flags = [(c.fc_norm, c.global_attention) for c in rows[1:]]
    assert flags == [(False, False), (True, False), (True, True)]
    assert (rows[3].num_heads, rows[3].aggregation) == (32, "concat")  # the paper's default, Sec. 4.1
    labels = [variant_label(n, o) for n, o in table1_variants()]
    assert labels[1:3] == ["local w/o FC-Norm", "local w/ FC-Norm"]
    t2 = table2_variants()
    assert len(t2) == 12
    assert {(o["num_heads"], o["aggregation"]) for _, o in t2} == {
        (n, a) for n in (1, 4, 8, 16, 32, 64) for a in ("concat", "sum")
    }


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_presets_build(path):
    name, options = load_head_preset(path)
    head = build_head(name, D, C, **options)
    assert head.config.name == name
    for key, value in options.items():
        assert getattr(head.config, key) == value


def test_catnet_yaml_is_the_paper_default():
    name, options = load_head_preset(PRESET_DIR / "catnet.yaml")
    cfg = build_head(name, 16, 3, **options).config
    assert cfg == build_head("catnet", 16, 3).config
    assert (cfg.num_heads, cfg.aggregation, cfg.fc_norm, cfg.global_attention) == (32, "concat", True, True)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: build_head("transformer", D, C), "unknown head"),
        (lambda: build_head("catnet", D, C, heads=4), "unknown CATNetConfig key"),
        (lambda: build_head("catnet", D, C, aggregation="max"), "aggregation must be one of"),
        (lambda: build_head("catnet", D, C, num_heads=0), "num_heads must be >= 1"),
        (lambda: build_head("netvlad", D, C, num_clusters="many"), "must be int"),
        (lambda: build_head("lstm", D, C, dropout=1.5), "dropout"),
        (lambda: head_from_config({"in_dim": D}), "'name'"),
    ],
)
def test_bad_options_are_one_line_errors(call, message):
    with pytest.raises(CatnetError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    head = build_head("catnet", D, C, num_heads=2)
    with pytest.raises(CatnetError, match="6-d clip features"):
        head(torch.randn(2, 3, D + 1))
    with pytest.raises(CatnetError, match=r"\(B, K, D\)"):
        head(torch.randn(3, D))
    with pytest.raises(CatnetError, match="mask"):
        head(torch.randn(2, 3, D), torch.ones(2, 3, 1, dtype=torch.bool))
    with pytest.raises(CatnetError, match="mask"):
        head(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))


# One configuration per head and aggregation: training is the slowest thing in this file.
LEARN = [VARIANTS[i] for i in (0, 1, 4, 6, 7, 8, 9)]


@pytest.mark.parametrize("name,options", LEARN, ids=_ids(LEARN))
def test_head_learns_a_small_task(name, options):
    """One informative clip per video at a random position among noise clips: every head can fit it."""
    g = torch.Generator().manual_seed(3)
    n, K = 32, 4
    labels = torch.randint(0, C, (n,), generator=g)
    prototypes = 3 * torch.randn(C, D, generator=g)
    x = 0.5 * torch.randn(n, K, D, generator=g)
    x[torch.arange(n), torch.randint(0, K, (n,), generator=g)] += prototypes[labels]
    torch.manual_seed(0)
    head = build_head(name, D, C, **{**options, "dropout": 0.0})
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), labels).backward()
        opt.step()
    accuracy = (head.eval()(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy


# ---------------------------------------------------------------- logit scale and standardisation


@pytest.mark.parametrize("name,options,scale", [
    ("catnet", {"num_heads": 4}, 16.0),
    ("catnet", {"num_heads": 4, "aggregation": "sum"}, 32.0),  # 16 sqrt(N): V has norm <= 1/sqrt(N)
    ("local", {"num_heads": 4, "fc_norm": True}, 16.0),
    ("local", {"num_heads": 4, "fc_norm": False}, 0.5),  # 1/sqrt(N) on N concatenated raw heads
    ("catnet", {"num_heads": 4, "global_features": "raw"}, 0.5),
    ("avgpool", {}, 1.0),
    ("linear", {}, 1.0),
    ("attention_clusters", {"num_heads": 4}, 16.0),
    ("netvlad", {"num_clusters": 4}, 16.0),
    ("lstm", {"hidden_size": 8}, 1.0),
])
def test_default_logit_scale_per_head(name, options, scale):
    head = build_head(name, 8, 3, **options)
    assert head.config.logit_scale == pytest.approx(scale)
    assert build_head(name, 8, 3, logit_scale=2.0, **options).config.logit_scale == 2.0  # asked: kept
    # a config dict without the key (catnet 0.1 runs) means 1.0, so old runs give their old numbers
    old = {k: v for k, v in dataclasses.asdict(head.config).items() if k != "logit_scale"}
    assert head_from_config(old).config.logit_scale == 1.0
    x = torch.randn(2, 5, 8)
    again = head_from_config(dataclasses.asdict(head.config))
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again.eval()(x), head.eval()(x))


def test_standardisation_buffers_apply_before_masking():
    torch.manual_seed(0)
    head = build_head("catnet", 4, 3, num_heads=2, standardize=True).eval()
    assert {"input_mean", "input_std"} <= set(head.state_dict())
    mean, std = torch.tensor([5.0, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    head.set_standardization(mean, std)
    plain = build_head("catnet", 4, 3, num_heads=2).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("input_")})
    x = torch.randn(2, 3, 4) * std + mean
    mask = torch.tensor([[True, True, False], [True, True, True]])
    x[0, 2] = float("nan")  # padding garbage never leaks, standardised or not
    torch.testing.assert_close(head(x, mask), plain((x - mean) / std, mask), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(head(x, mask)).all()
    with pytest.raises(CatnetError, match="standardize=True"):
        plain.set_standardization(mean, std)
