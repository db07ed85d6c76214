"""Configuration: dataclasses with three named profiles.

Every command has a config dataclass. A profile (``smoke`` for tests, ``quick`` for a
CPU demo, ``paper`` for the paper's settings) is a set of overrides of the dataclass
defaults; the command line overrides individual fields on top (explicit flags, or the
generic ``--set field=value``). Profiles scale sizes, never definitions.

Validation happens once, on entry (:meth:`Config.validate`), with one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optamal.errors import OptamalError, choice_error

PROFILES = ("smoke", "quick", "paper")
DEVICES = ("cpu", "cuda", "auto")
POOLS = ("small", "large")

#: METHOD.md §7: the learning-rate grid.
LR_GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _parse_scalar(tp: Any, raw: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _parse_scalar(inner, raw, name)
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = [s for s in raw.replace(";", ",").split(",") if s.strip()]
        return tuple(_parse_scalar(inner, s.strip(), name) for s in items)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
    except ValueError:
        raise OptamalError(f"invalid value {raw!r} for {name}: expected {tp.__name__}") from None
    return raw


@dataclass
class Config:
    """Base class: profile handling, overrides, validation, serialisation."""

    #: field -> value, per profile; subclasses fill it in.
    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {}

    profile: str = "quick"
    seed: int = 0
    device: str = "cpu"
    runs_dir: str = "runs"
    name: str | None = None
    data_root: str | None = None
    download: bool = False

    @classmethod
    def build(cls, profile: str = "quick", overrides: dict[str, Any] | None = None,
              sets: list[str] | None = None) -> "Config":
        """Defaults, then the profile, then explicit overrides, then ``--set k=v`` pairs."""
        if profile not in PROFILES:
            raise choice_error("profile", profile, PROFILES)
        values: dict[str, Any] = dict(cls.PROFILE_OVERRIDES.get(profile, {}))
        values["profile"] = profile
        names = {f.name for f in dataclasses.fields(cls)}
        for key, val in (overrides or {}).items():
            if val is None:
                continue
            if key not in names:
                raise OptamalError(f"unknown config field {key!r}")
            values[key] = val
        for item in sets or []:
            if "=" not in item:
                raise OptamalError(f"--set expects field=value, got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in names:
                raise choice_error("config field", key, sorted(names))
            values[key] = _parse_scalar(_field_type(cls, key), raw.strip(), key)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise choice_error("profile", self.profile, PROFILES)
        if self.device not in DEVICES:
            raise choice_error("device", self.device, DEVICES)
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise OptamalError(f"invalid run name {self.name!r}: use a plain folder name")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    # Small validation helpers shared by subclasses ------------------------------------
    def _pool_and_teachers(self) -> None:
        """``pool`` must name a pool and ``teachers`` (a subset) known teachers."""
        from optamal.rules.teachers import TEACHERS

        if self.pool not in POOLS:
            raise choice_error("pool", self.pool, POOLS)
        for t in self.teachers:
            if t not in TEACHERS:
                raise choice_error("teacher", t, TEACHERS)

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for n in names:
            v = getattr(self, n)
            if v is None:
                continue
            bad = (v < 0) if allow_zero else (v <= 0)
            if bad or (isinstance(v, float) and not math.isfinite(v)):
                need = "≥ 0" if allow_zero else "> 0"
                raise OptamalError(f"{n.replace('_', '-')} must be {need}, got {v}")


def resolve_device(device: str) -> str:
    """Map ``auto`` to cuda when available; refuse ``cuda`` when it is not."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise OptamalError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device


@dataclass
class ProblemSizing(Config):
    """Fields shared by every command that trains optimizees."""

    dataset: str | None = None        # None: the problem's own dataset (mnist5k on smoke/quick)
    batch_size: int | None = None     # None: the problem's own batch size
    max_train: int | None = None      # cap on training examples (smoke sizes)
    max_val: int | None = None        # cap on validation examples
    warmup_steps: int = 100           # METHOD §6: 100 SGD steps ...
    warmup_lr: float = 0.01           # ... at lr 0.01, shared by every optimizer

    def validate(self) -> None:
        super().validate()
        self._positive("batch_size", "max_train", "max_val", "warmup_lr")
        self._positive("warmup_steps", allow_zero=True)


@dataclass
class TuneLRConfig(ProblemSizing):
    """`optamal tune-lr`: grid-search each teacher's learning rate (METHOD §7)."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(epochs=1, grid=(1e-3, 1e-2, 0.1, 1.0), repeats=1, max_train=512,
                      max_val=256, warmup_steps=10),
        "quick": dict(epochs=5, repeats=1),
        "paper": dict(epochs=5, repeats=3, dataset="native"),
    }

    pool: str = "large"
    teachers: tuple[str, ...] = ()   # empty: the whole pool
    problem: str = "train"
    epochs: int = 5
    grid: tuple[float, ...] = LR_GRID
    repeats: int = 1
    workers: int = 0                  # 0: one per available core

    def validate(self) -> None:
        super().validate()
        self._pool_and_teachers()
        self._positive("epochs", "repeats")
        self._positive("workers", allow_zero=True)
        if not self.grid:
            raise OptamalError("--grid must name at least one learning rate")
        for lr in self.grid:
            if not (lr > 0 and math.isfinite(lr)):
                raise OptamalError(f"learning rates in --grid must be positive, got {lr}")


def parse_float_list(raw: str | None, what: str) -> tuple[float, ...] | None:
    """Parse ``"1e-3,1e-2"`` into floats, with a one-line error naming the bad item."""
    if raw is None:
        return None
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise OptamalError(f"invalid number {item!r} in {what}") from None
    return tuple(out)


def parse_name_list(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    return tuple(s.strip() for s in raw.split(",") if s.strip())


__all__ = [
    "Config", "ProblemSizing", "TuneLRConfig", "PROFILES", "DEVICES", "POOLS", "LR_GRID",
    "resolve_device", "parse_float_list", "parse_name_list", "field",
]


META_GRADIENTS = ("full", "first-order")


@dataclass
class MetaConfig(ProblemSizing):
    """Fields shared by ``train-choice`` and ``distill`` (METHOD §5–§6)."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(unrolls=(20,), truncation=10, alphas=(0.2,), max_train=512, max_val=256,
                      warmup_steps=10, validate_every=2, val_trajectories=1, val_unroll=20,
                      min_validations=1, patience=1, max_validations=2, replicates=1,
                      meta_gradient="first-order"),
        "quick": dict(unrolls=(50, 100), truncation=50, alphas=(0.2, 0.1), validate_every=4,
                      val_trajectories=1, val_unroll=100, min_validations=2, patience=2,
                      max_validations=3, replicates=1, meta_gradient="first-order",
                      max_val=500),
        "paper": dict(dataset="native", meta_batch=4, replicates=8),
    }

    pool: str = "small"
    teachers: tuple[str, ...] = ()       # a subset of the pool (e.g. one teacher)
    lrs: str | None = None               # tune-lr run folder / lrs.json, or "paper"; None: latest
    problem: str = "train"
    unrolls: tuple[int, ...] = (100, 200, 500, 1000)
    truncation: int = 100
    alphas: tuple[float, ...] = (0.2, 0.1, 0.05, 0.02)
    meta_batch: int = 1
    meta_lr: float = 1e-3
    clip_ratio: float = 0.1
    meta_gradient: str = "full"
    validate_every: int = 40
    val_trajectories: int = 2
    val_unroll: int = 200
    min_validations: int = 5
    patience: int = 5
    max_validations: int = 20
    random_scaling: bool = True
    max_bad_steps: int = 5
    replicates: int = 1
    resume: str | None = None            # an interrupted run folder to continue

    def validate(self) -> None:
        super().validate()
        self._pool_and_teachers()
        if self.meta_gradient not in META_GRADIENTS:
            raise choice_error("meta-gradient", self.meta_gradient, META_GRADIENTS)
        self._positive("truncation", "meta_batch", "meta_lr", "clip_ratio", "validate_every",
                       "val_trajectories", "val_unroll", "min_validations", "patience",
                       "max_validations", "max_bad_steps", "replicates")
        if not self.unrolls:
            raise OptamalError("--unrolls must name at least one unroll length")
        for u in self.unrolls:
            if u <= 0:
                raise OptamalError(f"unroll lengths must be > 0, got {u}")
            if u % self.truncation:
                raise OptamalError(f"unroll {u} is not divisible by truncation {self.truncation}: "
                                   "make every unroll a multiple of --truncation")
        if len(self.alphas) < len(self.unrolls):
            raise OptamalError(f"--alphas gives {len(self.alphas)} value(s) for "
                               f"{len(self.unrolls)} curriculum stage(s): give one per stage")
        if self.max_validations < self.min_validations:
            raise OptamalError("max-validations must be ≥ min-validations")


@dataclass
class ChoiceConfig(MetaConfig):
    """`optamal train-choice`: the choice optimizer, trained on meta loss alone (METHOD §4)."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = MetaConfig.PROFILE_OVERRIDES
    pool: str = "large"
    #: choice-pool rate = tuned rate × multiplier: a number for every teacher, or "ref" for the
    #: reference per-teacher multipliers (METHOD §4). Default 2: measured on the train problem
    #: (untrained choice net, 200 steps after warmup, quick tuned rates), mean log loss was
    #: −2.17 at 1, −2.29 at 2, +0.84 (dead at chance) at 3 and with "ref" (sgd/addsign/powersign ×10).
    multiplier: str = "2"
    #: Random scaling (METHOD §3) is the RNNProp student's device; the choice optimizer's
    #: teachers must see clean gradients (a scaled problem makes fixed-rate SGD steps up to
    #: e⁶ too large), so it is off here.
    random_scaling: bool = False

    def validate(self) -> None:
        super().validate()
        if self.multiplier != "ref":
            try:
                value = float(self.multiplier)
            except (TypeError, ValueError):
                value = math.nan
            if not (value > 0 and math.isfinite(value)):
                raise OptamalError(f"--multiplier must be a positive number or 'ref', got {self.multiplier!r}")

    def multipliers(self, names: list[str]) -> dict[str, float]:
        from optamal.rules.teachers import CHOICE_MULTIPLIERS

        if self.multiplier == "ref":
            return {t: CHOICE_MULTIPLIERS[t] for t in names}
        return {t: float(self.multiplier) for t in names}


PERTURBATIONS = ("none", "random", "adv", "input")
SCHEMES = ("mean", "minmax", "choice", "none")
POLICIES = ("rnnprop", "dm", "scale")


@dataclass
class DistillConfig(MetaConfig):
    """`optamal distill`: meta-train RNNProp students (METHOD §3, §5, §6)."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = MetaConfig.PROFILE_OVERRIDES
    scheme: str = "choice"
    policy: str = "rnnprop"
    choice: str | None = None            # train-choice run folder or policy.pt; None: latest
    perturb: str = "none"
    magnitude: float | None = None       # None: the perturbation's default
    adv_steps: int = 1

    def validate(self) -> None:
        super().validate()
        if self.scheme not in SCHEMES:
            raise choice_error("scheme", self.scheme, SCHEMES)
        if self.policy not in POLICIES:
            raise choice_error("policy", self.policy, POLICIES)
        if self.perturb not in PERTURBATIONS:
            raise choice_error("perturbation", self.perturb, PERTURBATIONS)
        if self.magnitude is not None and not (self.magnitude > 0 and math.isfinite(self.magnitude)):
            raise OptamalError(f"--magnitude must be > 0, got {self.magnitude}")
        self._positive("adv_steps")
        if self.scheme == "choice" and self.teachers:
            raise OptamalError("--teachers selects distillation targets for --scheme mean|minmax; "
                               "--scheme choice distils the trained choice optimizer")

    @property
    def resolved_magnitude(self) -> float:
        from optamal.meta.perturb import DEFAULT_MAGNITUDE

        if self.perturb == "none":
            return 0.0
        return self.magnitude if self.magnitude is not None else DEFAULT_MAGNITUDE[self.perturb]


@dataclass
class EvaluateConfig(ProblemSizing):
    """`optamal evaluate`: train many problems with learned and analytical optimizers (§9)."""

    PROFILE_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(epochs=1, repeats=2, max_train=512, max_val=256, warmup_steps=10),
        "quick": dict(epochs=3, repeats=3),
        "paper": dict(epochs=25, repeats=10, dataset="native"),
    }

    runs: tuple[str, ...] = ()            # learned runs / replicate folders / policy files / globs
    problems: tuple[str, ...] = ()        # empty: every problem whose data are present
    teachers: str = "auto"                # auto | none | comma-separated names
    lrs: str | None = None                # tune-lr run / lrs.json / "paper"; None: from the runs
    epochs: int = 25
    repeats: int = 10
    workers: int = 0                      # 0: one per core when it pays
    resume: str | None = None             # an interrupted evaluate run folder to complete

    def validate(self) -> None:
        super().validate()
        from optamal.problems import PROBLEMS
        from optamal.rules.teachers import TEACHERS

        self._positive("epochs", "repeats")
        self._positive("workers", allow_zero=True)
        for p in self.problems:
            if p not in PROBLEMS and ":" not in p:
                raise choice_error("problem", p, PROBLEMS)
        if self.teachers not in ("auto", "none"):
            for t in self.teachers.split(","):
                if t.strip() not in TEACHERS:
                    raise choice_error("teacher", t.strip(), ("auto", "none") + TEACHERS)
