"""fsgeom.curvature against dense float64 references (tests/reference.py)."""

import copy

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from fsgeom.curvature import (
    CurvatureOperator,
    EmpiricalFisher,
    Fisher,
    L2Metric,
    solve,
    spectrum,
)
from fsgeom.data import TensorLoader
from fsgeom.functional import flatten, function_view, trainable_params
from fsgeom.models import cnn_bn, mlp
from tests.reference import (
    ref_curv_empirical_fisher,
    ref_curv_ggn,
    ref_curv_l2_metric_direct,
    ref_curv_output_matrix,
    ref_jacobian,
    ref_outputs,
)

RTOL = 1e-10
F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def small_mlp():
    return mlp((6, 5, 4, 3), seed=1).double()


def small_cnn():
    m = cnn_bn(in_channels=1, num_classes=3, width=2, image_size=4, seed=2).double()
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():  # non-trivial running statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g, dtype=F64) * 0.3)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g, dtype=F64) + 0.5)
            mod.weight.data.add_(torch.randn(mod.num_features, generator=g, dtype=F64) * 0.2)
    return m.eval()


def mlp_case():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return small_mlp(), x, y


def cnn_case():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return small_cnn(), x, y


CASES = {"mlp": mlp_case, "cnn": cnn_case}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def ce_one(out, target):
    return nn.functional.cross_entropy(out[None], target[None])


# name -> (builder(model, x, y), reference(model, x, y))
OPERATORS = {
    "l2_probs": (
        lambda m, x, y, **kw: L2Metric(m, x, **kw),
        lambda m, x, y: ref_curv_l2_metric_direct(m, x, "probs"),
    ),
    "l2_logits": (
        lambda m, x, y, **kw: L2Metric(m, x, output="logits", **kw),
        lambda m, x, y: ref_curv_l2_metric_direct(m, x, "logits"),
    ),
    "l2_log_probs": (
        lambda m, x, y, **kw: L2Metric(m, x, output="log_probs", **kw),
        lambda m, x, y: ref_curv_l2_metric_direct(m, x, "log_probs"),
    ),
    "fisher": (
        lambda m, x, y, **kw: Fisher(m, x, **kw),
        lambda m, x, y: ref_curv_ggn(m, x, "fisher"),
    ),
    "fisher_gaussian": (
        lambda m, x, y, **kw: Fisher(m, x, likelihood="gaussian", sigma=0.5, **kw),
        lambda m, x, y: ref_curv_ggn(m, x, "gaussian", sigma=0.5),
    ),
    "empirical_fisher": (
        lambda m, x, y, **kw: EmpiricalFisher(m, (x, y), **kw),
        lambda m, x, y: ref_curv_empirical_fisher(m, x, y, ce_one),
    ),
}


@pytest.fixture(scope="module")
def refs():
    """Dense references, computed once per (case, operator)."""
    cache = {}

    def get(case, name):
        if (case, name) not in cache:
            m, x, y = CASES[case]()
            cache[case, name] = OPERATORS[name][1](m, x, y)
        return cache[case, name]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(OPERATORS))
def test_dense_and_products_match_reference(case, name, refs):
    m, x, y = CASES[case]()
    ref = refs(case, name)
    op = OPERATORS[name][0](m, x, y)
    assert op.shape == ref.shape
    assert rel(op.to_dense(), ref) < RTOL
    g = torch.Generator().manual_seed(0)
    v = torch.randn(ref.shape[0], generator=g, dtype=F64)
    assert rel(op @ v, ref @ v) < RTOL  # fresh product
    assert rel(op @ v, ref @ v) < RTOL  # second product: cached linearization
    vs = torch.randn(ref.shape[0], 3, generator=g, dtype=F64)
    assert rel(op.matmat(vs), ref @ vs) < RTOL


def test_reference_fisher_is_softmax_hessian():
    # the reference's closed-form S equals the Hessian of cross-entropy w.r.t. the logits
    z = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=F64)
    h = torch.autograd.functional.hessian(lambda t: ce_one(t, torch.tensor(2)), z)
    assert rel(ref_curv_output_matrix(z, "fisher"), h) < 1e-12


@pytest.mark.parametrize("linearization", ["auto", "double_backward", "linearize", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_linearizations_agree(case, linearization, refs):
    m, x, y = CASES[case]()
    ref = refs(case, "fisher")
    op = Fisher(m, x, linearization=linearization)
    v = randn(ref.shape[0], seed=1)
    for _ in range(3):
        assert rel(op @ v, ref @ v) < RTOL
    assert rel(op.matmat(torch.stack([v, -2 * v], 1))[:, 1], -2 * ref @ v) < RTOL


def test_dict_vectors_round_trip(refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "l2_probs")
    op = L2Metric(m, x)
    v = randn(ref.shape[0], seed=2)
    like = trainable_params(m)
    vd, i = {}, 0
    for k, p in like.items():
        vd[k] = v[i : i + p.numel()].view_as(p)
        i += p.numel()
    out = op @ vd
    assert isinstance(out, dict) and list(out) == list(like)
    assert rel(flatten(out), ref @ v) < RTOL


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["l2_probs", "fisher", "empirical_fisher"])
def test_symmetric_psd(case, name):
    m, x, y = CASES[case]()
    a = OPERATORS[name][0](m, x, y).to_dense()
    assert torch.allclose(a, a.T, atol=0, rtol=0)
    lam = torch.linalg.eigvalsh(a)
    assert lam.min() >= -1e-12 * lam.max()
    g = torch.Generator().manual_seed(3)
    u = torch.randn(a.shape[0], generator=g, dtype=F64)
    w = torch.randn(a.shape[0], generator=g, dtype=F64)
    op = OPERATORS[name][0](m, x, y)
    assert abs(float(u @ (op @ w) - w @ (op @ u))) < 1e-10 * float(a.abs().max())


def test_monte_carlo_fisher_converges_with_variance_tolerance(refs):
    """E‖F̂_k − F‖²_F = σ²/k with σ² the one-sample variance, computed exactly by
    enumerating labels; Chebyshev: the error exceeds 5σ/√k with probability ≤ 1/25."""
    m, x, y = mlp_case()
    exact = refs("mlp", "fisher")
    jac = ref_jacobian(m, x, "logits")
    z = ref_outputs(m, x, "logits")
    n, c, _ = jac.shape
    var1 = 0.0
    for i in range(n):
        p = torch.softmax(z[i], 0)
        s = ref_curv_output_matrix(z[i], "fisher")
        for cls in range(c):
            r = torch.nn.functional.one_hot(torch.tensor(cls), c).double() - p
            d = jac[i].T @ (torch.outer(r, r) - s) @ jac[i]
            var1 += float(p[cls]) * float(d.square().sum())
    var1 /= n**2
    errors = {}
    for k in (4, 64, 1024):
        gen = torch.Generator().manual_seed(11)
        f = Fisher(m, x, mc_samples=k, generator=gen).to_dense()
        errors[k] = float((f - exact).square().sum().sqrt())
        assert errors[k] <= 5 * (var1 / k) ** 0.5
    assert errors[1024] < errors[4]
    # fixed generator: a fixed matrix (products agree with the dense form)
    op = Fisher(m, x, mc_samples=8, generator=torch.Generator().manual_seed(5))
    v = randn(exact.shape[0], seed=6)
    d = Fisher(m, x, mc_samples=8, generator=torch.Generator().manual_seed(5)).to_dense()
    assert rel(op @ v, d @ v) < RTOL and rel(op @ v, d @ v) < RTOL


def test_monte_carlo_gaussian_fisher_unbiased(refs):
    m, x, y = mlp_case()
    exact = refs("mlp", "fisher_gaussian")
    f = Fisher(m, x, likelihood="gaussian", sigma=0.5, mc_samples=4000)
    assert rel(f.to_dense(), exact) < 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_empirical_fisher_losses(case):
    m, x, y = CASES[case]()
    soft = torch.softmax(randn(x.shape[0], 3, seed=7), 1)
    ref = ref_curv_empirical_fisher(m, x, soft, lambda o, t: -(t * torch.log_softmax(o, 0)).sum())
    assert rel(EmpiricalFisher(m, (x, soft)).to_dense(), ref) < RTOL
    targets = randn(x.shape[0], 3, seed=8)
    ref = ref_curv_empirical_fisher(m, x, targets, lambda o, t: ((o - t) ** 2).mean())
    assert rel(EmpiricalFisher(m, (x, targets), loss="mse").to_dense(), ref) < RTOL

    def huber(o, t):
        return nn.functional.smooth_l1_loss(o, t)

    ref = ref_curv_empirical_fisher(m, x, targets, huber)
    assert rel(EmpiricalFisher(m, (x, targets), loss=huber).to_dense(), ref) < RTOL


def test_to_scipy_eigsh_and_cg(refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "fisher").numpy()
    op = Fisher(m, x)
    lin = op.to_scipy()
    assert lin.shape == ref.shape and lin.dtype == np.float64
    vals = np.sort(sla.eigsh(lin, k=3, which="LA", tol=1e-12)[0])[::-1]
    expect = np.linalg.eigvalsh(ref)[::-1][:3]
    assert np.allclose(vals, expect, rtol=1e-8, atol=0)
    b = np.random.default_rng(0).standard_normal(ref.shape[0])
    damped = (op + 0.1).to_scipy()
    sol, info = sla.cg(damped, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    assert np.allclose(sol, np.linalg.solve(ref + 0.1 * np.eye(ref.shape[0]), b), rtol=1e-7)


@pytest.mark.parametrize("method", ["dense", "lanczos", "arpack"])
def test_spectrum_matches_eigvalsh(method, refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "l2_probs")
    op = L2Metric(m, x)
    vals, vecs = spectrum(op, 4, method=method, tol=1e-12)
    expect = np.linalg.eigvalsh(ref.numpy())[::-1][:4]
    assert np.allclose(vals.numpy(), expect, rtol=1e-8, atol=1e-14)
    assert vecs.shape == (ref.shape[0], 4)
    assert torch.allclose(vecs.T @ vecs, torch.eye(4, dtype=F64), atol=1e-8)
    resid = ref @ vecs - vecs * vals
    assert float(resid.abs().max()) < 1e-7 * float(vals[0])


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_solve(method, refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "fisher")
    op = Fisher(m, x)
    g = randn(ref.shape[0], seed=9)
    sol = solve(op, g, damping=0.05, method=method, tol=1e-12)
    expect = torch.linalg.solve(ref + 0.05 * torch.eye(ref.shape[0], dtype=F64), g)
    assert rel(sol, expect) < 1e-8
    # undamped, g = the loss gradient (in the Fisher's range): minimum-norm solution
    ce = nn.functional.cross_entropy
    grads = torch.autograd.grad(ce(m(x), y), [p for p in m.parameters()])
    gl = torch.cat([t.reshape(-1) for t in grads])
    x_mn = torch.linalg.pinv(ref, hermitian=True, rtol=1e-10) @ gl
    sol, info = solve(op, gl, method=method, tol=1e-12, return_info=True)
    assert rel(ref @ sol, gl) < 1e-6
    assert rel(sol, x_mn) < 1e-5
    assert info["method"] == method


def test_diagonal_and_trace(refs):
    m, x, y = cnn_case()
    ref = refs("cnn", "empirical_fisher")
    op = EmpiricalFisher(m, (x, y))
    assert rel(op.diagonal("exact"), torch.diagonal(ref)) < RTOL
    assert abs(float(op.trace("exact")) - float(torch.trace(ref))) < RTOL * float(ref.trace())


def test_hutchinson_within_its_variance(refs):
    """Rademacher probes: Var of entry i is Σ_{j≠i} A_ij² / s, of the trace 2 Σ_{i≠j} A_ij² / s;
    the estimates must lie within 5 standard deviations (Chebyshev: p ≤ 1/25 each)."""
    m, x, y = mlp_case()
    ref = refs("mlp", "fisher")
    op = Fisher(m, x)
    s = 100
    off = ref - torch.diag(torch.diagonal(ref))
    d = op.diagonal("hutchinson", samples=s, seed=3)
    std = (off.square().sum(1) / s).sqrt()
    assert bool(((d - torch.diagonal(ref)).abs() <= 5 * std + 1e-12).all())
    t = op.trace("hutchinson", samples=s, seed=3)
    assert abs(float(t - ref.trace())) <= 5 * float((2 * off.square().sum() / s).sqrt())
    assert rel(op.diagonal("hutchinson", samples=s, seed=3), d) < 1e-12  # seeded
    assert rel(op.diagonal(), torch.diagonal(ref)) < RTOL  # "auto" is exact when small


def test_damping_forms(refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "fisher")
    eye = torch.eye(ref.shape[0], dtype=F64)
    op = Fisher(m, x)
    v = randn(ref.shape[0], seed=10)
    for damped in (op + 0.3, 0.3 + op, op.damped(0.3), Fisher(m, x, damping=0.3)):
        assert isinstance(damped, CurvatureOperator)
        assert rel(damped.to_dense(), ref + 0.3 * eye) < RTOL
        assert rel(damped @ v, (ref + 0.3 * eye) @ v) < RTOL
        assert rel(damped.diagonal(), torch.diagonal(ref) + 0.3) < RTOL
    assert op.damping == 0.0  # the original is unchanged
    assert rel(op @ v, ref @ v) < RTOL


def test_loader_streaming_and_chunks_are_exact(refs):
    m, x, y = cnn_case()
    ref = refs("cnn", "empirical_fisher")
    v = randn(ref.shape[0], seed=12)
    # batches of unequal size: weighting by batch size
    uneven = [(x[:2], y[:2]), (x[2:], y[2:])]
    op = EmpiricalFisher(m, uneven)
    assert rel(op @ v, ref @ v) < RTOL
    assert rel(op @ v, ref @ v) < RTOL
    assert op._store["pieces"] is None  # a loader is streamed, never cached
    assert op.num_examples == 5
    loader = TensorLoader(x, y, batch_size=2, shuffle=True, seed=0)
    assert rel(EmpiricalFisher(m, loader).to_dense(), ref) < RTOL
    chunked = EmpiricalFisher(m, (x, y), chunk_size=2)
    assert rel(chunked @ v, ref @ v) < RTOL
    assert rel(chunked.to_dense(), ref) < RTOL
    cached = EmpiricalFisher(m, uneven, cache=True)
    assert rel(cached.matmat(torch.stack([v, v], 1))[:, 0], ref @ v) < RTOL
    assert cached._store["pieces"] is not None


def test_views_and_output_spaces(refs):
    m, x, y = mlp_case()
    ref = refs("mlp", "l2_log_probs")
    view = function_view(m, "log_probs")
    assert rel(L2Metric(view, x).to_dense(), ref) < RTOL
    with pytest.raises(ValueError, match="disagrees"):
        L2Metric(view, x, output="probs")
    with pytest.raises(ValueError, match="output must be one of"):
        L2Metric(m, x, output="softmax")
    # explicit θ: the operator at other parameters
    other = small_mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.7)
    ref_other = ref_curv_l2_metric_direct(other, x, "probs")
    theta = flatten(trainable_params(other))
    assert rel(L2Metric(m, x, params=theta).to_dense(), ref_other) < RTOL


def test_batch_stats_semantics():
    m, x, y = cnn_case()
    op = L2Metric(m, x, output="logits", batch_stats=True)
    train_copy = copy.deepcopy(m).train()
    for mod in train_copy.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.track_running_stats = False
    jac = ref_jacobian_train(train_copy, x)
    expect = torch.einsum("ncp,ncq->pq", jac, jac) / x.shape[0]
    assert rel(op.to_dense(), expect) < RTOL
    v = randn(expect.shape[0], seed=13)
    assert rel(op @ v, expect @ v) < RTOL


def ref_jacobian_train(model, x):
    """Jacobian of a model whose BatchNorm uses batch statistics (already configured)."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, params, (x,))

    return torch.autograd.functional.jacobian(f, theta)


# --- bad input


def test_wrong_vector_length_and_keys():
    m, x, y = mlp_case()
    op = Fisher(m, x)
    p = op.num_params
    with pytest.raises(ValueError, match=f"{p} elements"):
        op @ torch.ones(p + 1, dtype=F64)
    with pytest.raises(ValueError, match="missing"):
        op @ {"1.weight": torch.ones(5, 6, dtype=F64)}
    with pytest.raises(ValueError, match=rf"\({p}, K\)"):
        op.matmat(torch.ones(p - 1, 2, dtype=F64))
    with pytest.raises(TypeError, match="floating point"):
        op @ torch.ones(p, dtype=torch.long)


def test_fisher_rejects_non_class_scores():
    reg = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).double()
    x = randn(4, 3, seed=14)
    with pytest.raises(ValueError, match="class scores of shape"):
        Fisher(reg, x) @ torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="class scores"):
        Fisher(nn.Linear(3, 1).double(), x).to_dense()
    # the Gaussian likelihood is the regression variant
    f = Fisher(reg, x, likelihood="gaussian")
    w = reg[0].weight.detach()
    jac = torch.cat([x, torch.ones(4, 1, dtype=F64)], 1)  # ∂(xwᵀ + b)/∂(w, b)
    assert rel(f.to_dense(), jac.T @ jac / 4) < RTOL
    assert w.shape == (1, 3)
    with pytest.raises(ValueError, match="likelihood"):
        Fisher(reg, x, likelihood="poisson")
    with pytest.raises(ValueError, match="mc_samples"):
        Fisher(reg, x, mc_samples=0)


def test_bad_data():
    m, x, y = cnn_case()
    bad = [(x[:2], y[:2]), (randn(3, 1, 8, 8), y[2:])]
    with pytest.raises(ValueError, match="batch 1"):
        Fisher(m, bad) @ torch.ones(Fisher(m, x).num_params)
    with pytest.raises(TypeError, match="one-shot"):
        Fisher(m, ((xb, yb) for xb, yb in [(x, y)]))
    with pytest.raises(ValueError, match="targets"):
        EmpiricalFisher(m, x)
    with pytest.raises(ValueError, match="class indices"):
        EmpiricalFisher(m, (x, y + 5)) @ torch.ones(Fisher(m, x).num_params)
    with pytest.raises(ValueError, match="damping"):
        Fisher(m, x, damping=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        Fisher("model", x)


def test_to_dense_refuses_large():
    big = mlp((784, 90, 50, 10))
    op = Fisher(big, torch.randn(2, 784, dtype=torch.float32))
    with pytest.raises(MemoryError, match="max_entries"):
        op.to_dense()
    small = Fisher(*mlp_case()[:2])
    with pytest.raises(MemoryError, match="75 entries"):
        small.to_dense(max_entries=75)


def test_model_state_untouched():
    m, x, y = cnn_case()
    m.train()  # even in training mode, measuring uses (and keeps) the running stats
    state = copy.deepcopy(m.state_dict())
    rng = torch.get_rng_state()
    ops = [
        Fisher(m, x),
        Fisher(m, x, mc_samples=3),
        L2Metric(m, x),
        EmpiricalFisher(m, (x, y)),
        L2Metric(m, x, batch_stats=True),
    ]
    v = torch.ones(ops[0].num_params, dtype=F64)
    for op in ops:
        op @ v
        op @ v
    ops[1].diagonal()
    spectrum(ops[0], 2, method="lanczos", maxiter=4)
    solve(ops[3], v, damping=0.1, method="cg", maxiter=4)
    assert m.training and all(mod.training for mod in m.modules())
    for k, t in m.state_dict().items():
        assert torch.equal(t, state[k]), k
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
