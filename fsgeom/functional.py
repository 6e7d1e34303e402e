"""Function views: an ``nn.Module`` as a pure function ``f(params, x)`` of a parameter dict.

Everything in fsgeom that measures or differentiates a network goes through a
:class:`FunctionView`. A view fixes three choices and makes them explicit:

* the **output space**: ``"logits"`` (the module's raw output), ``"probs"``
  (softmax over the last dimension, the default, as in the paper) or ``"log_probs"``;
* the **normalization semantics**: eval mode with the running statistics (default), or
  ``batch_stats=True``: BatchNorm normalizes with the statistics of the batch at hand
  *without* updating its running statistics;
* **θ**: the trainable parameters (``requires_grad=True``) in the order of
  ``model.named_parameters()``; frozen parameters and buffers are constants.

Calling a view never changes the model: train/eval flags of every submodule are restored,
running statistics and ``num_batches_tracked`` are untouched, dropout is off, and
``.grad`` is never written (views only use ``torch.func``).

Flat vectors use the layout of :func:`torch.nn.utils.parameters_to_vector`: trainable
tensors in ``named_parameters()`` order, each flattened row-major.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

OutputSpace = Literal["logits", "probs", "log_probs"]
OUTPUT_SPACES: tuple[str, ...] = ("logits", "probs", "log_probs")
Params = dict[str, Tensor]

__all__ = [
    "FunctionView",
    "OUTPUT_SPACES",
    "apply_output",
    "as_params",
    "check_output",
    "flatten",
    "function_view",
    "measuring",
    "num_params",
    "snapshot",
    "trainable_params",
    "unflatten",
]


def check_output(output: str) -> str:
    """Validate an output-space name and return it."""
    if output not in OUTPUT_SPACES:
        raise ValueError(f"output must be one of {OUTPUT_SPACES}, got {output!r}")
    return output


def apply_output(logits: Tensor, output: str) -> Tensor:
    """Map the module's raw output ``z`` to the output space (softmax over the last dim)."""
    if output == "logits":
        return logits
    if output == "probs":
        return torch.softmax(logits, dim=-1)
    if output == "log_probs":
        return torch.log_softmax(logits, dim=-1)
    raise ValueError(f"output must be one of {OUTPUT_SPACES}, got {output!r}")


def trainable_params(model: nn.Module) -> Params:
    """The trainable parameters of ``model`` as a dict ``name -> tensor`` (θ).

    The tensors are detached aliases of the live parameters: they share storage, so an
    in-place optimizer update is visible through them, but they carry no autograd history.
    """
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def num_params(params: Mapping[str, Tensor] | nn.Module) -> int:
    """Number of scalars in θ."""
    if isinstance(params, nn.Module):
        params = trainable_params(params)
    return sum(p.numel() for p in params.values())


def snapshot(source: nn.Module | Mapping[str, Tensor]) -> Params:
    """A detached copy of θ (a module's trainable parameters, or a parameter dict)."""
    params = trainable_params(source) if isinstance(source, nn.Module) else source
    return {n: p.detach().clone() for n, p in params.items()}


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict into one flat vector (row-major, dict order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat vector into a dict shaped like ``like`` (inverse of :func:`flatten`)."""
    expected = sum(p.numel() for p in like.values())
    if vector.dim() != 1 or vector.numel() != expected:
        raise ValueError(
            f"expected a flat vector of {expected} elements (the trainable parameters), "
            f"got shape {tuple(vector.shape)}"
        )
    out, i = {}, 0
    for n, p in like.items():
        out[n] = vector[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def as_params(
    value: Tensor | Mapping[str, Tensor], like: Mapping[str, Tensor], name: str
) -> Params:
    """Accept a flat vector or a parameter dict for ``like``'s θ; check keys and shapes."""
    if isinstance(value, Tensor):
        try:
            return unflatten(value, like)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a flat tensor or a dict of tensors, got {type(value)}")
    if list(value.keys()) != list(like.keys()):
        missing = [k for k in like if k not in value]
        extra = [k for k in value if k not in like]
        raise ValueError(
            f"{name} must have the keys of the trainable parameters in order "
            f"(missing {missing}, unexpected {extra})"
        )
    for k, p in like.items():
        if value[k].shape != p.shape:
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(value[k].shape)}, expected {tuple(p.shape)}"
            )
    return dict(value)


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def measuring(model: nn.Module, batch_stats: bool = False) -> Iterator[None]:
    """Put ``model`` in measurement semantics for the duration of the block, then restore.

    Eval mode everywhere (dropout off, BatchNorm on running statistics). With
    ``batch_stats=True`` BatchNorm layers normalize with the current batch's statistics
    but do not update their running statistics (``track_running_stats`` is switched off
    for the block). Nested use is cheap: an inner block with the same semantics is a no-op.
    """
    key = ("_fsgeom_measuring", batch_stats)
    previous = model.__dict__.get("_fsgeom_measuring")
    if previous == key:
        yield
        return
    # Flags are flipped through __dict__: nn.Module.train() and __setattr__ cost ~10 µs a
    # module, and this runs once per measurement on hot paths (trackers, optimizers).
    modules = list(model.modules())
    modes = [m.training for m in modules]
    tracked = []
    try:
        for m in modules:
            m.__dict__["training"] = False
        if batch_stats:
            for m in modules:
                if isinstance(m, _BN_TYPES):
                    tracked.append((m, m.track_running_stats))
                    m.track_running_stats = False
                    m.__dict__["training"] = True
        model.__dict__["_fsgeom_measuring"] = key
        yield
    finally:
        if previous is None:
            model.__dict__.pop("_fsgeom_measuring", None)
        else:
            model.__dict__["_fsgeom_measuring"] = previous
        for m, t in tracked:
            m.track_running_stats = t
        for m, training in zip(modules, modes):
            m.__dict__["training"] = training


class FunctionView:
    """A module seen as a pure function ``f(params, x)`` in an explicit output space.

    Args:
        model: the network; it is never modified by the view.
        output: ``"logits"``, ``"probs"`` (default) or ``"log_probs"``.
        batch_stats: normalize BatchNorm with batch statistics (without updating the
            running statistics) instead of the running statistics.

    Attributes:
        params: the current θ, detached aliases of the live trainable parameters.

    ``view(params, x)`` evaluates ``f_params(x)``; ``view(x)`` uses the current θ.
    Shapes: ``x`` is a batch ``(N, ...)``, the result ``(N, C)`` for classifiers.
    The call composes with ``torch.func.vmap``, ``jvp``, ``vjp`` and ``grad``.
    """

    def __init__(self, model: nn.Module, output: str = "probs", batch_stats: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output = check_output(output)
        self.batch_stats = bool(batch_stats)

    @property
    def params(self) -> Params:
        return trainable_params(self.model)

    def with_output(self, output: str) -> FunctionView:
        """The same view in another output space."""
        return FunctionView(self.model, output, self.batch_stats)

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The module's raw output at θ = ``params``."""
        with measuring(self.model, self.batch_stats):
            return functional_call(self.model, dict(params), (x,))

    def __call__(self, params: Mapping[str, Tensor] | Tensor, x: Tensor | None = None) -> Tensor:
        if x is None:
            params, x = self.params, params
        return apply_output(self.logits(params, x), self.output)

    def measuring(self):
        """Context manager: hold measurement semantics around many calls (saves overhead)."""
        return measuring(self.model, self.batch_stats)

    def __repr__(self) -> str:
        return (
            f"FunctionView({type(self.model).__name__}, output={self.output!r}, "
            f"batch_stats={self.batch_stats}, params={num_params(self.params)})"
        )


def function_view(
    model: nn.Module | FunctionView, output: str = "probs", batch_stats: bool = False
) -> FunctionView:
    """Return a :class:`FunctionView` of ``model`` (a view is passed through unchanged)."""
    if isinstance(model, FunctionView):
        return model
    return FunctionView(model, output=output, batch_stats=batch_stats)
