"""Shared orchestration of ``train-choice`` and ``distill``: prerequisites, replicates,
the curriculum loop, progress display and the per-replicate files.

Per replicate folder ``replicate-<i>/``: ``policy.pt`` (+ ``policy.json``) with the
best-validation weights, ``meta.csv`` (one row per truncation), ``validation.csv``, and
``checkpoint.pt`` (weights, meta-optimizer state, curriculum position).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from optamal.config import MetaConfig, resolve_device
from optamal.distributed import is_main
from optamal.console import console, progress, warn
from optamal.errors import OptamalError, UnsafeFileError
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
                     label: str, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.replicates`` independently seeded learned rules into ``run``.

    ``build(seed)`` returns (net, rule factory, teachers, policy header)."""
    upper = sum(cfg.max_validations * cfg.validate_every for _ in settings.unrolls)
    results: dict[str, Any] = dict(run.manifest.get("replicates") or {}) if resume else {}
    with progress(disable=not is_main()) as bar:
        for rep in range(cfg.replicates):
            if results.get(str(rep), {}).get("status") in ("completed", "diverged"):
                continue   # finished before the interruption
            seed = replicate_seed(cfg.seed, rep)
            torch.manual_seed(seed)
            net, make_rule, teachers, header = build(seed)
            out = run.path / f"replicate-{rep}"
            if run.write:
                out.mkdir(exist_ok=True)
            task = bar.add_task(f"{label} replicate {rep + 1}/{cfg.replicates}", total=upper, status="")
            status = _curriculum(out, problem, net, make_rule, teachers, settings, seed,
                                 dict(header, replicate=rep, seed=seed), bar, task, resume=resume)
            bar.update(task, completed=upper)
            results[str(rep)] = status
            run.update(replicates=results)
    good = {k: v for k, v in results.items() if v["status"] == "completed"}
    if not good:
        raise OptamalError(f"every replicate diverged (see {run.path}/replicate-*/meta.csv)")
    best = min(good, key=lambda k: good[k]["best_validation"])
    run.update(best_replicate=int(best))
    return results


CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"


def save_checkpoint(out: Path, payload: dict[str, Any]) -> None:
    """Atomically write checkpoint.pt, keeping the one before as checkpoint.prev.pt."""
    if not is_main():
        return
    cur = out / CHECKPOINT
    if cur.is_file():
        os.replace(cur, out / PREVIOUS_CHECKPOINT)
    atomic_torch_save(cur, payload)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a replicate folder (a damaged checkpoint.pt falls
    back to checkpoint.prev.pt with a warning), or None when there is none."""
    from optamal.runs import safe_torch_load

    present = [out / n for n in (CHECKPOINT, PREVIOUS_CHECKPOINT) if (out / n).is_file()]
    for path in present:
        try:
            ckpt = safe_torch_load(path, "checkpoint")
        except UnsafeFileError:
            raise            # a file carrying code stops the resume; it is never skipped over
        except OptamalError as exc:
            warn(f"{exc}; trying the previous checkpoint")
            continue
        if isinstance(ckpt, dict) and ckpt.get("format") == "optamal-checkpoint":
            return ckpt
        warn(f"{path} is not an optamal checkpoint; trying the previous one")
    if present:
        raise OptamalError(f"no readable checkpoint in {out}: cannot resume this replicate; "
                           "start a new run")
    return None


def _curriculum(out: Path, problem, net, make_rule, teachers, s: MetaSettings, seed: int,
                header: dict[str, Any], bar, task, resume: bool = False) -> dict[str, Any]:
    """The curriculum of one replicate, checkpointed after every meta-epoch and every
    validation so that ``--resume`` continues it exactly (same weights, bit for bit)."""
    import pandas as pd

    trainer = MetaTrainer(problem, net, make_rule, teachers, s, seed)
    pos = dict(stage=0, vals=0, since=0, stage_best=math.inf, cycle=0, best=math.inf, n_val=0,
               elapsed=0.0, status="running", error=None)
    meta_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        trainer.opt.load_state_dict(ckpt["meta_optimizer"])
        trainer.gen.set_state(ckpt["generator"])
        trainer.meta_epoch = int(ckpt["meta_epoch"])
        trainer.bad_in_row = int(ckpt["bad_in_row"])
        trainer.divergence_events = int(ckpt["divergence_events"])
        pos.update({k: ckpt["position"][k] for k in pos})
        if (out / "meta.csv").is_file():
            df = pd.read_csv(out / "meta.csv")
            meta_rows = df[df.meta_epoch < trainer.meta_epoch].to_dict("records")
        if (out / "validation.csv").is_file():
            df = pd.read_csv(out / "validation.csv")
            val_rows = df[df.validation <= pos["n_val"]].to_dict("records")
        bar.update(task, completed=trainer.meta_epoch)
    t_start = time.perf_counter() - pos["elapsed"]

    def checkpoint() -> None:
        pos["elapsed"] = time.perf_counter() - t_start
        save_checkpoint(out, {
            "format": "optamal-checkpoint", "net": net.state_dict(),
            "meta_optimizer": trainer.opt.state_dict(), "generator": trainer.gen.get_state(),
            "meta_epoch": trainer.meta_epoch, "bad_in_row": trainer.bad_in_row,
            "divergence_events": trainer.divergence_events, "position": dict(pos)})

    def on_trunc(row: dict[str, Any]) -> None:
        bar.update(task, status=(f"stage {row['stage'] + 1}/{len(s.unrolls)} epoch {row['meta_epoch']} "
                                 f"meta {row['meta_loss']:+.3f} distill {row['distill_loss']:+.2f}"))

    try:
        while pos["status"] == "running" and pos["stage"] < len(s.unrolls):
            stage = pos["stage"]
            unroll, alpha = s.unrolls[stage], s.alphas[stage]
            if pos["cycle"] < s.validate_every:
                meta_rows += trainer.meta_epoch_run(stage, unroll, alpha, on_trunc)
                bar.advance(task)
                pos["cycle"] += 1
                _write_csv(out / "meta.csv", meta_rows, META_COLUMNS)
                checkpoint()
                continue
            v = trainer.validate()
            pos["vals"] += 1
            pos["n_val"] += 1
            pos["cycle"] = 0
            value = v["val_log_loss"]
            is_best = math.isfinite(value) and value < pos["best"]
            if is_best:
                pos["best"] = value
                if is_main():
                    save_policy(out / "policy.pt", net, dict(
                        header, best_validation=value, meta_epoch=trainer.meta_epoch, stage=stage))
            if math.isfinite(value) and value < pos["stage_best"]:
                pos["stage_best"], pos["since"] = value, 0
            else:
                pos["since"] += 1
            val_rows.append(dict(stage=stage, meta_epoch=trainer.meta_epoch, validation=pos["n_val"],
                                 val_log_loss=value, val_final_loss=v["val_final_loss"],
                                 best=is_best, seconds=time.perf_counter() - t_start))
            _write_csv(out / "validation.csv", val_rows, VAL_COLUMNS)
            if pos["vals"] >= s.max_validations or (pos["vals"] >= s.min_validations
                                                     and pos["since"] >= s.patience):
                pos.update(stage=stage + 1, vals=0, since=0, stage_best=math.inf)
            if pos["stage"] >= len(s.unrolls):
                pos["status"] = "completed"
            checkpoint()
    except ReplicateDiverged as exc:
        meta_rows += exc.rows   # the meta-epoch that ended the replicate is logged too
        pos.update(status="diverged", error=str(exc))
        if is_main():
            warn(f"{out.name} diverged: {exc}; going on with the other replicates")
        checkpoint()
    _write_csv(out / "meta.csv", meta_rows, META_COLUMNS)
    best = pos["best"]
    status, error = pos["status"], pos["error"]
    if not math.isfinite(best):
        status = "diverged"
        error = error or "no finite validation loss"
    return {"status": status, "error": error, "best_validation": best if math.isfinite(best) else None,
            "meta_epochs": trainer.meta_epoch, "validations": pos["n_val"],
            "divergence_events": trainer.divergence_events,
            "seconds": round(time.perf_counter() - t_start, 2)}


def _write_csv(path: Path, rows, columns) -> None:
    if is_main():
        atomic_write_csv(path, _frame(rows, columns))


def _frame(rows, columns):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def resumed_config(cls, path: str, command: str):
    """(config, run) of an interrupted ``command`` run to continue: the stored config, with
    its prerequisites pinned to the exact runs it used."""
    import dataclasses
    from datetime import datetime, timezone

    run = Run.load(path)
    run.write = is_main()
    if run.command != command:
        raise OptamalError(f"--resume expects a {command} run folder, got a {run.command} run ({path})")
    if run.status == "completed":
        raise OptamalError(f"{path} already completed; nothing to resume")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in run.config.items() if k in names}
    pre = run.manifest.get("prerequisites") or {}
    if pre.get("lrs"):
        values["lrs"] = pre["lrs"]
    if pre.get("choice_policy"):
        values["choice"] = pre["choice_policy"]
    values["resume"] = str(path)
    cfg = cls(**values)
    cfg.validate()
    for rep in sorted(run.path.glob("replicate-*")):   # refuse unsafe checkpoints up front
        if rep.is_dir():
            load_checkpoint(rep)
    stamps = list(run.manifest.get("resumed") or []) + [datetime.now(timezone.utc).isoformat(timespec="seconds")]
    run.update(status="running", error=None, resumed=stamps)
    return cfg, run


def device_for(cfg: MetaConfig) -> str:
    return resolve_device(cfg.device)
