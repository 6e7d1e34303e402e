"""Optimizers that move networks carefully in function space.

* :class:`HCGD` — Hilbert-constrained gradient descent (paper, Algorithm 1).
* :class:`HilbertConstrained` / :class:`HCAdam` — the same L² correction around any
  ``torch.optim`` optimizer's proposed step; :func:`hilbert_corrections` is the shared loop.
* :class:`NaturalGradientByGD` — natural gradient by gradient descent (Algorithm 2);
  :class:`NaturalGradient` — damped exact natural gradient by conjugate gradients.

Every optimizer here follows the ``torch.optim`` protocol and exposes
``last_step_passes``: the forward + backward passes its last step used, counting the
user's training forward and backward (SGD: 2; HCGD: 3 + 2n, or 2 + 3n when redrawing the
validation batch for every correction).
"""

from .hcgd import HCGD
from .hilbert import HCAdam, HilbertConstrained, hilbert_corrections
from .natural import NaturalGradient, NaturalGradientByGD

__all__ = [
    "HCAdam",
    "HCGD",
    "HilbertConstrained",
    "NaturalGradient",
    "NaturalGradientByGD",
    "hilbert_corrections",
]
