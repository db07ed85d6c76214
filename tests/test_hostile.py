"""Hostile invocations and files, table-driven through ``optamal.cli.main(argv)``.

Every case must end with exit code 2 and exactly one stderr line starting ``error:`` (no
traceback, no progress output, no warning), and must write nothing outside a new run
folder of its own: the files under the case's runs/fixture folders and the data root are
snapshotted before and after. Most cases must create nothing at all; a case that did
create a new run folder must have marked it ``failed``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from optamal.cli import main

PLUGIN_MODULE = "hostile_plugins"
PLUGIN = textwrap.dedent('''
    """Plug-in problems for test_hostile."""
    import torch
    import torch.nn as nn

    from optamal.data import Dataset


    def boom():
        raise RuntimeError("factory exploded")


    def tiny():
        g = torch.Generator().manual_seed(0)
        data = Dataset("tiny", torch.rand(64, 1, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g),
                       torch.rand(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g), 3)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Sigmoid(), nn.Linear(4, 3)), data
''')


@pytest.fixture(scope="module", autouse=True)
def setup_module_env(tmp_path_factory, mnist5k_root):
    """One thread, a warm mnist5k cache (so that loading it writes nothing), the plug-ins."""
    from optamal.data import load_dataset

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    load_dataset("mnist5k", mnist5k_root)
    folder = tmp_path_factory.mktemp("hostile_plugins")
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop(PLUGIN_MODULE, None)
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- hostile files
PICKLE_RAN: list[bool] = []


def _mark() -> str:
    PICKLE_RAN.append(True)
    return "ran"


class Payload:
    """Unpickling this would call _mark: a stand-in for code hidden in a tensor file."""

    def __reduce__(self):
        return (_mark, ())


def write_manifest(folder: Path, command: str, status: str = "interrupted", config: dict | None = None,
                   schema=1, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    man = {"schema_version": schema, "optamal_version": "0.1.0", "command": command, "name": folder.name,
           "argv": ["optamal", command], "config": config or {}, "seed": 0, "device": "cpu",
           "versions": {}, "host": "test", "started": "2026-01-01T00:00:00+00:00", "ended": None,
           "status": status, "error": None, **extra}
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder


def write_lrs(folder: Path, text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lrs.json").write_text(text if text is not None else
                                     json.dumps({"pool": "small", "lrs": {"adam": 0.005, "rmsprop": 0.005}}))
    return folder


def policy_blob(header: dict, state_dict: dict, **extra) -> dict:
    return {"format": "optamal-policy", "header": json.dumps(dict(header, format="optamal-policy",
                                                                   format_version=1)),
            "state_dict": state_dict, **extra}


@dataclass
class World:
    root: Path     # everything the cases may read (snapshotted)
    runs: Path     # the --runs-dir of every case
    data: Path     # the --data-root (snapshotted)

    def p(self, name: str) -> Path:
        return self.root / "fixtures" / name


@pytest.fixture
def world(tmp_path, mnist5k_root) -> World:
    from optamal.config import DistillConfig, EvaluateConfig
    from optamal.rules.rnnprop import RNNPropNet

    w = World(tmp_path, tmp_path / "runs", mnist5k_root)
    w.runs.mkdir()
    (w.root / "empty").mkdir()

    # Run folders with a damaged manifest.
    bad = w.p("malformed")
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text('{"schema_version": 1, "command": "distill", "status": ')
    write_manifest(w.p("future"), "distill", schema=99)
    # tune-lr folders: damaged manifest / future schema (valid lrs.json), damaged lrs.json.
    write_lrs(w.p("lrs-malformed-manifest"))
    (w.p("lrs-malformed-manifest") / "manifest.json").write_text("{not json")
    write_lrs(write_manifest(w.p("lrs-future"), "tune-lr", "completed", schema=99))
    write_lrs(write_manifest(w.p("lrs-not-json"), "tune-lr", "completed"), "lrs: adam=0.005\n")
    write_lrs(write_manifest(w.p("lrs-no-lrs"), "tune-lr", "completed"),
              json.dumps({"pool": "small", "rates": {"adam": 0.005}}))
    (w.p("lrs-folder") / "lrs.json").mkdir(parents=True)
    # Runs of the wrong kind or state for --resume.
    write_manifest(w.p("tune-lr-run"), "tune-lr", "completed")
    write_manifest(w.p("distill-done"), "distill", "completed")
    write_manifest(w.p("distill-interrupted"), "distill", "interrupted")
    ev_cfg = EvaluateConfig.build("smoke", dict(problems=("mlp",), teachers="sgd", lrs="paper",
                                                runs_dir=str(w.runs), data_root=str(w.data))).to_dict()
    entry = dict(optimizer="sgd", kind="teacher", run="paper", run_path="paper", replicate=0,
                 teacher="sgd", lr=0.2)
    ev = write_manifest(w.p("evaluate-bad-csv"), "evaluate", "interrupted", ev_cfg,
                        entries=[entry], problems=["mlp"], skipped={})
    (ev / "evaluations.csv").write_text("optimizer,run,epoch,train_loss\nsgd,paper,1,2.3\n")
    write_manifest(w.p("evaluate-no-entries"), "evaluate", "interrupted", ev_cfg)
    write_manifest(w.p("evaluate-done"), "evaluate", "completed", ev_cfg, entries=[entry],
                   problems=["mlp"], skipped={})
    # Policy files: weights of another architecture; a pickled object inside.
    rep = w.p("mismatch") / "replicate-0"
    rep.mkdir(parents=True)
    torch.save(policy_blob({"kind": "rnnprop", "hidden": 8, "scheme": "mean", "pool": "small"},
                           RNNPropNet(20).state_dict()), rep / "policy.pt")
    w.p("pickled").mkdir(parents=True)
    torch.save(policy_blob({"kind": "choice", "hidden": 20, "teachers": ["adam"], "lrs": [0.005]},
                           {}, extra=Payload()), w.p("pickled") / "policy.pt")
    # An interrupted distill run whose only checkpoint holds a pickled object. Its stored
    # config is tiny, so that wrongly resuming it ends in seconds.
    d_cfg = DistillConfig.build("smoke", dict(
        scheme="none", lrs="paper", problem=f"{PLUGIN_MODULE}:tiny", unrolls=(5,), truncation=5,
        alphas=(0.2,), runs_dir=str(w.runs), data_root=str(w.data)),
        ["validate_every=1", "max_validations=1", "min_validations=1", "val_unroll=5",
         "warmup_steps=1", "batch_size=16"]).to_dict()
    ck = write_manifest(w.p("pickled-checkpoint"), "distill", "interrupted", d_cfg,
                        prerequisites={"lrs": "paper"}) / "replicate-0"
    ck.mkdir()
    torch.save({"format": "optamal-checkpoint", "net": RNNPropNet().state_dict(), "extra": Payload()},
               ck / "checkpoint.pt")
    return w


# --------------------------------------------------------------------------- the table
Args = Callable[[World], list]


def distill(*extra) -> Args:
    return lambda w: ["distill", "--profile", "smoke", "--scheme", "mean", "--lrs", "paper",
                      "--runs-dir", w.runs, "--data-root", w.data, *[e(w) if callable(e) else e for e in extra]]


def command(name: str, *extra, runs: Callable[[World], Path] | None = None) -> Args:
    return lambda w: [name, "--profile", "smoke", "--runs-dir", (runs or (lambda w: w.runs))(w),
                      "--data-root", w.data, *[e(w) if callable(e) else e for e in extra]]


def fx(name: str, *sub: str) -> Callable[[World], Path]:
    return lambda w: w.p(name).joinpath(*sub)


CASES = [
    # unknown enum values
    ("pool", distill("--pool", "huge"), "unknown pool 'huge'"),
    ("train-choice-pool", command("train-choice", "--lrs", "paper", "--pool", "huge"), "unknown pool 'huge'"),
    ("scheme", distill("--scheme", "median"), "unknown scheme 'median'"),
    ("perturb", distill("--perturb", "gauss"), "unknown perturbation 'gauss'"),
    ("profile", lambda w: ["distill", "--profile", "huge", "--lrs", "paper", "--runs-dir", w.runs],
     "unknown profile 'huge'"),
    ("device", distill("--device", "tpu"), "unknown device 'tpu'"),
    ("meta-gradient", distill("--meta-gradient", "second"), "unknown meta-gradient 'second'"),
    ("policy", distill("--policy", "lstm"), "unknown policy 'lstm'"),
    ("distill-teachers", distill("--teachers", "adam,nadam"), "unknown teacher 'nadam'"),
    ("evaluate-teachers", command("evaluate", "--lrs", "paper", "--teachers", "adam,nadam"),
     "unknown teacher 'nadam'"),
    # non-numeric and out-of-range sizes
    ("epochs-not-a-number", command("tune-lr", "--epochs", "x"), "'--epochs'"),
    ("repeats-negative", command("evaluate", "--lrs", "paper", "--repeats", "-1"), "repeats must be > 0, got -1"),
    ("evaluate-epochs-zero", command("evaluate", "--lrs", "paper", "--epochs", "0"), "epochs must be > 0, got 0"),
    ("replicates-zero", distill("--replicates", "0"), "replicates must be > 0, got 0"),
    ("truncation-negative", distill("--truncation", "-5"), "truncation must be > 0, got -5"),
    ("meta-batch-zero", distill("--meta-batch", "0"), "meta-batch must be > 0, got 0"),
    ("magnitude-zero", distill("--perturb", "random", "--magnitude", "0"), "--magnitude must be > 0"),
    ("choice-multiplier", command("train-choice", "--lrs", "paper", "--multiplier", "big"),
     "--multiplier must be a positive number or 'ref', got 'big'"),
    ("unrolls-not-a-number", distill("--unrolls", "10,x"), "invalid number 'x' in --unrolls"),
    ("unroll-truncation-mismatch", distill("--unrolls", "25", "--truncation", "10"),
     "unroll 25 is not divisible by truncation 10"),
    ("alphas-fewer-than-stages", distill("--unrolls", "20,40", "--alphas", "0.2"),
     "--alphas gives 1 value(s) for 2 curriculum stage(s)"),
    # prerequisites that are not there
    ("missing-runs-dir", lambda w: ["distill", "--profile", "smoke", "--scheme", "mean", "--problem", "mlp",
                                    "--runs-dir", w.root / "nowhere", "--data-root", w.data],
     "no completed tune-lr run for pool small"),
    ("empty-runs-dir", lambda w: ["distill", "--profile", "smoke", "--scheme", "mean", "--problem", "mlp",
                                  "--runs-dir", w.root / "empty", "--data-root", w.data],
     "no completed tune-lr run for pool small"),
    ("evaluate-empty-runs-dir", command("evaluate", "--problems", "mlp", runs=lambda w: w.root / "empty"),
     "no tuned rates for the teachers"),
    ("evaluate-empty-folder", command("evaluate", lambda w: w.root / "empty", "--teachers", "none"),
     "holds no policy.pt"),
    ("evaluate-no-such-run", command("evaluate", lambda w: w.root / "nowhere", "--teachers", "none"),
     "run not found"),
    ("resume-no-such-folder", lambda w: ["distill", "--resume", w.root / "nowhere"], "manifest not found"),
    # damaged and future run folders
    ("resume-malformed-manifest", lambda w: ["distill", "--resume", w.p("malformed")], "malformed manifest"),
    ("resume-future-schema", lambda w: ["distill", "--resume", w.p("future")], "schema version 99"),
    ("lrs-folder-malformed-manifest", distill("--lrs", fx("lrs-malformed-manifest")), "malformed manifest"),
    ("lrs-folder-future-schema", distill("--lrs", fx("lrs-future")), "schema version 99"),
    ("lrs-folder-of-another-command", distill("--lrs", fx("distill-done")), "is a distill run, not a tune-lr run"),
    ("lrs-json-not-json", distill("--lrs", fx("lrs-not-json")), "malformed learning-rate file"),
    ("lrs-json-without-lrs", distill("--lrs", fx("lrs-no-lrs", "lrs.json")), "no 'lrs' mapping"),
    ("lrs-json-is-a-folder", distill("--lrs", fx("lrs-folder")), "cannot read learning-rate file"),
    ("evaluate-resume-csv-missing-columns", lambda w: ["evaluate", "--resume", w.p("evaluate-bad-csv")],
     "lacks columns"),
    ("evaluate-resume-manifest-without-entries", lambda w: ["evaluate", "--resume", w.p("evaluate-no-entries")],
     "malformed manifest"),
    ("policy-of-another-architecture", command("evaluate", fx("mismatch", "replicate-0"), "--problems", "mlp",
                                               "--teachers", "none"),
     "does not fit this architecture"),
    ("policy-with-pickled-object", command("evaluate", fx("pickled", "policy.pt"), "--problems", "mlp",
                                           "--teachers", "none"),
     "refusing to load policy file"),
    ("choice-policy-with-pickled-object", lambda w: distill("--scheme", "choice", "--problem", "mlp",
                                                            "--choice", w.p("pickled"))(w),
     "refusing to load policy file"),
    pytest.param("checkpoint-with-pickled-object", lambda w: ["distill", "--resume", w.p("pickled-checkpoint")],
                 "refusing to load checkpoint", id="checkpoint-with-pickled-object"),
    # plug-in problems
    ("plugin-does-not-import", command("tune-lr", "--problem", "no_such_module_qq:make"),
     "cannot import plug-in problem module 'no_such_module_qq'"),
    ("plugin-factory-raises", command("tune-lr", "--problem", f"{PLUGIN_MODULE}:boom"),
     "RuntimeError: factory exploded"),
    ("plugin-without-function", command("tune-lr", "--problem", f"{PLUGIN_MODULE}:nothing"),
     "has no callable 'nothing'"),
    # --resume of the wrong run
    ("resume-completed-run", lambda w: ["distill", "--resume", w.p("distill-done")], "already completed"),
    ("resume-run-of-another-command", lambda w: ["distill", "--resume", w.p("tune-lr-run")],
     "expects a distill run folder, got a tune-lr run"),
    ("train-choice-resume-distill-run", lambda w: ["train-choice", "--resume", w.p("distill-interrupted")],
     "expects a train-choice run folder, got a distill run"),
    ("evaluate-resume-distill-run", lambda w: ["evaluate", "--resume", w.p("distill-interrupted")],
     "expects an evaluate run folder, got a distill run"),
    ("evaluate-resume-completed-run", lambda w: ["evaluate", "--resume", w.p("evaluate-done")],
     "already completed"),
    # --set and --name
    ("set-unknown-field", distill("--set", "nosuchfield=1"), "unknown config field 'nosuchfield'"),
    ("set-bad-type", distill("--set", "validate_every=abc"), "invalid value 'abc' for validate_every"),
    ("set-without-value", distill("--set", "validate_every"), "--set expects field=value"),
    ("name-with-slash", distill("--name", "a/b"), "invalid run name 'a/b'"),
]


def _ids(cases):
    return [getattr(c, "id", None) or c[0] for c in cases]


def snapshot(*roots: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            if p.is_dir():
                out[str(p)] = ("dir",)
            elif st.st_size < (1 << 20):
                out[str(p)] = ("file", hashlib.sha1(p.read_bytes()).hexdigest())
            else:   # the data cache: big, compared by size, time and inode
                out[str(p)] = ("file", st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def assert_wrote_nothing_else(before: dict, after: dict) -> None:
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    removed = sorted(set(before) - set(after))
    assert not changed and not removed, (changed, removed)
    added = sorted(set(after) - set(before))
    if not added:
        return
    new_runs = [Path(a).parent for a in added if Path(a).name == "manifest.json"]
    assert len(new_runs) == 1, f"wrote outside a run folder of its own: {added}"
    run = new_runs[0]
    allowed = {str(run), *map(str, run.parents)}
    outside = [a for a in added if a not in allowed and not a.startswith(str(run) + "/")]
    assert not outside, f"wrote outside its run folder {run}: {outside}"
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "failed" and man["error"], man


@pytest.mark.parametrize("name,args,needle", CASES, ids=_ids(CASES))
def test_hostile_input_is_one_error_line(world, capsys, name, args, needle):
    argv = [str(a) for a in args(world)]
    before = snapshot(world.root, world.data)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    assert rc == 2, (argv, rc, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert needle in lines[0], lines[0]
    assert_wrote_nothing_else(before, snapshot(world.root, world.data))
    assert PICKLE_RAN == []


def test_the_table_is_large_and_ids_are_unique():
    ids = _ids(CASES)
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
