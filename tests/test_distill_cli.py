"""`optamal distill` / `train-choice` end to end through the CLI (smoke sizes on "mlp"):
artifacts, prerequisites picked up from the runs directory, replicates, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from optamal.cli import main
from optamal.commands.tune_lr import load_lrs
from optamal.errors import OptamalError
from optamal.policies import load_policy
from optamal.runs import safe_torch_load

META_COLUMNS = ["stage", "meta_epoch", "truncation", "meta_loss", "distill_loss", "total_loss",
                "grad_norm", "skipped", "divergence_events", "seconds"]
LARGE_POOL = ["sgd", "momentum", "rmsprop", "adam", "addsign", "powersign"]
CHOICE_LRS_REF = {"sgd": 2.0, "momentum": 2.0, "adam": 0.02, "rmsprop": 0.005,
                  "addsign": 1.0, "powersign": 1.0}   # METHOD §4 (*ref* choice-pool rates)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def smoke(root, runs_dir) -> list[str]:
    return ["--profile", "smoke", "--problem", "mlp", "--runs-dir", str(runs_dir),
            "--data-root", str(root), "--set", "max_train=256"]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# --------------------------------------------------------------------------- mean, paper rates
@pytest.fixture(scope="module")
def mean_run(tmp_path_factory, mnist5k_root):
    runs = tmp_path_factory.mktemp("runs_mean")
    rc = cli("distill", "--scheme", "mean", "--lrs", "paper", "--pool", "small", "--name", "m",
             *smoke(mnist5k_root, runs))
    return rc, runs / "distill" / "m"


def test_distill_mean_writes_every_artifact(mean_run):
    rc, path = mean_run
    assert rc == 0
    man = manifest(path)
    assert man["status"] == "completed" and man["command"] == "distill"
    assert man["prerequisites"] == {"lrs": "paper"}
    assert man["scheme"] == "mean" and man["teachers"] == ["adam", "rmsprop"]
    assert man["lrs"] == {"adam": 0.005, "rmsprop": 0.005}        # PAPER_LRS (*ref*)
    assert man["replicates"]["0"]["status"] == "completed"
    assert man["best_replicate"] == 0

    rep = path / "replicate-0"
    for name in ("policy.pt", "policy.json", "meta.csv", "validation.csv", "checkpoint.pt"):
        assert (rep / name).is_file(), name
    net, header = load_policy(rep / "policy.pt")
    assert header["kind"] == "rnnprop" and header["scheme"] == "mean"
    assert header["pool"] == "small" and header["teachers"] == ["adam", "rmsprop"]
    assert json.loads((rep / "policy.json").read_text()) == header
    assert sum(p.numel() for p in net.parameters()) > 1000
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())

    meta = pd.read_csv(rep / "meta.csv")
    assert list(meta.columns) == META_COLUMNS
    val = pd.read_csv(rep / "validation.csv")
    assert len(val) >= 1 and val.val_log_loss.notna().all()
    cfg = man["config"]
    per_epoch = cfg["unrolls"][0] // cfg["truncation"]
    assert len(meta) == len(val) * cfg["validate_every"] * per_epoch
    assert not meta.skipped.any() and (meta.divergence_events == 0).all()
    assert meta.distill_loss.map(math.isfinite).all() and (meta.distill_loss != 0).all()
    assert sorted(set(meta.truncation)) == list(range(per_epoch))
    # best validation in the header is the minimum of validation.csv
    assert header["best_validation"] == pytest.approx(val.val_log_loss.min())
    ckpt = safe_torch_load(rep / "checkpoint.pt", "checkpoint")
    assert set(net.state_dict()) <= set(ckpt["net"])


# --------------------------------------------------------------------------- the chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory, mnist5k_root):
    """tune-lr → train-choice → distill --scheme choice, each finding its prerequisite."""
    runs = tmp_path_factory.mktemp("runs_chain")
    base = smoke(mnist5k_root, runs)
    rcs = [cli("tune-lr", "--pool", "large", "--workers", 1, "--name", "t", *base,
               "--set", "warmup_steps=4")]
    rcs.append(cli("train-choice", "--pool", "large", "--name", "c", *base))
    # An older train-choice run that sorts after "c" by name: "latest" means by start time.
    old = runs / "train-choice" / "zz-older"
    shutil.copytree(runs / "train-choice" / "c", old)
    man = manifest(old)
    man["started"] = "2000-01-01T00:00:00+00:00"
    (old / "manifest.json").write_text(json.dumps(man))
    rcs.append(cli("distill", "--scheme", "choice", "--pool", "large", "--name", "d", *base))
    rcs.append(cli("train-choice", "--pool", "large", "--name", "c-ref", "--multiplier", "ref", *base))
    return rcs, runs


def test_chain_finds_latest_prerequisites(chain):
    rcs, runs = chain
    assert rcs == [0, 0, 0, 0]
    tune, choice, dist = (runs / "tune-lr" / "t", runs / "train-choice" / "c", runs / "distill" / "d")
    selected = load_lrs(tune)
    assert set(selected) == set(LARGE_POOL)

    cman = manifest(choice)
    assert cman["status"] == "completed"
    assert cman["prerequisites"] == {"lrs": str(tune.resolve())}
    cnet, cheader = load_policy(choice / "replicate-0" / "policy.pt")
    assert cheader["kind"] == "choice" and cheader["teachers"] == LARGE_POOL
    tuned = cheader["tuned_lrs"]
    for t, rate in zip(LARGE_POOL, cheader["lrs"]):
        assert tuned[t] == selected[t]
        # "tuned rate × pool multiplier": 2 for every teacher by default
        assert rate == pytest.approx(tuned[t] * 2.0, rel=1e-12)
    assert cheader["multipliers"] == {t: 2.0 for t in LARGE_POOL}
    assert json.loads((choice / "config.json").read_text())["random_scaling"] is False
    # --multiplier ref: the multiplier that makes paper rates the *ref* choice rates
    _, ref_header = load_policy(runs / "train-choice" / "c-ref" / "replicate-0" / "policy.pt")
    for t, rate in zip(LARGE_POOL, ref_header["lrs"]):
        assert rate == pytest.approx(tuned[t] * CHOICE_LRS_REF[t] / _paper(t), rel=1e-12)

    dman = manifest(dist)
    assert dman["status"] == "completed"
    assert dman["prerequisites"]["choice"] == str(choice.resolve())
    assert dman["prerequisites"]["choice_policy"] == str((choice / "replicate-0" / "policy.pt").resolve())
    assert dman["choice_teachers"] == LARGE_POOL
    _, header = load_policy(dist / "replicate-0" / "policy.pt")
    assert header["kind"] == "rnnprop" and header["scheme"] == "choice"
    assert header["teachers"] == ["choice"]
    meta = pd.read_csv(dist / "replicate-0" / "meta.csv")
    assert meta.distill_loss.map(math.isfinite).all() and (meta.distill_loss != 0).all()


def _paper(t: str) -> float:
    from optamal.rules.teachers import PAPER_LRS

    return PAPER_LRS[t]


# --------------------------------------------------------------------------- replicates
def test_two_replicates_give_two_different_policies(tmp_path, mnist5k_root):
    rc = cli("distill", "--scheme", "none", "--replicates", 2, "--name", "r",
             *smoke(mnist5k_root, tmp_path))
    assert rc == 0
    path = tmp_path / "distill" / "r"
    man = manifest(path)
    assert set(man["replicates"]) == {"0", "1"}
    assert all(v["status"] == "completed" for v in man["replicates"].values())
    (n0, h0), (n1, h1) = (load_policy(path / f"replicate-{i}" / "policy.pt") for i in (0, 1))
    assert h0["seed"] != h1["seed"] and (h0["replicate"], h1["replicate"]) == (0, 1)
    s0, s1 = n0.state_dict(), n1.state_dict()
    assert s0.keys() == s1.keys()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert man["best_replicate"] in (0, 1)
    best = min(man["replicates"], key=lambda k: man["replicates"][k]["best_validation"])
    assert man["best_replicate"] == int(best)


# --------------------------------------------------------------------------- bad inputs
BAD = [
    (["--scheme", "median", "--lrs", "paper"], "unknown scheme 'median'"),
    (["--scheme", "mean", "--lrs", "paper", "--perturb", "gauss"], "unknown perturbation 'gauss'"),
    (["--scheme", "mean", "--lrs", "paper", "--unrolls", "25", "--truncation", "10"], "not divisible"),
    (["--scheme", "choice", "--pool", "large"], "optamal train-choice"),
    (["--scheme", "mean", "--pool", "small"], "optamal tune-lr"),
    (["--scheme", "mean", "--lrs", "paper", "--perturb", "random", "--magnitude", "0"], "--magnitude"),
    (["--scheme", "mean", "--lrs", "paper", "--perturb", "random", "--magnitude", "-1"], "--magnitude"),
    (["--scheme", "mean", "--lrs", "paper", "--meta-gradient", "foo"], "unknown meta-gradient 'foo'"),
    (["--scheme", "mean", "--lrs", "paper", "--unrolls", "20,40", "--alphas", "0.2"], "--alphas"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[
    "scheme", "perturb", "divisible", "no-choice-run", "no-tune-lr-run", "magnitude0",
    "magnitude-neg", "meta-gradient", "alphas"])
def test_bad_input_exits_2_with_one_line_and_no_run_folder(tmp_path, mnist5k_root, capsys, args, needle):
    runs = tmp_path / "runs"
    rc = cli("distill", *args, *smoke(mnist5k_root, runs))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert not runs.exists() or list(runs.rglob("*")) == []


# --------------------------------------------------------------------------- policy files
PICKLE_RAN = []


def _mark() -> str:
    PICKLE_RAN.append(True)
    return "ran"


class Payload:
    def __reduce__(self):
        return (_mark, ())


def test_policy_with_a_pickled_object_is_refused(tmp_path):
    from optamal.rules.rnnprop import RNNPropNet

    path = tmp_path / "policy.pt"
    torch.save({"format": "optamal-policy", "header": json.dumps({"kind": "rnnprop", "format_version": 1}),
                "state_dict": RNNPropNet().state_dict(), "extra": Payload()}, path)
    with pytest.raises(OptamalError, match="refusing"):
        load_policy(path)
    assert PICKLE_RAN == []
    # The same content without the object loads.
    torch.save({"format": "optamal-policy", "header": json.dumps({"kind": "rnnprop", "format_version": 1}),
                "state_dict": RNNPropNet().state_dict()}, path)
    net, header = load_policy(path)
    assert header["kind"] == "rnnprop"
