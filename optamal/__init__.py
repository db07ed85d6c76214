"""optamal: optimizer amalgamation.

Distils a pool of analytical optimizers (SGD, Momentum, RMSProp, Adam, AddSign,
PowerSign) into one learned, coordinate-wise LSTM optimizer (RNNProp).

The package import is deliberately light: torch is imported only by the modules
that need it, so ``optamal --help`` answers instantly.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "AmalgamatedOptimizer", "load_policy"]


def __getattr__(name: str):
    # Lazy: importing optamal must not import torch (the CLI starts instantly).
    if name == "AmalgamatedOptimizer":
        from optamal.optim import AmalgamatedOptimizer

        return AmalgamatedOptimizer
    if name == "load_policy":
        from optamal.policies import load_policy

        return load_policy
    raise AttributeError(f"module 'optamal' has no attribute {name!r}")
