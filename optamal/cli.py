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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
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
