"""The paper's networks, deterministic given a seed.

Each constructor initializes under its own seed inside :func:`torch.random.fork_rng`, so
building a model never consumes or changes the caller's global random state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["mlp", "cnn_bn", "squeezenet", "Fire", "build"]


def _seeded(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def mlp(sizes: Sequence[int] = (784, 90, 50, 10), seed: int = 0) -> nn.Sequential:
    """Fully connected ReLU network (the paper's MLP: 784-90-50-10, no dropout, no BN).

    Input ``(N, ...)`` is flattened first, so images ``(N, 1, 28, 28)`` work directly.
    Output: logits ``(N, sizes[-1])``.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")

    def make():
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return _seeded(seed, make)


def cnn_bn(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    image_size: int = 28,
    seed: int = 0,
) -> nn.Sequential:
    """The 3-layer convolutional network with BatchNorm used for MNIST.

    conv5×5(width)–BN–ReLU–maxpool2, conv5×5(2·width)–BN–ReLU–maxpool2, linear → classes.
    Padding keeps the size before each pooling, so any ``image_size`` divisible by 4 works
    (28 for MNIST, 8 for the digits). Output: logits ``(N, num_classes)``.
    """
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4, got {image_size}")

    def make():
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, num_classes),
        )

    return _seeded(seed, make)


class Fire(nn.Module):
    """SqueezeNet's Fire module: 1×1 squeeze, then concatenated 1×1 and 3×3 expands."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(s)), self.act(self.expand3x3(s))], 1)


def squeezenet(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5, seed: int = 0):
    """SqueezeNet v1.1 (Iandola et al., 2016) for 32×32 inputs such as CIFAR-10.

    As v1.1, with the stem adapted to small images: a 3×3 stride-1 convolution (64
    channels) instead of stride 2, so 32×32 inputs reach the classifier at 4×4.
    Final 1×1 convolution to ``num_classes``, ReLU, global average pooling.
    Output: logits ``(N, num_classes)``.
    """

    def make():
        features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        final = nn.Conv2d(512, num_classes, 1)
        net = nn.Sequential(
            features,
            nn.Dropout(dropout),
            final,
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        return net

    return _seeded(seed, make)


def build(name: str, input_shape: Sequence[int], num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build a named model (``"mlp"``, ``"cnn_bn"``, ``"squeezenet"``) for an input shape
    ``(C, H, W)``; the MLP uses the paper's hidden widths 90-50."""
    c, h = int(input_shape[0]), int(input_shape[-1])
    if name == "mlp":
        n = 1
        for s in input_shape:
            n *= int(s)
        return mlp((n, 90, 50, num_classes), seed=seed)
    if name == "cnn_bn":
        return cnn_bn(in_channels=c, num_classes=num_classes, image_size=h, seed=seed)
    if name == "squeezenet":
        return squeezenet(num_classes=num_classes, in_channels=c, seed=seed)
    raise ValueError(f"model must be 'mlp', 'cnn_bn' or 'squeezenet', got {name!r}")
