"""docs/api.md's examples run as written (with a real policy file in place of the placeholder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from optamal.rules.lstm import save_policy
from optamal.rules.rnnprop import RNNPropNet

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
PLACEHOLDER = "runs/distill/<run>/replicate-0/policy.pt"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", API_MD.read_text(), flags=re.S | re.M)


def _block_with(text: str) -> str:
    blocks = [b for b in _python_blocks() if text in b and PLACEHOLDER in b]
    assert len(blocks) == 1, f"expected one python block with {text!r} and the policy placeholder"
    return blocks[0]


@pytest.fixture
def policy(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "replicate-0" / "policy.pt"
    path.parent.mkdir()
    save_policy(path, RNNPropNet(), {"kind": "rnnprop", "hidden": 20})
    return str(path)


def test_optimizer_example_runs(policy, capsys):
    code = _block_with("AmalgamatedOptimizer(")
    assert len(code.strip().splitlines()) <= 15
    ns: dict = {}
    exec(compile(code.replace(PLACEHOLDER, policy), str(API_MD), "exec"), ns)
    from optamal import AmalgamatedOptimizer

    assert isinstance(ns["opt"], AmalgamatedOptimizer) and ns["opt"].policy_file == policy
    assert ns["opt"].state[next(ns["model"].parameters())]["step"].item() == 5 * 8   # every batch stepped
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in printed] == [f"epoch {e}" for e in range(5)]
    assert all(torch.isfinite(p).all() for p in ns["model"].parameters())


def test_engine_example_runs(policy, mnist5k_root, monkeypatch, capsys):
    monkeypatch.setenv("OPTAMAL_DATA", str(mnist5k_root))   # make_problem's default data root
    code = _block_with("train_epochs(")
    ns: dict = {}
    exec(compile(code.replace(PLACEHOLDER, policy), str(API_MD), "exec"), ns)
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in printed] == ["adam", "rnnprop"]
    assert len(ns["records"]) == 2 and not any(r.diverged for r in ns["records"])


def test_readme_training_loop_block_runs_with_the_shipped_policy():
    # README's "Use it in your training loop": the three lines, as written, on a model.
    readme = (API_MD.parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your training loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    ns = dict(model=model, loss_fn=torch.nn.functional.cross_entropy,
              x=torch.randn(8, 4), y=torch.randint(0, 2, (8,)))
    exec(compile(blocks[0], "README.md", "exec"), ns)
    from optamal.pretrained import DEFAULT_POLICY

    assert ns["opt"].policy_file == str(DEFAULT_POLICY)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_pretrained_results_doc_is_the_report_of_enough_evaluations():
    # Issue 6's evidence: the tool's summary.md for the shipped policy on ≥ 5 mnist5k
    # problems with ≥ 5 evaluations each, compared with Adam and the oracle.
    doc = (API_MD.parent / "pretrained-results.md").read_text()
    assert doc.startswith("# Summary")
    rows = [ln.split("|")[1:-1] for ln in doc.splitlines() if ln.startswith("| ")]
    summary = [[c.strip() for c in r] for r in rows if len(r) == 12 and r[0].strip() != "problem"]
    pre = {r[0]: r for r in summary if r[1] == "pretrained"}
    assert len(pre) >= 5 and all(int(r[9]) >= 5 for r in pre.values())
    assert {r[0] for r in summary if r[1].split()[0] == "adam"} >= set(pre)
    assert {r[0] for r in summary if r[1].endswith("(oracle)")} >= set(pre)
    comp = [[c.strip() for c in r] for r in rows if len(r) == 8 and r[0].strip() == "pretrained"]
    assert {(r[1].split()[0], r[2]) for r in comp} == {(role, p) for role in ("adam", "oracle") for p in pre}
