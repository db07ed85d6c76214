"""`optamal report` on hand-built run folders (evaluations.csv + manifests written here).

The numbers in summary.csv are recomputed independently from the CSV (balanced one-way
random-effects formulas, hand Gaussian smoothing); figures must be real PNG/PDF files;
an empty folder, a single replicate and a corrupt CSV must each give a clear message, a
warning-and-skip, never a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from optamal.cli import main

PROBLEMS = ("train", "mlp")
TEACHERS = ("sgd", "momentum", "rmsprop", "adam", "addsign", "powersign")
EPOCHS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- run folders
def _write_run(root: Path, command: str, name: str, config: dict, started: str,
               status: str = "completed", **extra) -> Path:
    path = root / command / name
    path.mkdir(parents=True)
    manifest = {"schema_version": 1, "optamal_version": "0.1.0", "command": command,
                "name": name, "argv": ["optamal", command], "config": config, "seed": 0,
                "device": "cpu", "versions": {"torch_threads": "2"}, "host": "test",
                "started": started, "ended": started, "status": status, "error": None,
                "wall_seconds": 123.0, **extra}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _replicates(n: int) -> dict:
    return {str(i): {"status": "completed", "seconds": 10.0 + i, "meta_epochs": 24,
                     "best_validation": -1.0} for i in range(n)}


def build_runs(root: Path, replicates: int = 6, evaluations: int = 4, seed: int = 0,
               perturbed: bool = True, diverge: bool = True, tag: str = "") -> dict:
    """A tune-lr, a train-choice, distill runs (choice-large, rnnprop, mean-small and, if
    ``perturbed``, choice-large with random perturbations) and one evaluate run whose CSV
    follows Y = μ + α_replicate + ε_evaluation plus a decaying curve."""
    rng = np.random.default_rng(seed)
    t0 = "2026-01-01T00:00:0"
    tune = _write_run(root, "tune-lr", "lr" + tag, {"pool": "large", "grid": [0.1, 1.0], "epochs": 5,
                                                     "profile": "quick"}, t0 + "0+00:00",
                      selected_lrs={t: 0.01 for t in TEACHERS})
    choice = _write_run(root, "train-choice", "large" + tag, {"pool": "large", "profile": "quick"},
                        t0 + "1+00:00", replicates=_replicates(replicates), teachers=list(TEACHERS))
    learned = [("choice-large", "choice-large", "choice", "large", "none", 0.0, {"choice": str(choice)}),
               ("rnnprop", "none", "none", "large", "none", 0.0, {}),
               ("mean-small", "mean-small", "mean", "small", "none", 0.0, {"lrs": str(tune)}),
               ("mean-adam", "mean-adam", "mean", "small", "none", 0.0, {"lrs": str(tune)})]
    if perturbed:
        learned += [(f"choice-large-random{m:g}", f"random{m:g}", "choice", "large", "random", m,
                     {"choice": str(choice)}) for m in (1e-3, 1e-2)]
    entries = [dict(optimizer="choice-optimizer-large", kind="learned", run=choice.name,
                    run_path=str(choice), replicate=i, policy=str(choice / f"replicate-{i}/policy.pt"))
               for i in range(replicates)]
    for k, (label, name, scheme, pool, perturb, mag, pre) in enumerate(learned):
        path = _write_run(root, "distill", name + tag,
                          {"scheme": scheme, "pool": pool, "perturb": perturb, "magnitude": mag,
                           "policy": "rnnprop", "profile": "quick"}, t0 + f"{2 + k}+00:00",
                          scheme=scheme, perturb=perturb, magnitude=mag, prerequisites=pre,
                          replicates=_replicates(replicates),
                          teachers=(["adam"] if label == "mean-adam" else
                                    ["adam", "rmsprop"] if scheme == "mean" else ["choice"]))
        entries += [dict(optimizer=label, kind="learned", run=path.name, run_path=str(path),
                         replicate=i, policy=str(path / f"replicate-{i}/policy.pt"))
                    for i in range(replicates)]
    entries += [dict(optimizer=t, kind="teacher", run=tune.name, run_path=str(tune), replicate=0,
                     teacher=t, lr=0.01) for t in TEACHERS]
    # μ per optimizer: learned around -0.5, teachers spread; adam best on train, sgd on mlp.
    level = {"adam": {"train": -1.2, "mlp": -0.6}, "sgd": {"train": -0.7, "mlp": -0.9}}
    rows = []
    for e in entries:
        opt, rep = e["optimizer"], e["replicate"]
        for p in PROBLEMS:
            mu = level.get(opt, {}).get(p, -0.4 + 0.05 * (sum(map(ord, opt)) % 7))
            alpha = rng.normal(0, 0.3) if e["kind"] == "learned" else 0.0
            for j in range(evaluations):
                eps = rng.normal(0, 0.1)
                jitter = 0.02 + 0.1 * (opt == "rnnprop")
                logs = mu + alpha + eps + 0.8 * np.exp(-np.arange(EPOCHS) / 2) \
                    + rng.normal(0, jitter, EPOCHS)
                dv = diverge and opt == "powersign" and p == "mlp" and j == 0
                for ep in range(EPOCHS):
                    bad = dv and ep >= 3
                    rows.append(dict(optimizer=opt, run=e["run"], replicate=rep, evaluation=j,
                                     problem=p, epoch=ep + 1,
                                     train_loss=math.nan if bad else float(np.exp(logs[ep] + 0.05)),
                                     val_loss=math.nan if bad else float(np.exp(logs[ep])),
                                     val_acc=math.nan if bad else 0.5 + 0.05 * ep,
                                     seconds=0.1 * (ep + 1), diverged=bad))
    ev = _write_run(root, "evaluate", "ev" + tag, {"repeats": evaluations, "epochs": EPOCHS,
                                                   "profile": "quick"}, t0 + "9+00:00",
                    entries=entries, problems=list(PROBLEMS), lrs_source=str(tune))
    pd.DataFrame(rows).to_csv(ev / "evaluations.csv", index=False)
    return {"evaluate": ev, "choice": choice, "tune": tune, "rows": pd.DataFrame(rows)}


def _report(src: Path, out: Path, *extra: str) -> int:
    return main(["report", str(src), "--out", str(out), *extra])


# --------------------------------------------------------------------------- independent truth
def _smooth(y: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.concatenate([np.full(r, y[0]), y, np.full(r, y[-1])])
    return np.array([(padded[i:i + 2 * r + 1] * k).sum() for i in range(len(y))])


def _truth(rows: pd.DataFrame, optimizer: str, problem: str) -> dict:
    sub = rows[(rows.optimizer == optimizer) & (rows.problem == problem)]
    per = []
    for (rep, j), g in sub.groupby(["replicate", "evaluation"]):
        g = g.sort_values("epoch")
        if g.diverged.any():
            continue
        logv = np.log(g.val_loss.to_numpy())
        per.append(dict(rep=rep, y=logv.min(), train=math.log(g.train_loss.iloc[-1]),
                        eta=np.std(logv - _smooth(logv)), acc=g.val_acc.max()))
    d = pd.DataFrame(per)
    G = d.rep.nunique()
    out = dict(mu=d.y.mean(), train=d.train.mean(), eta=d.eta.mean(), acc=d.acc.mean(),
               n=len(d), G=G, diverged=int(sub.groupby(["replicate", "evaluation"]).diverged.any().sum()))
    if G > 1:
        n = len(d) // G
        means = d.groupby("rep").y.mean()
        msb = n * ((means - means.mean()) ** 2).sum() / (G - 1)
        msw = ((d.y - d.rep.map(means)) ** 2).sum() / (len(d) - G)
        out.update(half=sps.t.ppf(0.975, G - 1) * math.sqrt(msb / (G * n)),
                   sigma_alpha=math.sqrt(max(0, (msb - msw) / n)), sigma_eps=math.sqrt(msw))
    else:
        out.update(half=sps.t.ppf(0.975, len(d) - 1) * d.y.std(ddof=1) / math.sqrt(len(d)),
                   sigma_alpha=math.nan, sigma_eps=d.y.std(ddof=1))
    return out


# --------------------------------------------------------------------------- full report
@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    built = build_runs(root)
    out = tmp_path_factory.mktemp("rep") / "report"
    rc = _report(root, out)
    return rc, root, out, built


def test_report_writes_every_output(full_report):
    rc, _, out, _ = full_report
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    for stem in ("fig1-schemes", "fig2-baselines", "fig3-curves", "fig4-stability-performance",
                 "fig5-optimization-stability", "fig6-meta-stability"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    for f in ("summary.csv", "summary.md", "responses.csv", "comparisons.csv", "table4-cost.csv",
              "table4-cost.md",
              "table5-evaluation-stability.csv", "table5-evaluation-stability.md", "report.md",
              "manifest.json", "config.json"):
        assert f in names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "report" and manifest["status"] == "completed"
    assert sorted(manifest["figures"]) == ["1", "2", "3", "4", "5", "6"]


def test_figures_are_valid_nonblank_images(full_report):
    import matplotlib.image as mpimg

    _, _, out, _ = full_report
    for png in sorted(out.glob("fig*.png")):
        assert png.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(png)
        assert img.shape[0] > 300 and img.shape[1] > 500, png.name
        assert float(img[..., :3].std()) > 0.05, f"{png.name} looks blank"
    for pdf in out.glob("fig*.pdf"):
        assert pdf.read_bytes()[:5] == b"%PDF-"


def test_report_md_embeds_figures_and_tables(full_report):
    _, _, out, _ = full_report
    md = (out / "report.md").read_text()
    for png in out.glob("fig*.png"):
        assert f"]({png.name})" in md
    assert "## Table 4 — training cost" in md and "## Table 5 — evaluation stability" in md
    assert "Figures these runs do not support" not in md
    assert "MixedLM" in md


def test_summary_numbers_recomputed_independently(full_report):
    _, _, out, built = full_report
    summary = pd.read_csv(out / "summary.csv")
    rows = built["rows"]
    for opt in ("choice-large", "rnnprop", "choice-optimizer-large", "adam", "powersign"):
        for p in PROBLEMS:
            got = summary[(summary.optimizer == opt) & (summary.problem == p)].iloc[0]
            want = _truth(rows, opt, p)
            assert got.val_mu == pytest.approx(want["mu"], abs=1e-6), (opt, p)
            assert got.train_mu == pytest.approx(want["train"], abs=1e-6)
            assert got.sigma_eta == pytest.approx(want["eta"], rel=1e-6)
            assert got.best_val_acc == pytest.approx(want["acc"])
            assert got.evaluations == want["n"] + want["diverged"] and got.replicates == want["G"]
            assert got.diverged == want["diverged"]
            assert (got.val_ci_high - got.val_ci_low) / 2 == pytest.approx(want["half"], rel=1e-3)
            if want["G"] > 1 and got.method == "mixedlm":
                assert got.sigma_alpha == pytest.approx(want["sigma_alpha"], rel=1e-3)
                assert got.sigma_eps == pytest.approx(want["sigma_eps"], rel=1e-3)
            elif want["G"] == 1:
                assert math.isnan(got.sigma_alpha)
                assert got.sigma_eps == pytest.approx(want["sigma_eps"], rel=1e-9)
    learned = summary[summary.optimizer == "choice-large"]
    assert set(learned.method) == {"mixedlm"}   # 6 replicates × 4 evaluations
    assert set(learned.scheme) == {"choice"} and set(learned.pool) == {"large"}
    pert = summary[summary.optimizer == "choice-large-random0.01"].iloc[0]
    assert pert.perturb == "random" and pert.magnitude == pytest.approx(0.01)


def test_oracle_and_tables(full_report):
    _, _, out, built = full_report
    summary = pd.read_csv(out / "summary.csv")
    oracles = summary[summary.oracle].set_index("problem").optimizer.to_dict()
    assert oracles == {"train": "adam", "mlp": "sgd"}
    t5 = pd.read_csv(out / "table5-evaluation-stability.csv").set_index("optimizer")
    assert t5.loc["powersign", "mlp"] == "—"                # one evaluation diverged
    assert float(t5.loc["adam", "train"]) == pytest.approx(
        _truth(built["rows"], "adam", "train")["sigma_eps"], abs=1e-4)
    t4 = pd.read_csv(out / "table4-cost.csv")
    distill = t4[t4.command == "distill"]
    assert len(distill) == 6
    assert set(distill.seconds_per_replicate) == {np.mean([10.0 + i for i in range(6)])}
    assert set(t4.command) == {"tune-lr", "train-choice", "distill", "evaluate"}
    assert "choice-large-random0.001" in set(distill.what)


def test_terminal_headline_table(tmp_path, capsys):
    build_runs(tmp_path / "runs", replicates=2, evaluations=3, perturbed=False)
    assert _report(tmp_path / "runs", tmp_path / "out", "--formats", "png") == 0
    err = capsys.readouterr().err
    assert "best log val loss" in err and "choice-large" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.pdf"))


# --------------------------------------------------------------------------- awkward inputs
def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _report(tmp_path / "empty", tmp_path / "out") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert errors[0].startswith("error: no usable evaluations under") and "optamal evaluate" in errors[0]
    assert "Traceback" not in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_replicate_reports_with_a_warning(tmp_path, capsys):
    build_runs(tmp_path / "runs", replicates=1, evaluations=3)
    assert _report(tmp_path / "runs", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "single replicate" in err and "Traceback" not in err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    learned = summary[summary.kind == "learned"]
    assert learned.sigma_alpha.isna().all() and (learned.replicates == 1).all()
    assert set(learned.method) == {"t-evaluations"}
    assert not (tmp_path / "out" / "fig6-meta-stability.png").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Fig. 6" in md and "--replicates 8" in md and "single replicate" in md
    # paired comparisons with Adam and the oracle, recomputed here from the raw rows
    comp = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    rows = pd.read_csv(next((tmp_path / "runs").rglob("evaluations.csv")))
    best = rows.groupby(["optimizer", "problem", "evaluation"]).val_loss.min().map(math.log)
    for (opt, role, problem), r in comp.set_index(["optimizer", "role", "problem"]).iterrows():
        ref = "adam" if role == "adam" else {"train": "adam", "mlp": "sgd"}[problem]
        assert r.reference == ref
        d = (best[opt, problem] - best[ref, problem]).to_numpy()
        assert r.pairs == 3 and r.wins == int((d < 0).sum())
        assert r.delta_mu == pytest.approx(d.mean(), abs=1e-9)
        half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
        assert r.delta_ci_high - r.delta_ci_low == pytest.approx(2 * half, rel=1e-6)
    learned = set(summary.loc[summary.kind == "learned", "optimizer"])
    assert set(comp.optimizer) == learned and set(comp.role) == {"adam", "oracle"}
    assert len(comp) == 2 * len(learned) * 2                    # 2 roles × 2 problems
    summary_md = (tmp_path / "out" / "summary.md").read_text()
    assert "Learned optimizers vs Adam and the oracle" in summary_md and "vs Adam" in md


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe garbage \x00\x00",
    b"optimizer,run\n\"unterminated,quote\nx,y,z,w\n",
    b"a,b,c\n1,2,3\n",
    b"",
])
def test_corrupt_csv_is_skipped_with_a_warning(tmp_path, capsys, content):
    good = build_runs(tmp_path / "runs", replicates=2, evaluations=2, perturbed=False)
    bad = build_runs(tmp_path / "runs" / "other", replicates=2, evaluations=2, perturbed=False,
                     tag="-b")
    (bad["evaluate"] / "evaluations.csv").write_bytes(content)
    assert _report(tmp_path / "runs", tmp_path / "out", "--no-figures") == 0
    err = capsys.readouterr().err
    assert "skipping evaluate run other/evaluate/ev-b" in " ".join(err.split())
    assert "Traceback" not in err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert "choice-large" in set(summary.optimizer)   # from the good run, no disambiguation
    assert good["evaluate"].exists()


def test_only_corrupt_inputs_is_a_clear_error(tmp_path, capsys):
    built = build_runs(tmp_path / "runs", replicates=2, evaluations=2, perturbed=False)
    (built["evaluate"] / "evaluations.csv").write_text("not,a\nreal,csv,file,at,all\n")
    (built["tune"] / "manifest.json").write_text("{broken json")
    assert _report(tmp_path / "runs", tmp_path / "out", "--no-figures") == 2
    err = capsys.readouterr().err
    assert "warning: skipping tune-lr/lr" in " ".join(err.split())
    assert "error: no usable evaluations" in err and "run(s) skipped" in err
    assert "Traceback" not in err


def test_interrupted_evaluate_run_is_skipped(tmp_path, capsys):
    built = build_runs(tmp_path / "runs", replicates=2, evaluations=2, perturbed=False)
    m = json.loads((built["evaluate"] / "manifest.json").read_text())
    m["status"] = "interrupted"
    (built["evaluate"] / "manifest.json").write_text(json.dumps(m))
    assert _report(tmp_path / "runs", tmp_path / "out", "--no-figures") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "status interrupted" in err and "--resume" in err


def test_same_label_from_two_runs_is_disambiguated(tmp_path):
    build_runs(tmp_path / "runs" / "a", replicates=2, evaluations=2, perturbed=False)
    build_runs(tmp_path / "runs" / "b", replicates=2, evaluations=2, perturbed=False, seed=1)
    assert _report(tmp_path / "runs", tmp_path / "out", "--no-figures") == 0
    opts = set(pd.read_csv(tmp_path / "out" / "summary.csv").optimizer)
    assert {"choice-large [a/distill/choice-large]", "choice-large [b/distill/choice-large]"} <= opts
    assert {"adam [a/tune-lr/lr]", "adam [b/tune-lr/lr]"} <= opts


def test_out_folder_must_be_new(tmp_path, capsys):
    build_runs(tmp_path / "runs", replicates=2, evaluations=2, perturbed=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    assert _report(tmp_path / "runs", tmp_path / "out", "--no-figures") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_roles_amalgamated_baselines_and_choice_teacher(full_report):
    """Which optimizer plays which part in the figures, from the joined manifests."""
    from optamal import report as rp

    _, root, out, _ = full_report
    data = rp.load(root)
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(rp.amalgamated(data)) == ["choice-large", "mean-small"]
    assert sorted(rp.amalgamated(data, perturbed=True)) == [
        "choice-large-random0.001", "choice-large-random0.01"]
    # RNNProp (meta loss only) and imitation of one teacher ("Stronger Baselines").
    assert sorted(rp.baselines(data)) == ["mean-adam", "rnnprop"]
    assert rp.choice_teacher_of(data, "choice-large") == "choice-optimizer-large"
    assert rp.best_amalgamated(summary, ["choice-large", "mean-small"]) in {"choice-large", "mean-small"}


def test_an_optimizer_that_always_diverges(tmp_path, capsys):
    """Every evaluation of one learned optimizer diverged: its μ is undefined ("—"), the
    figures and tables still come out."""
    built = build_runs(tmp_path / "runs", replicates=2, evaluations=2, perturbed=False)
    csv = built["evaluate"] / "evaluations.csv"
    rows = pd.read_csv(csv)
    bad = (rows.optimizer == "rnnprop") & (rows.problem == "mlp")
    rows.loc[bad, ["train_loss", "val_loss", "val_acc"]] = math.nan
    rows.loc[bad, "diverged"] = True
    rows.to_csv(csv, index=False)
    assert _report(tmp_path / "runs", tmp_path / "out", "--formats", "png") == 0
    assert "Traceback" not in capsys.readouterr().err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    r = summary[(summary.optimizer == "rnnprop") & (summary.problem == "mlp")].iloc[0]
    assert math.isnan(r.val_mu) and r.diverged == r.evaluations == 4 and r.method == "none"
    t5 = pd.read_csv(tmp_path / "out" / "table5-evaluation-stability.csv").set_index("optimizer")
    assert t5.loc["rnnprop", "mlp"] == "—"
    assert (tmp_path / "out" / "fig2-baselines.png").is_file()
    assert (tmp_path / "out" / "fig5-optimization-stability.png").is_file()


def test_fig3_shows_a_perturbed_amalgamated_optimizer_when_it_is_the_only_one(tmp_path):
    # e.g. `optamal evaluate --learned pretrained`: the shipped policy was distilled with
    # random perturbations, and no unperturbed student is evaluated beside it.
    root = tmp_path / "runs"
    built = build_runs(root, replicates=2, evaluations=3)
    ev = built["evaluate"]
    keep = {"choice-optimizer-large", "choice-large-random0.001", *TEACHERS}
    rows = built["rows"][built["rows"].optimizer.isin(keep)]
    rows.to_csv(ev / "evaluations.csv", index=False)
    manifest = json.loads((ev / "manifest.json").read_text())
    manifest["entries"] = [e for e in manifest["entries"] if e["optimizer"] in keep]
    (ev / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "report"
    assert _report(root, out) == 0
    assert (out / "fig3-curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "3" in json.loads((out / "manifest.json").read_text())["figures"]
    # it is found as a perturbed amalgamated optimizer, not as an unperturbed one
    from optamal.report import amalgamated, load

    data = load(root)
    assert amalgamated(data) == [] and amalgamated(data, perturbed=True) == ["choice-large-random0.001"]
