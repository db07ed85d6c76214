"""Learned baselines: DM ("Original") and Scale (hierarchical), and their policy files."""

import math

import pytest
import torch

from optamal.errors import OptamalError
from optamal.policies import build_net, load_policy, load_rule, make_rule
from optamal.rules.baselines import DM, DMNet, Scale, ScaleNet
from optamal.rules.lstm import save_policy


def test_dm_is_raw_gradient_lstm_times_point_one():
    torch.manual_seed(0)
    net = DMNet()
    rule = DM(net)
    g = torch.randn(7)
    state = rule.init(torch.zeros(7))
    u, new = rule.step(g, state)
    # Independent computation with the cells themselves: input is the raw gradient.
    h1, c1 = net.cell1(g[:, None], (torch.zeros(7, 20), torch.zeros(7, 20)))
    h2, c2 = net.cell2(h1, (torch.zeros(7, 20), torch.zeros(7, 20)))
    expected = 0.1 * net.head(h2).squeeze(-1)
    torch.testing.assert_close(u, expected)
    torch.testing.assert_close(new.lstm.h2, h2)
    # the moments still follow the gradient (shared warmup protocol)
    torch.testing.assert_close(new.moments.m, 0.1 * g)


def _layout():
    # three tensors of 4, 6 and 2 coordinates
    idx = torch.tensor([0] * 4 + [1] * 6 + [2] * 2)
    return idx


def test_scale_update_has_per_tensor_rms_exp_eta():
    torch.manual_seed(1)
    net = ScaleNet()
    with torch.no_grad():          # no learning-rate change: η stays at log(init_lr)
        net.delta_eta.weight.zero_()
        net.delta_eta.bias.zero_()
    idx = _layout()
    rule = Scale(net, idx)
    state = rule.init(torch.zeros(12))
    for _ in range(3):
        g = torch.randn(12)
        u, state = rule.step(g, state)
        for t in range(3):
            rms = u[idx == t].pow(2).mean().sqrt().item()
            # step = exp(η)·d·√|w|/‖d_w‖ → RMS over the tensor is exp(η) (up to the ε in the norm)
            assert rms == pytest.approx(1e-3, rel=1e-3)
    assert state.h_tensor.shape == (3, 5) and state.h_global.shape == (1, 5)
    assert state.g_bar.shape == (3, 12)


def test_scale_meta_gradient_finite_with_zero_gradients():
    torch.manual_seed(2)
    net = ScaleNet()
    rule = Scale(net, _layout())
    state = rule.init(torch.zeros(12))
    g = torch.randn(12)
    g[:4] = 0.0            # a tensor whose gradient is exactly zero (dead inputs)
    total = 0
    for _ in range(3):
        u, state = rule.step(g, state)
        total = total + u.pow(2).sum()
    total.backward()
    norms = [p.grad.norm().item() for p in net.parameters() if p.grad is not None]
    assert norms and all(math.isfinite(n) for n in norms)
    assert any(n > 0 for n in norms)


@pytest.mark.parametrize("kind", ["dm", "scale"])
def test_baseline_policy_files_round_trip(tmp_path, kind):
    torch.manual_seed(3)
    header = {"kind": kind, "hidden": 20}
    net = build_net(header)
    save_policy(tmp_path / "policy.pt", net, header)
    loaded, h = load_policy(tmp_path / "policy.pt")
    assert h["kind"] == kind
    for (k1, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    idx = _layout()
    ndim = torch.ones(12, dtype=torch.long)
    rule, _ = load_rule(tmp_path / "policy.pt", (idx, ndim))
    u, _ = rule.step(torch.randn(12), rule.init(torch.zeros(12)))
    assert u.shape == (12,) and bool(torch.isfinite(u).all())


def test_scale_needs_layout():
    net = ScaleNet()
    with pytest.raises(OptamalError, match="layout"):
        make_rule(net, {"kind": "scale"}, None)
