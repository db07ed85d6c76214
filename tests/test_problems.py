"""optamal.problems: the optimizee zoo behind the flat-vector interface."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optamal.problems as P
from optamal.errors import OptamalError



# --------------------------------------------------------------------------- parameter counts
# METHOD §8's table, written out. Keras counts BatchNorm's two running statistics per channel
# as (non-trainable) parameters; our BN uses batch statistics only, so table = trainable + 2·BN.
TABLE = {
    "train": 18_122, "mlp": 15_910, "wider": 61_834, "deeper": 72_042, "fmnist": 18_122,
    "svhn": 21_290, "cifar": 68_170, "resnet": 372_330, "small-batch": 18_122,
    "mnist-dp": 18_122, "resnet52": 763_882,
}
RGB = {"svhn", "cifar", "resnet", "resnet52"}

# Trainable counts by hand (valid padding, conv → ReLU → 2×2 pool):
#   train (1,28,28): conv16 3×3: 16·9+16 = 160 → 26² → pool 13²; conv32 5×5: 32·16·25+32 = 12,832
#     → 9² → pool 4²; dense 4·4·32·10+10 = 5,130.                     160+12,832+5,130 = 18,122
#   mlp: 784·20+20 + 20·10+10 = 15,700 + 210 = 15,910
#   wider: 32·9+32 = 320; 64·32·25+64 = 51,264; 4·4·64·10+10 = 10,250          → 61,834
#   deeper (strides 1,2,1,2,1, 3×3): 160 (→26) + 4,640 (→12) + 9,248 (→10) + 18,496 (→4)
#     + 36,928 (→2) + dense 2·2·64·10+10 = 2,570                                → 72,042
#   svhn (3,32,32): 16·27+16 = 448 (→30→15); 12,832 (→11→5); 5·5·32·10+10 = 8,010 → 21,290
#   cifar (3,32,32) wider: 32·27+32 = 896; 51,264; 5·5·64·10+10 = 16,010        → 68,170
#   resnet 28 (pre-activation, widths 16/32/64, 4 blocks per group, γ,β per BN channel):
#     stem 3→16 3×3: 448
#     16→16 block: BN16 (32) + conv 2,320 + BN16 (32) + conv 2,320 = 4,704; ×4 = 18,816
#     16→32 block: BN16 32 + 4,640 + BN32 64 + 9,248 + 1×1 shortcut 544 = 14,528;
#       32→32 block: 64 + 9,248 + 64 + 9,248 = 18,624; group = 14,528 + 3·18,624 = 70,400
#     32→64 block: BN32 64 + 18,496 + BN64 128 + 36,928 + shortcut 2,112 = 57,728;
#       64→64 block: 128 + 36,928 + 128 + 36,928 = 74,112; group = 57,728 + 3·74,112 = 280,064
#     final BN64 128, head 64·10+10 = 650
#     trainable = 448 + 18,816 + 70,400 + 280,064 + 128 + 650 = 370,506
#     BN channels = 4·32 + (48 + 3·64) + (96 + 3·128) + 64 = 912 → 370,506 + 2·912 = 372,330
#   resnet52 (8 blocks per group): 448 + 8·4,704 + (14,528 + 7·18,624) + (57,728 + 7·74,112)
#     + 128 + 650 = 760,266; BN channels 8·32 + (48 + 7·64) + (96 + 7·128) + 64 = 1,808
#     → 760,266 + 3,616 = 763,882
HAND_TRAINABLE = {"resnet": 370_506, "resnet52": 760_266}
HAND_BN_CHANNELS = {"resnet": 912, "resnet52": 1_808}


def _counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    bn = sum(m.num_features for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return trainable, bn


def test_every_table_problem_is_covered():
    with_table = {n for n, s in P.PROBLEM_SPECS.items() if s.table_params is not None}
    assert with_table == set(TABLE)
    for name, n in TABLE.items():
        assert P.PROBLEM_SPECS[name].table_params == n


@pytest.mark.parametrize("name", sorted(TABLE))
def test_parameter_count_matches_method_table(name):
    shape = (3, 32, 32) if name in RGB else (1, 28, 28)
    module = P.PROBLEM_SPECS[name].build(shape, 10)
    trainable, bn = _counts(module)
    assert trainable + 2 * bn == TABLE[name]
    if name in HAND_TRAINABLE:
        assert trainable == HAND_TRAINABLE[name]
        assert bn == HAND_BN_CHANNELS[name]
    else:
        assert bn == 0


def test_problem_specs_native_datasets_and_settings():
    assert P.PROBLEM_SPECS["mnist-dp"].dataset == "kmnist"
    assert P.PROBLEM_SPECS["mnist-dp"].dp == (1.0, 1.1)
    assert P.PROBLEM_SPECS["small-batch"].batch_size == 32
    assert P.PROBLEM_SPECS["train"].batch_size == 128
    assert P.PROBLEM_SPECS["svhn"].dataset == "svhn"
    assert P.PROBLEM_SPECS["cifar"].dataset == "cifar10"
    assert P.PROBLEM_SPECS["resnet52-c100"].dataset == "cifar100"


# --------------------------------------------------------------------------- flat vector
def reference_train_net(in_ch: int = 1, in_hw: int = 28) -> nn.Module:
    """The "train" architecture written out independently (parameter order as in the table)."""
    hw = ((in_hw - 2) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * hw * hw, 10),
    )


def loaded_reference(theta: torch.Tensor) -> nn.Module:
    net = reference_train_net()
    torch.nn.utils.vector_to_parameters(theta.detach().clone(), net.parameters())
    return net


@pytest.fixture(scope="module")
def train_problem(mnist5k_root):
    return P.make_problem("train", max_train=256, max_val=128, data_root=str(mnist5k_root))


def _batch(problem, n=32, start=0, noise_seed=0):
    ds = problem.dataset
    return P.Batch(ds.train_x[start:start + n], ds.train_y[start:start + n], noise_seed)


def test_train_problem_basics(train_problem):
    p = train_problem
    assert p.n_params == 18_122
    assert p.dataset.name == "mnist5k"
    assert len(p.dataset.train_y) == 256 and len(p.dataset.val_y) == 128
    assert p.batch_size == 128
    assert p.steps_per_epoch == 2
    assert p.describe()["n_params"] == 18_122


def test_theta0_deterministic_and_seed_dependent(train_problem):
    p = train_problem
    a, b, c = p.theta0(0), p.theta0(0), p.theta0(1)
    assert a.shape == (18_122,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().max() > 0.01


def test_theta0_glorot_weights_zero_biases(train_problem):
    p = train_problem
    theta = p.theta0(3)
    views = p.unflatten(theta)
    names = [s.name for s in p.slots]
    assert len(names) == 6
    for name, t in views.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(t) == 0, name
            continue
        if t.ndim == 4:   # conv (out, in, kh, kw): fans include the receptive field
            rf = t.shape[2] * t.shape[3]
            fan_in, fan_out = t.shape[1] * rf, t.shape[0] * rf
        else:             # dense (out, in)
            fan_in, fan_out = t.shape[1], t.shape[0]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert t.abs().max() <= bound, name
        # actually uniform over the whole interval, not a narrower init
        assert t.abs().max() > 0.9 * bound, name
        if t.numel() >= 1000:  # U(-b, b) has std b/√3; 1,000+ samples → within ~5%
            assert abs(t.std().item() - bound / math.sqrt(3)) < 0.07 * bound / math.sqrt(3), name
    # the 3×3 conv of 1→16 channels: fan_in 9, fan_out 144 → bound √(6/153)
    assert views[names[0]].abs().max() <= math.sqrt(6 / 153)


def test_unflatten_gives_shaped_views(train_problem):
    p = train_problem
    theta = p.theta0(0).clone()
    views = p.unflatten(theta)
    expect = [(16, 1, 3, 3), (16,), (32, 16, 5, 5), (32,), (10, 512), (10,)]
    assert [tuple(v.shape) for v in views.values()] == expect
    assert [tuple(pp.shape) for pp in p.module.parameters()] == expect
    assert sum(v.numel() for v in views.values()) == theta.numel()
    # views, not copies: writing through theta shows up in the view
    theta[144] = 123.0  # the first conv bias starts right after its 16·9 weights
    assert views[list(views)[1]][0].item() == 123.0
    assert torch.equal(p.flatten(list(views.values())), theta)


def test_loss_and_grad_matches_plain_module(train_problem):
    p = train_problem
    theta = p.theta0(7)
    batch = _batch(p, 32)
    loss, grad = p.loss_and_grad(theta, batch)
    assert grad.shape == theta.shape
    assert loss.grad_fn is None and grad.grad_fn is None
    net = loaded_reference(theta)
    ref_loss = F.cross_entropy(net(batch.x), batch.y)
    ref_loss.backward()
    ref_grad = torch.nn.utils.parameters_to_vector([q.grad for q in net.parameters()])
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert grad.abs().sum() > 0


def test_evaluate_matches_manual_cross_entropy(train_problem):
    p = train_problem
    theta = p.theta0(2)
    net = loaded_reference(theta)
    for split, x, y in (("val", p.dataset.val_x, p.dataset.val_y),
                        ("train", p.dataset.train_x, p.dataset.train_y)):
        loss, acc = p.evaluate(theta, split)
        with torch.no_grad():
            logits = net(x)
        assert 0.0 <= acc <= 1.0
        assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
        # chunking that does not divide the split changes nothing
        loss2, acc2 = p.evaluate(theta, split, chunk=50)
        assert loss2 == pytest.approx(loss, rel=1e-6) and acc2 == acc
    assert isinstance(loss, float) and isinstance(acc, float)
    with pytest.raises(OptamalError, match="split"):
        p.evaluate(theta, "test")


def test_loss_and_grad_many_matches_separate_calls(train_problem):
    p = train_problem
    thetas = torch.stack([p.theta0(s) for s in (0, 1, 2)])
    batch = _batch(p, 16, start=40)
    losses, grads = p.loss_and_grad_many(thetas, batch)
    assert losses.shape == (3,) and grads.shape == (3, p.n_params)
    for k in range(3):
        loss, grad = p.loss_and_grad(thetas[k], batch)
        assert torch.allclose(losses[k], loss, atol=1e-5)
        assert torch.allclose(grads[k], grad, atol=1e-5)
    assert not torch.allclose(grads[0], grads[1])


def test_layout(train_problem):
    p = train_problem
    index, ndim = p.layout
    assert index.shape == (p.n_params,) and ndim.shape == (p.n_params,)
    assert index.dtype == torch.long and ndim.dtype == torch.long
    assert set(ndim.tolist()) == {4, 1, 2}
    # tensor sizes in order: 144, 16, 12,800, 32, 5,120, 10
    sizes = [144, 16, 12_800, 32, 5_120, 10]
    assert torch.bincount(index).tolist() == sizes
    expect_ndim = torch.cat([torch.full((n,), d) for n, d in zip(sizes, [4, 1, 4, 1, 2, 1])])
    assert torch.equal(ndim, expect_ndim)
    assert torch.equal(index, torch.repeat_interleave(torch.arange(6), torch.tensor(sizes)))


def _row_ids(problem, x):
    lookup = {r.numpy().tobytes(): i for i, r in enumerate(problem.dataset.train_x.reshape(len(problem.dataset.train_x), -1))}
    assert len(lookup) == len(problem.dataset.train_x)  # distinct images: ids are well defined
    return [lookup[r.numpy().tobytes()] for r in x.reshape(len(x), -1)]


def test_epoch_batches_deterministic_and_without_repeats(mnist5k_root):
    p = P.make_problem("train", max_train=256, max_val=128, batch_size=48, data_root=str(mnist5k_root))
    batches = list(p.epoch_batches(seed=5, epoch=0))
    assert len(batches) == 256 // 48 == 5
    ids = [i for b in batches for i in _row_ids(p, b.x)]
    assert len(ids) == 5 * 48 and len(set(ids)) == len(ids)
    for b in batches:
        assert b.x.shape == (48, 1, 28, 28) and b.y.shape == (48,)
        assert torch.equal(b.y, p.dataset.train_y[_row_ids(p, b.x)])
    again = list(p.epoch_batches(seed=5, epoch=0))
    assert all(torch.equal(a.x, b.x) and a.noise_seed == b.noise_seed for a, b in zip(batches, again))
    other_epoch = [i for b in p.epoch_batches(seed=5, epoch=1) for i in _row_ids(p, b.x)]
    other_seed = [i for b in p.epoch_batches(seed=6, epoch=0) for i in _row_ids(p, b.x)]
    assert other_epoch != ids and other_seed != ids
    assert len({b.noise_seed for b in batches}) == 5
    # the endless stream continues with the next epoch
    stream = p.batch_stream(seed=5)
    first = [next(stream) for _ in range(6)]
    assert torch.equal(first[5].x, next(iter(p.epoch_batches(5, 1))).x)


# --------------------------------------------------------------------------- create_graph
def test_create_graph_gives_second_order_gradient(train_problem):
    p = train_problem
    batch = _batch(p, 16)
    theta = p.theta0(0).clone().requires_grad_(True)
    loss, grad = p.loss_and_grad(theta, batch, create_graph=True)
    assert loss.requires_grad and grad.requires_grad and grad.grad_fn is not None
    (hvp,) = torch.autograd.grad(grad.sum(), theta)
    assert hvp.shape == theta.shape
    assert hvp.abs().sum() > 0
    assert torch.isfinite(hvp).all()

    theta2 = p.theta0(0).clone().requires_grad_(True)
    loss2, grad2 = p.loss_and_grad(theta2, batch, create_graph=False)
    assert grad2.grad_fn is None and not grad2.requires_grad
    assert loss2.grad_fn is not None  # the loss still reaches theta (first-order meta-gradient)
    assert torch.allclose(grad2, grad.detach(), atol=1e-6)


# --------------------------------------------------------------------------- DP-SGD
@pytest.fixture(scope="module")
def dp_problem(mnist5k_root):
    return P.make_problem("mnist-dp", max_train=256, max_val=64, data_root=str(mnist5k_root))


def test_dp_problem_settings(dp_problem):
    assert dp_problem.dp == (1.0, 1.1)
    assert dp_problem.n_params == 18_122
    assert dp_problem.dataset.name == "mnist5k"  # MNIST-shaped: offline stand-in for KMNIST


def test_dp_per_sample_grads_match_one_at_a_time(dp_problem):
    p = dp_problem
    theta = p.theta0(4)
    x, y = p.dataset.train_x[:6], p.dataset.train_y[:6]
    per = P.dp_per_sample_grads(p, theta, x, y)
    assert per.shape == (6, p.n_params)
    net = loaded_reference(theta)
    for i in range(6):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.nn.utils.parameters_to_vector([q.grad for q in net.parameters()])
        assert torch.allclose(per[i], ref, atol=1e-6, rtol=1e-5), i
    # the mean of per-sample gradients is the batch gradient
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    batch_grad = torch.nn.utils.parameters_to_vector([q.grad for q in net.parameters()])
    assert torch.allclose(per.mean(0), batch_grad, atol=1e-6)


def test_clip_without_noise():
    gen = torch.Generator().manual_seed(0)
    per = torch.randn(5, 40, generator=gen)
    scales = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0])
    per = per / per.norm(dim=1, keepdim=True) * scales[:, None]  # row norms 0.01 … 10
    out = P.clip_and_noise(per, clip=1.0, noise_multiplier=0.0, noise_seed=0)
    # clipped by hand: rows of norm > 1 rescaled to norm 1, others untouched
    expect = torch.zeros(40)
    for r in per:
        n = r.norm()
        expect += r if n <= 1.0 else r / n
    assert torch.allclose(out * 5, expect, atol=1e-6)
    # one row below the clip norm comes back unchanged; one above has norm exactly clip
    small = per[2:3]
    assert torch.allclose(P.clip_and_noise(small, 1.0, 0.0, 0), small[0], atol=1e-7)
    big = per[4:5]
    clipped = P.clip_and_noise(big, 1.0, 0.0, 0)
    assert clipped.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(clipped, big[0] / 10.0, atol=1e-6)
    # another clip norm
    clipped2 = P.clip_and_noise(big, 2.5, 0.0, 0)
    assert clipped2.norm().item() == pytest.approx(2.5, abs=1e-5)


@pytest.mark.parametrize("clip,sigma,B", [(1.0, 1.1, 4), (2.0, 0.5, 8)])
def test_noise_scale(clip, sigma, B):
    # Zero per-sample gradients: the output is pure noise N(0, (σ·clip)²)/B per coordinate.
    # With n = 200,000 coordinates the sample std has relative standard error 1/√(2n) ≈ 0.16%,
    # so a 1% tolerance is > 6 standard errors (and a wrong factor, e.g. missing /B or ·clip,
    # is off by ≥ 2×). The mean has standard error std/√n; 6 of those bound it.
    n = 200_000
    out = P.clip_and_noise(torch.zeros(B, n), clip=clip, noise_multiplier=sigma, noise_seed=123)
    expect_std = sigma * clip / B
    assert out.std().item() == pytest.approx(expect_std, rel=0.01)
    assert abs(out.mean().item()) < 6 * expect_std / math.sqrt(n)


def test_noise_is_a_function_of_the_seed():
    zeros = torch.zeros(3, 1000)
    a = P.clip_and_noise(zeros, 1.0, 1.1, noise_seed=42)
    b = P.clip_and_noise(zeros, 1.0, 1.1, noise_seed=42)
    c = P.clip_and_noise(zeros, 1.0, 1.1, noise_seed=43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().sum() > 0


def test_dp_loss_and_grad_deterministic_per_noise_seed(dp_problem):
    p = dp_problem
    theta = p.theta0(0)
    x, y = p.dataset.train_x[:8], p.dataset.train_y[:8]
    l1, g1 = p.loss_and_grad(theta, P.Batch(x, y, noise_seed=11))
    l2, g2 = p.loss_and_grad(theta, P.Batch(x, y, noise_seed=11))
    l3, g3 = p.loss_and_grad(theta, P.Batch(x, y, noise_seed=12))
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    assert not torch.allclose(g1, g3)
    assert torch.equal(l1, l3)  # the loss itself is not noised
    # g = (Σ clipped per-sample grads + noise)/B, with the noise of clip_and_noise on zeros
    net = loaded_reference(theta)
    clipped_sum = torch.zeros(p.n_params)
    for i in range(8):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        gi = torch.nn.utils.parameters_to_vector([q.grad for q in net.parameters()])
        clipped_sum += gi * min(1.0, 1.0 / gi.norm().item())
    noise = P.clip_and_noise(torch.zeros(8, p.n_params), 1.0, 1.1, noise_seed=11)
    assert torch.allclose(g1, clipped_sum / 8 + noise, atol=1e-5)
    # the noise is the clip·σ/B-scaled part, large compared with the clipped mean here
    assert noise.std().item() == pytest.approx(1.1 / 8, rel=0.05)
    # K stacked copies: the same as one at a time
    losses, grads = p.loss_and_grad_many(torch.stack([theta, theta]), P.Batch(x, y, 11))
    assert torch.allclose(grads[1], g1, atol=1e-6) and torch.allclose(losses[0], l1)


def test_dp_problem_refuses_meta_training(dp_problem):
    theta = dp_problem.theta0(0).requires_grad_(True)
    batch = P.Batch(dp_problem.dataset.train_x[:4], dp_problem.dataset.train_y[:4])
    with pytest.raises(OptamalError, match="DP"):
        dp_problem.loss_and_grad(theta, batch)


# --------------------------------------------------------------------------- plug-ins
PLUGIN_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from optamal.data import Dataset
    from optamal.problems import Problem

    CALLS = []

    def _data():
        g = torch.Generator().manual_seed(0)
        return Dataset("rand", torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g),
                       torch.rand(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g), 3)

    def _net():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3))

    def factory():
        CALLS.append(1)
        return Problem("tiny", _net(), _data(), batch_size=8)

    def pair():
        return _net(), _data()

    def returns_42():
        return 42

    def explodes():
        raise ValueError("kaboom")

    not_callable = 3
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymod", raising=False)
    yield
    sys.modules.pop("mymod", None)


def test_plugin_problem(plugin):
    p = P.make_problem("mymod:factory")
    assert isinstance(p, P.Problem)
    assert sys.modules["mymod"].CALLS == [1]
    assert p.name == "tiny" and p.batch_size == 8
    assert p.n_params == 16 * 5 + 5 + 5 * 3 + 3
    theta = p.theta0(0)
    loss, grad = p.loss_and_grad(theta, next(iter(p.epoch_batches(0, 0))))
    assert grad.shape == (p.n_params,) and torch.isfinite(loss)
    assert p.steps_per_epoch == 5
    loss_v, acc = p.evaluate(theta)
    assert 0.0 <= acc <= 1.0 and loss_v > 0
    # size limits apply to plug-ins too
    small = P.make_problem("mymod:factory", max_train=16, max_val=4, batch_size=4)
    assert len(small.dataset.train_y) == 16 and len(small.dataset.val_y) == 4
    assert small.batch_size == 4 and small.steps_per_epoch == 4


def test_plugin_returning_module_and_dataset(plugin):
    p = P.make_problem("mymod:pair", batch_size=10)
    assert isinstance(p, P.Problem) and p.n_params == 16 * 5 + 5 + 5 * 3 + 3 and p.batch_size == 10
    assert p.steps_per_epoch == 4
    # without --batch-size the default 128 exceeds the 40 examples: a clear user error
    with pytest.raises(OptamalError, match="batch size 128 exceeds the 40"):
        P.make_problem("mymod:pair")


@pytest.mark.parametrize("spec,fragments", [
    ("nocolon", ["nocolon", "accepted", "train", "module:function"]),
    ("missing_mod:f", ["missing_mod"]),
    ("mymod:not_there", ["mymod", "not_there"]),
    ("mymod:not_callable", ["not_callable"]),
    ("mymod:returns_42", ["int", "Problem"]),
    ("mymod:explodes", ["explodes", "kaboom"]),
    (":factory", ["module:function"]),
    ("mymod:", ["module:function"]),
])
def test_bad_plugin_specs(plugin, spec, fragments):
    with pytest.raises(OptamalError) as info:
        P.make_problem(spec)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)


# --------------------------------------------------------------------------- --dataset
def test_dataset_override_mnist5k(mnist5k_root):
    p = P.make_problem("wider", dataset="mnist5k", max_train=256, max_val=64,
                       data_root=str(mnist5k_root))
    assert p.dataset.name == "mnist5k"
    assert p.n_params == 61_834
    assert p.module.features[0].in_channels == 1
    loss, acc = p.evaluate(p.theta0(0))
    assert 0.0 <= acc <= 1.0 and math.isfinite(loss)


def test_dataset_override_cifar10(fake_cifar10):
    root, arrays = fake_cifar10
    p = P.make_problem("train", dataset="cifar10", data_root=str(root))
    assert p.dataset.name == "cifar10"
    assert p.dataset.input_shape == (3, 32, 32)
    assert p.module.features[0].in_channels == 3
    assert p.n_params == 21_290  # the svhn architecture count (32×32×3)
    assert len(p.dataset.train_y) == len(arrays["train_y"])
    batch = next(iter(p.epoch_batches(0, 0)))
    assert batch.x.shape == (128, 3, 32, 32)
    loss, grad = p.loss_and_grad(p.theta0(0), batch)
    assert grad.shape == (21_290,) and torch.isfinite(loss)


def test_dataset_resolution_by_profile():
    assert P.resolve_dataset_name("train", None, "quick") == "mnist5k"
    assert P.resolve_dataset_name("train", None, "paper") == "mnist"
    assert P.resolve_dataset_name("mnist-dp", "native", "quick") == "kmnist"
    assert P.resolve_dataset_name("svhn", None, "quick") == "svhn"
    assert P.resolve_dataset_name("train", "cifar10", "paper") == "cifar10"


def test_batch_larger_than_training_set_is_a_user_error(mnist5k_root):
    with pytest.raises(OptamalError, match="batch size"):
        P.make_problem("train", max_train=64, data_root=str(mnist5k_root))


# --------------------------------------------------------------------------- unknown names
def test_unknown_problem_lists_names():
    with pytest.raises(OptamalError) as info:
        P.make_problem("imagenet-resnet")
    msg = str(info.value)
    assert "imagenet-resnet" in msg
    for n in ("train", "mlp", "wider", "deeper", "fmnist", "svhn", "cifar", "resnet",
              "small-batch", "mnist-dp", "resnet52", "resnet52-c100"):
        assert n in msg
