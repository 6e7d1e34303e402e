"""Benchmark: curvature-vector products of fsgeom beside curvlinops and BackPACK (issue 3 §4).

On the paper's MLP (784-90-50-10) and the MNIST CNN with BatchNorm (``fsgeom.models.cnn_bn``,
eval mode), batch 256, float32, CPU, in one process: the median time of one product, each
also as a ratio to one forward+backward pass (cross-entropy, ``loss.backward()``) of the same
batch, all measured round-robin (one call of every method per round) so that load from
other processes hits all methods alike.

* fresh product: build the operator on the batch and multiply once (what curvlinops and
  BackPACK do on every product: they keep nothing between products);
* shared product: products that share a batch (``matmat`` of 10 columns, per column);
* ``spectrum(op, 10)`` (Lanczos) and ``solve(op, g, damping)`` (CG): total time, number
  of products, time per product.

Peers are skipped with a note when not importable (``make bench`` installs them).
Usage: ``python analyses/bench_curvature.py [--rounds 5] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsgeom  # noqa: E402
from fsgeom.curvature import EmpiricalFisher, Fisher, L2Metric, solve, spectrum  # noqa: E402
from fsgeom.functional import flatten, trainable_params  # noqa: E402
from fsgeom.models import cnn_bn, mlp  # noqa: E402


def load_batch(n: int):
    """The first n MNIST training images if available, else a fixed synthetic batch."""
    try:
        ds = fsgeom.load("mnist")
        return ds.train_x[:n].float(), ds.train_y[:n], "MNIST"
    except (FileNotFoundError, ValueError, OSError):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return x, y, "synthetic N(0,1) images (MNIST not found)"


def peers():
    """Import the peer libraries; return (curvlinops module | None, backpack | None, notes)."""
    notes = []
    try:
        import curvlinops
    except Exception as e:  # pragma: no cover - depends on the environment
        curvlinops = None
        notes.append(f"curvlinops not importable ({type(e).__name__}: {e}); skipped")
    try:
        import backpack
        import backpack.hessianfree.ggnvp  # noqa: F401
    except Exception as e:  # pragma: no cover
        backpack = None
        notes.append(f"BackPACK not importable ({type(e).__name__}: {e}); skipped")
    return curvlinops, backpack, notes


class Counter:
    """Count products of an fsgeom operator (wraps its internal product)."""

    def __init__(self, op):
        self.n = 0
        inner = op._apply

        def counted(v):
            self.n += 1
            return inner(v)

        op._apply = counted


def bench_model(name, model, x, y, rounds, curvlinops, backpack, quick):
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    num = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(num, generator=gen)
    v_list = [t.clone() for t in torch.split(v, [p.numel() for p in params])]
    v_list = [t.reshape(p.shape) for t, p in zip(v_list, params)]
    ce = nn.CrossEntropyLoss()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    methods = {"forward+backward (reference)": fwd_bwd}
    methods["fsgeom Fisher, fresh"] = lambda: Fisher(model, x) @ v
    methods["fsgeom L2Metric (probs), fresh"] = lambda: L2Metric(model, x) @ v
    methods["fsgeom EmpiricalFisher, fresh"] = lambda: EmpiricalFisher(model, (x, y)) @ v

    vs = torch.randn(num, 10, generator=gen)
    shared = {
        "Fisher": Fisher(model, x),
        "L2Metric": L2Metric(model, x),
        "EmpiricalFisher": EmpiricalFisher(model, (x, y)),
    }
    for k, op in shared.items():
        op.matmat(vs[:, :1])  # build the linearization once (timed separately below)
        methods[f"fsgeom {k}, shared batch (matmat of 10, per column)"] = (
            lambda op=op: op.matmat(vs),
            10,
        )

    checks = {}
    if curvlinops is not None:
        data = [(x, y)]
        kw = {"check_deterministic": False, "num_data": x.shape[0]}
        ggn = curvlinops.GGNLinearOperator(model, ce, params, data, **kw)
        ef = curvlinops.EFLinearOperator(model, ce, params, data, **kw)
        softmax_model = nn.Sequential(model, nn.Softmax(-1))
        l2 = curvlinops.GGNLinearOperator(
            softmax_model,
            nn.MSELoss(reduction="mean"),
            params,
            [(x, torch.zeros(x.shape[0], 10))],  # the MSE GGN does not depend on targets
            **kw,
        )
        methods["curvlinops GGNLinearOperator (= Fisher)"] = lambda: ggn @ v
        methods["curvlinops GGN, MSE on softmax (= L2Metric·2/C)"] = lambda: l2 @ v
        methods["curvlinops EFLinearOperator"] = lambda: ef @ v
        c = 10  # classes
        checks["Fisher vs curvlinops GGN"] = _rel(Fisher(model, x) @ v, ggn @ v)
        checks["L2Metric vs curvlinops MSE-GGN·C/2"] = _rel(
            L2Metric(model, x) @ v, (l2 @ v) * c / 2
        )
        checks["EmpiricalFisher vs curvlinops EF"] = _rel(
            EmpiricalFisher(model, (x, y)) @ v, ef @ v
        )
    if backpack is not None:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

        def bp_ggn():
            out = model(x)
            loss = ce(out, y)
            return ggn_vector_product_from_plist(loss, out, params, v_list)

        methods["BackPACK ggn_vector_product (= Fisher)"] = bp_ggn
        checks["Fisher vs BackPACK ggnvp"] = _rel(
            Fisher(model, x) @ v, torch.cat([t.reshape(-1) for t in bp_ggn()])
        )
        bp_model = backpack.extend(copy.deepcopy(model))
        bp_params = [p for p in bp_model.parameters() if p.requires_grad]
        bp_ce = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))

        def bp_ef():
            bp_model.zero_grad(set_to_none=True)
            with backpack.backpack(backpack.extensions.BatchGrad()):
                bp_ce(bp_model(x), y).backward()
            g = torch.cat([p.grad_batch.reshape(x.shape[0], -1) for p in bp_params], 1)
            return g.T @ (g @ v) / x.shape[0]

        methods["BackPACK BatchGrad → Gᵀ(G v)/N (materializes N×P)"] = bp_ef
        checks["EmpiricalFisher vs BackPACK BatchGrad"] = _rel(
            EmpiricalFisher(model, (x, y)) @ v, bp_ef()
        )

    times = {k: [] for k in methods}
    for m in methods.values():  # warm-up
        (m[0] if isinstance(m, tuple) else m)()
    for _ in range(rounds):
        for k, m in methods.items():
            f, per = m if isinstance(m, tuple) else (m, 1)
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) / per)
    med = {k: statistics.median(t) for k, t in times.items()}
    ref = med["forward+backward (reference)"]

    print(
        f"\n## {name}: P = {num:,} parameters, batch {x.shape[0]}, float32, "
        f"{torch.get_num_threads()} thread(s), median of {rounds} rounds"
    )
    print(f"forward+backward = {ref * 1e3:.2f} ms\n")
    print("| product | median ms | × fwd+bwd | × curvlinops |")
    print("|---|---:|---:|---:|")
    peer_of = {
        "Fisher": "curvlinops GGNLinearOperator (= Fisher)",
        "L2Metric": "curvlinops GGN, MSE on softmax (= L2Metric·2/C)",
        "EmpiricalFisher": "curvlinops EFLinearOperator",
    }
    for k, t in med.items():
        rel = ""
        for key, peer in peer_of.items():
            if k.startswith(f"fsgeom {key},") and peer in med:
                rel = f"{t / med[peer]:.2f}"
        print(f"| {k} | {t * 1e3:.2f} | {t / ref:.2f} | {rel} |")

    # one-time costs and many-product routines on one batch
    print()
    for k, make in [
        ("Fisher", lambda: Fisher(model, x)),
        ("EmpiricalFisher", lambda: EmpiricalFisher(model, (x, y))),
    ]:
        op = make()
        t0 = time.perf_counter()
        op.matmat(vs[:, :2])
        t_build = time.perf_counter() - t0
        print(
            f"- {k}: first two products (fresh + linearization build + cached) "
            f"{t_build * 1e3:.1f} ms = {t_build / ref:.1f}× fwd+bwd"
        )
    if not quick:
        ref = _median_time(fwd_bwd, 3)  # re-measured next to the many-product routines
        print(f"- forward+backward re-measured for the lines below: {ref * 1e3:.2f} ms")
        op = Fisher(model, x)
        cnt = Counter(op)
        t0 = time.perf_counter()
        evals, _ = spectrum(op, 10, method="lanczos", tol=1e-4)
        t = time.perf_counter() - t0
        print(
            f"- spectrum(Fisher, k=10, Lanczos, tol=1e-4): {t:.2f} s, {cnt.n} products, "
            f"{t / cnt.n * 1e3:.2f} ms = {t / cnt.n / ref:.2f}× fwd+bwd per product "
            f"(λ_max = {float(evals[0]):.4g})"
        )
        op = Fisher(model, x)
        cnt = Counter(op)
        g = flatten(_grad(model, x, y))
        t0 = time.perf_counter()
        _, info = solve(op, g, damping=1e-3, method="cg", tol=1e-4, maxiter=30, return_info=True)
        t = time.perf_counter() - t0
        print(
            f"- solve(Fisher, g, damping=1e-3, CG, tol=1e-4, maxiter=30): {t:.2f} s, "
            f"{cnt.n} products "
            f"({info['iterations']} iterations), {t / cnt.n * 1e3:.2f} ms = "
            f"{t / cnt.n / ref:.2f}× fwd+bwd per product"
        )
    if checks:
        print(
            "\nagreement (max relative difference of one product): "
            + ", ".join(f"{k}: {val:.1e}" for k, val in checks.items())
        )
    return med


def _median_time(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _grad(model, x, y):
    from torch.func import functional_call, grad

    theta = trainable_params(model)

    def loss(p):
        with fsgeom.functional.measuring(model):
            return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    return grad(loss)(theta)


def _rel(a, b) -> float:
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="skip spectrum/solve")
    ap.add_argument("--models", default="mlp,cnn_bn")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, source = load_batch(args.batch)
    curvlinops, backpack, notes = peers()
    print(
        f"# fsgeom curvature benchmark (torch {torch.__version__}, data: {source}, "
        f"cpu count {os.cpu_count()})"
    )
    for n in notes:
        print(f"note: {n}")
    for name in args.models.split(","):
        model = mlp((784, 90, 50, 10)) if name == "mlp" else cnn_bn()
        label = "MLP 784-90-50-10" if name == "mlp" else "CNN with BatchNorm (cnn_bn, eval mode)"
        bench_model(label, model, x, y, args.rounds, curvlinops, backpack, args.quick)


if __name__ == "__main__":
    main()
