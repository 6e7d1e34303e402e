"""Fig. 2: the Fig. 1 runs plotted against total forward+backward passes.

Usage: python analyses/fig2_passes.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/fig2_passes/fig2_passes.nc, PNG figures and summary.txt/.csv; the same as `fsgeom
reproduce fig2_passes`. Reuses the Fig. 1 runs cached in outputs/runs.
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fig2_passes"))
