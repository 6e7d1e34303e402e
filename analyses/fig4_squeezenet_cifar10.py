"""Fig. 4: SqueezeNet v1.1 on CIFAR-10, SGD (lr 0.1) vs HCGD (lr 0.1 and 0.3), learning rates
divided by 10 after epoch 150.

Usage: python analyses/fig4_squeezenet_cifar10.py [--quick] [--seeds N] [--epochs E] [--root
    outputs]
Writes outputs/fig4_squeezenet_cifar10/fig4_squeezenet_cifar10.nc, PNG figures and
summary.txt/.csv; the same as `fsgeom reproduce fig4_squeezenet_cifar10`. GPU-scale: the full
setting (3 seeds x 200 epochs) is meant for a GPU. CIFAR-10 is read only from the binary batches
folder cifar-10-batches-bin (--data-root, or $FSGEOM_DATA/cifar-10-batches-bin); the pickled
python version is never read.
"""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main("fig4_squeezenet_cifar10"))
