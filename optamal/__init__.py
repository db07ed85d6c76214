"""optamal: optimizer amalgamation.

Distils a pool of analytical optimizers (SGD, Momentum, RMSProp, Adam, AddSign,
PowerSign) into one learned, coordinate-wise LSTM optimizer (RNNProp).

The package import is deliberately light: torch is imported only by the modules
that need it, so ``optamal --help`` answers instantly.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
