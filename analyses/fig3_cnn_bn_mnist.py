"""Fig. 3: the 3-layer BatchNorm CNN on MNIST with SGD, Adam and HCGD.

Usage: python analyses/fig3_cnn_bn_mnist.py [--quick] [--seeds N] [--epochs E] [--root outputs]
Writes outputs/fig3_cnn_bn_mnist/fig3_cnn_bn_mnist.nc, PNG figures and summary.txt/.csv; the
same as `fsgeom reproduce fig3_cnn_bn_mnist`. Full settings: 10 seeds x 30 epochs.
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fig3_cnn_bn_mnist"))
