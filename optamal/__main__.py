"""``python -m optamal`` (and ``torchrun -m optamal``)."""

from optamal.cli import entry

entry()
