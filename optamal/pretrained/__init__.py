"""The pretrained amalgamated policy shipped with the package (when present).

``AmalgamatedOptimizer(params)`` without a ``policy`` loads ``default.pt`` from this
folder. Its provenance (commands, seeds, wall time) is recorded in README.md here, with
the distill run's manifest (``manifest.json``) and the tuned teacher rates it was trained
with (``lrs.json``, used by ``optamal evaluate pretrained`` for the teachers).
"""

from __future__ import annotations

from pathlib import Path

from optamal.errors import OptamalError

PRETRAINED_DIR = Path(__file__).parent
DEFAULT_POLICY = PRETRAINED_DIR / "default.pt"


def default_policy_path() -> Path:
    if not DEFAULT_POLICY.is_file():
        raise OptamalError("this optamal build ships no pretrained policy; pass "
                           "policy='runs/distill/<run>/replicate-0/policy.pt'")
    return DEFAULT_POLICY
