"""``optamal tune-lr``: grid-search each teacher's learning rate (METHOD.md §7).

Every (teacher, lr, repeat) point trains the problem from the repeat's warm start for
``epochs`` epochs; the criterion is the best validation loss over epochs, averaged over
repeats. A point whose loss goes non-finite is recorded as diverged and can never win.

Points are independent, so they run in worker processes with one thread each (the
fastest way on CPU for small CNNs, where ``vmap`` over K copies measured slower than a
loop); ``--workers 1`` runs them in this process.

Writes ``grid.csv`` (teacher, lr, repeat, epoch, train_loss, val_loss, val_acc, diverged,
seconds; rewritten atomically as points finish), ``lrs.json`` and ``grid.png``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from optamal.config import TuneLRConfig, resolve_device
from optamal.console import console, progress
from optamal.errors import OptamalError
from optamal.runs import Run, atomic_write_csv, atomic_write_json, read_json

GRID_COLUMNS = ["teacher", "lr", "repeat", "epoch", "train_loss", "val_loss", "val_acc",
                "diverged", "seconds"]


def _problem_from_cfg(cfg: dict[str, Any], device: str):
    from optamal.problems import make_problem

    return make_problem(cfg["problem"], dataset=cfg["dataset"], profile=cfg["profile"],
                        data_root=cfg["data_root"], download=cfg["download"],
                        batch_size=cfg["batch_size"], max_train=cfg["max_train"],
                        max_val=cfg["max_val"], device=device)


# Worker-process state: the problem and the warm starts, built once per process.
_WORKER: dict[str, Any] = {}


def _worker_init(cfg: dict[str, Any], device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(cfg=cfg, problem=_problem_from_cfg(cfg, device), warm={})


def _run_point(teacher: str, lr: float, repeat: int) -> list[dict[str, Any]]:
    from optamal.engine import train_epochs, warm_start
    from optamal.rules.teachers import Teacher

    cfg, problem = _WORKER["cfg"], _WORKER["problem"]
    seed = cfg["seed"] + repeat
    if repeat not in _WORKER["warm"]:
        _WORKER["warm"][repeat] = warm_start(problem, seed, cfg["warmup_steps"], cfg["warmup_lr"])
    records = train_epochs(problem, Teacher(teacher, lr), _WORKER["warm"][repeat], seed, cfg["epochs"])
    return [dict(teacher=teacher, lr=lr, repeat=repeat, **r.as_dict()) for r in records]


def select_rates(rows: list[dict[str, Any]], teachers: list[str]) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
    """Per teacher, the lr with the lowest mean (over repeats) best validation loss.

    A point is diverged if any repeat diverged at any epoch; it can never win."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=GRID_COLUMNS)
    values: dict[str, dict[str, float | None]] = {}
    chosen: dict[str, float | None] = {}
    for t in teachers:
        sub = df[df.teacher == t]
        values[t] = {}
        best_lr, best_v = None, math.inf
        for lr, pts in sub.groupby("lr"):
            if pts.diverged.astype(bool).any():
                values[t][repr(float(lr))] = None
                continue
            v = float(pts.groupby("repeat").val_loss.min().mean())
            values[t][repr(float(lr))] = v
            if math.isfinite(v) and v < best_v:
                best_lr, best_v = float(lr), v
        chosen[t] = best_lr
    return chosen, values


def plot_grid(rows: list[dict[str, Any]], teachers: list[str], chosen: dict[str, float | None],
              path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows, columns=GRID_COLUMNS)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    finite = []
    per_teacher = {}
    for t in teachers:
        sub = df[df.teacher == t]
        pts = []
        for lr, g in sub.groupby("lr"):
            div = bool(g.diverged.astype(bool).any())
            v = math.nan if div else float(g.groupby("repeat").val_loss.min().mean())
            pts.append((float(lr), v, div))
            if not div and math.isfinite(v):
                finite.append(v)
        per_teacher[t] = sorted(pts)
    top = (max(finite) * 1.15) if finite else 1.0
    bottom = (min(finite) * 0.9) if finite else 0.1
    for i, t in enumerate(teachers):
        pts = per_teacher[t]
        color = f"C{i}"
        ok = [(lr, v) for lr, v, d in pts if not d]
        if ok:
            ax.plot([p[0] for p in ok], [p[1] for p in ok], "-o", color=color, ms=4, label=t)
        bad = [lr for lr, v, d in pts if d]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=8, mew=2,
                    label=f"{t} (diverged)")
        if chosen.get(t) is not None:
            v = dict((lr, v) for lr, v, d in pts)[chosen[t]]
            ax.plot([chosen[t]], [v], "*", color=color, ms=14, mec="black")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top * 1.08)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best validation loss (mean over repeats)")
    ax.set_title("tune-lr: validation loss vs learning rate (★ selected, × diverged)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.tight_layout()
    import io

    from optamal.runs import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def tune_lr(cfg: TuneLRConfig) -> Run:
    from optamal.rules.teachers import pool_members

    device = resolve_device(cfg.device)
    teachers = list(cfg.teachers) if cfg.teachers else list(pool_members(cfg.pool))
    cfg_d = cfg.to_dict()
    problem = _problem_from_cfg(cfg_d, device)   # validates problem and data before any run
    points = [(t, lr, r) for r in range(cfg.repeats) for t in teachers for lr in cfg.grid]
    workers = cfg.workers or _auto_workers(len(points) * cfg.epochs)
    workers = max(1, min(workers, len(points)))
    if device == "cuda":
        workers = 1
    run = Run.create(cfg.runs_dir, "tune-lr", cfg_d, name=cfg.name, seed=cfg.seed, device=device,
                     extra={"problem": problem.describe(), "teachers": teachers})
    console.print(f"tune-lr: {len(teachers)} teachers × {len(cfg.grid)} rates × {cfg.repeats} "
                  f"repeat(s) on {problem.name}/{problem.dataset.name} "
                  f"({problem.n_params:,} params), {workers} worker(s) → {run.path}")
    rows: list[dict[str, Any]] = []
    with run.track():
        with progress() as bar:
            task = bar.add_task("grid points", total=len(points), status="")

            def collect(recs: list[dict[str, Any]]) -> None:
                rows.extend(recs)
                rows.sort(key=lambda r: (r["teacher"], r["lr"], r["repeat"], r["epoch"]))
                atomic_write_csv(run.file("grid.csv"), _frame(rows))
                last = recs[-1]
                status = "diverged" if last["diverged"] else f"val {last['val_loss']:.3f}"
                bar.update(task, advance=1, status=f"{last['teacher']} lr={last['lr']:g}: {status}")

            if workers == 1:
                import torch

                threads = torch.get_num_threads()
                _worker_init(cfg_d, device, threads)
                for p in points:
                    collect(_run_point(*p))
            else:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                         initargs=(cfg_d, device, 1)) as pool:
                    futures = [pool.submit(_run_point, *p) for p in points]
                    for fut in as_completed(futures):
                        collect(fut.result())
        chosen, values = select_rates(rows, teachers)
        atomic_write_json(run.file("lrs.json"), {
            "pool": cfg.pool, "problem": problem.name, "dataset": problem.dataset.name,
            "criterion": f"best validation loss over {cfg.epochs} epochs, mean over "
                         f"{cfg.repeats} repeat(s); diverged points excluded",
            "lrs": chosen, "values": values})
        plot_grid(rows, teachers, chosen, run.file("grid.png"))
        missing = [t for t, lr in chosen.items() if lr is None]
        run.update(selected_lrs=chosen)
        _print_table(rows, teachers, chosen, values)
        if missing:
            raise OptamalError(f"every rate diverged for {', '.join(missing)}: widen --grid "
                               f"(results kept in {run.path})")
    return run


def _auto_workers(point_epochs: int) -> int:
    """One worker per core once the grid is long enough to repay the workers' start-up
    (spawning a process and importing torch: ~3 s each). Measured on 2 cores: one step of
    the train problem takes 31 ms with 2 threads and 47 ms with 1, so two 1-thread workers
    give ~1.3× the throughput of one 2-thread process on long grids, and lose on tiny ones."""
    cores = os.cpu_count() or 1
    return cores if point_epochs >= 16 * cores else 1


def _frame(rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=GRID_COLUMNS)


def _print_table(rows, teachers, chosen, values) -> None:
    from rich.table import Table

    import pandas as pd

    df = pd.DataFrame(rows, columns=GRID_COLUMNS)
    table = Table(title="tune-lr: selected learning rates")
    for col in ("teacher", "lr", "best val loss", "val acc", "diverged points"):
        table.add_column(col, justify="right" if col != "teacher" else "left")
    for t in teachers:
        lr = chosen[t]
        sub = df[df.teacher == t]
        n_div = int(sub.groupby(["lr", "repeat"]).diverged.any().sum())
        if lr is None:
            table.add_row(t, "—", "—", "—", str(n_div))
            continue
        at = sub[sub.lr == lr]
        acc = at.loc[at.groupby("repeat").val_loss.idxmin(), "val_acc"].mean()
        table.add_row(t, f"{lr:g}", f"{values[t][repr(lr)]:.4f}", f"{acc:.3f}", str(n_div))
    console.print(table)


def load_lrs(path_or_run) -> dict[str, float]:
    """The ``{teacher: lr}`` map of a tune-lr run (folder or lrs.json path)."""
    from pathlib import Path

    p = Path(path_or_run)
    if p.is_dir():
        if (p / "manifest.json").exists():
            from optamal.runs import Run

            run = Run.load(p)   # a damaged or newer-schema run folder is refused, not trusted
            if run.command != "tune-lr":
                raise OptamalError(f"{p} is a {run.command} run, not a tune-lr run: pass a tune-lr "
                                   "run folder or its lrs.json to --lrs")
        p = p / "lrs.json"
    data = read_json(p, "learning-rate file")
    lrs = data.get("lrs") if isinstance(data, dict) else None
    if not isinstance(lrs, dict):
        raise OptamalError(f"malformed learning-rate file {p}: no 'lrs' mapping")
    return lrs
