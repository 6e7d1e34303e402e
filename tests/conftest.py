"""Shared test setup: headless matplotlib, MNIST location, small float64 networks."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FSGEOM_DATA" not in os.environ and _shared.is_dir():
    os.environ["FSGEOM_DATA"] = str(_shared)


def mnist_available() -> bool:
    from fsgeom.data import MNIST_FILES, mnist_root

    root = mnist_root()
    return all((root / f"{s}.gz").is_file() or (root / s).is_file() for s in MNIST_FILES)


needs_mnist = pytest.mark.skipif(
    not mnist_available(),
    reason="MNIST IDX files not found: set FSGEOM_DATA to a folder holding mnist/",
)
