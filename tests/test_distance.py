import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fsgeom
from fsgeom.data import TensorLoader
from fsgeom.functional import flatten, snapshot, trainable_params, unflatten
from fsgeom.models import mlp

from .reference import ref_kl, ref_l2_distance, ref_parameter_distance


def net(seed, sizes=(6, 5, 4)):
    return mlp(sizes, seed=seed).double()


def bn_net(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 4)
    ).double()
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 6, dtype=torch.float64) * 2 + 1)
    return m


X = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("output", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("reduction", ["rms", "mean_norm"])
def test_l2_distance_equals_loop(output, reduction):
    a, b = net(0), net(1)
    got = fsgeom.l2_distance(a, b, X, output=output, reduction=reduction)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), ref_l2_distance(a, b, X, output, reduction), rel_tol=1e-12)


def test_squared_and_param_dicts():
    a, b = net(0), net(1)
    d = fsgeom.l2_distance(a, b, X)
    d2 = fsgeom.l2_distance(trainable_params(a), snapshot(b), X, squared=True, model=a)
    assert math.isclose(d2.item(), d.item() ** 2, rel_tol=1e-12)
    d3 = fsgeom.l2_distance(a, snapshot(b), X)  # the module supplies the architecture
    assert math.isclose(d3.item(), d.item(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="rms"):
        fsgeom.l2_distance(a, b, X, reduction="mean_norm", squared=True)
    with pytest.raises(ValueError, match="model="):
        fsgeom.l2_distance(snapshot(a), snapshot(b), X)


def test_streaming_equals_one_batch_with_unequal_batches():
    a, b = net(0), net(1)
    for reduction in ("rms", "mean_norm"):
        one = fsgeom.l2_distance(a, b, X, reduction=reduction)
        parts = [X[:2], X[2:10], (X[10:], torch.zeros(3))]
        streamed = fsgeom.l2_distance(a, b, parts, reduction=reduction)
        loader = fsgeom.l2_distance(a, b, TensorLoader(X, batch_size=4), reduction=reduction)
        assert math.isclose(streamed.item(), one.item(), rel_tol=1e-12)
        assert math.isclose(loader.item(), one.item(), rel_tol=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000))
def test_metric_axioms(sa, sb, sc):
    a, b, c = net(sa), net(sb), net(sc)
    for reduction in ("rms", "mean_norm"):
        ab = fsgeom.l2_distance(a, b, X, reduction=reduction).item()
        ba = fsgeom.l2_distance(b, a, X, reduction=reduction).item()
        bc = fsgeom.l2_distance(b, c, X, reduction=reduction).item()
        ac = fsgeom.l2_distance(a, c, X, reduction=reduction).item()
        assert math.isclose(ab, ba, rel_tol=1e-14, abs_tol=1e-300)
        assert ac <= ab + bc + 1e-14
        assert fsgeom.l2_distance(a, a, X, reduction=reduction).item() == 0.0


def test_linearized_agrees_to_second_order():
    torch.manual_seed(0)  # smooth activations: ReLU kinks break the expansion at finite δ
    a = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    p = trainable_params(a)
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(flatten(p).numel(), dtype=torch.float64, generator=g)
    errors = []
    for scale in (1e-2, 1e-3, 1e-4):
        delta = scale * direction
        moved = {k: p[k] + v for k, v in unflatten(delta, p).items()}
        exact = fsgeom.l2_distance(p, moved, X, model=a).item()
        lin = fsgeom.linearized_l2_distance(a, None, delta, X).item()
        errors.append(abs(exact - lin))
    # |exact − linear| = O(|δ|²): each 10× shrink cuts the error ~100×
    assert errors[1] < errors[0] / 70 and errors[2] < errors[1] / 70


def test_linearized_streams_and_accepts_dicts():
    a = net(0)
    p = trainable_params(a)
    delta = {k: torch.full_like(v, 0.01) for k, v in p.items()}
    one = fsgeom.linearized_l2_distance(a, p, delta, X)
    two = fsgeom.linearized_l2_distance(a, flatten(p), flatten(delta), [X[:5], X[5:]])
    assert math.isclose(one.item(), two.item(), rel_tol=1e-12)
    sq = fsgeom.linearized_l2_distance(a, p, delta, X, squared=True)
    assert math.isclose(sq.item(), one.item() ** 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="delta"):
        fsgeom.linearized_l2_distance(a, p, torch.zeros(3), X)


def test_kl_divergence():
    a, b = net(0), net(1)
    got = fsgeom.kl_divergence(a, b, [X[:4], X[4:]])
    assert math.isclose(got.item(), ref_kl(a, b, X), rel_tol=1e-10)
    assert got.item() > 0
    assert abs(fsgeom.kl_divergence(a, copy.deepcopy(a), X).item()) < 1e-15


def test_parameter_distance():
    a, b = net(0), net(1)
    total, per = fsgeom.parameter_distance(a, b, per_tensor=True)
    assert math.isclose(total.item(), ref_parameter_distance(a, b), rel_tol=1e-12)
    assert list(per) == [n for n, _ in a.named_parameters()]
    assert math.isclose(sum(v.item() ** 2 for v in per.values()), total.item() ** 2, rel_tol=1e-12)
    assert fsgeom.parameter_distance(a, snapshot(a)).item() == 0.0


def test_batchnorm_and_dropout_models_are_left_alone_and_deterministic():
    a, b = bn_net(0), bn_net(1)
    state = copy.deepcopy(a.state_dict())
    d1 = fsgeom.l2_distance(a, b, X)
    d2 = fsgeom.l2_distance(a, b, X)
    assert d1.item() == d2.item()  # dropout is off while measuring
    assert a.training and all(m.training for m in a.modules())
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in state.items())
    assert math.isclose(d1.item(), ref_l2_distance(a, b, X), rel_tol=1e-12)
    fsgeom.l2_distance(a, b, X, batch_stats=True)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in state.items())


def test_bad_input():
    a = net(0)
    with pytest.raises(ValueError, match="first differing trainable parameter is '1.weight'"):
        fsgeom.l2_distance(a, mlp((6, 7, 4)).double(), X)
    with pytest.raises(ValueError, match="empty"):
        fsgeom.l2_distance(a, net(1), [])
    with pytest.raises(ValueError, match="batch 1"):
        fsgeom.l2_distance(a, net(1), [X, torch.zeros(3, 5, dtype=torch.float64)])
    broken = net(1)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        fsgeom.l2_distance(a, broken, X, output="logits")
    assert math.isnan(fsgeom.l2_distance(a, broken, X, "logits", check_finite=False).item())
    with pytest.raises(ValueError, match="reduction"):
        fsgeom.l2_distance(a, net(1), X, reduction="mean")
    with pytest.raises(TypeError, match="data"):
        fsgeom.l2_distance(a, net(1), 3.0)


def test_distance_is_differentiable_in_parameter_dicts_only():
    a, b = net(0), net(1)
    assert not fsgeom.l2_distance(a, b, X).requires_grad  # modules: a measurement
    pa = {k: v.clone().requires_grad_() for k, v in trainable_params(a).items()}
    d = fsgeom.l2_distance(pa, b, X)
    (g,) = torch.autograd.grad(d, [pa["1.weight"]])
    eps = 1e-6
    bumped = dict(pa)
    bumped["1.weight"] = pa["1.weight"].detach().clone()
    bumped["1.weight"][0, 0] += eps
    fd = (fsgeom.l2_distance(bumped, b, X) - d) / eps
    assert math.isclose(g[0, 0].item(), fd.item(), rel_tol=1e-4)
    assert all(p.grad is None for p in a.parameters())
