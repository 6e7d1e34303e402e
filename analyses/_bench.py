"""Helpers shared by the benchmark scripts (inputs, device synchronization)."""

from __future__ import annotations

import torch


def load_inputs(n: int, device: str):
    """The first ``n`` MNIST training images and labels, or random inputs of MNIST's shape
    when the files are not found. Returns ``(x, y, source description)``."""
    try:
        from fsgeom.data import load

        ds = load("mnist")
        x, y, source = ds.train_x[:n], ds.train_y[:n], "MNIST"
    except (FileNotFoundError, OSError, ValueError):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        source = "random inputs of MNIST's shape (MNIST files not found)"
    return x.to(device), y.to(device), source


def sync(device: str) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
