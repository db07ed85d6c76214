"""Resume after a hard kill continues a run exactly.

``distill`` / ``train-choice`` are started as subprocesses and SIGKILLed at chosen points
(no signal handler runs, so the manifest stays ``running``), then continued with
``--resume``. The result must equal an uninterrupted run bit for bit: the final
checkpoint's weights and meta-optimizer state (``torch.equal``), the policy, and every
column of meta.csv / validation.csv but wall time. ``evaluate --resume`` after a kill
mid-sweep must give the same evaluations.csv as an uninterrupted sweep.

Every process runs with one thread (the results of a float reduction depend on the
thread count, and one thread is also the fastest on a shared 2-core box). The
uninterrupted reference runs start in the background at the first test and run
while the kill tests do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           COLUMNS="200")
ENV.pop("OPTAMAL_DATA", None)

# Two curriculum stages of 2 and 4 truncations per meta-epoch, 3 meta-epochs between
# validations, 2 validations per stage (12 meta-epochs, 36 meta-iterations), mean over the
# small pool with random weight perturbations (so the RNG state must be restored too).
# Unrolls 10,20 with truncation 5 rather than 20,40 with the smoke profile's 10: the same
# structure at half the optimizee steps, to keep this file near 3 minutes on 2 shared cores.
DISTILL = ["distill", "--profile", "smoke", "--scheme", "mean", "--pool", "small", "--lrs", "paper",
           "--problem", "mlp", "--perturb", "random", "--unrolls", "10,20", "--truncation", "5",
           "--alphas", "0.2,0.1", "--set", "validate_every=3", "--set", "max_validations=2",
           "--set", "min_validations=2"]
# One stage, 4 meta-epochs of 2 truncations, 2 validations, for the train-choice smoke.
CHOICE = ["train-choice", "--profile", "smoke", "--pool", "small", "--lrs", "paper", "--problem", "mlp",
          "--unrolls", "10", "--truncation", "5", "--alphas", "0.2", "--set", "validate_every=2",
          "--set", "max_validations=2", "--set", "min_validations=2"]
# 3 teachers × 3 evaluations = 9 cells, one process: a window of several cells to kill in.
EVALUATE = ["evaluate", "--profile", "smoke", "--problems", "mlp", "--teachers", "sgd,adam,rmsprop",
            "--lrs", "paper", "--repeats", "3", "--epochs", "2", "--workers", "1",
            "--set", "max_train=1024"]
NOT_COMPARED = {"seconds"}


# --------------------------------------------------------------------------- processes
def start(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "optamal", *map(str, args)], stdout=fh,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)
    fh.close()
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-3000:]}"


def run(args: list[str], log: Path) -> None:
    finish(start(args, log), log)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str,
              timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends before (no kill happened)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point "
                        f"({what}):\n{log.read_text()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"kill point ({what}) not reached in {timeout} s")
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before the kill point ({what})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


# --------------------------------------------------------------------------- files
def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def csv_rows(path: Path) -> int:
    """Data rows of a CSV that is always replaced atomically (0 while absent)."""
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (where, k)
        assert torch.equal(a[k], b[k]), f"{where}: {k} differs (max |Δ| " \
                                        f"{(a[k].double() - b[k].double()).abs().max().item():.3g})"


def assert_same_csv(a: Path, b: Path) -> pd.DataFrame:
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    assert list(fa.columns) == list(fb.columns)
    cols = [c for c in fa.columns if c not in NOT_COMPARED]
    assert len(fa) == len(fb) > 0, (a, len(fa), len(fb))
    pd.testing.assert_frame_equal(fa[cols], fb[cols], check_exact=True)
    return fa


def assert_same_replicate(full: Path, cut: Path) -> None:
    """The replicate folders of two meta-training runs hold the same results, bit for bit."""
    cf, cc = tensors(full / "checkpoint.pt"), tensors(cut / "checkpoint.pt")
    assert cf["position"]["status"] == cc["position"]["status"] == "completed"
    assert cf["meta_epoch"] == cc["meta_epoch"] > 0
    assert_same_state(cf["net"], cc["net"], "checkpoint net")
    sf, sc = cf["meta_optimizer"]["state"], cc["meta_optimizer"]["state"]
    assert sf.keys() == sc.keys() and sf
    for k in sf:
        assert_same_state(sf[k], sc[k], f"meta-optimizer state {k}")
    assert torch.equal(cf["generator"], cc["generator"])
    assert_same_state(tensors(full / "policy.pt")["state_dict"], tensors(cut / "policy.pt")["state_dict"],
                      "policy.pt")
    meta = assert_same_csv(full / "meta.csv", cut / "meta.csv")
    assert meta.meta_epoch.max() + 1 == cf["meta_epoch"]
    assert_same_csv(full / "validation.csv", cut / "validation.csv")


def assert_same_manifest_results(full: Path, cut: Path) -> None:
    mf, mc = manifest(full), manifest(cut)
    assert mc["status"] == "completed" and mc["error"] is None and len(mc["resumed"]) >= 1
    strip = lambda reps: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in reps.items()}
    assert strip(mc["replicates"]) == strip(mf["replicates"])
    assert mc["best_replicate"] == mf["best_replicate"]


# --------------------------------------------------------------------------- references
class References:
    """Uninterrupted runs, started together in the background on first use."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.runs = root / "ref"
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        common = ["--runs-dir", self.runs, "--data-root", data, "--name", "full"]
        for key, args in (("distill", DISTILL), ("train-choice", CHOICE), ("evaluate", EVALUATE)):
            log = root / f"ref-{key}.log"
            self.procs[key] = (start([*args, *common], log), log)

    def path(self, command: str) -> Path:
        proc, log = self.procs[command]
        finish(proc, log)
        return self.runs / command / "full"

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def refs(tmp_path_factory, mnist5k_root):
    from optamal.data import load_dataset

    load_dataset("mnist5k", mnist5k_root)   # write the data cache once, before any subprocess
    r = References(tmp_path_factory.mktemp("resume"), mnist5k_root)
    yield r
    r.stop()


# --------------------------------------------------------------------------- distill
def _after_folder(rep: Path) -> bool:
    return rep.is_dir()


def _mid_truncation(rep: Path) -> bool:
    # After every meta-epoch meta.csv is rewritten, then checkpoint.pt: once two meta-epochs
    # are logged and checkpointed, the process is inside the third one's truncations.
    try:
        return (csv_rows(rep / "meta.csv") >= 4 and
                (rep / "checkpoint.pt").stat().st_mtime_ns >= (rep / "meta.csv").stat().st_mtime_ns)
    except FileNotFoundError:
        return False


def _after_validation(rep: Path) -> bool:
    return csv_rows(rep / "validation.csv") >= 1


def _checkpoint_pair(rep: Path) -> bool:
    # Stage 2 (two validations logged), a checkpoint just written and the previous one kept.
    return (csv_rows(rep / "validation.csv") >= 2 and _mid_truncation(rep)
            and (rep / "checkpoint.prev.pt").is_file())


KILL_POINTS = {
    "early": _after_folder,
    "mid-truncation": _mid_truncation,
    "after-validation": _after_validation,
    "torn-checkpoint": _checkpoint_pair,
}


@pytest.mark.parametrize("point", [
    pytest.param("early", marks=pytest.mark.slow),
    "mid-truncation",
    pytest.param("after-validation", marks=pytest.mark.slow),
    "torn-checkpoint",
])
def test_distill_resume_after_sigkill_is_bitwise_identical(refs, tmp_path, point):
    runs = tmp_path / "runs"
    cut = runs / "distill" / "cut"
    rep = cut / "replicate-0"
    log = tmp_path / "cut.log"
    proc = start([*DISTILL, "--runs-dir", runs, "--data-root", refs.data, "--name", "cut"], log)
    kill_when(proc, lambda: KILL_POINTS[point](rep), log, point)

    # SIGKILL runs no handler: the manifest still says running, nothing is half-written.
    assert manifest(cut)["status"] == "running"
    assert not [p for p in cut.rglob("*") if p.name.endswith(".tmp")]
    before = pd.read_csv(rep / "meta.csv") if (rep / "meta.csv").is_file() else None
    kept_epochs = 0
    if point == "torn-checkpoint":
        # A checkpoint torn in the middle of its write: the resume must fall back to the
        # previous one, with a warning.
        # (Should the kill have come between the two steps of a checkpoint write, when
        # checkpoint.pt is briefly absent, the torn file is cut from the previous one.)
        ckpt = rep / "checkpoint.pt"
        data = (ckpt if ckpt.is_file() else rep / "checkpoint.prev.pt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
        kept_epochs = int(tensors(rep / "checkpoint.prev.pt")["meta_epoch"])
    else:
        # What the resume loads: checkpoint.pt, or checkpoint.prev.pt when the kill came
        # between the two steps of a checkpoint write.
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            if (rep / name).is_file():
                kept_epochs = int(tensors(rep / name)["meta_epoch"])
                break
    if point in ("mid-truncation", "torn-checkpoint"):
        assert kept_epochs >= 1

    resume_log = tmp_path / "resume.log"
    run(["distill", "--resume", cut], resume_log)
    said = " ".join(resume_log.read_text().split())
    if point == "torn-checkpoint":
        assert re.search(r"warning: cannot read checkpoint \S*checkpoint\.pt", said), said[-2000:]
        assert "trying the previous checkpoint" in said
    else:
        assert "warning" not in said, said[-2000:]

    assert manifest(cut)["status"] == "completed"
    full = refs.path("distill")
    assert_same_replicate(full / "replicate-0", rep)
    assert_same_manifest_results(full, cut)
    if kept_epochs:
        # It continued rather than restarted: the rows logged before the kill for the
        # meta-epochs its checkpoint covers are kept as they were, wall time included.
        after = pd.read_csv(rep / "meta.csv")
        old = before[before.meta_epoch < kept_epochs].reset_index(drop=True)
        assert len(old) > 0
        pd.testing.assert_frame_equal(after.iloc[: len(old)].reset_index(drop=True), old,
                                      check_exact=True)


# --------------------------------------------------------------------------- train-choice
def test_train_choice_resume_after_sigkill_is_bitwise_identical(refs, tmp_path):
    runs = tmp_path / "runs"
    cut = runs / "train-choice" / "cut"
    rep = cut / "replicate-0"
    log = tmp_path / "cut.log"
    proc = start([*CHOICE, "--runs-dir", runs, "--data-root", refs.data, "--name", "cut"], log)
    kill_when(proc, lambda: _mid_truncation(rep), log, "mid-truncation")
    assert manifest(cut)["status"] == "running"
    assert tensors(rep / "checkpoint.pt")["meta_epoch"] >= 1

    run(["train-choice", "--resume", cut], tmp_path / "resume.log")
    assert manifest(cut)["status"] == "completed"
    full = refs.path("train-choice")
    assert_same_replicate(full / "replicate-0", rep)
    assert_same_manifest_results(full, cut)


# --------------------------------------------------------------------------- evaluate
def test_evaluate_resume_after_sigkill_gives_the_same_evaluations(refs, tmp_path):
    runs = tmp_path / "runs"
    cut = runs / "evaluate" / "cut"
    log = tmp_path / "cut.log"
    proc = start([*EVALUATE, "--runs-dir", runs, "--data-root", refs.data, "--name", "cut"], log)
    kill_when(proc, lambda: csv_rows(cut / "evaluations.csv") >= 2, log, "mid-sweep")
    assert manifest(cut)["status"] == "running"
    done = pd.read_csv(cut / "evaluations.csv")
    n_cells = 3 * 3
    assert 0 < len(done) < n_cells * 2, "killed after the sweep had finished"

    run(["evaluate", "--resume", cut, "--workers", "1"], tmp_path / "resume.log")
    man = manifest(cut)
    assert man["status"] == "completed" and man["rows"] == n_cells * 2
    full = refs.path("evaluate")
    df = assert_same_csv(full / "evaluations.csv", cut / "evaluations.csv")
    assert len(df) == n_cells * 2 and not df.diverged.any()
    # The cells finished before the kill were kept, not recomputed (wall time included).
    after = pd.read_csv(cut / "evaluations.csv")
    keys = ["optimizer", "run", "replicate", "evaluation", "problem", "epoch"]
    kept = done.merge(after, on=keys, suffixes=("", "_after"))
    assert len(kept) == len(done)
    assert (kept.seconds == kept.seconds_after).all()
