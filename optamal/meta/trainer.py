"""Truncated-BPTT meta-training (METHOD.md §5–§6; paper Algorithm 1).

One *meta-epoch* is one optimizee trajectory: θ0 from a fresh seed, the shared warmup,
then ``unroll`` steps split into truncations of ``truncation`` steps. Student and
teachers start from the same θ0 and see the same minibatches; teachers keep their own
trajectories across truncations, computed under ``torch.no_grad`` (no autograd history,
so memory does not grow with the pool). After each truncation: the meta-gradient of
meta loss + α·distillation loss, adaptive gradient clipping, one Adam step on φ, and the
student's state is detached.

Random scaling (Lv et al.): per trajectory, s = exp(U(−3, 3)) per coordinate; the student
moves θ' = θ/s, sees ∇θ' = s·∇θ, and distances are measured in θ' space.

Curriculum: stages of growing unroll with α per stage; validate every
``validate_every`` meta-epochs on fixed trajectories without any noise; keep the best
weights; leave a stage once validation stops improving.

Divergence: a non-finite loss or meta-gradient skips the update, keeps the last good
weights, restarts the trajectory, and is counted; ``max_bad_steps`` in a row mark the
replicate diverged (:class:`ReplicateDiverged`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from optamal.distributed import all_reduce_grads, all_reduce_sum, all_reduce_tensors, world
from optamal.engine import Warm, warmup
from optamal.meta.losses import distill_distance, meta_term, reduce_teachers
from optamal.meta.perturb import pgd_step, random_perturbation
from optamal.problems import Batch, Problem
from optamal.rules.teachers import Moments

SCALE_RANGE = 3.0   # s = exp(U(−3, 3))


class ReplicateDiverged(RuntimeError):
    """Too many non-finite meta-iterations in a row; ``rows`` are the logged rows of the
    meta-epoch it ended."""

    def __init__(self, message: str, rows: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.rows = rows or []


@dataclass
class MetaSettings:
    """The numbers the trainer needs (a view of the command's config)."""

    unrolls: Sequence[int]
    truncation: int
    alphas: Sequence[float]
    scheme: str = "none"
    meta_batch: int = 1
    meta_lr: float = 1e-3
    clip_ratio: float = 0.1
    meta_gradient: str = "full"
    validate_every: int = 40
    val_trajectories: int = 2
    val_unroll: int = 200
    min_validations: int = 5
    patience: int = 5
    max_validations: int = 50
    random_scaling: bool = True
    perturb: str = "none"
    magnitude: float = 0.0
    adv_steps: int = 1
    warmup_steps: int = 100
    warmup_lr: float = 0.01
    max_bad_steps: int = 5


@dataclass
class Trajectory:
    """One optimizee trajectory in progress: student (scaled space) and teachers."""

    seed: int
    scale: torch.Tensor
    theta: torch.Tensor              # student θ' (scaled space), detached between truncations
    state: Any
    teacher_thetas: list[torch.Tensor]
    teacher_states: list[Any]
    stream: Any
    gen: torch.Generator             # this trajectory's own noise (scaling, perturbations)
    step: int = 0


class MetaTrainer:
    """Meta-trains one learned rule (student or choice) on one problem.

    ``make_rule(params, input_noise, generator)`` builds the learned rule around
    ``net`` (``params`` None: the net's own weights). ``teachers`` are ``(init, step)``
    rules whose trajectories are distillation targets (empty for scheme none)."""

    def __init__(self, problem: Problem, net: nn.Module, make_rule: Callable[..., Any],
                 teachers: Sequence[Any], settings: MetaSettings, seed: int,
                 log: Callable[[str, dict[str, Any]], None] | None = None):
        self.problem, self.net, self.make_rule = problem, net, make_rule
        self.teachers, self.s = list(teachers), settings
        self.seed = seed
        self.log = log or (lambda kind, row: None)
        self.opt = torch.optim.Adam(net.parameters(), lr=settings.meta_lr)
        self.gen = torch.Generator().manual_seed(seed * 7_919 + 17)
        self.meta_epoch = 0
        self.bad_in_row = 0
        self.divergence_events = 0
        self.best_value = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ trajectories
    def _new_trajectory(self, member: int = 0) -> Trajectory:
        seed = self.seed * 100_003 + self.meta_epoch * self.s.meta_batch + member
        p = self.problem
        theta0 = p.theta0(seed)
        warm = warmup(p, theta0, p.batch_stream(seed + 10_000_019), self.s.warmup_steps, self.s.warmup_lr)
        # Each trajectory draws its randomness from its own generator, so the numbers do not
        # depend on which rank (or in which order) the meta-batch members are computed.
        gen = torch.Generator().manual_seed(seed * 2_654_435_761 % (2**62) + self.seed)
        if self.s.random_scaling:
            u = torch.rand(theta0.shape, generator=gen).to(theta0)
            scale = torch.exp((2 * u - 1) * SCALE_RANGE)
        else:
            scale = torch.ones_like(theta0)
        # In θ' = θ/s the gradient is s·g, so the moments scale by s and s².
        moments = Moments(warm.moments.m * scale, warm.moments.v * scale * scale)
        rule = self.make_rule(None, 0.0, None)
        state = rule.init(warm.theta / scale, moments)
        t_thetas = [warm.theta.clone() for _ in self.teachers]
        t_states = [t.init(warm.theta, warm.moments) for t in self.teachers]
        return Trajectory(seed, scale, warm.theta / scale, state, t_thetas, t_states,
                          p.batch_stream(seed), gen)

    @torch.no_grad()
    def _advance_teachers(self, traj: Trajectory, batches: list[Batch]) -> torch.Tensor | None:
        """Run every teacher over the truncation's batches; positions (t, K, N) in θ' space."""
        if not self.teachers:
            return None
        out = []
        for i, batch in enumerate(batches):
            row = []
            for k, teacher in enumerate(self.teachers):
                _, g = self.problem.loss_and_grad(traj.teacher_thetas[k], batch)
                u, traj.teacher_states[k] = teacher.step(g, traj.teacher_states[k], traj.step + i)
                traj.teacher_thetas[k] = traj.teacher_thetas[k] - u
                row.append(traj.teacher_thetas[k] / traj.scale)
            out.append(torch.stack(row))
        return torch.stack(out)

    def _truncation_loss(self, traj: Trajectory, batches: list[Batch], starts: list[torch.Tensor],
                         targets: torch.Tensor | None, alpha: float,
                         params_for_step: Callable[[Trajectory], dict[str, torch.Tensor] | None],
                         input_noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """Unroll the student through one truncation; returns (total, meta, distill, state, θ')."""
        full = self.s.meta_gradient == "full"
        theta = traj.theta.detach().requires_grad_(True)
        state = traj.state
        metas, dists = [], []
        for i, batch in enumerate(batches):
            rule = self.make_rule(params_for_step(traj), input_noise, traj.gen)
            loss, g = self.problem.loss_and_grad(theta * traj.scale, batch, create_graph=full)
            metas.append(meta_term(loss, starts[i]))
            u, state = rule.step(g * traj.scale, state, traj.step + i)
            theta = theta - u
            if targets is not None:
                dists.append(reduce_teachers(distill_distance(theta, targets[i]), self.s.scheme))
        meta = torch.stack(metas).mean()
        distill = torch.stack(dists).mean() if dists else torch.zeros((), dtype=meta.dtype)
        total = meta + alpha * distill if dists else meta
        return total, meta, distill, state, theta

    # ------------------------------------------------------------------ one truncation
    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.net.named_parameters())

    def truncation_step(self, trajs: list[Trajectory], alpha: float) -> dict[str, Any]:
        """One meta-iteration over the meta-batch; returns the logged numbers."""
        s = self.s
        t0 = time.perf_counter()
        params = self._params()
        prepared = []
        for traj in trajs:
            batches = [next(traj.stream) for _ in range(s.truncation)]
            with torch.no_grad():
                start = traj.theta * traj.scale
                starts = [self.problem.loss(start, b.x, b.y) for b in batches]
            targets = self._advance_teachers(traj, batches)
            prepared.append((traj, batches, starts, targets))

        input_noise = s.magnitude if s.perturb == "input" else 0.0
        psi = None
        if s.perturb == "adv":
            psi = {k: torch.zeros_like(p) for k, p in params.items()}
            for _ in range(s.adv_steps):
                leaf = {k: v.clone().requires_grad_(True) for k, v in psi.items()}
                shifted = {k: params[k].detach() + leaf[k] for k in params}
                grads = {k: torch.zeros_like(v) for k, v in psi.items()}
                for traj, batches, starts, targets in prepared:
                    total, *_ = self._truncation_loss(traj, batches, starts, targets, alpha,
                                                      lambda tr: shifted, 0.0)
                    if torch.isfinite(total):
                        gs = torch.autograd.grad(total / s.meta_batch, list(leaf.values()),
                                                 allow_unused=True)
                        for k, gk in zip(leaf, gs):
                            if gk is not None:
                                grads[k] += gk
                # the ascent direction uses the whole meta-batch's loss (summed over ranks)
                grads = dict(zip(grads, all_reduce_tensors(list(grads.values()))))
                psi = pgd_step(psi, grads, params, s.magnitude)

        def params_for_step(traj: Trajectory):
            if s.perturb == "random":
                return random_perturbation(params, s.magnitude, traj.gen)
            if psi is not None:
                return {k: params[k] + psi[k] for k in params}
            return None

        self.opt.zero_grad(set_to_none=True)
        totals, metas, dists, ok = [], [], [], True
        new_states = []
        for traj, batches, starts, targets in prepared:
            total, meta, distill, state, theta = self._truncation_loss(
                traj, batches, starts, targets, alpha, params_for_step, input_noise)
            totals.append(total.item())
            metas.append(meta.item())
            dists.append(distill.item())
            if not math.isfinite(totals[-1]):
                ok = False
                break
            (total / s.meta_batch).backward()
            new_states.append((traj, _detach(state), theta.detach()))

        # Sum the meta-gradient and the numbers over ranks (no-ops in one process); every
        # rank then takes the same decision and the same Adam step.
        all_reduce_grads(self.net)
        n_bad, sum_t, sum_m, sum_d, n = all_reduce_sum(
            [0.0 if ok else 1.0, sum(totals), sum(metas), sum(dists), float(len(totals))])
        ok = n_bad == 0
        totals, metas, dists = [sum_t / max(n, 1)], [sum_m / max(n, 1)], [sum_d / max(n, 1)]
        grad_norm = _grad_norm(self.net)
        if ok and not math.isfinite(grad_norm):
            ok = False
        if ok:
            snapshot = _snapshot(self.net, self.opt)
            _adaptive_clip(self.net, s.clip_ratio)
            self.opt.step()
            if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
                _restore(self.net, self.opt, snapshot)
                ok = False
        self.opt.zero_grad(set_to_none=True)
        if ok:
            self.bad_in_row = 0
            for traj, state, theta in new_states:
                traj.state, traj.theta = state, theta
                traj.step += s.truncation
        else:
            self.bad_in_row += 1
            self.divergence_events += 1
        return dict(meta_loss=_mean(metas), distill_loss=_mean(dists), total_loss=_mean(totals),
                    grad_norm=grad_norm, skipped=not ok, divergence_events=self.divergence_events,
                    seconds=time.perf_counter() - t0)

    def meta_epoch_run(self, stage: int, unroll: int, alpha: float,
                       on_truncation: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """One meta-epoch: ``meta_batch`` fresh trajectories unrolled ``unroll`` steps."""
        if unroll % self.s.truncation:
            raise ValueError(f"unroll {unroll} not divisible by truncation {self.s.truncation}")
        rank, size = world()
        trajs = [self._new_trajectory(b) for b in range(self.s.meta_batch) if b % size == rank]
        rows = []
        for tr in range(unroll // self.s.truncation):
            row = self.truncation_step(trajs, alpha)
            row = dict(stage=stage, meta_epoch=self.meta_epoch, truncation=tr, **row)
            rows.append(row)
            self.log("meta", row)
            if on_truncation:
                on_truncation(row)
            if row["skipped"]:
                break   # the trajectory may hold non-finite state: start a fresh one
        self.meta_epoch += 1
        if self.bad_in_row >= self.s.max_bad_steps:
            raise ReplicateDiverged(f"{self.bad_in_row} non-finite meta-iterations in a row", rows)
        return rows

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean log training loss along fixed validation trajectories (no noise, no
        scaling), and the final validation-split loss."""
        logs, finals = [], []
        rule = self.make_rule(None, 0.0, None)
        for j in range(self.s.val_trajectories):
            seed = 900_000_000 + j
            losses, theta = student_trajectory(self.problem, rule, seed, self.s.val_unroll,
                                               self.s.warmup_steps, self.s.warmup_lr)
            logs.append(sum(math.log(max(v, 1e-30)) if math.isfinite(v) else math.inf
                            for v in losses) / len(losses))
            finals.append(self.problem.evaluate(theta)[0] if bool(torch.isfinite(theta).all()) else math.inf)
        return dict(val_log_loss=_mean(logs), val_final_loss=_mean(finals))


def student_trajectory(problem: Problem, rule: Any, seed: int, steps: int, warmup_steps: int,
                       warmup_lr: float) -> tuple[list[float], torch.Tensor]:
    """Run ``rule`` from θ0(seed) after the shared warmup; per-step training losses."""
    theta0 = problem.theta0(seed)
    warm: Warm = warmup(problem, theta0, problem.batch_stream(seed + 10_000_019), warmup_steps, warmup_lr)
    theta = warm.theta
    state = rule.init(theta, warm.moments)
    stream = problem.batch_stream(seed)
    losses = []
    for t in range(steps):
        loss, g = problem.loss_and_grad(theta, next(stream))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            losses += [math.inf] * (steps - t - 1)
            break
        u, state = rule.step(g, state, t)
        theta = theta - u
    return losses, theta


# ---------------------------------------------------------------------- helpers
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _detach(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, tuple):
        vals = [_detach(v) for v in state]
        return type(state)(*vals) if hasattr(state, "_fields") else tuple(vals)
    return state


def _grad_norm(net: nn.Module) -> float:
    sq = 0.0
    for p in net.parameters():
        if p.grad is not None:
            sq += float((p.grad.detach() ** 2).sum())
    return math.sqrt(sq) if math.isfinite(sq) else math.inf


def _adaptive_clip(net: nn.Module, ratio: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (*ref*, ratio 0.1): per tensor, ‖g‖ ≤ ratio·max(‖w‖, eps)."""
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is None:
                continue
            max_norm = ratio * max(float(p.norm()), eps)
            gn = float(p.grad.norm())
            if gn > max_norm:
                p.grad.mul_(max_norm / gn)


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())


def _restore(net: nn.Module, opt: torch.optim.Optimizer, snap: tuple[dict, dict]) -> None:
    net.load_state_dict(snap[0])
    opt.load_state_dict(snap[1])
