"""fsgeom.plotting draws from synthetic datasets with the tracker's names and dims."""

import io
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib as mpl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fsgeom import plotting  # noqa: E402

OPTS = ("sgd", "hcgd")
PASSES = {"sgd": 2, "hcgd": 5}


def synthetic(optimizers=OPTS, seeds=(0, 1, 2), epochs=4, steps_per_epoch=5, seed=0):
    """A dataset shaped like ``tracking.combine`` of Tracker runs along optimizer and seed.

    As the tracker writes it: dim ``step`` = 0 (the start: step quantities NaN, running sums
    and distances 0) then 1..T, coordinate ``epoch`` (0 at the start, then the epoch each
    update belongs to); dim ``epoch_end`` = 1..E with coordinate ``epoch_end_step`` = the
    step at the end of each epoch.
    """
    rng = np.random.default_rng(seed)
    n_o, n_s, n_t = len(optimizers), len(seeds), epochs * steps_per_epoch
    shape = (n_o, n_s, n_t + 1)
    step = np.arange(n_t + 1)
    param_sq = rng.uniform(0.5, 1.5, shape) * 1e-2
    func_sq = rng.uniform(0.5, 1.5, shape) * 1e-3
    passes = np.broadcast_to(np.array([PASSES[o] for o in optimizers])[:, None, None], shape)
    passes = passes.astype(float)
    for a in (param_sq, func_sq, passes):
        a[..., 0] = np.nan
    cum_p, cum_f = np.nancumsum(param_sq, -1), np.nancumsum(func_sq, -1)
    ends = np.arange(1, epochs + 1) * steps_per_epoch
    eshape = (n_o, n_s, epochs)
    sdims, edims = ("optimizer", "seed", "step"), ("optimizer", "seed", "epoch_end")
    return xr.Dataset(
        {
            "param_step_sq": (sdims, param_sq),
            "function_step_sq": (sdims, func_sq),
            "csdt_param": (sdims, cum_p),
            "csdt_function": (sdims, cum_f),
            "param_dist_init": (sdims, np.sqrt(cum_p) * 0.9),
            "function_dist_init": (sdims, np.sqrt(cum_f) * 0.8),
            "passes": (sdims, passes),
            "param_dist_epoch": (edims, rng.uniform(0.1, 0.2, eshape)),
            "function_dist_epoch": (edims, rng.uniform(0.01, 0.02, eshape)),
            "param_dist_init_epoch": (edims, np.sqrt(cum_p[..., ends])),
            "function_dist_init_epoch": (edims, np.sqrt(cum_f[..., ends]) * 0.5),
            "train_acc": (edims, rng.uniform(0.8, 1.0, eshape)),
            "test_acc": (edims, rng.uniform(0.7, 0.9, eshape)),
            "train_loss": (edims, rng.uniform(0.1, 0.5, eshape)),
            "test_loss": (edims, rng.uniform(0.2, 0.6, eshape)),
        },
        coords={
            "optimizer": list(optimizers),
            "seed": list(seeds),
            "step": step,
            "epoch": ("step", -(-step // steps_per_epoch)),
            "epoch_end": np.arange(1, epochs + 1),
            "epoch_end_step": ("epoch_end", ends),
        },
    )


@pytest.fixture(autouse=True)
def _close_and_check_style():
    plt.figure()  # resolve the backend before the snapshot (that updates rcParams once)
    plt.close("all")
    before = {k: v for k, v in mpl.rcParams.items() if k != "backend"}
    yield
    after = {k: v for k, v in mpl.rcParams.items() if k != "backend"}
    changed = [k for k in before if before[k] != after[k]]
    plt.close("all")
    assert not changed, f"plotting changed global rcParams: {changed}"


def data_lines(ax):
    """Lines that carry data (seaborn adds empty proxy lines for its legend)."""
    return [ln for ln in ax.lines if len(ln.get_xdata()) > 0]


def legend_texts(ax):
    leg = ax.get_legend()
    return [] if leg is None else [t.get_text() for t in leg.get_texts()]


def bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


# --- accuracy ------------------------------------------------------------------------


def test_accuracy_mean_and_envelope_per_optimizer():
    ds = synthetic()
    ax = plotting.plot_accuracy(ds)
    assert isinstance(ax, Axes)
    lines = data_lines(ax)
    assert len(lines) == len(OPTS)
    assert len(bands(ax)) == len(OPTS)  # one sd envelope each
    assert legend_texts(ax) == list(OPTS)
    mean = ds["test_acc"].mean("seed")
    for ln, opt in zip(lines, OPTS):
        np.testing.assert_allclose(ln.get_xdata(), ds["epoch_end"].values)
        np.testing.assert_allclose(ln.get_ydata(), mean.sel(optimizer=opt).values)
    assert ax.get_ylabel() == "test accuracy"


def test_accuracy_envelope_is_one_standard_deviation():
    ds = synthetic(optimizers=("sgd",))
    ax = plotting.plot_accuracy(ds, split="train")
    (band,) = bands(ax)
    verts = band.get_paths()[0].vertices
    acc = ds["train_acc"].sel(optimizer="sgd")
    sd = acc.std("seed", ddof=1).values
    mean = acc.mean("seed").values
    lo, hi = verts[:, 1].min(), verts[:, 1].max()
    assert lo == pytest.approx((mean - sd).min())
    assert hi == pytest.approx((mean + sd).max())


def test_accuracy_both_splits_error_metric_and_existing_axes():
    ds = synthetic()
    fig, ax = plt.subplots()
    out = plotting.plot_accuracy(ds, split=["train", "test"], metric="error", ax=ax)
    assert out is ax
    lines = data_lines(ax)
    assert len(lines) == 2 * len(OPTS)
    assert {"train", "test", *OPTS} <= set(legend_texts(ax))
    ys = sorted(tuple(np.round(ln.get_ydata(), 12)) for ln in lines)
    expected = sorted(
        tuple(np.round(1 - ds[f"{s}_acc"].sel(optimizer=o).mean("seed").values, 12))
        for s in ("train", "test")
        for o in OPTS
    )
    np.testing.assert_allclose(ys, expected)


def test_accuracy_single_run_without_optimizer_dim():
    ds = synthetic(optimizers=("sgd",), seeds=(0,)).isel(optimizer=0, seed=0, drop=True)
    ax = plotting.plot_accuracy(ds, metric="loss")
    (line,) = data_lines(ax)
    np.testing.assert_allclose(line.get_ydata(), ds["test_loss"].values)
    assert ax.get_legend() is None


def test_passes_axis_is_running_sum_at_epoch_ends():
    ds = synthetic()
    ax = plotting.plot_passes(ds)
    lines = data_lines(ax)
    assert len(lines) == len(OPTS)
    for ln, opt in zip(lines, OPTS):
        total = np.nancumsum(ds["passes"].sel(optimizer=opt, seed=0).values)
        np.testing.assert_allclose(ln.get_xdata(), total[ds["epoch_end_step"].values])
    assert "passes" in ax.get_xlabel()


def test_passes_truncate_at_reference_optimizer():
    ds = synthetic()
    ax = plotting.plot_passes(ds, truncate_at="sgd")
    sgd_total = ds["passes"].sel(optimizer="sgd", seed=0).sum().item()  # skips NaN
    assert ax.get_xlim()[1] == pytest.approx(sgd_total)
    with pytest.raises(ValueError, match="truncate_at"):
        plotting.plot_passes(ds, truncate_at="adam")


# --- CSDT ----------------------------------------------------------------------------


def test_csdt_both_spaces_one_trace_per_seed():
    ds = synthetic()
    fig = plotting.plot_csdt(ds, space="both")
    assert isinstance(fig, Figure)
    top, bottom = fig.axes
    n_runs = ds.sizes["optimizer"] * ds.sizes["seed"]
    assert len(data_lines(top)) == n_runs
    assert len(data_lines(bottom)) == n_runs
    assert legend_texts(top) == list(OPTS)
    assert bottom.get_legend() is None
    assert "function" in top.get_ylabel() and "parameter" in bottom.get_ylabel()
    finals = sorted(ln.get_ydata()[-1] for ln in data_lines(top))
    np.testing.assert_allclose(finals, np.sort(ds["csdt_function"].isel(step=-1).values.ravel()))


@pytest.mark.parametrize("x", ["epoch", "step", "passes"])
def test_csdt_single_space_x_choices(x):
    ds = synthetic()
    ax = plotting.plot_csdt(ds, space="param", x=x, log=True)
    assert isinstance(ax, Axes)
    lines = data_lines(ax)
    assert len(lines) == ds.sizes["optimizer"] * ds.sizes["seed"]
    assert ax.get_yscale() == "log"
    if x == "passes":
        xs = sorted(ln.get_xdata()[-1] for ln in lines)
        expected = sorted(ds["passes"].sum("step").values.ravel())
        np.testing.assert_allclose(xs, expected)


def test_csdt_thinning_keeps_last_step():
    ds = synthetic(epochs=10, steps_per_epoch=30)
    ax = plotting.plot_csdt(ds, space="function", x="step", max_points=20)
    for ln in data_lines(ax):
        assert len(ln.get_xdata()) <= 21
        assert ln.get_xdata()[-1] == ds.sizes["step"] - 1


def test_csdt_runs_of_different_lengths_outer_joined():
    short = synthetic(optimizers=("sgd",), epochs=2)
    long = synthetic(optimizers=("hcgd",), epochs=4)
    ds = xr.concat(
        [short, long], dim="optimizer", join="outer", coords="different", compat="equals"
    )
    ax = plotting.plot_csdt(ds, space="function", x="step")
    lengths = sorted(len(ln.get_xdata()) for ln in data_lines(ax))
    assert lengths == [11] * 3 + [21] * 3


def test_csdt_hue_on_a_run_coordinate():
    ds = synthetic(optimizers=("sgd",)).isel(optimizer=0, drop=True)
    ds = ds.assign_coords(optimizer=("seed", ["sgd", "sgd", "adam"]))
    ax = plotting.plot_csdt(ds, space="function")
    assert len(data_lines(ax)) == 3
    assert legend_texts(ax) == ["sgd", "adam"]


# --- distances at three scales ---------------------------------------------------------


def test_distance_scales_panels_and_ratio():
    ds = synthetic()
    fig = plotting.plot_distance_scales(ds)
    assert isinstance(fig, Figure)
    fig.savefig(io.BytesIO(), format="png")
    a_up, a_ep, a_init, a_ratio = fig.axes[:4]
    n_runs = ds.sizes["optimizer"] * ds.sizes["seed"]
    n_updates = ds.sizes["step"] - 1  # step 0 is the start
    offsets = np.concatenate([c.get_offsets() for c in a_up.collections])
    assert np.isfinite(offsets).all(axis=1).sum() == n_runs * n_updates
    assert sum(len(c.get_offsets()) for c in a_ep.collections) == n_runs * ds.sizes["epoch_end"]
    assert len(data_lines(a_init)) == n_runs
    assert len(data_lines(a_ratio)) == 3 * len(OPTS)  # three scales per optimizer
    assert {"per update", "per epoch", "from init"} <= set(legend_texts(a_ratio))
    # the per-update ratio of epoch e: sqrt(sum f_sq / sum p_sq) over its steps, mean over seeds
    f = ds["function_step_sq"].groupby("epoch").sum()
    p = ds["param_step_sq"].groupby("epoch").sum()
    expected = np.sqrt(f / p).mean("seed").sel(epoch=ds["epoch_end"].values)
    ys = [tuple(ln.get_ydata()) for ln in data_lines(a_ratio)]
    for opt in OPTS:
        want = expected.sel(optimizer=opt).values
        assert any(np.allclose(y, want) for y in ys), opt


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, missing",
    [
        (lambda ds: plotting.plot_accuracy(ds), "test_acc"),
        (lambda ds: plotting.plot_accuracy(ds, split="train"), "train_acc"),
        (lambda ds: plotting.plot_passes(ds), "passes"),
        (lambda ds: plotting.plot_csdt(ds), "csdt_function"),
        (lambda ds: plotting.plot_csdt(ds, space="param"), "csdt_param"),
        (lambda ds: plotting.plot_distance_scales(ds), "function_dist_epoch"),
        (lambda ds: plotting.plot_summary(ds), "csdt_param"),
    ],
)
def test_missing_variable_is_named(call, missing):
    ds = synthetic().drop_vars(missing)
    with pytest.raises(ValueError, match=f"no variable '{missing}'"):
        call(ds)


def test_bad_arguments_are_named():
    ds = synthetic()
    with pytest.raises(ValueError, match="space"):
        plotting.plot_csdt(ds, space="weights")
    with pytest.raises(ValueError, match="split"):
        plotting.plot_accuracy(ds, split="valid")
    with pytest.raises(ValueError, match="metric"):
        plotting.plot_accuracy(ds, metric="f1")
    with pytest.raises(ValueError, match="hue='lr'"):
        plotting.plot_accuracy(ds, hue="lr")
    with pytest.raises(ValueError, match="x must be"):
        plotting.plot_csdt(ds, x="time")
    with pytest.raises(ValueError, match="must have dimension 'epoch_end'"):
        plotting.plot_accuracy(ds.assign(test_acc=ds["csdt_param"]))
    with pytest.raises(TypeError, match="xarray.Dataset"):
        plotting.plot_csdt({"csdt_param": [1, 2]})
    with pytest.raises(ValueError, match="ax is for a single space"):
        plotting.plot_csdt(ds, space="both", ax=plt.subplots()[1])


def test_summary_figure():
    fig = plotting.plot_summary(synthetic())
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # renders every artist (unicode labels included)
    assert buf.getvalue().startswith(b"\x89PNG")
    acc, f, p = fig.axes[:3]
    assert len(data_lines(acc)) == len(OPTS)
    assert len(data_lines(f)) == len(data_lines(p)) == 6


def test_csdt_epoch_axis_is_fractional_between_epoch_ends():
    ds = synthetic(epochs=3, steps_per_epoch=4)
    ax = plotting.plot_csdt(ds, space="function", x="epoch", max_points=None)
    for ln in data_lines(ax):
        x = np.asarray(ln.get_xdata())
        np.testing.assert_allclose(x, ds["step"].values / 4)  # step S_e -> epoch e, linear
    assert ax.get_xlabel() == "epoch"


def test_passes_from_experiment_style_passes_total():
    ds = synthetic().drop_vars("passes")
    with pytest.raises(ValueError, match="no variable 'passes'"):
        plotting.plot_passes(ds)
    total = xr.DataArray([10.0, 20.0, 30.0, 40.0], dims="epoch_end") * xr.DataArray(
        [1.0, 2.5], dims="optimizer", coords={"optimizer": list(OPTS)}
    )
    ds["passes_total"] = total.transpose("optimizer", "epoch_end")
    ax = plotting.plot_passes(ds)
    for ln, opt in zip(data_lines(ax), OPTS):
        np.testing.assert_allclose(ln.get_xdata(), ds["passes_total"].sel(optimizer=opt))


# --- spectra and metric comparison -----------------------------------------------------


def test_spectra_from_dict_sorted_and_normalized():
    import torch

    spectra = {"L2": torch.tensor([0.1, 3.0, 1.0]), "Fisher": np.array([2.0, 0.5, 0.0, 1.0])}
    ax = plotting.plot_spectra(spectra, normalize="max")
    lines = data_lines(ax)
    assert legend_texts(ax) == ["L2", "Fisher"]
    np.testing.assert_allclose(lines[0].get_ydata(), [1.0, 1 / 3, 0.1 / 3])
    np.testing.assert_allclose(lines[1].get_ydata(), [1.0, 0.5, 0.25])  # 0 dropped on log
    np.testing.assert_allclose(lines[1].get_xdata(), [1, 2, 3])
    assert ax.get_yscale() == "log"


def test_spectra_from_dataarray_with_seed_envelope():
    rng = np.random.default_rng(0)
    da = xr.DataArray(
        rng.uniform(0.1, 1.0, (2, 3, 5)),
        dims=("metric", "seed", "rank"),
        coords={"metric": ["l2", "fisher"]},
        name="eigenvalues",
    )
    ax = plotting.plot_spectra(da.to_dataset(), normalize="sum", log=False)
    assert len(data_lines(ax)) == 2 and len(bands(ax)) == 2
    sorted_ = -np.sort(-da.values, axis=-1)
    want = (sorted_ / sorted_.sum(-1, keepdims=True)).mean(1)
    for ln, w in zip(data_lines(ax), want):
        np.testing.assert_allclose(ln.get_ydata(), w)
    with pytest.raises(ValueError, match="dimension 'k'"):
        plotting.plot_spectra(da, rank_dim="k")
    with pytest.raises(ValueError, match="normalize"):
        plotting.plot_spectra(da, normalize="trace")
    with pytest.raises(ValueError, match="1-D"):
        plotting.plot_spectra({"a": np.ones((2, 2))})


def test_metric_comparison_heatmap_from_pairs():
    pairs = {("l2", "fisher"): 0.8, ("l2", "empirical"): 0.3, ("fisher", "empirical"): 0.4}
    ax = plotting.plot_metric_comparison(pairs, title="top-5 overlap")
    mesh = ax.collections[0]
    values = np.asarray(mesh.get_array()).reshape(3, 3)
    assert values[0, 1] == values[1, 0] == pytest.approx(0.8)
    assert np.isnan(values[0, 0])
    texts = [t.get_text() for t in ax.texts]
    assert "0.80" in texts and "0.30" in texts and "0.40" in texts
    assert [t.get_text() for t in ax.get_xticklabels()] == ["l2", "fisher", "empirical"]
    with pytest.raises(TypeError, match="comparison must be"):
        plotting.plot_metric_comparison([0.1, 0.2])


def test_metric_comparison_over_training():
    da = xr.DataArray(
        np.linspace(0, 1, 12).reshape(2, 6),
        dims=("pair", "epoch"),
        coords={"pair": ["fisher~l2", "efisher~l2"], "epoch": np.arange(6)},
        name="overlap",
    )
    ax = plotting.plot_metric_comparison(da, x="epoch", hue="pair")
    lines = data_lines(ax)
    assert len(lines) == 2 and legend_texts(ax) == ["fisher~l2", "efisher~l2"]
    np.testing.assert_allclose(lines[1].get_ydata(), da.sel(pair="efisher~l2"))
    with pytest.raises(ValueError, match="x='step'"):
        plotting.plot_metric_comparison(da, x="step")


# --- with the real Tracker -------------------------------------------------------------


def test_plots_from_real_tracker_runs():
    tracking = pytest.importorskip("fsgeom.tracking", reason="fsgeom.tracking not available")
    import torch

    from fsgeom.models import mlp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny network: thread-pool overhead dominates on busy cores
    try:
        ds = _tracked_runs(tracking, mlp)
    finally:
        torch.set_num_threads(threads)
    ax = plotting.plot_accuracy(ds)
    assert len(data_lines(ax)) == 2
    fig = plotting.plot_csdt(ds)
    assert all(len(data_lines(a)) == 4 for a in fig.axes[:2])
    for ln in data_lines(fig.axes[0]):
        assert ln.get_xdata()[-1] == pytest.approx(3.0)  # 3 epochs
    fig = plotting.plot_distance_scales(ds)
    assert len(data_lines(fig.axes[3])) == 2 * 3
    plotting.plot_summary(ds)


def _tracked_runs(tracking, mlp):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    runs = {}
    for name in ("sgd", "adam"):
        for seed in (0, 1):
            model = mlp((6, 5, 3), seed=seed).double()
            opt = (
                torch.optim.SGD(model.parameters(), lr=0.1)
                if name == "sgd"
                else torch.optim.Adam(model.parameters(), lr=0.01)
            )
            tr = tracking.Tracker(model, x[:16]).attach(opt)
            for _ in range(3):  # epochs of 4 steps
                for b in range(4):
                    xb, yb = x[b * 10 : (b + 1) * 10], y[b * 10 : (b + 1) * 10]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
                with torch.no_grad():
                    acc = (model(x).argmax(1) == y).double().mean().item()
                tr.end_epoch(test_acc=acc, train_acc=acc)
            tr.detach()
            runs[(name, seed)] = tr.dataset
    return tracking.combine(runs, dim=("optimizer", "seed"))


def test_metric_comparison_signed_values_use_a_symmetric_range():
    cos = xr.DataArray(
        [[1.0, -0.5], [-0.5, 1.0]], dims=("a", "b"), coords={"a": ["g", "Fg"], "b": ["g", "Fg"]}
    )
    ax = plotting.plot_metric_comparison(cos)
    assert ax.collections[0].get_clim() == (-1.0, 1.0)
    ax = plotting.plot_metric_comparison({("a", "b"): 0.25})
    assert ax.collections[0].get_clim() == (0.0, 1.0)


def test_spectra_rtol_drops_numerical_zeros():
    ev = {"G": np.array([1.0, 1e-3, 1e-17, -1e-18])}
    ax = plotting.plot_spectra(ev, log=False)
    np.testing.assert_allclose(data_lines(ax)[0].get_ydata(), [1.0, 1e-3])
    ax = plotting.plot_spectra(ev, log=False, rtol=None)
    np.testing.assert_allclose(data_lines(ax)[0].get_ydata(), [1.0, 1e-3, 1e-17, -1e-18])
