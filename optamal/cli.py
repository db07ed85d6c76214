"""The ``optamal`` command line: a thin Typer shell over the command functions.

It parses, builds a validated config, calls the command and prints. It holds no math,
and imports torch only inside commands so that ``optamal --help`` is instant.
User errors (:class:`optamal.errors.OptamalError`, bad flags) print one line and exit 2.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from optamal import __version__
from optamal.errors import OptamalError

app = typer.Typer(
    name="optamal",
    help="Optimizer amalgamation: distil a pool of analytical optimizers into one learned "
         "LSTM optimizer, evaluate it honestly, report it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"optamal {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Optimizer amalgamation."""


# Options shared by every command ------------------------------------------------------
Profile = Annotated[str, typer.Option("--profile", help="Size profile: smoke | quick | paper.")]
Seed = Annotated[int, typer.Option("--seed", help="Base random seed.")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")]
RunsDir = Annotated[str, typer.Option("--runs-dir", help="Root folder of run directories.")]
Name = Annotated[Optional[str], typer.Option("--name", help="Run folder name (default: a timestamp).")]
DataRoot = Annotated[Optional[str], typer.Option(
    "--data-root", help="Dataset folder (default $OPTAMAL_DATA, else ~/.cache/optamal).")]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download missing datasets.")]
Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override any config field: --set field=value (repeatable).")]


def _common(profile, seed, device, runs_dir, name, data_root, download) -> dict:
    return dict(seed=seed, device=device, runs_dir=runs_dir, name=name, data_root=data_root,
                download=download)


@app.command("tune-lr")
def tune_lr_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Teacher pool: small | large.")] = "large",
    problem: Annotated[str, typer.Option("--problem", help="Problem to tune on (or module:function).")] = "train",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Dataset (mnist5k, mnist, fmnist, kmnist, svhn, cifar10, cifar100, native).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs per grid point (default 5).")] = None,
    grid: Annotated[Optional[str], typer.Option("--grid", help="Comma-separated learning rates.")] = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="Repeats per grid point.")] = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", help="Subset of the pool, comma-separated.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (0: one per core).")] = None,
    profile: Profile = "quick", seed: Seed = 0, device: Device = "cpu", runs_dir: RunsDir = "runs",
    name: Name = None, data_root: DataRoot = None, download: Download = False, set_: Sets = None,
) -> None:
    """Grid-search each teacher's learning rate on a problem (METHOD §7)."""
    from optamal.config import TuneLRConfig, parse_float_list, parse_name_list

    cfg = TuneLRConfig.build(profile, dict(
        pool=pool, problem=problem, dataset=dataset, epochs=epochs,
        grid=parse_float_list(grid, "--grid"), repeats=repeats,
        teachers=parse_name_list(teachers), workers=workers,
        **_common(profile, seed, device, runs_dir, name, data_root, download)), set_)
    from optamal.commands.tune_lr import tune_lr

    run = tune_lr(cfg)
    print(run.path)


# Options shared by the meta-training commands -----------------------------------------
Pool = Annotated[str, typer.Option("--pool", help="Teacher pool: small | large.")]
ProblemOpt = Annotated[str, typer.Option("--problem", help="Problem to meta-train on.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="Dataset override (or native).")]
Lrs = Annotated[Optional[str], typer.Option(
    "--lrs", help="Teacher rates: a tune-lr run folder or lrs.json, or 'paper' (default: latest tune-lr run).")]
TeachersOpt = Annotated[Optional[str], typer.Option("--teachers", help="Subset of the pool, comma-separated.")]
Unrolls = Annotated[Optional[str], typer.Option("--unrolls", help="Curriculum unroll lengths, comma-separated.")]
Truncation = Annotated[Optional[int], typer.Option("--truncation", help="Truncation length (steps per meta-gradient).")]
Alphas = Annotated[Optional[str], typer.Option("--alphas", help="Distillation weight per stage, comma-separated.")]
MetaBatch = Annotated[Optional[int], typer.Option("--meta-batch", help="Trajectories per meta-iteration.")]
MetaGradient = Annotated[Optional[str], typer.Option("--meta-gradient", help="full | first-order.")]
Replicates = Annotated[Optional[int], typer.Option("--replicates", help="Independently seeded replicates.")]
ResumeOpt = Annotated[Optional[str], typer.Option(
    "--resume", help="Continue an interrupted run folder from its checkpoints (other options are ignored).")]


def _meta_overrides(pool, problem, dataset, lrs, teachers, unrolls, truncation, alphas,
                    meta_batch, meta_gradient, replicates, resume=None) -> dict:
    from optamal.config import parse_float_list, parse_name_list

    ints = parse_float_list(unrolls, "--unrolls")
    if ints is not None and any(u != int(u) for u in ints):
        raise OptamalError(f"--unrolls must be whole numbers, got {unrolls!r}")
    return dict(pool=pool, problem=problem, dataset=dataset, lrs=lrs,
                teachers=parse_name_list(teachers),
                unrolls=tuple(int(u) for u in ints) if ints is not None else None,
                truncation=truncation, alphas=parse_float_list(alphas, "--alphas"),
                meta_batch=meta_batch, meta_gradient=meta_gradient, replicates=replicates,
                resume=resume)


@app.command("train-choice")
def train_choice_cmd(
    pool: Pool = "large", problem: ProblemOpt = "train", dataset: DatasetOpt = None, lrs: Lrs = None,
    teachers: TeachersOpt = None, unrolls: Unrolls = None, truncation: Truncation = None,
    alphas: Alphas = None, meta_batch: MetaBatch = None, meta_gradient: MetaGradient = None,
    replicates: Replicates = None, resume: ResumeOpt = None,
    multiplier: Annotated[Optional[str], typer.Option(
        "--multiplier", help="Choice-pool rate = tuned rate × this (a number, or 'ref' for the reference "
                             "per-teacher multipliers). Default 2.")] = None,
    profile: Profile = "quick", seed: Seed = 0, device: Device = "cpu", runs_dir: RunsDir = "runs",
    name: Name = None, data_root: DataRoot = None, download: Download = False, set_: Sets = None,
) -> None:
    """Train the choice optimizer (an LSTM mixing the teachers' updates) on meta loss."""
    from optamal.config import ChoiceConfig

    cfg = ChoiceConfig.build(profile, dict(
        **_meta_overrides(pool, problem, dataset, lrs, teachers, unrolls, truncation, alphas,
                          meta_batch, meta_gradient, replicates, resume), multiplier=multiplier,
        **_common(profile, seed, device, runs_dir, name, data_root, download)), set_)
    from optamal.commands.train_choice import train_choice

    run = train_choice(cfg)
    if run.write:
        print(run.path)


@app.command("distill")
def distill_cmd(
    scheme: Annotated[str, typer.Option("--scheme", help="mean | minmax | choice | none.")] = "choice",
    perturb: Annotated[str, typer.Option("--perturb", help="none | random | adv | input.")] = "none",
    magnitude: Annotated[Optional[float], typer.Option(
        "--magnitude", help="Perturbation magnitude (default: random 1e-3, adv 1e-4, input 1e-2).")] = None,
    adv_steps: Annotated[Optional[int], typer.Option("--adv-steps", help="PGD steps for --perturb adv.")] = None,
    choice: Annotated[Optional[str], typer.Option(
        "--choice", help="Choice optimizer (train-choice run or policy.pt); default: latest for the pool.")] = None,
    policy: Annotated[str, typer.Option("--policy", help="Student architecture: rnnprop | dm | scale.")] = "rnnprop",
    pool: Pool = "small", problem: ProblemOpt = "train", dataset: DatasetOpt = None, lrs: Lrs = None,
    teachers: TeachersOpt = None, unrolls: Unrolls = None, truncation: Truncation = None,
    alphas: Alphas = None, meta_batch: MetaBatch = None, meta_gradient: MetaGradient = None,
    replicates: Replicates = None, resume: ResumeOpt = None,
    profile: Profile = "quick", seed: Seed = 0, device: Device = "cpu", runs_dir: RunsDir = "runs",
    name: Name = None, data_root: DataRoot = None, download: Download = False, set_: Sets = None,
) -> None:
    """Meta-train RNNProp students by truncated BPTT on meta loss + distillation loss."""
    from optamal.config import DistillConfig

    cfg = DistillConfig.build(profile, dict(
        scheme=scheme, perturb=perturb, magnitude=magnitude, adv_steps=adv_steps, choice=choice,
        policy=policy,
        **_meta_overrides(pool, problem, dataset, lrs, teachers, unrolls, truncation, alphas,
                          meta_batch, meta_gradient, replicates, resume),
        **_common(profile, seed, device, runs_dir, name, data_root, download)), set_)
    from optamal.commands.distill import distill

    run = distill(cfg)
    if run.write:
        print(run.path)


@app.command("evaluate")
def evaluate_cmd(
    runs: Annotated[Optional[list[str]], typer.Argument(
        help="Learned runs to evaluate: distill/train-choice run folders, replicate folders, policy files, "
             "globs, or 'pretrained' (the policy shipped with optamal).")] = None,
    learned: Annotated[Optional[list[str]], typer.Option(
        "--learned", help="A learned run to evaluate (repeatable); same forms as RUNS, e.g. --learned pretrained.")] = None,
    problems: Annotated[Optional[str], typer.Option(
        "--problems", help="Comma-separated problems (default: every problem whose data are present).")] = None,
    teachers: Annotated[str, typer.Option("--teachers", help="auto | none | comma-separated teachers.")] = "auto",
    lrs: Lrs = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="Evaluations per (optimizer, problem).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs per evaluation.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (0: one per core).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Complete an interrupted evaluate run folder.")] = None,
    dataset: DatasetOpt = None,
    profile: Profile = "quick", seed: Seed = 0, device: Device = "cpu", runs_dir: RunsDir = "runs",
    name: Name = None, data_root: DataRoot = None, download: Download = False, set_: Sets = None,
) -> None:
    """Train problems with the learned optimizers, the teachers and baselines; log per epoch."""
    from optamal.config import EvaluateConfig, parse_name_list

    cfg = EvaluateConfig.build(profile, dict(
        runs=tuple(runs or ()) + tuple(learned or ()), problems=parse_name_list(problems), teachers=teachers,
        lrs=lrs, repeats=repeats, epochs=epochs, workers=workers, resume=resume, dataset=dataset,
        **_common(profile, seed, device, runs_dir, name, data_root, download)), set_)
    from optamal.commands.evaluate import evaluate

    run = evaluate(cfg)
    if run.write:
        print(run.path)


@app.command("report")
def report_cmd(
    source: Annotated[str, typer.Argument(help="Folder searched (any depth) for run directories.")] = "runs",
    out: Annotated[Optional[str], typer.Option(
        "--out", help="Output folder (default: SOURCE/report/<timestamp>).")] = None,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", help="Optimizer Fig. 1 is drawn relative to (default choice-large).")] = None,
    formats: Annotated[Optional[str], typer.Option(
        "--formats", help="Figure formats, comma-separated (png required; default png,pdf).")] = None,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Statistics and tables only.")] = False,
    set_: Sets = None,
) -> None:
    """Statistics (mixed effects, stability), the paper's figures and tables from run folders."""
    from optamal.config import parse_name_list
    from optamal.report_config import ReportConfig

    cfg = ReportConfig.build("quick", dict(source=source, out=out, reference=reference,
                                           formats=parse_name_list(formats),
                                           figures=False if no_figures else None), set_)
    from optamal.commands.report import report

    print(report(cfg).path / "report.md")


@app.command("pipeline")
def pipeline_cmd(
    sweep: Annotated[str, typer.Option(
        "--sweep", help="main: choice + RNNProp baseline; full: also every run Figs. 1 and 6 need.")] = "main",
    pool: Pool = "large",
    lrs: Annotated[Optional[str], typer.Option(
        "--lrs", help="Skip tune-lr and use these teacher rates: a tune-lr run folder, lrs.json "
                      "or 'paper' (default: run tune-lr).")] = None,
    problems: Annotated[Optional[str], typer.Option(
        "--problems", help="Evaluation problems, comma-separated (default: the profile's).")] = None,
    replicates: Replicates = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="Evaluations per (optimizer, problem).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs per evaluation.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (0: auto).")] = None,
    step_set: Annotated[Optional[list[str]], typer.Option(
        "--step-set", help="Override a step's config: STEP.field=value, STEP in tune-lr, "
                           "train-choice, distill, evaluate (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and run nothing.")] = False,
    profile: Profile = "quick", seed: Seed = 0, device: Device = "cpu", runs_dir: RunsDir = "runs",
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Pipeline folder name (default: the profile, so a re-run resumes).")] = None,
    data_root: DataRoot = None, download: Download = False, set_: Sets = None,
) -> None:
    """tune-lr → train-choice → distill → evaluate → report in one resumable folder tree."""
    from optamal.config import parse_name_list
    from optamal.report_config import PipelineConfig

    cfg = PipelineConfig.build(profile, dict(
        sweep=sweep, pool=pool, lrs=lrs, problems=parse_name_list(problems),
        replicates=replicates, repeats=repeats, epochs=epochs, workers=workers,
        step_sets=tuple(step_set or ()), dry_run=dry_run or None,
        **_common(profile, seed, device, runs_dir, name, data_root, download)), set_)
    from optamal.commands.pipeline import pipeline

    pipeline(cfg)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2.

    SIGTERM is handled like Ctrl-C: the run in progress is marked ``interrupted``."""
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:   # not the main thread (embedded use): leave signals alone
        pass
    try:
        finished = False
        try:
            app(args=argv, standalone_mode=False)
            finished = True
        finally:
            _shutdown_distributed(finished)
    except OptamalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except (KeyboardInterrupt, *_ABORT):
        print("interrupted; the run folder keeps what was written (status: interrupted)", file=sys.stderr)
        return 130
    except _USAGE as exc:
        msg = " ".join(exc.format_message().split())
        print(f"error: {msg} (see --help)", file=sys.stderr)
        return 2
    return 0


def _shutdown_distributed(finished: bool) -> None:
    """Under torchrun: leave the process group in order (imports nothing otherwise)."""
    if "optamal.distributed" in sys.modules:
        sys.modules["optamal.distributed"].shutdown(wait=finished)


def _click_classes() -> tuple[tuple, tuple, tuple]:
    """Exit / Abort / usage-error classes of whichever click Typer was built on
    (Typer ≥ 0.2x vendors its own copy; older releases use the click package)."""
    exits, aborts, usage = [typer.Exit], [typer.Abort], [typer.BadParameter.__mro__[1]]
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        usage.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(exits), tuple(aborts), tuple(usage)


_EXIT, _ABORT, _USAGE = _click_classes()


def entry() -> None:  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry()
