"""The analytical teacher pool (METHOD.md §1–§2, paper Table 3).

Each teacher is a pure rule on flat tensors. Moments are per coordinate, zero at
start, β1 = 0.9, β2 = 0.999, with the *constant* hat correction of the reference
implementation: m̂ = m / (1 − β1), v̂ = v / (1 − β2), n = √(v̂ + ε), ε = 1e-10.
These are the paper's forms, deliberately distinct from ``torch.optim.Adam``.

The body of each update mirrors one line of the table:

=========  ============================================
sgd        lr · g
momentum   lr · m̂
rmsprop    lr · g / n
adam       lr · m̂ / n
addsign    lr · g · (1 + tanh(m̂/n)·tanh(g/n))
powersign  lr · g · exp(tanh(m̂/n)·tanh(g/n))
=========  ============================================

Every function is written for tensors of any shape, so the same code drives one
trajectory ``(N,)`` or K stacked ones ``(K, N)`` (``lr`` then broadcasts as ``(K, 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-10

TEACHERS = ("sgd", "momentum", "rmsprop", "adam", "addsign", "powersign")
POOL_MEMBERS = {"small": ("adam", "rmsprop"), "large": TEACHERS}

#: *ref* default rates, used when no tuned rates exist (``--lrs paper``).
PAPER_LRS = {"sgd": 0.2, "momentum": 0.5, "adam": 0.005, "rmsprop": 0.005,
             "addsign": 0.1, "powersign": 0.1}

#: *ref* choice-pool rates (METHOD §4); stored as multipliers of the tuned rate, so
#: ``choice rate = tuned rate × multiplier`` and equals the reference at paper rates.
CHOICE_LRS = {"sgd": 2.0, "momentum": 2.0, "adam": 0.02, "rmsprop": 0.005,
              "addsign": 1.0, "powersign": 1.0}
CHOICE_MULTIPLIERS = {k: CHOICE_LRS[k] / PAPER_LRS[k] for k in TEACHERS}


class Moments(NamedTuple):
    """First and second moment, shaped like theta."""

    m: torch.Tensor
    v: torch.Tensor


def init_moments(theta: torch.Tensor) -> Moments:
    return Moments(torch.zeros_like(theta), torch.zeros_like(theta))


def update_moments(moments: Moments, g: torch.Tensor) -> Moments:
    """m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²."""
    m = BETA1 * moments.m + (1.0 - BETA1) * g
    v = BETA2 * moments.v + (1.0 - BETA2) * g * g
    return Moments(m, v)


def hat(moments: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """(m̂, n) with the constant correction and n = √(v̂ + ε)."""
    m_hat = moments.m / (1.0 - BETA1)
    n = torch.sqrt(moments.v / (1.0 - BETA2) + EPS)
    return m_hat, n


# Direction functions: d(g, m̂, n); the update is lr · d.
def _sgd(g, m_hat, n):
    return g


def _momentum(g, m_hat, n):
    return m_hat


def _rmsprop(g, m_hat, n):
    return g / n


def _adam(g, m_hat, n):
    return m_hat / n


def _addsign(g, m_hat, n):
    return g * (1.0 + torch.tanh(m_hat / n) * torch.tanh(g / n))


def _powersign(g, m_hat, n):
    return g * torch.exp(torch.tanh(m_hat / n) * torch.tanh(g / n))


DIRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sgd": _sgd, "momentum": _momentum, "rmsprop": _rmsprop,
    "adam": _adam, "addsign": _addsign, "powersign": _powersign,
}


@dataclass(frozen=True)
class Teacher:
    """One analytical rule with its learning rate, as an ``(init, step)`` pair."""

    name: str
    lr: float | torch.Tensor

    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> Moments:
        return moments if moments is not None else init_moments(theta)

    def step(self, grad: torch.Tensor, state: Moments, t: int = 0) -> tuple[torch.Tensor, Moments]:
        state = update_moments(state, grad)
        m_hat, n = hat(state)
        return self.lr * DIRECTIONS[self.name](grad, m_hat, n), state


def teacher_directions(names: tuple[str, ...] | list[str], grad: torch.Tensor,
                       moments: Moments) -> torch.Tensor:
    """Directions of several teachers sharing one gradient and moments: (K, *grad.shape).

    Used by the choice optimizer, whose inputs are every teacher's proposal for the
    same point (the moments are updated by the caller)."""
    m_hat, n = hat(moments)
    return torch.stack([DIRECTIONS[k](grad, m_hat, n) for k in names])


def pool_members(pool: str) -> tuple[str, ...]:
    return POOL_MEMBERS[pool]
