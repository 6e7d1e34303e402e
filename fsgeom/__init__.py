"""fsgeom: measure and shape how neural networks move in function space."""

from . import data, functional, models
from .data import ValidationStream, load
from .distance import (
    kl_divergence,
    l2_distance,
    linearized_l2_distance,
    output_distance,
    parameter_distance,
)
from .functional import FunctionView, flatten, function_view, snapshot, unflatten

__version__ = "0.1.0"

__all__ = [
    "FunctionView",
    "ValidationStream",
    "data",
    "flatten",
    "function_view",
    "functional",
    "kl_divergence",
    "l2_distance",
    "linearized_l2_distance",
    "load",
    "models",
    "output_distance",
    "parameter_distance",
    "snapshot",
    "unflatten",
]
