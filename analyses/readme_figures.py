"""The README's reproduction figures and tables, from datasets written by the analyses.

    python analyses/readme_figures.py outputs/fig5_csdt_30ep/fig5_csdt.nc [--out docs/figures]

Draws test accuracy (mean ± sd over seeds) and CSDT in L² and parameter space (one trace
per seed), one column per momentum setting, for SGD and HCGD n=1; prints a markdown table
of the final values (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fsgeom import open_run, plotting  # noqa: E402


def table(ds, optimizers) -> str:
    rows = [
        "| momentum | optimizer | seeds | epochs | final test acc | CSDT L² | CSDT param |",
        "|---:|---|---:|---:|---|---|---|",
    ]
    last = ds.isel(step=-1)
    for m in ds.momentum.values:
        for o in optimizers:
            sel = dict(momentum=m, optimizer=o)
            acc = ds.test_acc.sel(sel).isel(epoch_end=-1)
            cf, cp = last.csdt_function.sel(sel), last.csdt_param.sel(sel)
            rows.append(
                f"| {m:g} | {o} | {int(acc.count())} | {ds.sizes['epoch_end']} | "
                f"{float(acc.mean()):.4f} ± {float(acc.std(ddof=1)):.4f} | "
                f"{float(cf.mean()):.2f} ± {float(cf.std(ddof=1)):.2f} | "
                f"{float(cp.mean()):.1f} ± {float(cp.std(ddof=1)):.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--optimizers", nargs="+", default=["SGD", "HCGD n=1"])
    args = p.parse_args()
    ds = open_run(args.dataset).sel(optimizer=args.optimizers)
    args.out.mkdir(parents=True, exist_ok=True)
    moms = list(ds.momentum.values)
    fig, axes = plt.subplots(3, len(moms), figsize=(5.2 * len(moms), 10.5), squeeze=False)
    for j, m in enumerate(moms):
        d = ds.sel(momentum=m)
        name = "with momentum (ε = 0.04, β = 0.9)" if m else "no momentum (ε = 0.1)"
        plotting.plot_accuracy(d, "test", ax=axes[0, j])
        plotting.plot_csdt(d, "function", ax=axes[1, j])
        plotting.plot_csdt(d, "param", ax=axes[2, j])
        axes[0, j].set_title(f"MLP on MNIST, {name}")
    fig.tight_layout()
    path = args.out / "mnist_mlp_sgd_vs_hcgd.png"
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")
    print(table(ds, args.optimizers))


if __name__ == "__main__":
    main()
