"""Fig. 1: MLP 784-90-50-10 on MNIST, SGD vs HCGD (n=1, n=10), with momentum (lr 0.04) and without
(lr 0.1); lambda 0.5, eta 0.02, validation batch 256, 10 seeds.

Usage: python analyses/fig1_mlp_mnist.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/fig1_mlp_mnist/fig1_mlp_mnist.nc, PNG figures and summary.txt/.csv; the same as
`fsgeom reproduce fig1_mlp_mnist`. Full settings: 10 seeds x 50 epochs (hours on 2 CPU cores).
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fig1_mlp_mnist"))
