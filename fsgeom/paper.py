"""The paper's experiments as data: config lists, sweeps, figures and summaries.

Each entry of :data:`FIGURES` turns options (``quick``, seeds, epochs, …) into a list of
:class:`fsgeom.experiment.RunConfig`, runs them with :func:`fsgeom.experiment.sweep`
(resuming runs already saved in the shared run cache ``<root>/runs``), writes the combined
dataset (netCDF), PNG figures and a summary table (CSV) into ``<root>/<name>``.
:func:`reproduce` is what both the ``analyses/*.py`` scripts and ``fsgeom reproduce`` call.

Settings (paper §3; epochs are not stated in the paper — ours are in each entry):

* ``fig1_mlp_mnist``: MLP 784-90-50-10 on MNIST, batch 64, SGD vs HCGD n=1 with momentum
  (ε = 0.04, β = 0.9) and without (ε = 0.1), and HCGD n=10 with momentum (Fig. 1b);
  λ = 0.5, η = 0.02; validation batch 256 from the training set; 10 seeds × 50 epochs;
  probe 256 training images.
* ``fig2_passes``: the same runs against cumulative forward+backward passes.
* ``fig3_cnn_bn_mnist``: the BatchNorm CNN, SGD, Adam and HCGD (n=1).
* ``fig4_squeezenet_cifar10``: SqueezeNet v1.1 on CIFAR-10 (binary batches), SGD ε = 0.1 and
  HCGD ε = 0.1 and 0.3, learning rates (and η) divided by 10 after epoch 150. GPU-scale.
* ``fig5_csdt``: CSDT in L² and parameter space of the Fig. 1 runs (SGD, HCGD n=1).
* ``distance_scales``: function vs parameter distance at three scales (MLP and BN CNN).
* ``fisher_vs_l2``: L² metric vs exact / Monte-Carlo / empirical Fisher on small networks
  (needs :mod:`fsgeom.curvature`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .experiment import RunConfig, open_result, save_result, sweep

__all__ = ["FIGURES", "Options", "FigureSpec", "reproduce", "summarize", "mnist_or_digits"]

LAM, ETA, VAL_BATCH = 0.5, 0.02, 256


@dataclass
class Options:
    """What a user may change about an analysis (``None``: the analysis' own choice)."""

    quick: bool = False
    seeds: int | None = None
    epochs: int | None = None
    train_size: int | None = None
    dataset: str | None = None
    n10_seeds: int | None = None
    n10_epochs: int | None = None
    data_root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FigureSpec:
    """One analysis: how to build its configs, the sweep dims, and how to draw/summarize."""

    name: str
    title: str
    configs: Callable[[Options], list[RunConfig]] | None
    dims: tuple[str, ...] = ("optimizer", "seed")
    plots: Callable[[xr.Dataset, Path], list[Path]] | None = None
    custom: Callable[[Options, Path], xr.Dataset] | None = None  # not a sweep
    gpu_scale: bool = False


def mnist_or_digits(requested: str | None = None) -> str:
    """``requested``, else ``"mnist"`` when its files are found, else the embedded digits."""
    if requested:
        return requested
    from .data import MNIST_FILES, mnist_root

    root = mnist_root()
    ok = all((root / f"{s}.gz").is_file() or (root / s).is_file() for s in MNIST_FILES)
    return "mnist" if ok else "digits"


def _pick(value, default):
    return default if value is None else value


# ---------------------------------------------------------------------------------------
# Config builders


def _mlp_runs(opts: Options, variants: tuple[str, ...]) -> list[RunConfig]:
    """Fig. 1 / 2 / 5 runs: {momentum, plain} × variants × seeds."""
    quick = opts.quick
    dataset = mnist_or_digits(opts.dataset)
    seeds = _pick(opts.seeds, 2 if quick else 10)
    epochs = _pick(opts.epochs, 3 if quick else 50)
    n10_seeds = min(seeds, _pick(opts.n10_seeds, 1 if quick else seeds))
    n10_epochs = min(epochs, _pick(opts.n10_epochs, epochs))
    train_size = _pick(opts.train_size, 6000 if quick and dataset == "mnist" else None)
    out = []
    # seeds outermost and n=10 last: a sweep cut short still holds complete seeds
    for n_group in (
        (v for v in variants if v != "HCGD n=10"),
        (v for v in variants if v == "HCGD n=10"),
    ):
        group = list(n_group)
        for seed in range(seeds):
            for momentum, lr in ((0.9, 0.04), (0.0, 0.1)):
                for v in group:
                    if v == "SGD":
                        opt, hp, ep = "sgd", {"lr": lr, "momentum": momentum}, epochs
                    else:
                        n = 10 if v == "HCGD n=10" else 1
                        hp = {
                            "lr": lr,
                            "momentum": momentum,
                            "lam": LAM,
                            "inner_lr": ETA,
                            "n_corrections": n,
                        }
                        opt = "hcgd"
                        if n == 10 and (seed >= n10_seeds or momentum == 0.0):
                            continue  # n=10 only with momentum, as the paper's Fig. 1b
                        ep = n10_epochs if n == 10 else epochs
                    out.append(
                        RunConfig(
                            dataset=dataset,
                            model="mlp",
                            optimizer=opt,
                            hparams=hp,
                            epochs=ep,
                            batch_size=64,
                            val_batch_size=VAL_BATCH,
                            probe_size=256,
                            seed=seed,
                            train_size=train_size,
                            data_root=opts.data_root,
                            label=v,
                        )
                    )
    return out


def fig1_configs(opts: Options) -> list[RunConfig]:
    return _mlp_runs(opts, ("SGD", "HCGD n=1", "HCGD n=10"))


def fig5_configs(opts: Options) -> list[RunConfig]:
    return _mlp_runs(opts, ("SGD", "HCGD n=1"))


def fig3_configs(opts: Options) -> list[RunConfig]:
    dataset = mnist_or_digits(opts.dataset)
    seeds = _pick(opts.seeds, 2 if opts.quick else 10)
    epochs = _pick(opts.epochs, 2 if opts.quick else 30)
    train_size = _pick(opts.train_size, 3000 if opts.quick and dataset == "mnist" else None)
    lr = 0.01
    variants = {
        "SGD": ("sgd", {"lr": lr, "momentum": 0.9}),
        "Adam": ("adam", {"lr": 1e-3}),
        "HCGD": (
            "hcgd",
            {"lr": lr, "momentum": 0.9, "lam": LAM, "inner_lr": ETA, "n_corrections": 1},
        ),
    }
    return [
        RunConfig(
            dataset=dataset,
            model="cnn_bn",
            optimizer=opt,
            hparams=hp,
            epochs=epochs,
            batch_size=64,
            val_batch_size=VAL_BATCH,
            probe_size=256,
            seed=seed,
            train_size=train_size,
            test_size=2000 if opts.quick else None,
            data_root=opts.data_root,
            label=label,
        )
        for label, (opt, hp) in variants.items()
        for seed in range(seeds)
    ]


def fig4_configs(opts: Options) -> list[RunConfig]:
    seeds = _pick(opts.seeds, 1 if opts.quick else 3)
    epochs = _pick(opts.epochs, 1 if opts.quick else 200)
    milestones = (150,) if epochs > 150 else ()
    train_size = _pick(opts.train_size, 512 if opts.quick else None)
    variants = {
        "SGD ε=0.1": ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
        "HCGD ε=0.1": ("hcgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
        "HCGD ε=0.3": ("hcgd", {"lr": 0.3, "momentum": 0.9, "weight_decay": 5e-4}),
    }
    out = []
    for label, (opt, hp) in variants.items():
        if opt == "hcgd":
            hp = {**hp, "lam": LAM, "inner_lr": ETA, "n_corrections": 1}
        for seed in range(seeds):
            out.append(
                RunConfig(
                    dataset=_pick(opts.dataset, "cifar10"),
                    model="squeezenet",
                    optimizer=opt,
                    hparams=hp,
                    epochs=epochs,
                    batch_size=128,
                    val_batch_size=VAL_BATCH if not opts.quick else 64,
                    probe_size=256 if not opts.quick else 64,
                    eval_batch_size=500,
                    seed=seed,
                    lr_milestones=milestones,
                    train_size=train_size,
                    test_size=512 if opts.quick else None,
                    track_every=1 if not opts.quick else 1,
                    data_root=opts.data_root,
                    label=label,
                )
            )
    return out


def distance_configs(opts: Options) -> list[RunConfig]:
    dataset = mnist_or_digits(opts.dataset)
    seeds = _pick(opts.seeds, 1 if opts.quick else 3)
    epochs = _pick(opts.epochs, 3 if opts.quick else 30)
    out = []
    for model, train_size in (("mlp", 6000), ("cnn_bn", 3000)):
        ts = _pick(opts.train_size, train_size if opts.quick and dataset == "mnist" else None)
        for label, opt, hp in (
            ("SGD", "sgd", {"lr": 0.04 if model == "mlp" else 0.01, "momentum": 0.9}),
            (
                "HCGD",
                "hcgd",
                {
                    "lr": 0.04 if model == "mlp" else 0.01,
                    "momentum": 0.9,
                    "lam": LAM,
                    "inner_lr": ETA,
                    "n_corrections": 1,
                },
            ),
        ):
            for seed in range(seeds):
                out.append(
                    RunConfig(
                        dataset=dataset,
                        model=model,
                        optimizer=opt,
                        hparams=hp,
                        epochs=epochs,
                        batch_size=64,
                        seed=seed,
                        train_size=ts,
                        test_size=2000 if opts.quick else None,
                        data_root=opts.data_root,
                        label=label,
                    )
                )
    return out


# ---------------------------------------------------------------------------------------
# Figures (the only place that draws)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _momentum_panels(ds: xr.Dataset, draw, out: Path, title: str) -> Path:
    """One column per momentum setting; ``draw(sub, ax)`` fills each axes."""
    import matplotlib.pyplot as plt

    values = list(ds["momentum"].values) if "momentum" in ds.dims else [None]
    fig, axes = plt.subplots(1, len(values), figsize=(6 * len(values), 4.2), squeeze=False)
    for ax, m in zip(axes[0], values):
        sub = ds if m is None else ds.sel(momentum=m)
        draw(sub, ax)
        ax.set_title(f"{title} — " + ("with momentum" if m and m > 0 else "no momentum"))
    fig.tight_layout()
    return _save(fig, out)


def plot_fig1(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    from .plotting import plot_accuracy

    return [
        _momentum_panels(
            ds,
            lambda s, ax: plot_accuracy(s, ["train", "test"], hue="optimizer", ax=ax),
            out_dir / "accuracy.png",
            "MLP on MNIST",
        ),
        _momentum_panels(
            ds,
            lambda s, ax: plot_accuracy(s, "test", hue="optimizer", metric="error", ax=ax),
            out_dir / "test_error.png",
            "MLP on MNIST",
        ),
    ]


def plot_fig2(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    from .plotting import plot_passes

    return [
        _momentum_panels(
            ds,
            lambda s, ax: plot_passes(s, ["train", "test"], hue="optimizer", ax=ax),
            out_dir / "accuracy_vs_passes.png",
            "MLP on MNIST",
        )
    ]


def plot_fig3(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from .plotting import plot_accuracy

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_accuracy(ds, "test", hue="optimizer", ax=axes[0])
    plot_accuracy(ds, "train", hue="optimizer", ax=axes[1])
    axes[0].set_title("BN CNN on MNIST — test")
    axes[1].set_title("BN CNN on MNIST — train")
    fig.tight_layout()
    return [_save(fig, out_dir / "accuracy.png")]


def plot_fig4(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from .plotting import plot_accuracy

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_accuracy(ds, "test", hue="optimizer", metric="error", ax=axes[0])
    plot_accuracy(ds, "train", hue="optimizer", metric="error", ax=axes[1])
    axes[0].set_title("SqueezeNet v1.1 on CIFAR-10 — test error")
    axes[1].set_title("train error")
    fig.tight_layout()
    return [_save(fig, out_dir / "error.png")]


def plot_fig5(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from .plotting import plot_csdt

    values = list(ds["momentum"].values) if "momentum" in ds.dims else [None]
    fig, axes = plt.subplots(2, len(values), figsize=(6 * len(values), 8), squeeze=False)
    for j, m in enumerate(values):
        sub = ds if m is None else ds.sel(momentum=m)
        label = "with momentum" if m and m > 0 else "no momentum"
        for i, space in enumerate(("function", "param")):
            plot_csdt(sub, space, hue="optimizer", ax=axes[i, j])
            axes[i, j].set_title(f"CSDT in {'L²' if space == 'function' else 'parameter'} "
                                 f"space — {label}")  # fmt: skip
    fig.tight_layout()
    return [_save(fig, out_dir / "csdt.png")]


def plot_distance(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    from .plotting import plot_distance_scales

    paths = []
    models = list(ds["model"].values) if "model" in ds.dims else [None]
    for m in models:
        sub = ds if m is None else ds.sel(model=m)
        fig = plot_distance_scales(sub, hue="optimizer")
        fig.suptitle(f"function vs parameter distance — {m or ''}")
        paths.append(_save(fig, out_dir / f"distance_scales_{m or 'run'}.png"))
    return paths


def plot_summary_figure(ds: xr.Dataset, path: Path) -> Path:
    """CSDT + accuracy summary of a sweep (used by ``fsgeom demo`` and ``fsgeom plot``)."""
    from .plotting import plot_summary

    return _save(plot_summary(ds, hue="optimizer" if "optimizer" in ds.dims else None), path)


# ---------------------------------------------------------------------------------------
# Summary


def _mean_sd(da: xr.DataArray, over: list[str]) -> tuple[float, float, int]:
    v = np.asarray(da.values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _last(da: xr.DataArray, dim: str) -> xr.DataArray:
    """The last non-NaN value along ``dim`` for every run (NaN if none)."""
    a = np.moveaxis(np.asarray(da.values, dtype=float), da.get_axis_num(dim), -1)
    ok = np.isfinite(a)
    idx = np.where(ok.any(-1), a.shape[-1] - 1 - np.argmax(ok[..., ::-1], -1), 0)
    last = np.take_along_axis(a, idx[..., None], -1)[..., 0]
    return xr.DataArray(np.where(ok.any(-1), last, np.nan), dims=[d for d in da.dims if d != dim])


def summarize(ds: xr.Dataset, group: tuple[str, ...] = ("optimizer",)):
    """A pandas table: per group (e.g. momentum × optimizer), mean ± sd over seeds of the
    final test/train accuracy, final CSDT in function and parameter space, total passes."""
    import pandas as pd

    group = tuple(g for g in group if g in ds.dims)
    other = [d for d in ("seed",) if d in ds.dims]
    rows = []
    keys = (
        [()]
        if not group
        else list(pd.MultiIndex.from_product([ds[g].values for g in group]).tolist())
    )
    for key in keys:
        key = key if isinstance(key, tuple) else (key,)
        sub = ds.sel(dict(zip(group, key))) if group else ds
        row = dict(zip(group, key))
        n_runs = 0
        for var, dim, name in (
            ("test_acc", "epoch_end", "final test acc"),
            ("train_acc", "epoch_end", "final train acc"),
            ("csdt_function", "step", "CSDT L²"),
            ("csdt_param", "step", "CSDT param"),
            ("passes_total", "epoch_end", "total passes"),
        ):
            if var not in sub:
                continue
            m, s, n = _mean_sd(_last(sub[var], dim), other)
            row[f"{name} mean"] = m
            row[f"{name} sd"] = s
            n_runs = max(n_runs, n)
        row["runs"] = n_runs
        if n_runs:
            if "epoch_end" in sub.dims and "test_acc" in sub:
                e = sub["test_acc"].dropna("epoch_end", how="all")
                row["epochs"] = int(e["epoch_end"].max()) if e.sizes["epoch_end"] else 0
            rows.append(row)
    return pd.DataFrame(rows)


def format_summary(df) -> str:
    """The summary table as text, with mean ± sd columns."""
    cols = [c for c in df.columns if not c.endswith(" mean") and not c.endswith(" sd")]
    names = [c[: -len(" mean")] for c in df.columns if c.endswith(" mean")]
    lines = []
    header = [*cols, *names]
    table = []
    for _, r in df.iterrows():
        cells = [str(r[c]) for c in cols]
        for n in names:
            m, s = r[f"{n} mean"], r[f"{n} sd"]
            if "acc" in n:
                cells.append(f"{m:.4f} ± {s:.4f}")
            elif "passes" in n:
                cells.append(f"{m:.0f}")
            else:
                cells.append(f"{m:.4g} ± {s:.2g}")
        table.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# fisher_vs_l2 (not a training sweep)


def _fisher_setups(opts: Options) -> list[dict[str, Any]]:
    if opts.quick:
        return [
            {"name": "digits_mlp_small", "dataset": "digits", "sizes": (64, 24, 10),
             "epochs": _pick(opts.epochs, 3), "checkpoints": (0, 1, 3), "n": 256, "k": 8}
        ]  # fmt: skip
    setups = [
        {"name": "digits_mlp", "dataset": "digits", "sizes": (64, 90, 50, 10),
         "epochs": _pick(opts.epochs, 20), "checkpoints": (0, 1, 2, 5, 10, 20), "n": 512,
         "k": 20}
    ]  # fmt: skip
    if mnist_or_digits(opts.dataset) == "mnist":
        setups.append(
            {"name": "mnist_mlp", "dataset": "mnist", "sizes": (784, 90, 50, 10),
             "epochs": _pick(opts.epochs, 5), "checkpoints": (0, 1, 5), "n": 512, "k": 10}
        )  # fmt: skip
    return setups


PAIRS = (
    ("Fisher", "L2"),
    ("Fisher", "Fisher MC"),
    ("Fisher", "Empirical Fisher"),
    ("L2", "Empirical Fisher"),
)


def _fisher_measure(model, x, y, k: int, seed: int, damping: float) -> dict[str, Any]:
    """Spectra, eigenspace overlaps and preconditioned-direction alignments at one θ."""
    import torch
    import torch.nn.functional as F

    from .compare import direction_alignment, eigenspace_overlap, preconditioned_directions
    from .curvature import EmpiricalFisher, Fisher, L2Metric, spectrum
    from .functional import flatten, trainable_params

    ops = {
        "L2": L2Metric(model, x, output="probs"),
        "Fisher": Fisher(model, x),
        "Fisher MC": Fisher(model, x, mc_samples=1, generator=torch.Generator().manual_seed(seed)),
        "Empirical Fisher": EmpiricalFisher(model, (x, y)),
    }
    eig = {}
    vecs = {}
    for name, op in ops.items():
        vals, v = spectrum(op, k, method="lanczos", seed=seed)
        eig[name], vecs[name] = vals.double().numpy(), v
    overlap = {}
    for a, b in PAIRS:
        try:  # reuse the eigenvectors when compare accepts (P, k) bases
            overlap[f"{a} vs {b}"] = eigenspace_overlap(vecs[a], vecs[b], k)
        except (TypeError, ValueError):
            overlap[f"{a} vs {b}"] = eigenspace_overlap(
                ops[a], ops[b], k, method="lanczos", seed=seed
            )
    params = trainable_params(model)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    from torch.func import functional_call

    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    g = flatten(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
    dirs = preconditioned_directions(
        g.detach(), ops, damping=damping, method="cg", tol=1e-5, maxiter=300
    )
    align = direction_alignment(dirs)
    return {"eig": eig, "overlap": overlap, "align": align}


def fisher_vs_l2(opts: Options, out_dir: Path) -> xr.Dataset:
    """L² metric vs exact Fisher, Monte-Carlo Fisher (1 sample) and empirical Fisher along
    SGD training of small MLPs (float64): top-k spectra, top-k eigenspace overlaps
    ‖U_aᵀU_b‖²_F / k, and cosine alignment of damped preconditioned gradients (A + δI)⁻¹g.
    Writes ``spectra_<setup>.png`` and ``comparison_<setup>.png``."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .data import TensorLoader
    from .experiment import load_data
    from .models import mlp

    damping = float(opts.extra.get("damping", 1e-3))
    results = []
    for setup in _fisher_setups(opts):
        data = load_data(setup["dataset"], opts.data_root, opts.train_size, None)
        x_all = data.train_x.flatten(1).double()
        y_all = data.train_y
        model = mlp(setup["sizes"], seed=0).double()
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(x_all), generator=g)[: setup["n"]]
        xm, ym = x_all[idx], y_all[idx]
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = TensorLoader(x_all, y_all, batch_size=64, seed=0)
        per_ckpt = []
        bar = tqdm(total=len(setup["checkpoints"]), desc=f"fisher_vs_l2 {setup['name']}")
        for epoch in range(setup["epochs"] + 1):
            if epoch in setup["checkpoints"]:
                per_ckpt.append((epoch, _fisher_measure(model, xm, ym, setup["k"], 0, damping)))
                bar.update()
            if epoch == setup["epochs"]:
                break
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        bar.close()
        names = list(per_ckpt[0][1]["eig"])
        pairs = list(per_ckpt[0][1]["overlap"])
        dnames = list(per_ckpt[0][1]["align"].coords["a"].values)
        ds = xr.Dataset(
            {
                "eigenvalues": (
                    ("checkpoint", "metric", "rank"),
                    np.array([[m["eig"][n] for n in names] for _, m in per_ckpt]),
                    {"long_name": "top-k eigenvalues on the measurement batch"},
                ),
                "overlap": (
                    ("checkpoint", "pair"),
                    np.array([[m["overlap"][p] for p in pairs] for _, m in per_ckpt]),
                    {"long_name": "top-k eigenspace overlap ||Ua^T Ub||_F^2 / k"},
                ),
                "alignment": (
                    ("checkpoint", "a", "b"),
                    np.array([m["align"].values for _, m in per_ckpt]),
                    {"long_name": "cosine between damped preconditioned gradients"},
                ),
            },
            coords={
                "checkpoint": [e for e, _ in per_ckpt],
                "metric": names,
                "rank": np.arange(1, setup["k"] + 1),
                "pair": pairs,
                "a": dnames,
                "b": dnames,
            },
        )
        ds = ds.expand_dims(setup=[setup["name"]])
        results.append(ds)
        _plot_fisher(ds.isel(setup=0), out_dir, setup["name"])
    out = xr.concat(results, dim="setup", join="outer")
    out.attrs.update(
        {
            "analysis": "fisher_vs_l2",
            "damping": damping,
            "output": "probs (L2 metric); categorical likelihood (Fisher)",
            "quick": int(opts.quick),
        }
    )
    return out


def _plot_fisher(ds: xr.Dataset, out_dir: Path, name: str) -> None:
    import matplotlib.pyplot as plt

    from .plotting import plot_metric_comparison, plot_spectra

    last = ds.isel(checkpoint=-1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_spectra({m: last.eigenvalues.sel(metric=m).values for m in ds.metric.values},
                 ax=axes[0])  # fmt: skip
    axes[0].set_title(f"top eigenvalues at epoch {int(last.checkpoint)}")
    plot_spectra(
        {m: last.eigenvalues.sel(metric=m).values for m in ds.metric.values},
        ax=axes[1],
        normalize="max",
    )
    axes[1].set_title("normalized by the largest")
    fig.tight_layout()
    _save(fig, out_dir / f"spectra_{name}.png")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    plot_metric_comparison(ds.overlap, x="checkpoint", hue="pair", ax=axes[0],
                           title="top-k eigenspace overlap")  # fmt: skip
    plot_metric_comparison(last.alignment, ax=axes[1], vmin=-1.0,
                           title="alignment of preconditioned gradients")  # fmt: skip
    fig.tight_layout()
    _save(fig, out_dir / f"comparison_{name}.png")


FIGURES: dict[str, FigureSpec] = {
    "fig1_mlp_mnist": FigureSpec(
        "fig1_mlp_mnist",
        "Fig. 1: MLP on MNIST, SGD vs HCGD (n=1, n=10), with and without momentum",
        fig1_configs,
        ("momentum", "optimizer", "seed"),
        plot_fig1,
    ),
    "fig2_passes": FigureSpec(
        "fig2_passes",
        "Fig. 2: the Fig. 1 runs against total forward+backward passes",
        fig1_configs,
        ("momentum", "optimizer", "seed"),
        plot_fig2,
    ),
    "fig3_cnn_bn_mnist": FigureSpec(
        "fig3_cnn_bn_mnist",
        "Fig. 3: BatchNorm CNN on MNIST, SGD vs Adam vs HCGD",
        fig3_configs,
        ("optimizer", "seed"),
        plot_fig3,
    ),
    "fig4_squeezenet_cifar10": FigureSpec(
        "fig4_squeezenet_cifar10",
        "Fig. 4: SqueezeNet v1.1 on CIFAR-10 (GPU-scale), lr/10 after epoch 150",
        fig4_configs,
        ("optimizer", "seed"),
        plot_fig4,
        gpu_scale=True,
    ),
    "fig5_csdt": FigureSpec(
        "fig5_csdt",
        "Fig. 5: CSDT in L² and parameter space, SGD vs HCGD, with and without momentum",
        fig5_configs,
        ("momentum", "optimizer", "seed"),
        plot_fig5,
    ),
    "distance_scales": FigureSpec(
        "distance_scales",
        "Function vs parameter distance at three scales (MLP and BN CNN)",
        distance_configs,
        ("model", "optimizer", "seed"),
        plot_distance,
    ),
    "fisher_vs_l2": FigureSpec(
        "fisher_vs_l2",
        "L² metric vs exact, Monte-Carlo and empirical Fisher on small networks",
        None,
        custom=fisher_vs_l2,
    ),
}


def reproduce(
    name: str,
    opts: Options | None = None,
    root: str | os.PathLike = "outputs",
    out_dir: str | os.PathLike | None = None,
    executor=None,
    max_workers: int = 2,
    progress: bool = True,
    plots: bool = True,
    collect: bool = False,
) -> tuple[xr.Dataset, Path]:
    """Run (or resume) one analysis and write its outputs.

    Runs are cached in ``<root>/runs/<config hash>.nc`` (shared by analyses with the same
    runs, e.g. Fig. 1, 2 and 5); the combined dataset ``<name>.nc``, the figures (PNG),
    ``summary.csv`` and ``summary.txt`` go to ``out_dir`` (default ``<root>/<name>``).
    ``collect=True`` runs nothing: it combines the runs already saved (e.g. while a long
    sweep is still going). Returns the dataset and the output folder.
    """
    if name not in FIGURES:
        raise ValueError(f"figure must be one of {sorted(FIGURES)}, got {name!r}")
    spec = FIGURES[name]
    opts = opts or Options()
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / name
    out.mkdir(parents=True, exist_ok=True)
    if spec.custom is not None:
        ds = spec.custom(opts, out)
        save_result(ds, out / f"{name}.nc")
        return ds, out
    configs = spec.configs(opts)
    dims = spec.dims
    ds = sweep(
        configs,
        executor=executor,
        out_dir=root,
        dims=dims,
        max_workers=max_workers,
        progress=progress,
        run_missing=not collect,
    )
    ds.attrs["analysis"] = name
    ds.attrs["analysis_title"] = spec.title
    ds.attrs["quick"] = int(opts.quick)
    save_result(ds, out / f"{name}.nc")
    table = summarize(ds, tuple(d for d in dims if d != "seed"))
    table.to_csv(out / "summary.csv", index=False)
    text = format_summary(table)
    (out / "summary.txt").write_text(text + "\n")
    if plots and spec.plots is not None:
        spec.plots(ds, out)
    (out / "settings.json").write_text(
        json.dumps(
            {"analysis": name, "options": opts.__dict__, "runs": len(configs)},
            indent=2,
            default=str,
        )  # fmt: skip
    )
    return ds, out


def load_analysis(name: str, root: str | os.PathLike = "outputs") -> xr.Dataset:
    """Open the combined dataset an analysis wrote."""
    return open_result(Path(root) / name / f"{name}.nc")
