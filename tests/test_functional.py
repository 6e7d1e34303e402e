import pytest
import torch
from torch import nn
from torch.func import jvp, vmap

from fsgeom.functional import (
    FunctionView,
    as_params,
    flatten,
    function_view,
    snapshot,
    trainable_params,
    unflatten,
)
from fsgeom.models import cnn_bn, mlp

from .reference import ref_outputs


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 16, 4),
    ).double()


def test_flatten_layout_matches_parameters_to_vector():
    net = mlp((5, 4, 3)).double()
    p = trainable_params(net)
    v = flatten(p)
    assert torch.equal(v, nn.utils.parameters_to_vector(net.parameters()))
    back = unflatten(v, p)
    assert all(torch.equal(back[k], p[k]) for k in p)


def test_frozen_parameters_are_constants():
    net = mlp((5, 4, 3)).double()
    net[1].weight.requires_grad_(False)
    p = trainable_params(net)
    assert "1.weight" not in p and list(p) == ["1.bias", "3.weight", "3.bias"]
    x = torch.randn(7, 5, dtype=torch.float64)
    view = FunctionView(net, "logits")
    assert torch.allclose(view(p, x), net(x))


@pytest.mark.parametrize("output", ["logits", "probs", "log_probs"])
def test_view_matches_per_example_loop(output):
    net = bn_net()
    net.train()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    got = function_view(net, output)(x)
    assert torch.allclose(got, ref_outputs(net, x, output), atol=1e-12)


def test_view_never_mutates_model():
    net = bn_net()
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 4, 4, dtype=torch.float64))  # non-trivial running stats
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    for batch_stats in (False, True):
        view = function_view(net, "probs", batch_stats=batch_stats)
        out = view(x)
        out.sum()  # no backward through the model: .grad stays None
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(rng, torch.get_rng_state())  # dropout consumed no RNG


def test_batch_stats_uses_batch_statistics_without_updating():
    net = bn_net()
    x = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    ref = bn_net()
    ref.load_state_dict(net.state_dict())
    ref.train()
    ref[3].eval()  # dropout off, BatchNorm on batch statistics
    expected = ref(x)
    before = net[1].running_mean.clone()
    got = function_view(net, "logits", batch_stats=True)(x)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.equal(net[1].running_mean, before)
    assert int(net[1].num_batches_tracked) == 0


def test_view_composes_with_vmap_and_jvp():
    net = cnn_bn(width=2, image_size=8).double()
    view = function_view(net, "probs")
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    p = view.params
    per_example = vmap(lambda xi: view(p, xi[None])[0])(x)
    assert torch.allclose(per_example, view(p, x), atol=1e-12)
    t = {k: torch.randn_like(v) for k, v in p.items()}
    _, jt = jvp(lambda q: view(q, x), (p,), (t,))
    eps = 1e-6
    plus = {k: p[k] + eps * t[k] for k in p}
    minus = {k: p[k] - eps * t[k] for k in p}
    fd = (view(plus, x) - view(minus, x)) / (2 * eps)
    assert torch.allclose(jt, fd, atol=1e-7)


def test_snapshot_is_detached_copy():
    net = mlp((3, 2)).double()
    s = snapshot(net)
    with torch.no_grad():
        net[1].weight.add_(1.0)
    assert not torch.equal(s["1.weight"], net[1].weight)


def test_as_params_errors_name_expected_size():
    p = trainable_params(mlp((3, 2)))
    with pytest.raises(ValueError, match="8 elements"):
        as_params(torch.zeros(5), p, "delta")
    with pytest.raises(ValueError, match="missing"):
        as_params({"1.weight": p["1.weight"]}, p, "delta")
    with pytest.raises(ValueError, match="shape"):
        as_params({"1.weight": torch.zeros(3, 3), "1.bias": p["1.bias"]}, p, "delta")


def test_bad_output_space():
    with pytest.raises(ValueError, match="output must be one of"):
        FunctionView(mlp((3, 2)), "softmax")
    with pytest.raises(TypeError, match="nn.Module"):
        FunctionView(lambda x: x)
