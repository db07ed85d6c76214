"""Terminal output: one rich console and progress bars, quiet when not a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True, highlight=False)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with count, elapsed time and ETA (rendered on stderr)."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=transient, disable=disable)


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}")


def out(msg: str) -> None:
    """Results on stdout (so they can be piped)."""
    print(msg, file=sys.stdout, flush=True)
