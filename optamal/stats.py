"""Statistics of evaluations (METHOD §9, Appendix D): pure functions on pandas DataFrames.

Data flow: ``evaluations.csv`` rows (one per epoch) → :func:`evaluation_responses` (one row
per evaluation: best log validation loss, final log training loss, best accuracy, the
optimization-stability residual σ_η) → :func:`mixed_effects` per (optimizer, problem).

The model (D.1) is Y_ij = μ + α_i + ε_ij, replicate i, evaluation j, α_i ~ N(0, σ_α²)
(meta-stability: how much independently meta-trained replicates differ), ε_ij ~ N(0, σ_ε²)
(evaluation stability: how much one replicate's evaluations differ). It is fitted with
statsmodels MixedLM (groups = replicate, REML) on the standardised response — centred and
divided by its SD, then mapped back — because the optimiser behind MixedLM is badly
conditioned on raw log losses with tiny variances.

Confidence interval for μ. For G replicates the REML standard error is estimated from G
group effects, so the interval uses Student's t with G − 1 degrees of freedom: for a
balanced design with an interior fit this is exactly the classical interval
(SE² = MSB / (G n)), and it keeps ~95% coverage at the paper's 8 × 10 where the z-interval
MixedLM prints gives ~92% (measured in tests/test_stats.py). With few replicates the
variance components themselves are unreliable (the z-interval covered 87% at 3 × 2), so
when G < ``min_groups`` (default 5), or the fit fails or lands on the boundary (σ_α = 0),
the interval is the t-interval on the replicate means (G − 1 dof), and ``note`` says so.
With one replicate (teachers; a one-replicate run) σ_α is not estimable: the interval is a
t-interval over the evaluations and ignores replicate variation — also said in ``note``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

CELL = ["optimizer", "run", "replicate", "problem", "evaluation"]


# --------------------------------------------------------------------------- helpers
def _t(confidence: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def _result(mu=math.nan, lo=math.nan, hi=math.nan, se=math.nan, sa=math.nan, se_=math.nan,
            method="none", note="", n_groups=0, n_obs=0, dof=math.nan) -> dict[str, Any]:
    return dict(mu=float(mu), ci_low=float(lo), ci_high=float(hi), se=float(se),
                sigma_alpha=float(sa), sigma_eps=float(se_), method=method, note=note,
                n_groups=int(n_groups), n_obs=int(n_obs), dof=float(dof))


def anova_components(y: pd.Series, groups: pd.Series) -> tuple[float, float]:
    """Method-of-moments (one-way ANOVA) σ_α and σ_ε, σ_α² truncated at 0.

    Unbalanced groups use n₀ = (N − Σ nᵢ²/N) / (G − 1). Used as an independent check of the
    REML fit and when the fit fails."""
    frame = pd.DataFrame({"y": np.asarray(y, float), "g": np.asarray(groups)})
    sizes = frame.groupby("g").y.size()
    means = frame.groupby("g").y.mean()
    G, N = len(sizes), int(sizes.sum())
    if G < 2 or N <= G:
        return math.nan, math.nan
    grand = frame.y.mean()
    ssw = float(((frame.y - frame.g.map(means)) ** 2).sum())
    ssb = float((sizes * (means - grand) ** 2).sum())
    msw, msb = ssw / (N - G), ssb / (G - 1)
    n0 = (N - float((sizes ** 2).sum()) / N) / (G - 1)
    return math.sqrt(max(0.0, (msb - msw) / n0)), math.sqrt(msw)


def _fit_mixedlm(y: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """REML fit of y = μ + α_g + ε on the standardised response, mapped back."""
    from statsmodels.regression.mixed_linear_model import MixedLM, MixedLMParams
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    center, scale = float(np.mean(y)), float(np.std(y, ddof=1))
    z = (y - center) / scale
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model = MixedLM(z, np.ones((len(z), 1)), groups=groups)
            # Start from the ANOVA estimates (3x faster; the optimum is the same).
            sa, s_eps = anova_components(pd.Series(z), pd.Series(groups))
            ratio = (sa / s_eps) ** 2 if math.isfinite(sa) and s_eps > 0 else 0.0
            start = MixedLMParams.from_components(fe_params=np.zeros(1),
                                                  cov_re=np.array([[max(ratio, 1e-3)]]))
            # lbfgs (statsmodels' first choice in some versions) lands falsely on σ_α = 0 here;
            # bfgs, then derivative-free fallbacks, agree with the ANOVA estimates.
            fit = model.fit(reml=True, method=["bfgs", "powell", "nm"], start_params=start)
            caught = [str(x.message) for x in w if issubclass(x.category, (ConvergenceWarning,
                                                                          RuntimeWarning,
                                                                          UserWarning))]
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
        return dict(ok=False, why=f"MixedLM failed ({type(exc).__name__}: {exc})")
    var_re = float(np.asarray(fit.cov_re)[0, 0])
    mu_z, se_z = float(np.asarray(fit.fe_params)[0]), float(np.asarray(fit.bse_fe)[0])
    values = [mu_z, se_z, var_re, float(fit.scale)]
    if not all(math.isfinite(v) for v in values) or not fit.converged:
        return dict(ok=False, why="MixedLM did not converge")
    boundary = var_re < 1e-6 or any("boundary" in m for m in caught)
    return dict(ok=True, boundary=boundary, mu=center + scale * mu_z, se=scale * se_z,
                sigma_alpha=scale * math.sqrt(max(var_re, 0.0)),
                sigma_eps=scale * math.sqrt(float(fit.scale)), warnings=caught)


# --------------------------------------------------------------------------- the model
def mixed_effects(df: pd.DataFrame, response: str, group: str = "replicate", *,
                  confidence: float = 0.95, min_groups: int = 5) -> dict[str, Any]:
    """μ with a ``confidence`` CI, σ_α and σ_ε of Y = μ + α_group + ε (METHOD §9, D.1).

    Returns ``dict(mu, ci_low, ci_high, se, sigma_alpha, sigma_eps, method, note,
    n_groups, n_obs, dof)``; ``method`` is one of ``mixedlm`` (REML, t(G−1) interval),
    ``t-replicate-means`` (the fallback), ``t-evaluations`` (one replicate),
    ``single`` (one observation), ``constant`` (no variation) or ``none`` (no data).
    Non-finite responses are dropped (the caller counts them as diverged)."""
    frame = df[[response, group]].copy()
    frame[response] = pd.to_numeric(frame[response], errors="coerce")
    frame = frame[np.isfinite(frame[response])]
    y, g = frame[response].to_numpy(float), frame[group].to_numpy()
    n = len(y)
    if n == 0:
        return _result(note="no finite observations")
    groups = pd.Series(y).groupby(g)
    G = groups.ngroups
    if n == 1:
        return _result(mu=y[0], method="single", n_groups=G, n_obs=1,
                       note="a single observation: no interval")
    if float(np.std(y)) == 0.0:
        return _result(mu=y[0], lo=y[0], hi=y[0], se=0.0, sa=0.0 if G > 1 else math.nan,
                       se_=0.0, method="constant", n_groups=G, n_obs=n,
                       note="every observation is identical")
    if G == 1:
        se = float(np.std(y, ddof=1)) / math.sqrt(n)
        h = _t(confidence, n - 1) * se
        mu = float(np.mean(y))
        return _result(mu, mu - h, mu + h, se, math.nan, float(np.std(y, ddof=1)),
                       "t-evaluations", "one replicate: σ_α not estimable; the interval is "
                       f"over the {n} evaluations and ignores replicate-to-replicate variation",
                       1, n, n - 1)
    means = groups.mean()
    if int(groups.size().max()) == 1:
        se = float(means.std(ddof=1)) / math.sqrt(G)
        h = _t(confidence, G - 1) * se
        mu = float(means.mean())
        return _result(mu, mu - h, mu + h, se, math.nan, math.nan, "t-replicate-means",
                       "one evaluation per replicate: σ_α and σ_ε are confounded", G, n, G - 1)
    fit = _fit_mixedlm(y, g)
    reasons = []
    if G < min_groups:
        reasons.append(f"{G} replicates < {min_groups}")
    if not fit["ok"]:
        reasons.append(fit["why"])
    elif fit["boundary"]:
        reasons.append("the REML fit is on the boundary (σ_α ≈ 0)")
    if not reasons:
        h = _t(confidence, G - 1) * fit["se"]
        return _result(fit["mu"], fit["mu"] - h, fit["mu"] + h, fit["se"], fit["sigma_alpha"],
                       fit["sigma_eps"], "mixedlm", f"MixedLM (REML), t({G - 1}) interval",
                       G, n, G - 1)
    # Fallback (D.1 with few replicates): t-interval on the replicate means.
    se = float(means.std(ddof=1)) / math.sqrt(G)
    h = _t(confidence, G - 1) * se
    mu = float(means.mean())
    if fit["ok"]:
        sa, s_eps, src = fit["sigma_alpha"], fit["sigma_eps"], "σ from REML"
    else:
        sa, s_eps = anova_components(pd.Series(y), pd.Series(g))
        src = "σ from one-way ANOVA"
    return _result(mu, mu - h, mu + h, se, sa, s_eps, "t-replicate-means",
                   f"t-interval on replicate means ({G - 1} dof) because "
                   f"{'; '.join(reasons)}; {src}", G, n, G - 1)


# --------------------------------------------------------------------------- per evaluation
def smoothing_residual_sd(log_curve: np.ndarray, sigma: float = 2.0) -> float:
    """σ_η of one evaluation (D.2): SD of log val loss minus its Gaussian-smoothed self
    (``gaussian_filter1d(σ, mode="nearest")``, σ in epochs). NaN if the curve has fewer
    than 3 points or a non-finite value (diverged)."""
    from scipy.ndimage import gaussian_filter1d

    y = np.asarray(log_curve, float)
    if len(y) < 3 or not np.all(np.isfinite(y)):
        return math.nan
    return float(np.std(y - gaussian_filter1d(y, sigma, mode="nearest")))


def evaluation_responses(ev: pd.DataFrame, sigma: float = 2.0) -> pd.DataFrame:
    """One row per evaluation (``CELL`` keys) from per-epoch rows:

    - ``best_val``: log of the best (min over epochs) validation loss (Y_val, §9);
    - ``final_train``: log of the last epoch's training loss (Y_train);
    - ``best_acc``: best validation accuracy over epochs;
    - ``sigma_eta``: optimization stability residual SD (D.2);
    - ``diverged``: any epoch diverged (or a non-finite loss); such evaluations get NaN
      responses, so the statistics are over the evaluations that did not diverge;
    - ``epochs``: number of epochs logged."""
    rows = []
    for key, g in ev.sort_values("epoch").groupby(CELL, sort=True):
        val = g.val_loss.to_numpy(float)
        train = g.train_loss.to_numpy(float)
        div = bool(g.diverged.astype(bool).any()) or not (np.all(np.isfinite(val))
                                                         and np.all(np.isfinite(train)))
        with np.errstate(divide="ignore", invalid="ignore"):
            logv = np.log(np.maximum(val, 1e-30))
        rows.append(dict(zip(CELL, key),
                         best_val=math.nan if div else float(np.log(max(val.min(), 1e-30))),
                         final_train=math.nan if div else float(np.log(max(train[-1], 1e-30))),
                         best_acc=math.nan if div else float(np.nanmax(g.val_acc.to_numpy(float))),
                         sigma_eta=math.nan if div else smoothing_residual_sd(logv, sigma),
                         diverged=div, epochs=len(g)))
    return pd.DataFrame(rows, columns=CELL + ["best_val", "final_train", "best_acc", "sigma_eta",
                                              "diverged", "epochs"])


def oracle(summary: pd.DataFrame, teachers: set[str] | list[str]) -> dict[str, str]:
    """Per problem, the teacher with the best (lowest) mean best log validation loss (§9)."""
    out: dict[str, str] = {}
    sub = summary[summary.optimizer.isin(list(teachers)) & np.isfinite(summary.val_mu)]
    for problem, g in sub.groupby("problem"):
        out[str(problem)] = str(g.loc[g.val_mu.idxmin(), "optimizer"])
    return out


def paired_differences(resp: pd.DataFrame, learned: list[str], references: dict[str, dict[str, str]],
                       *, confidence: float = 0.95, min_groups: int = 5) -> pd.DataFrame:
    """Paired comparisons of learned optimizers with reference optimizers (e.g. Adam, the
    oracle teacher), on the best log validation loss.

    Evaluation j of every optimizer starts from the same θ0, warmup and data order, so
    Δ_ij = Y_val(learned, replicate i, evaluation j) − Y_val(reference, evaluation j) removes
    what the evaluations share. Δ is summarised with :func:`mixed_effects` (groups =
    replicates, so the interval accounts for replicate-to-replicate variation when there are
    several). A reference with several replicates enters as its mean over them. Pairs where
    either side diverged are dropped and counted. ``references`` maps a role (``adam``,
    ``oracle``) to {problem: reference optimizer}. Δ < 0: the learned optimizer is better;
    ``ratio`` = exp(μ_Δ) is the ratio of best validation losses."""
    cols = ["problem", "optimizer", "role", "reference", "pairs", "dropped", "wins",
            "delta_mu", "delta_ci_low", "delta_ci_high", "ratio", "method", "note"]
    rows = []
    for opt in learned:
        mine = resp[resp.optimizer == opt]
        for problem in sorted(mine.problem.unique()):
            a = mine[mine.problem == problem]
            for role, by_problem in references.items():
                ref = by_problem.get(problem)
                if ref is None or ref == opt:
                    continue
                r = resp[(resp.optimizer == ref) & (resp.problem == problem)]
                if r.empty:
                    continue
                ref_y = r.groupby("evaluation").best_val.agg(
                    lambda v: float(v.mean()) if np.all(np.isfinite(v)) else math.nan)
                d = a[["replicate", "evaluation", "best_val"]].copy()
                d["delta"] = d.best_val - d.evaluation.map(ref_y)
                ok = d[np.isfinite(d.delta)]
                res = mixed_effects(ok, "delta", confidence=confidence, min_groups=min_groups)
                rows.append(dict(
                    problem=problem, optimizer=opt, role=role, reference=ref, pairs=len(ok),
                    dropped=len(d) - len(ok), wins=int((ok.delta < 0).sum()),
                    delta_mu=res["mu"], delta_ci_low=res["ci_low"], delta_ci_high=res["ci_high"],
                    ratio=math.exp(res["mu"]) if math.isfinite(res["mu"]) else math.nan,
                    method=res["method"], note=res["note"]))
    return pd.DataFrame(rows, columns=cols)


def simulate(n_groups: int, n_per: int, sigma_alpha: float, sigma_eps: float, mu: float = 0.0,
             rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Draws from Y_ij = μ + α_i + ε_ij (for tests and for checking coverage)."""
    rng = rng or np.random.default_rng()
    alpha = rng.normal(0.0, sigma_alpha, n_groups)
    rep = np.repeat(np.arange(n_groups), n_per)
    y = mu + alpha[rep] + rng.normal(0.0, sigma_eps, n_groups * n_per)
    return pd.DataFrame({"replicate": rep, "evaluation": np.tile(np.arange(n_per), n_groups), "y": y})


__all__ = ["mixed_effects", "anova_components", "smoothing_residual_sd", "evaluation_responses",
           "oracle", "simulate", "CELL"]
