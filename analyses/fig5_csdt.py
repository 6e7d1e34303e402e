"""Fig. 5: cumulative squared distance traveled (CSDT) in L2 function space and in parameter space,
SGD vs HCGD n=1, with and without momentum.

Usage: python analyses/fig5_csdt.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/fig5_csdt/fig5_csdt.nc, PNG figures and summary.txt/.csv; the same as `fsgeom
reproduce fig5_csdt`. Reuses the Fig. 1 runs cached in outputs/runs (same configs).
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fig5_csdt"))
