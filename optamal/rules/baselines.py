"""Learned baselines trained by the same meta-trainer (METHOD §9).

- ``dm`` — "Original" L2O-DM (Andrychowicz et al. 2016): the raw gradient → LSTM(20) →
  LSTM(20) → Linear(1), update = 0.1·output (no squashing).
- ``scale`` — the hierarchical optimizer of Wichrowska et al. 2017: a per-coordinate GRU
  (10 units), a per-tensor GRU (5) and a global GRU (5). Each coordinate keeps gradient
  momenta and second moments at ``timescales`` time scales whose decays the network sets
  (β_g, β_λ from the coordinate state, raised to 0.5^s for scale s); its inputs are the
  scaled momenta ḡ_s/√(λ_s + ε²), the relative log gradient magnitudes
  log λ_s − mean_s log λ_s, the relative log learning rate, and the tensor and global
  states. It outputs a direction d and a log-learning-rate change Δη; the log rate is
  η = η̄ + Δη with η̄ ← γ·η̄ + (1−γ)·η (γ learned), and the step is
  exp(η)·d·√|w| / ‖d_w‖ per tensor w (so each coordinate moves by about exp(η)).
  ("RNNProp" and "Stronger Baselines" are RNNProp with scheme none / one-teacher mean.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from optamal.rules.lstm import CoordinateLSTM, LSTMState, run_net
from optamal.rules.teachers import Moments, init_moments, update_moments

DM_OUTPUT_SCALE = 0.1


class DMState(NamedTuple):
    moments: Moments      # kept for the shared warmup protocol; the DM network ignores them
    lstm: LSTMState


class DMNet(CoordinateLSTM):
    def __init__(self, hidden: int = 20):
        super().__init__(in_dim=1, out_dim=1, hidden=hidden)


class DM:
    kind = "dm"

    def __init__(self, net: DMNet, params=None, input_noise: float = 0.0, generator=None):
        self.net, self.params = net, params
        self.input_noise, self.generator = input_noise, generator

    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> DMState:
        return DMState(moments if moments is not None else init_moments(theta),
                       self.net.zero_state(theta.numel(), theta))

    def step(self, grad: torch.Tensor, state: DMState, t: int = 0):
        if self.input_noise > 0:
            grad = grad + self.input_noise * torch.randn(grad.shape, generator=self.generator).to(grad)
        moments = update_moments(state.moments, grad)
        out, lstm = run_net(self.net, self.params, grad.unsqueeze(-1), state.lstm)
        return DM_OUTPUT_SCALE * out.squeeze(-1), DMState(moments, lstm)


# ---------------------------------------------------------------------- Scale
class ScaleState(NamedTuple):
    moments: Moments
    g_bar: torch.Tensor      # (S, N) momenta
    lam: torch.Tensor        # (S, N) second moments
    eta_bar: torch.Tensor    # (N,) running log learning rate
    h_param: torch.Tensor    # (N, P)
    h_tensor: torch.Tensor   # (T, Q)
    h_global: torch.Tensor   # (1, G)


class ScaleNet(nn.Module):
    def __init__(self, param_units: int = 10, tensor_units: int = 5, global_units: int = 5,
                 timescales: int = 3, init_lr: float = 1e-3):
        super().__init__()
        self.param_units, self.tensor_units, self.global_units = param_units, tensor_units, global_units
        self.timescales, self.init_lr = timescales, init_lr
        self.hidden = param_units
        in_param = 2 * timescales + 1 + tensor_units + global_units
        self.param_rnn = nn.GRUCell(in_param, param_units)
        self.tensor_rnn = nn.GRUCell(param_units + global_units, tensor_units)
        self.global_rnn = nn.GRUCell(tensor_units, global_units)
        self.direction = nn.Linear(param_units, 1)
        self.delta_eta = nn.Linear(param_units, 1)
        self.decays = nn.Linear(param_units, 2)       # β_g, β_λ (sigmoid)
        self.gamma_logit = nn.Parameter(torch.zeros(()))
        with torch.no_grad():   # start with slow decays (β ≈ 0.9) and small rate changes
            self.decays.bias.fill_(2.2)
            self.delta_eta.weight.mul_(0.1)
            self.delta_eta.bias.zero_()

    def forward(self, grad, state: ScaleState, tensor_index, counts):
        eps = 1e-6
        S = self.timescales
        betas = torch.sigmoid(self.decays(state.h_param))            # (N, 2)
        powers = (0.5 ** torch.arange(S, dtype=grad.dtype, device=grad.device))[:, None]
        b_g = betas[:, 0][None, :] ** powers                          # (S, N)
        b_l = betas[:, 1][None, :] ** powers
        g_bar = b_g * state.g_bar + (1 - b_g) * grad[None, :]
        lam = b_l * state.lam + (1 - b_l) * grad[None, :] ** 2
        m = g_bar / torch.sqrt(lam + eps * eps)                       # scaled momenta (finite grad at λ = 0)
        log_lam = torch.log(lam + 1e-16)
        rel_mag = log_lam - log_lam.mean(0, keepdim=True)
        # learning rate (log space) and its relative value
        eta = state.eta_bar + self.delta_eta(state.h_param).squeeze(-1)
        gamma = torch.sigmoid(self.gamma_logit)
        eta_bar = gamma * state.eta_bar + (1 - gamma) * eta
        eta_rel = eta - eta.mean()
        # direction, normalised per tensor
        d = self.direction(state.h_param).squeeze(-1)
        sq = torch.zeros(counts.shape[0], dtype=d.dtype, device=d.device).index_add(0, tensor_index, d * d)
        norm = torch.sqrt(sq + eps)[tensor_index]
        update = torch.exp(eta) * d * torch.sqrt(counts[tensor_index]) / norm
        # hierarchy: coordinate → tensor → global
        n = grad.shape[0]
        x = torch.cat([m.T, rel_mag.T, eta_rel[:, None], state.h_tensor[tensor_index],
                       state.h_global.expand(n, -1)], dim=1)
        h_param = self.param_rnn(x, state.h_param)
        mean_p = torch.zeros(counts.shape[0], self.param_units, dtype=grad.dtype,
                             device=grad.device).index_add(0, tensor_index, h_param) / counts[:, None]
        h_tensor = self.tensor_rnn(torch.cat([mean_p, state.h_global.expand(counts.shape[0], -1)], 1),
                                   state.h_tensor)
        h_global = self.global_rnn(h_tensor.mean(0, keepdim=True), state.h_global)
        return update, (g_bar, lam, eta_bar, h_param, h_tensor, h_global)


class Scale:
    """The hierarchical "Scale" rule over a flat vector with a tensor layout."""

    kind = "scale"

    def __init__(self, net: ScaleNet, tensor_index: torch.Tensor, params=None,
                 input_noise: float = 0.0, generator=None):
        self.net, self.params = net, params
        self.tensor_index = tensor_index
        self.counts = torch.bincount(tensor_index).float()
        self.input_noise, self.generator = input_noise, generator

    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> ScaleState:
        net, n = self.net, theta.numel()
        z = theta.new_zeros
        return ScaleState(moments if moments is not None else init_moments(theta),
                          z(net.timescales, n), z(net.timescales, n),
                          torch.full_like(theta, math.log(net.init_lr)),
                          z(n, net.param_units), z(self.counts.shape[0], net.tensor_units),
                          z(1, net.global_units))

    def step(self, grad: torch.Tensor, state: ScaleState, t: int = 0):
        if self.input_noise > 0:
            grad = grad + self.input_noise * torch.randn(grad.shape, generator=self.generator).to(grad)
        moments = update_moments(state.moments, grad)
        idx = self.tensor_index.to(grad.device)
        update, rest = run_net(self.net, self.params, grad, state, idx, self.counts.to(grad))
        return update, ScaleState(moments, *rest)
