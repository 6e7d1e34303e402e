"""Benchmark: the cost of tracking (issue 4, section 5).

SGD on the paper's MLP 784-90-50-10, timed with and without a :class:`fsgeom.Tracker`
attached, side by side in one process: untracked and tracked runs alternate, each from the
same initialization and on the same batches, and the figures are medians over repeats of
the wall time (and CPU time) per step. Reported as the ratio tracked / untracked, with the
cost of one probe forward relative to one training forward+backward measured in the same
run, and the floor 1 + probe forward / (every · untracked step): the ratio the probe
forwards alone would give; the rest of the overhead is the tracker's own bookkeeping.

Settings: training batch 256 with probe 256 (goal: ratio <= 1.5), batch 64 with probe 256
(the paper's setting), and the same with ``every=10``.

    FSGEOM_DATA=../shared/data .venv/bin/python analyses/bench_tracking.py [--threads 1]

Uses MNIST when the IDX files are found, else random inputs of MNIST's shape (timing
does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from _bench import load_inputs, sync  # analyses/ is on sys.path when run as a script

from fsgeom.models import mlp
from fsgeom.tracking import Tracker

SETTINGS = [  # (training batch, probe size, every)
    (256, 256, 1),
    (64, 256, 1),
    (256, 256, 10),
    (64, 256, 10),
]


def train_steps(model, opt, x, y, batch: int, steps: int, device: str) -> tuple[float, float]:
    """Wall and CPU seconds per step of ``steps`` SGD steps (zero_grad, forward, backward,
    step). CPU time is less disturbed by other processes on a shared machine."""
    n = len(x)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(steps):
        i = (t * batch) % (n - batch + 1)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def time_op(fn, reps: int, device: str) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def bench(batch, probe_n, every, x, y, base, steps, repeats, device):
    probe = x[-probe_n:]
    plain, tracked = [], []
    for r in range(repeats):
        for variant in ("plain", "tracked") if r % 2 == 0 else ("tracked", "plain"):
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if variant == "tracked":
                tracker = Tracker(model, probe, every=every).attach(opt)
            t = train_steps(model, opt, x, y, batch, steps, device)
            if variant == "tracked":
                assert tracker.step == steps
                tracker.detach()
                tracked.append(t)
            else:
                plain.append(t)

    # the reference costs, measured in the same run
    model = copy.deepcopy(base)
    xb, yb = x[:batch], y[:batch]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()

    def probe_fwd():
        with torch.no_grad():
            model.eval()
            torch.softmax(model(probe), -1)
            model.train()

    fb = statistics.median(time_op(fwd_bwd, steps, device) for _ in range(3))
    pf = statistics.median(time_op(probe_fwd, steps, device) for _ in range(3))
    p, t = (statistics.median(w for w, _ in v) for v in (plain, tracked))
    pc, tc = (statistics.median(c for _, c in v) for v in (plain, tracked))
    return {
        "batch": batch,
        "probe": probe_n,
        "every": every,
        "plain_ms": 1e3 * p,
        "tracked_ms": 1e3 * t,
        "ratio": t / p,
        "cpu_ratio": tc / pc,
        "floor": 1 + pf / (every * p),
        "probe_fwd_over_fwd_bwd": pf / fb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, source = load_inputs(20_000, args.device)
    base = mlp((784, 90, 50, 10), seed=0).to(args.device)
    print(
        f"SGD (momentum 0.9) on MLP 784-90-50-10, float32, {args.device}, "
        f"{args.threads} thread(s), data: {source}; medians of {args.repeats} runs of "
        f"{args.steps} steps each, tracked and untracked interleaved\n"
    )
    rows = []
    print("| batch | probe | every | untracked ms/step | tracked ms/step | wall ratio | "
          "CPU-time ratio | probe fwd / train fwd+bwd | floor |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, probe_n, every in SETTINGS:
        r = bench(batch, probe_n, every, x, y, base, args.steps, args.repeats, args.device)
        rows.append(r)
        print(
            f"| {batch} | {probe_n} | {every} | {r['plain_ms']:.3f} | {r['tracked_ms']:.3f} | "
            f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['probe_fwd_over_fwd_bwd']:.2f} | "
            f"{r['floor']:.2f}x |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
