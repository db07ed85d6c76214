"""The six analytical teachers against their METHOD.md §2 equations.

Every reference below is re-implemented here with plain NumPy loops over coordinates,
independent of optamal's code: m, v EMAs with β1 = 0.9, β2 = 0.999, the *constant*
hat correction m̂ = m/(1−β1), v̂ = v/(1−β2), and n = √(v̂ + 1e-10).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optamal.rules.teachers import (PAPER_LRS, POOL_MEMBERS, TEACHERS, Moments, Teacher,
                                    init_moments, pool_members, teacher_directions,
                                    update_moments)

B1, B2, EPS = 0.9, 0.999, 1e-10
N, STEPS = 50, 25
LR = 0.037


def _grad_sequence(seed: int = 0, steps: int = STEPS, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Varied magnitudes (and some sign flips) so tanh terms are not saturated everywhere.
    scale = np.exp(rng.uniform(-4, 2, size=n))
    return rng.standard_normal((steps, n)) * scale


def _reference_updates(name: str, grads: np.ndarray, lr: float) -> np.ndarray:
    """METHOD §2, coordinate by coordinate, step by step, with Python floats."""
    steps, n = grads.shape
    m = [0.0] * n
    v = [0.0] * n
    out = np.zeros_like(grads)
    for t in range(steps):
        for i in range(n):
            g = float(grads[t, i])
            m[i] = B1 * m[i] + (1 - B1) * g
            v[i] = B2 * v[i] + (1 - B2) * g * g
            m_hat = m[i] / (1 - B1)
            v_hat = v[i] / (1 - B2)
            nn_ = math.sqrt(v_hat + EPS)
            if name == "sgd":
                u = lr * g
            elif name == "momentum":
                u = lr * m_hat
            elif name == "rmsprop":
                u = lr * g / nn_
            elif name == "adam":
                u = lr * m_hat / nn_
            elif name == "addsign":
                u = lr * g * (1 + math.tanh(m_hat / nn_) * math.tanh(g / nn_))
            elif name == "powersign":
                u = lr * g * math.exp(math.tanh(m_hat / nn_) * math.tanh(g / nn_))
            else:  # pragma: no cover
                raise AssertionError(name)
            out[t, i] = u
    return out


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_matches_equation(name):
    grads = _grad_sequence(seed=TEACHERS.index(name))
    expected = _reference_updates(name, grads, LR)
    teacher = Teacher(name, LR)
    theta = torch.zeros(N, dtype=torch.float64)
    state = teacher.init(theta)
    assert state.m.dtype == torch.float64 and state.m.shape == (N,)
    for t in range(STEPS):
        g = torch.from_numpy(grads[t])
        u, state = teacher.step(g, state, t)
        assert u.shape == (N,) and u.dtype == torch.float64
        np.testing.assert_allclose(u.numpy(), expected[t], rtol=1e-12, atol=1e-15,
                                   err_msg=f"{name} step {t}")


def test_moments_are_the_constant_correction_not_adam_bias_correction():
    # After one step with g, m̂ = g and v̂ = g² exactly (constant correction), so adam's
    # update is lr·g/√(g²+ε) ≈ lr·sign(g); after two equal steps the constant correction
    # gives m̂ = 1.9·g (Adam's step-dependent correction would give exactly g).
    g = torch.tensor([0.5, -2.0, 3e-3], dtype=torch.float64)
    t = Teacher("momentum", 1.0)
    s = t.init(g)
    u1, s = t.step(g, s)
    np.testing.assert_allclose(u1.numpy(), g.numpy(), rtol=1e-14)
    u2, s = t.step(g, s)
    np.testing.assert_allclose(u2.numpy(), 1.9 * g.numpy(), rtol=1e-14)
    a = Teacher("adam", 1.0)
    u, _ = a.step(g, a.init(g))
    np.testing.assert_allclose(u.numpy(), g.numpy() / np.sqrt(g.numpy() ** 2 + 1e-10), rtol=1e-12)


def test_sgd_trajectory_equals_torch_sgd():
    lr = 0.05
    grads = _grad_sequence(seed=11)
    theta0 = np.random.default_rng(3).standard_normal(N)

    # optamal: θ ← θ − u with u = lr·g.
    teacher = Teacher("sgd", lr)
    theta = torch.from_numpy(theta0.copy())
    state = teacher.init(theta)
    ours = []
    for t in range(STEPS):
        u, state = teacher.step(torch.from_numpy(grads[t]), state, t)
        theta = theta - u
        ours.append(theta.clone())

    # torch.optim.SGD on the same gradient sequence.
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.SGD([p], lr=lr)
    for t in range(STEPS):
        p.grad = torch.from_numpy(grads[t]).clone()
        opt.step()
        np.testing.assert_allclose(ours[t].numpy(), p.detach().numpy(), rtol=0, atol=1e-14)


def test_sgd_trajectory_equals_torch_sgd_on_a_quadratic():
    # Gradients that depend on the trajectory: f(θ) = ½ θᵀ A θ − bᵀθ.
    rng = np.random.default_rng(5)
    q = rng.standard_normal((N, N))
    A = torch.from_numpy(q @ q.T / N + np.eye(N))
    b = torch.from_numpy(rng.standard_normal(N))
    theta0 = torch.from_numpy(rng.standard_normal(N))
    lr = 0.1

    teacher = Teacher("sgd", lr)
    theta, state = theta0.clone(), teacher.init(theta0)
    p = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([p], lr=lr)
    for t in range(30):
        u, state = teacher.step(A @ theta - b, state, t)
        theta = theta - u
        opt.zero_grad()
        (0.5 * p @ A @ p - b @ p).backward()
        opt.step()
        torch.testing.assert_close(theta, p.detach(), rtol=1e-12, atol=1e-12)


def test_pools():
    assert set(pool_members("small")) == {"adam", "rmsprop"}
    assert len(pool_members("small")) == 2
    assert set(pool_members("large")) == {"sgd", "momentum", "rmsprop", "adam", "addsign",
                                          "powersign"}
    assert len(pool_members("large")) == 6
    assert set(POOL_MEMBERS) == {"small", "large"}
    # METHOD §2 *ref* default rates.
    assert PAPER_LRS == {"sgd": 0.2, "momentum": 0.5, "adam": 0.005, "rmsprop": 0.005,
                         "addsign": 0.1, "powersign": 0.1}


@pytest.mark.parametrize("name", TEACHERS)
def test_step_broadcasts_k_learning_rates(name):
    K = 4
    lrs = torch.tensor([1e-3, 1e-2, 0.1, 1.0], dtype=torch.float64)
    rng = np.random.default_rng(100 + TEACHERS.index(name))
    grads = torch.from_numpy(rng.standard_normal((STEPS, K, N)) * 0.3)

    batched = Teacher(name, lrs.reshape(K, 1))
    state = batched.init(torch.zeros(K, N, dtype=torch.float64))
    singles = [Teacher(name, float(lrs[k])) for k in range(K)]
    s_states = [s.init(torch.zeros(N, dtype=torch.float64)) for s in singles]
    for t in range(STEPS):
        u, state = batched.step(grads[t], state, t)
        assert u.shape == (K, N)
        for k in range(K):
            uk, s_states[k] = singles[k].step(grads[t, k], s_states[k], t)
            torch.testing.assert_close(u[k], uk, rtol=1e-13, atol=1e-16)
            torch.testing.assert_close(state.m[k], s_states[k].m, rtol=0, atol=0)
            torch.testing.assert_close(state.v[k], s_states[k].v, rtol=0, atol=0)


def test_teacher_directions_match_individual_teachers():
    rng = np.random.default_rng(9)
    moments = init_moments(torch.zeros(N, dtype=torch.float64))
    for t in range(STEPS):
        g = torch.from_numpy(rng.standard_normal(N) * np.exp(rng.uniform(-3, 1, N)))
        before = Moments(moments.m.clone(), moments.v.clone())
        moments = update_moments(moments, g)
        dirs = teacher_directions(list(TEACHERS), g, moments)
        assert dirs.shape == (len(TEACHERS), N)
        for k, name in enumerate(TEACHERS):
            u, _ = Teacher(name, 1.0).step(g, before, t)
            torch.testing.assert_close(dirs[k], u, rtol=1e-14, atol=0)
        # A subset keeps its order.
        sub = teacher_directions(("rmsprop", "adam"), g, moments)
        torch.testing.assert_close(sub[0], dirs[TEACHERS.index("rmsprop")], rtol=0, atol=0)
        torch.testing.assert_close(sub[1], dirs[TEACHERS.index("adam")], rtol=0, atol=0)


def test_teacher_directions_against_equation():
    grads = _grad_sequence(seed=21)
    moments = init_moments(torch.zeros(N, dtype=torch.float64))
    expected = {k: _reference_updates(k, grads, 1.0) for k in TEACHERS}
    for t in range(STEPS):
        g = torch.from_numpy(grads[t])
        moments = update_moments(moments, g)
        dirs = teacher_directions(TEACHERS, g, moments)
        for k, name in enumerate(TEACHERS):
            np.testing.assert_allclose(dirs[k].numpy(), expected[name][t], rtol=1e-12, atol=1e-15)
