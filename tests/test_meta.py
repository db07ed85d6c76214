"""Meta-training (METHOD.md §3–§6): the learned rules learn, the meta-gradient is right,
perturbations have the stated statistics, teachers hold no graph, divergence is handled.

Problems are small on purpose: "mlp" on mnist5k capped to 512 training examples (about
2 ms per optimizee step), a few dozen meta-iterations, truncations of 10 steps.
Thresholds that come from a measurement say so, with the measured value.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn

from optamal.data import Dataset
from optamal.engine import warm_start
from optamal.errors import OptamalError
from optamal.meta.losses import EPS, distill_distance, meta_term, reduce_teachers
from optamal.meta.perturb import pgd_step, random_perturbation
from optamal.meta.trainer import MetaSettings, MetaTrainer, ReplicateDiverged, student_trajectory
from optamal.problems import Problem, make_problem
from optamal.rules.choice import Choice, ChoiceNet
from optamal.rules.lstm import save_policy
from optamal.rules.rnnprop import RNNProp, RNNPropNet
from optamal.rules.teachers import Teacher

WARMUP = 10          # warmup steps (smoke-sized; METHOD §6 uses 100)
WARMUP_LR = 0.01
HELD_OUT_SEED = 4242  # never a training trajectory: those use seed·100003 + meta_epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other work: one intra-op thread avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def mlp(mnist5k_root):
    return make_problem("mlp", max_train=512, max_val=256, data_root=str(mnist5k_root))


def settings(**kw) -> MetaSettings:
    base = dict(unrolls=(20,), truncation=10, alphas=(0.0,), scheme="none", warmup_steps=WARMUP,
                warmup_lr=WARMUP_LR, random_scaling=False, meta_gradient="first-order")
    base.update(kw)
    return MetaSettings(**base)


def rnnprop_factory(net):
    return lambda params, noise, gen: RNNProp(net, params, noise, gen)


def train(trainer: MetaTrainer, epochs: int, unroll: int, alpha: float) -> list[dict]:
    rows = []
    for _ in range(epochs):
        rows += trainer.meta_epoch_run(0, unroll, alpha)
    return rows


def tensors_of(obj):
    """Every tensor inside nested tuples / NamedTuples / lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors_of(v)


# --------------------------------------------------------------------------- 1. imitation
@torch.no_grad()
def distance_to_teacher(problem, net, teacher, seed: int, steps: int) -> float:
    """Mean over steps of d = log(½‖θ_student − θ_teacher‖² + 1e-10) − log N, both run from
    the same warm start on the same batches, unscaled (as student_trajectory does)."""
    warm = warm_start(problem, seed, WARMUP, WARMUP_LR)
    rule = RNNProp(net)
    th_s, th_t = warm.theta.clone(), warm.theta.clone()
    st_s, st_t = rule.init(th_s, warm.moments), teacher.init(th_t, warm.moments)
    stream = problem.batch_stream(seed)
    ds = []
    n = th_s.numel()
    for t in range(steps):
        batch = next(stream)
        _, g = problem.loss_and_grad(th_s, batch)
        u, st_s = rule.step(g, st_s, t)
        th_s = th_s - u
        _, g = problem.loss_and_grad(th_t, batch)
        u, st_t = teacher.step(g, st_t, t)
        th_t = th_t - u
        ds.append(math.log(0.5 * float(((th_s - th_t) ** 2).sum()) + 1e-10) - math.log(n))
    return sum(ds) / len(ds)


def test_imitation_of_one_teacher_reduces_distillation_distance(mlp):
    """Scheme mean, one teacher (adam 0.01), α = 1, random scaling OFF (so training and the
    held-out measurement share one space). 15 meta-epochs × 2 truncations of 10 steps."""
    torch.manual_seed(0)
    net = RNNPropNet()
    untrained = copy.deepcopy(net)
    teacher = Teacher("adam", 0.01)
    trainer = MetaTrainer(mlp, net, rnnprop_factory(net), [teacher],
                          settings(scheme="mean", alphas=(1.0,)), seed=1)
    rows = train(trainer, 15, 20, 1.0)
    assert not any(r["skipped"] for r in rows)
    assert all(math.isfinite(r["distill_loss"]) for r in rows)

    before = distance_to_teacher(mlp, untrained, teacher, HELD_OUT_SEED, 40)
    after = distance_to_teacher(mlp, net, teacher, HELD_OUT_SEED, 40)
    # Measured: before -4.41, after -7.10 (the squared distance shrank ~15×). Demand a drop
    # of at least 1.5 in log (≥ 4.5× closer to the teacher).
    assert after < before - 1.5, (before, after)


# --------------------------------------------------------------------------- 2. choice
@torch.no_grad()
def mean_adam_weight(problem, rule: Choice, seed: int, steps: int) -> float:
    weights = []

    class Recording:
        def init(self, theta, moments=None):
            return rule.init(theta, moments)

        def step(self, g, state, t=0):
            out = rule.step(g, state, t)
            weights.append(float(rule.last_weights[:, 0].mean()))
            return out

    losses, _ = student_trajectory(problem, Recording(), seed, steps, WARMUP, WARMUP_LR)
    assert len(weights) == steps and all(math.isfinite(v) for v in losses)
    return sum(weights) / len(weights)


def test_choice_learns_to_choose_the_useful_teacher(mlp):
    """adam at 0.01 makes progress, sgd at 1e-6 does nothing: trained on meta loss alone
    (scheme none, no teachers), the choice optimizer must put its weight on adam.
    Random scaling off; meta_lr 1e-2 so that a few dozen meta-iterations suffice."""
    torch.manual_seed(0)
    net = ChoiceNet(2)

    def factory(params, noise, gen):
        return Choice(net, ("adam", "sgd"), (0.01, 1e-6), mlp.tensor_ndim, params)

    before = mean_adam_weight(mlp, factory(None, 0.0, None), HELD_OUT_SEED, 30)
    trainer = MetaTrainer(mlp, net, factory, [], settings(meta_lr=1e-2), seed=1)
    rows = train(trainer, 15, 20, 0.0)   # 30 meta-iterations
    assert not any(r["skipped"] for r in rows)
    after = mean_adam_weight(mlp, factory(None, 0.0, None), HELD_OUT_SEED, 30)
    # Measured: before 0.576 (softmax of a near-zero head), after 0.988.
    assert before < 0.65, before
    assert after >= 0.8, (before, after)


# --------------------------------------------------------------------------- 3. meta loss
def test_meta_training_lowers_the_optimizee_loss(mlp):
    """RNNProp, scheme none, first-order meta-gradient, random scaling off, default meta_lr."""
    torch.manual_seed(0)
    net = RNNPropNet()
    untrained = copy.deepcopy(net)
    trainer = MetaTrainer(mlp, net, rnnprop_factory(net), [], settings(), seed=1)
    rows = train(trainer, 15, 20, 0.0)
    assert not any(r["skipped"] for r in rows)

    def final_loss(n):
        with torch.no_grad():
            losses, _ = student_trajectory(mlp, RNNProp(n), HELD_OUT_SEED, 40, WARMUP, WARMUP_LR)
        return sum(losses[-5:]) / 5

    before, after = final_loss(untrained), final_loss(net)
    # Measured: untrained 2.30 (no progress from the warm start), trained 1.02.
    assert after < before - 0.5, (before, after)


# --------------------------------------------------------------------------- 4. perturbations
def _params(requires_grad=True):
    g = torch.Generator().manual_seed(5)
    ps = {"a": torch.randn(4000, generator=g) * 3.0,
          "b": torch.randn(60, 50, generator=g) * 0.01,
          "c": torch.rand(2000, generator=g) + 5.0}          # far from zero mean
    return {k: v.requires_grad_(requires_grad) for k, v in ps.items()}


def test_random_perturbation_statistics_and_gradient():
    params = _params()
    sigma = 1e-2
    gen = torch.Generator().manual_seed(11)
    out = random_perturbation(params, sigma, gen)
    for k, w in params.items():
        n = w.numel()
        noise = (out[k] - w).detach().reshape(-1).double()
        expected = sigma * float(w.detach().norm()) / math.sqrt(n)    # Eq. 5
        # The sample SD of n iid normals has relative standard error 1/√(2(n−1)); allow 5 SE.
        rel_tol = 5.0 / math.sqrt(2 * (n - 1))
        assert abs(float(noise.std()) / expected - 1.0) < rel_tol, (k, float(noise.std()), expected)
        # Zero mean: the sample mean has SE expected/√n; allow 5 SE.
        assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n), k
    # The three tensors get very different absolute noise levels (norms differ by ~10⁴).
    stds = [float((out[k] - params[k]).detach().std()) for k in params]
    assert max(stds) / min(stds) > 100

    # Differentiable w.r.t. φ, and the per-tensor norm is a constant: d(sum)/dφ = 1.
    total = sum(v.sum() for v in out.values())
    grads = torch.autograd.grad(total, list(params.values()))
    for g in grads:
        assert torch.equal(g, torch.ones_like(g))

    # Fresh each call.
    again = random_perturbation(params, sigma, gen)
    assert not torch.equal(again["a"], out["a"])
    # σ = 0: no perturbation.
    zero = random_perturbation(params, 0.0, gen)
    assert all(torch.equal(zero[k], params[k]) for k in params)


def test_pgd_step_moves_by_eps_norm_along_the_gradient():
    params = _params()
    eps = 1e-3
    g = torch.Generator().manual_seed(3)
    grads = {"a": torch.randn(4000, generator=g), "b": torch.randn(60, 50, generator=g) * 1e-6,
             "c": torch.zeros(2000)}
    psi0 = {k: torch.zeros_like(v) for k, v in params.items()}
    psi = pgd_step(psi0, grads, params, eps)
    for k in ("a", "b"):
        step_norm = float(psi[k].norm())
        assert step_norm == pytest.approx(eps * float(params[k].detach().norm()), rel=1e-5)
        direction = grads[k] / grads[k].norm()
        assert torch.allclose(psi[k] / psi[k].norm(), direction, atol=1e-6)
        assert not psi[k].requires_grad
    assert torch.equal(psi["c"], torch.zeros(2000))        # zero gradient: no move
    # From a non-zero ψ, a zero gradient leaves ψ where it was; others add up.
    psi2 = pgd_step(psi, grads, params, eps)
    assert torch.equal(psi2["c"], psi["c"])
    assert torch.allclose(psi2["a"], 2 * psi["a"], rtol=1e-6)


# --------------------------------------------------------------------------- 5. meta-gradient
@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_full_meta_gradient_matches_finite_differences(float64):
    g = torch.Generator().manual_seed(0)
    ds = Dataset("tiny", torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g),
                 torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g), 3)
    torch.manual_seed(0)
    problem = Problem("tiny", nn.Linear(4, 3), ds, batch_size=16)
    net = RNNPropNet()
    assert next(net.parameters()).dtype == torch.float64
    s = settings(unrolls=(6,), truncation=6, meta_gradient="full", warmup_steps=3, warmup_lr=0.1)
    trainer = MetaTrainer(problem, net, rnnprop_factory(net), [], s, seed=0)
    traj = trainer._new_trajectory()
    assert traj.theta.dtype == torch.float64
    batches = [next(traj.stream) for _ in range(6)]
    with torch.no_grad():
        starts = [problem.loss(traj.theta * traj.scale, b.x, b.y) for b in batches]

    def loss():
        return trainer._truncation_loss(traj, batches, starts, None, 0.0, lambda *_: None, 0.0)[0]

    params = dict(net.named_parameters())
    full = torch.autograd.grad(loss(), list(params.values()))
    s.meta_gradient = "first-order"
    first = torch.autograd.grad(loss(), list(params.values()))
    s.meta_gradient = "full"

    h = 1e-6
    fd, an, fo = [], [], []
    for (name, w), g_full, g_fo in zip(params.items(), full, first):
        for idx in (0, w.numel() // 2, w.numel() - 1):
            with torch.no_grad():
                w.view(-1)[idx] += h
            lp = loss().item()
            with torch.no_grad():
                w.view(-1)[idx] -= 2 * h
            lm = loss().item()
            with torch.no_grad():
                w.view(-1)[idx] += h
            fd.append((lp - lm) / (2 * h))
            an.append(g_full.view(-1)[idx].item())
            fo.append(g_fo.view(-1)[idx].item())
    fd, an, fo = map(torch.tensor, (fd, an, fo))
    # Central differences in float64 with h = 1e-6: rounding error ≈ 1e-16·|L|/h ≈ 1e-12
    # (|L| ≈ 3e-3), truncation error O(h²). Measured max |fd − full| 6e-11 against
    # gradients of 1e-7..5e-3; allow 1e-9 absolute + 1e-6 relative.
    assert torch.allclose(an, fd, rtol=1e-6, atol=1e-9), (an - fd).abs().max()
    # First-order drops the second-order term: measured ‖fd − first‖ 8.2e-7 against
    # ‖fd − full‖ 1.6e-10 on these coordinates. It must be clearly worse.
    assert float((fo - fd).norm()) > 100 * float((an - fd).norm())
    flat = lambda gs: torch.cat([x.reshape(-1) for x in gs])
    assert float((flat(full) - flat(first)).norm() / flat(full).norm()) > 1e-5


# --------------------------------------------------------------------------- 6. teachers
def test_teacher_trajectories_hold_no_autograd_graph(mlp):
    torch.manual_seed(0)
    net = RNNPropNet()
    # Teachers that *could* build a graph if run with autograd on: a rate that requires
    # grad, and a choice optimizer whose weights require grad.
    lr = torch.tensor(0.01, requires_grad=True)
    cnet = ChoiceNet(2)
    choice = Choice(cnet, ("adam", "sgd"), (0.01, 0.1), mlp.tensor_ndim)
    teachers = [Teacher("adam", 0.01), Teacher("rmsprop", lr), choice]
    trainer = MetaTrainer(mlp, net, rnnprop_factory(net), teachers,
                          settings(scheme="mean", alphas=(0.2,), random_scaling=True), seed=2)
    traj = trainer._new_trajectory()
    for _ in range(2):
        row = trainer.truncation_step([traj], 0.2)
        assert not row["skipped"] and math.isfinite(row["distill_loss"])
    batches = [next(traj.stream) for _ in range(3)]
    targets = trainer._advance_teachers(traj, batches)
    assert targets.shape == (3, 3, mlp.n_params)
    assert not targets.requires_grad and targets.grad_fn is None
    found = list(tensors_of(traj.teacher_thetas)) + list(tensors_of(traj.teacher_states))
    assert len(found) >= 3 + 2 + 2 + 2 + 4    # thetas, moments ×3, choice LSTM state
    for t in found:
        assert not t.requires_grad and t.grad_fn is None
    # The teachers did move (their trajectories are real, just graph-free).
    assert not torch.equal(traj.teacher_thetas[0], traj.teacher_thetas[1])


# --------------------------------------------------------------------------- 7. losses
def test_distill_distance_by_hand():
    student = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    teachers = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 1.0]], dtype=torch.float64)
    d = distill_distance(student, teachers)
    expected = [math.log(0.0 + 1e-10) - math.log(3),
                math.log(0.5 * 14 + 1e-10) - math.log(3),
                math.log(0.5 * (1 + 0 + 4) + 1e-10) - math.log(3)]
    assert EPS == 1e-10
    assert d.shape == (3,)
    assert d.tolist() == pytest.approx(expected, rel=1e-12)


def test_reduce_teachers_by_scheme():
    d = torch.tensor([-3.0, 1.5, -0.5])
    assert float(reduce_teachers(d, "mean")) == pytest.approx(-2.0 / 3)
    assert float(reduce_teachers(d, "minmax")) == 1.5
    assert float(reduce_teachers(d, "choice")) == -3.0
    with pytest.raises(OptamalError, match="scheme"):
        reduce_teachers(d, "median")


def test_meta_term_sign():
    start = torch.tensor(2.0, dtype=torch.float64)
    lower = meta_term(torch.tensor(1.0, dtype=torch.float64), start)
    assert float(lower) == pytest.approx(math.log(1.0 + 1e-10) - math.log(2.0 + 1e-10))
    assert float(lower) < 0
    assert float(meta_term(torch.tensor(4.0), torch.tensor(2.0))) > 0
    assert float(meta_term(start, start)) == 0.0


# --------------------------------------------------------------------------- 8. divergence
class Poison:
    """A rule factory around RNNProp whose updates turn NaN while ``on``."""

    def __init__(self, net, mode="update"):
        self.net, self.on, self.mode = net, True, mode

    def __call__(self, params, noise, gen):
        inner = RNNProp(self.net, params, noise, gen)
        poison = self

        class Rule:
            def init(self, theta, moments=None):
                return inner.init(theta, moments)

            def step(self, g, state, t=0):
                u, state = inner.step(g, state, t)
                if poison.on and poison.mode == "update":
                    u = u * float("nan")
                elif poison.on and poison.mode == "gradient":
                    # finite forward, NaN backward: d√x/dx at 0 is inf, times 0 is NaN
                    u = u + 0.0 * torch.sqrt(u * 0.0)
                return u, state

        return Rule()


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_non_finite_iterations_are_skipped_then_replicate_diverges(mlp, mode):
    torch.manual_seed(0)
    net = RNNPropNet()
    poison = Poison(net, mode)
    trainer = MetaTrainer(mlp, net, poison, [], settings(max_bad_steps=3), seed=3)
    w0 = _weights(net)
    for k in (1, 2):
        rows = trainer.meta_epoch_run(0, 20, 0.0)
        assert len(rows) == 1                      # the poisoned trajectory is abandoned
        row = rows[0]
        assert row["skipped"] is True and row["divergence_events"] == k
        if mode == "update":
            assert not math.isfinite(row["total_loss"])
        else:
            assert math.isfinite(row["total_loss"]) and not math.isfinite(row["grad_norm"])
        assert trainer.divergence_events == k and trainer.bad_in_row == k
        now = _weights(net)
        assert all(torch.equal(now[n], w0[n]) and bool(torch.isfinite(now[n]).all()) for n in now)
        assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ReplicateDiverged, match="3 non-finite"):
        trainer.meta_epoch_run(0, 20, 0.0)
    assert trainer.divergence_events == 3
    now = _weights(net)
    assert all(torch.equal(now[n], w0[n]) for n in now)


def test_a_good_iteration_resets_the_bad_streak(mlp):
    torch.manual_seed(0)
    net = RNNPropNet()
    poison = Poison(net)
    trainer = MetaTrainer(mlp, net, poison, [], settings(max_bad_steps=3), seed=3)
    w0 = _weights(net)
    for _ in range(2):
        trainer.meta_epoch_run(0, 20, 0.0)
    poison.on = False
    rows = trainer.meta_epoch_run(0, 20, 0.0)
    assert [r["skipped"] for r in rows] == [False, False]
    assert trainer.bad_in_row == 0 and trainer.divergence_events == 2
    assert any(not torch.equal(v, w0[k]) for k, v in _weights(net).items())
    poison.on = True
    for _ in range(2):                              # two more bad ones: still under 3 in a row
        trainer.meta_epoch_run(0, 20, 0.0)
    assert trainer.bad_in_row == 2 and trainer.divergence_events == 4


def test_save_policy_refuses_non_finite_weights(tmp_path):
    net = RNNPropNet()
    with torch.no_grad():
        net.head.bias.fill_(float("nan"))
    with pytest.raises(OptamalError, match="not finite"):
        save_policy(tmp_path / "policy.pt", net, {"kind": "rnnprop"})
    assert not (tmp_path / "policy.pt").exists()


def _distill_cfg(tmp_path, mnist5k_root, **kw):
    from optamal.config import DistillConfig

    over = dict(scheme="none", problem="mlp", runs_dir=str(tmp_path / "runs"),
                data_root=str(mnist5k_root), max_train=256, max_bad_steps=2, name="d")
    over.update(kw)
    return DistillConfig.build("smoke", over)


def _poison_build_net(monkeypatch, poisoned: set[int]) -> list:
    """Wrap ``optamal.policies.build_net`` (how distill builds its students): the nets built
    at the given positions output NaN (their weights stay finite)."""
    import optamal.policies as policies

    original = policies.build_net
    built = []

    def build_net(header):
        net = original(header)
        net.nan = len(built) in poisoned
        if net.nan:
            net.register_forward_hook(lambda m, inp, out: (out[0] * float("nan"), *out[1:]))
        built.append(net)
        return net

    monkeypatch.setattr(policies, "build_net", build_net)
    return built


def test_distill_marks_a_diverging_replicate(tmp_path, mnist5k_root, monkeypatch):
    from optamal.commands.distill import distill
    from optamal.policies import load_policy

    built = _poison_build_net(monkeypatch, {0})
    run = distill(_distill_cfg(tmp_path, mnist5k_root, replicates=2))
    assert len(built) == 2 and built[0].nan and not built[1].nan
    man = json.loads((run.path / "manifest.json").read_text())
    assert man["status"] == "completed"
    reps = man["replicates"]
    assert reps["0"]["status"] == "diverged" and "non-finite" in reps["0"]["error"]
    assert reps["0"]["best_validation"] is None and reps["0"]["divergence_events"] == 2
    assert reps["1"]["status"] == "completed" and math.isfinite(reps["1"]["best_validation"])
    assert man["best_replicate"] == 1
    assert not (run.path / "replicate-0" / "policy.pt").exists()
    meta = pd.read_csv(run.path / "replicate-0" / "meta.csv")
    assert len(meta) >= 1 and meta.skipped.all()
    assert list(meta.divergence_events) == list(range(1, len(meta) + 1))
    net, header = load_policy(run.path / "replicate-1" / "policy.pt")
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    # The diverged replicate's weights stayed finite (skipped updates), but were never saved.
    assert all(bool(torch.isfinite(p).all()) for p in built[0].parameters())


def test_distill_fails_when_every_replicate_diverges(tmp_path, mnist5k_root, monkeypatch):
    from optamal.commands.distill import distill

    _poison_build_net(monkeypatch, {0})
    with pytest.raises(OptamalError, match="every replicate diverged"):
        distill(_distill_cfg(tmp_path, mnist5k_root))
    path = tmp_path / "runs" / "distill" / "d"
    man = json.loads((path / "manifest.json").read_text())
    assert man["status"] == "failed" and man["replicates"]["0"]["status"] == "diverged"
    assert list(path.rglob("policy.pt")) == []


def test_diverged_replicate_meta_csv_records_every_event(tmp_path, mnist5k_root, monkeypatch):
    from optamal.commands.distill import distill

    _poison_build_net(monkeypatch, {0})
    with pytest.raises(OptamalError):
        distill(_distill_cfg(tmp_path, mnist5k_root))
    meta = pd.read_csv(tmp_path / "runs" / "distill" / "d" / "replicate-0" / "meta.csv")
    assert list(meta.divergence_events) == [1, 2]
