"""Natural gradient: by gradient descent (the paper's Algorithm 2) and damped exact (CG).

**Algorithm 2** (appendix A): any optimizer proposes Δθ₀ (RMSprop by default, a cheap
diagonal approximation of the natural gradient), then n corrections ::

    Δθᵢ₊₁ = Δθᵢ − η (J + λ F Δθᵢ),        i = 0..n−1

each one Fisher-vector product. The iteration descends on JᵀΔθ + λ/2 ΔθᵀFΔθ (Eq. 2) and,
for ηλ‖F‖ < 2 and F positive definite, converges to Δθ' = −F⁻¹J/λ, the natural-gradient
step (with λ = 1 exactly the natural gradient, Eq. 5).

F is the true Fisher (``fisher="exact"``: closed form for a categorical output, no label
sampling), its Monte-Carlo estimate (``"mc"``: labels sampled from the model) or the
empirical Fisher (``"empirical"``: observed labels — a different matrix), all from
:mod:`fsgeom.curvature`, evaluated at θ_t. By default F is evaluated on a batch *different*
from the one that gave J (drawn from ``validation``): with the same batch, "gradients
become judges of their own trustworthiness" (paper, Section 2; Pascanu & Bengio 2013;
Martens 2014).

**NaturalGradient**: the damped exact baseline θ ← θ − ε (F + δI)⁻¹ J, solved by conjugate
gradients (:func:`fsgeom.curvature.solve`); for small networks.

Passes (``last_step_passes``): 2 for the user's forward and backward, plus 2 per
Fisher-vector product (a Jacobian-vector and a vector-Jacobian product).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..curvature import CurvatureOperator, EmpiricalFisher, Fisher, solve
from ..data import batches
from ..functional import FunctionView
from ._common import (
    BatchSource,
    SourceAttribute,
    all_finite,
    check_count,
    check_hyper,
    parameter_names,
    raise_nonfinite,
    run_closure,
)
from ._wrapper import ProposalWrapper

__all__ = ["FISHERS", "NaturalGradient", "NaturalGradientByGD"]

FISHERS = ("exact", "mc", "empirical")


class FisherSource:
    """Builds the Fisher operator of one step from an explicit batch or a stream."""

    def __init__(
        self,
        model: nn.Module,
        owner: str,
        fisher: str,
        mc_samples: int,
        validation: Iterable | None,
        seed: int,
        batch_stats: bool,
        fisher_kwargs: dict[str, Any] | None,
    ):
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        self.model = model
        self.fisher = fisher
        self.mc_samples = check_count("mc_samples", mc_samples)
        self.batch_stats = bool(batch_stats)
        self.kwargs = dict(fisher_kwargs or {})
        self.generator = torch.Generator().manual_seed(int(seed))
        what = "(inputs, targets)" if fisher == "empirical" else "inputs"
        self.source = BatchSource(
            validation,
            "validation",
            f"{owner}.step needs a batch for the Fisher ({what} from the training distribution, "
            f"by default different from the training batch): pass step(fisher_batch=...) or "
            f"construct {owner}(..., validation=stream) with an iterable of batches",
        )

    def _check_fits(self, x: Tensor, name: str) -> None:
        """Fail before anything changes if ``x`` does not fit the model (a 2-example forward)."""
        view = FunctionView(self.model, "logits", self.batch_stats)
        try:
            with torch.no_grad():
                view(x[:2])
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"{name} of shape {tuple(x.shape)} does not fit the model: {e}") from e

    def operator(self, fisher_batch) -> CurvatureOperator:
        """F at the model's current θ (a copy is kept) on the given or next batch."""
        name = "fisher_batch" if fisher_batch is not None else "validation batch"
        raw = fisher_batch if fisher_batch is not None else self.source.draw_raw()
        if isinstance(raw, list):
            raw = tuple(raw)
        empirical = self.fisher == "empirical"
        x, y = next(batches(raw, need_targets=empirical, name=name))
        self._check_fits(x, name)
        kw = dict(self.kwargs)
        kw.setdefault("batch_stats", self.batch_stats)
        if empirical:
            return EmpiricalFisher(self.model, (x, y), **kw)
        mc = self.mc_samples if self.fisher == "mc" else None
        return Fisher(self.model, x, mc_samples=mc, generator=self.generator, **kw)


def _product(op: CurvatureOperator, names, delta, zeros, name: str) -> list[Tensor]:
    """(F Δ) restricted to ``names``, Δ zero on the other trainable parameters."""
    v = dict(zeros)
    v.update(zip(names, delta))
    try:
        out = op.matvec(v)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{name} does not fit the model: {e}") from e
    return [out[n] for n in names]


class NaturalGradientByGD(ProposalWrapper):
    """Natural gradient by gradient descent (Algorithm 2) around a proposing optimizer.

    Args:
        params: parameters / param groups (a base optimizer of class ``base`` is built with
            ``lr`` and ``base_kwargs``), or an existing ``torch.optim`` optimizer to wrap.
        lr: the base optimizer's learning rate (ignored when ``params`` is an optimizer).
        model: the module owning the parameters (required).
        lam: λ of Eq. 2 (default 1: the natural gradient), per param group.
        inner_lr: η of the corrections, per param group; converges if ηλ‖F‖ < 2.
        n_corrections: n >= 1 Fisher-vector products per step.
        fisher: ``"exact"`` (default), ``"mc"`` (``mc_samples`` labels per input drawn from
            the model with this optimizer's own generator, seeded by ``seed``) or
            ``"empirical"`` (observed labels: the batches must be ``(inputs, targets)``).
        validation: iterable of batches for F, drawn anew each step (default: a batch
            different from the training batch, as the paper requires).
        base: the proposing optimizer class (default ``torch.optim.RMSprop``).
        fisher_kwargs: extra arguments of the curvature operator (e.g.
            ``likelihood="gaussian"``, ``chunk_size``).

    Parameters of the model that this optimizer does not update (or that have no
    gradient) are held fixed: F is then the block of the Fisher on the updated ones.
    ``step(closure=None, fisher_batch=None)``: ``fisher_batch`` is an explicit batch for F
    (pass the training batch itself to evaluate F on it, against the paper's advice).
    The base optimizer's state (RMSprop's square averages) is not corrected; ``.grad`` is
    left as the user's backward wrote it. A batch that does not fit the model or a
    non-finite update raises after restoring the parameters (the base optimizer's state
    has then advanced). ``state_dict`` holds the base's state plus the step count, the
    stream position and the Monte-Carlo generator state.
    """

    _extra_keys = ("lam", "inner_lr")

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        *,
        model: nn.Module,
        lam: float = 1.0,
        inner_lr: float = 0.1,
        n_corrections: int = 1,
        fisher: str = "exact",
        mc_samples: int = 1,
        validation: Iterable | None = None,
        seed: int = 0,
        base: type[Optimizer] = torch.optim.RMSprop,
        base_kwargs: dict[str, Any] | None = None,
        batch_stats: bool = False,
        fisher_kwargs: dict[str, Any] | None = None,
    ):
        if isinstance(params, Optimizer):
            base_optimizer = params
        else:
            if not (isinstance(base, type) and issubclass(base, Optimizer)):
                raise TypeError(f"base must be a torch.optim.Optimizer class, got {base!r}")
            base_optimizer = base(params, lr=lr, **(base_kwargs or {}))
        defaults = {"lam": check_hyper("lam", lam), "inner_lr": check_hyper("inner_lr", inner_lr)}
        owner = type(self).__name__
        self.fisher_source = FisherSource(
            model, owner, fisher, mc_samples, validation, seed, batch_stats, fisher_kwargs
        )
        super().__init__(base_optimizer, model, defaults, n_corrections, self.fisher_source.source)
        self._check_groups()

    validation = SourceAttribute("fisher_source.source")  # the stream of batches (settable)

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["generator"] = self.fisher_source.generator.get_state()
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.fisher_source.generator.set_state(extra["generator"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, fisher_batch=None):
        """Base step, then n corrections Δθ ← Δθ − η(J + λFΔθ). Returns the closure's loss."""
        loss = run_closure(closure)
        self._check_groups()
        ps, names, grads, h = self._gather(("lam", "inner_lr"))
        step_no = self._steps + 1
        if not ps:
            self.base.step()
            self._steps, self.last_step_passes = step_no, 2
            return loss
        op = self.fisher_source.operator(fisher_batch)  # F at θ_t (copied)
        name = "fisher_batch" if fisher_batch is not None else "validation batch"
        named = set(names)
        zeros = {k: torch.zeros_like(t) for k, t in op.params.items() if k not in named}
        theta0 = [p.detach().clone() for p in ps]
        self.base.step()
        delta = torch._foreach_sub(ps, theta0)  # Δθ₀: what the base optimizer did
        lam, neg_eta = h["lam"], [-e for e in h["inner_lr"]]
        try:
            for _ in range(self.n_corrections):
                fd = _product(op, names, delta, zeros, name)
                torch._foreach_mul_(fd, lam)
                torch._foreach_add_(fd, grads)
                torch._foreach_mul_(fd, neg_eta)
                torch._foreach_add_(delta, fd)
            if not all_finite(delta):
                raise_nonfinite(
                    type(self).__name__, step_no, [], grads,
                    " (the base optimizer's state has already advanced)",
                )  # fmt: skip
        except BaseException:
            self._restore(ps, theta0)
            raise
        torch._foreach_add_(theta0, delta)
        torch._foreach_copy_(ps, theta0)
        self._steps = step_no
        self.last_step_passes = 2 + 2 * self.n_corrections
        return loss


class NaturalGradient(Optimizer):
    """Damped exact natural gradient: θ ← θ − ε (F + δI)⁻¹ J, by conjugate gradients.

    A baseline for small networks: each step solves (F + δI) x = J with
    :func:`fsgeom.curvature.solve` (``method="cg"``: matrix-free CG to relative residual
    ``tol``, at most ``maxiter`` iterations; ``"dense"`` or ``"auto"`` also accepted).
    F (``fisher``, ``mc_samples``, ``validation``, ``fisher_batch``, ``seed``) as in
    :class:`NaturalGradientByGD`; ``lr`` and ``damping`` per param group. The optimizer
    must update all trainable parameters of ``model`` (F is over all of them).
    ``last_solve`` holds the solver's report (iterations, residual, converged);
    ``last_step_passes`` = 2 + 2 per CG iteration. ``.grad`` is left untouched.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        damping: float = 1e-3,
        *,
        model: nn.Module,
        fisher: str = "exact",
        mc_samples: int = 1,
        validation: Iterable | None = None,
        seed: int = 0,
        method: str = "cg",
        tol: float = 1e-6,
        maxiter: int | None = None,
        batch_stats: bool = False,
        fisher_kwargs: dict[str, Any] | None = None,
    ):
        defaults = {"lr": check_hyper("lr", lr), "damping": check_hyper("damping", damping)}
        super().__init__(params, defaults)
        owner = type(self).__name__
        self._names = parameter_names(model, self.param_groups, owner)
        optimized = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in optimized
        ]
        if missing:
            raise ValueError(
                f"{owner} must update every trainable parameter of model (F is over all of "
                f"them); not in the optimizer: {missing}"
            )
        self.model = model
        self.fisher_source = FisherSource(
            model, owner, fisher, mc_samples, validation, seed, batch_stats, fisher_kwargs
        )
        self.method, self.tol, self.maxiter = method, float(tol), maxiter
        self._steps = 0
        self.last_step_passes = 0
        self.last_solve: dict[str, Any] = {}

    validation = SourceAttribute("fisher_source.source")  # the stream of batches (settable)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, fisher_batch=None):
        """θ ← θ − ε (F + δI)⁻¹ J. Returns the closure's loss (or ``None``)."""
        loss = run_closure(closure)
        step_no = self._steps + 1
        dampings = {g["damping"] for g in self.param_groups}
        if len(dampings) != 1:
            raise ValueError(f"damping must be the same in every param group, got {dampings}")
        op = self.fisher_source.operator(fisher_batch)
        name = "fisher_batch" if fisher_batch is not None else "validation batch"
        by_name = {self._names[id(p)]: (p, g["lr"]) for g in self.param_groups for p in g["params"]}
        grads = {
            k: (by_name[k][0].grad if by_name[k][0].grad is not None else torch.zeros_like(t))
            for k, t in op.params.items()
        }
        try:
            x, info = solve(
                op, grads, dampings.pop(), method=self.method, tol=self.tol,
                maxiter=self.maxiter, return_info=True,
            )  # fmt: skip
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"{name} does not fit the model: {e}") from e
        xs = [x[k] for k in op.params]
        if not all_finite(xs):
            raise_nonfinite(type(self).__name__, step_no, [], list(grads.values()), "")
        for k, xk in zip(op.params, xs):
            p, lr = by_name[k]
            p.add_(xk, alpha=-lr)
        self._steps = step_no
        self.last_solve = info
        self.last_step_passes = 2 + 2 * int(info.get("iterations", 0))
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fsgeom"] = {
            "steps": self._steps,
            "stream": self.fisher_source.source.state_dict(),
            "generator": self.fisher_source.generator.get_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        extra = sd.pop("fsgeom", None)
        super().load_state_dict(sd)
        if extra is not None:
            self._steps = int(extra["steps"])
            self.fisher_source.source.load_state_dict(extra["stream"])
            self.fisher_source.generator.set_state(extra["generator"])
