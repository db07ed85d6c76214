"""The choice optimizer (METHOD.md §4; paper Section 3.3).

Per coordinate, inputs: every teacher's update u_k (its learning rate applied), the
time feature t/2000, and a one-hot of the coordinate's tensor ndim → LSTM(20) →
LSTM(20) → Linear(K) → softmax weights c (c ≥ 0, Σc = 1) → u = Σ_k c_k·u_k.

*fix*: the ndim one-hot has a slot for every ndim 1–4 (biases, dense kernels, and conv
kernels; the reference encodes only 1–3), so conv kernels get their own slot.
The teachers share the moments of the choice optimizer's own gradient sequence.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from optamal.errors import OptamalError
from optamal.rules.lstm import CoordinateLSTM, LSTMState, run_net
from optamal.rules.teachers import Moments, init_moments, teacher_directions, update_moments

NDIM_SLOTS = (1, 2, 3, 4)
TIME_SCALE = 2000.0   # *ref*: time feature t / 2000


class ChoiceState(NamedTuple):
    moments: Moments
    lstm: LSTMState


class ChoiceNet(CoordinateLSTM):
    def __init__(self, n_teachers: int, hidden: int = 20):
        super().__init__(in_dim=n_teachers + 1 + len(NDIM_SLOTS), out_dim=n_teachers, hidden=hidden)


def ndim_onehot(tensor_ndim: torch.Tensor) -> torch.Tensor:
    """(N, 4) one-hot of each coordinate's tensor ndim (1, 2, 3 or 4)."""
    bad = tensor_ndim[(tensor_ndim < 1) | (tensor_ndim > len(NDIM_SLOTS))]
    if bad.numel():
        raise OptamalError(f"the choice optimizer handles tensors of ndim 1–4, got ndim {int(bad[0])}")
    return F.one_hot(tensor_ndim - 1, len(NDIM_SLOTS)).float()


class Choice:
    """The choice rule: a learned softmax mixture of the teachers' proposals."""

    kind = "choice"

    def __init__(self, net: ChoiceNet, teachers: Sequence[str], lrs: Sequence[float],
                 tensor_ndim: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        if len(teachers) != net.out_dim:
            raise OptamalError(f"choice network has {net.out_dim} outputs but {len(teachers)} teachers")
        self.net, self.params = net, params
        self.teachers = tuple(teachers)
        self.lrs = torch.tensor([float(x) for x in lrs], dtype=torch.float32)
        self.onehot = ndim_onehot(tensor_ndim)
        self.last_weights: torch.Tensor | None = None   # (N, K) choice weights of the last step

    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> ChoiceState:
        moments = moments if moments is not None else init_moments(theta)
        return ChoiceState(moments, self.net.zero_state(theta.numel(), theta))

    def step(self, grad: torch.Tensor, state: ChoiceState, t: int = 0) -> tuple[torch.Tensor, ChoiceState]:
        moments = update_moments(state.moments, grad)
        proposals = teacher_directions(self.teachers, grad, moments) * self.lrs.to(grad)[:, None]
        proposals = proposals.T                                   # (N, K), lr applied
        time = torch.full_like(grad, t / TIME_SCALE)[:, None]
        x = torch.cat([proposals, time, self.onehot.to(grad)], dim=-1)
        logits, lstm = run_net(self.net, self.params, x, state.lstm)
        weights = torch.softmax(logits, dim=-1)
        self.last_weights = weights.detach()
        return (weights * proposals).sum(-1), ChoiceState(moments, lstm)
