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
