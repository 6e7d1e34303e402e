import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import fsgeom
from fsgeom.models import mlp
from fsgeom.tracking import EPOCH_VARIABLES, STEP_VARIABLES, Tracker, combine, open_run, save_run

from .reference import ref_tracking_trajectory

_G = torch.Generator().manual_seed(0)
X = torch.randn(24, 6, dtype=torch.float64, generator=_G)
Y = torch.randint(0, 3, (24,), generator=_G)
PROBE = torch.randn(7, 6, dtype=torch.float64, generator=_G)  # 7 rows: batches have 8
STEP_NAMES = [k for k in STEP_VARIABLES if k not in ("param_step_sq_tensor", "passes")]


def net(seed=0):
    return mlp((6, 5, 4, 3), seed=seed).double()


def bn_net(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(
            nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 3)
        )
    return m.double().train()


def make_opt(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    if name == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    raise AssertionError(name)


def batch(t, size=8):
    idx = torch.arange(t * size, (t + 1) * size) % len(X)
    return X[idx], Y[idx]


def train(model, opt, steps, tracker=None, states=None, epoch_every=None, step_kwargs=None):
    """Closure-style training (works for every optimizer); optional state/epoch bookkeeping."""
    for t in range(steps):
        xb, yb = batch(t)

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        loss = opt.step(closure, **(step_kwargs or {}))
        if tracker is not None:
            tracker.log(loss=loss)
        if states is not None:
            states.append(copy.deepcopy(model.state_dict()))
        if tracker is not None and epoch_every and (t + 1) % epoch_every == 0:
            tracker.end_epoch(marker=float(t))


def assert_matches_reference(ds, model0, states, probe, output="probs"):
    ref = ref_tracking_trajectory(model0, states, probe, output)
    for name in STEP_NAMES:
        np.testing.assert_allclose(
            ds[name].values, ref[name], rtol=1e-10, atol=1e-14, equal_nan=True, err_msg=name
        )
    per = ds["param_step_sq_tensor"]
    for n in per["tensor"].values:
        want = [row[str(n)] for row in ref["param_step_sq_tensor"]]
        np.testing.assert_allclose(per.sel(tensor=n).values, want, rtol=1e-10, equal_nan=True)
    return ref


@pytest.mark.parametrize(
    "opt_name, output, make",
    [
        ("sgd", "probs", net),
        ("adam", "logits", net),
        ("lbfgs", "log_probs", net),
        ("sgd", "probs", bn_net),
    ],
)
def test_variables_equal_reference_recomputation(opt_name, output, make):
    model = make()
    model0 = copy.deepcopy(model)
    states = [copy.deepcopy(model.state_dict())]
    opt = make_opt(opt_name, model)
    tracker = Tracker(model, PROBE, output=output).attach(opt)
    train(model, opt, 5, tracker, states)
    ds = tracker.dataset
    assert list(ds["step"].values) == list(range(6))
    assert_matches_reference(ds, model0, states, PROBE, output)
    # the breakdown adds up to the total; at step 0 there is no step yet
    np.testing.assert_allclose(ds.param_step_sq_tensor.sum("tensor")[1:], ds.param_step_sq[1:])
    assert np.isnan(ds.param_step_sq[0]) and ds.csdt_param[0] == 0 and ds.csdt_function[0] == 0


def test_csdt_are_running_sums():
    model = net(1)
    twin = copy.deepcopy(model)
    opt, opt_twin = make_opt("sgd", model), make_opt("sgd", twin)
    tracker = Tracker(model, PROBE).attach(opt)
    lean = Tracker(twin, PROBE, per_tensor=False).attach(opt_twin)
    train(model, opt, 7, tracker)
    train(twin, opt_twin, 7, lean)
    ds = tracker.dataset
    xr.testing.assert_allclose(ds.drop_dims("tensor"), lean.dataset, rtol=1e-12)
    for kind in ("param", "function"):
        steps = ds[f"{kind}_step_sq"].values
        np.testing.assert_allclose(ds[f"csdt_{kind}"].values[1:], np.cumsum(steps[1:]))
        assert (steps[1:] > 0).all()


def test_manual_record_without_optimizer_matches_reference():
    model = net(2)
    model0 = copy.deepcopy(model)
    states = [copy.deepcopy(model.state_dict())]
    tracker = Tracker(model, (PROBE, torch.zeros(7)))
    for t in range(4):
        xb, yb = batch(t)
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.4 * p.grad
        tracker.record(passes=2)
        states.append(copy.deepcopy(model.state_dict()))
    ds = tracker.dataset
    assert_matches_reference(ds, model0, states, PROBE)
    assert list(ds.passes.values[1:]) == [2, 2, 2, 2] and np.isnan(ds.passes[0])


class CountingSGD(torch.optim.SGD):
    """A user's own optimizer that reports its passes like fsgeom's optimizers."""

    def step(self, closure=None):
        loss = super().step(closure)
        self.last_step_passes = 5
        return loss


def test_every_k_measures_between_recorded_states_and_sums_passes():
    model = net(3)
    model0 = copy.deepcopy(model)
    states = [copy.deepcopy(model.state_dict())]
    opt = CountingSGD(model.parameters(), lr=0.3)
    tracker = Tracker(model, PROBE, every=3).attach(opt)
    train(model, opt, 8, tracker, states)
    tracker.end_epoch()  # step 8 is not a multiple of 3: recorded now
    ds = tracker.dataset
    assert list(ds.step.values) == [0, 3, 6, 8]
    assert_matches_reference(ds, model0, [states[i] for i in (0, 3, 6, 8)], PROBE)
    np.testing.assert_array_equal(ds.passes.values[1:], [15, 15, 10])
    # logs of recorded steps are kept, others dropped
    assert np.isfinite(ds.loss.values[1:3]).all() and np.isnan(ds.loss.values[3])


@pytest.mark.parametrize("every, steps, expected", [(1, 5, 5), (2, 5, 3), (3, 6, 2)])
def test_exactly_one_probe_forward_per_recorded_step(every, steps, expected):
    model = net(4)
    opt = make_opt("sgd", model)
    tracker = Tracker(model, PROBE, every=every).attach(opt)
    seen = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    train(model, opt, steps, tracker)
    tracker.end_epoch()
    handle.remove()
    assert seen.count(PROBE.shape[0]) == expected == len(tracker.dataset.step) - 1
    assert seen.count(8) == steps  # the training forwards themselves


def test_tracking_changes_nothing_bn_dropout_grads_modes_rng_optimizer():
    def run(tracked):
        model = bn_net(5)
        model[3].eval()  # a submodule in another mode than its parent must stay so
        opt = make_opt("sgd", model)
        tracker = Tracker(model, PROBE).attach(opt) if tracked else None
        torch.manual_seed(123)
        train(model, opt, 4, tracker, epoch_every=2)
        return model, opt, torch.get_rng_state()

    (a, oa, ra), (b, ob, rb) = run(True), run(False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # parameters and BatchNorm running statistics, bitwise
        assert torch.equal(sa[k], sb[k]), k
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    assert not a[3].training and a.training
    assert torch.equal(ra, rb)
    for va, vb in zip(oa.state.values(), ob.state.values()):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])


def test_hcgd_attached():
    try:
        from fsgeom.optim import HCGD
    except ImportError as e:
        pytest.skip(f"fsgeom.optim.HCGD not available: {e}")
    model = net(6)
    model0 = copy.deepcopy(model)
    states = [copy.deepcopy(model.state_dict())]
    opt = HCGD(model.parameters(), lr=0.3, model=model)
    tracker = Tracker(model, PROBE).attach(opt)
    train(model, opt, 3, tracker, states, step_kwargs={"val_inputs": X[:10]})
    ds = tracker.dataset
    assert_matches_reference(ds, model0, states, PROBE)
    assert ds.passes.values[-1] == opt.last_step_passes > 2
    assert ds.attrs["optimizer"] == "HCGD"


def test_log_semantics_and_closure():
    model = net(7)
    opt = make_opt("lbfgs", model)
    tracker = Tracker(model, PROBE).attach(opt)
    tracker.log(loss=10.0)  # before any step: the start
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        calls.append(loss.item())
        tracker.log(inner=float(len(calls)))  # inside step(): the step in progress
        return loss

    opt.step(closure)
    tracker.log(loss=torch.tensor(3.0), acc=np.float32(0.5))  # after: the step just taken
    ds = tracker.dataset
    assert list(ds.loss.values) == [10.0, 3.0]
    assert ds.inner.values[1] == len(calls) and np.isnan(ds.inner.values[0])
    assert ds.acc.values[1] == 0.5


def test_epochs_three_scales():
    model = net(8)
    model0 = copy.deepcopy(model)
    states = [copy.deepcopy(model.state_dict())]
    opt = make_opt("adam", model)
    tracker = Tracker(model, PROBE).attach(opt)
    train(model, opt, 9, tracker, states, epoch_every=3)
    ds = tracker.dataset
    assert list(ds.epoch.values) == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(ds.epoch_end.values) == [1, 2, 3]
    assert list(ds.epoch_end_step.values) == [3, 6, 9]
    ref = ref_tracking_trajectory(model0, [states[i] for i in (0, 3, 6, 9)], PROBE)
    np.testing.assert_allclose(ds.param_dist_epoch, np.sqrt(ref["param_step_sq"][1:]))
    np.testing.assert_allclose(ds.function_dist_epoch, np.sqrt(ref["function_step_sq"][1:]))
    np.testing.assert_allclose(ds.param_dist_init_epoch, ref["param_dist_init"][1:])
    np.testing.assert_allclose(ds.function_dist_init_epoch, ref["function_dist_init"][1:])
    np.testing.assert_array_equal(ds.marker, [2.0, 5.0, 8.0])
    assert set(EPOCH_VARIABLES) <= set(ds.data_vars)


def test_dataset_metadata():
    model = net(9)
    opt = torch.optim.SGD(
        [{"params": model[1].parameters()}, {"params": model[3].parameters(), "lr": 0.1}],
        lr=0.2,
        momentum=0.5,
    )
    tracker = Tracker(model, PROBE, seed=42).attach(opt)
    train(model, opt, 2, tracker)
    ds = tracker.dataset
    a = ds.attrs
    assert a["optimizer"] == "SGD" and a["optimizer_class"] == "torch.optim.sgd.SGD"
    hp = a["optimizer_hyperparameters"]
    assert [g["lr"] for g in hp] == [0.2, 0.1] and hp[0]["momentum"] == 0.5
    json.dumps(hp)
    assert a["num_params"] == sum(p.numel() for p in model.parameters())
    assert a["probe_size"] == 7 and a["output"] == "probs" and a["seed"] == 42
    assert a["fsgeom_version"] == fsgeom.__version__ and a["torch_version"] == torch.__version__
    assert "Linear" in a["model_summary"]
    for name in ds.data_vars:
        assert ds[name].attrs.get("long_name"), name
    for name in STEP_VARIABLES:
        if name in ds:
            assert ds[name].attrs["units"], name
    assert list(ds.tensor.values) == [n for n, _ in model.named_parameters()]


def _run(seed, steps, opt_name="sgd", every=1):
    model = net(seed)
    opt = make_opt(opt_name, model)
    tracker = Tracker(model, PROBE, every=every, seed=seed).attach(opt)
    train(model, opt, steps, tracker, epoch_every=2)
    return tracker.dataset


def test_save_open_roundtrip_exact(tmp_path):
    ds = _run(0, 5)
    path = save_run(ds, tmp_path / "run.nc")
    back = open_run(path)
    xr.testing.assert_identical(ds, back)
    assert back.attrs == ds.attrs
    for k, v in ds.attrs.items():
        assert type(back.attrs[k]) is type(v), k
    for name in ds.variables:
        assert back[name].dtype == ds[name].dtype, name
        assert back[name].attrs == ds[name].attrs, name
    # a combined dataset round-trips too
    c = combine([ds, _run(1, 3)], dim="seed")
    xr.testing.assert_identical(c, open_run(save_run(c, tmp_path / "c.nc")))


def test_incremental_save_loses_at_most_k_steps(tmp_path):
    path = tmp_path / "live.nc"
    model = net(10)
    opt = make_opt("sgd", model)
    tracker = Tracker(model, PROBE, save_path=path, save_every=2).attach(opt)
    train(model, opt, 5, tracker)  # "crash" here: no explicit save
    back = open_run(path)  # written when steps 3 and 5 began
    assert list(back.step.values) == [0, 1, 2, 3, 4]
    live = tracker.dataset.sel(step=slice(0, 4))
    for name in STEP_NAMES + ["loss"]:
        np.testing.assert_array_equal(back[name].values, live[name].values)
    tracker.detach()  # detaching writes everything
    assert list(open_run(path).step.values) == list(range(6))
    # save_path alone: written at each end of epoch (and at detach)
    path2 = tmp_path / "epochs.nc"
    tracker = Tracker(model, PROBE, save_path=path2).attach(opt)
    train(model, opt, 3, tracker)
    assert not path2.exists()
    tracker.end_epoch(acc=1.0)
    assert list(open_run(path2).epoch_end_step.values) == [3]


def test_combine_aligns_on_step():
    a, b = _run(0, 3), _run(1, 6)
    c = combine([a, b], dim="seed")
    assert c.sizes["seed"] == 2 and c.sizes["step"] == 7
    assert list(c.seed.values) == [0, 1]
    np.testing.assert_array_equal(c.csdt_param.sel(seed=0).values[:4], a.csdt_param.values)
    assert np.isnan(c.csdt_param.sel(seed=0).values[4:]).all()
    np.testing.assert_array_equal(c.csdt_param.sel(seed=1).values, b.csdt_param.values)
    np.testing.assert_array_equal(c.epoch.sel(seed=1).values, b.epoch.values)

    runs = {("sgd", 0): a, ("adam", 0): _run(0, 4, "adam"), ("sgd", 1): b}
    g = combine(runs, dim=("optimizer", "seed"))
    assert g.csdt_param.dims == ("optimizer", "seed", "step")
    assert np.isnan(g.csdt_param.sel(optimizer="adam", seed=1)).all()
    np.testing.assert_array_equal(
        g.csdt_param.sel(optimizer="adam", seed=0).values[:5], runs[("adam", 0)].csdt_param
    )
    # attributes that differ become coordinates along the new dims
    hp = g.optimizer_hyperparameters.sel(optimizer="sgd", seed=0).item()
    assert json.loads(hp)["momentum"] == 0.9
    assert g.attrs["output"] == "probs" and "steps" not in g.attrs

    with pytest.raises(ValueError, match="duplicate"):
        combine([a, a], dim="seed")
    with pytest.raises(ValueError, match="attribute 'optimizer_name'"):
        combine([a, b], dim=("optimizer_name", "seed"))


def test_errors_name_the_argument():
    model = net(11)
    with pytest.raises(ValueError, match="output"):
        Tracker(model, PROBE, output="prob")
    with pytest.raises(ValueError, match="every"):
        Tracker(model, PROBE, every=0)
    with pytest.raises(ValueError, match="probe"):
        Tracker(model, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="save_path"):
        Tracker(model, PROBE, save_every=3)
    tracker = Tracker(model, PROBE)
    with pytest.raises(ValueError, match="path"):
        tracker.save()
    with pytest.raises(TypeError, match="optimizer"):
        tracker.attach("sgd")
    with pytest.raises(ValueError, match="does not update"):
        tracker.attach(make_opt("sgd", net(12)))
    opt = make_opt("sgd", model)
    tracker.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(opt)
    with pytest.raises(RuntimeError, match="detach"):
        tracker.record()
    with pytest.raises(ValueError, match="records"):
        tracker.log(csdt_param=1.0)
    with pytest.raises(ValueError, match="scalar"):
        tracker.log(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        tracker.log(loss="low")
    tracker.log(loss=1.0)
    with pytest.raises(ValueError, match="already used"):
        tracker.end_epoch(loss=2.0)


def test_detach_stops_recording():
    model = net(13)
    opt = make_opt("sgd", model)
    tracker = Tracker(model, PROBE).attach(opt)
    train(model, opt, 2, tracker)
    assert tracker.detach() is tracker
    train(model, opt, 2)
    assert tracker.step == 2 and list(tracker.dataset.step.values) == [0, 1, 2]
    # re-attaching continues the same record (start unchanged)
    tracker.attach(opt)
    train(model, opt, 1, tracker)
    ds = tracker.dataset
    assert list(ds.step.values) == [0, 1, 2, 3]
    assert ds.param_step_sq.values[3] > 0 and math.isclose(
        ds.csdt_param.values[3], np.nansum(ds.param_step_sq.values)
    )


def test_nested_and_failed_steps_count_once():
    model = net(14)
    opt = CountingSGD(model.parameters(), lr=0.3)  # its step() calls SGD.step(): nested hooks
    tracker = Tracker(model, PROBE).attach(opt)

    def bad():
        raise ArithmeticError("boom")

    with pytest.raises(ArithmeticError, match="boom"):
        opt.step(bad)
    train(model, opt, 2, tracker)
    assert tracker.step == 2 and list(tracker.dataset.step.values) == [0, 1, 2]
    assert list(tracker.dataset.passes.values[1:]) == [5, 5]
