"""Learned rules on disk: build, save and load RNNProp students and choice optimizers.

A policy file's JSON header says what rule its weights belong to (``kind``, hidden size,
teachers and rates for a choice optimizer, how it was trained); :func:`load_rule`
rebuilds the rule for a given problem from the header alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optamal.errors import OptamalError
from optamal.rules.choice import Choice, ChoiceNet
from optamal.rules.lstm import load_into, read_policy
from optamal.rules.baselines import DM, DMNet, Scale, ScaleNet
from optamal.rules.rnnprop import RNNProp, RNNPropNet

KINDS = ("rnnprop", "dm", "scale", "choice")


def build_net(header: dict[str, Any]) -> torch.nn.Module:
    kind = header.get("kind")
    hidden = int(header.get("hidden", 20))
    if kind == "rnnprop":
        return RNNPropNet(hidden)
    if kind == "dm":
        return DMNet(hidden)
    if kind == "scale":
        return ScaleNet(timescales=int(header.get("timescales", 3)))
    if kind == "choice":
        return ChoiceNet(len(header["teachers"]), hidden)
    raise OptamalError(f"unknown policy kind {kind!r}; accepted: {', '.join(KINDS)}")


def make_rule(net: torch.nn.Module, header: dict[str, Any], layout=None,
              params=None, input_noise: float = 0.0, generator=None):
    """The rule of ``header['kind']`` around ``net``. ``layout`` is the problem's
    ``(tensor_index, tensor_ndim)`` pair (``problem.layout``; a bare ``tensor_ndim`` tensor
    is accepted for the choice optimizer): the choice optimizer needs the ndims, Scale the
    tensor index; RNNProp and DM need neither."""
    kind = header["kind"]
    if kind == "rnnprop":
        return RNNProp(net, params, input_noise, generator)
    if kind == "dm":
        return DM(net, params, input_noise, generator)
    if layout is None:
        raise OptamalError(f"a {kind} policy needs the problem's tensor layout")
    if isinstance(layout, torch.Tensor):
        if kind == "scale":
            raise OptamalError("a scale policy needs the (tensor_index, tensor_ndim) layout")
        tensor_index, tensor_ndim = None, layout
    else:
        tensor_index, tensor_ndim = layout
    if kind == "scale":
        return Scale(net, tensor_index, params, input_noise, generator)
    return Choice(net, header["teachers"], header["lrs"], tensor_ndim, params)


def load_policy(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(net with weights, header) of a policy file; refuses non-weights content."""
    header, sd = read_policy(path)
    net = build_net(header)
    load_into(net, sd, path)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, header


def load_rule(path: str | Path, layout=None):
    """(rule, header) of a policy file; ``layout`` is ``problem.layout``."""
    net, header = load_policy(path)
    return make_rule(net, header, layout), header


def policy_path(path: str | Path) -> Path:
    """Accept a policy file, a replicate folder, or a run folder (best replicate)."""
    from optamal.runs import read_json

    p = Path(path)
    if p.is_file():
        return p
    if (p / "policy.pt").is_file():
        return p / "policy.pt"
    if (p / "manifest.json").is_file():
        man = read_json(p / "manifest.json", "manifest")
        best = man.get("best_replicate")
        if best is not None and (p / f"replicate-{best}" / "policy.pt").is_file():
            return p / f"replicate-{best}" / "policy.pt"
        reps = sorted(p.glob("replicate-*/policy.pt"))
        if reps:
            return reps[0]
    raise OptamalError(f"no policy.pt found at {p}")
