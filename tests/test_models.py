import pytest
import torch

from fsgeom.models import build, cnn_bn, mlp, squeezenet


def test_models_are_deterministic_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    for make in (mlp, cnn_bn, squeezenet):
        a, b = make(seed=3), make(seed=3)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        c = make(seed=4)
        assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert torch.equal(state, torch.get_rng_state())


def test_shapes_and_sizes():
    net = mlp()
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [90, 50, 10]
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) == 784 * 90 + 90 + 90 * 50 + 50 + 510
    assert cnn_bn()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert squeezenet().eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build("mlp", (1, 8, 8))(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert build("cnn_bn", (1, 8, 8))(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes"):
        mlp((10,))
    with pytest.raises(ValueError, match="image_size"):
        cnn_bn(image_size=30)
    with pytest.raises(ValueError, match="model must be"):
        build("resnet", (1, 28, 28))
