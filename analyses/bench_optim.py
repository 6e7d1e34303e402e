"""Benchmark: the cost of one optimizer step (issue 5, section 5).

Median wall time per step of SGD, HCGD (n = 1 and n = 10), HCAdam and
NaturalGradientByGD on the paper's MLP 784-90-50-10, (a) training batch 64 / validation
batch 256 (the paper's setting) and (b) both 256. A step is what a training loop does:
``zero_grad``, forward, cross-entropy, backward, ``step``. All optimizers run side by side
in one process, round-robin (one step of each per round, each on its own copy of the
model, all on the same batches), so the ratios to SGD are measured under the same load.

Also reported: passes per step (``last_step_passes``) and the Python bookkeeping of HCGD
n = 1: its step time minus that of a bare hand-written HCGD step doing the same passes
(plain module calls, in-place parameter updates, no checks), as a fraction of the step.

    FSGEOM_DATA=../shared/data .venv/bin/python analyses/bench_optim.py [--rounds 40]

Uses MNIST when the IDX files are found, else random inputs of MNIST's shape (timing does
not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from _bench import load_inputs, sync  # analyses/ is on sys.path when run as a script

from fsgeom.models import mlp
from fsgeom.optim import HCGD, HCAdam, NaturalGradientByGD


class BareHCGD:
    """HCGD n = 1 with momentum, written as plainly as possible: the cost floor."""

    def __init__(self, model, lr, momentum=0.9, lam=0.5, inner_lr=0.02):
        self.model, self.lr, self.beta, self.scale = model, lr, momentum, lam * inner_lr
        self.params = list(model.parameters())
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.last_step_passes = 5

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, val_inputs):
        with torch.no_grad():
            f_ref = torch.softmax(self.model(val_inputs), -1)
            for p, v in zip(self.params, self.bufs):
                v.mul_(self.beta).add_(p.grad, alpha=self.lr)
                p.sub_(v)  # θ + Δθ₀
        f = torch.softmax(self.model(val_inputs), -1)
        d = (f - f_ref).square().sum(1).mean().sqrt()
        grads = torch.autograd.grad(d, self.params)
        with torch.no_grad():
            for p, v, g in zip(self.params, self.bufs, grads):
                p.add_(g, alpha=-self.scale)
                v.add_(g, alpha=self.scale)


def build(name: str, model, val_iter):
    ps = model.parameters()
    if name == "SGD":
        return torch.optim.SGD(ps, lr=0.04, momentum=0.9)
    if name == "HCGD n=1":
        return HCGD(ps, lr=0.04, momentum=0.9, n_corrections=1, model=model)
    if name == "HCGD n=10":
        return HCGD(ps, lr=0.04, momentum=0.9, n_corrections=10, model=model)
    if name == "HCAdam n=1":
        return HCAdam(ps, lr=1e-3, n_corrections=1, model=model)
    if name == "NaturalGradientByGD n=1":
        return NaturalGradientByGD(ps, lr=1e-3, model=model, n_corrections=1, inner_lr=0.01)
    if name == "bare HCGD n=1":
        return BareHCGD(model, lr=0.04)
    raise ValueError(name)


NAMES = [
    "SGD",
    "HCGD n=1",
    "HCGD n=10",
    "HCAdam n=1",
    "NaturalGradientByGD n=1",
    "bare HCGD n=1",
]


def run_setting(x, y, xv_all, batch: int, val_batch: int, rounds: int, warmup: int, device):
    base = mlp().to(device)
    models = {n: copy.deepcopy(base) for n in NAMES}
    opts = {n: build(n, models[n], None) for n in NAMES}
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    n_train, n_val = x.shape[0], xv_all.shape[0]
    for r in range(warmup + rounds):
        i = (r * batch) % (n_train - batch)
        xb, yb = x[i : i + batch], y[i : i + batch]
        j = (r * val_batch) % (n_val - val_batch)
        xv = xv_all[j : j + val_batch]
        for name in NAMES:  # round-robin: same load for all
            model, opt = models[name], opts[name]
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            if name == "SGD":
                opt.step()
            elif name.startswith("NaturalGradient"):
                opt.step(fisher_batch=xv)
            else:
                opt.step(val_inputs=xv)
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    passes = {n: getattr(opts[n], "last_step_passes", 2) for n in NAMES}
    return med, passes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, source = load_inputs(8192, args.device)
    xv_all = x[4096:]
    x, y = x[:4096], y[:4096]
    print(f"# MLP 784-90-50-10, float32, {source}; device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median of {args.rounds} steps, round-robin in one process")  # fmt: skip
    for batch, val_batch in [(64, 256), (256, 256)]:
        med, passes = run_setting(x, y, xv_all, batch, val_batch, args.rounds, args.warmup,
                                  args.device)  # fmt: skip
        sgd = med["SGD"]
        print(f"\n## train batch {batch}, validation batch {val_batch}\n")
        print("| optimizer | ms / step | × SGD | passes / step |")
        print("|---|---:|---:|---:|")
        for n in NAMES:
            print(f"| {n} | {med[n]:.2f} | {med[n] / sgd:.2f} | {passes[n]} |")
        overhead = (med["HCGD n=1"] - med["bare HCGD n=1"]) / med["HCGD n=1"]
        print(f"\nHCGD n=1 bookkeeping (step time above the bare version, incl. momentum and "
              f"finite checks): {overhead:.1%} of the step")  # fmt: skip


if __name__ == "__main__":
    main()
