"""Function (L2) distance against parameter distance at three scales (per update, per epoch, from
initialization) along training of the MNIST MLP and the BatchNorm CNN, and their ratio over
time.

Usage: python analyses/distance_scales.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/distance_scales/distance_scales.nc, PNG figures and summary.txt/.csv; the same as
`fsgeom reproduce distance_scales`.
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("distance_scales"))
