"""Distributed meta-training and evaluation (torchrun, gloo on CPU, 2 ranks × 1 thread)."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

ARGS = ["--profile", "smoke", "--scheme", "mean", "--pool", "small", "--lrs", "paper",
        "--problem", "mlp", "--meta-batch", "2", "--perturb", "random",
        "--set", "validate_every=2", "--set", "max_validations=2", "--set", "min_validations=2",
        "--set", "max_train=256"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPTAMAL_DIST_BACKEND="gloo")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "optamal", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)


def _single(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "optamal", *args], env=_env(),
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)


def test_two_ranks_match_one_process(tmp_path):
    runs = str(tmp_path / "runs")
    one = _single(["distill", *ARGS, "--runs-dir", runs, "--name", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(["distill", *ARGS, "--runs-dir", runs, "--name", "two"], tmp_path)
    assert two.returncode == 0, two.stderr
    # rank 0 alone wrote: exactly the two run folders, and rank 1 printed no run path
    assert sorted(os.listdir(tmp_path / "runs" / "distill")) == ["one", "two"]
    assert two.stdout.strip().splitlines() == [str(tmp_path / "runs" / "distill" / "two")]
    a = torch.load(tmp_path / "runs/distill/one/replicate-0/checkpoint.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "runs/distill/two/replicate-0/checkpoint.pt", weights_only=True)["net"]
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6
    # several meta-iterations really happened (2 validations × 2 meta-epochs × 2 truncations)
    meta = pd.read_csv(tmp_path / "runs/distill/two/replicate-0/meta.csv")
    assert len(meta) == 8 and not meta.skipped.any()
    import json

    man = json.loads((tmp_path / "runs/distill/two/manifest.json").read_text())
    assert man["world_size"] == 2 and man["status"] == "completed"


def test_evaluate_cells_split_across_ranks(tmp_path):
    runs = str(tmp_path / "runs")
    base = ["evaluate", "--profile", "smoke", "--problems", "mlp", "--teachers", "adam,sgd",
            "--lrs", "paper", "--runs-dir", runs, "--set", "max_train=256"]
    one = _single([*base, "--name", "one", "--workers", "1"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun([*base, "--name", "two"], tmp_path)
    assert two.returncode == 0, two.stderr
    a = pd.read_csv(tmp_path / "runs/evaluate/one/evaluations.csv")
    b = pd.read_csv(tmp_path / "runs/evaluate/two/evaluations.csv")
    assert len(a) == len(b) == 4   # 2 teachers × 2 evaluations × 1 epoch
    keys = ["optimizer", "evaluation", "epoch"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    assert (a[keys] == b[keys]).all().all()
    assert ((a.val_loss - b.val_loss).abs() <= 1e-5 * a.val_loss.abs()).all()
