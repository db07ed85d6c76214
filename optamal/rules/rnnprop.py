"""RNNProp, the student (METHOD.md §3; Lv et al. 2017).

Per coordinate: inputs [m̂/n, g/n] → LSTM(20) → LSTM(20) → Linear(1) → u = 0.1·tanh(·).
The same weights serve every coordinate. As a rule: ``init(theta, moments)`` and
``step(grad, state, t) -> (update, state)``; differentiable in the weights during
meta-training and run under ``torch.no_grad`` at evaluation — one code path.

Random scaling (training only) lives in the meta-trainer: the rule just sees gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from optamal.rules.lstm import CoordinateLSTM, LSTMState, run_net
from optamal.rules.teachers import Moments, hat, init_moments, update_moments

OUTPUT_SCALE = 0.1   # *ref*: u = 0.1·tanh(·)


class RNNPropState(NamedTuple):
    moments: Moments
    lstm: LSTMState


class RNNPropNet(CoordinateLSTM):
    def __init__(self, hidden: int = 20):
        super().__init__(in_dim=2, out_dim=1, hidden=hidden)


class RNNProp:
    """The RNNProp update rule over a flat vector.

    ``params`` replaces the net's weights (perturbed weights during meta-training);
    ``input_noise`` adds N(0, σ²) to the gradient the rule sees (Eq. 11)."""

    kind = "rnnprop"

    def __init__(self, net: RNNPropNet, params: dict[str, torch.Tensor] | None = None,
                 input_noise: float = 0.0, generator: torch.Generator | None = None):
        self.net, self.params = net, params
        self.input_noise, self.generator = input_noise, generator

    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> RNNPropState:
        moments = moments if moments is not None else init_moments(theta)
        return RNNPropState(moments, self.net.zero_state(theta.numel(), theta))

    def step(self, grad: torch.Tensor, state: RNNPropState, t: int = 0) -> tuple[torch.Tensor, RNNPropState]:
        if self.input_noise > 0:
            noise = torch.randn(grad.shape, generator=self.generator, device="cpu").to(grad)
            grad = grad + self.input_noise * noise
        moments = update_moments(state.moments, grad)
        m_hat, n = hat(moments)
        x = torch.stack([m_hat / n, grad / n], dim=-1)
        out, lstm = run_net(self.net, self.params, x, state.lstm)
        update = OUTPUT_SCALE * torch.tanh(out.squeeze(-1))
        return update, RNNPropState(moments, lstm)
