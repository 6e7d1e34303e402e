"""The Hilbert constraint: correcting a proposed step towards a small move in L² space.

Given a proposed step Δθ₀ and the training gradient J, the corrections of the paper's
Algorithm 1 (lines 10–17) descend on ::

    C(Δθ) = JᵀΔθ + λ·D(f_θ, f_{θ+Δθ})      D on a validation batch X_V = {x_i}, i = 1..N

    Δθ₁ = Δθ₀ − η ∇_Δθ λD(Δθ₀)                  (first correction: λD only, line 11)
    Δθⱼ = Δθⱼ₋₁ − η (J + ∇_Δθ λD(Δθⱼ₋₁))        (j = 2..n, line 15)

with D from :func:`fsgeom.distance.output_distance`: ``"rms"`` sqrt(1/N Σ_i |f_θ(x_i) −
f_{θ+Δθ}(x_i)|²) (Eq. 7; λD = (λ²/N Σ …)^{1/2}) or ``"mean_norm"`` 1/N Σ_i |…| (the authors'
public code). f_θ(X_V) is computed once, without autograd; each correction costs one
forward and one backward pass at θ + Δθⱼ₋₁ through a :class:`fsgeom.FunctionView`
(eval semantics by default, so BatchNorm running statistics never change).

**The gradient at zero.** D is a norm, not differentiable where f_{θ+Δθ} = f_θ (e.g. a
zero proposal): autograd through ``sqrt`` would give 0·∞ = NaN there. The gradient is
computed as ∇D = ∇(D²)/(2D) with the minimum-norm subgradient 0 where D = 0 (for
``"mean_norm"``: per example, 0 for every example whose outputs did not move). Everywhere
else this is the exact gradient.

:func:`hilbert_corrections` is the loop, shared by :class:`fsgeom.optim.HCGD` (proposal:
SGD with momentum, buffer absorbs the corrections) and :class:`HilbertConstrained`
(proposal: any torch optimizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..distance import REDUCTIONS, output_distance, per_example_sq_norm
from ..functional import FunctionView
from ._common import (
    BatchSource,
    SourceAttribute,
    all_finite,
    check_hyper,
    first_nonfinite,
    inputs_of,
    raise_nonfinite,
    run_closure,
)
from ._wrapper import ProposalWrapper

__all__ = [
    "HCAdam",
    "HilbertConstrained",
    "distance_and_gradient",
    "hilbert_corrections",
    "reference_outputs",
]

Reference = tuple[Tensor, Tensor]


def check_distance(distance: str) -> str:
    if distance not in REDUCTIONS:
        raise ValueError(f"distance must be one of {REDUCTIONS}, got {distance!r}")
    return distance


def reference_outputs(
    view: FunctionView, names: Sequence[str], theta: Sequence[Tensor], x: Tensor, name: str
) -> Tensor:
    """f_θ(x) without autograd, θ given for the parameters ``names`` (the others: the model's).

    Raises ``ValueError`` naming ``name`` when ``x`` does not fit the model.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f"{name} must be a batch of inputs (N, ...), got {x!r}")
    try:
        with torch.no_grad():
            f = view(dict(zip(names, theta)), x)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} and dtype {x.dtype} does not fit the model: {e}"
        ) from e
    if f.dim() == 0 or f.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name}: the model maps inputs {tuple(x.shape)} to outputs {tuple(f.shape)}; "
            "expected one output row per input"
        )
    return f


def distance_and_gradient(
    view: FunctionView,
    names: Sequence[str],
    point: Sequence[Tensor],
    delta: Sequence[Tensor],
    x: Tensor,
    f_ref: Tensor,
    distance: str = "rms",
) -> tuple[Tensor, list[Tensor]]:
    """D(f_ref, f_{point+delta}(x)) and its gradient with respect to delta.

    One forward and one backward pass. Returns the 0-dim distance (detached) and a list of
    fresh gradient tensors shaped like ``point`` (owned by the caller; zero where D = 0, see
    the module doc).
    """
    with torch.no_grad():
        cand = torch._foreach_add(list(point), list(delta))
    for c in cand:
        c.requires_grad_(True)
    with torch.enable_grad():
        f = view(dict(zip(names, cand)), x)
        sq = per_example_sq_norm(f - f_ref)
        value = output_distance(f_ref, f.detach(), distance)
        if distance == "rms":
            # ∇D = ∇(mean sq) / (2D); 0 where D = 0
            w = torch.where(value > 0, 0.5 / value, torch.zeros_like(value))
            surrogate = w * sq.mean()
        else:
            # ∇ mean_i |d_i| = mean_i ∇|d_i|² / (2|d_i|); 0 for examples with d_i = 0
            norms = sq.detach().sqrt()
            w = torch.where(norms > 0, 0.5 / norms, torch.zeros_like(norms))
            surrogate = (w * sq).mean()
        grads = torch.autograd.grad(surrogate, cand, materialize_grads=True)
    return value, list(grads)


def hilbert_corrections(
    view: FunctionView,
    names: Sequence[str],
    point: Sequence[Tensor],
    delta: Sequence[Tensor],
    grad: Sequence[Tensor] | None,
    lam: Sequence[float],
    inner_lr: Sequence[float],
    n_corrections: int,
    reference: Reference | None,
    distance: str = "rms",
    redraw: Callable[[], Reference] | None = None,
) -> tuple[list[Tensor], int]:
    """Apply the n Hilbert corrections to ``delta`` in place (see the module doc).

    Args:
        view: the network as a function (output space and BatchNorm semantics).
        names: model parameter names of the corrected tensors.
        point, delta: the candidate is θ + Δθ = ``point + delta`` (lists of tensors);
            ``delta`` is corrected in place. (HCGD: point = θ, delta = Δθ₀;
            HilbertConstrained: point = θ + Δθ₀, delta = 0, so delta ends as Δθₙ − Δθ₀.)
        grad: J, added from the second correction on (may be ``None`` if n = 1).
        lam, inner_lr: λ and η for each tensor (per parameter group).
        reference: ``(x_val, f_θ(x_val))`` for the first correction (``None`` only if every
            λ is 0: then no forward pass is made and the corrections are −ηJ).
        redraw: if given, called before each correction after the first for a new
            ``(x_val, f_θ(x_val))`` (one extra forward pass each).

    Returns:
        The distances D at θ + Δθⱼ₋₁ of each correction (0-dim tensors) and the number of
        forward + backward passes used.
    """
    distances: list[Tensor] = []
    passes = 0
    delta = list(delta)
    if not any(lam):  # ∇λD = 0: the corrections reduce to −ηJ, no pass needed
        if n_corrections > 1:
            step = torch._foreach_mul(list(grad), [-e for e in inner_lr])
            for _ in range(n_corrections - 1):
                torch._foreach_add_(delta, step)
        return distances, passes
    x, f_ref = reference
    first_scale = [-e * lm for e, lm in zip(inner_lr, lam)]
    neg_eta = [-e for e in inner_lr]
    for j in range(n_corrections):
        if j and redraw is not None:
            x, f_ref = redraw()
            passes += 1
        d, g = distance_and_gradient(view, names, point, delta, x, f_ref, distance)
        passes += 2
        distances.append(d)
        with torch.no_grad():
            if j == 0:  # Δθ₁ = Δθ₀ − η λ∇D
                torch._foreach_mul_(g, first_scale)
            else:  # Δθⱼ = Δθⱼ₋₁ − η (J + λ∇D)
                torch._foreach_mul_(g, list(lam))
                torch._foreach_add_(g, list(grad))
                torch._foreach_mul_(g, neg_eta)
            torch._foreach_add_(delta, g)
    return distances, passes


class HilbertCorrector:
    """The per-optimizer part of the Hilbert constraint: view, batch source, options."""

    def __init__(
        self,
        model: nn.Module,
        owner: str,
        validation: Iterable | None,
        output: str,
        distance: str,
        redraw_validation: bool,
        batch_stats: bool,
    ):
        self.view = FunctionView(model, output=output, batch_stats=batch_stats)
        self.distance = check_distance(distance)
        self.redraw_validation = bool(redraw_validation)
        self.source = BatchSource(
            validation,
            "validation",
            f"{owner}.step needs a validation batch (inputs from the training distribution, "
            f"different from the training batch): pass step(val_inputs=x_val) with a tensor "
            f"(N, ...), or construct {owner}(..., validation=stream) with an iterable of input "
            "batches such as Dataset.validation_stream(256)",
        )
        if self.redraw_validation and validation is None:
            raise ValueError("redraw_validation=True needs validation=... (a stream of batches)")

    def first_reference(self, names, theta, val_inputs) -> Reference:
        if val_inputs is not None:
            x = inputs_of(val_inputs, "val_inputs")
            return x, reference_outputs(self.view, names, theta, x, "val_inputs")
        x = self.source.draw()
        return x, reference_outputs(self.view, names, theta, x, "validation batch")

    def redraw(self, names, theta) -> Callable[[], Reference] | None:
        if not self.redraw_validation:
            return None

        def draw() -> Reference:
            x = self.source.draw()
            return x, reference_outputs(self.view, names, theta, x, "validation batch")

        return draw

    def correct(self, names, point, delta, grads, lam, eta, n, reference, redraw):
        with self.view.measuring():
            return hilbert_corrections(
                self.view, names, point, delta, grads, lam, eta, n, reference,
                self.distance, redraw,
            )  # fmt: skip


class HilbertConstrained(ProposalWrapper):
    """Hilbert-constrain any ``torch.optim`` optimizer: its step is the proposal Δθ₀.

    Each :meth:`step`: compute f_θ(x_val) at the current θ (this also checks the validation
    batch before anything changes), let ``base_optimizer`` step (Δθ₀ = exactly what it did),
    then apply the n corrections of :func:`hilbert_corrections`, J being the ``.grad`` of
    the parameters. Parameters end at θ + Δθₙ.

    Args:
        base_optimizer: the proposer, e.g. ``torch.optim.Adam(model.parameters())``.
        model: the module that owns the parameters (evaluated at θ + Δθ).
        lam: λ (default 0.5, the paper's value), per param group (key ``"lam"``).
        inner_lr: η of the corrections (default 0.02), per param group (``"inner_lr"``).
        n_corrections: n >= 1.
        validation: an iterable of input batches (e.g. ``Dataset.validation_stream(256)``),
            drawn anew each step; optional when every step gets ``val_inputs``.
        output: output space of D: ``"probs"`` (default), ``"logits"`` or ``"log_probs"``.
        distance: ``"rms"`` (Eq. 7, default) or ``"mean_norm"``.
        redraw_validation: draw a new validation batch for every correction (paper: 2 + 3n
            passes per step) instead of one per step (3 + 2n passes).
        batch_stats: evaluate D with BatchNorm batch statistics (never updating the running
            statistics) instead of the running statistics (default).

    **The base optimizer's state is not corrected.** Adam's moments, SGD's momentum buffer
    and the like keep what the base step put there: they summarize *gradients*, and the
    correction changes only the parameters. So ``HilbertConstrained(SGD(momentum=β))``
    differs from :class:`fsgeom.optim.HCGD`, whose momentum buffer absorbs the
    corrections as in the paper's Algorithm 1. ``param_groups`` and ``state`` are those of
    the base optimizer (shared objects): an LR scheduler on the wrapper schedules the base.
    ``state_dict()`` is the base's plus an ``"fsgeom"`` entry (step count, validation
    stream position if the stream has ``state_dict``).

    After :meth:`step`, ``.grad`` holds the user's gradient unchanged;
    ``last_step_passes`` = 2 (the user's forward and backward) + 1 per reference forward +
    2 per correction; ``last_distances`` holds D before each correction.

    On a non-finite distance or update a ``FloatingPointError`` names the step and the
    parameters are restored; the base optimizer's state has then already advanced.
    """

    _extra_keys = ("lam", "inner_lr")

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        model: nn.Module,
        lam: float = 0.5,
        inner_lr: float = 0.02,
        n_corrections: int = 1,
        validation: Iterable | None = None,
        output: str = "probs",
        distance: str = "rms",
        redraw_validation: bool = False,
        batch_stats: bool = False,
    ):
        defaults = {
            "lam": check_hyper("lam", lam),
            "inner_lr": check_hyper("inner_lr", inner_lr),
        }
        owner = type(self).__name__
        self.corrector = HilbertCorrector(
            model, owner, validation, output, distance, redraw_validation, batch_stats
        )
        super().__init__(base_optimizer, model, defaults, n_corrections, self.corrector.source)
        self._check_groups()
        self.last_distances: Tensor = torch.empty(0)

    validation = SourceAttribute("corrector.source")  # the stream of batches (settable)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, val_inputs=None):
        """Base step, then the Hilbert corrections. Returns the closure's loss (or ``None``).

        ``val_inputs``: an explicit validation batch (tensor or ``(inputs, targets)``);
        otherwise the next batch of ``validation``.
        """
        loss = run_closure(closure)
        self._check_groups()
        ps, names, grads, h = self._gather(("lam", "inner_lr"))
        n = self.n_corrections
        step_no = self._steps + 1
        active = bool(ps) and any(h["lam"])
        reference = self.corrector.first_reference(names, ps, val_inputs) if active else None
        theta0 = [p.detach().clone() for p in ps]
        self.base.step()
        passes, distances = 2, []
        if ps and (active or n > 1):
            corr = [torch.zeros_like(p) for p in ps]
            try:
                distances, used = self.corrector.correct(
                    names, ps, corr, grads, h["lam"], h["inner_lr"], n, reference,
                    self.corrector.redraw(names, theta0),
                )  # fmt: skip
                passes += used + (1 if active else 0)
                if first_nonfinite(distances) is not None or not all_finite(corr):
                    raise_nonfinite(
                        type(self).__name__, step_no, distances, grads,
                        " (the base optimizer's state has already advanced)",
                    )  # fmt: skip
            except BaseException:
                self._restore(ps, theta0)
                raise
            torch._foreach_add_(ps, corr)
        elif ps and not all_finite(ps):
            self._restore(ps, theta0)
            raise_nonfinite(type(self).__name__, step_no, [], grads, "")
        self._steps = step_no
        self.last_step_passes = passes
        self.last_distances = torch.stack(distances) if distances else torch.empty(0)
        return loss


class HCAdam(HilbertConstrained):
    """Adam as the proposer of a :class:`HilbertConstrained` optimizer.

    ``HCAdam(params, lr, betas, eps, weight_decay, amsgrad, model=..., lam=..., ...)`` is
    ``HilbertConstrained(torch.optim.Adam(params, lr, betas, eps, weight_decay, amsgrad),
    model=..., lam=..., ...)``. Adam's moments are those of the raw gradients; only the
    parameters are corrected.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        model: nn.Module,
        lam: float = 0.5,
        inner_lr: float = 0.02,
        n_corrections: int = 1,
        validation: Iterable | None = None,
        output: str = "probs",
        distance: str = "rms",
        redraw_validation: bool = False,
        batch_stats: bool = False,
    ):
        base = torch.optim.Adam(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
        )
        super().__init__(
            base,
            model=model,
            lam=lam,
            inner_lr=inner_lr,
            n_corrections=n_corrections,
            validation=validation,
            output=output,
            distance=distance,
            redraw_validation=redraw_validation,
            batch_stats=batch_stats,
        )
