"""The amalgamated optimizer as a drop-in ``torch.optim.Optimizer``.

    from optamal import AmalgamatedOptimizer
    opt = AmalgamatedOptimizer(model.parameters(), policy="runs/distill/.../replicate-0/policy.pt")
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

It runs exactly the rule the engine runs during evaluation (one implementation, three
faces: functional in meta-training, differentiable in the unroll, and this). All
parameters of all groups form one flat vector: the gradients are gathered into one
preallocated buffer, the LSTM runs as one batched cell call over every coordinate,
and the state lives in flat buffers whose per-parameter views are what
``state_dict()`` saves — so save/resume mid-training continues the same trajectory.

Protocol: like every optimizer in the method, the first ``warmup_steps`` steps are SGD
at ``warmup_lr`` while the moments follow the gradients (METHOD §6; the policy was
trained from that state). Set ``warmup_steps=0`` to skip it.
Each group's ``scale`` (default 1) multiplies its updates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from optamal.errors import OptamalError

_STATE_FIELDS = ("m", "v", "h1", "c1", "h2", "c2")


class AmalgamatedOptimizer(torch.optim.Optimizer):
    """A learned policy (RNNProp student or choice optimizer) as a torch optimizer."""

    def __init__(self, params: Iterable, policy: str | Path | None = None, *, scale: float = 1.0,
                 warmup_steps: int = 100, warmup_lr: float = 0.01):
        if scale <= 0:
            raise OptamalError(f"scale must be > 0, got {scale}")
        if warmup_steps < 0 or warmup_lr <= 0:
            raise OptamalError("warmup_steps must be ≥ 0 and warmup_lr > 0")
        super().__init__(params, dict(scale=scale))
        from optamal.policies import load_policy, policy_path

        if policy is None:
            from optamal.pretrained import default_policy_path

            policy = default_policy_path()
        self.policy_file = str(policy_path(policy))
        self.net, self.header = load_policy(self.policy_file)
        if self.header.get("kind") not in ("rnnprop", "dm", "choice"):
            raise OptamalError(f"AmalgamatedOptimizer runs rnnprop, dm and choice policies; "
                               f"{self.policy_file} is a {self.header.get('kind')} policy "
                               "(evaluate it with `optamal evaluate`)")
        self.warmup_steps, self.warmup_lr = int(warmup_steps), float(warmup_lr)
        self._flat: dict[str, torch.Tensor] | None = None
        self._rule = None
        self._step_count = 0

    # ------------------------------------------------------------------ flat buffers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _build(self) -> None:
        """Allocate the flat buffers (or re-gather them after load_state_dict)."""
        from optamal.policies import make_rule

        params = self._params()
        if not params:
            raise OptamalError("AmalgamatedOptimizer got no parameters")
        dev, dt = params[0].device, params[0].dtype
        if any(p.device != dev or p.dtype != dt for p in params):
            raise OptamalError("AmalgamatedOptimizer needs all parameters on one device with one dtype")
        self.net.to(device=dev, dtype=dt)
        sizes = [p.numel() for p in params]
        n = sum(sizes)
        hidden = self.net.hidden
        flat = {"grad": torch.zeros(n, device=dev, dtype=dt),
                "m": torch.zeros(n, device=dev, dtype=dt), "v": torch.zeros(n, device=dev, dtype=dt)}
        for k in ("h1", "c1", "h2", "c2"):
            flat[k] = torch.zeros(n, hidden, device=dev, dtype=dt)
        restored = all(set(_STATE_FIELDS) <= set(self.state.get(p, {})) for p in params)
        if restored:   # after load_state_dict: the per-parameter tensors hold the state
            for k in _STATE_FIELDS:
                flat[k].copy_(torch.cat([self.state[p][k].reshape(p.numel(), *flat[k].shape[1:])
                                         for p in params]))
            self._step_count = int(self.state[params[0]]["step"])
        off = 0
        for p, size in zip(params, sizes):
            st = self.state[p]
            for k in _STATE_FIELDS:
                view = flat[k][off:off + size]
                st[k] = view.view(*p.shape, hidden) if k.startswith(("h", "c")) else view.view_as(p)
            st["step"] = torch.tensor(float(self._step_count))
            off += size
        self._flat, self._sizes = flat, sizes
        self._grad_views = [flat["grad"][o:o + s].view_as(p)
                            for p, o, s in zip(params, _offsets(sizes), sizes)]
        ndim = torch.cat([torch.full((s,), max(p.dim(), 1), dtype=torch.long) for p, s in zip(params, sizes)])
        self._rule = make_rule(self.net, self.header, ndim.to(dev))
        self._state_cls = type(self._rule.init(flat["grad"][:1]))

    def _state_tuple(self):
        from optamal.rules.lstm import LSTMState
        from optamal.rules.teachers import Moments

        f = self._flat
        return Moments(f["m"], f["v"]), LSTMState(f["h1"], f["c1"], f["h2"], f["c2"])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._flat is None:
            self._build()
        params = self._params()
        has_grad = [p.grad is not None for p in params]
        for view, p, hg in zip(self._grad_views, params, has_grad):
            if hg:
                view.copy_(p.grad)
            else:
                view.zero_()
        g = self._flat["grad"]
        moments, lstm = self._state_tuple()
        from optamal.rules.teachers import update_moments

        if self._step_count < self.warmup_steps:
            new_m = update_moments(moments, g)
            self._flat["m"].copy_(new_m.m)
            self._flat["v"].copy_(new_m.v)
            update = self.warmup_lr * g
        else:
            t = self._step_count - self.warmup_steps
            state = self._state_cls(moments, lstm)
            update, new = self._rule.step(g, state, t)
            self._flat["m"].copy_(new.moments.m)
            self._flat["v"].copy_(new.moments.v)
            for k, val in zip(("h1", "c1", "h2", "c2"), new.lstm):
                self._flat[k].copy_(val)
        off = 0
        for group in self.param_groups:
            for p in group["params"]:
                size = p.numel()
                if p.grad is not None:
                    p.add_(update[off:off + size].view_as(p), alpha=-group["scale"])
                off += size
        self._step_count += 1
        for p in params:
            self.state[p]["step"].fill_(float(self._step_count))
        return loss

    # ------------------------------------------------------------------ save / resume
    def state_dict(self) -> dict[str, Any]:
        if self._flat is None:
            self._build()
        sd = super().state_dict()
        sd["amalgamated"] = {"policy": self.policy_file, "step": self._step_count,
                             "warmup_steps": self.warmup_steps, "warmup_lr": self.warmup_lr}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("amalgamated", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.warmup_steps, self.warmup_lr = int(extra["warmup_steps"]), float(extra["warmup_lr"])
        self._flat = None
        self._build()   # re-gather the flat buffers from the loaded per-parameter state


def _offsets(sizes: list[int]) -> list[int]:
    out, off = [], 0
    for s in sizes:
        out.append(off)
        off += s
    return out
