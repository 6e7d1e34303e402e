"""A torch.optim optimizer that lets another optimizer propose each step, then corrects it.

:class:`ProposalWrapper` shares its ``param_groups`` and ``state`` with the base optimizer
(the same dict objects), so learning-rate schedulers, ``zero_grad`` and per-group
hyperparameters act on both at once. Subclasses implement ``step``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ._common import BatchSource, NameMap, check_count, check_hyper

__all__: list[str] = []


class ProposalWrapper(Optimizer):
    """Base for optimizers of the form "Δθ₀ = base_optimizer's step, then n corrections"."""

    _extra_keys: tuple[str, ...] = ()

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        defaults: dict[str, Any],
        n_corrections: int,
        source: BatchSource,
    ):
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, ProposalWrapper):
            raise TypeError("base_optimizer is already a corrected fsgeom optimizer")
        self.base = base_optimizer
        # The same group dicts as the base: add_param_group only setdefault()s our keys.
        super().__init__(base_optimizer.param_groups, defaults)
        self.param_groups = base_optimizer.param_groups  # the same list, not just its dicts
        self.state = base_optimizer.state
        self._name = NameMap(model, self.param_groups, type(self).__name__)
        self.model = model
        self.n_corrections = check_count("n_corrections", n_corrections)
        self._source = source
        self._steps = 0
        self.last_step_passes: int = 0
        self._ready = True

    def _gather(self, keys: tuple[str, ...]):
        """Parameters that have a gradient, their names, gradients and per-tensor hypers."""
        ps, names, grads = [], [], []
        hyper: dict[str, list[float]] = {k: [] for k in keys}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                ps.append(p)
                names.append(self._name(p, self.param_groups))
                grads.append(p.grad)
                for k in keys:
                    hyper[k].append(group[k])
        return ps, names, grads, hyper

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (with its defaults) and to this wrapper's."""
        if not self.__dict__.get("_ready"):  # in Optimizer.__init__: the base's own groups
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)
        for k, v in self.defaults.items():
            self.base.param_groups[-1].setdefault(k, v)
        self.param_groups = self.base.param_groups

    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            for k in self._extra_keys:
                check_hyper(f"param_groups[{i}][{k!r}]", group[k])

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` plus an ``"fsgeom"`` entry (step count and the
        position of the batch stream when it has ``state_dict``)."""
        sd = self.base.state_dict()
        sd["fsgeom"] = self._extra_state()
        return sd

    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._steps, "stream": self._source.state_dict()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._steps = int(extra["steps"])
        self._source.load_state_dict(extra["stream"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("fsgeom", None)
        self.base.load_state_dict(sd)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if extra is not None:
            self._load_extra_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r}, n_corrections={self.n_corrections})"

    @torch.no_grad()
    def _restore(self, ps, theta0) -> None:
        torch._foreach_copy_(ps, theta0)
