"""Plumbing shared by the fsgeom optimizers: validation batches, parameter names, checks.

Nothing here is an algorithm; the update rules live in :mod:`.hilbert`, :mod:`.hcgd` and
:mod:`.natural`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..data import batches

__all__: list[str] = []


def inputs_of(batch, name: str) -> Tensor:
    """The input tensor of one batch: a tensor, or a tuple/list whose first element is one."""
    if isinstance(batch, list):
        batch = tuple(batch)
    if not (isinstance(batch, Tensor) or (isinstance(batch, tuple) and batch)):
        raise TypeError(
            f"{name} must be a tensor of inputs (N, ...) or a tuple (inputs, targets), "
            f"got {type(batch).__name__}"
        )
    x, _ = next(batches(batch, name=name))
    return x


def run_closure(closure):
    """The ``torch.optim`` closure protocol: re-evaluate the loss with autograd on
    (optimizer steps run under ``no_grad``); ``None`` when there is no closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SourceAttribute:
    """An optimizer's ``validation`` attribute: the iterable behind one of its
    :class:`BatchSource` objects (reached by the dotted ``path``), settable."""

    def __init__(self, path: str):
        self.path = path.split(".")

    def _batch_source(self, obj) -> BatchSource:
        for part in self.path:
            obj = getattr(obj, part)
        return obj

    def __get__(self, obj, owner=None):
        return self if obj is None else self._batch_source(obj).source

    def __set__(self, obj, value) -> None:
        self._batch_source(obj).set(value)


class BatchSource:
    """Where an optimizer's extra batches (validation / Fisher batches) come from.

    ``source`` is ``None`` or an iterable of batches. An iterator (e.g.
    :class:`fsgeom.data.ValidationStream`) is advanced with ``next``; a re-iterable
    (a list, a :class:`fsgeom.data.TensorLoader`) is walked through and restarted when
    exhausted. Its position is saved in the optimizer's ``state_dict`` when the source has
    ``state_dict()`` / ``load_state_dict()`` (``ValidationStream`` has).
    """

    def __init__(self, source: Iterable | None, name: str, missing: str):
        if source is not None and not isinstance(source, Iterable):
            raise TypeError(
                f"{name} must be an iterable of input batches (e.g. fsgeom.data.ValidationStream"
                f" or Dataset.validation_stream(256)), got {type(source).__name__}"
            )
        self.source = source
        self.name = name
        self.missing = missing
        self._it = None

    def set(self, source: Iterable | None) -> None:
        self.__init__(source, self.name, self.missing)

    def draw_raw(self):
        """The next raw batch from the source (inputs and possibly targets)."""
        if self.source is None:
            raise ValueError(self.missing)
        if self._it is None:
            self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            if self._it is self.source:
                raise ValueError(
                    f"{self.name} is exhausted: pass an endless stream such as "
                    "fsgeom.data.ValidationStream, or a re-iterable loader"
                ) from None
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError(f"{self.name} is empty: it yielded no batch") from None

    def draw(self) -> Tensor:
        return inputs_of(self.draw_raw(), f"{self.name} batch")

    def state_dict(self) -> dict | None:
        if hasattr(self.source, "state_dict") and hasattr(self.source, "load_state_dict"):
            return self.source.state_dict()
        return None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state)
            self._it = None


def parameter_names(model: nn.Module, groups: Sequence[dict], owner: str) -> dict[int, str]:
    """Map ``id(p)`` of every optimized parameter to its name in ``model``.

    Raises ``ValueError`` naming the group and index of a parameter the model does not own.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{owner} needs model=... (the torch.nn.Module whose parameters it optimizes); "
            f"got {type(model).__name__}"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"{owner}: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) is "
                    "not a parameter of model; pass the model that owns the optimized parameters"
                )
    return names


class NameMap:
    """``id(p) -> name in model`` for the optimized parameters, refreshed when groups grow."""

    def __init__(self, model: nn.Module, groups: Sequence[dict], owner: str):
        self.model, self.owner = model, owner
        self.names = parameter_names(model, groups, owner)

    def __call__(self, p: Tensor, groups: Sequence[dict]) -> str:
        name = self.names.get(id(p))
        if name is None:  # a param group was added after construction
            self.names = parameter_names(self.model, groups, self.owner)
            name = self.names[id(p)]
        return name


def check_hyper(name: str, value, low: float = 0.0, high: float | None = None) -> float:
    """A float hyperparameter in [low, high) (``high`` excluded), else ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not v >= low or (high is not None and not v < high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def check_count(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def first_nonfinite(values: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or inf, or ``None``."""
    for i, v in enumerate(values):
        if not torch.isfinite(v).all():
            return i
    return None


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True iff every element of every tensor is finite.

    Fast path: one fused 2-norm per tensor (a NaN or inf makes it non-finite); only when
    that overflows or flags a tensor is each tensor checked element by element.
    """
    if not tensors:
        return True
    norms = torch._foreach_norm(list(tensors))
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return True
    return first_nonfinite(tensors) is None


def raise_nonfinite(
    owner: str, step: int, distances: Sequence[Tensor], grads: Sequence[Tensor], after: str
) -> None:
    """Raise ``FloatingPointError`` for a step whose update is not finite, saying why."""
    bad = first_nonfinite(distances)
    if bad is not None:
        why = (
            f"the function-space distance at correction {bad + 1} of {len(distances)} is "
            f"{float(distances[bad])}"
        )
    elif not all_finite(grads):
        why = "the gradient in .grad is not finite"
    else:
        why = "a correction gradient is not finite (learning rates too large?)"
    raise FloatingPointError(
        f"{owner} step {step}: the update is not finite: {why}; parameters are left as "
        f"before this step{after}"
    )
