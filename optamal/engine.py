"""Training an optimizee with any update rule: warmup, epochs, per-epoch records.

Shared by ``tune-lr`` and ``evaluate``: every optimizer gets the same warmup
(METHOD §6: ``warmup_steps`` SGD steps at ``warmup_lr``, moments updated, LSTM state
not), then trains for whole epochs. A non-finite training loss marks the trajectory
diverged from that epoch on; the caller records it and goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from optamal.problems import Batch, Problem
from optamal.rules.teachers import Moments, init_moments, update_moments


class Rule(Protocol):
    def init(self, theta: torch.Tensor, moments: Moments | None = None) -> Any: ...

    def step(self, grad: torch.Tensor, state: Any, t: int = 0) -> tuple[torch.Tensor, Any]: ...


@dataclass
class Warm:
    """The point every optimizer starts from after warmup."""

    theta: torch.Tensor
    moments: Moments
    loss: float


def warmup(problem: Problem, theta: torch.Tensor, batches: Iterator[Batch], steps: int,
           lr: float) -> Warm:
    """``steps`` SGD steps at ``lr``; the moments follow the gradients."""
    moments = init_moments(theta)
    loss = float("nan")
    theta = theta.detach()
    for _ in range(steps):
        batch = next(batches)
        loss_t, g = problem.loss_and_grad(theta, batch)
        moments = update_moments(moments, g)
        theta = theta - lr * g
        loss = float(loss_t)
    return Warm(theta, moments, loss)


def warm_start(problem: Problem, seed: int, warmup_steps: int, warmup_lr: float) -> Warm:
    """θ0 from ``seed``, then the shared warmup on its own batch stream."""
    theta = problem.theta0(seed)
    stream = problem.batch_stream(seed + 10_000_019)
    return warmup(problem, theta, stream, warmup_steps, warmup_lr)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    diverged: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, train_loss=self.train_loss, val_loss=self.val_loss,
                    val_acc=self.val_acc, diverged=self.diverged, seconds=self.seconds)


@torch.no_grad()
def train_epochs(problem: Problem, rule: Rule, warm: Warm, seed: int, epochs: int,
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """Train from the warm start for ``epochs`` epochs; one record per epoch.

    After divergence the remaining epochs are recorded as diverged (NaN losses)."""
    theta = warm.theta.clone()
    state = rule.init(theta, warm.moments)
    records: list[EpochRecord] = []
    diverged = False
    t = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if diverged:
            rec = EpochRecord(epoch, math.nan, math.nan, math.nan, True,
                              time.perf_counter() - start)
        else:
            total, count = 0.0, 0
            for batch in problem.epoch_batches(seed, epoch):
                loss, g = problem.loss_and_grad(theta, batch)
                loss_f = float(loss)
                if not math.isfinite(loss_f):
                    diverged = True
                    break
                update, state = rule.step(g, state, t)
                theta = theta - update
                total += loss_f
                count += 1
                t += 1
            if not diverged and not bool(torch.isfinite(theta).all()):
                diverged = True
            if diverged:
                rec = EpochRecord(epoch, math.nan, math.nan, math.nan, True,
                                  time.perf_counter() - start)
            else:
                val_loss, val_acc = problem.evaluate(theta)
                if not math.isfinite(val_loss):
                    diverged = True
                rec = EpochRecord(epoch, total / max(count, 1), val_loss, val_acc, diverged,
                                  time.perf_counter() - start)
        records.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    return records
