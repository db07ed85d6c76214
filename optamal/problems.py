"""The optimizee zoo (METHOD.md §8, paper Table 1) behind one flat-vector interface.

A :class:`Problem` owns an ``nn.Module`` template, an in-memory dataset and a loss,
and exposes the parameters as one flat vector ``theta`` of shape ``(N,)``:

- ``theta0(seed)``: Glorot-uniform weights, zero biases (BatchNorm scales one);
- ``loss_and_grad(theta, batch)``: via ``torch.func.functional_call`` on views that
  unflatten ``theta``; differentiable through ``theta`` when it requires grad;
- ``loss_and_grad_many(thetas, batch)``: K stacked vectors ``(K, N)`` in one batched
  ``torch.func.vmap`` call;
- ``evaluate(theta, split)``: mean loss and accuracy over a whole split;
- ``layout``: per coordinate, the index of its tensor and that tensor's ndim (the choice
  optimizer's one-hot input).

DP-SGD (``mnist-dp``) is a problem setting: per-sample gradients with
``torch.func.vmap(torch.func.grad(...))``, each clipped to norm ``clip``, summed, plus
Gaussian noise of standard deviation ``noise_multiplier · clip``, divided by the batch
size — all inside ``loss_and_grad``, invisible to optimizers.

Plug-in problems: ``--problem my_pkg.my_mod:make_problem`` imports the module and calls
the factory, which returns a :class:`Problem` (or an ``(nn.Module, Dataset)`` pair).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from optamal.data import Dataset, load_dataset
from optamal.errors import OptamalError, choice_error


# --------------------------------------------------------------------------- models
LayerSpec = Sequence[Any]  # (filters, kernel, stride) for a conv, int k for a k×k max-pool


class ConvClassifier(nn.Module):
    """Valid-padding conv stack with ReLU, max-pools, then one dense layer (ref conv_classifier)."""

    def __init__(self, input_shape: tuple[int, int, int], layers: Sequence[LayerSpec | int],
                 num_classes: int):
        super().__init__()
        c, h, w = input_shape
        mods: list[nn.Module] = []
        for spec in layers:
            if isinstance(spec, int):
                mods.append(nn.MaxPool2d(spec))
                h, w = h // spec, w // spec
            else:
                f, k, s = spec
                mods += [nn.Conv2d(c, f, k, stride=s), nn.ReLU()]
                c, h, w = f, (h - k) // s + 1, (w - k) // s + 1
            if h <= 0 or w <= 0:
                raise OptamalError(f"input {input_shape} is too small for this architecture")
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], hidden: Sequence[int], num_classes: int,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        # Batch statistics always (no running buffers): pure functions of theta and the
        # batch, so the problem stays a function of one flat vector (and vmap-able).
        self.bn1 = nn.BatchNorm2d(cin, track_running_stats=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        skip = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + skip


class WideResNet(nn.Module):
    """Pre-activation wide ResNet (depth = 6k + 4); width 1 gives the paper's resnet
    (28 layers) and resnet52."""

    def __init__(self, input_shape: tuple[int, int, int], depth: int, width: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise OptamalError(f"resnet depth must be 6k+4, got {depth}")
        n = (depth - 4) // 6
        chans = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(input_shape[0], chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = chans[0]
        for g, cout in enumerate(chans[1:]):
            for i in range(n):
                blocks.append(_PreActBlock(cin, cout, 2 if (g > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin, track_running_stats=False)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.head(o.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- registry
TRAIN_LAYERS = ((16, 3, 1), 2, (32, 5, 1), 2)
WIDER_LAYERS = ((32, 3, 1), 2, (64, 5, 1), 2)
DEEPER_LAYERS = ((16, 3, 1), (32, 3, 2), (32, 3, 1), (64, 3, 2), (64, 3, 1))


@dataclass(frozen=True)
class ProblemSpec:
    """A named problem of the zoo: architecture, native dataset, batch size, DP."""

    name: str
    dataset: str
    build: Callable[[tuple[int, int, int], int], nn.Module]
    batch_size: int = 128
    dp: tuple[float, float] | None = None   # (clip norm, noise multiplier)
    table_params: int | None = None         # METHOD §8's count (BN statistics included)
    description: str = ""


def _conv(layers):
    return lambda shape, k: ConvClassifier(shape, layers, k)


PROBLEM_SPECS: dict[str, ProblemSpec] = {s.name: s for s in [
    ProblemSpec("train", "mnist", _conv(TRAIN_LAYERS), table_params=18_122,
                description="conv16 3×3 → pool → conv32 5×5 → pool → dense"),
    ProblemSpec("mlp", "mnist", lambda s, k: MLP(s, [20], k), table_params=15_910,
                description="784 → 20 sigmoid → 10"),
    ProblemSpec("wider", "mnist", _conv(WIDER_LAYERS), table_params=61_834,
                description="train with 32/64 filters"),
    ProblemSpec("deeper", "mnist", _conv(DEEPER_LAYERS), table_params=72_042,
                description="5 conv layers"),
    ProblemSpec("fmnist", "fmnist", _conv(TRAIN_LAYERS), table_params=18_122,
                description="train on Fashion-MNIST"),
    ProblemSpec("svhn", "svhn", _conv(TRAIN_LAYERS), table_params=21_290,
                description="train on SVHN (RGB)"),
    ProblemSpec("cifar", "cifar10", _conv(WIDER_LAYERS), table_params=68_170,
                description="wider on CIFAR-10"),
    ProblemSpec("resnet", "cifar10", lambda s, k: WideResNet(s, 28, 1, k), table_params=372_330,
                description="28-layer ResNet on CIFAR-10"),
    ProblemSpec("small-batch", "mnist", _conv(TRAIN_LAYERS), batch_size=32, table_params=18_122,
                description="train with batch 32"),
    ProblemSpec("mnist-dp", "kmnist", _conv(TRAIN_LAYERS), dp=(1.0, 1.1), table_params=18_122,
                description="train on KMNIST with DP-SGD (clip 1.0, noise 1.1)"),
    ProblemSpec("resnet52", "cifar10", lambda s, k: WideResNet(s, 52, 1, k), table_params=763_882,
                description="52-layer ResNet on CIFAR-10"),
    ProblemSpec("resnet52-c100", "cifar100", lambda s, k: WideResNet(s, 52, 1, k),
                description="52-layer ResNet on CIFAR-100"),
]}
PROBLEMS = tuple(PROBLEM_SPECS)

#: Problems whose native data is MNIST-shaped: they run on mnist5k offline.
MNIST_SHAPED = ("train", "mlp", "wider", "deeper", "fmnist", "small-batch", "mnist-dp")


# --------------------------------------------------------------------------- problem
class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    noise_seed: int = 0   # DP noise is a function of this seed: deterministic


class ParamSlot(NamedTuple):
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def glorot_uniform_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keras' glorot_uniform: U(±√(6 / (fan_in + fan_out))), receptive field included."""
    if t.ndim == 2:
        fan_in, fan_out = t.shape[1], t.shape[0]
    else:
        rf = math.prod(t.shape[2:])
        fan_in, fan_out = t.shape[1] * rf, t.shape[0] * rf
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)
    return t


class Problem:
    """An optimizee behind the flat-vector interface (see module docstring)."""

    def __init__(self, name: str, module: nn.Module, dataset: Dataset, batch_size: int = 128,
                 dp: tuple[float, float] | None = None, table_params: int | None = None,
                 device: str = "cpu"):
        self.name = name
        self.module = module.to(device)
        self.dataset = dataset.to(device) if device != "cpu" else dataset
        self.batch_size = int(batch_size)
        self.dp = dp
        self.table_params = table_params
        self.device = device
        slots, offset = [], 0
        for pname, p in module.named_parameters():
            slots.append(ParamSlot(pname, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        self.slots: list[ParamSlot] = slots
        self.n_params = offset
        if self.batch_size > len(dataset.train_y):
            raise OptamalError(
                f"batch size {self.batch_size} exceeds the {len(dataset.train_y)} training examples")
        tensor_index = torch.empty(offset, dtype=torch.long)
        ndim = torch.empty(offset, dtype=torch.long)
        for i, s in enumerate(slots):
            tensor_index[s.offset:s.offset + s.numel] = i
            ndim[s.offset:s.offset + s.numel] = len(s.shape)
        self.tensor_index = tensor_index.to(device)
        self.tensor_ndim = ndim.to(device)

    # -- description -------------------------------------------------------------
    @property
    def bn_statistics(self) -> int:
        """Running-statistic slots Keras counts as parameters (2 per BN channel)."""
        return sum(2 * m.num_features for m in self.module.modules() if isinstance(m, nn.BatchNorm2d))

    @property
    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor_index, self.tensor_ndim

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset.train_y) // self.batch_size

    def describe(self) -> dict[str, Any]:
        return {"problem": self.name, "dataset": self.dataset.name, "n_params": self.n_params,
                "batch_size": self.batch_size, "dp": list(self.dp) if self.dp else None,
                "n_train": len(self.dataset.train_y), "n_val": len(self.dataset.val_y)}

    # -- parameters ----------------------------------------------------------------
    def theta0(self, seed: int) -> torch.Tensor:
        """Initial parameters: Glorot-uniform weights, zero biases, BN scale 1."""
        g = torch.Generator().manual_seed(int(seed))
        parts = []
        for s, (pname, p) in zip(self.slots, self.module.named_parameters()):
            t = torch.zeros(s.shape)
            owner = self.module.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else self.module
            if isinstance(owner, nn.BatchNorm2d):
                if pname.endswith("weight"):
                    t.fill_(1.0)
            elif pname.endswith("weight"):
                glorot_uniform_(t, g)
            parts.append(t.reshape(-1))
        return torch.cat(parts).to(self.device)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: theta[s.offset:s.offset + s.numel].view(s.shape) for s in self.slots}

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    # -- loss and gradient ----------------------------------------------------------
    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(theta, x), y)

    def loss_and_grad(self, theta: torch.Tensor, batch: Batch,
                      create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient at ``theta`` on one batch.

        When ``theta`` requires grad (meta-training) the loss keeps its graph to ``theta``;
        the gradient does too when ``create_graph`` (full second-order meta-gradient),
        otherwise it is a constant (first-order). Else both come back detached."""
        if self.dp is not None:
            if theta.requires_grad:
                raise OptamalError(f"{self.name} (DP-SGD) is an evaluation problem; "
                                   "meta-train on a non-DP problem")
            return self._dp_loss_and_grad(theta, batch)
        if theta.requires_grad:
            loss = self.loss(theta, batch.x, batch.y)
            (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph, retain_graph=True)
            return loss, grad
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss = self.loss(leaf, batch.x, batch.y)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    def _dp_loss_and_grad(self, theta: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        clip, noise_multiplier = self.dp  # type: ignore[misc]
        per_sample = dp_per_sample_grads(self, theta.detach(), batch.x, batch.y)
        grad = clip_and_noise(per_sample, clip, noise_multiplier, batch.noise_seed)
        with torch.no_grad():
            loss = self.loss(theta.detach(), batch.x, batch.y)
        return loss, grad

    def loss_and_grad_many(self, thetas: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """K stacked parameter vectors ``(K, N)`` on the same batch in one vmap-ed call:
        returns losses ``(K,)`` and gradients ``(K, N)`` (detached)."""
        if self.dp is not None:
            out = [self._dp_loss_and_grad(t, batch) for t in thetas]
            return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        fn = torch.func.grad_and_value(lambda th: self.loss(th, batch.x, batch.y))
        grads, losses = torch.func.vmap(fn)(thetas.detach())
        return losses, grads

    # -- data ----------------------------------------------------------------------------
    def epoch_batches(self, seed: int, epoch: int) -> Iterator[Batch]:
        """One shuffled pass over the training split (incomplete last batch dropped)."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        n = len(self.dataset.train_y)
        perm = torch.randperm(n, generator=g).to(self.device)
        bs = self.batch_size
        for i in range(n // bs):
            idx = perm[i * bs:(i + 1) * bs]
            yield Batch(self.dataset.train_x[idx], self.dataset.train_y[idx],
                        noise_seed=(int(seed) * 7919 + epoch) * 100_003 + i)

    def batch_stream(self, seed: int, start_epoch: int = 0) -> Iterator[Batch]:
        """An endless stream of training batches, epoch after epoch."""
        epoch = start_epoch
        while True:
            yield from self.epoch_batches(seed, epoch)
            epoch += 1

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, split: str = "val", chunk: int = 1000) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over a whole split ("val" or "train")."""
        if split == "val":
            x, y = self.dataset.val_x, self.dataset.val_y
        elif split == "train":
            x, y = self.dataset.train_x, self.dataset.train_y
        else:
            raise choice_error("split", split, ("val", "train"))
        theta = theta.detach()
        total, correct = 0.0, 0
        for i in range(0, len(y), chunk):
            logits = self.logits(theta, x[i:i + chunk])
            total += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
        return total / len(y), correct / len(y)


# --------------------------------------------------------------------------- DP-SGD
def dp_per_sample_grads(problem: Problem, theta: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients ``(B, N)`` via ``vmap(grad)``."""

    def one(th, xi, yi):
        return F.cross_entropy(problem.logits(th, xi.unsqueeze(0)), yi.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(theta, x, y)


def clip_and_noise(per_sample: torch.Tensor, clip: float, noise_multiplier: float,
                   noise_seed: int) -> torch.Tensor:
    """DP-SGD: clip each row to norm ``clip``, sum, add N(0, (σ·clip)²), divide by B."""
    norms = per_sample.norm(dim=1, keepdim=True)
    clipped = per_sample * torch.clamp(clip / (norms + 1e-12), max=1.0)
    g = torch.Generator(device="cpu").manual_seed(int(noise_seed) % (2**63))
    noise = torch.randn(per_sample.shape[1], generator=g).to(per_sample.device) * (noise_multiplier * clip)
    return (clipped.sum(0) + noise) / per_sample.shape[0]


# --------------------------------------------------------------------------- factory
def resolve_dataset_name(problem: str, dataset: str | None, profile: str) -> str:
    """The dataset a problem runs on: explicit ``--dataset``; ``native`` or the paper
    profile → the problem's own; else (smoke/quick) mnist5k for MNIST-shaped problems."""
    spec = PROBLEM_SPECS[problem]
    if dataset in (None, "auto"):
        if profile != "paper" and problem in MNIST_SHAPED:
            return "mnist5k"
        return spec.dataset
    if dataset == "native":
        return spec.dataset
    return dataset


def make_problem(name: str, *, dataset: str | None = None, profile: str = "quick",
                 data_root: str | None = None, download: bool = False,
                 batch_size: int | None = None, max_train: int | None = None,
                 max_val: int | None = None, device: str = "cpu") -> Problem:
    """Build a problem of the zoo (or a plug-in ``module:function``)."""
    if ":" in name:
        problem = load_plugin_problem(name, batch_size=batch_size)
    else:
        if name not in PROBLEM_SPECS:
            raise choice_error("problem", name, PROBLEMS + ("module:function",))
        spec = PROBLEM_SPECS[name]
        ds_name = resolve_dataset_name(name, dataset, profile)
        ds = load_dataset(ds_name, data_root, download)
        torch.manual_seed(0)  # the template's own init is never used; keep it deterministic
        module = spec.build(ds.input_shape, ds.num_classes)
        problem = Problem(name, module, ds.subset(max_train, max_val),
                          batch_size or spec.batch_size, dp=spec.dp,
                          table_params=spec.table_params, device=device)
        return problem
    if max_train is not None or max_val is not None or batch_size is not None:
        problem = Problem(problem.name, problem.module, problem.dataset.subset(max_train, max_val),
                          batch_size or problem.batch_size, dp=problem.dp, device=device)
    elif device != "cpu":
        problem = Problem(problem.name, problem.module, problem.dataset, problem.batch_size,
                          dp=problem.dp, device=device)
    return problem


def load_plugin_problem(spec: str, batch_size: int | None = None) -> Problem:
    """Import ``package.module:function`` and call it; it must return a Problem or an
    ``(nn.Module, Dataset)`` pair (built with ``batch_size``, default 128)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise OptamalError(f"invalid plug-in problem {spec!r}: expected 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise OptamalError(f"cannot import plug-in problem module {mod_name!r}: "
                           f"{type(exc).__name__}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise OptamalError(f"plug-in problem {spec!r}: {mod_name} has no callable {fn_name!r}")
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001
        raise OptamalError(f"plug-in problem {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and isinstance(out[1], Dataset):
        out = Problem(spec, out[0], out[1], batch_size or 128)
    if not isinstance(out, Problem):
        raise OptamalError(f"plug-in problem {spec!r} returned {type(out).__name__}; "
                           "expected optamal.problems.Problem or (nn.Module, Dataset)")
    return out
