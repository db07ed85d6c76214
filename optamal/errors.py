"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a missing prerequisite run)
raises :class:`OptamalError`. The CLI prints its message on one line and exits with
code 2, without a traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

from typing import Iterable


class OptamalError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    exit_code = 2


class UnsafeFileError(OptamalError):
    """A tensor file that carries more than tensors (pickled code): never loaded, never
    skipped over silently."""


def choice_error(what: str, value: object, accepted: Iterable[object]) -> OptamalError:
    """Error for a value outside an enumerated set, naming the accepted values."""
    accepted_s = ", ".join(str(a) for a in accepted)
    return OptamalError(f"unknown {what} {value!r}; accepted: {accepted_s}")
