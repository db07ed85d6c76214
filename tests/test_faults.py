"""Faults from the environment and the data, through ``optamal.cli.main``.

(a) A runs folder that cannot be written (read-only; as root, where permission bits do
    not stop writes, a full disk is simulated instead): the run fails with one clear
    ``error:`` line and exit code 2, its manifest (when one exists) says ``failed``, and no
    temporary or half-written file is left behind.
(b) Non-finite data (a plug-in problem whose inputs hold NaN): ``distill`` counts the
    divergence events, marks the replicate diverged and saves no policy; ``evaluate``
    marks those evaluations diverged and goes on with the rest of the sweep.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import optamal.runs as runs_mod
from optamal.cli import main

ENOSPC = 28


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def warm_data(mnist5k_root):
    """Write the mnist5k cache before any test counts the writes."""
    from optamal.data import load_dataset

    load_dataset("mnist5k", mnist5k_root)


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def error_line(capsys) -> str:
    """The run's stderr ends in exactly one ``error:`` line, with no traceback."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def assert_files_whole(folder: Path) -> None:
    """Every file the failed run left is complete (it parses)."""
    for p in folder.rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            pd.read_csv(p)
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)


def writes_blocked(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


# A cheap run with several writes after its manifest: evaluations.csv after every cell.
def evaluate_args(runs: Path, data: Path, name: str) -> list:
    return ["evaluate", "--profile", "smoke", "--problems", "mlp", "--teachers", "sgd", "--lrs", "paper",
            "--repeats", "1", "--epochs", "1", "--workers", "1", "--set", "max_train=256",
            "--runs-dir", runs, "--data-root", data, "--name", name]


# A one-meta-epoch distill: checkpoint.pt, meta.csv, policy.pt are written inside the run.
def distill_args(runs: Path, data: Path, name: str) -> list:
    return ["distill", "--profile", "smoke", "--scheme", "none", "--lrs", "paper", "--problem", "mlp",
            "--unrolls", "5", "--truncation", "5", "--alphas", "0.2", "--set", "validate_every=1",
            "--set", "max_validations=1", "--set", "min_validations=1", "--set", "val_unroll=5",
            "--set", "max_train=256", "--set", "warmup_steps=2",
            "--runs-dir", runs, "--data-root", data, "--name", name]


# --------------------------------------------------------------------------- (a) unwritable
def test_read_only_runs_folder_is_one_error_line(tmp_path, monkeypatch, capsys, mnist5k_root):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        if writes_blocked(runs):
            rc = cli(*evaluate_args(runs, mnist5k_root, "ro"))
            line = error_line(capsys)
            assert rc == 2
            assert "cannot create run folder" in line and "Permission denied" in line, line
            assert list(runs.rglob("*")) == []
            return
        # Root ignores the permission bits: a full disk after the manifest is written
        # stands in for them (every other write fails, the manifest itself still writes).
        runs.chmod(0o755)
        real = runs_mod.atomic_write_bytes
        refused: list[str] = []

        def disk_full(path, data):
            if Path(path).name == "manifest.json":
                return real(path, data)
            refused.append(Path(path).name)
            raise OSError(ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(runs_mod, "atomic_write_bytes", disk_full)
        rc = cli(*evaluate_args(runs, mnist5k_root, "ro"))
        line = error_line(capsys)
    finally:
        runs.chmod(0o755)
    assert rc == 2
    assert "No space left on device" in line and "config.json" in line, line
    assert refused == ["config.json"]          # the first write after the manifest
    run = runs / "evaluate" / "ro"
    man = manifest(run)
    assert man["status"] == "failed" and "No space left on device" in man["error"]
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]
    assert leftovers(runs) == []


@pytest.mark.parametrize("command,target", [
    ("evaluate", "evaluations.csv"),       # the sweep's first result
    ("distill", "checkpoint.pt"),          # inside the curriculum
    ("distill", "policy.pt"),              # the best-validation weights
])
def test_disk_full_during_a_run_fails_it_cleanly(tmp_path, monkeypatch, capsys, mnist5k_root,
                                                 command, target):
    """ENOSPC in the middle of writing ``target`` (the temp file exists and holds data,
    its fsync fails): one error line, status failed, the temp file removed, earlier files
    whole."""
    runs = tmp_path / "runs"
    real_fsync = os.fsync
    hit: list[str] = []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(f".{target}.") and name.endswith(".tmp"):
            hit.append(name)
            assert os.fstat(fd).st_size > 0      # a half-written temp file is on disk
            raise OSError(ENOSPC, "No space left on device")
        return real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell which file an fsync is for")
    monkeypatch.setattr(os, "fsync", fsync)
    args = (evaluate_args if command == "evaluate" else distill_args)(runs, mnist5k_root, "full-disk")
    rc = cli(*args)
    line = error_line(capsys)
    monkeypatch.undo()
    assert rc == 2 and len(hit) == 1, (rc, hit)
    assert "No space left on device" in line, line
    run = runs / command / "full-disk"
    man = manifest(run)
    assert man["status"] == "failed" and "No space left on device" in man["error"]
    assert leftovers(runs) == [], leftovers(runs)
    assert not list(run.rglob(target))           # never a half-written target
    assert_files_whole(run)


# --------------------------------------------------------------------------- (b) NaN data
PLUGIN = textwrap.dedent('''
    """Tiny plug-in problems for test_faults: 4×4 grey images, 3 classes."""
    import torch
    import torch.nn as nn

    from optamal.data import Dataset


    def _pair(poisoned):
        g = torch.Generator().manual_seed(0)
        tx = torch.rand(256, 1, 4, 4, generator=g)
        ty = torch.randint(0, 3, (256,), generator=g)
        vx = torch.rand(64, 1, 4, 4, generator=g)
        vy = torch.randint(0, 3, (64,), generator=g)
        if poisoned:
            tx[::8, 0, 1, 2] = float("nan")     # one pixel of every 8th image: every batch
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3))
        return net, Dataset("nan" if poisoned else "clean", tx, ty, vx, vy, 3)


    def clean():
        return _pair(False)


    def poisoned():
        return _pair(True)
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "faults_nan_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield "faults_nan_plugin"
    sys.path.remove(str(folder))
    sys.modules.pop("faults_nan_plugin", None)


def test_nan_inputs_make_the_distill_replicate_diverge(tmp_path, plugin, capsys):
    runs = tmp_path / "runs"
    rc = cli("distill", "--profile", "smoke", "--scheme", "mean", "--lrs", "paper",
             "--problem", f"{plugin}:poisoned", "--unrolls", "10", "--truncation", "5",
             "--alphas", "0.2", "--set", "batch_size=32", "--set", "validate_every=2",
             "--set", "min_validations=2", "--set", "max_validations=3", "--set", "max_bad_steps=3",
             "--set", "val_unroll=10", "--set", "warmup_steps=2", "--runs-dir", runs, "--name", "nan")
    line = error_line(capsys)
    assert rc == 2
    assert "every replicate diverged" in line, line
    run = runs / "distill" / "nan"
    man = manifest(run)
    assert man["status"] == "failed" and "every replicate diverged" in man["error"]
    rep = man["replicates"]["0"]
    assert rep["status"] == "diverged"
    assert "3 non-finite meta-iterations in a row" in rep["error"]
    assert rep["divergence_events"] == 3 and rep["best_validation"] is None
    assert "best_replicate" not in man

    folder = run / "replicate-0"
    meta = pd.read_csv(folder / "meta.csv")
    assert len(meta) >= 2 and meta.skipped.all() and meta.meta_loss.isna().all()
    assert list(meta.divergence_events) == list(range(1, len(meta) + 1))
    val = pd.read_csv(folder / "validation.csv")
    assert len(val) == 1 and not val.best.any() and not math.isfinite(val.val_log_loss[0])
    # No policy was ever good enough to save, and the kept weights are the last good ones.
    assert not (folder / "policy.pt").exists()
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["status"] == "diverged"
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["net"].values())
    assert leftovers(runs) == []


def test_nan_inputs_mark_evaluations_diverged_and_the_sweep_goes_on(tmp_path, plugin, capsys):
    runs = tmp_path / "runs"
    rc = cli("evaluate", "--profile", "smoke", "--problems", f"{plugin}:poisoned,{plugin}:clean",
             "--teachers", "sgd,adam", "--lrs", "paper", "--repeats", "2", "--epochs", "2",
             "--workers", "1", "--set", "batch_size=32", "--runs-dir", runs, "--name", "nan")
    out, err = capsys.readouterr()
    assert rc == 0, err
    run = runs / "evaluate" / "nan"
    assert manifest(run)["status"] == "completed"
    df = pd.read_csv(run / "evaluations.csv")
    assert len(df) == 2 * 2 * 2 * 2                    # problems × teachers × evaluations × epochs
    bad = df[df.problem == f"{plugin}:poisoned"]
    good = df[df.problem == f"{plugin}:clean"]
    assert len(bad) == len(good) == 8
    assert bad.diverged.all() and bad[["train_loss", "val_loss", "val_acc"]].isna().all().all()
    assert not good.diverged.any()
    assert good[["train_loss", "val_loss", "val_acc"]].map(math.isfinite).all().all()


def test_meta_csv_logs_the_divergence_that_ends_the_replicate(tmp_path, plugin, capsys):
    runs = tmp_path / "runs"
    rc = cli("distill", "--profile", "smoke", "--scheme", "none", "--lrs", "paper",
             "--problem", f"{plugin}:poisoned", "--unrolls", "5", "--truncation", "5",
             "--alphas", "0.2", "--set", "batch_size=32", "--set", "validate_every=5",
             "--set", "max_bad_steps=2", "--set", "warmup_steps=2", "--runs-dir", runs, "--name", "nan")
    capsys.readouterr()
    assert rc == 2
    man = manifest(runs / "distill" / "nan")
    meta = pd.read_csv(runs / "distill" / "nan" / "replicate-0" / "meta.csv")
    assert man["replicates"]["0"]["divergence_events"] == 2
    assert int(meta.divergence_events.max()) == 2
