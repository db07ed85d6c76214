"""Statistics of METHOD §9 / Appendix D (optamal.stats), on simulated data with known truth.

Y_ij = μ + α_i + ε_ij with α ~ N(0, σ_α²), ε ~ N(0, σ_ε²): the REML fit must recover σ_α
and σ_ε, agree with the classical one-way ANOVA on balanced data, and its interval must
cover μ about 95% of the time. Few replicates, a boundary fit or one replicate must fall
back to the documented t-intervals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from optamal.stats import (anova_components, evaluation_responses, mixed_effects, oracle,
                           paired_differences, simulate, smoothing_residual_sd)

MU, SIGMA_ALPHA, SIGMA_EPS = -1.3, 0.5, 0.2   # a log-loss-like scale, paper design 8 × 10


def _classical(df: pd.DataFrame, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Balanced one-way random effects by hand: μ̂, CI half-width t(G−1)·√(MSB/(G n)),
    σ̂_α = √((MSB − MSW)/n), σ̂_ε = √MSW."""
    groups = [g.y.to_numpy() for _, g in df.groupby("replicate")]
    G, n = len(groups), len(groups[0])
    means = np.array([g.mean() for g in groups])
    grand = means.mean()
    msb = n * ((means - grand) ** 2).sum() / (G - 1)
    msw = sum(((g - g.mean()) ** 2).sum() for g in groups) / (G * (n - 1))
    half = sps.t.ppf(0.5 + confidence / 2, G - 1) * math.sqrt(msb / (G * n))
    return grand, half, math.sqrt(max(0.0, (msb - msw) / n)), math.sqrt(msw)


# --------------------------------------------------------------------------- recovery
def test_reml_recovers_known_sigmas_on_average_8x10():
    rng = np.random.default_rng(7)
    fits = [mixed_effects(simulate(8, 10, SIGMA_ALPHA, SIGMA_EPS, MU, rng), "y", min_groups=5)
            for _ in range(40)]
    sa = np.array([f["sigma_alpha"] for f in fits])
    se = np.array([f["sigma_eps"] for f in fits])
    mu = np.array([f["mu"] for f in fits])
    # σ_ε rests on 72 within-replicate dof: tight. σ_α on 7 between-replicate dof: looser,
    # and its square root is biased low by a few percent.
    assert abs(se.mean() / SIGMA_EPS - 1) < 0.05
    assert abs(sa.mean() / SIGMA_ALPHA - 1) < 0.15
    assert abs(mu.mean() - MU) < 0.1
    # Each single fit is within generous per-fit tolerances.
    assert np.all(np.abs(se / SIGMA_EPS - 1) < 0.35)
    assert np.all((sa > 0.1) & (sa < 1.2))


def test_reml_equals_classical_anova_on_balanced_interior_fit():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(6):
        df = simulate(8, 10, SIGMA_ALPHA, SIGMA_EPS, MU, rng)
        mu, half, sa, se = _classical(df)
        if sa == 0:
            continue
        fit = mixed_effects(df, "y")
        assert fit["method"] == "mixedlm"
        assert fit["n_groups"] == 8 and fit["n_obs"] == 80 and fit["dof"] == 7
        assert fit["mu"] == pytest.approx(mu, abs=1e-6)
        assert fit["sigma_alpha"] == pytest.approx(sa, rel=1e-3)
        assert fit["sigma_eps"] == pytest.approx(se, rel=1e-3)
        assert (fit["ci_high"] - fit["ci_low"]) / 2 == pytest.approx(half, rel=1e-3)
        a_sa, a_se = anova_components(df.y, df.replicate)
        assert (a_sa, a_se) == pytest.approx((sa, se), rel=1e-9)
        checked += 1
    assert checked >= 4


def test_scale_invariance_fit_on_standardised_response():
    """Tiny variances on a large offset (raw log losses) fit as well as unit-scale data."""
    df = simulate(8, 10, 1.0, 0.5, 0.0, np.random.default_rng(3))
    tiny = df.assign(y=12.0 + 1e-4 * df.y)
    a, b = mixed_effects(df, "y"), mixed_effects(tiny, "y")
    assert b["method"] == a["method"] == "mixedlm"
    assert b["sigma_alpha"] == pytest.approx(1e-4 * a["sigma_alpha"], rel=1e-3)
    assert b["sigma_eps"] == pytest.approx(1e-4 * a["sigma_eps"], rel=1e-3)
    assert b["mu"] == pytest.approx(12.0 + 1e-4 * a["mu"], rel=1e-9)


def _coverage(n_sims: int, G: int, n: int, sa: float, se: float, seed: int, **kw) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sims):
        fit = mixed_effects(simulate(G, n, sa, se, MU, rng), "y", **kw)
        hits += fit["ci_low"] <= MU <= fit["ci_high"]
    return hits / n_sims


def test_ci_coverage_near_95_percent_8x10():
    # σ_α dominant: the regime where MixedLM's z-interval covers only ~88%.
    cov = _coverage(150, 8, 10, 1.0, 0.3, seed=21)
    assert 0.91 <= cov <= 0.99


def test_fallback_interval_coverage_3x2():
    """3 replicates × 2 evaluations (the z-interval covered 87% here): the fallback
    t-interval on replicate means keeps ~95%."""
    cov = _coverage(120, 3, 2, SIGMA_ALPHA, 1.0, seed=5)
    assert 0.90 <= cov <= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("sa,se", [(0.5, 0.2), (1.0, 0.3), (0.2, 1.0)])
def test_ci_coverage_full_check(sa, se):
    cov = _coverage(1000, 8, 10, sa, se, seed=100)
    assert 0.935 <= cov <= 0.965   # ± 2.2 binomial SEs of 0.95


# --------------------------------------------------------------------------- fallbacks
def test_few_replicates_fall_back_to_t_on_replicate_means():
    df = simulate(3, 4, SIGMA_ALPHA, SIGMA_EPS, MU, np.random.default_rng(2))
    fit = mixed_effects(df, "y")
    means = df.groupby("replicate").y.mean()
    half = sps.t.ppf(0.975, 2) * means.std(ddof=1) / math.sqrt(3)
    assert fit["method"] == "t-replicate-means"
    assert "3 replicates < 5" in fit["note"]
    assert fit["mu"] == pytest.approx(means.mean())
    assert fit["ci_low"] == pytest.approx(means.mean() - half)
    assert fit["ci_high"] == pytest.approx(means.mean() + half)
    assert fit["dof"] == 2
    assert math.isfinite(fit["sigma_alpha"]) and math.isfinite(fit["sigma_eps"])


def test_boundary_fit_falls_back_and_says_so():
    # Replicate means identical by construction: between-replicate variance is exactly 0.
    base = np.array([0.3, -0.2, 0.5, -0.6, 0.0, 0.1, -0.1, 0.2, -0.4, 0.2])
    df = pd.DataFrame({"replicate": np.repeat(range(6), 10),
                       "y": np.concatenate([np.roll(base, k) for k in range(6)])})
    fit = mixed_effects(df, "y")
    assert fit["method"] == "t-replicate-means"
    assert "boundary" in fit["note"]
    assert fit["sigma_alpha"] == pytest.approx(0.0, abs=1e-3)


def test_one_replicate_interval_over_evaluations_and_no_sigma_alpha():
    y = np.array([1.0, 1.2, 0.9, 1.1, 1.05])
    fit = mixed_effects(pd.DataFrame({"replicate": 0, "y": y}), "y")
    half = sps.t.ppf(0.975, 4) * y.std(ddof=1) / math.sqrt(5)
    assert fit["method"] == "t-evaluations"
    assert math.isnan(fit["sigma_alpha"])
    assert fit["sigma_eps"] == pytest.approx(y.std(ddof=1))
    assert (fit["ci_low"], fit["ci_high"]) == pytest.approx((y.mean() - half, y.mean() + half))
    assert "one replicate" in fit["note"]


def test_degenerate_inputs():
    none = mixed_effects(pd.DataFrame({"replicate": [0, 1], "y": [np.nan, np.inf]}), "y")
    assert none["method"] == "none" and math.isnan(none["mu"])
    one = mixed_effects(pd.DataFrame({"replicate": [0], "y": [2.0]}), "y")
    assert one["method"] == "single" and one["mu"] == 2.0 and math.isnan(one["ci_low"])
    const = mixed_effects(pd.DataFrame({"replicate": [0, 0, 1, 1], "y": [3.0] * 4}), "y")
    assert const["method"] == "constant" and const["ci_low"] == const["ci_high"] == 3.0
    # Non-finite responses (diverged evaluations) are dropped, not propagated.
    df = simulate(8, 10, SIGMA_ALPHA, SIGMA_EPS, MU, np.random.default_rng(4))
    with_nan = pd.concat([df, pd.DataFrame({"replicate": [0, 3], "evaluation": [10, 10],
                                            "y": [np.nan, np.inf]})])
    assert mixed_effects(with_nan, "y")["n_obs"] == 80


# --------------------------------------------------------------------------- σ_η and responses
def _smooth_by_hand(y: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing written out: kernel radius 4σ (scipy's default truncate),
    edges padded by repeating the end values (mode "nearest")."""
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.concatenate([np.full(r, y[0]), y, np.full(r, y[-1])])
    return np.array([(padded[i:i + 2 * r + 1] * k).sum() for i in range(len(y))])


def test_optimization_stability_residual_matches_hand_smoothing():
    rng = np.random.default_rng(0)
    y = np.log(np.linspace(2.0, 0.3, 25)) + rng.normal(0, 0.05, 25)
    expected = np.std(y - _smooth_by_hand(y, 2.0))
    assert smoothing_residual_sd(y, 2.0) == pytest.approx(expected, rel=1e-10)
    assert smoothing_residual_sd(np.full(10, -0.7)) == pytest.approx(0.0, abs=1e-12)
    noisy = smoothing_residual_sd(y + rng.normal(0, 0.3, 25))
    assert noisy > 3 * smoothing_residual_sd(y)          # a jumpier curve is less stable
    assert math.isnan(smoothing_residual_sd([0.1, 0.2]))  # too short
    assert math.isnan(smoothing_residual_sd([0.1, np.nan, 0.2, 0.3]))


def test_evaluation_responses_per_evaluation():
    rows = []
    for ev, vals, div in ((0, [2.0, 1.0, 1.5, 1.2], False), (1, [2.0, 0.5, np.nan, np.nan], True)):
        for e, v in enumerate(vals, 1):
            rows.append(dict(optimizer="adam", run="t", replicate=0, evaluation=ev, problem="mlp",
                             epoch=e, train_loss=v * 1.1, val_loss=v, val_acc=0.1 * e,
                             seconds=e, diverged=div and e >= 3))
    resp = evaluation_responses(pd.DataFrame(rows)).set_index("evaluation")
    assert resp.loc[0, "best_val"] == pytest.approx(math.log(1.0))
    assert resp.loc[0, "final_train"] == pytest.approx(math.log(1.2 * 1.1))
    assert resp.loc[0, "best_acc"] == pytest.approx(0.4)
    assert resp.loc[0, "sigma_eta"] == pytest.approx(
        np.std(np.log([2.0, 1.0, 1.5, 1.2]) - _smooth_by_hand(np.log([2.0, 1.0, 1.5, 1.2]), 2.0)))
    assert not resp.loc[0, "diverged"] and resp.loc[0, "epochs"] == 4
    assert resp.loc[1, "diverged"] and math.isnan(resp.loc[1, "best_val"])


def test_oracle_is_the_best_teacher_per_problem():
    summary = pd.DataFrame({
        "problem": ["a", "a", "a", "b", "b"],
        "optimizer": ["adam", "sgd", "choice-large", "adam", "sgd"],
        "val_mu": [0.5, 0.4, 0.1, 0.2, np.nan]})
    assert oracle(summary, {"adam", "sgd"}) == {"a": "sgd", "b": "adam"}


# --------------------------------------------------------------------------- paired comparisons
def _resp(rows):
    return pd.DataFrame(rows, columns=["optimizer", "run", "replicate", "problem", "evaluation",
                                       "best_val", "diverged"])


def test_paired_differences_one_replicate_is_a_paired_t_interval():
    """Shared per-evaluation difficulty cancels: the learned optimizer is 0.2 better than Adam
    evaluation by evaluation although both vary by ±1 between evaluations."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 1.0, 6)
    noise = rng.normal(0, 0.05, 6)
    rows = [("adam", "t", 0, "train", j, -1.0 + shared[j], False) for j in range(6)]
    rows += [("sgd", "t", 0, "train", j, -0.5 + shared[j], False) for j in range(6)]
    rows += [("student", "s", 0, "train", j, -1.2 + shared[j] + noise[j], False) for j in range(6)]
    comp = paired_differences(_resp(rows), ["student"],
                              {"adam": {"train": "adam"}, "oracle": {"train": "adam"}})
    assert list(comp.role) == ["adam", "oracle"]
    r = comp.iloc[0]
    d = -0.2 + noise
    half = sps.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert r.delta_mu == pytest.approx(d.mean(), abs=1e-12)
    assert r.delta_ci_high - r.delta_mu == pytest.approx(half, rel=1e-9)
    assert r.delta_ci_high < 0 and r.pairs == 6 and r.wins == 6 and r.dropped == 0
    assert r.ratio == pytest.approx(math.exp(d.mean()))
    # unpaired, the two intervals would overlap heavily: pairing is what makes it clear
    a = mixed_effects(_resp(rows).query("optimizer == 'adam'"), "best_val")
    s = mixed_effects(_resp(rows).query("optimizer == 'student'"), "best_val")
    assert s["ci_high"] > a["ci_low"]


def test_paired_differences_drop_diverged_pairs_and_skip_self():
    rows = [("adam", "t", 0, "mlp", j, -1.0 + 0.1 * j, False) for j in range(4)]
    rows[1] = ("adam", "t", 0, "mlp", 1, math.nan, True)           # Adam diverged once
    rows += [("student", "s", r, "mlp", j, -0.9 + 0.1 * j + 0.01 * r, False)
             for r in range(2) for j in range(4)]
    rows[-1] = ("student", "s", 1, "mlp", 3, math.nan, True)         # the student once
    comp = paired_differences(_resp(rows), ["student", "adam"], {"adam": {"mlp": "adam"}})
    assert list(comp.optimizer) == ["student"]                        # adam vs itself: skipped
    r = comp.iloc[0]
    assert r.pairs == 5 and r.dropped == 3 and r.wins == 0
    assert r.delta_mu > 0                                              # worse than Adam
