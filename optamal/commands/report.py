"""``optamal report``: statistics, figures and tables from run directories (METHOD §9).

Orchestration only: :mod:`optamal.report` loads, joins, fits and draws; this module makes
the output folder (a run directory with its own manifest), shows progress, writes the
files and prints the headline table. Reads nothing but run directories.

Output (``--out``, default ``<source>/report/<timestamp>``): ``report.md`` (figures
embedded), ``summary.csv`` / ``summary.md`` (with the paired comparisons of learned optimizers
vs Adam and the oracle, also ``comparisons.csv``), ``responses.csv`` (one row per evaluation),
``fig*.png`` (+ ``.pdf``), ``table4-cost.{csv,md}``, ``table5-evaluation-stability.{csv,md}``.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from optamal import __version__
from optamal.console import console, progress, warn
from optamal.errors import OptamalError
from optamal.report_config import ReportConfig
from optamal.runs import (SCHEMA_VERSION, Run, _now, atomic_write_csv, atomic_write_json,
                          atomic_write_text)


def _create_run(out: Path, cfg: ReportConfig, extra: dict[str, Any]) -> Run:
    """A run directory at exactly ``out`` (``--out``), with the usual manifest."""
    if out.exists() and not out.is_dir():
        raise OptamalError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise OptamalError(f"output folder {out} already exists and is not empty; pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptamalError(f"cannot create output folder {out}: {exc.strerror}") from None
    import platform
    import socket
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("pandas", "statsmodels", "scipy", "matplotlib"):   # no torch import: fast
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    manifest = {"schema_version": SCHEMA_VERSION, "optamal_version": __version__,
                "command": "report", "name": out.name, "argv": list(sys.argv),
                "config": cfg.to_dict(), "seed": cfg.seed, "device": "cpu",
                "versions": versions, "host": socket.gethostname(), "started": _now(),
                "ended": None, "status": "running", "error": None, **extra}
    run = Run(out, manifest)
    run.save_manifest()
    atomic_write_json(out / "config.json", cfg.to_dict())
    return run


def _default_out(source: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base, name, n = source / "report", stamp, 1
    while (base / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return base / name


def report(cfg: ReportConfig) -> Run:
    """Build the report of every run under ``cfg.source``; returns the report's run."""
    from optamal import report as rp

    source = Path(cfg.source)
    console.print(f"report: reading runs under {source}")
    data = rp.load(source, on_warning=warn)
    learned = data.optimizers[data.optimizers.kind == "learned"].optimizer
    reps = data.evals[data.evals.optimizer.isin(learned)].groupby("optimizer").replicate.nunique()
    notices = []
    if len(reps) and int(reps.max()) < 2:
        notices.append("every learned optimizer has a single replicate: meta-stability σ_α is not "
                       "estimable (shown as —), CIs are over evaluations only, and Fig. 6 needs "
                       "≥ 2 replicates (`--replicates 8` on distill, as in the paper)")
    elif len(reps) and int(reps.min()) < cfg.min_replicates:
        notices.append(f"some learned optimizers have fewer than {cfg.min_replicates} replicates: "
                       "their CIs are t-intervals on replicate means (see report.md)")
    for n in notices:
        warn(n)
    out = Path(cfg.out) if cfg.out else _default_out(source)
    run = _create_run(out, cfg, {"source": str(source.resolve()),
                                 "evaluate_runs": [str(r.path.resolve()) for r in data.evaluate_runs],
                                 "warnings": data.warnings + notices})
    console.print(f"report: {len(data.evaluate_runs)} evaluate run(s), "
                  f"{data.evals.optimizer.nunique()} optimizer(s), "
                  f"{data.evals.problem.nunique()} problem(s), "
                  f"{len(data.evals.groupby(['optimizer', 'replicate', 'problem', 'evaluation']))} "
                  f"evaluation(s) → {out}")
    with run.track():
        with progress() as bar:
            task = bar.add_task("mixed models", total=rp.n_summary_cells(data), status="")
            summary, resp = rp.summarize(data, confidence=cfg.confidence,
                                         min_groups=cfg.min_replicates, sigma=cfg.smoothing_sigma,
                                         on_cell=lambda: bar.advance(task))
            atomic_write_csv(out / "summary.csv", summary)
            atomic_write_csv(out / "responses.csv", resp)
            comp = rp.comparisons(data, summary, resp, confidence=cfg.confidence,
                                  min_groups=cfg.min_replicates)
            atomic_write_csv(out / "comparisons.csv", comp)
            atomic_write_text(out / "summary.md", "# Summary\n\n" + _summary_intro(cfg) + "\n"
                              + rp.markdown_table(rp.summary_display(summary))
                              + _comparisons_md(comp, level="##"))
            plans = rp.figure_plans(data, summary, cfg.reference, cfg.max_curves)
            if not cfg.figures:
                plans = [rp.FigurePlan(p.key, p.stem, p.title, None, "figures turned off (--no-figures)")
                         for p in plans]
            ftask = bar.add_task("figures", total=len(plans), status="")
            drawn: dict[str, list[str]] = {}
            failed: dict[str, str] = {}
            for plan in plans:
                if plan.draw is not None:
                    bar.update(ftask, status=plan.stem)
                    try:
                        drawn[plan.key] = rp.save_figure(plan.draw(), out, plan.stem, cfg.formats)
                    except Exception as exc:  # noqa: BLE001 - one figure must not sink the report
                        failed[plan.key] = f"{type(exc).__name__}: {exc}"
                        warn(f"{plan.title} could not be drawn ({failed[plan.key]})")
                bar.advance(ftask)
        cost = rp.table_cost(data)
        atomic_write_csv(out / "table4-cost.csv", cost)
        atomic_write_text(out / "table4-cost.md", "# Table 4 — training cost\n\n"
                          + rp.markdown_table(rp.table_cost_display(cost)))
        stab = rp.table_evaluation_stability(summary)
        atomic_write_csv(out / "table5-evaluation-stability.csv", stab)
        atomic_write_text(out / "table5-evaluation-stability.md",
                          "# Table 5 — evaluation stability σ_ε\n\n" + _TABLE5_NOTE + "\n"
                          + rp.markdown_table(stab, align_right=set(stab.columns[1:])))
        atomic_write_text(out / "report.md", _report_md(cfg, data, summary, plans, drawn, failed,
                                                        cost, stab, notices, comp))
        run.update(figures={k: v for k, v in drawn.items()},
                   figures_missing={p.key: p.missing for p in plans if p.draw is None},
                   figures_failed=failed)
        _headline(summary)
    console.print(f"report: {len(drawn)} figure(s), tables and report.md in {out}")
    return run


_TABLE5_NOTE = ("σ_ε of the best log validation loss (Y = μ + α + ε), per optimizer and problem; "
                "lower is more stable. \"—\": some evaluation diverged (or σ_ε is not defined).\n")


def _summary_intro(cfg: ReportConfig) -> str:
    return (f"Per (optimizer, problem). μ: mean of the best log validation loss (Y_val = log min_t "
            f"val_loss) and of the final log training loss, with {cfg.confidence:.0%} CIs. σ_α: "
            "meta-stability (between replicates), σ_ε: evaluation stability (between evaluations), "
            "σ_η: optimization stability (SD of the log val-loss residual after Gaussian smoothing, "
            f"σ = {cfg.smoothing_sigma:g} epochs). Statistics over evaluations that did not "
            "diverge; \"—\": not defined. See report.md for the CI method.\n")


def _comparisons_md(comp, level: str) -> str:
    """The paired-comparisons section (empty when nothing learned was compared)."""
    from optamal import report as rp

    if comp.empty:
        return ""
    return (f"\n{level} Learned optimizers vs Adam and the oracle\n\n" + rp.COMPARISONS_NOTE + "\n"
            + rp.markdown_table(rp.comparisons_display(comp)))


def _report_md(cfg, data, summary, plans, drawn, failed, cost, stab, notices, comp) -> str:
    from optamal import report as rp

    lines = ["# optamal report", "",
             f"Generated {_now()} by optamal {__version__} from `{data.source}`: "
             f"{len(data.evaluate_runs)} evaluate run(s) "
             f"({', '.join(f'`{rp._rel(r.path, data.source)}`' for r in data.evaluate_runs)}), "
             f"{data.evals.optimizer.nunique()} optimizers, {data.evals.problem.nunique()} problems, "
             f"{int(data.evals.epoch.max())} epoch(s) per evaluation.", ""]
    if notices or data.warnings:
        lines += ["> **Read with care:**", ">"]
        lines += [f"> - {n}" for n in notices + data.warnings]
        lines.append("")
    # Headline: per problem, the oracle, the best amalgamated and the baselines.
    amalg, base = rp.amalgamated(data), rp.baselines(data)
    best = rp.best_amalgamated(summary, amalg)
    lines += ["## Headline", ""]
    if best:
        lines.append(f"Best amalgamated optimizer (mean rank over problems): **{best}**.")
    head = summary[summary.optimizer.isin(set(amalg) | set(base) | {best}) | summary.oracle
                   | (summary.kind == "learned")]
    lines += ["Best log validation loss μ [95% CI] per problem (lower is better); the oracle is the "
              "best teacher at its tuned rate.", "",
              rp.markdown_table(rp.summary_display(head)), "",
              "All optimizers: [summary.md](summary.md) ([summary.csv](summary.csv)); one row per "
              "evaluation: [responses.csv](responses.csv).", ""]
    if not comp.empty:
        lines += [_comparisons_md(comp, level="##").strip(), "",
                  "As CSV: [comparisons.csv](comparisons.csv).", ""]
    lines += ["## Figures", ""]
    for p in plans:
        if p.key in drawn:
            pdf = [n for n in drawn[p.key] if not n.endswith(".png")]
            lines += [f"### {p.title}", "", f"![{p.title}]({p.stem}.png)", ""]
            doc = {"1": rp.figure_schemes, "2": rp.figure_baselines, "3": rp.figure_curves,
                   "4": rp.figure_stability_performance, "5": rp.figure_optimization_stability,
                   "6": rp.figure_meta_stability}[p.key].__doc__ or ""
            caption = " ".join(doc.split())
            lines += [caption + (" Also as " + ", ".join(f"[{n}]({n})" for n in pdf) + "." if pdf else ""), ""]
    missing = [p for p in plans if p.key not in drawn]
    if missing:
        lines += ["### Figures these runs do not support", ""]
        for p in missing:
            why = failed.get(p.key)
            lines.append(f"- **{p.title}**: " + (f"drawing failed ({why})" if why else p.missing) + ".")
        lines.append("")
    lines += ["## Table 4 — training cost", "",
              "From the run manifests (wall time on the machine that ran them; the threads column "
              "is torch's intra-op thread count).", "",
              rp.markdown_table(rp.table_cost_display(cost)), "",
              "## Table 5 — evaluation stability σ_ε", "", _TABLE5_NOTE,
              rp.markdown_table(stab, align_right=set(stab.columns[1:])), ""]
    counts = summary.method.value_counts().to_dict()
    lines += ["## Statistical method", "",
              "Per evaluation: Y_val = log of the best validation loss over epochs, Y_train = log of "
              "the final training loss, σ_η = SD over epochs of log val loss minus its Gaussian "
              f"smoothing (scipy `gaussian_filter1d`, σ = {cfg.smoothing_sigma:g}, mode \"nearest\"). "
              "Per (optimizer, problem) each is fitted with the linear mixed model Y_ij = μ + α_i + "
              "ε_ij (replicate i, evaluation j; statsmodels MixedLM, REML, on the standardised "
              "response): σ_α = SD(α) is meta-stability, σ_ε = SD(ε) evaluation stability.", "",
              f"Confidence intervals ({cfg.confidence:.0%}): with ≥ {cfg.min_replicates} replicates "
              "and an interior fit, μ ± t(G−1)·SE_REML (the z-interval under-covers with few "
              f"replicates); otherwise a t-interval on the replicate means (G−1 dof); with one "
              "replicate (the teachers, single-replicate runs) a t-interval over the evaluations, "
              "which ignores replicate-to-replicate variation. Diverged evaluations are excluded "
              "and counted.", "",
              "CI methods used (cells): " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ".",
              ""]
    notes = summary[summary.method != "mixedlm"].groupby("note").optimizer.apply(
        lambda s: sorted(set(s)))
    if len(notes):
        lines.append("Notes:")
        for note, opts in notes.items():
            if note:
                shown = ", ".join(opts[:6]) + (f" and {len(opts) - 6} more" if len(opts) > 6 else "")
                lines.append(f"- {note} ({shown})")
        lines.append("")
    orc = summary[summary.oracle]
    if len(orc):
        lines += ["Oracle per problem (the teacher with the best μ of best log val loss): "
                  + ", ".join(f"{r.problem}: {r.optimizer}" for _, r in orc.iterrows()) + ".", ""]
    return "\n".join(lines)


def _headline(summary) -> None:
    """The headline numbers on the terminal: per problem, the learned optimizers and the
    oracle (compact enough for 80 columns)."""
    import math

    from rich import box
    from rich.table import Table

    head = summary[(summary.kind == "learned") | summary.oracle].sort_values(["problem", "val_mu"])
    if head.empty:
        head = summary.sort_values(["problem", "val_mu"])

    def g(v: float, spec: str = ".2g") -> str:
        return format(v, spec) if isinstance(v, float) and math.isfinite(v) else "—"

    table = Table(title="best log val loss μ ± 95% CI (lower is better)", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    width = max(len(o) for o in head.optimizer) + 4
    table.add_column("optimizer", overflow="fold", min_width=min(width, 30))
    for col in ("μ ± CI", "σ_α", "σ_ε", "σ_η", "acc", "n"):
        table.add_column(col, justify="right", no_wrap=True)
    for problem, rows in head.groupby("problem", sort=True):
        table.add_row(f"[bold]{problem}[/bold]", *[""] * 6)
        for _, r in rows.iterrows():
            half = (r.val_ci_high - r.val_ci_low) / 2
            table.add_row("  " + r.optimizer + (" ★" if r.oracle else ""),
                          f"{g(r.val_mu, '.3f')}±{g(half, '.2f')}", g(r.sigma_alpha),
                          g(r.sigma_eps), g(r.sigma_eta), g(r.best_val_acc, ".2f"),
                          f"{r.replicates}/{r.evaluations}" + (f" {r.diverged}d" if r.diverged else ""))
    console.print(table)
    console.print("★ oracle (best teacher) · n: replicates/evaluations (d: diverged) · "
                  "σ_α meta-, σ_ε evaluation-, σ_η optimization stability")
