"""Evaluation-sweep throughput: `evaluate` with worker processes ÷ one sequential process.

    python benchmarks/bench_evaluate.py [--repeats 6] [--epochs 2] [--max-train 1024] [--rounds 1]

One small learned policy (an untrained RNNProp student: the cost does not depend on its
weights) + adam at the paper rate on the `train` problem (mnist5k, batch 128), `repeats`
evaluations × `epochs` epochs each: 2 × repeats cells. The same sweep runs through
`optamal.commands.evaluate.evaluate` twice:

- sequential: `workers=1`, every cell in this process (2 torch threads);
- parallel: `workers=2` — what `workers=0` (auto) picks on a 2-core machine — spawned worker
  processes with one thread each; their start-up (import torch, build the problem, warm
  start) is inside the timing.

Throughput is cells per minute of the whole call (run folder, CSV writes included); the
target for parallel ÷ sequential is ≥ 1.5. With --rounds > 1 the two alternate and each
keeps its best round, so that a burst of machine load does not decide the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

TARGET = 1.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from optamal.commands.evaluate import evaluate
    from optamal.config import EvaluateConfig
    from optamal.console import console
    from optamal.rules.lstm import save_policy
    from optamal.rules.rnnprop import RNNPropNet

    console.quiet = True
    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    torch.manual_seed(0)
    policy = tmp / "policy.pt"
    save_policy(policy, RNNPropNet(), {"kind": "rnnprop", "hidden": 20})

    def sweep(workers: int, name: str) -> tuple[float, int]:
        cfg = EvaluateConfig.build("smoke", dict(
            runs=(str(policy),), problems=("train",), teachers="adam", lrs="paper",
            repeats=args.repeats, epochs=args.epochs, workers=workers, runs_dir=str(tmp / "runs"),
            name=name), [f"max_train={args.max_train}"])
        t = time.perf_counter()
        run = evaluate(cfg)
        wall = time.perf_counter() - t
        assert run.manifest["workers"] == workers, run.manifest["workers"]
        return wall, run.manifest["rows"] // args.epochs

    best = {"sequential": float("inf"), "parallel": float("inf")}
    cells = 0
    for r in range(args.rounds):
        for label, workers in (("sequential", 1), ("parallel", args.workers)):
            wall, cells = sweep(workers, f"{label}-{r}")
            best[label] = min(best[label], wall)
            print(f"  round {r + 1} {label:10s} workers={workers}: {wall:6.1f} s")
    rate = {k: cells / v * 60 for k, v in best.items()}
    ratio = rate["parallel"] / rate["sequential"]
    print(f"evaluate sweep: rnnprop policy + adam on train (max_train={args.max_train}), "
          f"{args.repeats} repeats × {args.epochs} epochs = {cells} cells; {os.cpu_count()} cores")
    print(f"  sequential (workers=1, 2 threads)       {rate['sequential']:6.1f} cells/min")
    print(f"  parallel   (workers={args.workers}, 1 thread each) {rate['parallel']:6.1f} cells/min")
    print(f"  ratio {ratio:.2f}  (target ≥ {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'})")


if __name__ == "__main__":
    main()
