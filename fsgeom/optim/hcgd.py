"""Hilbert-constrained gradient descent (HCGD), the paper's Algorithm 1.

Per step, with J = ∇_θ C₀ (the ``.grad`` left by the user's ``loss.backward()``, plus
``weight_decay``·θ when set)::

    v ← βv + εJ;  Δθ₀ = −v                           (lines 8–9: SGD with momentum)
    Δθ₁ = Δθ₀ − η ∇_Δθ λD(f_θ, f_{θ+Δθ₀});  v ← v + η∇λD     (lines 10–13)
    Δθⱼ = Δθⱼ₋₁ − η (J + ∇_Δθ λD(Δθⱼ₋₁));    v ← v + η(…)    (lines 14–17, j = 2..n)
    θ ← θ + Δθₙ                                          (line 18)

so the momentum buffer always equals −Δθₙ: it absorbs every correction. D is the L²
distance on a validation batch (see :mod:`fsgeom.optim.hilbert`). The paper's loop header
"for 1 < j < n" is read as "for the further corrections j = 2..n", so that ``n_corrections``
counts all corrections and a step costs the 2 + 3n passes the paper states.

**Momentum convention.** As in the paper, the learning rate sits *inside* the buffer:
v ← βv + εJ, θ ← θ − v. ``torch.optim.SGD`` keeps b ← βb + J and steps θ ← θ − ε b. With a
constant ε the two are the same algorithm (v = ε b; equal up to floating-point rounding),
so HCGD with ``lam=0`` is SGD with momentum. Under an LR schedule they differ: here a
change of ε affects only new gradients, while in torch's SGD it rescales the whole
accumulated velocity at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._common import (
    NameMap,
    SourceAttribute,
    all_finite,
    check_count,
    check_hyper,
    first_nonfinite,
    raise_nonfinite,
    run_closure,
)
from .hilbert import HilbertCorrector

__all__ = ["HCGD"]


class HCGD(Optimizer):
    """Hilbert-constrained gradient descent (Algorithm 1 of Benjamin, Rolnick & Kording).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. ``lr``,
            ``momentum``, ``weight_decay``, ``lam`` and ``inner_lr`` may differ per group.
        lr: ε, the learning rate of the proposal.
        momentum: β (v ← βv + εJ; the buffer absorbs the corrections).
        weight_decay: adds ``weight_decay``·θ to J (also in the corrections j >= 2).
        lam: λ, weight of the L² distance (paper: 0.5).
        inner_lr: η, learning rate of the corrections (paper: 0.02).
        n_corrections: n >= 1 corrections per step (paper: 1, and 10).
        model: the ``nn.Module`` owning the parameters (required).
        validation: an iterable of input batches drawn anew each step (e.g.
            ``Dataset.validation_stream(256)``: batches from the training set, different
            from the training batch). Optional when every step gets ``val_inputs``.
        output: output space of D: ``"probs"`` (default, the paper's), ``"logits"`` or
            ``"log_probs"``.
        distance: ``"rms"``: sqrt(1/N Σ_i |Δf_i|²) (Eq. 7, default) or ``"mean_norm"``:
            1/N Σ_i |Δf_i| (the authors' public code).
        redraw_validation: draw a new validation batch from ``validation`` for every
            correction after the first (the first uses ``val_inputs`` when given). Default:
            one batch per step (the paper's cheaper variant).
        batch_stats: evaluate D with BatchNorm batch statistics (never updating the running
            statistics). Default: eval semantics (running statistics, dropout off). Either
            way the correction passes never change the model's buffers or train/eval flags;
            only the user's training forward updates running statistics.

    ``step(closure=None, val_inputs=None)``: ``val_inputs`` is an explicit validation batch
    (a tensor ``(N, ...)`` or ``(inputs, targets)``); otherwise ``next(validation)``.
    Neither → ``ValueError`` saying what to pass. If every group has ``lam == 0`` no
    validation batch is drawn and no pass is made (the step is SGD, plus the −ηJ
    corrections when n >= 2).

    After a step: ``.grad`` holds the user's gradient, untouched (weight decay is not
    added to it, corrections are not written to it); ``state[p]["momentum_buffer"]`` holds
    v = −Δθₙ (when momentum ≠ 0); ``last_step_passes`` the forward + backward passes used,
    counting the user's two: 3 + 2n with one validation batch, 2 + 3n with
    ``redraw_validation``, 2 if λ = 0; ``last_distances`` D before each correction.

    Errors: a validation batch that does not fit the model raises ``ValueError`` before
    anything changes; a non-finite distance or update raises ``FloatingPointError`` naming
    the step, with parameters and momentum buffers as before the step (HCGD changes
    nothing until the update is known to be finite).

    ``state_dict()`` holds the momentum buffers, the per-group hyperparameters and an
    ``"fsgeom"`` entry (step count; the validation stream's position when the stream has
    ``state_dict``, as :class:`fsgeom.data.ValidationStream` does), so that
    ``load_state_dict`` resumes bit for bit.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lam: float = 0.5,
        inner_lr: float = 0.02,
        n_corrections: int = 1,
        *,
        model: nn.Module,
        validation: Iterable | None = None,
        output: str = "probs",
        distance: str = "rms",
        redraw_validation: bool = False,
        batch_stats: bool = False,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "lam": lam,
            "inner_lr": inner_lr,
        }
        self._check(defaults, "")
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check(group, f"param_groups[{i}]")
        self.n_corrections = check_count("n_corrections", n_corrections)
        self._name = NameMap(model, self.param_groups, "HCGD")
        self.model = model
        self.corrector = HilbertCorrector(
            model, "HCGD", validation, output, distance, redraw_validation, batch_stats
        )
        self._steps = 0
        self.last_step_passes: int = 0
        self.last_distances: Tensor = torch.empty(0)

    @staticmethod
    def _check(group: dict, where: str) -> None:
        prefix = f"{where}: " if where else ""
        for k in ("lr", "weight_decay", "lam", "inner_lr"):
            check_hyper(f"{prefix}{k}", group[k])
        check_hyper(f"{prefix}momentum", group["momentum"], 0.0, 1.0)

    validation = SourceAttribute("corrector.source")  # the stream of batches (settable)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, val_inputs=None):
        """One HCGD step. Returns the closure's loss (or ``None``). See the class doc."""
        loss = run_closure(closure)
        step_no = self._steps + 1

        # --- gather, and propose Δθ₀ = −(βv + εJ) per group (new tensors: nothing changes yet)
        ps, names, J, delta, lam, eta, slices = [], [], [], [], [], [], []
        for i, group in enumerate(self.param_groups):
            self._check(group, f"param_groups[{i}]")
            gp = [p for p in group["params"] if p.grad is not None]
            if not gp:
                continue
            if any(p.grad.is_sparse for p in gp):
                raise RuntimeError("HCGD does not support sparse gradients")
            grads = [p.grad for p in gp]
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            gj = torch._foreach_add(grads, gp, alpha=wd) if wd != 0 else grads
            bufs = [self.state[p].get("momentum_buffer") for p in gp] if beta != 0 else []
            if bufs and all(b is not None for b in bufs):
                d = torch._foreach_mul(bufs, -beta)
                torch._foreach_add_(d, gj, alpha=-lr)
            else:  # no momentum, or the first step (v = 0)
                d = torch._foreach_mul(gj, -lr)
                for k, b in enumerate(bufs):
                    if b is not None:  # a parameter that had a buffer in a mixed group
                        d[k] = d[k] - beta * b
            slices.append((group, len(ps), len(ps) + len(gp)))
            ps += gp
            names += [self._name(p, self.param_groups) for p in gp]
            J += gj
            delta += d
            lam += [group["lam"]] * len(gp)
            eta += [group["inner_lr"]] * len(gp)

        passes, distances = 2, []
        if ps:
            n = self.n_corrections
            c = self.corrector
            active = any(lam)
            with c.view.measuring():  # one eval/restore of the model's modes per step
                reference = c.first_reference(names, ps, val_inputs) if active else None
                distances, used = c.correct(
                    names, ps, delta, J, lam, eta, n, reference, c.redraw(names, ps)
                )
            passes += used + (1 if active else 0)
            if first_nonfinite(distances) is not None or not all_finite(delta):
                raise_nonfinite("HCGD", step_no, distances, J, " (momentum buffers unchanged)")
            # --- commit: θ ← θ + Δθₙ, v ← −Δθₙ
            torch._foreach_add_(ps, delta)
            for group, a, b in slices:
                if group["momentum"] != 0:
                    torch._foreach_neg_(delta[a:b])
                    for p, v in zip(ps[a:b], delta[a:b]):
                        self.state[p]["momentum_buffer"] = v
        self._steps = step_no
        self.last_step_passes = passes
        self.last_distances = torch.stack(distances) if distances else torch.empty(0)
        return loss

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's optimizer ``state_dict`` plus ``"fsgeom"``: step count, stream position."""
        sd = super().state_dict()
        sd["fsgeom"] = {"steps": self._steps, "stream": self.corrector.source.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        extra = sd.pop("fsgeom", None)
        super().load_state_dict(sd)
        if extra is not None:
            self._steps = int(extra["steps"])
            self.corrector.source.load_state_dict(extra["stream"])
