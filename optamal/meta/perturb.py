"""Weight-space perturbations of the student's weights φ (paper Section 4; METHOD §6).

- random (Eq. 5): φ̃_w = φ_w + N(0, σ²·‖φ_w‖²/|φ_w|) per tensor w, fresh each step;
- adversarial (Eq. 6, Algorithm 2): A steps of ψ_w ← ψ_w + ε·‖φ_w‖·∇ψ_w L/‖∇ψ_w L‖
  from ψ_0 = 0, then the meta-gradient is taken at φ + ψ_A;
- input (Eq. 11): the gradient the student sees gets N(0, σ²I) added (in the rule).

Norms are constants (detached): the perturbation moves φ, it is not differentiated.
"""

from __future__ import annotations

import math

import torch

PERTURBATIONS = ("none", "random", "adv", "input")
DEFAULT_MAGNITUDE = {"random": 1e-3, "adv": 1e-4, "input": 1e-2}


def random_perturbation(params: dict[str, torch.Tensor], sigma: float,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """φ + noise with per-tensor std σ·‖φ_w‖/√|φ_w| (Eq. 5); differentiable in φ."""
    out = {}
    for k, w in params.items():
        std = sigma * w.detach().norm() / math.sqrt(w.numel())
        noise = torch.randn(w.shape, generator=generator, device="cpu").to(w)
        out[k] = w + std * noise
    return out


def pgd_step(psi: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             params: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """One ascent step: ψ_w ← ψ_w + ε·‖φ_w‖·g_w/‖g_w‖ (Eq. 6); a zero gradient moves nothing."""
    out = {}
    for k, p in params.items():
        g = grads[k]
        gn = g.norm()
        step = torch.zeros_like(g) if float(gn) == 0.0 else g / gn
        out[k] = (psi[k] + eps * p.detach().norm() * step).detach()
    return out
