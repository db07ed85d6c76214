"""Meta loss and distillation distance (METHOD.md §5).

- Meta loss, per step: log M(x_t, θ_t) − log M(x_t, θ_start), θ_start the truncation's
  starting point evaluated on the same batch (*ref*); averaged over the steps.
- Distillation distance, per step and teacher, in the student's scaled space θ':
  d_T = log(½‖θ'_P − θ'_T‖² + ε) − log N.
- Schemes: mean (Eq. 2) averages d over teachers, minmax (Eq. 3) takes the max, choice
  (Eq. 4) has one teacher (the trained choice optimizer), none has no distillation term.
"""

from __future__ import annotations

import math

import torch

from optamal.errors import choice_error

EPS = 1e-10
SCHEMES = ("mean", "minmax", "choice", "none")


def meta_term(loss: torch.Tensor, loss_start: torch.Tensor) -> torch.Tensor:
    return torch.log(loss + EPS) - torch.log(loss_start + EPS)


def distill_distance(student: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
    """d per teacher: ``student`` (N,), ``teachers`` (K, N) → (K,)."""
    n = student.shape[-1]
    sq = 0.5 * ((student.unsqueeze(0) - teachers) ** 2).sum(-1)
    return torch.log(sq + EPS) - math.log(n)


def reduce_teachers(d: torch.Tensor, scheme: str) -> torch.Tensor:
    """Combine per-teacher distances by scheme: mean (Eq. 2), max (Eq. 3), the one (Eq. 4)."""
    if scheme == "mean":
        return d.mean()
    if scheme == "minmax":
        return d.max()
    if scheme == "choice":
        return d[0]
    raise choice_error("scheme", scheme, SCHEMES)
