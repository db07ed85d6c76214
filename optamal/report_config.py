"""Configuration of ``optamal report`` and ``optamal pipeline`` (METHOD §9).

Same conventions as :mod:`optamal.config`: dataclasses with ``smoke``/``quick``/``paper``
profiles, overridable field by field, validated once on entry.

The pipeline's per-step sizes live here too (:data:`PIPELINE_STEP_OVERRIDES`): they are
applied on top of each step's own profile, so that ``pipeline --profile quick`` fits its
time budget without changing what ``distill --profile quick`` means on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from optamal.config import Config, POOLS
from optamal.errors import OptamalError, choice_error

FIGURE_FORMATS = ("png", "pdf", "svg")
SWEEPS = ("main", "full")
PIPELINE_STEP_KINDS = ("tune-lr", "train-choice", "distill", "evaluate", "report")


@dataclass
class ReportConfig(Config):
    """`optamal report`: statistics, figures and tables from run directories (METHOD §9)."""

    source: str = "runs"                  # folder searched (any depth) for run directories
    out: str | None = None                # output folder; None: <source>/report/<timestamp>
    reference: str = "choice-large"       # Fig. 1 is drawn relative to this optimizer
    formats: tuple[str, ...] = ("png", "pdf")
    figures: bool = True                  # False: statistics and tables only (fast)
    confidence: float = 0.95
    min_replicates: int = 5               # below this the CI is a t-interval on replicate means
    smoothing_sigma: float = 2.0          # D.2: Gaussian filter width, in epochs
    max_curves: int = 6                   # problems shown in Fig. 3

    def validate(self) -> None:
        super().validate()
        if not self.formats:
            raise OptamalError("--formats must name at least one figure format")
        for f in self.formats:
            if f not in FIGURE_FORMATS:
                raise choice_error("figure format", f, FIGURE_FORMATS)
        if "png" not in self.formats:
            raise OptamalError("--formats must include png (report.md embeds the PNGs)")
        if not (0.5 < self.confidence < 1.0):
            raise OptamalError(f"confidence must be in (0.5, 1), got {self.confidence}")
        self._positive("min_replicates", "max_curves")
        if not (self.smoothing_sigma > 0 and math.isfinite(self.smoothing_sigma)):
            raise OptamalError(f"smoothing-sigma must be > 0, got {self.smoothing_sigma}")


#: Per profile and step kind, overrides applied on top of that step's own profile.
#: quick: measured on 2 shared CPU cores (see docs/reproducing.md) to keep the whole
#: pipeline within about 30 minutes; smoke: seconds, for the tests.
PIPELINE_STEP_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "tune-lr": dict(grid=(1e-2, 0.1), max_train=256, max_val=128, warmup_steps=4, workers=1),
        "train-choice": dict(max_train=256, max_val=128, warmup_steps=4, val_unroll=10,
                             unrolls=(10,), truncation=5, validate_every=1, max_validations=1),
        "distill": dict(max_train=256, max_val=128, warmup_steps=4, val_unroll=10,
                        unrolls=(10,), truncation=5, validate_every=1, max_validations=1),
        "evaluate": dict(max_train=256, max_val=128, warmup_steps=4, epochs=3, repeats=2,
                         workers=1),
    },
    "quick": {
        # 7 of the 11 rates (every rate chosen on the full grid lies in 1e-2..0.2) × 2 epochs:
        # 14 instead of 55 point-epochs per teacher.
        "tune-lr": dict(grid=(5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5), epochs=2),
        # One curriculum stage of unroll 50, at most 2 validations 3 meta-epochs apart.
        "train-choice": dict(unrolls=(50,), truncation=50, alphas=(0.2,), validate_every=3,
                             min_validations=1, patience=1, max_validations=2, val_unroll=50,
                             val_trajectories=1),
        "distill": dict(unrolls=(50,), truncation=50, alphas=(0.2,), validate_every=3,
                        min_validations=1, patience=1, max_validations=2, val_unroll=50,
                        val_trajectories=1),
        # 3 evaluations × 3 epochs (σ_η needs ≥ 3) on 1,500 of mnist5k's 4,000 training
        # images (evaluation was 45% of a 28-minute run with 2,000).
        "evaluate": dict(epochs=3, repeats=3, max_train=1500),
    },
    "paper": {},
}

#: The evaluation problems per profile (the mnist5k-backed ones on smoke/quick).
PIPELINE_PROBLEMS = {
    "smoke": ("train", "mlp"),
    "quick": ("train", "mlp", "wider", "deeper", "small-batch", "mnist-dp"),
    "paper": (),   # every problem whose data are present (with --download: all)
}


@dataclass
class PipelineConfig(Config):
    """`optamal pipeline`: tune-lr → train-choice → distill → evaluate → report, resumable."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(), "quick": dict(), "paper": dict(),
    }

    sweep: str = "main"                   # main: choice + RNNProp; full: every figure's runs
    pool: str = "large"
    lrs: str | None = None                # skip tune-lr: a tune-lr run / lrs.json / "paper"
    problems: tuple[str, ...] | None = None   # None: the profile's problems
    replicates: int | None = None         # meta-training replicates (None: the profile's)
    repeats: int | None = None            # evaluations per (optimizer, problem)
    epochs: int | None = None             # epochs per evaluation
    workers: int = 0                      # worker processes for tune-lr / evaluate (0: auto)
    step_sets: tuple[str, ...] = ()       # "STEP.field=value" overrides for the steps
    dry_run: bool = False                 # print the plan, run nothing

    def validate(self) -> None:
        super().validate()
        if self.sweep not in SWEEPS:
            raise choice_error("sweep", self.sweep, SWEEPS)
        if self.pool not in POOLS:
            raise choice_error("pool", self.pool, POOLS)
        self._positive("replicates", "repeats", "epochs")
        self._positive("workers", allow_zero=True)
        if self.problems is not None:
            from optamal.problems import PROBLEMS

            for p in self.problems:
                if p not in PROBLEMS and ":" not in p:
                    raise choice_error("problem", p, PROBLEMS)
        for item in self.step_sets:
            step_sets_for(item, check_only=True)

    @property
    def run_name(self) -> str:
        """The pipeline folder name: ``--name``, else the profile (so a re-run resumes)."""
        return self.name or self.profile

    @property
    def resolved_problems(self) -> tuple[str, ...]:
        return self.problems if self.problems is not None else PIPELINE_PROBLEMS[self.profile]


def step_sets_for(item: str, check_only: bool = False) -> tuple[str, str]:
    """Split ``"distill.unrolls=20"`` into ``("distill", "unrolls=20")``."""
    head, sep, rest = item.partition(".")
    if not sep or "=" not in rest or head not in PIPELINE_STEP_KINDS[:-1]:
        raise OptamalError(f"--step-set expects STEP.field=value with STEP one of "
                           f"{', '.join(PIPELINE_STEP_KINDS[:-1])}; got {item!r}")
    return head, rest


__all__ = ["ReportConfig", "PipelineConfig", "PIPELINE_STEP_OVERRIDES", "PIPELINE_PROBLEMS",
           "FIGURE_FORMATS", "SWEEPS", "step_sets_for"]
