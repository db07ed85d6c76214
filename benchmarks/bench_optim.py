"""Drop-in optimizer cost: one full training step (forward + backward + step) on the
train problem with AmalgamatedOptimizer ÷ the same with torch.optim.Adam.

    python benchmarks/bench_optim.py [--policy PATH]

Without --policy an untrained RNNProp policy is written to a temp file (the cost does not
depend on the weights). Target: ≤ 1.10. 2 threads; medians; the two optimizers take turns
step by step so that machine load hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--problem", default="train")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from optamal import AmalgamatedOptimizer
    from optamal.problems import make_problem
    from optamal.rules.lstm import save_policy
    from optamal.rules.rnnprop import RNNPropNet

    policy = args.policy
    if policy is None:
        torch.manual_seed(0)
        policy = str(Path(tempfile.mkdtemp()) / "policy.pt")
        save_policy(policy, RNNPropNet(), {"kind": "rnnprop", "hidden": 20})
    p = make_problem(args.problem)
    batches = list(p.epoch_batches(0, 0))
    models = {k: copy.deepcopy(p.module) for k in ("adam", "amalgamated")}
    opts = {"adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3),
            "amalgamated": AmalgamatedOptimizer(models["amalgamated"].parameters(), policy=policy,
                                                warmup_steps=0)}
    times = {k: [] for k in opts}
    for i in range(args.steps + 5):
        b = batches[i % len(batches)]
        for k, opt in opts.items():
            t = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(models[k](b.x), b.y).backward()
            opt.step()
            if i >= 5:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    ratio = med["amalgamated"] / med["adam"]
    print(f"full training step on {args.problem} ({p.n_params:,} params), median of {args.steps}")
    print(f"  torch.optim.Adam        {med['adam']:7.2f} ms")
    print(f"  AmalgamatedOptimizer    {med['amalgamated']:7.2f} ms")
    print(f"  ratio {ratio:.2f}  (target ≤ 1.10: {'PASS' if ratio <= 1.10 else 'FAIL'})")


if __name__ == "__main__":
    main()
