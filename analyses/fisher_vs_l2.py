"""L2 metric vs exact Fisher, Monte-Carlo Fisher and empirical Fisher on small networks (digits
MLP; MNIST MLP where feasible): spectra, eigenspace overlap, alignment of preconditioned
directions, along training.

Usage: python analyses/fisher_vs_l2.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/fisher_vs_l2/fisher_vs_l2.nc, PNG figures and summary.txt/.csv; the same as
`fsgeom reproduce fisher_vs_l2`. Needs fsgeom.curvature.
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fisher_vs_l2"))
