"""`optamal tune-lr` end to end (smoke sizes) and its rate selection (METHOD.md §7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from optamal.cli import main
from optamal.commands.tune_lr import GRID_COLUMNS, load_lrs, select_rates

EXPECTED_COLUMNS = ["teacher", "lr", "repeat", "epoch", "train_loss", "val_loss", "val_acc",
                    "diverged", "seconds"]
SMOKE_ARGS = ["tune-lr", "--profile", "smoke", "--pool", "small", "--seed", "3",
              "--set", "max_train=256", "--set", "warmup_steps=4"]
SMOKE_GRID = (1e-3, 1e-2, 0.1, 1.0)   # TuneLRConfig's smoke grid (checked below)


def _tune(runs_dir: Path, name: str, *extra: str, workers: int = 1) -> tuple[int, Path]:
    rc = main([*SMOKE_ARGS, "--runs-dir", str(runs_dir), "--workers", str(workers),
               "--name", name, *extra])
    return rc, runs_dir / "tune-lr" / name


def _expected_selection(grid: pd.DataFrame) -> dict[str, float | None]:
    """Recomputed independently: per teacher, per lr, the best (min over epochs) val loss,
    averaged over repeats; points with any diverged epoch are out; lowest wins."""
    out: dict[str, float | None] = {}
    for teacher in sorted(set(grid.teacher)):
        best_lr, best = None, math.inf
        sub = grid[grid.teacher == teacher]
        for lr in sorted(set(sub.lr)):
            pts = sub[sub.lr == lr]
            if pts.diverged.any():
                continue
            per_repeat = [pts[pts.repeat == r].val_loss.min() for r in sorted(set(pts.repeat))]
            v = sum(per_repeat) / len(per_repeat)
            if math.isfinite(v) and v < best:
                best_lr, best = float(lr), v
        out[teacher] = best_lr
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    rc, path = _tune(runs_dir, "a")
    return rc, path, runs_dir


def test_smoke_run_artifacts(smoke_run):
    rc, path, _ = smoke_run
    assert rc == 0
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "grid.csv", "grid.png", "lrs.json", "manifest.json"]

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["command"] == "tune-lr"
    assert manifest["seed"] == 3
    assert manifest["ended"] is not None
    config = json.loads((path / "config.json").read_text())
    assert config == manifest["config"]
    assert config["pool"] == "small" and config["profile"] == "smoke"
    assert config["max_train"] == 256 and config["warmup_steps"] == 4
    assert tuple(config["grid"]) == SMOKE_GRID

    grid = pd.read_csv(path / "grid.csv")
    assert list(grid.columns) == EXPECTED_COLUMNS == GRID_COLUMNS
    epochs, repeats = config["epochs"], config["repeats"]
    keys = {(t, lr, r, e) for t in ("adam", "rmsprop") for lr in SMOKE_GRID
            for r in range(repeats) for e in range(1, epochs + 1)}
    got = list(zip(grid.teacher, grid.lr, grid.repeat, grid.epoch))
    assert len(got) == len(keys) == 8
    assert set(got) == keys
    assert grid.diverged.dtype == bool
    ok = grid[~grid.diverged]
    assert ((ok.val_acc >= 0) & (ok.val_acc <= 1)).all()
    assert (ok.val_loss > 0).all() and (ok.train_loss > 0).all()
    assert (grid.seconds >= 0).all()
    # Training at a sane rate learns something: the best point beats chance (ln 10).
    assert ok.val_loss.min() < math.log(10)


def test_smoke_run_selection_matches_grid(smoke_run):
    _, path, _ = smoke_run
    grid = pd.read_csv(path / "grid.csv")
    lrs = json.loads((path / "lrs.json").read_text())
    expected = _expected_selection(grid)
    assert lrs["lrs"] == expected
    assert set(expected) == {"adam", "rmsprop"}
    assert all(v is not None for v in expected.values())
    assert lrs["pool"] == "small"
    # The recorded per-point values are the min-over-epochs val loss.
    for teacher, per_lr in lrs["values"].items():
        for lr_s, v in per_lr.items():
            pts = grid[(grid.teacher == teacher) & (grid.lr == float(lr_s))]
            if pts.diverged.any():
                assert v is None
            else:
                assert v == pytest.approx(pts.val_loss.min(), rel=1e-12)
    assert load_lrs(path) == expected
    assert load_lrs(path / "lrs.json") == expected
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["selected_lrs"] == expected


def test_smoke_run_plot(smoke_run):
    _, path, _ = smoke_run
    data = (path / "grid.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_same_seed_same_grid(smoke_run, tmp_path):
    # A second smoke run with the same seed over a sub-grid: its points are bit-identical
    # to the first run's (so results depend neither on the run nor on which other points
    # ran before them in the process), and so is the selection restricted to them.
    _, path_a, _ = smoke_run
    sub_grid = (1e-3, 1e-2)
    rc, path_b = _tune(tmp_path, "b", "--grid", ",".join(map(str, sub_grid)))
    assert rc == 0
    a = pd.read_csv(path_a / "grid.csv")
    a = a[a.lr.isin(sub_grid)].reset_index(drop=True).drop(columns="seconds")
    b = pd.read_csv(path_b / "grid.csv").drop(columns="seconds")
    assert len(b) == 4
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert json.loads((path_b / "lrs.json").read_text())["lrs"] == _expected_selection(a)


def test_two_workers_select_the_same_rates(smoke_run, tmp_path):
    # Points are independent, so a two-worker run over a sub-grid must reproduce the
    # one-worker run's numbers for those points and the selection restricted to them.
    _, path_a, _ = smoke_run
    sub_grid = (1e-3, 1e-2)
    rc, path_c = _tune(tmp_path, "c", "--grid", ",".join(map(str, sub_grid)), workers=2)
    assert rc == 0
    a = pd.read_csv(path_a / "grid.csv")
    a = a[a.lr.isin(sub_grid)].reset_index(drop=True)
    c = pd.read_csv(path_c / "grid.csv")
    assert len(c) == len(a) == 4
    assert list(zip(c.teacher, c.lr, c.repeat, c.epoch)) == list(zip(a.teacher, a.lr, a.repeat, a.epoch))
    assert list(c.diverged) == list(a.diverged)
    # One thread per worker vs two in-process threads: equal up to float summation order.
    pd.testing.assert_series_equal(c.val_loss, a.val_loss, rtol=1e-4, check_exact=False)
    lrs_c = json.loads((path_c / "lrs.json").read_text())["lrs"]
    assert lrs_c == _expected_selection(a) == _expected_selection(c)


def test_all_diverged_fails_with_one_error_line(tmp_path, capsys):
    rc = main(["tune-lr", "--profile", "smoke", "--teachers", "sgd", "--grid", "1e30",
               "--set", "max_train=256", "--set", "warmup_steps=0", "--workers", "1",
               "--runs-dir", str(tmp_path), "--name", "d"])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "sgd" in errors[0] and "--grid" in errors[0]
    assert "Traceback" not in err
    path = tmp_path / "tune-lr" / "d"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "sgd" in manifest["error"]
    grid = pd.read_csv(path / "grid.csv")
    assert list(grid.diverged) == [True]
    assert math.isnan(grid.val_loss[0])
    assert json.loads((path / "lrs.json").read_text())["lrs"] == {"sgd": None}


# --------------------------------------------------------------------------- select_rates
def _row(teacher, lr, repeat, epoch, val_loss, diverged=False):
    return dict(teacher=teacher, lr=lr, repeat=repeat, epoch=epoch, train_loss=1.0,
                val_loss=val_loss, val_acc=0.5, diverged=diverged, seconds=0.1)


def test_select_rates_diverged_never_wins():
    rows = [
        # lr 0.1 reaches the lowest loss of all, then diverges: never selected.
        _row("adam", 0.1, 0, 1, 0.01), _row("adam", 0.1, 0, 2, math.nan, True),
        # lr 0.01: best 0.5 at epoch 1 (worse at the end); lr 0.001: best 0.7 at the end.
        _row("adam", 0.01, 0, 1, 0.5), _row("adam", 0.01, 0, 2, 0.9),
        _row("adam", 0.001, 0, 1, 0.8), _row("adam", 0.001, 0, 2, 0.7),
        # every rate of sgd diverged.
        _row("sgd", 1.0, 0, 1, 0.2, True), _row("sgd", 1.0, 0, 2, math.nan, True),
        _row("sgd", 0.1, 0, 1, math.nan, True), _row("sgd", 0.1, 0, 2, math.nan, True),
    ]
    chosen, values = select_rates(rows, ["adam", "sgd"])
    assert chosen == {"adam": 0.01, "sgd": None}
    assert values["adam"][repr(0.1)] is None
    assert values["adam"][repr(0.01)] == pytest.approx(0.5)
    assert values["adam"][repr(0.001)] == pytest.approx(0.7)
    assert values["sgd"] == {repr(0.1): None, repr(1.0): None}


def test_select_rates_averages_best_over_repeats():
    rows = [
        # lr 0.1: repeat bests 0.2 and 1.2 → mean 0.7; lr 0.01: 0.6 and 0.6 → 0.6 wins,
        # although lr 0.1 holds the single lowest value.
        _row("rmsprop", 0.1, 0, 1, 0.2), _row("rmsprop", 0.1, 1, 1, 1.2),
        _row("rmsprop", 0.01, 0, 1, 0.6), _row("rmsprop", 0.01, 1, 1, 0.6),
        # lr 0.5 is fine in repeat 0 but diverged in repeat 1: the point is diverged.
        _row("rmsprop", 0.5, 0, 1, 0.05), _row("rmsprop", 0.5, 1, 1, math.nan, True),
    ]
    chosen, values = select_rates(rows, ["rmsprop"])
    assert chosen == {"rmsprop": 0.01}
    assert values["rmsprop"][repr(0.1)] == pytest.approx(0.7)
    assert values["rmsprop"][repr(0.01)] == pytest.approx(0.6)
    assert values["rmsprop"][repr(0.5)] is None


def test_select_rates_teacher_without_rows_gets_none():
    chosen, values = select_rates([_row("adam", 0.01, 0, 1, 0.3)], ["adam", "momentum"])
    assert chosen == {"adam": 0.01, "momentum": None}
    assert values["momentum"] == {}
