"""Foundation benchmark: the flat-vector training step and tune-lr grid throughput.

Run:  python benchmarks/bench_foundation.py [--steps 30] [--warmup 5] [--max-train 1024]
      [--large-grid]

1. One full training step on ``make_problem("train")`` (mnist5k, batch 128, 18,122
   params) with each teacher rule -- ``problem.loss_and_grad`` + ``Teacher.step`` +
   ``theta - update`` -- against one step of ``torch.optim.Adam`` on an ordinary
   ``nn.Module`` of the same architecture (forward + backward + step). Median over
   ``--steps`` timed steps after ``--warmup`` untimed ones; printed as ratios to Adam.
2. ``tune-lr`` grid throughput (grid points per minute, whole command wall time,
   process start-up included) for a small in-process grid with ``workers=1`` vs
   ``workers=2``.

See benchmarks/README.md for the targets.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

BASELINE = "torch.optim.Adam (nn.Module)"


def bench_steps(n_warmup: int, n_steps: int) -> dict[str, float]:
    """Median seconds per step for each optimizer. The optimizers take turns step by
    step (round robin), so a change in machine load hits all of them alike."""
    from optamal.problems import make_problem
    from optamal.rules.teachers import PAPER_LRS, TEACHERS, Teacher

    problem = make_problem("train")
    stream = problem.batch_stream(0)
    batches = [next(stream) for _ in range(8)]
    steps = {}

    # Baseline: torch.optim.Adam on an ordinary nn.Module of the same architecture.
    module = copy.deepcopy(problem.module)
    with torch.no_grad():
        for p, v in zip(module.parameters(), problem.unflatten(problem.theta0(0)).values()):
            p.copy_(v)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def module_step(i: int) -> None:
        b = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(b.x), b.y)
        loss.backward()
        opt.step()

    steps[BASELINE] = module_step

    for name in TEACHERS:
        teacher = Teacher(name, PAPER_LRS[name] * 0.01)
        theta = problem.theta0(0)
        box = {"theta": theta, "state": teacher.init(theta)}

        def rule_step(i: int, teacher=teacher, box=box) -> None:
            b = batches[i % len(batches)]
            with torch.no_grad():
                _, g = problem.loss_and_grad(box["theta"], b)
                update, box["state"] = teacher.step(g, box["state"], i)
                box["theta"] = box["theta"] - update

        steps[name] = rule_step

    for i in range(n_warmup):
        for fn in steps.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(n_steps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn(n_warmup + i)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_grid(max_train: int, workers: int, teachers: tuple[str, ...],
               grid: tuple[float, ...]) -> tuple[float, int]:
    from optamal.commands.tune_lr import tune_lr
    from optamal.config import TuneLRConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TuneLRConfig.build("smoke", overrides=dict(
            teachers=teachers, grid=grid, epochs=1, repeats=1, max_train=max_train,
            workers=workers, runs_dir=tmp, name=f"w{workers}"))
        t0 = time.perf_counter()
        tune_lr(cfg)
        wall = time.perf_counter() - t0
    return wall, len(teachers) * len(grid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (≥ 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps")
    ap.add_argument("--max-train", type=int, default=1024, help="training examples in the grid")
    ap.add_argument("--large-grid", action="store_true",
                    help="also time a 24-point grid (6 teachers × 4 rates)")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    from optamal.console import console

    console.quiet = True  # keep tune-lr's progress bars out of the numbers

    print(f"optamal foundation benchmark  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, python "
          f"{sys.version.split()[0]})")
    print(f"\n1. one training step on 'train' (mnist5k, batch 128), median of {args.steps} "
          f"after {args.warmup} warm-up")
    steps = bench_steps(args.warmup, args.steps)
    base = steps[BASELINE]
    print(f"   {'optimizer':<30} {'ms/step':>9} {'ratio to Adam':>14}")
    for name, sec in steps.items():
        print(f"   {name:<30} {sec * 1e3:9.1f} {sec / base:14.2f}")
    worst = max(v for k, v in steps.items() if k != BASELINE)
    print(f"   worst teacher / Adam: {worst / base:.2f}")

    from optamal.rules.teachers import TEACHERS

    sizes = [(("adam", "rmsprop"), (1e-3, 1e-2))]
    if args.large_grid:
        sizes.append((TEACHERS, (1e-3, 1e-2, 0.1, 1.0)))
    for teachers, grid in sizes:
        print(f"\n2. tune-lr grid throughput: {len(teachers)} teachers × {len(grid)} rates × 1 "
              f"epoch, max_train={args.max_train} (whole command, start-up included)")
        res = {}
        for w in (1, 2):
            wall, n = bench_grid(args.max_train, w, tuple(teachers), grid)
            res[w] = n / wall * 60.0
            print(f"   workers={w}: {n} points in {wall:6.2f} s = {res[w]:6.1f} points/min")
        print(f"   workers=2 / workers=1 throughput: {res[2] / res[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
