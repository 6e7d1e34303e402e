"""fsgeom: measure and shape how neural networks move in function space.

Plotting lives in :mod:`fsgeom.plotting` (imported on demand: it loads matplotlib and
seaborn); experiments in :mod:`fsgeom.experiment`.
"""

from . import compare, curvature, data, experiment, functional, models, optim, tracking
from .curvature import EmpiricalFisher, Fisher, L2Metric, solve, spectrum
from .data import ValidationStream, load
from .distance import (
    kl_divergence,
    l2_distance,
    linearized_l2_distance,
    output_distance,
    parameter_distance,
)
from .experiment import RunConfig, run, sweep
from .functional import FunctionView, flatten, function_view, snapshot, unflatten
from .optim import HCGD, HCAdam, HilbertConstrained, NaturalGradient, NaturalGradientByGD
from .tracking import Tracker, combine, open_run, save_run

__version__ = "0.1.0"

__all__ = [
    "HCGD",
    "EmpiricalFisher",
    "Fisher",
    "FunctionView",
    "HCAdam",
    "HilbertConstrained",
    "L2Metric",
    "NaturalGradient",
    "NaturalGradientByGD",
    "RunConfig",
    "Tracker",
    "ValidationStream",
    "combine",
    "compare",
    "curvature",
    "data",
    "experiment",
    "flatten",
    "function_view",
    "functional",
    "kl_divergence",
    "l2_distance",
    "linearized_l2_distance",
    "load",
    "models",
    "open_run",
    "optim",
    "output_distance",
    "parameter_distance",
    "run",
    "save_run",
    "snapshot",
    "solve",
    "spectrum",
    "sweep",
    "tracking",
    "unflatten",
]
