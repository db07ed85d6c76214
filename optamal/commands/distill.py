"""``optamal distill``: meta-train RNNProp students on meta loss + distillation loss.

Schemes (METHOD §5): ``mean`` and ``minmax`` over the analytical teachers at their tuned
rates, ``choice`` with the trained choice optimizer as the one teacher, ``none`` (the
RNNProp baseline). Perturbations (§6): ``none``, ``random``, ``adv``, ``input``.
Prerequisites come from the runs directory (latest tune-lr / train-choice for the pool)
or by path; the manifest records exactly which runs were used.
"""

from __future__ import annotations

from pathlib import Path

from optamal.commands.meta_common import (device_for, problem_for, resolve_lrs, resumed_config,
                                          settings_for, train_replicates)
from optamal.config import DistillConfig
from optamal.console import console
from optamal.errors import OptamalError
from optamal.distributed import is_main, world
from optamal.runs import Run, find_runs


def resolve_choice(cfg: DistillConfig) -> tuple[Path, dict]:
    from optamal.policies import policy_path

    if cfg.choice is not None:
        return policy_path(cfg.choice), {"choice": str(Path(cfg.choice).resolve())}
    runs = find_runs(cfg.runs_dir, "train-choice", pool=cfg.pool)
    if not runs:
        raise OptamalError(
            f"--scheme choice needs a trained choice optimizer: no completed train-choice run for "
            f"pool {cfg.pool} under {cfg.runs_dir}; run `optamal train-choice --pool {cfg.pool} "
            f"--runs-dir {cfg.runs_dir}` first, or pass --choice PATH")
    return policy_path(runs[-1].path), {"choice": str(runs[-1].path.resolve())}


def distill(cfg: DistillConfig) -> Run:
    from optamal.policies import load_policy, make_rule
    from optamal.policies import build_net
    from optamal.rules.teachers import Teacher, pool_members

    rank, world_size = world()   # joins the process group under torchrun
    resumed = None
    if cfg.resume:
        cfg, resumed = resumed_config(DistillConfig, cfg.resume, "distill")
    device = device_for(cfg)
    problem = problem_for(cfg, device)
    prerequisites: dict = {}
    teachers: list = []
    teacher_desc: dict = {}
    if cfg.scheme in ("mean", "minmax"):
        names = list(cfg.teachers) if cfg.teachers else list(pool_members(cfg.pool))
        lrs, src = resolve_lrs(cfg, names)
        prerequisites.update(src)
        teachers = [Teacher(t, lrs[t]) for t in names]
        teacher_desc = {"teachers": names, "lrs": lrs}
    elif cfg.scheme == "choice":
        path, src = resolve_choice(cfg)
        prerequisites.update(src, choice_policy=str(path.resolve()))
        cnet, cheader = load_policy(path)
        if cheader.get("kind") != "choice":
            raise OptamalError(f"{path} is a {cheader.get('kind')} policy, not a choice optimizer")
        teachers = [make_rule(cnet, cheader, problem.layout)]
        teacher_desc = {"teachers": ["choice"], "choice_teachers": cheader["teachers"],
                        "choice_lrs": cheader["lrs"]}
    magnitude = cfg.resolved_magnitude
    settings = settings_for(cfg, cfg.scheme, cfg.perturb, magnitude, cfg.adv_steps)
    header = {"kind": cfg.policy, "hidden": 20, "scheme": cfg.scheme,
              "pool": cfg.pool, "perturb": cfg.perturb, "magnitude": magnitude,
              "problem": problem.name, "dataset": problem.dataset.name,
              "meta_gradient": cfg.meta_gradient, **teacher_desc}
    main = is_main()
    run = resumed or Run.create(
        cfg.runs_dir, "distill", cfg.to_dict(), name=cfg.name, seed=cfg.seed, device=device, write=main,
        extra={"world_size": world_size, "prerequisites": prerequisites, "problem": problem.describe(), "scheme": cfg.scheme,
               "perturb": cfg.perturb, "magnitude": magnitude, **teacher_desc})
    if main:
        console.print(f"distill: {cfg.policy} student, scheme {cfg.scheme}, pool {cfg.pool}, perturb {cfg.perturb}"
                  f"{f' ({magnitude:g})' if magnitude else ''} on {problem.name}/{problem.dataset.name}, "
                  f"{cfg.replicates} replicate(s) → {run.path}")

    def build(seed):
        net = build_net(header).to(device)
        factory = lambda params, noise, gen: make_rule(net, header, problem.layout, params, noise, gen)
        return net, factory, teachers, header

    with run.track():
        train_replicates(run, cfg, problem, settings, build, f"distill[{cfg.scheme}]",
                         resume=resumed is not None)
    return run
