"""fsgeom.compare (Fisher versus L²) against dense float64 computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fsgeom.compare import (
    condition_number,
    direction_alignment,
    effective_rank,
    eigenspace_overlap,
    preconditioned_directions,
    principal_angles,
    quadratic_form_ratio,
    random_directions,
)
from fsgeom.curvature import EmpiricalFisher, Fisher, L2Metric
from fsgeom.models import mlp

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    m = mlp((6, 5, 4, 3), seed=1).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (7,), generator=g)
    ops = {
        "L2": L2Metric(m, x),
        "Fisher": Fisher(m, x),
        "EmpiricalFisher": EmpiricalFisher(m, (x, y)),
    }
    dense = {k: op.to_dense() for k, op in ops.items()}
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), list(m.parameters()))
    return ops, dense, torch.cat([t.reshape(-1) for t in grads])


def test_principal_angles_match_scipy(setup):
    ops, dense, _ = setup
    k = 4
    angles = principal_angles(ops["L2"], ops["Fisher"], k, method="dense")
    ua = np.linalg.eigh(dense["L2"].numpy())[1][:, ::-1][:, :k]
    ub = np.linalg.eigh(dense["Fisher"].numpy())[1][:, ::-1][:, :k]
    expect = np.sort(scipy.linalg.subspace_angles(ua, ub))
    assert np.allclose(np.sort(angles.numpy()), expect, atol=1e-7)
    overlap = eigenspace_overlap(ops["L2"], ops["Fisher"], k, method="dense")
    assert math.isclose(overlap, float(np.mean(np.cos(expect) ** 2)), rel_tol=1e-9)
    # an operator against itself, and against its own dense matrix
    assert float(principal_angles(ops["Fisher"], dense["Fisher"], k).max()) < 1e-6
    assert math.isclose(eigenspace_overlap(ops["Fisher"], ops["Fisher"], k), 1.0, rel_tol=1e-9)


def test_preconditioned_directions_and_alignment(setup):
    ops, dense, g = setup
    dirs = preconditioned_directions(g, ops, damping=1e-2)
    assert list(dirs) == ["g", "L2", "Fisher", "EmpiricalFisher"]
    eye = torch.eye(g.numel(), dtype=F64)
    for name in ops:
        expect = torch.linalg.solve(dense[name] + 1e-2 * eye, g)
        assert float((dirs[name] - expect).abs().max() / expect.abs().max()) < 1e-8
    cos = direction_alignment(dirs)
    assert cos.dims == ("a", "b") and list(cos.a.values) == list(dirs)
    for a in dirs:
        for b in dirs:
            u, v = dirs[a], dirs[b]
            expect = float(u @ v / (u.norm() * v.norm()))
            assert math.isclose(float(cos.sel(a=a, b=b)), expect, rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(ValueError, match="reserved"):
        preconditioned_directions(g, {"g": ops["L2"]})


def test_quadratic_form_ratio(setup):
    ops, dense, g = setup
    dirs = torch.cat([random_directions(g.numel(), 3, seed=1), g[:, None]], 1)
    assert torch.allclose(dirs[:, :3].norm(dim=0), torch.ones(3, dtype=F64))
    ratio = quadratic_form_ratio(ops["Fisher"], ops["L2"], dirs)
    a, b = dense["Fisher"], dense["L2"]
    expect = [float(v @ a @ v / (v @ b @ v)) for v in dirs.T]
    assert np.allclose(ratio.numpy(), expect, rtol=1e-9)
    # dense matrices work too, and a single flat direction
    assert math.isclose(
        float(quadratic_form_ratio(a, b, g)[0]), float(g @ a @ g / (g @ b @ g)), rel_tol=1e-9
    )
    with pytest.raises(ValueError, match="flat vector of"):
        quadratic_form_ratio(a, b, [torch.ones(3, dtype=F64)])


def test_condition_number_and_effective_rank(setup):
    lam = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    a = q @ torch.diag(lam) @ q.T
    assert condition_number(lam) == math.inf  # singular
    assert condition_number(a) > 1e12  # singular up to round-off
    assert math.isclose(condition_number(a, rtol=1e-10), 4.0, rel_tol=1e-9)
    p = lam[:3] / lam.sum()
    assert math.isclose(effective_rank(a), math.exp(-float((p * p.log()).sum())), rel_tol=1e-9)
    assert math.isclose(effective_rank(lam, "participation"), 49 / 21, rel_tol=1e-12)
    assert math.isclose(effective_rank(torch.ones(5, dtype=F64)), 5.0, rel_tol=1e-12)
    ops, dense, _ = setup
    ev = torch.linalg.eigvalsh(dense["Fisher"])
    assert math.isclose(
        condition_number(ops["Fisher"], rtol=1e-8),
        float(ev.max() / ev[ev > 1e-8 * ev.max()].min()),
        rel_tol=1e-6,
    )
    with pytest.raises(ValueError, match="kind"):
        effective_rank(lam, "bogus")
