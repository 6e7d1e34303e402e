"""The ``fsgeom`` command: ``demo``, ``run``, ``sweep``, ``reproduce``, ``plot``.

``fsgeom demo`` (what ``make demo`` runs) trains the paper's MLP on the embedded 8×8
digits with SGD and HCGD (with momentum), 3 seeds, tracking every step, and writes the
dataset, a CSDT + accuracy figure and a summary table into ``outputs/demo``.
Run ``fsgeom <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "load_toml", "configs_from_toml"]


class CLIError(Exception):
    """A user error: printed as ``fsgeom: error: ...`` with exit status 2."""


# ---------------------------------------------------------------------------------------
# Helpers


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with an error that says so."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _parse_value(text: str) -> Any:
    """``key=value`` values: JSON when it parses (numbers, true/false, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hp_pairs(pairs: list[str] | None) -> dict[str, Any]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise CLIError(f"--hp expects KEY=VALUE (e.g. --hp lam=0.5), got {p!r}")
        k, v = p.split("=", 1)
        if not k:
            raise CLIError(f"--hp expects KEY=VALUE, got {p!r}")
        out[k.strip()] = _parse_value(v.strip())
    return out


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file with :mod:`tomllib` (Python ≥ 3.11) or ``tomli``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise CLIError(
                "reading a TOML config needs Python >= 3.11 (tomllib) or the 'tomli' package "
                "(pip install tomli)"
            ) from None
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config: no such file: {str(p)!r}")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise CLIError(f"--config: {p} is not valid TOML: {e}") from None


def configs_from_toml(doc: dict[str, Any]):
    """RunConfigs from a TOML document.

    Layout::

        seeds = [0, 1, 2]            # optional: every run is repeated for these seeds
        [base]                       # fields shared by every run (RunConfig fields)
        dataset = "digits"
        epochs = 5
        [[run]]                      # one table per variant: overrides of base
        label = "SGD"
        optimizer = "sgd"
        hparams = { lr = 0.1, momentum = 0.9 }

    Without ``[[run]]`` the document (or its ``[base]``) is a single config.
    """
    from .experiment import RunConfig

    known = {"base", "run", "seeds", "sweep"}
    unknown = [k for k in doc if k not in known and k not in RunConfig.__dataclass_fields__]
    if unknown:
        raise CLIError(
            f"--config: unknown top-level key(s) {unknown}; expected 'base', 'run', 'seeds', "
            f"'sweep' or RunConfig fields {sorted(RunConfig.__dataclass_fields__)}"
        )
    base = dict(doc.get("base", {}))
    base.update({k: v for k, v in doc.items() if k in RunConfig.__dataclass_fields__})
    runs = doc.get("run") or [{}]
    if not isinstance(runs, list):
        raise CLIError("--config: 'run' must be an array of tables ([[run]])")
    seeds = doc.get("seeds")
    out = []
    for i, r in enumerate(runs):
        d = {**base, **r}
        if "hparams" in base and "hparams" in r:
            d["hparams"] = {**base["hparams"], **r["hparams"]}
        for seed in seeds if seeds is not None else [d.get("seed", 0)]:
            try:
                out.append(RunConfig.from_dict({**d, "seed": seed}))
            except (ValueError, TypeError) as e:
                raise CLIError(f"--config: run {i}: {e}") from None
    return out


def _config_from_args(args) -> Any:
    from .experiment import RunConfig

    d: dict[str, Any] = {}
    if args.config:
        cfgs = configs_from_toml(load_toml(args.config))
        if len(cfgs) != 1:
            raise CLIError(
                f"--config describes {len(cfgs)} runs; use 'fsgeom sweep' for several runs"
            )
        d = cfgs[0].to_dict()
    for name in (
        "dataset",
        "model",
        "optimizer",
        "epochs",
        "batch_size",
        "val_batch_size",
        "probe_size",
        "seed",
        "train_size",
        "test_size",
        "label",
    ):
        v = getattr(args, name, None)
        if v is not None:
            d[name] = v
    hp = dict(d.get("hparams", {}))
    if args.lr is not None:
        hp["lr"] = args.lr
    if args.momentum is not None:
        hp["momentum"] = args.momentum
    hp.update(_hp_pairs(args.hp))
    if "hparams" in d or hp:
        d["hparams"] = hp
    if args.no_track:
        d["track"] = False
    if args.every is not None:
        d["track_every"] = args.every
    try:
        return RunConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from .experiment import OPTIMIZERS

    g = p.add_argument_group("run settings (override the config file)")
    g.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    g.add_argument("--dataset", choices=["digits", "mnist", "cifar10"])
    g.add_argument("--model", choices=["mlp", "cnn_bn", "squeezenet"])
    g.add_argument("--optimizer", choices=sorted(OPTIMIZERS))
    g.add_argument("--lr", type=float, help="learning rate ε")
    g.add_argument("--momentum", type=float, help="momentum β")
    g.add_argument(
        "--hp",
        action="append",
        metavar="KEY=VALUE",
        help="any optimizer hyperparameter, repeatable (e.g. --hp lam=0.5 --hp n_corrections=1)",
    )
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--batch-size", dest="batch_size", type=_positive_int)
    g.add_argument("--val-batch-size", dest="val_batch_size", type=_positive_int)
    g.add_argument("--probe-size", dest="probe_size", type=_positive_int)
    g.add_argument("--train-size", dest="train_size", type=_positive_int)
    g.add_argument("--test-size", dest="test_size", type=_positive_int)
    g.add_argument("--seed", type=_nonneg_int)
    g.add_argument("--label", help="display name of the run")
    g.add_argument("--no-track", action="store_true", help="do not attach the Tracker")
    g.add_argument("--every", type=_positive_int, help="record every K steps (default 1)")


# ---------------------------------------------------------------------------------------
# Commands


def _demo_settings(args) -> dict[str, Any]:
    tiny = args.tiny or os.environ.get("FSGEOM_DEMO_TINY", "") not in ("", "0")
    return {
        "seeds": args.seeds if args.seeds is not None else (2 if tiny else 3),
        "epochs": args.epochs if args.epochs is not None else (2 if tiny else 15),
        "train_size": 128 if tiny else None,
        "probe_size": 32 if tiny else 256,
    }


def demo_configs(seeds: int = 3, epochs: int = 15, train_size=None, probe_size: int = 256):
    """The demo's runs: digits MLP, SGD vs HCGD (ε = 0.1, β = 0.9, λ = 0.5, η = 0.02)."""
    from .experiment import RunConfig

    variants = {
        "SGD": ("sgd", {"lr": 0.1, "momentum": 0.9}),
        "HCGD": (
            "hcgd",
            {"lr": 0.1, "momentum": 0.9, "lam": 0.5, "inner_lr": 0.02, "n_corrections": 1},
        ),
    }
    return [
        RunConfig(
            dataset="digits",
            model="mlp",
            optimizer=opt,
            hparams=hp,
            epochs=epochs,
            batch_size=64,
            val_batch_size=256,
            probe_size=probe_size,
            seed=seed,
            train_size=train_size,
            label=label,
        )
        for label, (opt, hp) in variants.items()
        for seed in range(seeds)
    ]


def cmd_demo(args) -> int:
    from . import paper
    from .experiment import save_result, sweep

    s = _demo_settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = demo_configs(s["seeds"], s["epochs"], s["train_size"], s["probe_size"])
    print(
        f"fsgeom demo: MLP on the 8x8 digits, SGD vs HCGD (momentum 0.9, lr 0.1), "
        f"{s['seeds']} seeds x {s['epochs']} epochs, tracking every step -> {out}/",
        flush=True,
    )
    t0 = time.perf_counter()
    executor = "sequential" if args.workers == 1 else None
    ds = sweep(
        configs,
        executor=executor,
        out_dir=out / "cache" if args.resume else None,
        max_workers=args.workers,
        progress=not args.no_progress,
    )
    nc = save_result(ds, out / "demo.nc")
    png = paper.plot_summary_figure(ds, out / "demo.png")
    table = paper.summarize(ds, ("optimizer",))
    text = paper.format_summary(table)
    (out / "summary.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwrote {nc}\nwrote {png}\nwrote {out / 'summary.txt'}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_run(args) -> int:
    from .experiment import run, save_result

    cfg = _config_from_args(args)
    out = Path(args.out)
    print(f"fsgeom run: {cfg.to_json()}", flush=True)
    ds = run(cfg, progress=not args.no_progress)
    save_result(ds, out)
    last = {k: float(ds[k].values[-1]) for k in ("train_acc", "test_acc") if k in ds}
    print(f"final: {json.dumps(last)}\nwrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from . import paper
    from .experiment import save_result, sweep

    cfgs = configs_from_toml(load_toml(args.config))
    if args.seeds is not None:
        cfgs = [c.replace(seed=s) for c in {c.variant: c for c in cfgs}.values() for s in
                range(args.seeds)]  # fmt: skip
    out = Path(args.out)
    executor = None
    client = None
    if args.dask:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise CLIError(
                "--dask needs dask.distributed: pip install 'dask[distributed]'"
            ) from None
        if args.dask == "local":
            client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1))
        else:
            client = Client(args.dask)
        executor = client.get_executor()
    elif args.workers == 1:
        executor = "sequential"
    try:
        ds = sweep(
            cfgs,
            executor=executor,
            out_dir=out,
            dims=tuple(args.dims.split(",")),
            max_workers=args.workers,
            progress=not args.no_progress,
        )
    finally:
        if client is not None:
            client.close()
    path = save_result(ds, out / "sweep.nc")
    print(paper.format_summary(paper.summarize(ds, tuple(args.dims.split(","))[:-1])))
    print(f"wrote {path}")
    return 0


def cmd_reproduce(args) -> int:
    from . import paper

    if args.list or not args.figure:
        for name, spec in paper.FIGURES.items():
            print(f"{name:26s} {spec.title}")
        return 0
    if args.figure not in paper.FIGURES:
        raise CLIError(f"unknown figure {args.figure!r}; choose one of: {', '.join(paper.FIGURES)}")
    opts = paper.Options(
        quick=args.quick,
        seeds=args.seeds,
        epochs=args.epochs,
        train_size=args.train_size,
        dataset=args.dataset,
        data_root=args.data_root,
        n10_seeds=args.n10_seeds,
        n10_epochs=args.n10_epochs,
    )
    t0 = time.perf_counter()
    ds, out = paper.reproduce(
        args.figure,
        opts,
        root=args.root,
        out_dir=args.out,
        executor="sequential" if args.workers == 1 else None,
        max_workers=args.workers,
        progress=not args.no_progress,
        collect=args.collect,
    )
    summary = out / "summary.txt"
    if summary.exists():
        print(summary.read_text())
    print(f"outputs in {out}/ ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_plot(args) -> int:
    from . import paper
    from .experiment import open_result

    path = Path(args.dataset)
    if not path.is_file():
        raise CLIError(f"dataset: no such file: {str(path)!r}")
    ds = open_result(path)
    out = Path(args.out) if args.out else path.with_suffix(f".{args.kind}.png")
    from . import plotting

    hue = "optimizer" if "optimizer" in ds.dims else None
    try:
        if args.kind == "summary":
            paper.plot_summary_figure(ds, out)
            print(f"wrote {out}")
            return 0
        if args.kind == "accuracy":
            obj = plotting.plot_accuracy(ds, ["train", "test"], hue=hue)
        elif args.kind == "passes":
            obj = plotting.plot_passes(ds, ["train", "test"], hue=hue)
        elif args.kind == "csdt":
            obj = plotting.plot_csdt(ds, "both", hue=hue)
        else:
            obj = plotting.plot_distance_scales(ds, hue=hue)
    except ValueError as e:
        raise CLIError(f"cannot draw {args.kind!r} from {path}: {e}") from None
    fig = obj if hasattr(obj, "savefig") else obj.figure
    paper._save(fig, out)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsgeom",
        description="Measure and shape how neural networks move in function space "
        "(L² distances, HCGD, CSDT tracking).",
        epilog="Start with 'fsgeom demo'. Each command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="SGD vs HCGD on the embedded digits with tracking (about a minute)",
        description="Train the paper's MLP on scikit-learn's 8x8 digits with SGD and HCGD "
        "(momentum 0.9, lr 0.1, lambda 0.5, eta 0.02), 3 seeds, tracking the CSDT every "
        "step; write demo.nc, demo.png (accuracy + CSDT) and summary.txt.",
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default 3)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (default 15)")
    p.add_argument("--workers", type=_positive_int, default=2, help="processes (default 2)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a few seconds' smoke test (also: FSGEOM_DEMO_TINY=1)",
    )
    p.add_argument("--resume", action="store_true", help="reuse runs saved in OUT/cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "run",
        help="train once and save the run's dataset",
        description="Train one configuration (command-line options and/or a TOML file) and "
        "write its xarray dataset to netCDF.",
    )
    _add_run_options(p)
    p.add_argument("--out", default="outputs/run.nc", help="netCDF file (default outputs/run.nc)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        help="run many configurations from a TOML file, in parallel, resumable",
        description="Run the configurations of a TOML file ([base], [[run]] tables, seeds = "
        "[...]) over local processes or a dask cluster. Finished runs are saved in "
        "OUT/runs/ and skipped when the sweep is started again.",
    )
    p.add_argument("--config", required=True, metavar="FILE.toml")
    p.add_argument("--out", default="outputs/sweep", help="output folder")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--seeds", type=_positive_int, help="override: seeds 0..N-1 for every run")
    p.add_argument(
        "--dims",
        default="optimizer,seed",
        help="dimensions of the combined dataset (default optimizer,seed)",
    )
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run on a dask.distributed scheduler at ADDRESS, or 'local' for a LocalCluster",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "reproduce",
        help="reproduce a figure of the paper (see --list)",
        description="Run (or resume) one of the paper's analyses and write its dataset, "
        "figures and summary into ROOT/<figure>. --quick takes a few minutes on 2 cores.",
    )
    p.add_argument("figure", nargs="?", help="fig1_mlp_mnist, fig2_passes, fig5_csdt, ...")
    p.add_argument("--list", action="store_true", help="list the figures")
    p.add_argument("--quick", action="store_true", help="small settings (minutes on 2 cores)")
    p.add_argument("--seeds", type=_positive_int)
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--train-size", dest="train_size", type=_positive_int)
    p.add_argument(
        "--n10-seeds", dest="n10_seeds", type=_positive_int, help="Fig. 1: seeds of HCGD n=10"
    )
    p.add_argument(
        "--n10-epochs", dest="n10_epochs", type=_positive_int, help="Fig. 1: epochs of HCGD n=10"
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: combine and draw the runs already saved in ROOT/runs",
    )
    p.add_argument("--dataset", choices=["digits", "mnist", "cifar10"])
    p.add_argument("--data-root", dest="data_root", help="folder holding the dataset files")
    p.add_argument("--root", default="outputs", help="outputs root (runs cached in ROOT/runs)")
    p.add_argument("--out", help="output folder (default ROOT/<figure>)")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "plot",
        help="draw a saved dataset",
        description="Draw a dataset written by fsgeom (run, sweep, demo, reproduce).",
    )
    p.add_argument("dataset", help="netCDF file")
    p.add_argument(
        "--kind",
        choices=["summary", "accuracy", "passes", "csdt", "distance_scales"],
        default="summary",
    )
    p.add_argument("--out", help="PNG file (default next to the dataset)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsgeom`` command. Returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        parser.exit(2, f"fsgeom {args.command}: error: {e}\n")
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"fsgeom {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted (finished runs are saved where an output folder is used)\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
