"""Slow, obviously-correct reference implementations (float64), one function per formula.

Fast paths in fsgeom are tested against these: per-example Python loops, dense Jacobians
from ``torch.autograd.functional.jacobian``, hand transcriptions of the paper's algorithms.
Nothing here is optimized; clarity is the point.
"""

import math

import torch
from torch import nn


def ref_outputs(model: nn.Module, x: torch.Tensor, output: str = "probs") -> torch.Tensor:
    """The model's outputs, one example at a time, in eval mode on a deep copy."""
    import copy

    m = copy.deepcopy(model).eval()
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            z = m(x[i : i + 1])[0]
            if output == "probs":
                z = torch.softmax(z, -1)
            elif output == "log_probs":
                z = torch.log_softmax(z, -1)
            rows.append(z)
    return torch.stack(rows)


def ref_l2_distance(model_a, model_b, x, output="probs", reduction="rms"):
    """sqrt(1/N Σ_i |f_a(x_i) − f_b(x_i)|²) or 1/N Σ_i |f_a(x_i) − f_b(x_i)|, by a loop."""
    fa, fb = ref_outputs(model_a, x, output), ref_outputs(model_b, x, output)
    total = 0.0
    for i in range(x.shape[0]):
        d = math.sqrt(sum(float(v) ** 2 for v in (fa[i] - fb[i]).reshape(-1)))
        total += d**2 if reduction == "rms" else d
    mean = total / x.shape[0]
    return math.sqrt(mean) if reduction == "rms" else mean


def ref_kl(model_a, model_b, x):
    """1/N Σ_i Σ_c p_a log(p_a / p_b), by a loop."""
    pa, pb = ref_outputs(model_a, x, "probs"), ref_outputs(model_b, x, "probs")
    total = 0.0
    for i in range(x.shape[0]):
        for c in range(pa.shape[1]):
            p, q = float(pa[i, c]), float(pb[i, c])
            total += p * math.log(p / q)
    return total / x.shape[0]


def ref_jacobian(model: nn.Module, x: torch.Tensor, output: str = "probs") -> torch.Tensor:
    """Dense Jacobian of the outputs w.r.t. the flat trainable parameters: (N, C, P).

    Built with ``torch.autograd.functional.jacobian`` on a deep copy in eval mode.
    """
    import copy

    from torch.func import functional_call

    m = copy.deepcopy(model).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in m.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in m.named_parameters() if p.requires_grad])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = flat[i : i + k].reshape(s)
            i += k
        z = functional_call(m, params, (x,))
        if output == "probs":
            z = torch.softmax(z, -1)
        elif output == "log_probs":
            z = torch.log_softmax(z, -1)
        return z

    return torch.autograd.functional.jacobian(f, theta)


def ref_parameter_distance(model_a, model_b):
    """Euclidean distance between the trainable parameters, element by element."""
    total = 0.0
    for (_, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        for u, v in zip(pa.detach().reshape(-1).tolist(), pb.detach().reshape(-1).tolist()):
            total += (u - v) ** 2
    return math.sqrt(total)
