"""Shared orchestration of ``train-choice`` and ``distill``: prerequisites, replicates,
the curriculum loop, progress display and the per-replicate files.

Per replicate folder ``replicate-<i>/``: ``policy.pt`` (+ ``policy.json``) with the
best-validation weights, ``meta.csv`` (one row per truncation), ``validation.csv``, and
``checkpoint.pt`` (weights, meta-optimizer state, curriculum position).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from optamal.config import MetaConfig, resolve_device
from optamal.console import console, progress, warn
from optamal.errors import OptamalError
from optamal.meta.trainer import MetaSettings, MetaTrainer, ReplicateDiverged
from optamal.rules.lstm import save_policy
from optamal.runs import Run, atomic_torch_save, atomic_write_csv, find_runs

META_COLUMNS = ["stage", "meta_epoch", "truncation", "meta_loss", "distill_loss", "total_loss",
                "grad_norm", "skipped", "divergence_events", "seconds"]
VAL_COLUMNS = ["stage", "meta_epoch", "validation", "val_log_loss", "val_final_loss", "best", "seconds"]


def problem_for(cfg: MetaConfig, device: str):
    from optamal.problems import make_problem

    return make_problem(cfg.problem, dataset=cfg.dataset, profile=cfg.profile,
                        data_root=cfg.data_root, download=cfg.download,
                        batch_size=cfg.batch_size, max_train=cfg.max_train,
                        max_val=cfg.max_val, device=device)


def resolve_lrs(cfg: MetaConfig, needed: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Tuned rates for ``needed`` teachers: ``--lrs paper``, a path, or the latest tune-lr
    run (same pool first, else any run that covers the teachers)."""
    from optamal.commands.tune_lr import load_lrs
    from optamal.rules.teachers import PAPER_LRS

    if cfg.lrs == "paper":
        return {t: PAPER_LRS[t] for t in needed}, {"lrs": "paper"}
    if cfg.lrs is not None:
        lrs = load_lrs(cfg.lrs)
        source = {"lrs": str(Path(cfg.lrs).resolve())}
    else:
        runs = find_runs(cfg.runs_dir, "tune-lr", pool=cfg.pool)
        if not runs:
            runs = [r for r in find_runs(cfg.runs_dir, "tune-lr")
                    if set(needed) <= set((r.manifest.get("selected_lrs") or {}))]
        if not runs:
            raise OptamalError(
                f"no completed tune-lr run for pool {cfg.pool} under {cfg.runs_dir}: run "
                f"`optamal tune-lr --pool {cfg.pool} --runs-dir {cfg.runs_dir}` first, "
                "or pass --lrs paper or --lrs PATH")
        lrs = load_lrs(runs[-1].path)
        source = {"lrs": str(runs[-1].path.resolve())}
    missing = [t for t in needed if lrs.get(t) is None]
    if missing:
        raise OptamalError(f"the learning-rate file {source['lrs']} has no rate for "
                           f"{', '.join(missing)}: re-run tune-lr with that pool")
    return {t: float(lrs[t]) for t in needed}, source


def settings_for(cfg: MetaConfig, scheme: str, perturb: str = "none", magnitude: float = 0.0,
                 adv_steps: int = 1) -> MetaSettings:
    return MetaSettings(
        unrolls=cfg.unrolls, truncation=cfg.truncation, alphas=cfg.alphas, scheme=scheme,
        meta_batch=cfg.meta_batch, meta_lr=cfg.meta_lr, clip_ratio=cfg.clip_ratio,
        meta_gradient=cfg.meta_gradient, validate_every=cfg.validate_every,
        val_trajectories=cfg.val_trajectories, val_unroll=cfg.val_unroll,
        min_validations=cfg.min_validations, patience=cfg.patience,
        max_validations=cfg.max_validations, random_scaling=cfg.random_scaling,
        perturb=perturb, magnitude=magnitude, adv_steps=adv_steps,
        warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, max_bad_steps=cfg.max_bad_steps)


def replicate_seed(base: int, replicate: int) -> int:
    return base * 1_000 + replicate


def train_replicates(run: Run, cfg: MetaConfig, problem, settings: MetaSettings,
                     build: Callable[[int], tuple[torch.nn.Module, Callable, list, dict[str, Any]]],
                     label: str) -> dict[str, Any]:
    """Train ``cfg.replicates`` independently seeded learned rules into ``run``.

    ``build(seed)`` returns (net, rule factory, teachers, policy header)."""
    upper = sum(cfg.max_validations * cfg.validate_every for _ in settings.unrolls)
    results: dict[str, Any] = {}
    with progress() as bar:
        for rep in range(cfg.replicates):
            seed = replicate_seed(cfg.seed, rep)
            torch.manual_seed(seed)
            net, make_rule, teachers, header = build(seed)
            out = run.path / f"replicate-{rep}"
            out.mkdir(exist_ok=True)
            task = bar.add_task(f"{label} replicate {rep + 1}/{cfg.replicates}", total=upper, status="")
            status = _curriculum(out, problem, net, make_rule, teachers, settings, seed,
                                 dict(header, replicate=rep, seed=seed), bar, task)
            bar.update(task, completed=upper)
            results[str(rep)] = status
            run.update(replicates=results)
    good = {k: v for k, v in results.items() if v["status"] == "completed"}
    if not good:
        raise OptamalError(f"every replicate diverged (see {run.path}/replicate-*/meta.csv)")
    best = min(good, key=lambda k: good[k]["best_validation"])
    run.update(best_replicate=int(best))
    return results


def _curriculum(out: Path, problem, net, make_rule, teachers, s: MetaSettings, seed: int,
                header: dict[str, Any], bar, task) -> dict[str, Any]:
    meta_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    trainer = MetaTrainer(problem, net, make_rule, teachers, s, seed)
    best = math.inf
    n_val = 0
    status = "completed"
    error = None

    def on_trunc(row: dict[str, Any]) -> None:
        bar.update(task, status=(f"stage {row['stage'] + 1}/{len(s.unrolls)} epoch {row['meta_epoch']} "
                                 f"meta {row['meta_loss']:+.3f} distill {row['distill_loss']:+.2f}"))

    try:
        for stage, (unroll, alpha) in enumerate(zip(s.unrolls, s.alphas)):
            stage_best, since, vals = math.inf, 0, 0
            while True:
                for _ in range(s.validate_every):
                    meta_rows += trainer.meta_epoch_run(stage, unroll, alpha, on_trunc)
                    bar.advance(task)
                atomic_write_csv(out / "meta.csv", _frame(meta_rows, META_COLUMNS))
                v = trainer.validate()
                vals += 1
                n_val += 1
                value = v["val_log_loss"]
                is_best = math.isfinite(value) and value < best
                if is_best:
                    best = value
                    save_policy(out / "policy.pt", net, dict(
                        header, best_validation=value, meta_epoch=trainer.meta_epoch, stage=stage))
                if math.isfinite(value) and value < stage_best:
                    stage_best, since = value, 0
                else:
                    since += 1
                val_rows.append(dict(stage=stage, meta_epoch=trainer.meta_epoch, validation=n_val,
                                     val_log_loss=value, val_final_loss=v["val_final_loss"],
                                     best=is_best, seconds=time.perf_counter() - t_start))
                atomic_write_csv(out / "validation.csv", _frame(val_rows, VAL_COLUMNS))
                atomic_torch_save(out / "checkpoint.pt", {
                    "net": net.state_dict(), "meta_optimizer": trainer.opt.state_dict(),
                    "stage": stage, "meta_epoch": trainer.meta_epoch, "validations": n_val,
                    "best_validation": best, "divergence_events": trainer.divergence_events})
                if vals >= s.max_validations or (vals >= s.min_validations and since >= s.patience):
                    break
    except ReplicateDiverged as exc:
        status, error = "diverged", str(exc)
        warn(f"{out.name} diverged: {exc}; going on with the other replicates")
    atomic_write_csv(out / "meta.csv", _frame(meta_rows, META_COLUMNS))
    if not math.isfinite(best):
        status = "diverged"
        error = error or "no finite validation loss"
    return {"status": status, "error": error, "best_validation": best if math.isfinite(best) else None,
            "meta_epochs": trainer.meta_epoch, "validations": n_val,
            "divergence_events": trainer.divergence_events,
            "seconds": round(time.perf_counter() - t_start, 2)}


def _frame(rows, columns):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def device_for(cfg: MetaConfig) -> str:
    return resolve_device(cfg.device)
