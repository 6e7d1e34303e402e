"""Distances between networks: L² in function space (exact, streamed, linearized), KL, and
Euclidean in parameter space.

L² distance over an input distribution X, with |·| the Euclidean norm over the output
vector (paper, Section 2 and Eq. 7)::

    rms:        ‖f_a − f_b‖ ≈ ( 1/N Σ_i |f_a(x_i) − f_b(x_i)|² )^{1/2}
    mean_norm:               1/N Σ_i |f_a(x_i) − f_b(x_i)|     (the authors' public code)

Over a loader the sums run over all N examples, so streaming gives exactly the value of
one big batch. All functions return 0-dim tensors and never change the models (see
:mod:`fsgeom.functional`). A network given as a module is *measured* (its parameters are
read as constants, no autograd graph is kept); a network given as a parameter dict whose
tensors require grad is differentiated through, so the distance can serve as a penalty.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import jvp

from .data import batches
from .functional import (
    Params,
    as_params,
    check_output,
    function_view,
    measuring,
    trainable_params,
)

__all__ = [
    "REDUCTIONS",
    "kl_divergence",
    "l2_distance",
    "linearized_l2_distance",
    "output_distance",
    "parameter_distance",
    "per_example_sq_norm",
]

REDUCTIONS = ("rms", "mean_norm")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def per_example_sq_norm(diff: Tensor) -> Tensor:
    """|d_i|² for each example of a batch of output differences ``(N, ...)`` → ``(N,)``."""
    return diff.reshape(diff.shape[0], -1).square().sum(1)


def _reduce(sq_sum: Tensor, norm_sum: Tensor | None, n: int, reduction: str, squared: bool):
    if reduction == "rms":
        ms = sq_sum / n
        return ms if squared else ms.sqrt()
    if squared:
        raise ValueError("squared=True is defined for reduction='rms' only")
    return norm_sum / n


def output_distance(fa: Tensor, fb: Tensor, reduction: str = "rms", squared: bool = False):
    """Distance between two batches of outputs ``(N, ...)`` of the same inputs.

    ``"rms"``: sqrt(mean_i |fa_i − fb_i|²) (``squared=True``: the mean square);
    ``"mean_norm"``: mean_i |fa_i − fb_i|. This is the one place the estimator lives; the
    optimizers and the tracker call it.
    """
    _check_reduction(reduction)
    if fa.shape != fb.shape:
        raise ValueError(f"outputs differ in shape: {tuple(fa.shape)} vs {tuple(fb.shape)}")
    sq = per_example_sq_norm(fa - fb)
    norm_sum = sq.sqrt().sum() if reduction == "mean_norm" else None
    return _reduce(sq.sum(), norm_sum, fa.shape[0], reduction, squared)


def _check_same_architecture(pa: Mapping[str, Tensor], pb: Mapping[str, Tensor]) -> None:
    for (na, ta), (nb, tb) in zip(pa.items(), pb.items()):
        if na != nb or ta.shape != tb.shape:
            raise ValueError(
                "the two networks differ: first differing trainable parameter is "
                f"{na!r} {tuple(ta.shape)} vs {nb!r} {tuple(tb.shape)}"
            )
    if len(pa) != len(pb):
        longer, shorter = (pa, pb) if len(pa) > len(pb) else (pb, pa)
        extra = list(longer)[len(shorter)]
        raise ValueError(f"the two networks differ: parameter {extra!r} exists in only one of them")


def _resolve(a, b, model: nn.Module | None) -> tuple[nn.Module, Params, nn.Module, Params]:
    """Turn (module | parameter dict) pairs into (module, θ) pairs of one architecture."""

    def module_for(x, other):
        if isinstance(x, nn.Module):
            return x
        if model is not None:
            return model
        if isinstance(other, nn.Module):
            return other
        raise ValueError(
            "both networks are parameter dicts: pass model=... (the module they belong to)"
        )

    ma, mb = module_for(a, b), module_for(b, a)
    pa = trainable_params(a) if isinstance(a, nn.Module) else a
    pb = trainable_params(b) if isinstance(b, nn.Module) else b
    for name, p in (("a", pa), ("b", pb)):
        if not isinstance(p, Mapping):
            raise TypeError(f"{name} must be an nn.Module or a parameter dict, got {type(p)}")
    _check_same_architecture(pa, pb)
    if not isinstance(a, nn.Module):
        pa = as_params(pa, trainable_params(ma), "a")
    if not isinstance(b, nn.Module):
        pb = as_params(pb, trainable_params(mb), "b")
    return ma, pa, mb, pb


def _check_finite(t: Tensor, what: str, i: int) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"{what} on batch {i} is not finite (NaN or inf); pass check_finite=False to "
            "compute the distance anyway"
        )


def l2_distance(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    data,
    output: str = "probs",
    reduction: str = "rms",
    squared: bool = False,
    *,
    model: nn.Module | None = None,
    batch_stats: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """L² function distance ‖f_a − f_b‖ over the inputs of ``data``.

    Args:
        a, b: two networks of one architecture: modules, or parameter dicts (θ) of
            ``model`` (or of the other argument when that is a module).
        data: a tensor of inputs, ``(inputs, targets)``, or an iterable of batches.
        output: output space, ``"probs"`` (default), ``"logits"`` or ``"log_probs"``.
        reduction: ``"rms"`` — sqrt(1/N Σ_i |f_a(x_i) − f_b(x_i)|²) (paper, Eq. 7) — or
            ``"mean_norm"`` — 1/N Σ_i |f_a(x_i) − f_b(x_i)|.
        squared: return the mean squared distance (``"rms"`` only).
        batch_stats: BatchNorm on batch statistics (never updating running statistics)
            instead of running statistics.
        check_finite: raise ``FloatingPointError`` on non-finite outputs.

    Returns:
        A 0-dim tensor. Over several batches the sums run over all examples, so the result
        equals that of one batch holding all of them.
    """
    check_output(output)
    _check_reduction(reduction)
    if squared and reduction != "rms":
        raise ValueError("squared=True is defined for reduction='rms' only")
    ma, pa, mb, pb = _resolve(a, b, model)
    va = function_view(ma, output, batch_stats)
    vb = function_view(mb, output, batch_stats)
    sq_sum = norm_sum = None
    n = 0
    with measuring(ma, batch_stats), measuring(mb, batch_stats):
        for i, (x, _) in enumerate(batches(data)):
            fa, fb = va(pa, x), vb(pb, x)
            if check_finite:
                _check_finite(fa, "output of a", i)
                _check_finite(fb, "output of b", i)
            sq = per_example_sq_norm(fa - fb)
            s = sq.sum()
            sq_sum = s if sq_sum is None else sq_sum + s
            if reduction == "mean_norm":
                s = sq.sqrt().sum()
                norm_sum = s if norm_sum is None else norm_sum + s
            n += x.shape[0]
    return _reduce(sq_sum, norm_sum, n, reduction, squared)


def linearized_l2_distance(
    model: nn.Module,
    params: Mapping[str, Tensor] | Tensor | None,
    delta: Mapping[str, Tensor] | Tensor,
    data,
    output: str = "probs",
    squared: bool = False,
    *,
    batch_stats: bool = False,
) -> Tensor:
    """Linearized L² length of a step δ at θ: sqrt(1/N Σ_i |J_i δ|²), J_i = ∂f(x_i)/∂θ.

    One ``torch.func.jvp`` per batch. ``params`` (θ) is a dict, a flat vector or ``None``
    for the model's current parameters; ``delta`` a dict or flat vector of θ's layout.
    Its square is δᵀGδ with G the L² metric (:class:`fsgeom.L2Metric`), and it agrees with
    :func:`l2_distance` between θ and θ+δ up to O(|δ|²).
    """
    view = function_view(model, check_output(output), batch_stats)
    current = trainable_params(model)
    p = current if params is None else as_params(params, current, "params")
    d = as_params(delta, current, "delta")
    sq_sum, n = None, 0
    with view.measuring():
        for x, _ in batches(data):
            _, jd = jvp(lambda q, x=x: view(q, x), (p,), (d,))
            s = per_example_sq_norm(jd).sum()
            sq_sum = s if sq_sum is None else sq_sum + s
            n += x.shape[0]
    ms = sq_sum / n
    return ms if squared else ms.sqrt()


def kl_divergence(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    data,
    *,
    model: nn.Module | None = None,
    batch_stats: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """Mean over inputs of KL(p_a(·|x) ‖ p_b(·|x)) between categorical outputs.

    1/N Σ_i Σ_c p_a(c|x_i) (log p_a(c|x_i) − log p_b(c|x_i)), with p = softmax of the
    module's logits ``(N, C)``. Non-negative, zero iff the predictive distributions agree.
    """
    ma, pa, mb, pb = _resolve(a, b, model)
    va = function_view(ma, "log_probs", batch_stats)
    vb = function_view(mb, "log_probs", batch_stats)
    total, n = None, 0
    with measuring(ma, batch_stats), measuring(mb, batch_stats):
        for i, (x, _) in enumerate(batches(data)):
            la, lb = va(pa, x), vb(pb, x)
            if la.dim() != 2:
                raise ValueError(
                    f"kl_divergence needs class scores of shape (N, C); got {tuple(la.shape)}"
                )
            if check_finite:
                _check_finite(la, "output of a", i)
                _check_finite(lb, "output of b", i)
            s = (la.exp() * (la - lb)).sum()
            total = s if total is None else total + s
            n += x.shape[0]
    return total / n


def parameter_distance(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    per_tensor: bool = False,
):
    """Euclidean distance ‖θ_a − θ_b‖ over the trainable parameters.

    With ``per_tensor=True`` returns ``(total, {name: ‖θ_a[name] − θ_b[name]‖})``.
    """
    pa = trainable_params(a) if isinstance(a, nn.Module) else a
    pb = trainable_params(b) if isinstance(b, nn.Module) else b
    _check_same_architecture(pa, pb)
    sq = {n: (pa[n] - pb[n]).square().sum() for n in pa}
    total = torch.stack(list(sq.values())).sum().sqrt()
    if per_tensor:
        return total, {n: s.sqrt() for n, s in sq.items()}
    return total
