"""fsgeom.optim against hand transcriptions of the paper's Algorithms 1 and 2 (float64)."""

import copy

import pytest
import torch
from torch import nn

from fsgeom.data import ValidationStream
from fsgeom.distance import l2_distance
from fsgeom.functional import flatten, trainable_params
from fsgeom.models import cnn_bn, mlp
from fsgeom.optim import HCGD, HCAdam, HilbertConstrained, NaturalGradient, NaturalGradientByGD

from .reference import (
    ref_optim_fisher,
    ref_optim_hcgd,
    ref_optim_hilbert_constrained,
    ref_optim_ngd,
)

SIZES = (6, 5, 4, 3)


def make_model(seed=0):
    return mlp(SIZES, seed=seed).double()


def make_data(steps, n_val=1, seed=1, batch=8, val_batch=12):
    g = torch.Generator().manual_seed(seed)
    train = [
        (
            torch.randn(batch, SIZES[0], generator=g, dtype=torch.float64),
            torch.randint(0, SIZES[-1], (batch,), generator=g),
        )
        for _ in range(steps)
    ]
    val = [
        [torch.randn(val_batch, SIZES[0], generator=g, dtype=torch.float64) for _ in range(n_val)]
        for _ in range(steps)
    ]
    return train, val


def train_steps(model, opt, train, val=None, scheduler=None):
    for t, (x, y) in enumerate(train):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if val is None:
            opt.step()
        else:
            opt.step(val_inputs=val[t])
        if scheduler is not None:
            scheduler.step()
    return flatten(trainable_params(model)).clone()


def close(a, b, tol=1e-11):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# --- HCGD (Algorithm 1) -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_hcgd_matches_transcription(n, momentum):
    model = make_model()
    train, val = make_data(4)
    kw = dict(lr=0.3, momentum=momentum, lam=1.0, inner_lr=0.3)
    theta = train_steps(model, HCGD(model.parameters(), n_corrections=n, model=model, **kw),
                        train, [v[0] for v in val])  # fmt: skip
    ref = ref_optim_hcgd(make_model(), train, [v[0] for v in val], n=n, **kw)
    plain = make_model()
    sgd = train_steps(plain, torch.optim.SGD(plain.parameters(), 0.3, momentum), train)
    assert close(theta, ref)
    assert (theta - sgd).norm() > 1e-3 * sgd.norm()  # the corrections matter here


def test_hcgd_mean_norm_redraw_weight_decay_logits():
    n = 3
    model = make_model()
    train, val = make_data(3, n_val=n)
    kw = dict(lr=0.2, momentum=0.5, lam=0.7, inner_lr=0.4, weight_decay=0.01)
    stream = iter([x for v in val for x in v])
    opt = HCGD(model.parameters(), n_corrections=n, model=model, validation=stream,
               redraw_validation=True, distance="mean_norm", output="logits", **kw)  # fmt: skip
    theta = train_steps(model, opt, train)
    ref = ref_optim_hcgd(make_model(), train, val, n=n, output="logits", distance="mean_norm",
                         **kw)  # fmt: skip
    assert close(theta, ref)
    assert opt.last_step_passes == 2 + 3 * n


def test_hcgd_passes_and_grad_untouched():
    model = make_model()
    train, val = make_data(1)
    (x, y), xv = train[0], val[0][0]
    opt = HCGD(model.parameters(), lr=0.1, momentum=0.9, n_corrections=4, model=model)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step(val_inputs=(xv, None))
    assert opt.last_step_passes == 3 + 2 * 4  # one reference forward, 4 × (forward + backward)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert opt.last_distances.shape == (4,)
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    assert v.norm() > 0


def test_hcgd_lambda_zero_is_torch_sgd():
    train, val = make_data(5)
    a, b = make_model(), make_model()
    hc = HCGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, lam=0.0, model=a)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    ta = train_steps(a, hc, train, [v[0] for v in val])
    tb = train_steps(b, sgd, train)
    assert hc.last_step_passes == 2
    assert close(ta, tb, 1e-13)


def test_hcgd_lr_scheduler_changes_step_paper_momentum_convention():
    """Under a schedule the lr stays inside the buffer (paper), unlike torch's SGD."""
    train, val = make_data(4)
    vals = [v[0] for v in val]
    a, b, c = make_model(), make_model(), make_model()
    kw = dict(momentum=0.9, lam=0.5, inner_lr=0.5)
    oa = HCGD(a.parameters(), lr=0.2, model=a, **kw)
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.5)
    ta = train_steps(a, oa, train, vals, scheduler=sched)
    lrs = [0.2 * 0.5**t for t in range(4)]
    assert close(ta, ref_optim_hcgd(make_model(), train, vals, lr=lrs, n=1, **kw))
    tb = train_steps(b, HCGD(b.parameters(), lr=0.2, model=b, **kw), train, vals)
    assert (ta - tb).norm() > 1e-3
    # λ = 0 under a schedule: differs from torch SGD (which rescales its whole buffer)
    od = HCGD(c.parameters(), lr=0.2, momentum=0.9, lam=0.0, model=c)
    td = train_steps(c, od, train, vals, torch.optim.lr_scheduler.StepLR(od, 1, 0.5))
    e = make_model()
    oe = torch.optim.SGD(e.parameters(), lr=0.2, momentum=0.9)
    te = train_steps(e, oe, train, None, torch.optim.lr_scheduler.StepLR(oe, 1, 0.5))
    assert not close(td, te, 1e-6)
    m = make_model()  # the paper's convention by hand: v ← βv + ε_t J, θ ← θ − v
    bufs = [torch.zeros_like(p) for p in m.parameters()]
    for (x, y), lr in zip(train, lrs):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            for p, v in zip(m.parameters(), bufs):
                v.mul_(0.9).add_(lr * p.grad)
                p.sub_(v)
    assert close(td, flatten(trainable_params(m)))


@pytest.mark.parametrize("lam,inner_lr,factor", [(0.5, 0.02, 1.0), (1.0, 0.1, 0.9)])
def test_hcgd_l2_step_shorter_than_proposal(lam, inner_lr, factor):
    model = make_model()
    (x, y), xv = make_data(1)[0][0], make_data(1, val_batch=64)[1][0][0]
    before = {k: v.clone() for k, v in trainable_params(model).items()}
    nn.functional.cross_entropy(model(x), y).backward()
    proposal = {k: before[k] - 0.5 * p.grad for k, p in model.named_parameters()}
    opt = HCGD(model.parameters(), lr=0.5, lam=lam, inner_lr=inner_lr, model=model)
    opt.step(val_inputs=xv)
    after = trainable_params(model)
    d_hc = l2_distance(before, after, xv, model=model)
    d_sgd = l2_distance(before, proposal, xv, model=model)
    assert 0 < d_hc < factor * d_sgd
    assert torch.isclose(opt.last_distances[0], d_sgd)  # D before the correction = proposal's


@pytest.mark.parametrize("distance", ["rms", "mean_norm"])
def test_hcgd_zero_proposal_has_zero_correction(distance):
    """D is not differentiable at Δθ = 0; HCGD uses the subgradient 0 (autograd: NaN)."""
    model = make_model()
    train, val = make_data(1)
    before = flatten(trainable_params(model)).clone()
    opt = HCGD(model.parameters(), lr=0.0, model=model, distance=distance)
    theta = train_steps(model, opt, train, [v[0] for v in val])
    assert torch.equal(theta, before)
    assert opt.last_distances.tolist() == [0.0]


def test_hcgd_param_groups_per_group_hyperparameters():
    model = make_model()
    train, val = make_data(3)
    vals = [v[0] for v in val]
    first = [p for n, p in model.named_parameters() if n.startswith("1.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    frozen = [p.detach().clone() for p in first]
    opt = HCGD([{"params": first, "lr": 0.0, "lam": 0.0}, {"params": rest}], lr=0.2,
               momentum=0.5, lam=1.0, inner_lr=0.3, model=model)  # fmt: skip
    train_steps(model, opt, train, vals)
    assert all(torch.equal(a, b) for a, b in zip(frozen, first))  # ε = λ = 0 in group 0
    assert opt.param_groups[1]["lam"] == 1.0 and opt.last_distances.numel() == 1
    assert all(opt.state[p]["momentum_buffer"].norm() > 0 for p in rest)


def test_hcgd_state_dict_round_trip_bit_for_bit():
    train, _ = make_data(6)
    model = make_model()
    stream = ValidationStream(torch.randn(40, SIZES[0], dtype=torch.float64), 12, seed=3)
    opt = HCGD(model.parameters(), lr=0.2, momentum=0.9, n_corrections=2, model=model,
               validation=stream)  # fmt: skip
    train_steps(model, opt, train[:3])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    theta_a = train_steps(model, opt, train[3:])

    model2 = make_model(seed=5)
    model2.load_state_dict(saved_model)
    stream2 = ValidationStream(stream.x, 12, seed=99)
    opt2 = HCGD(model2.parameters(), lr=1.0, momentum=0.1, n_corrections=2, model=model2,
                validation=stream2)  # fmt: skip
    opt2.load_state_dict(saved_opt)
    theta_b = train_steps(model2, opt2, train[3:])
    assert torch.equal(theta_a, theta_b)


def test_hcgd_batchnorm_running_stats_only_from_user_forward():
    model = cnn_bn(in_channels=1, num_classes=3, width=2, image_size=8).double().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    xv = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    opts = [
        HCGD(model.parameters(), lr=0.1, momentum=0.9, n_corrections=2, model=model),
        HCAdam(model.parameters(), lr=0.01, n_corrections=2, model=model),
        HCGD(model.parameters(), lr=0.1, model=model, batch_stats=True),
    ]
    for opt in opts:
        opt.zero_grad()
        before = copy.deepcopy(model.state_dict())
        nn.functional.cross_entropy(model(x), y).backward()
        after_forward = copy.deepcopy(model.state_dict())
        assert not torch.equal(before["1.running_mean"], after_forward["1.running_mean"])
        opt.step(val_inputs=xv)
        for k, v in model.state_dict().items():
            if "running" in k or "num_batches" in k:
                assert torch.equal(v, after_forward[k]), k
        assert all(m.training for m in model.modules())


# --- HilbertConstrained / HCAdam ----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "make_base",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.05),
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
    ],
    ids=["adam", "sgd_momentum"],
)
def test_hilbert_constrained_matches_transcription(make_base, n):
    model = make_model()
    train, val = make_data(4)
    vals = [v[0] for v in val]
    opt = HilbertConstrained(make_base(list(model.parameters())), model=model, lam=1.0,
                             inner_lr=0.3, n_corrections=n)  # fmt: skip
    theta = train_steps(model, opt, train, vals)
    ref = ref_optim_hilbert_constrained(make_model(), make_base, train, vals, 1.0, 0.3, n)
    assert close(theta, ref)
    assert opt.last_step_passes == 3 + 2 * n


def test_hcadam_is_hilbert_constrained_adam_and_lambda_zero_is_adam():
    train, val = make_data(4)
    vals = [v[0] for v in val]
    a, b, c = make_model(), make_model(), make_model()
    ta = train_steps(a, HCAdam(a.parameters(), lr=0.05, model=a, n_corrections=2), train, vals)
    ob = HilbertConstrained(torch.optim.Adam(b.parameters(), lr=0.05), model=b, n_corrections=2)
    assert torch.equal(ta, train_steps(b, ob, train, vals))
    oc = HCAdam(c.parameters(), lr=0.05, lam=0.0, model=c)
    d = make_model()
    td = train_steps(d, torch.optim.Adam(d.parameters(), lr=0.05), train)
    assert torch.equal(train_steps(c, oc, train, vals), td)
    assert oc.last_step_passes == 2


def test_hilbert_constrained_scheduler_and_state_dict():
    train, _ = make_data(6)
    xs = torch.randn(40, SIZES[0], dtype=torch.float64)

    def build(seed):
        m = make_model()
        o = HCAdam(m.parameters(), lr=0.05, model=m, lam=1.0, inner_lr=0.2,
                   validation=ValidationStream(xs, 12, seed=seed))  # fmt: skip
        return m, o, torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    m1, o1, s1 = build(0)
    train_steps(m1, o1, train[:3], scheduler=s1)
    assert o1.base.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)
    saved = copy.deepcopy((o1.state_dict(), s1.state_dict(), m1.state_dict()))
    ta = train_steps(m1, o1, train[3:], scheduler=s1)
    m2, o2, s2 = build(7)
    m2.load_state_dict(saved[2])
    o2.load_state_dict(saved[0])
    s2.load_state_dict(saved[1])
    assert torch.equal(ta, train_steps(m2, o2, train[3:], scheduler=s2))
    m3, o3, _ = build(0)  # no schedule: a different trajectory
    assert not torch.equal(train_steps(m3, o3, train), ta)


# --- bad input -------------------------------------------------------------------------------


def _one_grad(model, seed=0):
    (x, y), _ = make_data(1, seed=seed)[0][0], None
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("kind", ["hcgd", "hcadam"])
def test_bad_validation_batches_change_nothing(kind):
    model = make_model()
    if kind == "hcgd":
        opt = HCGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    else:
        opt = HCAdam(model.parameters(), lr=0.1, model=model)
    _one_grad(model)
    opt.step(val_inputs=torch.randn(5, SIZES[0], dtype=torch.float64))
    state = copy.deepcopy(opt.state_dict())
    theta = flatten(trainable_params(model)).clone()
    _one_grad(model, 1)
    with pytest.raises(ValueError, match="val_inputs"):
        opt.step()
    with pytest.raises(ValueError, match=r"val_inputs of shape \(5, 7\)"):
        opt.step(val_inputs=torch.randn(5, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="val_inputs"):
        opt.step(val_inputs="x")
    assert torch.equal(theta, flatten(trainable_params(model)))
    after = opt.state_dict()
    for k, s in state["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name]))


def test_nonfinite_update_raises_naming_step_and_leaves_parameters():
    model = make_model()
    opt = HCGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    xv = torch.randn(5, SIZES[0], dtype=torch.float64)
    _one_grad(model)
    opt.step(val_inputs=xv)
    theta = flatten(trainable_params(model)).clone()
    buf = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _one_grad(model, 1)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="HCGD step 2"):
        opt.step(val_inputs=xv)
    assert torch.equal(theta, flatten(trainable_params(model)))
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in
               zip(buf, model.parameters()))  # fmt: skip
    # a validation batch with non-finite inputs: the distance is named
    _one_grad(model, 1)
    with pytest.raises(FloatingPointError, match="distance at correction 1"):
        opt.step(val_inputs=torch.full((3, SIZES[0]), float("inf"), dtype=torch.float64))
    assert torch.equal(theta, flatten(trainable_params(model)))
    wrapped = HCAdam(model.parameters(), lr=0.1, model=model)
    next(model.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="HCAdam step 1"):
        wrapped.step(val_inputs=xv)
    assert torch.equal(theta, flatten(trainable_params(model)))


def test_bad_constructor_arguments():
    model = make_model()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="lr"):
        HCGD(ps, lr=-1.0, model=model)
    with pytest.raises(ValueError, match="momentum"):
        HCGD(ps, lr=0.1, momentum=1.0, model=model)
    with pytest.raises(ValueError, match="n_corrections"):
        HCGD(ps, lr=0.1, n_corrections=0, model=model)
    with pytest.raises(ValueError, match="distance"):
        HCGD(ps, lr=0.1, distance="l1", model=model)
    with pytest.raises(ValueError, match="output"):
        HCGD(ps, lr=0.1, output="scores", model=model)
    with pytest.raises(TypeError, match="model"):
        HCGD(ps, lr=0.1, model=None)
    with pytest.raises(ValueError, match="not a parameter of model"):
        HCGD(ps, lr=0.1, model=make_model(seed=1))
    with pytest.raises(ValueError, match="redraw_validation"):
        HCGD(ps, lr=0.1, model=model, redraw_validation=True)
    with pytest.raises(TypeError, match="base_optimizer"):
        HilbertConstrained(ps, model=model)
    with pytest.raises(TypeError, match="validation"):
        HCGD(ps, lr=0.1, model=model, validation=3)


def test_validation_reiterable_loader_restarts_and_iterator_exhausts():
    model = make_model()
    _, val = make_data(2)
    batches = [v[0] for v in val]
    opt = HCGD(model.parameters(), lr=0.1, model=model, validation=batches)
    for seed in range(3):  # 3 steps over a list of 2 batches: restarts
        _one_grad(model, seed)
        opt.step()
    opt.validation = iter(batches)
    for seed in range(2):
        _one_grad(model, seed)
        opt.step()
    with pytest.raises(ValueError, match="exhausted"):
        opt.step()


def test_closure_returns_loss():
    model = make_model()
    (x, y), xv = make_data(1)[0][0], make_data(1)[1][0][0]
    opt = HCGD(model.parameters(), lr=0.1, model=model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure, val_inputs=xv)
    assert torch.isfinite(loss) and loss.grad_fn is not None
    assert opt.last_step_passes == 5


# --- natural gradient (Algorithm 2) and the damped exact baseline -------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_ngd_matches_transcription(n, fisher):
    model = make_model()
    train, val = make_data(3)
    g = torch.Generator().manual_seed(9)
    labels = [torch.randint(0, SIZES[-1], (v[0].shape[0],), generator=g) for v in val]
    fb = [v[0] if fisher == "exact" else (v[0], y) for v, y in zip(val, labels)]
    opt = NaturalGradientByGD(model.parameters(), lr=0.01, model=model, lam=2.0, inner_lr=0.3,
                              n_corrections=n, fisher=fisher, validation=iter(fb))  # fmt: skip
    theta = train_steps(model, opt, train)
    ref = ref_optim_ngd(make_model(), lambda ps: torch.optim.RMSprop(ps, lr=0.01), train, fb,
                        2.0, 0.3, n)  # fmt: skip
    rms = make_model()
    plain = train_steps(rms, torch.optim.RMSprop(rms.parameters(), lr=0.01), train)
    assert close(theta, ref)
    assert (theta - plain).norm() > 1e-4
    assert opt.last_step_passes == 2 + 2 * n


def _full_rank_problem():
    """A tanh network whose last layer is frozen: its Fisher (6×6) is well conditioned."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(3)
    for p in model[2].parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    xf = torch.randn(50, 2, generator=g, dtype=torch.float64)
    return model, x, y, xf


def test_ngd_many_inner_steps_converge_to_natural_gradient():
    model, x, y, xf = _full_rank_problem()
    trainable = [p for p in model.parameters() if p.requires_grad]
    F = ref_optim_fisher(model, xf)
    evals = torch.linalg.eigvalsh(F)
    assert evals[0] > 1e-3 * evals[-1]  # full rank, well conditioned (precondition)
    lam = 2.0
    theta0 = flatten(trainable_params(model)).clone()
    nn.functional.cross_entropy(model(x), y).backward()
    J = torch.cat([p.grad.reshape(-1) for p in trainable])
    # the best fixed step η = 2/(λ(λmin + λmax)) contracts by (κ−1)/(κ+1) per correction
    eta = 2.0 / (lam * (evals[0] + evals[-1]))
    kappa = float(evals[-1] / evals[0])
    n = int(22 / -torch.log(torch.tensor((kappa - 1) / (kappa + 1))).item()) + 1
    opt = NaturalGradientByGD(trainable, model=model, lam=lam, inner_lr=eta, n_corrections=n)
    opt.step(fisher_batch=xf)
    step = flatten(trainable_params(model)) - theta0
    target = -torch.linalg.solve(F, J) / lam
    assert torch.allclose(step, target, rtol=1e-7, atol=1e-10)


def test_natural_gradient_cg_matches_dense_solve():
    model, x, y, xf = _full_rank_problem()
    trainable = [p for p in model.parameters() if p.requires_grad]
    theta0 = flatten(trainable_params(model)).clone()
    nn.functional.cross_entropy(model(x), y).backward()
    J = torch.cat([p.grad.reshape(-1) for p in trainable])
    opt = NaturalGradient(trainable, lr=0.5, damping=1e-2, model=model, tol=1e-12)
    opt.step(fisher_batch=xf)
    model_ref, *_ = _full_rank_problem()
    F = ref_optim_fisher(model_ref, xf)
    target = theta0 - 0.5 * torch.linalg.solve(F + 1e-2 * torch.eye(F.shape[0], dtype=F.dtype), J)
    assert torch.allclose(flatten(trainable_params(model)), target, rtol=1e-9, atol=1e-11)
    assert opt.last_solve["converged"] and opt.last_step_passes == 2 + 2 * opt.last_solve[
        "iterations"]  # fmt: skip
    with pytest.raises(ValueError, match="every trainable parameter"):
        NaturalGradient(trainable[:1], model=model)


def test_ngd_mc_fisher_state_dict_round_trip():
    train, _ = make_data(5)
    xs = torch.randn(40, SIZES[0], dtype=torch.float64)

    def build(seed):
        m = make_model()
        o = NaturalGradientByGD(m.parameters(), lr=0.01, model=m, n_corrections=2, fisher="mc",
                                mc_samples=2, validation=ValidationStream(xs, 12, seed=seed),
                                seed=seed)  # fmt: skip
        return m, o

    m1, o1 = build(0)
    train_steps(m1, o1, train[:2])
    saved = copy.deepcopy((o1.state_dict(), m1.state_dict()))
    ta = train_steps(m1, o1, train[2:])
    m2, o2 = build(5)
    m2.load_state_dict(saved[1])
    o2.load_state_dict(saved[0])
    assert torch.equal(ta, train_steps(m2, o2, train[2:]))
    m3, o3 = build(0)
    o3.fisher_source.fisher = "exact"
    assert not torch.equal(train_steps(m3, o3, train), ta)


def test_ngd_bad_input():
    model = make_model()
    opt = NaturalGradientByGD(model.parameters(), model=model)
    _one_grad(model)
    theta = flatten(trainable_params(model)).clone()
    with pytest.raises(ValueError, match="fisher_batch"):
        opt.step()
    with pytest.raises(ValueError, match="fisher_batch of shape \\(4, 9\\) does not fit the model"):
        opt.step(fisher_batch=torch.randn(4, 9, dtype=torch.float64))
    assert torch.equal(theta, flatten(trainable_params(model)))
    emp = NaturalGradientByGD(model.parameters(), model=model, fisher="empirical")
    with pytest.raises(ValueError, match="targets"):
        emp.step(fisher_batch=torch.randn(4, SIZES[0], dtype=torch.float64))
    with pytest.raises(ValueError, match="fisher"):
        NaturalGradientByGD(model.parameters(), model=model, fisher="kfac")
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaturalGradientByGD step 1"):
        opt.step(fisher_batch=torch.randn(4, SIZES[0], dtype=torch.float64))
    assert torch.equal(theta, flatten(trainable_params(model)))


def test_add_param_group_after_construction():
    model = make_model()
    train, val = make_data(2)
    vals = [v[0] for v in val]
    named = list(model.named_parameters())
    for opt in (
        HCGD([p for _, p in named[:2]], lr=0.1, momentum=0.9, model=model),
        HCAdam([p for _, p in named[:2]], lr=0.01, model=model),
    ):
        opt.add_param_group({"params": [p for _, p in named[2:]], "lam": 0.25})
        assert opt.param_groups[1]["lam"] == 0.25 and "inner_lr" in opt.param_groups[1]
        before = [p.detach().clone() for _, p in named]
        train_steps(model, opt, train, vals)
        assert all(not torch.equal(b, p) for b, (_, p) in zip(before, named))
    wrapped = HCAdam(model.parameters(), model=model)
    assert wrapped.param_groups is wrapped.base.param_groups


def test_ngd_bad_fisher_batch_fails_before_the_base_optimizer_steps():
    torch.manual_seed(0)
    m = nn.Linear(5, 3).double()
    opt = NaturalGradientByGD(m.parameters(), lr=0.01, model=m)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(m(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="fisher_batch of shape \\(4, 7\\) does not fit"):
        opt.step(fisher_batch=torch.randn(4, 7, dtype=torch.float64))
    assert len(opt.base.state) == 0  # RMSprop's moments untouched
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
