"""Meta-training benchmark: cost of one meta-iteration per optimizee step, and peak memory.

Run:  python benchmarks/bench_meta.py [--truncations 2] [--adam-steps 30]

1. Time per optimizee step of a meta-iteration: ``MetaTrainer.truncation_step`` on
   ``make_problem("train")`` (mnist5k, batch 128, 18,122 params) with unroll = truncation
   = 100, first-order meta-gradient, meta-batch 1, random scaling on (as in training).
   One untimed warm-up truncation, then ``--truncations`` timed ones; seconds ÷ 100 steps.
   Divided by the median of ``--adam-steps`` plain ``torch.optim.Adam`` steps on an
   ordinary ``nn.Module`` of the same architecture (forward + backward + step), measured
   right before and right after each timed truncation (the mean of the two medians), so
   that a change in machine load hits numerator and denominator alike; the ratio is the
   median over the timed truncations.
   Configurations: scheme none (no teachers); small pool (adam, rmsprop) scheme mean;
   large pool (6 teachers) scheme minmax. Teachers at the paper's rates.
2. Peak memory: the 'none' and the large-pool 'minmax' truncations each run in a fresh
   subprocess (warm-up truncation + one more); peak RSS from ``resource.getrusage``
   (``ru_maxrss``); ratio minmax / none.

Targets (benchmarks/README.md): small ≤ 3.5, large ≤ 5.0, memory ratio ≤ 1.3.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

UNROLL = 100
CONFIGS = {            # name: (scheme, teachers)
    "none": ("none", ()),
    "small-mean": ("mean", ("adam", "rmsprop")),
    "large-minmax": ("minmax", ("sgd", "momentum", "rmsprop", "adam", "addsign", "powersign")),
}
TARGETS = {"small-mean": 3.5, "large-minmax": 5.0}
MEMORY_TARGET = 1.3


def build_trainer(problem, name: str):
    from optamal.meta.trainer import MetaSettings, MetaTrainer
    from optamal.rules.rnnprop import RNNProp, RNNPropNet
    from optamal.rules.teachers import PAPER_LRS, Teacher

    scheme, names = CONFIGS[name]
    torch.manual_seed(0)
    net = RNNPropNet()
    settings = MetaSettings(unrolls=(UNROLL,), truncation=UNROLL, alphas=(0.2,), scheme=scheme,
                            meta_batch=1, meta_gradient="first-order", warmup_steps=10,
                            random_scaling=True)
    teachers = [Teacher(t, PAPER_LRS[t]) for t in names]
    return MetaTrainer(problem, net, lambda p, n, g: RNNProp(net, p, n, g), teachers, settings, seed=0)


def adam_median(problem, batches, n_steps: int, n_warmup: int = 5) -> float:
    """Median seconds of one torch.optim.Adam step on an ordinary nn.Module."""
    module = copy.deepcopy(problem.module)
    with torch.no_grad():
        for p, v in zip(module.parameters(), problem.unflatten(problem.theta0(0)).values()):
            p.copy_(v)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    times = []
    for i in range(n_warmup + n_steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(b.x), b.y)
        loss.backward()
        opt.step()
        if i >= n_warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(trainer, problem, batches, n_truncations: int, adam_steps: int) -> tuple[float, float, float]:
    """(seconds per optimizee step, Adam seconds per step, ratio) for one configuration.

    Adam medians are taken before the first and after every timed truncation; each
    truncation is divided by the mean of the two medians around it, and the reported
    ratio is the median over truncations (robust to load changing between them)."""
    traj = trainer._new_trajectory()
    trainer.truncation_step([traj], 0.2)                      # warm-up truncation, untimed
    adams = [adam_median(problem, batches, adam_steps)]
    steps, ratios = [], []
    for _ in range(n_truncations):
        t0 = time.perf_counter()
        row = trainer.truncation_step([traj], 0.2)
        sec = (time.perf_counter() - t0) / UNROLL
        if row["skipped"]:
            raise RuntimeError(f"a benchmark truncation was skipped: {row}")
        adams.append(adam_median(problem, batches, adam_steps))
        steps.append(sec)
        ratios.append(sec / ((adams[-2] + adams[-1]) / 2))
    return statistics.median(steps), statistics.median(adams), statistics.median(ratios)


def memory_child(name: str) -> None:
    """Run in a fresh process: one warm-up truncation and one more; print peak RSS (KiB)."""
    from optamal.problems import make_problem

    torch.set_num_threads(2)
    problem = make_problem("train")
    trainer = build_trainer(problem, name)
    traj = trainer._new_trajectory()
    for _ in range(2):
        trainer.truncation_step([traj], 0.2)
    print(json.dumps({"name": name, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def set_unroll(n: int) -> None:
    global UNROLL
    UNROLL = n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--truncations", type=int, default=2, help="timed truncations per configuration (≥ 2)")
    ap.add_argument("--adam-steps", type=int, default=30, help="timed Adam steps per median (≥ 30)")
    ap.add_argument("--unroll", type=int, default=100, help="unroll = truncation (100; smaller only to try the script)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_unroll(args.unroll)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    torch.set_num_threads(2)
    from optamal.problems import make_problem

    problem = make_problem("train")
    stream = problem.batch_stream(0)
    batches = [next(stream) for _ in range(8)]
    print(f"problem train/{problem.dataset.name}: {problem.n_params} params, batch {problem.batch_size}; "
          f"unroll = truncation = {UNROLL}, first-order, meta-batch 1, torch threads {torch.get_num_threads()}")

    all_ok = True
    print(f"\n{'configuration':<14} {'teachers':>8} {'ms/step':>9} {'adam ms':>8} {'ratio':>7}  target")
    for name, (scheme, names) in CONFIGS.items():
        trainer = build_trainer(problem, name)
        sec, adam, ratio = measure(trainer, problem, batches, max(args.truncations, 1), args.adam_steps)
        target = TARGETS.get(name)
        if target is None:
            tail = "reported only"
        else:
            ok = ratio <= target
            all_ok &= ok
            tail = f"≤ {target}  {verdict(ok)}"
        print(f"{name:<14} {len(names):>8} {sec * 1e3:>9.2f} {adam * 1e3:>8.2f} {ratio:>7.2f}  {tail}")

    if not args.skip_memory:
        rss = {}
        for name in ("none", "large-minmax"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", name,
                                  "--unroll", str(UNROLL)], check=True,
                                 capture_output=True, text=True).stdout
            rss[name] = json.loads(out.strip().splitlines()[-1])["maxrss_kib"] / 1024
        ratio = rss["large-minmax"] / rss["none"]
        ok = ratio <= MEMORY_TARGET
        all_ok &= ok
        print(f"\npeak RSS (fresh process, 2 truncations): none {rss['none']:.0f} MiB, "
              f"large-minmax {rss['large-minmax']:.0f} MiB, ratio {ratio:.2f}  "
              f"≤ {MEMORY_TARGET}  {verdict(ok)}")
    print(f"\noverall: {verdict(all_ok)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
