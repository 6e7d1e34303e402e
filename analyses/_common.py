"""Shared entry point of the analysis scripts: each script is ``fsgeom reproduce <name>``.

The experiments themselves live in :mod:`fsgeom.paper` (configs, figures, summaries) and
:mod:`fsgeom.experiment` (runs, sweeps), so ``python analyses/<name>.py [options]`` and
``fsgeom reproduce <name> [options]`` do exactly the same thing. Options: ``--quick``
(a few minutes on 2 CPU cores), ``--seeds``, ``--epochs``, ``--root`` (default
``outputs``; runs cached in ``outputs/runs`` and resumed), ``--out``, ``--workers``,
``--collect`` (combine the runs saved so far without running more). Run with ``--help``.
"""

from __future__ import annotations

import sys

from fsgeom.cli import main as fsgeom_main


def main(name: str, argv: list[str] | None = None) -> int:
    """Run the analysis ``name`` with command-line options ``argv`` (default sys.argv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return fsgeom_main(["reproduce", name, *argv])
