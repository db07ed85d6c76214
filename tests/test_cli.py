"""The command line: version/help, one-line user errors with exit code 2, config profiles."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import optamal
from optamal.cli import main
from optamal.config import LR_GRID, TuneLRConfig
from optamal.errors import OptamalError


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "optamal", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------- subprocess
def test_version():
    res = _run("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"optamal {optamal.__version__}"


def test_help_is_fast_and_lists_commands():
    _run("--help")  # warm the file cache; the timed call below is what a user sees
    start = time.perf_counter()
    res = _run("--help")
    elapsed = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    assert "tune-lr" in res.stdout
    assert "Traceback" not in res.stderr
    assert elapsed < 1.5, f"optamal --help took {elapsed:.2f} s"


def test_command_help():
    res = _run("tune-lr", "--help")
    assert res.returncode == 0, res.stderr
    for opt in ("--pool", "--grid", "--profile", "--set", "--runs-dir"):
        assert opt in res.stdout


def test_importing_cli_does_not_import_torch():
    code = ("import sys, optamal.cli, optamal.config, optamal.errors; "
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules]; "
            "print(','.join(heavy) or 'none')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "none"


# --------------------------------------------------------------------------- bad invocations
BAD = [
    (["tune-lr", "--pool", "huge"], ["huge", "small, large"]),
    (["tune-lr", "--profile", "huge"], ["huge", "smoke, quick, paper"]),
    (["tune-lr", "--epochs", "abc"], ["--epochs"]),
    (["tune-lr", "--grid", "1e-3,x"], ["'x'", "--grid"]),
    (["tune-lr", "--grid", "1e-3,-0.1"], ["-0.1"]),
    (["tune-lr", "--repeats", "0"], ["repeats"]),
    (["tune-lr", "--device", "tpu"], ["tpu", "cpu"]),
    (["tune-lr", "--problem", "nosuchmod:fn"], ["nosuchmod"]),
    (["tune-lr", "--problem", "nosuch"], ["nosuch", "train"]),
    (["tune-lr", "--set", "nosuchfield=1"], ["nosuchfield"]),
    (["tune-lr", "--set", "epochs=abc"], ["epochs", "abc"]),
    (["tune-lr", "--set", "epochs"], ["--set"]),
    (["tune-lr", "--teachers", "adam,foo"], ["foo", "adam"]),
    (["tune-lr", "--workers", "-1"], ["workers"]),
    (["tune-lr", "--name", "../escape"], ["../escape"]),
    (["tune-lr", "--no-such-option"], ["--no-such-option"]),
    (["no-such-command"], ["no-such-command"]),
]


def _check_one_line_error(capsys, argv, must_contain, runs_dir):
    rc = main([*argv, "--runs-dir", str(runs_dir)])
    out, err = capsys.readouterr()
    assert rc == 2, (argv, rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("error:"), (argv, err)
    assert "Traceback" not in err and "Traceback" not in out
    for s in must_contain:
        assert s in lines[0], (argv, s, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv,must_contain", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_invocation_is_one_line_exit_2(capsys, tmp_path, argv, must_contain):
    runs_dir = tmp_path / "runs"
    _check_one_line_error(capsys, argv, must_contain, runs_dir)
    assert not runs_dir.exists() or not any(runs_dir.rglob("*")), list(runs_dir.rglob("*"))


def test_missing_dataset_points_to_download(capsys, tmp_path):
    runs_dir = tmp_path / "runs"
    empty = tmp_path / "data"
    empty.mkdir()
    line = _check_one_line_error(
        capsys, ["tune-lr", "--dataset", "svhn", "--data-root", str(empty)], ["svhn", "--download"],
        runs_dir)
    assert str(empty) in line
    assert not runs_dir.exists() or not any(runs_dir.rglob("*"))


def test_pool_error_message_exact(capsys, tmp_path):
    main(["tune-lr", "--pool", "huge", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert err == "error: unknown pool 'huge'; accepted: small, large\n"


# --------------------------------------------------------------------------- config
def test_profiles():
    smoke = TuneLRConfig.build("smoke")
    quick = TuneLRConfig.build("quick")
    paper = TuneLRConfig.build("paper")
    assert (smoke.profile, quick.profile, paper.profile) == ("smoke", "quick", "paper")
    assert len(smoke.grid) < len(quick.grid)
    assert smoke.epochs < quick.epochs
    # METHOD §7: the paper grid and 5 epochs.
    assert quick.grid == paper.grid == LR_GRID
    assert LR_GRID == (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
    assert paper.epochs == quick.epochs == 5
    assert paper.dataset == "native"
    assert quick.dataset is None and smoke.dataset is None
    assert smoke.max_train is not None and quick.max_train is None
    # Profiles scale sizes, never definitions.
    assert smoke.warmup_lr == quick.warmup_lr == paper.warmup_lr == 0.01
    assert quick.warmup_steps == paper.warmup_steps == 100
    assert smoke.pool == quick.pool == paper.pool == "large"
    with pytest.raises(OptamalError, match="huge"):
        TuneLRConfig.build("huge")


def test_set_overrides_are_typed():
    cfg = TuneLRConfig.build("quick", sets=["epochs=3", "grid=0.1,0.2", "max_train=256",
                                            "download=true", "teachers=adam,sgd",
                                            "warmup-lr=0.05", "dataset=none"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.grid == (0.1, 0.2) and all(isinstance(x, float) for x in cfg.grid)
    assert cfg.max_train == 256 and isinstance(cfg.max_train, int)
    assert cfg.download is True
    assert cfg.teachers == ("adam", "sgd")
    assert cfg.warmup_lr == 0.05
    assert cfg.dataset is None
    # --set beats the profile and explicit flags; explicit flags beat the profile.
    cfg = TuneLRConfig.build("smoke", overrides={"epochs": 4, "repeats": 2}, sets=["epochs=7"])
    assert cfg.epochs == 7 and cfg.repeats == 2
    assert cfg.grid == TuneLRConfig.build("smoke").grid
    # Validation applies to --set values too.
    with pytest.raises(OptamalError, match="epochs"):
        TuneLRConfig.build("quick", sets=["epochs=0"])
    with pytest.raises(OptamalError, match="pool"):
        TuneLRConfig.build("quick", sets=["pool=medium"])


def test_config_round_trips_to_dict():
    cfg = TuneLRConfig.build("smoke", sets=["grid=0.1,0.2"])
    d = cfg.to_dict()
    assert d["grid"] == [0.1, 0.2]
    assert d["profile"] == "smoke"
    assert TuneLRConfig(**{**d, "grid": tuple(d["grid"]), "teachers": tuple(d["teachers"])}) == cfg
