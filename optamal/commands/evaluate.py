"""``optamal evaluate``: train problems with learned and analytical optimizers (METHOD §9).

Every replicate of each learned run given, plus the analytical teachers at their tuned
rates, trains each problem ``repeats`` times ("evaluations") for ``epochs`` epochs.
Evaluation j of every optimizer starts from the same θ0, the same warmup and the same
data order (a paired design). One row per (optimizer, run, replicate, evaluation,
problem, epoch) goes to ``evaluations.csv``; a non-finite loss marks that evaluation
diverged from that epoch on and the sweep continues.

Cells (optimizer × problem × evaluation) are independent: on CPU they run in worker
processes with one thread each (measured faster than one 2-thread process for the small
CNNs; see benchmarks/). ``--resume RUN_DIR`` completes an interrupted sweep, skipping the
cells already complete in its CSV.
"""

from __future__ import annotations

import glob
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from optamal.config import EvaluateConfig, resolve_device
from optamal.console import console, progress, warn
from optamal.errors import OptamalError
from optamal.runs import Run, atomic_write_csv, find_runs, read_json

EVAL_COLUMNS = ["optimizer", "run", "replicate", "evaluation", "problem", "epoch", "train_loss",
                "val_loss", "val_acc", "seconds", "diverged"]
CELL_KEYS = ["optimizer", "run", "replicate", "problem", "evaluation"]


# --------------------------------------------------------------------------- what to evaluate
def optimizer_label(header: dict[str, Any]) -> str:
    """A readable name for a learned policy: e.g. choice-large, minmax-small-adv1e-04,
    rnnprop (scheme none), choice-optimizer-large (a train-choice result)."""
    if header.get("kind") == "choice":
        return f"choice-optimizer-{header.get('pool', '?')}"
    scheme = header.get("scheme", "none")
    if scheme == "none":
        label = header.get("kind", "rnnprop")   # rnnprop, dm (Original), scale
    elif scheme in ("mean", "minmax") and len(header.get("teachers", [])) == 1:
        label = f"{scheme}-{header['teachers'][0]}"
    else:
        label = f"{scheme}-{header.get('pool', '?')}"
    if header.get("perturb", "none") != "none":
        label += f"-{header['perturb']}{header.get('magnitude', 0):g}"
    return label


#: ``--learned pretrained`` (or ``optamal evaluate pretrained``): the policy shipped in the package.
PRETRAINED = "pretrained"


def learned_entries(specs: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Expand run folders / replicate folders / policy files / globs (and the word
    ``pretrained``, the policy shipped in the package) into entries."""
    from optamal.policies import load_policy

    entries: list[dict[str, Any]] = []
    run_dirs: list[Path] = []
    for spec in specs:
        if spec == PRETRAINED:   # the policy shipped inside the package
            from optamal.pretrained import PRETRAINED_DIR, default_policy_path

            pol = default_policy_path()
            load_policy(pol)
            run_dirs.append(PRETRAINED_DIR)
            entries.append(dict(optimizer=PRETRAINED, kind="learned", run=PRETRAINED,
                                run_path=str(PRETRAINED_DIR.resolve()), replicate=0,
                                policy=str(pol.resolve())))
            continue
        paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not paths:
            raise OptamalError(f"no run matches {spec!r}")
        for p in map(Path, paths):
            if p.is_file():
                policies = [p]
            elif (p / "policy.pt").is_file():
                policies = [p / "policy.pt"]
            elif p.is_dir() and sorted(p.glob("replicate-*/policy.pt")):
                policies = sorted(p.glob("replicate-*/policy.pt"),
                                  key=lambda q: int(q.parent.name.split("-")[1]))
            elif p.is_dir():
                raise OptamalError(f"{p} holds no policy.pt (expected a distill or train-choice run)")
            else:
                raise OptamalError(f"run not found: {p}")
            for pol in policies:
                _, header = load_policy(pol)   # weights that do not fit are refused before any run starts
                run_dir = pol.parent.parent if pol.parent.name.startswith("replicate-") else pol.parent
                run_dirs.append(run_dir)
                entries.append(dict(optimizer=optimizer_label(header), kind="learned",
                                    run=run_dir.name, run_path=str(run_dir.resolve()),
                                    replicate=int(header.get("replicate", 0)),
                                    policy=str(pol.resolve())))
    return entries, run_dirs


def teacher_entries(cfg: EvaluateConfig, run_dirs: list[Path]) -> tuple[list[dict[str, Any]], str | None]:
    from optamal.commands.tune_lr import load_lrs
    from optamal.rules.teachers import PAPER_LRS, TEACHERS

    if cfg.teachers == "none":
        return [], None
    names = list(TEACHERS) if cfg.teachers == "auto" else [t.strip() for t in cfg.teachers.split(",")]
    source: str | None = None
    if cfg.lrs == "paper":
        lrs, source = dict(PAPER_LRS), "paper"
    elif cfg.lrs is not None:
        lrs, source = load_lrs(cfg.lrs), str(Path(cfg.lrs).resolve())
    else:
        lrs = None
        for rd in run_dirs:   # the rates the learned runs were trained with
            if (rd / "lrs.json").is_file():   # a folder that carries them (the shipped policy)
                cand = load_lrs(rd / "lrs.json")
                if all(cand.get(t) is not None for t in names):
                    lrs, source = cand, str((rd / "lrs.json").resolve())
                    break
            try:
                pre = read_json(rd / "manifest.json", "manifest").get("prerequisites", {})
            except OptamalError:
                continue
            if pre.get("lrs") == "paper":
                lrs, source = dict(PAPER_LRS), "paper"
            elif pre.get("lrs") and Path(pre["lrs"]).exists():
                cand = load_lrs(pre["lrs"])
                if all(cand.get(t) is not None for t in names):
                    lrs, source = cand, str(Path(pre["lrs"]).resolve())
            if lrs is not None:
                break
        if lrs is None:
            runs = [r for r in find_runs(cfg.runs_dir, "tune-lr")
                    if all((r.manifest.get("selected_lrs") or {}).get(t) is not None for t in names)]
            if not runs:
                raise OptamalError(
                    f"no tuned rates for the teachers ({', '.join(names)}) under {cfg.runs_dir}: run "
                    "`optamal tune-lr --pool large` first, pass --lrs PATH or --lrs paper, "
                    "or --teachers none")
            lrs, source = load_lrs(runs[-1].path), str(runs[-1].path.resolve())
    missing = [t for t in names if lrs.get(t) is None]
    if missing:
        raise OptamalError(f"no tuned rate for {', '.join(missing)} in {source}")
    run_name = "paper" if source == "paper" else Path(source).name if source else "-"
    if run_name == "lrs.json":
        run_name = Path(source).parent.name
    return [dict(optimizer=t, kind="teacher", run=run_name, run_path=source, replicate=0,
                 teacher=t, lr=float(lrs[t])) for t in names], source


def available_problems(cfg: EvaluateConfig) -> tuple[list[str], dict[str, str]]:
    """The problems asked for (default: all) whose data load here, and why others don't."""
    from optamal.data import dataset_available
    from optamal.problems import PROBLEMS, resolve_dataset_name

    wanted = list(cfg.problems) if cfg.problems else list(PROBLEMS)
    ok, skipped = [], {}
    for name in wanted:
        if ":" in name:
            ok.append(name)
            continue
        ds = resolve_dataset_name(name, cfg.dataset, cfg.profile)
        good, why = dataset_available(ds, cfg.data_root)
        if good or cfg.download:
            ok.append(name)
        else:
            skipped[name] = why
    if cfg.problems and skipped:
        first = next(iter(skipped.items()))
        raise OptamalError(f"problem {first[0]} cannot run here: {first[1]}")
    return ok, skipped


# --------------------------------------------------------------------------- workers
_W: dict[str, Any] = {}


def _worker_init(cfg: dict[str, Any], device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _W.clear()
    _W.update(cfg=cfg, device=device, problems={}, policies={}, warm={})


def _problem(name: str):
    from optamal.problems import make_problem

    if name not in _W["problems"]:
        c = _W["cfg"]
        _W["problems"][name] = make_problem(
            name, dataset=c["dataset"], profile=c["profile"], data_root=c["data_root"],
            download=c["download"], batch_size=c["batch_size"], max_train=c["max_train"],
            max_val=c["max_val"], device=_W["device"])
    return _W["problems"][name]


def _rule(entry: dict[str, Any], problem):
    from optamal.policies import load_policy, make_rule
    from optamal.rules.teachers import Teacher

    if entry["kind"] == "teacher":
        return Teacher(entry["teacher"], entry["lr"])
    if entry["policy"] not in _W["policies"]:
        _W["policies"][entry["policy"]] = load_policy(entry["policy"])
    net, header = _W["policies"][entry["policy"]]
    return make_rule(net, header, problem.layout)


def evaluation_seed(base: int, evaluation: int) -> int:
    return base * 10_007 + 1_000 + evaluation


def _run_cell(entry: dict[str, Any], problem_name: str, evaluation: int) -> list[dict[str, Any]]:
    from optamal.engine import train_epochs, warm_start

    c = _W["cfg"]
    problem = _problem(problem_name)
    seed = evaluation_seed(c["seed"], evaluation)
    key = (problem_name, evaluation)
    if key not in _W["warm"]:
        _W["warm"][key] = warm_start(problem, seed, c["warmup_steps"], c["warmup_lr"])
    records = train_epochs(problem, _rule(entry, problem), _W["warm"][key], seed, c["epochs"])
    return [dict(optimizer=entry["optimizer"], run=entry["run"], replicate=entry["replicate"],
                 evaluation=evaluation, problem=problem_name, **r.as_dict()) for r in records]


# --------------------------------------------------------------------------- command
def evaluate(cfg: EvaluateConfig) -> Run:
    import pandas as pd

    from optamal.distributed import gather_objects, world

    rank, world_size = world()   # under torchrun: cells are split across ranks
    main = rank == 0
    device = resolve_device(cfg.device)
    done_rows: list[dict[str, Any]] = []
    if cfg.resume:
        run = Run.load(cfg.resume)
        run.write = main
        if run.command != "evaluate":
            raise OptamalError(f"--resume expects an evaluate run folder, got a {run.command} run")
        if not isinstance(run.manifest.get("entries"), list) or not isinstance(run.manifest.get("problems"), list):
            raise OptamalError(f"malformed manifest {run.path / 'manifest.json'}: no 'entries' and "
                               "'problems' lists: cannot resume from it")
        stored = EvaluateConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                   for k, v in run.config.items() if k in EvaluateConfig.__dataclass_fields__})
        stored.workers, stored.resume = cfg.workers, cfg.resume
        cfg = stored
        entries, problems, skipped = run.manifest["entries"], run.manifest["problems"], run.manifest.get("skipped", {})
        csv = run.file("evaluations.csv")
        if csv.is_file():
            try:
                df = pd.read_csv(csv)
            except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
                first = (str(exc).strip().splitlines() or ["unreadable"])[0]
                raise OptamalError(f"{csv} is not a readable CSV ({first}): cannot resume from it") from None
            missing = set(EVAL_COLUMNS) - set(df.columns)
            if missing:
                raise OptamalError(f"{csv} lacks columns {sorted(missing)}: cannot resume from it")
            complete = df.groupby(CELL_KEYS).epoch.transform("count") == cfg.epochs
            done_rows = df[complete].to_dict("records")
        if run.status == "completed":
            raise OptamalError(f"{cfg.resume} already completed; nothing to resume")
        run.update(status="running", resumed=run.manifest.get("resumed", []) + [__import__("optamal.runs", fromlist=["_now"])._now()])
    else:
        learned, run_dirs = learned_entries(cfg.runs)
        teachers, lr_source = teacher_entries(cfg, run_dirs)
        entries = learned + teachers
        if not entries:
            raise OptamalError("nothing to evaluate: give learned runs and/or --teachers auto|LIST")
        problems, skipped = available_problems(cfg)
        if not problems:
            raise OptamalError("no problem has its data here: " +
                               "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        run = Run.create(cfg.runs_dir, "evaluate", cfg.to_dict(), name=cfg.name, seed=cfg.seed,
                         device=device, write=main,
                         extra={"entries": entries, "problems": problems, "skipped": skipped,
                                "lrs_source": lr_source, "world_size": world_size})
    for name, why in skipped.items():
        if main:
            warn(f"skipping problem {name}: {why}")
    done = {(r["optimizer"], r["run"], int(r["replicate"]), r["problem"], int(r["evaluation"]))
            for r in done_rows}
    cells = [(e, p, j) for p in problems for j in range(cfg.repeats) for e in entries
             if (e["optimizer"], e["run"], int(e["replicate"]), p, j) not in done]
    n_opt = len(entries)
    all_cells = len(cells)
    cells = cells[rank::world_size]
    if main:
        console.print(f"evaluate: {n_opt} optimizer replicate(s) × {len(problems)} problem(s) × "
                  f"{cfg.repeats} evaluation(s) × {cfg.epochs} epoch(s); {all_cells} cell(s) to run"
                  f"{f', {len(done)} already done' if done else ''} → {run.path}")
    cfg_d = cfg.to_dict()
    # Workers pay once each has several seconds of work: spawning one and importing torch
    # costs ~3–5 s, and two 1-thread workers then run ~1.3× faster than one 2-thread
    # process (benchmarks/). A 12-cell × 2-epoch sweep measured 0.65× with workers.
    workers = cfg.workers or ((os.cpu_count() or 1) if len(cells) * cfg.epochs >= 64 else 1)
    workers = max(1, min(workers, len(cells) or 1))
    if device == "cuda" or world_size > 1:
        workers = 1
    run.update(workers=workers)
    rows = list(done_rows)
    with run.track():
        with progress(disable=not main) as bar:
            task = bar.add_task("evaluation cells", total=len(cells), status="")

            def collect(recs):
                rows.extend(recs)
                rows.sort(key=_row_order)
                if run.write:
                    atomic_write_csv(run.file("evaluations.csv"), pd.DataFrame(rows, columns=EVAL_COLUMNS))
                last = recs[-1]
                st = "diverged" if last["diverged"] else f"val {last['val_loss']:.3f}"
                bar.update(task, advance=1, status=f"{last['problem']} {last['optimizer']}: {st}")

            if workers == 1:
                import torch

                _worker_init(cfg_d, device, torch.get_num_threads())
                for cell in cells:
                    collect(_run_cell(*cell))
            else:
                import multiprocessing as mp

                with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(cfg_d, device, 1)) as pool:
                    futs = [pool.submit(_run_cell, *cell) for cell in cells]
                    for fut in as_completed(futs):
                        collect(fut.result())
        if world_size > 1:   # rank 0 collects every rank's rows and writes them
            done_keys = {id(r) for r in done_rows}
            mine = [r for r in rows if id(r) not in done_keys]
            rows = list(done_rows) + [r for part in gather_objects(mine) for r in part]
            rows.sort(key=_row_order)
        if run.write:
            atomic_write_csv(run.file("evaluations.csv"), pd.DataFrame(rows, columns=EVAL_COLUMNS))
        run.update(rows=len(rows))
        if main:
            _summary_table(rows)
    return run


def _row_order(r: dict[str, Any]):
    return (r["problem"], r["optimizer"], r["run"], r["replicate"], r["evaluation"], r["epoch"])


def _summary_table(rows: list[dict[str, Any]]) -> None:
    import math

    import pandas as pd
    from rich.table import Table

    if not rows:
        return
    df = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    best = df.groupby(["problem", "optimizer", "run", "replicate", "evaluation"]).agg(
        best_val=("val_loss", "min"), acc=("val_acc", "max"), diverged=("diverged", "any")).reset_index()
    agg = best.groupby(["problem", "optimizer"]).agg(
        best_val=("best_val", "mean"), acc=("acc", "mean"), n=("best_val", "size"),
        diverged=("diverged", "sum")).reset_index()
    table = Table(title="evaluate: mean best validation loss")
    for col in ("problem", "optimizer", "best val loss", "best val acc", "evaluations", "diverged"):
        table.add_column(col, justify="left" if col in ("problem", "optimizer") else "right",
                         no_wrap=col in ("problem", "optimizer"))
    for _, r in agg.sort_values(["problem", "best_val"]).iterrows():
        table.add_row(r.problem, r.optimizer, "—" if not math.isfinite(r.best_val) else f"{r.best_val:.4f}",
                      "—" if not math.isfinite(r.acc) else f"{r.acc:.3f}", str(r.n), str(int(r.diverged)))
    console.print(table)
