"""AmalgamatedOptimizer: a learned policy as an ordinary ``torch.optim.Optimizer`` (optamal/optim.py).

Checks the torch contract (step with/without closure, zero_grad, param groups, state_dict
save/resume), that it runs exactly the rule the engine runs, and that loading is safe.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from optamal import engine
from optamal.cli import main
from optamal.errors import OptamalError
from optamal.optim import AmalgamatedOptimizer
from optamal.policies import load_policy, load_rule
from optamal.problems import make_problem
from optamal.rules.choice import ChoiceNet
from optamal.rules.lstm import save_policy
from optamal.rules.rnnprop import RNNPropNet
from optamal.rules.teachers import init_moments, update_moments

RNNPROP_HEADER = {"kind": "rnnprop", "hidden": 20}
CHOICE_HEADER = {"kind": "choice", "hidden": 20, "teachers": ["adam", "sgd"], "lrs": [0.01, 0.1]}
KINDS = ("rnnprop", "choice")


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, str]:
    """Untrained (randomly initialised) policies of both kinds, saved as policy files."""
    d = tmp_path_factory.mktemp("policies")
    torch.manual_seed(0)
    save_policy(d / "rnnprop.pt", RNNPropNet(), RNNPROP_HEADER)
    torch.manual_seed(1)
    save_policy(d / "choice.pt", ChoiceNet(2), CHOICE_HEADER)
    return {"rnnprop": str(d / "rnnprop.pt"), "choice": str(d / "choice.pt")}


# --------------------------------------------------------------------------- helpers
def _mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def _batches(n: int, seed: int = 0, size: int = 16, d_in: int = 6, d_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g), torch.randint(0, d_out, (size,), generator=g))
            for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def _ndim(params) -> torch.Tensor:
    return torch.cat([torch.full((p.numel(),), max(p.dim(), 1), dtype=torch.long) for p in params])


# --------------------------------------------------------------------------- torch contract
def test_is_a_torch_optimizer(policies):
    model = _mlp()
    opt = AmalgamatedOptimizer(model.parameters(), policy=policies["rnnprop"])
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["scale"] == 1.0
    assert opt.header["kind"] == "rnnprop"
    assert not any(p.requires_grad for p in opt.net.parameters())   # the policy is not trained here


@pytest.mark.parametrize("kind", KINDS)
def test_step_without_and_with_closure(policies, kind):
    (x, y), = _batches(1)
    a, b = _mlp(), _mlp()
    opt_a = AmalgamatedOptimizer(a.parameters(), policy=policies[kind], warmup_steps=0)
    opt_b = AmalgamatedOptimizer(b.parameters(), policy=policies[kind], warmup_steps=0)
    before = _flat(a)

    opt_a.zero_grad()
    F.cross_entropy(a(x), y).backward()
    assert opt_a.step() is None

    def closure():
        opt_b.zero_grad()
        loss = F.cross_entropy(b(x), y)
        loss.backward()
        return loss

    loss = opt_b.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert loss.item() == pytest.approx(F.cross_entropy(_mlp()(x), y).item(), rel=1e-6)
    # The closure's gradient is the one used: both paths took the same step.
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), before)
    assert torch.isfinite(_flat(a)).all()


def test_zero_grad(policies):
    model = _mlp()
    opt = AmalgamatedOptimizer(model.parameters(), policy=policies["rnnprop"])
    (x, y), = _batches(1)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_group_scale_multiplies_that_groups_updates(policies, kind):
    # One step from the same point and the same batch: group 0 moves identically, group 1
    # moves exactly `scale` times as far as with scale 1.
    (x, y), = _batches(1)
    scale = 2.5
    m1, ms = _mlp(), _mlp()
    opt1 = AmalgamatedOptimizer([{"params": m1[0].parameters()}, {"params": m1[2].parameters()}],
                                policy=policies[kind], warmup_steps=0)
    opts = AmalgamatedOptimizer([{"params": ms[0].parameters()}, {"params": ms[2].parameters(), "scale": scale}],
                                policy=policies[kind], warmup_steps=0)
    assert [g["scale"] for g in opts.param_groups] == [1.0, scale]
    start = _flat(m1)
    for model, opt in ((m1, opt1), (ms, opts)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    n0 = sum(p.numel() for p in m1[0].parameters())
    d1, ds = _flat(m1) - start, _flat(ms) - start
    assert torch.equal(d1[:n0], ds[:n0])
    assert d1[n0:].abs().max() > 1e-4
    torch.testing.assert_close(ds[n0:], scale * d1[n0:], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_group_scale_against_the_functional_rule(policies, kind):
    # Built independently of the optimizer: warmup SGD steps with the moments following
    # the gradients, then the policy's functional rule; each group's update × its scale.
    warmup_steps, warmup_lr, scales = 2, 0.05, (1.0, 0.5)
    batches = _batches(5, seed=3)
    model = _mlp()
    ref = _mlp()
    opt = AmalgamatedOptimizer([{"params": model[0].parameters(), "scale": scales[0]},
                                {"params": model[2].parameters(), "scale": scales[1]}],
                               policy=policies[kind], warmup_steps=warmup_steps, warmup_lr=warmup_lr)
    _train(model, opt, batches)

    params = list(ref.parameters())
    n0 = sum(p.numel() for p in ref[0].parameters())
    theta = _flat(ref)
    scale_vec = torch.full_like(theta, scales[1])
    scale_vec[:n0] = scales[0]
    rule, _ = load_rule(policies[kind], _ndim(params))
    moments = init_moments(theta)
    state = None
    for i, (x, y) in enumerate(batches):
        vector_to_parameters(theta, params)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        g = parameters_to_vector([p.grad for p in params])
        if i < warmup_steps:
            moments = update_moments(moments, g)
            update = warmup_lr * g
        else:
            if state is None:
                state = rule.init(theta, moments)
            with torch.no_grad():
                update, state = rule.step(g, state, i - warmup_steps)
        theta = theta - scale_vec * update
    torch.testing.assert_close(_flat(model), theta, rtol=0, atol=1e-6)


class _Odd(nn.Module):
    """A scalar parameter, a 4-D conv weight, biases, and a parameter the loss never uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.unused = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        return self.gain * self.conv(x).mean(dim=(2, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_of_any_number_and_shape(policies, kind):
    model = _Odd()
    unused_before = model.unused.detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AmalgamatedOptimizer(model.parameters(), policy=policies[kind], warmup_steps=1, warmup_lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert model.unused.grad is None
    assert torch.equal(model.unused, unused_before)            # no grad: left untouched
    for name in ("conv.weight", "conv.bias", "gain"):
        p = dict(model.named_parameters())[name]
        assert p.shape == before[name].shape
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
    st = opt.state[model.gain]
    assert st["m"].shape == () and st["h1"].shape == (20,)
    assert opt.state[model.conv.weight]["c2"].shape == (3, 2, 3, 3, 20)
    assert float(st["step"]) == 3


# --------------------------------------------------------------------------- it trains
@pytest.fixture(scope="module")
def distilled_policy(tmp_path_factory, mnist5k_root) -> str:
    """A policy meta-trained by the project's own `distill` at smoke size (about 5 s)."""
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["distill", "--profile", "smoke", "--scheme", "none", "--lrs", "paper", "--problem", "mlp",
               "--replicates", "1", "--runs-dir", str(runs), "--name", "d",
               "--data-root", str(mnist5k_root)])
    assert rc == 0
    return str(runs / "distill" / "d" / "replicate-0" / "policy.pt")


def test_trains_a_small_model_in_a_user_loop(distilled_policy):
    # A policy trained by `distill --profile smoke` (not an untrained one: a random LSTM's
    # updates are uncorrelated with the gradient and leave this loss where it starts, ≈ ratio 1)
    # on a linearly separable task, in an ordinary DataLoader loop, after its 10 warmup steps.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x @ torch.randn(10, generator=g) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = AmalgamatedOptimizer(model.parameters(), policy=distilled_policy, warmup_steps=10)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for _ in range(12):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert final < 0.5 * initial, (initial, final)
    assert acc > 0.85


# --------------------------------------------------------------------------- same as the engine
@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_equals_the_engine_functional_path(policies, mnist5k_root, kind):
    problem = make_problem("train", max_train=512, max_val=256, data_root=str(mnist5k_root))
    seed, warmup_steps, warmup_lr, epochs = 7, 5, 0.05, 2
    theta0 = problem.theta0(seed)
    warm_batches = problem.batch_stream(seed + 10_000_019)   # engine.warm_start's stream
    warm_list = [next(warm_batches) for _ in range(warmup_steps)]
    train_list = [b for e in range(1, epochs + 1) for b in problem.epoch_batches(seed, e)]
    assert len(train_list) == 8

    # Engine: warmup, then the rule rebuilt from the policy file, on loss_and_grad.
    warm = engine.warmup(problem, theta0, iter(warm_list), warmup_steps, warmup_lr)
    rule, header = load_rule(policies[kind], problem.layout)
    assert header["kind"] == kind
    theta, state = warm.theta.clone(), rule.init(warm.theta, warm.moments)
    with torch.no_grad():
        for t, batch in enumerate(train_list):
            _, g = problem.loss_and_grad(theta, batch)
            update, state = rule.step(g, state, t)
            theta = theta - update

    # The same through a user's model and AmalgamatedOptimizer.
    model = copy.deepcopy(problem.module)
    vector_to_parameters(theta0.clone(), model.parameters())
    opt = AmalgamatedOptimizer(model.parameters(), policy=policies[kind], warmup_steps=warmup_steps,
                               warmup_lr=warmup_lr)
    for batch in warm_list + train_list:
        opt.zero_grad()
        F.cross_entropy(model(batch.x), batch.y).backward()
        opt.step()
    theta_opt = _flat(model)
    assert (theta_opt - theta).abs().max().item() <= 1e-6
    assert (theta - theta0).abs().max().item() > 1e-3   # it did move

    # And what `evaluate` records for this start after two epochs is this model's val loss.
    records = engine.train_epochs(problem, rule, engine.warm_start(problem, seed, warmup_steps, warmup_lr),
                                  seed, epochs)
    assert records[-1].val_loss == pytest.approx(problem.evaluate(theta_opt)[0], rel=1e-5)


# --------------------------------------------------------------------------- save / resume
def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


def _image_batches(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("warmup_steps,k,m", [(3, 5, 4), (8, 4, 6)], ids=["after-warmup", "during-warmup"])
def test_state_dict_round_trip_mid_training(policies, kind, warmup_steps, k, m):
    batches = _image_batches(k + m)
    model = _conv_model()
    opt = AmalgamatedOptimizer(model.parameters(), policy=policies[kind], warmup_steps=warmup_steps,
                               warmup_lr=0.05)
    _train(model, opt, batches[:k])
    saved = {"model": copy.deepcopy(model.state_dict()), "optim": copy.deepcopy(opt.state_dict())}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _train(model, opt, batches[k:])
    theta_a = _flat(model)

    buf.seek(0)
    from_file = torch.load(buf, weights_only=True)
    for source in (saved, from_file):
        model_b = _conv_model(seed=99)                     # different weights until loaded
        model_b.load_state_dict(source["model"])
        opt_b = AmalgamatedOptimizer(model_b.parameters(), policy=policies[kind])   # default warmup
        opt_b.load_state_dict(source["optim"])
        assert opt_b.warmup_steps == warmup_steps and opt_b.warmup_lr == 0.05
        _train(model_b, opt_b, batches[k:])
        assert torch.equal(_flat(model_b), theta_a)

    # The optimizer state matters: without it the continuation differs.
    model_c = _conv_model(seed=99)
    model_c.load_state_dict(saved["model"])
    opt_c = AmalgamatedOptimizer(model_c.parameters(), policy=policies[kind], warmup_steps=warmup_steps,
                                 warmup_lr=0.05)
    _train(model_c, opt_c, batches[k:])
    assert not torch.equal(_flat(model_c), theta_a)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_on_cuda(policies, kind):
    (x, y), = _batches(1)
    cpu, gpu = _mlp(), _mlp().cuda()
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = AmalgamatedOptimizer(model.parameters(), policy=policies[kind], warmup_steps=0)
        opt.zero_grad()
        F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
        opt.step()
        assert next(opt.net.parameters()).device.type == dev
        results.append(_flat(model).cpu())
    assert torch.isfinite(results[1]).all()
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- safe loading
_PAYLOAD_RAN = []


def _payload():
    _PAYLOAD_RAN.append(True)
    return {}


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (_payload, ())


def test_refuses_a_policy_that_carries_pickled_objects(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"format": "optamal-policy", "header": json.dumps(RNNPROP_HEADER),
                "state_dict": {**RNNPropNet().state_dict(), "extra": _Payload()}}, path)
    with pytest.raises(OptamalError, match="refus"):
        AmalgamatedOptimizer(_mlp().parameters(), policy=path)
    with pytest.raises(OptamalError, match="refus"):
        load_policy(path)
    assert _PAYLOAD_RAN == []


def test_refuses_a_policy_for_another_architecture(tmp_path):
    path = tmp_path / "policy.pt"
    save_policy(path, RNNPropNet(hidden=8), RNNPROP_HEADER)   # header claims hidden 20
    with pytest.raises(OptamalError, match="does not fit"):
        AmalgamatedOptimizer(_mlp().parameters(), policy=path)
    with pytest.raises(OptamalError, match="does not fit"):
        load_policy(path)


def test_the_shipped_pretrained_policy_is_loaded_by_default():
    from optamal.pretrained import DEFAULT_POLICY, PRETRAINED_DIR

    assert DEFAULT_POLICY.is_file(), "optamal/pretrained/default.pt must ship with the package"
    assert DEFAULT_POLICY.stat().st_size < 200_000   # a few tens of kB of weights, nothing else
    net, header = load_policy(DEFAULT_POLICY)   # weights-only format: loads with weights_only=True
    # what issue 6 promises: choice amalgamation of the large pool on the train problem
    assert (header["kind"], header["scheme"], header["pool"], header["problem"]) == \
        ("rnnprop", "choice", "large", "train")
    lrs = json.loads((PRETRAINED_DIR / "lrs.json").read_text())["lrs"]
    assert set(lrs) == {"sgd", "momentum", "rmsprop", "adam", "addsign", "powersign"}
    manifest = json.loads((PRETRAINED_DIR / "manifest.json").read_text())
    assert manifest["command"] == "distill" and manifest["status"] == "completed"

    model = _mlp()
    opt = AmalgamatedOptimizer(model.parameters())
    assert opt.policy_file == str(DEFAULT_POLICY)


def test_pretrained_policy_trains_a_model_with_no_arguments():
    # The README's three-line usage on a task the policy never saw: it must actually learn
    # (an untrained LSTM leaves this loss where it starts).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x @ torch.randn(10, generator=g) > 0).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = AmalgamatedOptimizer(model.parameters())
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    perm = torch.Generator().manual_seed(2)
    for _ in range(300):
        idx = torch.randint(0, 512, (64,), generator=perm)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert final < 0.5 * initial, (initial, final)
    assert acc > 0.9


def test_a_build_without_the_pretrained_policy_says_so(monkeypatch, tmp_path):
    import optamal.pretrained

    monkeypatch.setattr(optamal.pretrained, "DEFAULT_POLICY", tmp_path / "default.pt")
    with pytest.raises(OptamalError, match="ships no pretrained policy"):
        AmalgamatedOptimizer(_mlp().parameters())


def test_cpu_no_grad_lstm_cell_matches_torch_lstm_cell():
    """The CPU inference cell (one sigmoid over the gate matrix, tanh via sigmoid) computes
    what nn.LSTMCell computes, over the ranges the optimizer meets (large pre-activations
    saturate the same way); with gradients enabled the ATen cell itself runs."""
    from optamal.rules.lstm import _cpu_cell

    torch.manual_seed(0)
    cell = nn.LSTMCell(2, 20)
    for scale in (0.1, 1.0, 30.0):
        x = torch.randn(4000, 2) * scale
        h, c = torch.randn(4000, 20), torch.randn(4000, 20) * scale
        want_h, want_c = cell(x, (h, c))
        with torch.no_grad():
            got_h, got_c = _cpu_cell(cell, x, h, c)
        assert torch.allclose(got_h, want_h, rtol=0, atol=2e-6), scale
        assert torch.allclose(got_c, want_c, rtol=1e-6, atol=2e-6), scale
        assert not got_h.requires_grad and want_h.requires_grad
    net = RNNPropNet()
    x = torch.randn(300, 2)
    state = net.zero_state(300, x)
    out_grad, _ = net(x, state)   # grad mode: the ATen cell, differentiable
    out_grad.sum().backward()
    assert net.cell1.weight_ih.grad is not None
    with torch.no_grad():
        out_fast, _ = net(x, state)
    assert torch.allclose(out_fast, out_grad.detach(), atol=2e-6)
