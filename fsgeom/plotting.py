"""Seaborn figures from fsgeom datasets (the paper's Fig. 1, 2, 3, 5 and the geometry study).

Every function takes an :class:`xarray.Dataset` written by :class:`fsgeom.tracking.Tracker`
or :func:`fsgeom.experiment.run` — alone, or several combined along extra dimensions such as
``optimizer`` and ``seed`` (:func:`fsgeom.tracking.combine`) — turns the variables it needs
into seaborn long-form data with :meth:`xarray.Dataset.to_dataframe`, and draws.

Conventions (the tracker's data contract):

* per-step variables on dim ``step`` (coordinate ``epoch`` along it): ``param_step_sq``
  ‖θ_{t+1} − θ_t‖², ``function_step_sq`` ‖f_{t+1} − f_t‖² on the probe batch,
  ``csdt_param`` / ``csdt_function`` (their running sums), ``param_dist_init`` /
  ``function_dist_init`` (distances from the initialization), ``passes`` (forward+backward
  passes the step used);
* per-epoch variables on dim ``epoch_end`` (values 1..E, coordinate ``epoch_end_step``):
  ``param_dist_epoch`` / ``function_dist_epoch`` (between consecutive end-of-epoch
  snapshots), ``param_dist_init_epoch`` / ``function_dist_init_epoch``, and the scalars
  given to ``end_epoch`` (``train_acc``, ``test_acc``, ``train_loss``, ``test_loss`` ...).

``hue`` names a dimension or coordinate that tells runs apart (default ``"optimizer"``;
ignored when the dataset has none). Every *other* dimension of a variable (``seed``, a
learning rate, ...) indexes repetitions: envelopes are mean ± sd over them, and "trace"
plots draw one line per repetition.

Single-panel functions draw into ``ax`` (a new figure when ``None``) and return the
:class:`~matplotlib.axes.Axes`; multi-panel functions return the
:class:`~matplotlib.figure.Figure`. No function changes global matplotlib or seaborn
state: styles are applied through context managers only while a new figure is created.
Figures are created with :mod:`matplotlib.pyplot` (so they display inline in notebooks);
close them with ``plt.close(fig)`` in loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

__all__ = [
    "plot_accuracy",
    "plot_csdt",
    "plot_distance_scales",
    "plot_metric_comparison",
    "plot_passes",
    "plot_spectra",
    "plot_summary",
]

STEP, EPOCH_END = "step", "epoch_end"
SPLITS = ("train", "test")
METRICS = ("acc", "error", "loss")
SPACES = ("function", "param", "both")
_STYLE = "whitegrid"
_SPACE_LABEL = {"function": "L² function space", "param": "parameter space"}


# ---------------------------------------------------------------------------------------
# Long-form data


def _check_dataset(ds, func: str) -> xr.Dataset:
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=ds.name or "value")
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{func}: ds must be an xarray.Dataset, got {type(ds).__name__}")
    return ds


def _require(ds: xr.Dataset, names: Sequence[str], func: str, dim: str | None = None) -> None:
    """Raise a ValueError naming every missing variable (and any without dimension ``dim``)."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        which = ", ".join(repr(n) for n in missing)
        raise ValueError(
            f"{func}: the dataset has no variable {which}; it has {sorted(map(str, ds.data_vars))}"
        )
    if dim is not None:
        for n in names:
            if dim not in ds[n].dims:
                raise ValueError(
                    f"{func}: variable {n!r} must have dimension {dim!r}, it has {ds[n].dims}"
                )


def _resolve_hue(ds: xr.Dataset, hue: str | None, func: str) -> str | None:
    if hue is None:
        return None
    if hue in ds.dims or hue in ds.coords:
        return hue
    if hue == "optimizer":  # the default: a single run has no optimizer dimension
        return None
    raise ValueError(
        f"{func}: hue={hue!r} is neither a dimension nor a coordinate of the dataset "
        f"(dims {tuple(map(str, ds.dims))}, coords {tuple(map(str, ds.coords))})"
    )


def _run_dims(ds: xr.Dataset, names: Sequence[str], dim: str) -> list[str]:
    """Dimensions (other than ``dim``) that index runs: optimizer, seed, ..."""
    out: list[str] = []
    for n in names:
        for d in ds[n].dims:
            if d != dim and d not in out:
                out.append(str(d))
    return out


def _frame(ds: xr.Dataset, names: Sequence[str], dim: str) -> pd.DataFrame:
    """Long-form frame of ``names`` (all on ``dim``): one row per run and index of ``dim``.

    Rows where every variable is missing (runs of different lengths combined with an
    outer join) are dropped. Column ``_run`` numbers the runs.
    """
    sub = ds[list(names)]
    df = sub.to_dataframe().reset_index()
    df = df.dropna(subset=list(names), how="all")
    runs = _run_dims(ds, names, dim)
    df["_run"] = df.groupby(runs, sort=False).ngroup() if runs else 0
    return df


def _thin(ds: xr.Dataset, max_points: int | None) -> xr.Dataset:
    """Keep at most about ``max_points`` evenly spaced steps (always the last one)."""
    if max_points is None or STEP not in ds.dims:
        return ds
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2 or None, got {max_points}")
    n = ds.sizes[STEP]
    if n <= max_points:
        return ds
    k = int(np.ceil(n / max_points))
    idx = np.unique(np.r_[np.arange(0, n, k), n - 1])
    return ds.isel({STEP: idx})


def _order(df: pd.DataFrame, col: str | None) -> list | None:
    return None if col is None else list(pd.unique(df[col]))


def _new_axes(ax: Axes | None, figsize=(6.0, 4.0)) -> Axes:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    with sns.axes_style(_STYLE):
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _new_figure(nrows: int, ncols: int, figsize, **kw) -> tuple[Figure, np.ndarray]:
    with sns.axes_style(_STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kw
        )
    return fig, axes


def _with_total_passes(ds: xr.Dataset, func: str) -> xr.Dataset:
    """Add ``total_passes`` on ``step``: the running sum of ``passes`` (NaN where absent).

    A ``passes_cum`` variable (written by :func:`fsgeom.experiment.run`) is used as is.
    """
    if "passes_cum" in ds.variables and STEP in ds["passes_cum"].dims:
        return ds.assign(total_passes=ds["passes_cum"].astype(float))
    if "passes" not in ds.variables:
        raise ValueError(
            f"{func}: the dataset has no variable 'passes' (forward+backward passes per step, "
            "recorded when the optimizer reports last_step_passes); it has "
            f"{sorted(map(str, ds.data_vars))}"
        )
    p = ds["passes"]
    total = p.fillna(0).cumsum(STEP).where(p.notnull())
    return ds.assign(total_passes=total)


def _interp_epoch(step: np.ndarray, ends: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Piecewise-linear epoch position of each step from the end-of-epoch steps."""
    ok = np.isfinite(ends)
    xp = np.r_[0.0, ends[ok].astype(float)]
    fp = np.r_[0.0, epochs[ok].astype(float)]
    order = np.argsort(xp, kind="stable")
    xp, fp = xp[order], fp[order]
    out = np.interp(step.astype(float), xp, fp)
    if len(xp) > 1 and xp[-1] > xp[-2]:
        beyond = step > xp[-1]
        out[beyond] = fp[-1] + (step[beyond] - xp[-1]) / (xp[-1] - xp[-2])
    return out


def _with_epoch_position(ds: xr.Dataset, func: str) -> xr.Dataset:
    """Add ``epoch_position`` on ``step``: fractional epochs (step S_e ↦ e, linear between).

    S_e are the ``epoch_end_step`` values (step 0, the start, is epoch 0). Without them the
    ``epoch`` coordinate is used as is.
    """
    if "epoch_end_step" in ds.variables and STEP in ds.coords and EPOCH_END in ds.dims:
        pos = xr.apply_ufunc(
            _interp_epoch,
            ds[STEP],
            ds["epoch_end_step"],
            ds[EPOCH_END],
            input_core_dims=[[STEP], [EPOCH_END], [EPOCH_END]],
            output_core_dims=[[STEP]],
            vectorize=True,
        )
        return ds.assign(epoch_position=pos)
    if "epoch" in ds.variables:
        return ds.assign(epoch_position=ds["epoch"].astype(float))
    raise ValueError(
        f"{func}: x='epoch' needs the coordinate 'epoch' along 'step' or 'epoch_end_step'"
    )


def _step_x(ds: xr.Dataset, x: str, func: str) -> tuple[xr.Dataset, str, str]:
    """Dataset with the per-step x variable added, its name and an axis label."""
    if x == "epoch":
        return _with_epoch_position(ds, func), "epoch_position", "epoch"
    if x == "step":
        return ds, STEP, "optimizer step"
    if x == "passes":
        return _with_total_passes(ds, func), "total_passes", "total passes (forward + backward)"
    raise ValueError(f"{func}: x must be 'epoch', 'step' or 'passes', got {x!r}")


def _step_to_epoch(df: pd.DataFrame, ends: pd.DataFrame, runs: list[str]) -> pd.Series:
    """The ``epoch_end`` value each step belongs to: the first epoch ending at or after it."""
    out = pd.Series(np.nan, index=df.index)
    keys = runs if runs else None
    groups = df.groupby(keys, sort=False) if keys else [((), df)]
    for key, part in groups:
        if keys:
            key = key if isinstance(key, tuple) else (key,)
            sel = np.ones(len(ends), bool)
            for k, v in zip(keys, key):
                sel &= (ends[k] == v).to_numpy()
            e = ends[sel]
        else:
            e = ends
        e = e.dropna(subset=["epoch_end_step"]).sort_values("epoch_end_step")
        if e.empty:
            continue
        pos = np.searchsorted(e["epoch_end_step"].to_numpy(), part[STEP].to_numpy(), "left")
        ok = pos < len(e)
        vals = np.full(len(part), np.nan)
        vals[ok] = e[EPOCH_END].to_numpy()[pos[ok]]
        out.loc[part.index] = vals
    return out


# ---------------------------------------------------------------------------------------
# Accuracy (Fig. 1, 2, 3)


def _metric_frame(ds, split, metric, func) -> tuple[pd.DataFrame, str, list[str]]:
    splits = [split] if isinstance(split, str) else list(split)
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"{func}: split must be 'train', 'test' or a list of them, got {split!r}")
    if metric not in METRICS:
        raise ValueError(f"{func}: metric must be one of {METRICS}, got {metric!r}")
    stored = "loss" if metric == "loss" else "acc"
    names = [f"{s}_{stored}" for s in splits]
    _require(ds, names, func, dim=EPOCH_END)
    frames = []
    for s, n in zip(splits, names):
        f = _frame(ds, [n], EPOCH_END).rename(columns={n: "value"})
        f["value"] = 1.0 - f["value"] if metric == "error" else f["value"]
        f["split"] = s
        frames.append(f)
    ylabel = {"acc": "accuracy", "error": "error", "loss": "loss"}[metric]
    return pd.concat(frames, ignore_index=True), ylabel, splits


def plot_accuracy(
    ds: xr.Dataset,
    split: str | Sequence[str] = "test",
    x: str = "epoch",
    hue: str | None = "optimizer",
    *,
    metric: str = "acc",
    ax: Axes | None = None,
    truncate_at: str | None = None,
) -> Axes:
    """Accuracy (or error, loss) per epoch: mean ± sd envelope over repetitions (Fig. 1, 3).

    Args:
        ds: dataset with ``{split}_acc`` (or ``{split}_loss``) on dim ``epoch_end``.
        split: ``"test"``, ``"train"`` or both (``["train", "test"]``: line style by split).
        x: ``"epoch"`` (the ``epoch_end`` values), ``"step"`` (``epoch_end_step``) or
            ``"passes"`` (total forward+backward passes at the end of each epoch, Fig. 2).
        hue: dimension/coordinate whose values get one colour each (default ``optimizer``).
        metric: ``"acc"``, ``"error"`` (1 − accuracy) or ``"loss"``.
        ax: axes to draw into; a new figure when ``None``.
        truncate_at: a hue value (e.g. ``"sgd"``): cut the x axis at its largest x, as the
            paper's Fig. 2 truncates at SGD's run time.

    Returns:
        The Axes. Rows are runs × epochs; the envelope is seaborn's ``errorbar="sd"`` over
        every dimension other than ``epoch_end`` and ``hue``.
    """
    func = "plot_accuracy"
    ds = _check_dataset(ds, func)
    hue = _resolve_hue(ds, hue, func)
    df, ylabel, splits = _metric_frame(ds, split, metric, func)
    if x == "epoch":
        xcol, xlabel = EPOCH_END, "epoch"
    elif x == "step":
        _require(ds, ["epoch_end_step"], func)
        xcol, xlabel = "epoch_end_step", "optimizer step"
    elif x == "passes":
        df = _attach_passes(ds, df, func)
        xcol, xlabel = "total_passes", "total passes (forward + backward)"
    else:
        raise ValueError(f"{func}: x must be 'epoch', 'step' or 'passes', got {x!r}")
    ax = _new_axes(ax)
    style = "split" if len(splits) > 1 else None
    sns.lineplot(
        data=df,
        x=xcol,
        y="value",
        hue=hue,
        hue_order=_order(df, hue),
        style=style,
        style_order=splits if style else None,
        errorbar="sd",
        ax=ax,
    )
    if truncate_at is not None:
        if hue is None or truncate_at not in set(df[hue]):
            raise ValueError(f"{func}: truncate_at={truncate_at!r} is not a value of hue={hue!r}")
        ax.set_xlim(right=float(df.loc[df[hue] == truncate_at, xcol].max()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel if len(splits) > 1 else f"{splits[0]} {ylabel}")
    return ax


def _attach_passes(ds: xr.Dataset, df: pd.DataFrame, func: str) -> pd.DataFrame:
    """Join the total passes at each epoch's end onto an ``epoch_end`` frame.

    Uses ``passes_total`` on ``epoch_end`` when present (written by
    :func:`fsgeom.experiment.run`), else the running sum of ``passes`` at ``epoch_end_step``.
    """
    left = df.drop(columns="_run")
    if "passes_total" in ds.variables and EPOCH_END in ds["passes_total"].dims:
        tot = _frame(ds, ["passes_total"], EPOCH_END).drop(columns="_run")
        on = [c for c in tot.columns if c in left.columns and c != "passes_total"]
        on = [c for c in on if c == EPOCH_END or c in ds.dims]
        out = left.merge(tot[[*on, "passes_total"]], on=on, how="left")
        return out.rename(columns={"passes_total": "total_passes"})
    _require(ds, ["epoch_end_step"], func)
    ds = _with_total_passes(ds, func)
    steps = _frame(ds, ["total_passes"], STEP)
    runs = [d for d in _run_dims(ds, ["total_passes"], STEP) if d in df.columns]
    if "epoch_end_step" not in left.columns:
        ends = ds["epoch_end_step"].to_dataframe().reset_index()
        on = [EPOCH_END, *[r for r in runs if r in ends.columns]]
        left = left.merge(ends[[*on, "epoch_end_step"]], on=on)
    right = steps[[STEP, "total_passes", *runs]].rename(columns={STEP: "epoch_end_step"})
    out = left.merge(right, on=["epoch_end_step", *runs], how="left")
    if out["total_passes"].isna().all():
        raise ValueError(
            f"{func}: no 'epoch_end_step' value matches a 'step' of the dataset; cannot place "
            "epochs on the passes axis"
        )
    return out


def plot_passes(
    ds: xr.Dataset,
    split: str | Sequence[str] = "test",
    hue: str | None = "optimizer",
    *,
    metric: str = "acc",
    ax: Axes | None = None,
    truncate_at: str | None = None,
) -> Axes:
    """Accuracy against the total number of forward+backward passes (Fig. 2).

    The x value of epoch e is Σ_{t ≤ epoch_end_step[e]} passes[t], the running sum of the
    per-step ``passes`` variable; mean ± sd envelopes as :func:`plot_accuracy`.
    ``truncate_at="sgd"`` cuts the axis at SGD's total, as in the paper.
    """
    return plot_accuracy(
        ds, split, x="passes", hue=hue, metric=metric, ax=ax, truncate_at=truncate_at
    )


# ---------------------------------------------------------------------------------------
# CSDT (Fig. 5)


def plot_csdt(
    ds: xr.Dataset,
    space: str = "both",
    hue: str | None = "optimizer",
    *,
    x: str = "epoch",
    ax: Axes | None = None,
    log: bool = False,
    max_points: int | None = 2000,
) -> Axes | Figure:
    """Cumulative squared distance traveled, one line per run (Fig. 5).

    CSDT_t = Σ_{s ≤ t} ‖f_{s+1} − f_s‖² (``csdt_function``, L² on the probe batch) or
    Σ_{s ≤ t} ‖θ_{s+1} − θ_s‖² (``csdt_param``). Each repetition (seed, ...) is its own
    trace, coloured by ``hue``.

    Args:
        space: ``"function"``, ``"param"`` or ``"both"`` (two stacked panels, function on
            top as in the paper; returns the Figure).
        x: ``"epoch"``, ``"step"`` or ``"passes"`` (running total of ``passes``).
        ax: axes for a single space (not allowed with ``"both"``).
        log: logarithmic y axis.
        max_points: plot at most about this many evenly spaced steps per trace (``None``:
            all); CSDT is a running sum, so thinning only drops samples of a smooth curve.

    Returns:
        The Axes for one space, the Figure for ``"both"``.
    """
    func = "plot_csdt"
    ds = _check_dataset(ds, func)
    if space not in SPACES:
        raise ValueError(f"{func}: space must be one of {SPACES}, got {space!r}")
    spaces = ["function", "param"] if space == "both" else [space]
    names = [f"csdt_{s}" for s in spaces]
    _require(ds, names, func, dim=STEP)
    hue = _resolve_hue(ds, hue, func)
    ds, xcol, xlabel = _step_x(ds, x, func)
    ds = _thin(ds, max_points)
    if space == "both":
        if ax is not None:
            raise ValueError(f"{func}: ax is for a single space; space='both' makes a figure")
        fig, axes = _new_figure(2, 1, (6.0, 6.5), sharex=True)
        targets = list(axes[:, 0])
    else:
        targets = [_new_axes(ax)]
    for i, (s, n, a) in enumerate(zip(spaces, names, targets)):
        cols = [n] if xcol == STEP else [n, xcol]
        df = _frame(ds, cols, STEP)
        df = df.dropna(subset=[n])
        sns.lineplot(
            data=df,
            x=xcol,
            y=n,
            hue=hue,
            hue_order=_order(df, hue),
            units="_run",
            estimator=None,
            lw=1.0,
            alpha=0.8,
            legend="auto" if i == 0 else False,
            ax=a,
        )
        a.set_ylabel(f"CSDT, {_SPACE_LABEL[s]}")
        a.set_xlabel(xlabel)
        if log:
            a.set_yscale("log")
    return targets[0].figure if space == "both" else targets[0]


# ---------------------------------------------------------------------------------------
# Distances at three scales


_SCALE_VARS = {
    "per update": ("param_step_sq", "function_step_sq"),
    "per epoch": ("param_dist_epoch", "function_dist_epoch"),
    "from init": ("param_dist_init", "function_dist_init"),
}


def plot_distance_scales(
    ds: xr.Dataset,
    hue: str | None = "optimizer",
    *,
    max_points: int | None = 2000,
    log: bool = True,
) -> Figure:
    """Function (L²) distance against parameter distance at three scales, and their ratio.

    Panels: (a) per update, ‖f_{t+1} − f_t‖ = sqrt(function_step_sq) against
    ‖θ_{t+1} − θ_t‖ = sqrt(param_step_sq), one point per (thinned) step; (b) per epoch,
    ``function_dist_epoch`` against ``param_dist_epoch`` (consecutive end-of-epoch
    snapshots); (c) from the initialization, the path (``param_dist_init``,
    ``function_dist_init``); (d) the ratio function / parameter distance against epoch for
    the three scales (line style): per update as sqrt(Σ function_step_sq / Σ param_step_sq)
    over the steps of each epoch, per epoch and from init (``*_init_epoch``) at each
    epoch's end; mean ± sd over repetitions.

    Returns:
        The Figure (2 × 2 axes).
    """
    func = "plot_distance_scales"
    ds = _check_dataset(ds, func)
    step_vars = ["param_step_sq", "function_step_sq", "param_dist_init", "function_dist_init"]
    epoch_vars = [
        "param_dist_epoch",
        "function_dist_epoch",
        "param_dist_init_epoch",
        "function_dist_init_epoch",
    ]
    _require(ds, step_vars + epoch_vars + ["epoch_end_step"], func)
    _require(ds, step_vars, func, dim=STEP)
    _require(ds, epoch_vars, func, dim=EPOCH_END)
    hue = _resolve_hue(ds, hue, func)

    steps_all = _frame(ds, step_vars, STEP)
    runs = [d for d in _run_dims(ds, step_vars, STEP) if d in steps_all.columns]
    steps = _frame(_thin(ds, max_points), step_vars, STEP)
    epochs = _frame(ds, epoch_vars, EPOCH_END)
    if "epoch_end_step" not in epochs.columns:
        ends = ds["epoch_end_step"].to_dataframe().reset_index()
        on = [EPOCH_END, *[r for r in runs if r in ends.columns]]
        epochs = epochs.merge(ends[[*on, "epoch_end_step"]], on=on)
    steps["param_dist"] = np.sqrt(steps["param_step_sq"])
    steps["function_dist"] = np.sqrt(steps["function_step_sq"])

    fig, axes = _new_figure(2, 2, (10.0, 8.0))
    (a_up, a_ep), (a_init, a_ratio) = axes
    order = _order(steps_all, hue)
    common = dict(hue=hue, hue_order=order)
    sns.scatterplot(
        data=steps, x="param_dist", y="function_dist", s=6, alpha=0.4, lw=0, ax=a_up, **common
    )
    sns.scatterplot(
        data=epochs, x="param_dist_epoch", y="function_dist_epoch", ax=a_ep, legend=False, **common
    )
    sns.lineplot(
        data=steps.dropna(subset=["param_dist_init", "function_dist_init"]),
        x="param_dist_init",
        y="function_dist_init",
        units="_run",
        estimator=None,
        sort=False,
        lw=1.0,
        ax=a_init,
        legend=False,
        **common,
    )
    titles = ("per update", "per epoch", "from initialization")
    for a, title in zip((a_up, a_ep, a_init), titles):
        a.set_title(title)
        a.set_xlabel("parameter distance ‖Δθ‖")
        a.set_ylabel("L² function distance ‖Δf‖")
        if log:
            a.set_xscale("log")
            a.set_yscale("log")
            a.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges: no crowded labels

    # ratio over time
    steps_all["epoch_end"] = _step_to_epoch(steps_all, epochs, runs)
    keys = ["epoch_end", *runs] + ([hue] if hue is not None and hue not in runs else [])
    per_update = (
        steps_all.dropna(subset=["epoch_end"])
        .groupby(keys, sort=False)[["function_step_sq", "param_step_sq"]]
        .sum()
        .reset_index()
    )
    per_update["ratio"] = np.sqrt(per_update["function_step_sq"] / per_update["param_step_sq"])
    per_update["scale"] = "per update"
    per_epoch = epochs[keys].copy()
    per_epoch["ratio"] = epochs["function_dist_epoch"] / epochs["param_dist_epoch"]
    per_epoch["scale"] = "per epoch"
    from_init = epochs[keys].copy()
    from_init["ratio"] = epochs["function_dist_init_epoch"] / epochs["param_dist_init_epoch"]
    from_init["scale"] = "from init"
    ratios = pd.concat([per_update, per_epoch, from_init], ignore_index=True)
    ratios = ratios.replace([np.inf, -np.inf], np.nan).dropna(subset=["ratio"])
    sns.lineplot(
        data=ratios,
        x="epoch_end",
        y="ratio",
        style="scale",
        style_order=["per update", "per epoch", "from init"],
        errorbar="sd",
        ax=a_ratio,
        **common,
    )
    if a_ratio.get_legend() is not None:
        sns.move_legend(a_ratio, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    a_ratio.set_title("ratio over training")
    a_ratio.set_xlabel("epoch")
    a_ratio.set_ylabel("‖Δf‖ / ‖Δθ‖")
    if log:
        a_ratio.set_yscale("log")
    return fig


# ---------------------------------------------------------------------------------------
# Summary (accuracy + CSDT), used by the demo


def plot_summary(ds: xr.Dataset, hue: str | None = "optimizer", *, x: str = "epoch") -> Figure:
    """One figure: test accuracy (mean ± sd), CSDT in L² and in parameter space (traces).

    Needs ``test_acc`` on ``epoch_end`` and ``csdt_function``, ``csdt_param`` on ``step``.
    """
    func = "plot_summary"
    ds = _check_dataset(ds, func)
    _require(ds, ["test_acc"], func, dim=EPOCH_END)
    _require(ds, ["csdt_function", "csdt_param"], func, dim=STEP)
    fig, axes = _new_figure(1, 3, (14.0, 4.0))
    plot_accuracy(ds, "test", hue=hue, ax=axes[0, 0])
    plot_csdt(ds, "function", hue=hue, x=x, ax=axes[0, 1])
    plot_csdt(ds, "param", hue=hue, x=x, ax=axes[0, 2])
    for a in axes[0, 1:]:
        if a.get_legend() is not None:
            a.get_legend().remove()
    return fig


# ---------------------------------------------------------------------------------------
# Fisher vs L²: spectra and comparisons


def _as_numpy(values, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array of eigenvalues, got {arr.shape}")
    return arr


def _spectra_frame(spectra, hue: str, rank_dim: str, var: str, func: str) -> pd.DataFrame:
    if isinstance(spectra, Mapping) and not isinstance(spectra, xr.Dataset):
        if not spectra:
            raise ValueError(f"{func}: spectra is empty")
        frames = []
        for name, values in spectra.items():
            ev = np.sort(_as_numpy(values, f"{func}: spectra[{name!r}]"))[::-1]
            frames.append(
                pd.DataFrame({hue: str(name), "rank": np.arange(1, ev.size + 1), var: ev})
            )
        return pd.concat(frames, ignore_index=True)
    if isinstance(spectra, xr.Dataset):
        _require(spectra, [var], func)
        spectra = spectra[var]
    if not isinstance(spectra, xr.DataArray):
        raise TypeError(
            f"{func}: spectra must be a dict name -> eigenvalues or an xarray "
            f"Dataset/DataArray, got {type(spectra).__name__}"
        )
    if rank_dim not in spectra.dims:
        raise ValueError(
            f"{func}: the eigenvalues need a dimension {rank_dim!r} (pass rank_dim=...); "
            f"they have {spectra.dims}"
        )
    # sort each spectrum in decreasing order along the rank dimension
    da = xr.apply_ufunc(
        lambda a: -np.sort(-a, axis=-1),
        spectra,
        input_core_dims=[[rank_dim]],
        output_core_dims=[[rank_dim]],
    )
    da = da.assign_coords({rank_dim: np.arange(1, da.sizes[rank_dim] + 1)})
    df = da.rename(var).to_dataframe().reset_index().rename(columns={rank_dim: "rank"})
    return df.dropna(subset=[var])


def plot_spectra(
    spectra,
    *,
    ax: Axes | None = None,
    normalize: str | None = None,
    hue: str = "metric",
    rank_dim: str = "rank",
    var: str = "eigenvalues",
    log: bool = True,
    rtol: float | None = 1e-12,
) -> Axes:
    """Eigenvalue spectra of several metrics (L², Fisher, empirical Fisher), largest first.

    Args:
        spectra: a dict ``name -> eigenvalues`` (1-D tensor or array, any order), or an
            xarray DataArray / Dataset (variable ``var``) with a rank dimension ``rank_dim``
            and a dimension or coordinate ``hue`` naming the metric; any other dimension
            (seed, batch) is averaged with a ± sd envelope.
        normalize: ``None``; ``"max"`` divides each spectrum by its largest eigenvalue;
            ``"sum"`` by its trace (the sum of the eigenvalues given).
        log: logarithmic y axis; non-positive eigenvalues are left out there.
        rtol: leave out eigenvalues below ``rtol`` × the spectrum's largest: the numerical
            zeros of a rank-deficient PSD matrix (these metrics have rank ≤ N·C), which in
            float64 scatter around 1e-16·λ_1. ``None`` keeps every value.

    Returns:
        The Axes: y = λ_k against k = 1, 2, ... (one line per metric).
    """
    func = "plot_spectra"
    if normalize not in (None, "max", "sum"):
        raise ValueError(f"{func}: normalize must be None, 'max' or 'sum', got {normalize!r}")
    df = _spectra_frame(spectra, hue, rank_dim, var, func)
    if hue not in df.columns:
        raise ValueError(f"{func}: hue={hue!r} is not a dimension or coordinate of the spectra")
    others = [c for c in df.columns if c not in (hue, "rank", var)]
    keys = [hue, *others]
    if rtol is not None:
        df = df[df[var] >= rtol * df.groupby(keys, sort=False)[var].transform("max")].copy()
    if normalize is not None:
        agg = "max" if normalize == "max" else "sum"
        df[var] = df[var] / df.groupby(keys, sort=False)[var].transform(agg)
    if log:
        df = df[df[var] > 0]
    ax = _new_axes(ax)
    sns.lineplot(
        data=df,
        x="rank",
        y=var,
        hue=hue,
        hue_order=_order(df, hue),
        errorbar="sd" if others else None,
        ax=ax,
    )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("rank k")
    label = {None: "eigenvalue λ_k", "max": "λ_k / λ_1", "sum": "λ_k / Σ λ"}[normalize]
    ax.set_ylabel(label)
    return ax


def _pairs_matrix(comparison, func: str) -> pd.DataFrame:
    """A square frame from {(a, b): v}, {a: {b: v}}, a DataFrame or a 2-D DataArray."""
    if isinstance(comparison, pd.DataFrame):
        return comparison
    if isinstance(comparison, xr.DataArray):
        if comparison.ndim != 2:
            raise ValueError(
                f"{func}: a DataArray comparison must be 2-D (metric × metric) unless x is "
                f"given, got dims {comparison.dims}"
            )
        return comparison.to_pandas()
    if isinstance(comparison, Mapping) and comparison:
        first = next(iter(comparison.values()))
        if isinstance(first, Mapping):
            return pd.DataFrame(comparison).T
        if all(isinstance(k, tuple) and len(k) == 2 for k in comparison):
            names = list(dict.fromkeys(n for k in comparison for n in k))
            m = pd.DataFrame(np.nan, index=names, columns=names)
            for (a, b), v in comparison.items():
                v = float(v.item() if hasattr(v, "item") else v)
                m.loc[a, b] = v
                if pd.isna(m.loc[b, a]):
                    m.loc[b, a] = v
            return m
    raise TypeError(
        f"{func}: comparison must be a dict {{(a, b): value}}, a dict of dicts, a DataFrame, "
        f"or an xarray DataArray/Dataset; got {type(comparison).__name__}"
    )


def plot_metric_comparison(
    comparison,
    *,
    x: str | None = None,
    hue: str | None = None,
    var: str | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Axes:
    """Compare metrics (L², Fisher, empirical Fisher): a matrix, or a quantity over training.

    Two forms:

    * ``x=None``: a heatmap of a pairwise quantity, e.g. the overlap of the top-k
      eigenspaces ‖U_aᵀU_b‖_F² / k or the cosine alignment of preconditioned directions.
      ``comparison`` is ``{(a, b): value}`` (mirrored when ``(b, a)`` is absent), a dict of
      dicts, a square DataFrame or a 2-D DataArray (such as
      :func:`fsgeom.compare.direction_alignment`). Cells are annotated. The colour range
      defaults to [0, 1] for values in [0, 1] and to [−1, 1] (diverging colours) when some
      value is negative, as for cosine similarities; ``vmin``/``vmax`` override it.
    * ``x="epoch"`` (any dimension name): ``comparison`` is an xarray DataArray, or a Dataset
      with variable ``var``, along ``x``; one line per value of ``hue`` (e.g. a ``pair``
      dimension such as "fisher vs l2"), mean ± sd over any other dimension.

    Returns:
        The Axes.
    """
    func = "plot_metric_comparison"
    if x is None:
        m = _pairs_matrix(comparison, func).astype(float)
        values = m.to_numpy()
        lo, hi = np.nanmin(values), np.nanmax(values)
        signed = bool(lo < 0 or (vmin is not None and vmin < 0))
        if vmin is None:
            vmin = -1.0 if signed and lo >= -1 else (0.0 if lo >= 0 and hi <= 1 else None)
        if vmax is None:
            vmax = 1.0 if hi <= 1 and (signed or lo >= 0) else None
        ax = _new_axes(ax, figsize=(1.1 * len(m.columns) + 2.5, 0.9 * len(m.index) + 1.5))
        sns.heatmap(
            m,
            annot=True,
            fmt=".2f",
            vmin=vmin,
            vmax=vmax,
            cmap="vlag" if signed else "viridis",
            square=True,
            ax=ax,
        )
        ax.grid(False)
        if title:
            ax.set_title(title)
        return ax
    if isinstance(comparison, xr.Dataset):
        if var is None:
            if len(comparison.data_vars) != 1:
                raise ValueError(
                    f"{func}: the Dataset has variables {sorted(map(str, comparison.data_vars))}"
                    "; choose one with var=..."
                )
            var = str(next(iter(comparison.data_vars)))
        _require(comparison, [var], func)
        comparison = comparison[var]
    if not isinstance(comparison, xr.DataArray):
        raise TypeError(
            f"{func}: with x={x!r} comparison must be an xarray DataArray or Dataset, got "
            f"{type(comparison).__name__}"
        )
    if x not in comparison.dims and x not in comparison.coords:
        raise ValueError(f"{func}: x={x!r} is not a dimension of the comparison {comparison.dims}")
    if hue is not None and hue not in comparison.dims and hue not in comparison.coords:
        raise ValueError(f"{func}: hue={hue!r} is not a dimension of the comparison")
    name = var or comparison.name or "value"
    df = comparison.rename(name).to_dataframe().reset_index().dropna(subset=[name])
    ax = _new_axes(ax)
    sns.lineplot(data=df, x=x, y=name, hue=hue, hue_order=_order(df, hue), errorbar="sd", ax=ax)
    if title:
        ax.set_title(title)
    return ax
