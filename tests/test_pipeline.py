"""`optamal pipeline` end to end at smoke size, and its resume rules.

The smoke pipeline runs every real step (tune-lr → train-choice → distill choice and none →
evaluate → report) on the MLP problem with tiny sizes; re-running must skip completed
steps, a failed step must run again (with everything downstream of it) in a new folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optamal.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = ["tune-lr", "train-choice-large", "distill-choice-large", "distill-none", "evaluate", "report"]
# Every meta-training and evaluation step on the cheap MLP problem.
ARGS = ["pipeline", "--profile", "smoke", "--problems", "mlp",
        "--step-set", "tune-lr.problem=mlp", "--step-set", "train-choice.problem=mlp",
        "--step-set", "distill.problem=mlp"]


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir()}


@pytest.fixture(scope="module")
def smoke_pipeline(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    rc = main([*ARGS, "--runs-dir", str(runs)])
    return rc, runs / "pipeline" / "smoke"


def test_smoke_pipeline_end_to_end(smoke_pipeline, capsys):
    rc, root = smoke_pipeline
    assert rc == 0
    m = _manifest(root)
    assert m["command"] == "pipeline" and m["status"] == "completed"
    assert list(m["steps"]) == STEPS
    for key in STEPS:
        rec = m["steps"][key]
        assert rec["status"] == "completed" and not rec["skipped"]
        assert _manifest(Path(rec["run"]))["status"] == "completed"
        assert Path(rec["run"]).parent.parent == root        # one folder tree
    # Prerequisites were found inside the pipeline's own tree.
    distill = _manifest(Path(m["steps"]["distill-choice-large"]["run"]))
    assert distill["prerequisites"]["choice"] == m["steps"]["train-choice-large"]["run"]
    assert distill["config"]["problem"] == "mlp" and distill["config"]["pool"] == "large"
    assert _manifest(Path(m["steps"]["distill-none"]["run"]))["scheme"] == "none"
    ev = _manifest(Path(m["steps"]["evaluate"]["run"]))
    assert ev["problems"] == ["mlp"]
    assert {e["optimizer"] for e in ev["entries"]} == {
        "choice-optimizer-large", "choice-large", "rnnprop",
        "sgd", "momentum", "rmsprop", "adam", "addsign", "powersign"}
    assert ev["lrs_source"] == m["steps"]["tune-lr"]["run"]
    rep = Path(m["steps"]["report"]["run"])
    for name in ("report.md", "summary.csv", "table4-cost.md", "table5-evaluation-stability.md",
                 "fig2-baselines.png", "fig3-curves.png", "fig4-stability-performance.png",
                 "fig5-optimization-stability.png"):
        assert (rep / name).is_file(), name
    assert (rep / "fig3-curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "choice-large" in (rep / "report.md").read_text()


def test_rerun_skips_completed_steps(smoke_pipeline, capsys):
    rc, root = smoke_pipeline
    assert rc == 0
    before = _folders(root)
    capsys.readouterr()
    assert main([*ARGS, "--runs-dir", str(root.parent.parent)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith("report.md")
    m = _manifest(root)
    assert all(m["steps"][k]["skipped"] for k in STEPS)
    assert len(m["resumed"]) == 1 and m["status"] == "completed"
    assert _folders(root) == before                     # nothing new was run
    assert "skipped" in " ".join(out.err.split())


def test_failed_step_reruns_with_everything_downstream(smoke_pipeline, capsys):
    _, root = smoke_pipeline
    m = _manifest(root)
    ev_path = Path(m["steps"]["evaluate"]["run"])
    ev = _manifest(ev_path)
    ev["status"] = "failed"
    (ev_path / "manifest.json").write_text(json.dumps(ev))
    assert main([*ARGS, "--runs-dir", str(root.parent.parent)]) == 0
    m2 = _manifest(root)
    for key in STEPS[:4]:
        assert m2["steps"][key]["skipped"] and m2["steps"][key]["run"] == m["steps"][key]["run"]
    assert not m2["steps"]["evaluate"]["skipped"] and not m2["steps"]["report"]["skipped"]
    assert m2["steps"]["evaluate"]["run"] == str(root / "evaluate" / "evaluate-2")
    assert m2["steps"]["report"]["run"] == str(root / "report" / "report-2")
    assert ev_path.is_dir()                             # the failed attempt is kept


def test_interrupted_evaluation_is_resumed_in_place(smoke_pipeline, capsys):
    """An interrupted step continues in its own folder (evaluate --resume), not afresh."""
    import pandas as pd

    _, root = smoke_pipeline
    m = _manifest(root)
    ev_path = Path(m["steps"]["evaluate"]["run"])
    csv = pd.read_csv(ev_path / "evaluations.csv")
    keep = csv[csv.evaluation == 0]                     # the second evaluation "never ran"
    keep.to_csv(ev_path / "evaluations.csv", index=False)
    ev = _manifest(ev_path)
    ev["status"] = "interrupted"
    (ev_path / "manifest.json").write_text(json.dumps(ev))
    assert main([*ARGS, "--runs-dir", str(root.parent.parent)]) == 0
    m2 = _manifest(root)
    rec = m2["steps"]["evaluate"]
    assert rec["resumed"] and rec["run"] == str(ev_path) and rec["status"] == "completed"
    assert _manifest(ev_path)["status"] == "completed"
    done = pd.read_csv(ev_path / "evaluations.csv")
    assert len(done) == len(csv) and set(done.evaluation) == {0, 1}
    # The rows that were kept are untouched (resume ran only the missing cells).
    merged = keep.merge(done, on=["optimizer", "run", "replicate", "evaluation", "problem", "epoch"])
    assert (merged.val_loss_x == merged.val_loss_y).all()
    assert not m2["steps"]["report"]["skipped"]


def test_resume_refuses_different_identity(smoke_pipeline, capsys):
    _, root = smoke_pipeline
    capsys.readouterr()
    assert main([*ARGS, "--runs-dir", str(root.parent.parent), "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "was started with seed=0" in err and "--name" in err


def test_dry_run_plans_without_running(tmp_path, capsys):
    assert main(["pipeline", "--profile", "quick", "--sweep", "full", "--dry-run",
                 "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "distill-choice-large-adv0.001" in out and "distill-minmax-small" in out
    assert not any(tmp_path.iterdir())


def test_bad_step_set_is_a_clear_error(tmp_path, capsys):
    assert main(["pipeline", "--profile", "smoke", "--step-set", "distill-unrolls=3",
                 "--runs-dir", str(tmp_path)]) == 2
    assert "STEP.field=value" in capsys.readouterr().err
    assert main(["pipeline", "--profile", "smoke", "--step-set", "distill.nonsense=3",
                 "--runs-dir", str(tmp_path)]) == 2
    assert "nonsense" in capsys.readouterr().err
