"""``optamal train-choice``: train the choice optimizer on meta loss alone (METHOD §4).

Its teachers run at "tuned rate × pool multiplier" (default 2 for every teacher;
``--multiplier ref`` gives the *ref* choice rates at the paper's rates), recorded in the
policy header. The result is the single teacher of
``distill --scheme choice``.
"""

from __future__ import annotations

from optamal.commands.meta_common import (device_for, problem_for, resolve_lrs, resumed_config,
                                          settings_for, train_replicates)
from optamal.config import ChoiceConfig
from optamal.console import console
from optamal.distributed import is_main, world
from optamal.runs import Run


def train_choice(cfg: ChoiceConfig) -> Run:
    from optamal.policies import make_rule
    from optamal.rules.choice import ChoiceNet
    from optamal.rules.teachers import pool_members

    rank, world_size = world()   # joins the process group under torchrun
    resumed = None
    if cfg.resume:
        cfg, resumed = resumed_config(ChoiceConfig, cfg.resume, "train-choice")
    device = device_for(cfg)
    names = list(cfg.teachers) if cfg.teachers else list(pool_members(cfg.pool))
    tuned, source = resolve_lrs(cfg, names)
    multipliers = cfg.multipliers(names)
    rates = [tuned[t] * multipliers[t] for t in names]
    problem = problem_for(cfg, device)
    settings = settings_for(cfg, scheme="none")
    header = {"kind": "choice", "hidden": 20, "teachers": names, "lrs": rates,
              "tuned_lrs": tuned, "multipliers": multipliers,
              "pool": cfg.pool, "problem": problem.name, "dataset": problem.dataset.name,
              "meta_gradient": cfg.meta_gradient}
    main = is_main()
    run = resumed or Run.create(
        cfg.runs_dir, "train-choice", cfg.to_dict(), name=cfg.name, seed=cfg.seed, device=device, write=main,
        extra={"world_size": world_size, "prerequisites": source, "problem": problem.describe(), "teachers": names,
               "choice_lrs": dict(zip(names, rates))})
    if main:
        console.print(f"train-choice: pool {cfg.pool} ({', '.join(names)}) on {problem.name}/"
                  f"{problem.dataset.name}, {cfg.replicates} replicate(s) → {run.path}")

    def build(seed):
        net = ChoiceNet(len(names)).to(device)
        factory = lambda params, noise, gen: make_rule(net, header, problem.layout, params)
        return net, factory, [], header

    with run.track():
        train_replicates(run, cfg, problem, settings, build, "train-choice",
                         resume=resumed is not None)
    return run
