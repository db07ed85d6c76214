"""The report: from run directories to the paper's tables and figures (METHOD §9).

Data flow: :func:`load` discovers every run under a folder (any depth), reads each evaluate
run's ``evaluations.csv`` and joins every optimizer to the manifest of the run that
produced it (scheme, pool, perturbation, magnitude, policy, choice teacher) through the
evaluate manifest's ``entries``. :func:`summarize` turns per-epoch rows into per-evaluation
responses and fits the mixed model (:mod:`optamal.stats`) per (optimizer, problem).
The ``figure_*`` and ``table_*`` functions draw and tabulate; :func:`write_report` puts it
all in one folder with ``report.md``. Nothing here trains or reads anything but run folders.

Problems a user can cause (a corrupt CSV, an interrupted run, a missing manifest) become
warnings and the run is skipped; only "nothing usable at all" is an error.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from optamal.errors import OptamalError
from optamal.runs import Run, atomic_write_bytes, atomic_write_csv, atomic_write_text
from optamal.stats import CELL, evaluation_responses, mixed_effects, oracle

EVAL_COLUMNS = ["optimizer", "run", "replicate", "evaluation", "problem", "epoch", "train_loss",
                "val_loss", "val_acc", "seconds", "diverged"]
AMALGAMATION_SCHEMES = ("mean", "minmax", "choice")


# --------------------------------------------------------------------------- loading
@dataclass
class ReportData:
    """Everything the report needs, already joined."""

    source: Path
    evals: pd.DataFrame            # per-epoch rows; ``optimizer`` is the display label
    optimizers: pd.DataFrame       # one row per label: kind, scheme, pool, perturb, ...
    runs: list[Run]                # every readable run found (Table 4)
    evaluate_runs: list[Run]       # the evaluate runs whose rows were used
    warnings: list[str] = field(default_factory=list)


def _rel(path: str | Path, source: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), source.resolve())
    except ValueError:
        return str(path)


def discover(source: str | Path) -> tuple[list[Run], list[str]]:
    """Every run directory under ``source`` (any depth), oldest first; unreadable
    manifests become warnings."""
    root = Path(source)
    if not root.exists():
        raise OptamalError(f"{root} does not exist: give the folder holding your runs "
                           "(e.g. `optamal report runs/`)")
    if not root.is_dir():
        raise OptamalError(f"{root} is not a folder: give the folder holding your runs")
    runs, warnings = [], []
    for mf in sorted(root.rglob("manifest.json")):
        try:
            runs.append(Run.load(mf.parent))
        except OptamalError as exc:
            warnings.append(f"skipping {_rel(mf.parent, root)}: {exc}")
    runs.sort(key=lambda r: (str(r.manifest.get("started") or ""), str(r.path)))
    return runs, warnings


def _read_evaluations(run: Run, source: Path) -> tuple[pd.DataFrame | None, str | None]:
    """The run's evaluations.csv, checked; (None, why) when unusable."""
    csv = run.file("evaluations.csv")
    where = _rel(run.path, source)
    if not csv.is_file():
        return None, f"skipping evaluate run {where}: it has no evaluations.csv"
    try:
        df = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        return None, f"skipping evaluate run {where}: evaluations.csv is empty"
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"skipping evaluate run {where}: evaluations.csv is not a readable CSV ({first})"
    missing = [c for c in EVAL_COLUMNS if c not in df.columns]
    if missing:
        return None, (f"skipping evaluate run {where}: evaluations.csv lacks column(s) "
                      f"{', '.join(missing)}")
    df = df[EVAL_COLUMNS].copy()
    for col in ("replicate", "evaluation", "epoch"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("train_loss", "val_loss", "val_acc", "seconds"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["diverged"] = df["diverged"].map(
        lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes"))
    bad = df[["replicate", "evaluation", "epoch"]].isna().any(axis=1) | df.optimizer.isna() | df.problem.isna()
    if bad.all():
        return None, f"skipping evaluate run {where}: evaluations.csv has no valid row"
    if bad.any():
        df = df[~bad]
    df = df.astype({"replicate": int, "evaluation": int, "epoch": int})
    df["optimizer"] = df.optimizer.astype(str)
    df["run"] = df.run.astype(str)
    df["problem"] = df.problem.astype(str)
    # Rows whose losses are non-finite without the diverged flag are diverged too.
    nonfinite = ~(np.isfinite(df.val_loss) & np.isfinite(df.train_loss))
    df.loc[nonfinite, "diverged"] = True
    note = f"{int(bad.sum())} malformed row(s) in {where}/evaluations.csv ignored" if bad.any() else None
    return df, note


def _producer_info(entry: dict[str, Any], by_path: dict[str, Run], runs: list[Run]) -> dict[str, Any]:
    """Scheme, pool, perturbation, ... of the run that produced an evaluated optimizer."""
    info: dict[str, Any] = dict(kind=entry.get("kind", "learned"), command=None, scheme=None,
                                pool=None, perturb="none", magnitude=0.0, policy=None,
                                choice_run=None, lr=entry.get("lr"), producer=None,
                                lrs_source=None, n_teachers=None)
    if info["kind"] == "teacher":
        info.update(scheme="teacher", policy=entry.get("teacher", entry.get("optimizer")),
                    command="tune-lr", lrs_source=entry.get("run_path"))
        return info
    path = str(entry.get("run_path") or "")
    run = by_path.get(str(Path(path).resolve())) if path else None
    if run is None and path and (Path(path) / "manifest.json").is_file():
        try:
            run = Run.load(path)
        except OptamalError:
            run = None
    if run is None:   # moved folder: match by name among the learned runs found
        cands = [r for r in runs if r.path.name == entry.get("run")
                 and r.command in ("distill", "train-choice")]
        run = cands[-1] if len(cands) == 1 else None
    label = str(entry.get("optimizer", ""))
    if run is None:   # fall back on the label's own vocabulary
        info["command"] = "train-choice" if label.startswith("choice-optimizer") else "distill"
        parts = label.split("-")
        if info["command"] == "train-choice":
            info.update(scheme="choice-optimizer", pool=parts[-1], policy="choice")
        else:
            info.update(scheme="none" if label == "rnnprop" else parts[0],
                        pool=parts[1] if len(parts) > 1 else None, policy="rnnprop")
        return info
    cfg = run.config
    info.update(command=run.command, producer=str(run.path.resolve()), pool=cfg.get("pool"))
    if run.command == "train-choice":
        info.update(scheme="choice-optimizer", policy="choice")
    else:
        info.update(scheme=run.manifest.get("scheme", cfg.get("scheme")),
                    perturb=run.manifest.get("perturb", cfg.get("perturb", "none")) or "none",
                    magnitude=float(run.manifest.get("magnitude") or cfg.get("magnitude") or 0.0),
                    policy=cfg.get("policy", "rnnprop"))
        teachers = run.manifest.get("teachers")
        if isinstance(teachers, list) and info["scheme"] in ("mean", "minmax"):
            info["n_teachers"] = len(teachers)
        pre = run.manifest.get("prerequisites") or {}
        if pre.get("choice"):
            info["choice_run"] = str(Path(pre["choice"]).resolve())
    return info


class _Warnings(list):
    """A list of warnings that also reports each one as it is added."""

    def __init__(self, sink: Callable[[str], None] | None):
        super().__init__()
        self.sink = sink

    def append(self, msg: str) -> None:
        super().append(msg)
        if self.sink is not None:
            self.sink(msg)


def load(source: str | Path, on_warning: Callable[[str], None] | None = None) -> ReportData:
    """Discover runs under ``source`` and join evaluations with the producing manifests.

    Each warning (a skipped run, ignored rows) goes to ``on_warning`` as it happens, so a
    user sees why even when nothing usable is left and this raises."""
    source = Path(source)
    runs, found = discover(source)
    warnings = _Warnings(on_warning)
    for w in found:
        warnings.append(w)
    by_path = {str(r.path.resolve()): r for r in runs}
    frames, used = [], []
    ident_info: dict[str, dict[str, Any]] = {}
    for order, run in enumerate(r for r in runs if r.command == "evaluate"):
        where = _rel(run.path, source)
        if run.status != "completed":
            warnings.append(f"skipping evaluate run {where}: status {run.status} (complete it "
                            f"with `optamal evaluate --resume {run.path}`)")
            continue
        df, note = _read_evaluations(run, source)
        if df is None:
            warnings.append(note)
            continue
        if note:
            warnings.append(note)
        entries = run.manifest.get("entries") or []
        ident_of: dict[tuple[str, str], str] = {}
        for e in entries if isinstance(entries, list) else []:
            if not isinstance(e, dict) or "optimizer" not in e:
                continue
            key = (str(e["optimizer"]), str(e.get("run")))
            ident = str(Path(e["run_path"]).resolve()) if e.get("run_path") and e.get("run_path") != "paper" \
                else f"{e.get('run_path') or e.get('run')}:{e['optimizer']}"
            if e.get("kind") == "teacher":
                ident = f"{ident}#{e['optimizer']}"
            ident_of[key] = ident
            if ident not in ident_info:
                ident_info[ident] = dict(optimizer=str(e["optimizer"]), **_producer_info(e, by_path, runs))
        pairs = df[["optimizer", "run"]].drop_duplicates().itertuples(index=False)
        for opt, rname in pairs:
            if (opt, rname) not in ident_of:   # a row the manifest does not describe
                ident = f"{where}:{opt}:{rname}"
                ident_of[(opt, rname)] = ident
                ident_info.setdefault(ident, dict(optimizer=opt, **_producer_info(
                    dict(optimizer=opt, run=rname, kind="teacher" if "-" not in opt and opt != "rnnprop"
                         else "learned"), by_path, runs)))
        df["ident"] = [ident_of[(o, r)] for o, r in zip(df.optimizer, df.run)]
        df["source_order"] = order
        df["evaluate_run"] = where
        frames.append(df)
        used.append(run)
    if not frames:
        raise OptamalError(
            f"no usable evaluations under {source}"
            + (f" ({len(warnings)} run(s) skipped, see the warnings above)" if warnings else "")
            + ": run `optamal evaluate RUN...` (or `optamal pipeline --profile quick`) first")
    evals = pd.concat(frames, ignore_index=True)
    # The same cell evaluated by several evaluate runs: keep the latest run's.
    keys = ["ident", "replicate", "problem", "evaluation"]
    latest = evals.groupby(keys).source_order.transform("max")
    dup = evals[evals.source_order != latest]
    if len(dup):
        n_cells = len(dup.groupby(keys))
        warnings.append(f"{n_cells} evaluation(s) appear in more than one evaluate run; "
                        "the latest run's are used")
        evals = evals[evals.source_order == latest]
    # Display labels: the optimizer name, made unique when two runs share it.
    info = pd.DataFrame([dict(ident=k, **v) for k, v in ident_info.items()
                         if k in set(evals.ident)])
    counts = info.optimizer.value_counts()
    def where(p, lrs, k):
        if isinstance(p, str):
            return _rel(p, source)
        if isinstance(lrs, str) and lrs != "paper":
            return _rel(lrs, source)
        return lrs if isinstance(lrs, str) else k

    info["label"] = [o if counts[o] == 1 else f"{o} [{where(p, lrs, k)}]"
                     for o, p, lrs, k in zip(info.optimizer, info.producer, info.lrs_source, info.ident)]
    label_of = dict(zip(info.ident, info.label))
    evals = evals.assign(optimizer=evals.ident.map(label_of), run=evals.ident)
    info = info.rename(columns={"optimizer": "name"}).rename(columns={"label": "optimizer"})
    return ReportData(source, evals.drop(columns=["source_order"]).reset_index(drop=True),
                      info.reset_index(drop=True), runs, used, list(warnings))


# --------------------------------------------------------------------------- statistics
SUMMARY_COLUMNS = [
    "problem", "optimizer", "kind", "scheme", "pool", "perturb", "magnitude",
    "replicates", "evaluations", "diverged",
    "val_mu", "val_ci_low", "val_ci_high",
    "train_mu", "train_ci_low", "train_ci_high",
    "sigma_alpha", "sigma_eps", "sigma_eta", "sigma_eta_ci_low", "sigma_eta_ci_high",
    "best_val_acc", "oracle", "method", "note",
]


def summarize(data: ReportData, *, confidence: float = 0.95, min_groups: int = 5,
              sigma: float = 2.0, on_cell: Callable[[], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary per (optimizer, problem), responses per evaluation)."""
    resp = evaluation_responses(data.evals, sigma)
    info = data.optimizers.set_index("optimizer")
    rows = []
    for (opt, problem), g in resp.groupby(["optimizer", "problem"], sort=True):
        val = mixed_effects(g, "best_val", confidence=confidence, min_groups=min_groups)
        train = mixed_effects(g, "final_train", confidence=confidence, min_groups=min_groups)
        eta = mixed_effects(g, "sigma_eta", confidence=confidence, min_groups=min_groups)
        meta = info.loc[opt]
        rows.append(dict(
            problem=problem, optimizer=opt, kind=meta["kind"], scheme=meta["scheme"],
            pool=meta["pool"], perturb=meta["perturb"], magnitude=meta["magnitude"],
            replicates=int(g.replicate.nunique()), evaluations=int(len(g)),
            diverged=int(g.diverged.sum()),
            val_mu=val["mu"], val_ci_low=val["ci_low"], val_ci_high=val["ci_high"],
            train_mu=train["mu"], train_ci_low=train["ci_low"], train_ci_high=train["ci_high"],
            sigma_alpha=val["sigma_alpha"], sigma_eps=val["sigma_eps"],
            # σ_η ≥ 0: a t-interval's lower end below 0 is cut at 0.
            sigma_eta=eta["mu"], sigma_eta_ci_low=max(0.0, eta["ci_low"])
            if math.isfinite(eta["ci_low"]) else math.nan, sigma_eta_ci_high=eta["ci_high"],
            best_val_acc=float(g.best_acc.mean()) if g.best_acc.notna().any() else math.nan,
            oracle=False, method=val["method"], note=val["note"]))
        if on_cell:
            on_cell()
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    teachers = set(data.optimizers.loc[data.optimizers.kind == "teacher", "optimizer"])
    for problem, name in oracle(summary, teachers).items():
        summary.loc[(summary.problem == problem) & (summary.optimizer == name), "oracle"] = True
    return summary, resp


def n_summary_cells(data: ReportData) -> int:
    return int(len(data.evals[["optimizer", "problem"]].drop_duplicates()))


# --------------------------------------------------------------------------- roles
def _single_teacher(o: pd.DataFrame) -> pd.Series:
    """Distillation of one teacher alone ("Stronger Baselines"): a baseline, not an amalgam."""
    return o.scheme.isin(["mean", "minmax"]) & (o.n_teachers.fillna(0) == 1)


def amalgamated(data: ReportData, perturbed: bool | None = False) -> list[str]:
    """Distilled students of a pool (mean / min-max / choice), optionally perturbed."""
    o = data.optimizers
    sel = (o.command == "distill") & o.scheme.isin(AMALGAMATION_SCHEMES) & ~_single_teacher(o)
    if perturbed is False:
        sel &= o.perturb.fillna("none") == "none"
    elif perturbed is True:
        sel &= o.perturb.fillna("none") != "none"
    return list(o.loc[sel, "optimizer"])


def baselines(data: ReportData) -> list[str]:
    """Learned baselines: meta loss only (RNNProp, DM, Scale) or one imitated teacher."""
    o = data.optimizers
    sel = (o.kind == "learned") & ((o.scheme == "none") | _single_teacher(o)) \
        & (o.perturb.fillna("none") == "none")
    return list(o.loc[sel, "optimizer"])


def best_amalgamated(summary: pd.DataFrame, candidates: list[str]) -> str | None:
    """The amalgamated optimizer with the best mean rank (by μ of best log val loss)
    over the problems they were all evaluated on."""
    sub = summary[summary.optimizer.isin(candidates) & np.isfinite(summary.val_mu)]
    if sub.empty:
        return None
    ranks = sub.groupby("problem").val_mu.rank()
    mean_rank = ranks.groupby(sub.optimizer).mean()
    mean_mu = sub.groupby("optimizer").val_mu.mean()
    order = sorted(mean_rank.index, key=lambda o: (mean_rank[o], mean_mu[o]))
    return order[0]


def choice_teacher_of(data: ReportData, label: str) -> str | None:
    """The evaluated train-choice optimizer that taught ``label`` (choice distillation),
    else the evaluated choice optimizer of the same pool."""
    o = data.optimizers.set_index("optimizer")
    if label not in o.index:
        return None
    row = o.loc[label]
    choice = o[o.command == "train-choice"]
    if isinstance(row.get("choice_run"), str):
        hit = choice[choice.producer == row["choice_run"]]
        if len(hit):
            return str(hit.index[0])
    same_pool = choice[choice.pool == row.get("pool")]
    return str(same_pool.index[-1]) if len(same_pool) else None


# --------------------------------------------------------------------------- figures
def colors_for(labels: list[str]) -> dict[str, str]:
    """A fixed colour per optimizer across every figure."""
    import matplotlib

    palette = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    palette = palette[::2] + palette[1::2]
    return {lab: palette[i % len(palette)] for i, lab in enumerate(sorted(labels))}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 110,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _grid(n: int, width: float = 3.6, height: float = 3.0, ncols: int = 3):
    plt = _plt()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 0.6, height * nrows + 0.9),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save_figure(fig, out: Path, stem: str, formats: tuple[str, ...]) -> list[str]:
    """Write ``stem.<fmt>`` for each format atomically; returns the file names."""
    plt = _plt()
    names = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=130 if fmt == "png" else None, bbox_inches="tight")
        atomic_write_bytes(out / f"{stem}.{fmt}", buf.getvalue())
        names.append(f"{stem}.{fmt}")
    plt.close(fig)
    return names


def _problems(summary: pd.DataFrame) -> list[str]:
    return sorted(summary.problem.unique())


def _errbar(ax, y, x, lo, hi, color, label=None, marker="o", horizontal=False):
    lo_err = np.maximum(0, np.nan_to_num(x - lo))
    hi_err = np.maximum(0, np.nan_to_num(hi - x))
    if horizontal:
        ax.errorbar(x, y, xerr=[[lo_err], [hi_err]], fmt=marker, color=color, capsize=3, ms=5,
                    label=label)
    else:
        ax.errorbar(y, x, yerr=[[lo_err], [hi_err]], fmt=marker, color=color, capsize=3, ms=5,
                    label=label)


def figure_schemes(summary: pd.DataFrame, reference: str, others: list[str], colors):
    """Fig. 1: μ(best log val loss) of each amalgamation scheme minus the reference's, per
    problem; bars: ≈95% CI of the difference, √(h₁² + h₂²) from the two intervals."""
    problems = [p for p in _problems(summary)
                if ((summary.problem == p) & (summary.optimizer == reference)).any()]
    fig, ax = _plt().subplots(figsize=(max(6.0, 1.3 * len(problems) + 2.5), 4.2))
    width = 0.8 / max(1, len(others))
    for k, opt in enumerate(others):
        xs, ds, hs = [], [], []
        for i, p in enumerate(problems):
            r = summary[(summary.problem == p) & (summary.optimizer == reference)].iloc[0]
            s = summary[(summary.problem == p) & (summary.optimizer == opt)]
            if s.empty or not (math.isfinite(s.iloc[0].val_mu) and math.isfinite(r.val_mu)):
                continue
            s = s.iloc[0]
            h1 = (s.val_ci_high - s.val_ci_low) / 2
            h2 = (r.val_ci_high - r.val_ci_low) / 2
            xs.append(i - 0.4 + width * (k + 0.5))
            ds.append(s.val_mu - r.val_mu)
            hs.append(math.sqrt(np.nan_to_num(h1) ** 2 + np.nan_to_num(h2) ** 2))
        ax.errorbar(xs, ds, yerr=hs, fmt="o", color=colors[opt], capsize=3, label=opt)
    ax.axhline(0, color="black", lw=1)
    ax.set_xlim(-0.6, len(problems) - 0.4)
    ax.set_xticks(range(len(problems)), problems, rotation=20)
    ax.set_ylabel(f"Δ best log val loss vs {reference}\n(< 0: better than {reference})")
    ax.set_title(f"Fig. 1 — distillation schemes relative to {reference} (95% CI)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def figure_baselines(summary: pd.DataFrame, amalg: list[str], base: list[str], colors):
    """Fig. 2: best log validation loss (μ, 95% CI) of the amalgamated optimizers (above the
    dotted line) and the learned baselines (below), per problem; dashed line: the oracle
    teacher."""
    problems = _problems(summary)
    fig, axes = _grid(len(problems))
    order = amalg + base
    for ax, p in zip(axes, problems):
        sub = summary[summary.problem == p].set_index("optimizer")
        shown = [o for o in order if o in sub.index]
        for y, o in enumerate(shown):
            r = sub.loc[o]
            if math.isfinite(r.val_mu):
                _errbar(ax, y, r.val_mu, r.val_ci_low, r.val_ci_high, colors[o], horizontal=True)
            else:
                ax.text(0.02, y, "diverged", transform=ax.get_yaxis_transform(), va="center",
                        color=colors[o])
        orc = sub[sub.oracle]
        if len(orc):
            ax.axvline(orc.iloc[0].val_mu, color="black", ls="--", lw=1,
                       label=f"oracle: {orc.index[0]}")
            ax.legend(fontsize=7, loc="lower right")
        n_amalg = sum(o in amalg for o in shown)
        if 0 < n_amalg < len(shown):   # amalgamated above the line, baselines below
            ax.axhline(n_amalg - 0.5, color="gray", ls=":", lw=1)
        ax.set_yticks(range(len(shown)), shown)
        ax.set_ylim(-0.7, len(shown) - 0.3)
        ax.invert_yaxis()
        ax.set_title(p)
        ax.set_xlabel("best log val loss (lower is better)")
    fig.suptitle("Fig. 2 — amalgamated vs learned baselines (μ, 95% CI)")
    fig.tight_layout()
    return fig


def figure_curves(evals: pd.DataFrame, per_problem: dict[str, list[tuple[str, str]]], colors,
                  max_problems: int = 6):
    """Fig. 3: validation loss per epoch, mean ± 2 SD over every evaluation (and replicate)
    in log space, for the best amalgamated optimizer, its choice teacher and the oracle
    (black, dashed; named in each panel's title)."""
    problems = sorted(per_problem)[:max_problems]
    fig, axes = _grid(len(problems))
    ok = evals[~evals.groupby(CELL).diverged.transform("any")]
    handles: dict[str, Any] = {}
    for ax, p in zip(axes, problems):
        title = p
        for opt, role in per_problem[p]:
            sub = ok[(ok.problem == p) & (ok.optimizer == opt)]
            if sub.empty:
                continue
            logv = np.log(sub.val_loss.clip(lower=1e-30))
            stats = logv.groupby(sub.epoch).agg(["mean", "std"]).sort_index()
            sd = stats["std"].fillna(0.0)
            oracle_line = role == "oracle"
            color = "black" if oracle_line else colors[opt]
            (line,) = ax.plot(stats.index, np.exp(stats["mean"]), "--o" if oracle_line else "-o",
                              ms=3, color=color)
            ax.fill_between(stats.index, np.exp(stats["mean"] - 2 * sd),
                            np.exp(stats["mean"] + 2 * sd), color=color,
                            alpha=0.12 if oracle_line else 0.18, lw=0)
            key = "oracle: the best teacher (in each title)" if oracle_line else f"{role}: {opt}"
            handles.setdefault(key, line)
            if oracle_line:
                title = f"{p} (oracle: {opt})"
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation loss")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=8, bbox_to_anchor=(0.5, -0.005))
    fig.suptitle("Fig. 3 — validation loss, mean ± 2 SD over evaluations")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks as plain numbers (0.3, 0.5, 1) instead of 3 × 10⁻¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def figure_stability_performance(summary: pd.DataFrame, colors):
    """Fig. 4: optimization stability σ_η (x) against μ of best log val loss (y)."""
    sub = summary[np.isfinite(summary.sigma_eta) & np.isfinite(summary.val_mu)]
    problems = _problems(sub)
    fig, axes = _grid(len(problems))
    handles = {}
    for ax, p in zip(axes, problems):
        for _, r in sub[sub.problem == p].iterrows():
            marker = "*" if r.oracle else ("s" if r.kind == "teacher" else "o")
            h = ax.errorbar(r.sigma_eta, r.val_mu,
                            xerr=[[max(0, np.nan_to_num(r.sigma_eta - r.sigma_eta_ci_low))],
                                  [max(0, np.nan_to_num(r.sigma_eta_ci_high - r.sigma_eta))]],
                            yerr=[[max(0, np.nan_to_num(r.val_mu - r.val_ci_low))],
                                  [max(0, np.nan_to_num(r.val_ci_high - r.val_mu))]],
                            fmt=marker, color=colors[r.optimizer], ms=7 if marker == "*" else 5,
                            capsize=2, elinewidth=0.8)
            handles.setdefault(r.optimizer, h)
        ax.set_title(p)
        ax.set_xlabel("σ_η (optimization stability; lower is steadier)")
        ax.set_ylabel("best log val loss")
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(5, len(handles)), fontsize=7, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle("Fig. 4 — optimization stability vs performance (★ oracle, ■ teachers, ● learned)")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 5), 1, 1))
    return fig


def figure_optimization_stability(summary: pd.DataFrame, colors):
    """Fig. 5: σ_η per optimizer (μ, 95% CI), per problem."""
    sub = summary[np.isfinite(summary.sigma_eta)]
    problems = _problems(sub)
    fig, axes = _grid(len(problems))
    for ax, p in zip(axes, problems):
        s = sub[sub.problem == p].sort_values("sigma_eta")
        for y, (_, r) in enumerate(s.iterrows()):
            _errbar(ax, y, r.sigma_eta, r.sigma_eta_ci_low, r.sigma_eta_ci_high,
                    colors[r.optimizer], marker="*" if r.oracle else "o", horizontal=True)
        ax.set_yticks(range(len(s)), list(s.optimizer))
        ax.set_ylim(-0.7, len(s) - 0.3)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_title(p)
        ax.set_xlabel("σ_η (lower is steadier)")
    fig.suptitle("Fig. 5 — optimization stability per optimizer (μ, 95% CI; ★ oracle)")
    fig.tight_layout()
    return fig


def figure_meta_stability(summary: pd.DataFrame, data: ReportData):
    """Fig. 6: meta-stability σ_α against perturbation magnitude, random and adversarial,
    one line per problem; the unperturbed optimizer of the same scheme/pool at the left."""
    o = data.optimizers
    pert = o[(o.command == "distill") & (o.perturb.fillna("none").isin(["random", "adv"]))]
    kinds = [k for k in ("random", "adv") if (pert.perturb == k).any()]
    plt = _plt()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.0), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        members = pert[pert.perturb == kind]
        for j, (problem, g) in enumerate(summary.groupby("problem")):
            pts = []
            for _, m in members.iterrows():
                r = g[g.optimizer == m.optimizer]
                if len(r) and math.isfinite(r.iloc[0].sigma_alpha):
                    pts.append((float(m.magnitude), float(r.iloc[0].sigma_alpha)))
                base = o[(o.command == "distill") & (o.scheme == m.scheme) & (o.pool == m.pool)
                         & (o.perturb.fillna("none") == "none")]
                for b in base.optimizer:
                    rb = g[g.optimizer == b]
                    if len(rb) and math.isfinite(rb.iloc[0].sigma_alpha):
                        pts.append((0.0, float(rb.iloc[0].sigma_alpha)))
            pts = sorted(set(pts))
            if not pts:
                continue
            mags = [p[0] for p in pts if p[0] > 0]
            floor = (min(mags) / 3) if mags else 1e-4
            xs = [p[0] if p[0] > 0 else floor for p in pts]
            ax.plot(xs, [p[1] for p in pts], "-o", ms=4, color=f"C{j}", label=problem)
            if any(p[0] == 0 for p in pts):
                ax.annotate("none", (floor, pts[0][1]), fontsize=7, xytext=(2, 4),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{'random σ (Eq. 5)' if kind == 'random' else 'adversarial ε (Eq. 6)'}"
                      " — 'none': unperturbed, drawn at the left")
        ax.set_ylabel("σ_α (meta-stability; lower is more stable)")
        ax.set_title(f"{kind} perturbation")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 6 — meta-stability vs perturbation magnitude")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tables
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -(digits - 1) or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(df: pd.DataFrame, align_right: set[str] | None = None) -> str:
    """A GitHub Markdown table of ``df`` (strings as given)."""
    cols = list(df.columns)
    right = align_right if align_right is not None else {
        c for c in cols if pd.api.types.is_numeric_dtype(df[c])}
    head = "| " + " | ".join(str(c) for c in cols) + " |"
    sep = "|" + "|".join("---:" if c in right else ":---" for c in cols) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
            for row in df.astype(object).itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """summary.md's table: μ ± CI as text, σ's and counts."""
    rows = []
    for _, r in summary.sort_values(["problem", "val_mu"]).iterrows():
        rows.append({
            "problem": r.problem, "optimizer": r.optimizer + (" (oracle)" if r.oracle else ""),
            "best log val loss μ [95% CI]": f"{_fmt(r.val_mu)} [{_fmt(r.val_ci_low)}, {_fmt(r.val_ci_high)}]",
            "final log train loss μ [95% CI]": f"{_fmt(r.train_mu)} [{_fmt(r.train_ci_low)}, {_fmt(r.train_ci_high)}]",
            "σ_α": _fmt(r.sigma_alpha), "σ_ε": _fmt(r.sigma_eps), "σ_η": _fmt(r.sigma_eta),
            "best val acc": _fmt(r.best_val_acc, 3), "replicates": r.replicates,
            "evaluations": r.evaluations, "diverged": r.diverged, "CI method": r.method})
    return pd.DataFrame(rows)


def comparison_references(data: ReportData, summary: pd.DataFrame) -> dict[str, dict[str, str]]:
    """The references each learned optimizer is compared with, per problem: Adam at its
    tuned rate (when exactly one Adam was evaluated) and the oracle teacher."""
    refs: dict[str, dict[str, str]] = {}
    o = data.optimizers
    adam = list(o.loc[(o.kind == "teacher") & (o.name == "adam"), "optimizer"])
    if len(adam) == 1:
        refs["adam"] = {str(p): adam[0] for p in summary.loc[summary.optimizer == adam[0], "problem"]}
    refs["oracle"] = {str(p): str(n) for p, n in
                      summary.loc[summary.oracle, ["problem", "optimizer"]].itertuples(index=False)}
    return refs


def comparisons(data: ReportData, summary: pd.DataFrame, resp: pd.DataFrame, *,
                confidence: float = 0.95, min_groups: int = 5) -> pd.DataFrame:
    """Paired differences of every learned optimizer's best log validation loss with Adam's
    and the oracle's (see :func:`optamal.stats.paired_differences`)."""
    from optamal.stats import paired_differences

    learned = sorted(set(summary.loc[summary.kind == "learned", "optimizer"]))
    return paired_differences(resp, learned, comparison_references(data, summary),
                              confidence=confidence, min_groups=min_groups)


def comparisons_display(comp: pd.DataFrame) -> pd.DataFrame:
    """The comparisons table as text: Δ μ [CI], the loss ratio, wins, and a verdict that
    says whether the interval excludes 0."""
    rows = []
    for _, r in comp.sort_values(["optimizer", "role", "problem"]).iterrows():
        if not (math.isfinite(r.delta_ci_low) and math.isfinite(r.delta_ci_high)):
            verdict = "no interval"
        elif r.delta_ci_high < 0:
            verdict = "better"
        elif r.delta_ci_low > 0:
            verdict = "worse"
        else:
            verdict = "no clear difference"
        rows.append({
            "optimizer": r.optimizer, "vs": f"{r.role} ({r.reference})", "problem": r.problem,
            "Δ best log val loss μ [95% CI]": f"{_fmt(r.delta_mu)} [{_fmt(r.delta_ci_low)}, {_fmt(r.delta_ci_high)}]",
            "loss ratio": _fmt(r.ratio, 3), "wins": f"{r.wins}/{r.pairs}",
            "dropped (diverged)": r.dropped, "verdict": verdict})
    return pd.DataFrame(rows)


COMPARISONS_NOTE = (
    "Paired comparisons. Evaluation j of every optimizer starts from the same initial weights, "
    "warmup and data order, so Δ = Y_val(learned) − Y_val(reference) is taken evaluation by "
    "evaluation (Y_val = log of the best validation loss over epochs) and summarised with the "
    "same mixed model and interval rules as μ. Δ < 0: the learned optimizer reached a lower "
    "validation loss; loss ratio = exp(μ_Δ); wins: evaluations where it was lower. Verdict "
    "\"better\"/\"worse\" when the 95% CI excludes 0. Pairs where either side diverged are "
    "dropped and counted.\n")


def table_cost(data: ReportData) -> pd.DataFrame:
    """Table 4: training cost, from the manifests of every run found."""
    rows = []
    labels = data.optimizers.dropna(subset=["producer"]).set_index("producer").optimizer.to_dict() \
        if "producer" in data.optimizers else {}
    for run in data.runs:
        if run.command not in ("tune-lr", "train-choice", "distill", "evaluate"):
            continue
        m, cfg = run.manifest, run.config
        reps = m.get("replicates") if isinstance(m.get("replicates"), dict) else {}
        rep_vals = [v for v in reps.values() if isinstance(v, dict)]
        secs = [float(v["seconds"]) for v in rep_vals if isinstance(v.get("seconds"), (int, float))]
        epochs = [float(v["meta_epochs"]) for v in rep_vals if isinstance(v.get("meta_epochs"), (int, float))]
        done = sum(1 for v in rep_vals if v.get("status") == "completed")
        if run.command == "distill":
            what = labels.get(str(run.path.resolve())) or (
                f"{m.get('scheme', cfg.get('scheme'))}-{cfg.get('pool')}")
        elif run.command == "train-choice":
            what = labels.get(str(run.path.resolve())) or f"choice-optimizer-{cfg.get('pool')}"
        elif run.command == "tune-lr":
            what = f"pool {cfg.get('pool')}, {len(cfg.get('grid') or [])} rates × {cfg.get('epochs')} epochs"
        else:
            what = (f"{len(m.get('entries') or [])} optimizer replicates × "
                    f"{len(m.get('problems') or [])} problems × {cfg.get('repeats')} evaluations")
        rows.append(dict(
            run=_rel(run.path, data.source), command=run.command, what=what,
            profile=cfg.get("profile"), status=run.status, device=m.get("device"),
            threads=(m.get("versions") or {}).get("torch_threads"),
            replicates=f"{done}/{len(rep_vals)}" if rep_vals else "",
            seconds_per_replicate=float(np.mean(secs)) if secs else math.nan,
            meta_epochs_per_replicate=float(np.mean(epochs)) if epochs else math.nan,
            wall_seconds=float(m["wall_seconds"]) if isinstance(m.get("wall_seconds"), (int, float)) else math.nan))
    return pd.DataFrame(rows, columns=["run", "command", "what", "profile", "status", "device",
                                       "threads", "replicates", "seconds_per_replicate",
                                       "meta_epochs_per_replicate", "wall_seconds"])


def table_evaluation_stability(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 5: σ_ε per optimizer (rows) × problem (columns); "—" where any evaluation
    diverged (or σ_ε is not defined)."""
    problems = _problems(summary)
    rows = []
    for opt, g in summary.groupby("optimizer", sort=True):
        row = {"optimizer": opt}
        for p in problems:
            r = g[g.problem == p]
            if r.empty:
                row[p] = ""
                continue
            r = r.iloc[0]
            row[p] = "—" if r.diverged > 0 or not math.isfinite(r.sigma_eps) else f"{r.sigma_eps:.4f}"
        rows.append(row)
    return pd.DataFrame(rows, columns=["optimizer", *problems])


def table_cost_display(cost: pd.DataFrame) -> pd.DataFrame:
    d = cost.copy()
    for c in ("seconds_per_replicate", "meta_epochs_per_replicate", "wall_seconds"):
        d[c] = [_fmt(v, 1) if c != "meta_epochs_per_replicate" else _fmt(v, 1) for v in d[c]]
    return d.fillna("")


# --------------------------------------------------------------------------- figures plan
@dataclass
class FigurePlan:
    key: str
    stem: str
    title: str
    draw: Callable[[], Any] | None      # None: not supported by the runs found
    missing: str = ""                   # why not, and what to run


def figure_plans(data: ReportData, summary: pd.DataFrame, reference: str,
                 max_curves: int = 6) -> list[FigurePlan]:
    colors = colors_for(list(data.optimizers.optimizer))
    amalg = amalgamated(data)
    base = baselines(data)
    plans: list[FigurePlan] = []
    epochs = int(data.evals.epoch.max()) if len(data.evals) else 0

    others = [a for a in amalg if a != reference]
    if reference in amalg and others:
        plans.append(FigurePlan("1", "fig1-schemes", "Fig. 1 — distillation schemes",
                                lambda: figure_schemes(summary, reference, others, colors)))
    else:
        why = (f"needs the reference optimizer {reference} and at least one other amalgamated "
               f"optimizer (mean / min-max / choice, small or large pool), evaluated")
        plans.append(FigurePlan("1", "fig1-schemes", "Fig. 1 — distillation schemes", None,
                                why + f"; found: {', '.join(amalg) or 'none'}. Run e.g. `optamal "
                                "distill --scheme mean --pool small`, `... --scheme minmax --pool "
                                "small`, `... --scheme choice --pool large`, then `optamal "
                                "evaluate` on them (or `optamal pipeline --sweep full`)"))
    if amalg and base:
        plans.append(FigurePlan("2", "fig2-baselines", "Fig. 2 — amalgamated vs learned baselines",
                                lambda: figure_baselines(summary, amalg, base, colors)))
    else:
        plans.append(FigurePlan("2", "fig2-baselines", "Fig. 2 — amalgamated vs learned baselines",
                                None, "needs at least one amalgamated optimizer and one learned "
                                f"baseline (found amalgamated: {', '.join(amalg) or 'none'}; "
                                f"baselines: {', '.join(base) or 'none'}). Run `optamal distill "
                                "--scheme none` (RNNProp) and `optamal distill --scheme choice`, "
                                "then evaluate both"))
    # Fig. 3 shows the best amalgamated optimizer; when every evaluated one was trained with
    # perturbations (the shipped pretrained policy, say), the best perturbed one.
    best = best_amalgamated(summary, amalg or amalgamated(data, perturbed=True))
    orc = summary[summary.oracle].set_index("problem").optimizer.to_dict()
    if best and orc and epochs >= 2:
        teacher = choice_teacher_of(data, best)
        per_problem = {}
        for p in _problems(summary):
            lines = [(best, "amalgamated")]
            if teacher:
                lines.append((teacher, "choice"))
            if p in orc:
                lines.append((orc[p], "oracle"))
            per_problem[p] = lines
        plans.append(FigurePlan("3", "fig3-curves", "Fig. 3 — loss curves",
                                lambda: figure_curves(data.evals, per_problem, colors, max_curves)))
    else:
        plans.append(FigurePlan("3", "fig3-curves", "Fig. 3 — loss curves", None,
                                "needs an evaluated amalgamated optimizer, evaluated teachers "
                                "(for the oracle) and ≥ 2 epochs per evaluation. Run `optamal "
                                "evaluate DISTILL_RUN --teachers auto`"))
    has_eta = np.isfinite(summary.sigma_eta).sum() >= 2
    why_eta = ("needs σ_η for at least two optimizers, i.e. ≥ 3 epochs per evaluation "
               f"(found {epochs}); run `optamal evaluate ... --epochs 25` (paper: 25)")
    plans.append(FigurePlan("4", "fig4-stability-performance",
                            "Fig. 4 — optimization stability vs performance",
                            (lambda: figure_stability_performance(summary, colors)) if has_eta else None,
                            "" if has_eta else why_eta))
    plans.append(FigurePlan("5", "fig5-optimization-stability",
                            "Fig. 5 — optimization stability per optimizer",
                            (lambda: figure_optimization_stability(summary, colors)) if has_eta else None,
                            "" if has_eta else why_eta))
    pert = amalgamated(data, perturbed=True)
    multi = summary[summary.optimizer.isin(pert) & np.isfinite(summary.sigma_alpha)]
    if len(multi):
        plans.append(FigurePlan("6", "fig6-meta-stability", "Fig. 6 — meta-stability vs magnitude",
                                lambda: figure_meta_stability(summary, data)))
    else:
        plans.append(FigurePlan(
            "6", "fig6-meta-stability", "Fig. 6 — meta-stability vs magnitude", None,
            "needs perturbed amalgamated optimizers with ≥ 2 replicates each "
            f"(found perturbed: {', '.join(pert) or 'none'}). Run `optamal distill --scheme choice "
            "--pool large --perturb random --magnitude M --replicates 8` for M in 5e-4, 1e-3, 2e-3, "
            "5e-3, 1e-2 and `--perturb adv --magnitude M` for M in 1e-4, 1e-3, plus the unperturbed "
            "run with --replicates 8, then evaluate them (or `optamal pipeline --sweep full "
            "--replicates 8`)"))
    return plans
