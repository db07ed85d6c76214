"""``optamal pipeline``: the whole method in one resumable run folder tree.

tune-lr (pool large) → train-choice (large) → distill (choice, large; and scheme none, the
RNNProp baseline) → evaluate (the learned runs, the choice teacher and the tuned teachers)
→ report, all under ``<runs-dir>/pipeline/<name>/`` (``<name>`` defaults to the profile,
so running the same command again resumes). Each step is the ordinary command function
with ``runs_dir`` set to that folder, so steps find their prerequisites there and nowhere
else. ``--sweep full`` adds the runs behind Fig. 1 (mean / min-max / choice on both pools)
Fig. 2's other learned baselines (DM, Scale, imitation of one teacher) and Fig. 6 (random
and adversarial perturbations at the paper's magnitudes).

Resume: the pipeline manifest records each step's run folder. A step is skipped when its
run is ``completed`` and none of the steps it depends on ran again in this invocation;
an interrupted train-choice, distill or evaluate step continues in its own folder from its
checkpoints (their ``--resume``); a failed step runs afresh in a new folder (``<key>-2``,
...), the old one kept. Either way everything downstream runs again.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optamal.console import console, out, warn
from optamal.errors import OptamalError
from optamal.report_config import (PIPELINE_STEP_OVERRIDES, PipelineConfig, ReportConfig,
                                   step_sets_for)
from optamal.runs import Run, _now

#: Pipeline config fields that define the results: a resume must not change them.
IDENTITY_FIELDS = ("profile", "sweep", "pool", "lrs", "problems", "replicates", "repeats",
                   "epochs", "seed", "step_sets")

#: Fig. 6 grid (METHOD §6): random σ and adversarial ε.
RANDOM_MAGNITUDES = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
ADV_MAGNITUDES = (1e-4, 1e-3)


@dataclass
class Step:
    """One step: a command kind, its own config fields, and the steps it needs first.

    ``fields(paths)`` maps the finished dependencies' run folders to config overrides."""

    key: str
    kind: str
    deps: tuple[str, ...]
    fields: Callable[[dict[str, str]], dict[str, Any]]
    what: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def plan(cfg: PipelineConfig) -> list[Step]:
    """The steps of the pipeline, in execution order (dependencies first)."""
    pool = cfg.pool
    steps: list[Step] = []
    lrs_dep: tuple[str, ...] = ()
    if cfg.lrs is None:
        steps.append(Step("tune-lr", "tune-lr", (), lambda p: dict(pool="large"),
                          "learning rates of the six teachers (§7)"))
        lrs_dep = ("tune-lr",)

    def lrs(p: dict[str, str]) -> str:
        return cfg.lrs if cfg.lrs is not None else p["tune-lr"]

    pools = [pool] + ([q for q in ("small", "large") if q != pool] if cfg.sweep == "full" else [])
    for q in pools:
        steps.append(Step(f"train-choice-{q}", "train-choice", lrs_dep,
                          lambda p, q=q: dict(pool=q, lrs=lrs(p), replicates=cfg.replicates),
                          f"choice optimizer, pool {q} (§4)"))
        steps.append(Step(f"distill-choice-{q}", "distill", lrs_dep + (f"train-choice-{q}",),
                          lambda p, q=q: dict(scheme="choice", pool=q, lrs=lrs(p),
                                              choice=p[f"train-choice-{q}"],
                                              replicates=cfg.replicates),
                          f"choice amalgamation, pool {q} (Eq. 4)"))
    steps.append(Step("distill-none", "distill", lrs_dep,
                      lambda p: dict(scheme="none", pool=pool, lrs=lrs(p), replicates=cfg.replicates),
                      "RNNProp baseline, meta loss only"))
    if cfg.sweep == "full":
        # The other learned baselines of Fig. 2: L2O-DM ("Original"), Scale, and "Stronger
        # Baselines" (RNNProp + curriculum + imitation of one teacher, Chen et al. 2020).
        for policy in ("dm", "scale"):
            steps.append(Step(f"distill-none-{policy}", "distill", lrs_dep,
                              lambda p, pol=policy: dict(scheme="none", policy=pol, pool=pool,
                                                         lrs=lrs(p), replicates=cfg.replicates),
                              f"{policy} baseline, meta loss only"))
        steps.append(Step("distill-mean-adam", "distill", lrs_dep,
                          lambda p: dict(scheme="mean", pool="small", teachers=("adam",),
                                         lrs=lrs(p), replicates=cfg.replicates),
                          "Stronger Baselines: imitation of Adam alone"))
        for q in ("small", "large"):
            for scheme in ("mean", "minmax"):
                steps.append(Step(f"distill-{scheme}-{q}", "distill", lrs_dep,
                                  lambda p, q=q, s=scheme: dict(scheme=s, pool=q, lrs=lrs(p),
                                                                replicates=cfg.replicates),
                                  f"{scheme} amalgamation, pool {q} (Eq. {2 if scheme == 'mean' else 3})"))
        for kind, mags in (("random", RANDOM_MAGNITUDES), ("adv", ADV_MAGNITUDES)):
            for m in mags:
                steps.append(Step(f"distill-choice-{pool}-{kind}{m:g}", "distill",
                                  lrs_dep + (f"train-choice-{pool}",),
                                  lambda p, k=kind, m=m: dict(
                                      scheme="choice", pool=pool, lrs=lrs(p),
                                      choice=p[f"train-choice-{pool}"], perturb=k, magnitude=m,
                                      replicates=cfg.replicates),
                                  f"choice-{pool} with {kind} perturbation {m:g} (Eq. {5 if kind == 'random' else 6})"))
    learned = [s.key for s in steps if s.kind in ("train-choice", "distill")]
    steps.append(Step("evaluate", "evaluate", tuple(learned) + lrs_dep,
                      lambda p: dict(runs=tuple(p[k] for k in learned), lrs=lrs(p),
                                     problems=cfg.resolved_problems, repeats=cfg.repeats,
                                     epochs=cfg.epochs, workers=cfg.workers or None,
                                     teachers="auto"),
                      "every learned run, the choice teachers and the tuned teachers (§9)"))
    steps.append(Step("report", "report", ("evaluate",), lambda p: {},
                      "statistics, figures and tables (§9)"))
    return steps


def _config_for(step: Step, cfg: PipelineConfig, root: Path, paths: dict[str, str], name: str,
                resume: str | None = None):
    """The step's validated config: its profile, the pipeline's per-profile sizes, the
    step's fields, then ``--step-set`` overrides (``resume``: continue that run folder)."""
    if step.kind == "report":
        return ReportConfig.build(cfg.profile, dict(
            source=str(root), out=str(root / "report" / name), seed=cfg.seed, device=cfg.device,
            name=name))
    from optamal.config import ChoiceConfig, DistillConfig, EvaluateConfig, TuneLRConfig

    cls = {"tune-lr": TuneLRConfig, "train-choice": ChoiceConfig, "distill": DistillConfig,
           "evaluate": EvaluateConfig}[step.kind]
    values: dict[str, Any] = dict(PIPELINE_STEP_OVERRIDES.get(cfg.profile, {}).get(step.kind, {}))
    if step.kind in ("tune-lr",) and cfg.workers:
        values["workers"] = cfg.workers
    values.update({k: v for k, v in step.fields(paths).items() if v is not None})
    values.update(seed=cfg.seed, device=cfg.device, runs_dir=str(root), name=name,
                  data_root=cfg.data_root, download=cfg.download or None)
    if resume:
        values["resume"] = resume
    sets = [rest for head, rest in map(step_sets_for, cfg.step_sets) if head == step.kind]
    return cls.build(cfg.profile, values, sets)


def _execute(kind: str, step_cfg) -> Run:
    if kind == "tune-lr":
        from optamal.commands.tune_lr import tune_lr

        return tune_lr(step_cfg)
    if kind == "train-choice":
        from optamal.commands.train_choice import train_choice

        return train_choice(step_cfg)
    if kind == "distill":
        from optamal.commands.distill import distill

        return distill(step_cfg)
    if kind == "evaluate":
        from optamal.commands.evaluate import evaluate

        return evaluate(step_cfg)
    from optamal.commands.report import report

    return report(step_cfg)


def _free_name(root: Path, kind: str, key: str) -> str:
    """``key`` for the step's folder, or ``key-2``, ``key-3``... if an earlier attempt
    (failed or interrupted) holds it."""
    base = key.removeprefix(f"{kind}-") or key
    name, n = base, 1
    while (root / kind / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _resumable(step: Step, path: str | None) -> str | None:
    """The step's earlier run folder if it can be continued: an interrupted (or killed:
    still "running") train-choice, distill or evaluate run. Failed runs start afresh."""
    if step.kind not in ("train-choice", "distill", "evaluate") or not path:
        return None
    try:
        status = Run.load(path).status
    except OptamalError:
        return None
    return path if status in ("interrupted", "running") else None


def _completed(path: str | None) -> bool:
    if not path or not Path(path).is_dir():
        return False
    try:
        return Run.load(path).status == "completed"
    except OptamalError:
        return False


def _identity(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out_: dict[str, Any] = {}
    for k in IDENTITY_FIELDS:
        v = cfg_dict.get(k)
        out_[k] = list(v) if isinstance(v, (tuple, list)) else v
    return out_


def _open_pipeline(cfg: PipelineConfig, root: Path) -> Run:
    cfg_d = cfg.to_dict()
    if (root / "manifest.json").is_file():
        run = Run.load(root)
        if run.command != "pipeline":
            raise OptamalError(f"{root} holds a {run.command} run, not a pipeline")
        old, new = _identity(run.config), _identity(cfg_d)
        diff = [k for k in IDENTITY_FIELDS if old.get(k) != new.get(k)]
        if diff:
            k = diff[0]
            raise OptamalError(
                f"pipeline {root} was started with {k}={old.get(k)!r}, this call has "
                f"{k}={new.get(k)!r}: repeat the original options to resume it, or pass "
                f"--name NEW for a separate pipeline")
        other = run.manifest.get("pid")
        if run.status == "running" and run.manifest.get("host") == socket.gethostname() \
                and isinstance(other, int) and other != os.getpid() and _alive(other):
            raise OptamalError(f"pipeline {root} is already running (process {other}); wait for "
                               "it, or stop it, before resuming")
        run.manifest.update(status="running", ended=None, error=None, pid=os.getpid(),
                            host=socket.gethostname(),
                            resumed=run.manifest.get("resumed", []) + [_now()])
        run.save_manifest()
        return run
    return Run.create(cfg.runs_dir, "pipeline", cfg_d, name=cfg.run_name, seed=cfg.seed,
                      device=cfg.device, extra={"steps": {}, "pid": os.getpid()})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pipeline(cfg: PipelineConfig) -> Run | None:
    """Run (or resume) the pipeline; returns its run (None for ``dry_run``)."""
    root = Path(cfg.runs_dir) / "pipeline" / cfg.run_name
    steps = plan(cfg)
    # Validate on entry: build every step's config (with stand-in paths for the runs that
    # do not exist yet), so a bad --step-set fails now, not an hour into the pipeline.
    stand_in = {s.key: str(root / s.kind / "pending") for s in steps}
    for s in steps:
        _config_for(s, cfg, root, stand_in, "check")
    if cfg.dry_run:
        _print_plan(cfg, root, steps)
        return None
    run = _open_pipeline(cfg, root)
    records: dict[str, dict[str, Any]] = run.manifest.setdefault("steps", {})
    console.print(f"pipeline ({cfg.profile}, sweep {cfg.sweep}): {len(steps)} steps → {root}")
    paths: dict[str, str] = {}
    reran: set[str] = set()
    t_all = time.perf_counter()
    with run.track():
        for i, step in enumerate(steps, 1):
            rec = records.get(step.key, {})
            fresh_deps = [d for d in step.deps if d in reran]
            if _completed(rec.get("run")) and not fresh_deps:
                paths[step.key] = rec["run"]
                rec["skipped"] = True
                console.print(f"[dim][{i}/{len(steps)}] {step.key}: completed earlier "
                              f"({rec.get('seconds', 0):.0f} s), skipped → {rec['run']}[/dim]")
                run.save_manifest()
                continue
            if rec.get("run") and fresh_deps:
                console.print(f"[{i}/{len(steps)}] {step.key}: re-running because "
                              f"{', '.join(fresh_deps)} ran again")
            target = None if fresh_deps else _resumable(step, rec.get("run"))
            if target:   # interrupted meta-training / evaluation: continue from its checkpoints
                name = Path(target).name
                step_cfg = _config_for(step, cfg, root, paths, name, resume=target)
                console.rule(f"[bold][{i}/{len(steps)}] {step.key}[/bold] — resuming {target}")
            else:
                name = _free_name(root, step.kind, step.key)
                step_cfg = _config_for(step, cfg, root, paths, name)
                console.rule(f"[bold][{i}/{len(steps)}] {step.key}[/bold] — {step.what}")
            records[step.key] = rec = {"kind": step.kind, "run": str(root / step.kind / name),
                                       "status": "running", "started": _now(), "skipped": False,
                                       "resumed": bool(target)}
            run.save_manifest()
            t0 = time.perf_counter()
            try:
                result = _execute(step.kind, step_cfg)
            except BaseException as exc:
                rec.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           seconds=round(time.perf_counter() - t0, 1),
                           error=str(exc) or type(exc).__name__)
                run.save_manifest()
                raise
            rec.update(status="completed", run=str(result.path),
                       seconds=round(time.perf_counter() - t0, 1))
            paths[step.key] = str(result.path)
            reran.add(step.key)
            elapsed = time.perf_counter() - t_all
            console.print(f"[green]✓[/green] {step.key} in {rec['seconds']:.0f} s "
                          f"(pipeline {elapsed / 60:.1f} min so far)")
            run.save_manifest()
        run.manifest["report"] = paths.get("report")
        # wall_seconds spans every invocation (and the pauses between them); these do not.
        run.manifest["steps_seconds"] = round(sum(float(r.get("seconds") or 0)
                                                  for r in records.values()), 1)
        run.manifest["invocation_seconds"] = round(time.perf_counter() - t_all, 1)
        _print_steps(steps, records, root)
    rep = paths.get("report")
    if rep:
        out(str(Path(rep) / "report.md"))
    return run


def _print_steps(steps: list[Step], records: dict[str, dict[str, Any]], root: Path) -> None:
    from rich.table import Table

    table = Table(title=f"pipeline steps (runs under {root})")
    for col in ("step", "status", "seconds", "run"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    total = 0.0
    for s in steps:
        rec = records.get(s.key, {})
        secs = float(rec.get("seconds") or 0)
        total += secs
        st = "skipped (done)" if rec.get("skipped") else rec.get("status", "—")
        run_path = rec.get("run")
        shown = os.path.relpath(run_path, root) if run_path else "—"
        table.add_row(s.key, st, f"{secs:.0f}", shown)
    table.add_row("total", "", f"{total:.0f}", "")
    console.print(table)


def _print_plan(cfg: PipelineConfig, root: Path, steps: list[Step]) -> None:
    from rich.table import Table

    records: dict[str, Any] = {}
    if (root / "manifest.json").is_file():
        try:
            records = Run.load(root).manifest.get("steps", {}) or {}
        except OptamalError as exc:
            warn(str(exc))
    table = Table(title=f"pipeline plan ({cfg.profile}, sweep {cfg.sweep}) → {root}")
    for col in ("#", "step", "command", "needs", "state"):
        table.add_column(col)
    for i, s in enumerate(steps, 1):
        done = _completed(records.get(s.key, {}).get("run"))
        needs = ", ".join(s.deps) if len(s.deps) <= 3 else f"{len(s.deps)} earlier steps"
        table.add_row(str(i), s.key, s.kind, needs or "—",
                      "completed (would skip)" if done else "to run")
    console.print(table)
    for s in steps:
        out(f"{s.key}: {s.what}")
