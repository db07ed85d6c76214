"""`optamal evaluate` end to end (smoke sizes): the per-epoch CSV, the paired design,
teachers' rates, skipped problems, divergence, worker processes and --resume (METHOD.md §9)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import optamal.commands.evaluate as ev
import optamal.engine as engine
from optamal.cli import main
from optamal.policies import load_rule
from optamal.problems import PROBLEMS, make_problem
from optamal.rules.teachers import PAPER_LRS, TEACHERS, Teacher

EXPECTED_COLUMNS = ["optimizer", "run", "replicate", "evaluation", "problem", "epoch", "train_loss",
                    "val_loss", "val_acc", "seconds", "diverged"]
ROW_KEYS = ["optimizer", "run", "replicate", "evaluation", "problem", "epoch"]
CELL = ["optimizer", "run", "replicate", "problem", "evaluation"]
SMOKE = ["--profile", "smoke", "--set", "max_train=256"]
# EvaluateConfig's smoke profile (checked against the manifest below).
SMOKE_WARMUP_STEPS, SMOKE_WARMUP_LR, SMOKE_MAX_VAL, SMOKE_REPEATS = 10, 0.01, 256, 2
# Problems with MNIST-shaped native data run on the embedded mnist5k at smoke size; the
# others need SVHN / CIFAR files.
NEED_FILES = {"svhn", "cifar", "resnet", "resnet52", "resnet52-c100"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, mnist5k_root):
    """A learned run with two replicates (smoke distill on mlp, cut to one short meta-epoch:
    evaluate only needs policy files), and the roots to use."""
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["distill", "--profile", "smoke", "--scheme", "none", "--lrs", "paper", "--problem", "mlp",
               "--replicates", "2", "--unrolls", "10", "--truncation", "10", "--set", "validate_every=1",
               "--set", "max_validations=1", "--set", "val_unroll=10", "--set", "max_train=256",
               "--runs-dir", str(runs), "--name", "learned", "--data-root", str(mnist5k_root)])
    assert rc == 0
    return {"runs": runs, "learned": runs / "distill" / "learned", "data": mnist5k_root}


def _evaluate(env, name: str, *extra: str, learned: bool = True, workers: int = 1) -> tuple[int, Path]:
    args = ["evaluate", *([str(env["learned"])] if learned else []), *SMOKE,
            "--runs-dir", str(env["runs"]), "--data-root", str(env["data"]),
            "--workers", str(workers), "--name", name, *extra]
    return main(args), env["runs"] / "evaluate" / name


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "evaluations.csv")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(ROW_KEYS).reset_index(drop=True)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def sweep(env):
    """Both learned replicates + all six teachers at --lrs paper on mlp, one worker, with
    spies on the engine's warm_start / train_epochs (called by each cell)."""
    warm_calls, train_calls = [], []
    real_warm, real_train = engine.warm_start, engine.train_epochs

    def warm_spy(problem, seed, steps, lr):
        warm = real_warm(problem, seed, steps, lr)
        warm_calls.append((problem.name, seed, steps, lr, warm))
        return warm

    def train_spy(problem, rule, warm, seed, epochs, on_epoch=None):
        train_calls.append((problem.name, seed, warm))
        return real_train(problem, rule, warm, seed, epochs, on_epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "warm_start", warm_spy)
        mp.setattr(engine, "train_epochs", train_spy)
        rc, path = _evaluate(env, "sweep", "--problems", "mlp", "--lrs", "paper")
    assert rc == 0
    return {"path": path, "warm_calls": warm_calls, "train_calls": train_calls}


# --------------------------------------------------------------------------- the sweep
def test_csv_columns_and_one_row_per_key(sweep):
    df = _csv(sweep["path"])
    assert list(df.columns) == EXPECTED_COLUMNS == ev.EVAL_COLUMNS
    assert not df.duplicated(ROW_KEYS).any()
    learned = df[df.run == "learned"]
    assert set(learned.optimizer) == {"rnnprop"}
    assert sorted(set(learned.replicate)) == [0, 1]
    teachers = df[df.run == "paper"]
    assert set(teachers.optimizer) == set(TEACHERS) and set(teachers.replicate) == {0}
    assert len(df) == (2 + len(TEACHERS)) * SMOKE_REPEATS * 1   # entries × evaluations × epochs
    expected = {("rnnprop", "learned", r, j, "mlp", 1) for r in (0, 1) for j in range(SMOKE_REPEATS)}
    expected |= {(t, "paper", 0, j, "mlp", 1) for t in TEACHERS for j in range(SMOKE_REPEATS)}
    assert set(map(tuple, df[ROW_KEYS].itertuples(index=False))) == expected
    assert df.diverged.dtype == bool and not df.diverged.any()
    assert ((df.val_acc >= 0) & (df.val_acc <= 1)).all()
    assert (df.train_loss > 0).all() and (df.val_loss > 0).all() and (df.seconds >= 0).all()


def test_manifest_entries_rates_and_problems(sweep, env):
    man = _manifest(sweep["path"])
    assert man["command"] == "evaluate" and man["status"] == "completed"
    assert man["problems"] == ["mlp"] and man["skipped"] == {}
    assert man["lrs_source"] == "paper"
    assert man["config"]["warmup_steps"] == SMOKE_WARMUP_STEPS
    assert man["config"]["warmup_lr"] == SMOKE_WARMUP_LR
    assert man["config"]["max_val"] == SMOKE_MAX_VAL and man["config"]["repeats"] == SMOKE_REPEATS
    teachers = [e for e in man["entries"] if e["kind"] == "teacher"]
    assert {e["teacher"]: e["lr"] for e in teachers} == PAPER_LRS
    learned = [e for e in man["entries"] if e["kind"] == "learned"]
    assert [e["replicate"] for e in learned] == [0, 1]
    for e in learned:
        assert Path(e["policy"]) == (env["learned"] / f"replicate-{e['replicate']}" / "policy.pt").resolve()
    assert man["rows"] == len(_csv(sweep["path"]))


def test_paired_design_one_warm_start_per_evaluation(sweep):
    # Evaluation j of every optimizer starts from the same warm start: the engine's
    # warm_start ran once per evaluation (not per optimizer), with a seed set by j alone.
    warm_calls, train_calls = sweep["warm_calls"], sweep["train_calls"]
    seeds = [ev.evaluation_seed(0, j) for j in range(SMOKE_REPEATS)]
    assert [(c[0], c[1], c[2], c[3]) for c in warm_calls] == [
        ("mlp", s, SMOKE_WARMUP_STEPS, SMOKE_WARMUP_LR) for s in seeds]
    assert len(train_calls) == (2 + len(TEACHERS)) * SMOKE_REPEATS
    warm_by_seed = {c[1]: c[4] for c in warm_calls}
    for _, seed, warm in train_calls:
        assert warm is warm_by_seed[seed]
    # ... and the evaluations differ from each other (different θ0 and data order).
    assert not torch.equal(warm_by_seed[seeds[0]].theta, warm_by_seed[seeds[1]].theta)


def test_numbers_recomputed_with_the_engine(sweep, env):
    # Each cell = engine.warm_start(evaluation seed) + train_epochs with the optimizer's rule.
    df = _csv(sweep["path"])
    problem = make_problem("mlp", profile="smoke", max_train=256, max_val=SMOKE_MAX_VAL,
                           data_root=str(env["data"]))
    rules = {(t, "paper", 0): Teacher(t, PAPER_LRS[t]) for t in TEACHERS}
    for r in (0, 1):
        rules[("rnnprop", "learned", r)] = load_rule(env["learned"] / f"replicate-{r}" / "policy.pt",
                                                     problem.layout)[0]
    for j in range(SMOKE_REPEATS):
        seed = ev.evaluation_seed(0, j)
        warm = engine.warm_start(problem, seed, SMOKE_WARMUP_STEPS, SMOKE_WARMUP_LR)
        for (opt, run, rep), rule in rules.items():
            (rec,) = engine.train_epochs(problem, rule, warm, seed, 1)
            row = df[(df.optimizer == opt) & (df.run == run) & (df.replicate == rep) & (df.evaluation == j)]
            assert len(row) == 1
            row = row.iloc[0]
            assert row.train_loss == pytest.approx(rec.train_loss, rel=1e-6), (opt, rep, j)
            assert row.val_loss == pytest.approx(rec.val_loss, rel=1e-6), (opt, rep, j)
            assert row.val_acc == pytest.approx(rec.val_acc, abs=1e-9)


def test_two_workers_give_the_same_numbers(sweep, env):
    rc, path = _evaluate(env, "two-workers", "--problems", "mlp", "--lrs", "paper", workers=2)
    assert rc == 0
    assert _manifest(path)["workers"] == 2
    a, b = _sorted(_csv(sweep["path"])), _sorted(_csv(path))
    pd.testing.assert_frame_equal(a[ROW_KEYS + ["diverged"]], b[ROW_KEYS + ["diverged"]])
    # One thread per worker vs the in-process threads: equal up to float summation order.
    for col in ("train_loss", "val_loss", "val_acc"):
        pd.testing.assert_series_equal(a[col], b[col], rtol=1e-4, check_exact=False)


# --------------------------------------------------------------------------- problems
def test_problems_without_data_are_skipped_with_the_reason(env, tmp_path, capsys):
    data = tmp_path / "empty-data-root"
    data.mkdir()
    rc = main(["evaluate", *SMOKE, "--teachers", "sgd", "--lrs", "paper", "--repeats", "1",
               "--set", "warmup_steps=0", "--set", "max_train=128", "--set", "max_val=64",
               "--runs-dir", str(tmp_path / "runs"), "--data-root", str(data),
               "--workers", "1", "--name", "all"])
    err = capsys.readouterr().err
    assert rc == 0
    path = tmp_path / "runs" / "evaluate" / "all"
    man = _manifest(path)
    assert set(man["skipped"]) == NEED_FILES
    for name, why in man["skipped"].items():
        assert str(data) in why and "--download" in why, (name, why)
        assert f"skipping problem {name}" in err
    assert man["problems"] == [p for p in PROBLEMS if p not in NEED_FILES]
    df = _csv(path)
    assert set(df.problem) == set(man["problems"]) and len(df) == len(man["problems"])
    assert (data / "mnist5k" / "train_x.npy").is_file()   # mnist5k loaded and cached there


def test_an_explicitly_requested_absent_problem_is_an_error(env, tmp_path, capsys):
    data = tmp_path / "empty-data-root"
    data.mkdir()
    rc = main(["evaluate", *SMOKE, "--teachers", "sgd", "--lrs", "paper", "--problems", "mlp,svhn",
               "--runs-dir", str(tmp_path / "runs"), "--data-root", str(data), "--workers", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "svhn" in line and "--download" in line
    assert not (tmp_path / "runs" / "evaluate").exists()   # no run folder for a refused sweep


# --------------------------------------------------------------------------- divergence
def test_divergent_teacher_is_marked_and_the_sweep_continues(env, tmp_path):
    # sgd at 1e6 stays finite on these nets (the ReLU units die; the losses are huge but
    # finite, so not "diverged" by METHOD §7's definition); 1e30 overflows in epoch 1.
    lrs = tmp_path / "tuned" / "lrs.json"
    lrs.parent.mkdir()
    lrs.write_text(json.dumps({"lrs": {"sgd": 1e30, "adam": 0.005}}))
    rc, path = _evaluate(env, "diverge", "--problems", "train", "--lrs", str(lrs), "--teachers", "sgd,adam",
                         "--epochs", "2", learned=False)
    assert rc == 0
    man = _manifest(path)
    assert man["status"] == "completed"
    assert {e["teacher"]: e["lr"] for e in man["entries"]} == {"sgd": 1e30, "adam": 0.005}
    df = _csv(path)
    assert len(df) == 2 * SMOKE_REPEATS * 2 and set(df.run) == {"tuned"}
    sgd, adam = df[df.optimizer == "sgd"], df[df.optimizer == "adam"]
    assert sgd.diverged.all()
    assert sgd.train_loss.isna().all() and sgd.val_loss.isna().all() and sgd.val_acc.isna().all()
    # The cells after the divergent ones ran normally.
    assert not adam.diverged.any() and len(adam) == SMOKE_REPEATS * 2
    assert adam[["train_loss", "val_loss", "val_acc"]].map(math.isfinite).all().all()


class _BreaksAt:
    """SGD at a small rate whose update becomes ``value`` at step ``t_bad``."""

    def __init__(self, t_bad: int, value: float):
        self.t_bad, self.value = t_bad, value

    def init(self, theta, moments=None):
        return None

    def step(self, grad, state, t=0):
        update = 0.01 * grad
        if t == self.t_bad:
            update = torch.full_like(grad, self.value)
        return update, state


@pytest.mark.parametrize("t_bad,value", [(2, math.nan), (3, math.inf)],
                         ids=["nan-loss-mid-epoch", "inf-theta-at-epoch-end"])
def test_diverged_from_the_first_non_finite_epoch_on(env, t_bad, value):
    # 256 examples / batch 128 = 2 steps per epoch: steps 2 and 3 are epoch 2. A NaN update
    # at step 2 makes step 3's loss NaN; an inf update at step 3 leaves θ non-finite at the
    # epoch's end. Either way epoch 1 is clean and epochs 2–4 are diverged with NaN losses.
    problem = make_problem("mlp", profile="smoke", max_train=256, max_val=128, data_root=str(env["data"]))
    warm = engine.warm_start(problem, 3, 2, 0.01)
    recs = engine.train_epochs(problem, _BreaksAt(t_bad, value), warm, 3, 4)
    assert [r.epoch for r in recs] == [1, 2, 3, 4]
    assert not recs[0].diverged and math.isfinite(recs[0].train_loss) and math.isfinite(recs[0].val_loss)
    for r in recs[1:]:
        assert r.diverged
        assert math.isnan(r.train_loss) and math.isnan(r.val_loss) and math.isnan(r.val_acc)


# --------------------------------------------------------------------------- resume
def test_resume_recomputes_only_the_missing_cells(env, monkeypatch):
    rc, path = _evaluate(env, "resume", "--problems", "mlp", "--lrs", "paper", "--teachers", "adam,sgd",
                         "--epochs", "2")
    assert rc == 0
    original = _csv(path)
    assert len(original) == 4 * SMOKE_REPEATS * 2     # (2 learned + 2 teachers) × evaluations × epochs

    # Interrupt: one cell lost entirely, another cut after its first epoch.
    lost = ("adam", "paper", 0, "mlp", 1)
    cut = ("rnnprop", "learned", 1, "mlp", 0)
    cell_of = original[CELL].apply(tuple, axis=1)
    keep = (cell_of != lost) & ~((cell_of == cut) & (original.epoch == 2))
    original[keep].to_csv(path / "evaluations.csv", index=False)
    man = _manifest(path)
    man["status"] = "interrupted"
    (path / "manifest.json").write_text(json.dumps(man))

    ran = []
    real = ev._run_cell

    def spy(entry, problem_name, evaluation):
        ran.append((entry["optimizer"], entry["run"], entry["replicate"], problem_name, evaluation))
        return real(entry, problem_name, evaluation)

    monkeypatch.setattr(ev, "_run_cell", spy)
    # The command line's own profile (quick: 3 epochs) must not override the stored config.
    assert main(["evaluate", "--resume", str(path), "--workers", "1"]) == 0
    assert sorted(ran) == sorted([lost, cut])

    resumed = _csv(path)
    assert len(resumed) == len(original) and not resumed.duplicated(ROW_KEYS).any()
    kept = original[keep & (cell_of != cut)]
    merged = kept.merge(resumed, on=ROW_KEYS, suffixes=("", "_new"))
    assert len(merged) == len(kept)
    for col in ("train_loss", "val_loss", "val_acc", "seconds", "diverged"):
        assert (merged[col] == merged[f"{col}_new"]).all(), col      # untouched, timings included
    # Everything is deterministic: the recomputed cells reproduce the originals.
    no_time = [c for c in EXPECTED_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(_sorted(original)[no_time], _sorted(resumed)[no_time])
    man = _manifest(path)
    assert man["status"] == "completed" and len(man["resumed"]) == 1 and man["rows"] == len(original)


@pytest.mark.parametrize("content,message", [
    ("drop-column", "lacks columns"),
    ('optimizer,run\n"unterminated,1,2\n', "not a readable CSV"),
    ("", "not a readable CSV"),
], ids=["missing-column", "unterminated-quote", "empty"])
def test_resume_from_a_corrupt_csv_is_one_error_line(sweep, tmp_path, capsys, content, message):
    path = tmp_path / "copy"
    shutil.copytree(sweep["path"], path)
    if content == "drop-column":
        _csv(path).drop(columns="val_acc").to_csv(path / "evaluations.csv", index=False)
    else:
        (path / "evaluations.csv").write_text(content)
    capsys.readouterr()
    rc = main(["evaluate", "--resume", str(path), "--workers", "1"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and message in line and "evaluations.csv" in line


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case", ["missing-run", "no-policy", "teacher", "problem", "repeats", "resume-other"])
def test_bad_inputs_are_one_error_line(env, tmp_path, capsys, case):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    base = [*SMOKE, "--lrs", "paper", "--runs-dir", str(tmp_path / "runs"), "--data-root", str(env["data"]),
            "--workers", "1"]
    args, expect = {
        "missing-run": (["evaluate", str(tmp_path / "nope"), *base], "run not found"),
        "no-policy": (["evaluate", str(empty), *base], "no policy.pt"),
        "teacher": (["evaluate", *base, "--teachers", "foo"], "foo"),
        "problem": (["evaluate", *base, "--problems", "nosuch"], "nosuch"),
        "repeats": (["evaluate", *base, "--repeats", "0"], "repeats"),
        "resume-other": (["evaluate", "--resume", str(env["learned"])], "evaluate run"),
    }[case]
    rc = main(args)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and expect in line, line
    assert not (tmp_path / "runs").exists()


def test_learned_pretrained_evaluates_the_shipped_policy_with_its_own_rates(env, tmp_path):
    # `--learned pretrained`: the policy inside the package, evaluated like any run; with no
    # --lrs and no tune-lr run in the runs dir, the teachers take the rates it was trained
    # with (optamal/pretrained/lrs.json).
    from optamal.pretrained import DEFAULT_POLICY, PRETRAINED_DIR

    runs = tmp_path / "runs"
    rc = main(["evaluate", "--learned", "pretrained", *SMOKE, "--problems", "mlp", "--repeats", "1",
               "--teachers", "adam", "--runs-dir", str(runs), "--data-root", str(env["data"]),
               "--workers", "1", "--name", "pre"])
    assert rc == 0
    path = runs / "evaluate" / "pre"
    df = _csv(path)
    assert set(df.optimizer) == {"pretrained", "adam"}
    assert np.isfinite(df.val_loss).all()
    man = _manifest(path)
    learned = [e for e in man["entries"] if e["kind"] == "learned"]
    assert [e["policy"] for e in learned] == [str(DEFAULT_POLICY.resolve())]
    shipped = json.loads((PRETRAINED_DIR / "lrs.json").read_text())["lrs"]
    adam = [e for e in man["entries"] if e["optimizer"] == "adam"]
    assert adam[0]["lr"] == shipped["adam"] and adam[0]["run"] == "pretrained"
