"""Tracking: record how any optimizer moves a network, in parameter and function space.

A :class:`Tracker` watches a model through a fixed *probe* batch and records, at each
recorded step t (with θ_prev the previous recorded state and f_θ(x) the output in the
chosen output space, eval semantics, see :class:`fsgeom.FunctionView`)::

    param_step_sq        ‖θ_t − θ_prev‖²                                  (per update)
    param_step_sq_tensor the same sum restricted to each parameter tensor  (dim ``tensor``)
    function_step_sq     1/N Σ_i |f_{θ_t}(x_i) − f_{θ_prev}(x_i)|²         (probe x_1..x_N)
    csdt_param           Σ_{s ≤ t} param_step_sq_s      (cumulative squared distance traveled)
    csdt_function        Σ_{s ≤ t} function_step_sq_s
    param_dist_init      ‖θ_t − θ_0‖                                       (from the start)
    function_dist_init   ( 1/N Σ_i |f_{θ_t}(x_i) − f_{θ_0}(x_i)|² )^{1/2}
    passes               forward+backward passes since θ_prev, when the optimizer reports
                         ``last_step_passes`` (fsgeom optimizers do)

and at each :meth:`Tracker.end_epoch`, on dimension ``epoch_end``, the distances between
consecutive end-of-epoch states (``param_dist_epoch``, ``function_dist_epoch``) and from the
start (``param_dist_init_epoch``, ``function_dist_init_epoch``): the paper's three scales
(per update, per epoch, from initialization; Section 4 and Figure 5).

Cost: one forward pass of the probe per recorded step (the outputs after a step are kept as
the outputs before the next) and one flat copy of θ. With ``every=k`` only every k-th step
is recorded, and the step quantities are distances between consecutive *recorded* states,
so ``csdt_*`` then sums squared k-step displacements, which differ from the sum over single
steps (larger, up to k times, when steps align; smaller when they oscillate).

Datasets are :class:`xarray.Dataset` objects; :func:`save_run` / :func:`open_run` write and
read them as netCDF (h5netcdf) exactly, and :func:`combine` stacks runs along new
dimensions such as ``optimizer`` or ``seed``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from .data import batches
from .distance import output_distance
from .functional import apply_output, check_output, flatten, function_view

__all__ = ["STEP_VARIABLES", "EPOCH_VARIABLES", "Tracker", "combine", "open_run", "save_run"]

_OUTPUT_UNITS = {"probs": "probability", "logits": "logit", "log_probs": "nat"}

# name -> (long_name, units kind); units kind: "param", "param2", "out", "out2", "1"
STEP_VARIABLES: dict[str, tuple[str, str]] = {
    "param_step_sq": ("squared parameter step ||theta_t - theta_prev||^2", "param2"),
    "function_step_sq": (
        "mean squared function step over the probe, 1/N sum_i |f_t(x_i) - f_prev(x_i)|^2",
        "out2",
    ),
    "csdt_param": ("cumulative squared distance traveled in parameter space", "param2"),
    "csdt_function": ("cumulative squared distance traveled in L2 function space", "out2"),
    "param_dist_init": ("parameter distance from the start ||theta_t - theta_0||", "param"),
    "function_dist_init": (
        "L2 function distance from the start over the probe (root mean square)",
        "out",
    ),
    "param_step_sq_tensor": ("squared parameter step of each parameter tensor", "param2"),
    "passes": ("forward+backward passes since the previous recorded step", "1"),
}
EPOCH_VARIABLES: dict[str, tuple[str, str]] = {
    "param_dist_epoch": (
        "parameter distance between consecutive end-of-epoch states",
        "param",
    ),
    "function_dist_epoch": (
        "L2 function distance between consecutive end-of-epoch states over the probe",
        "out",
    ),
    "param_dist_init_epoch": (
        "parameter distance of the end-of-epoch state from the start",
        "param",
    ),
    "function_dist_init_epoch": (
        "L2 function distance of the end-of-epoch state from the start over the probe",
        "out",
    ),
}
_COORDS = ("step", "epoch", "tensor", "epoch_end", "epoch_end_step")
_RESERVED = frozenset(STEP_VARIABLES) | frozenset(EPOCH_VARIABLES) | frozenset(_COORDS)
# layout of one recorded row: squared function step and squared distances from the start,
# then ||d||^2 of each parameter tensor (or of all of them with per_tensor=False); totals,
# running sums and square roots are taken in float64 when the dataset is built
_ROW = ("function_step_sq", "param_dist_init_sq", "function_dist_init_sq")


def _units(kind: str, output: str) -> str:
    out = _OUTPUT_UNITS[output]
    return {"param": "parameter", "param2": "parameter^2", "out": out, "out2": f"{out}^2"}.get(
        kind, "1"
    )


def _jsonable(value: Any) -> Any:
    """A JSON-serializable rendering of an optimizer hyperparameter."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _scalar(name: str, value: Any) -> Tensor | float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, (numbers.Real, np.number)) and not isinstance(value, complex):
        return float(value)
    raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(value)}")


def _check_names(scalars: Mapping[str, Any], taken: Iterable[str], where: str) -> None:
    taken = set(taken)
    for k in scalars:
        if not k.isidentifier():
            raise ValueError(f"{where}: scalar name {k!r} must be a Python identifier")
        if k in _RESERVED:
            raise ValueError(f"{where}: {k!r} is a name the tracker itself records; rename it")
        if k in taken:
            raise ValueError(
                f"{where}: {k!r} is already used by "
                f"{'end_epoch' if where == 'log' else 'log'}; use distinct names"
            )


class Tracker:
    """Record the motion of a model in parameter and function space, step by step.

    Args:
        model: the network; tracking never changes its parameters, buffers (BatchNorm
            running statistics), train/eval mode, ``.grad`` or the global RNG.
        probe: the fixed inputs on which the function is measured: a tensor ``(N, ...)``,
            a tuple ``(inputs, targets)`` or an iterable of such batches (concatenated into
            one batch, so each measurement is one forward pass).
        output: output space of f: ``"probs"`` (default, as the paper), ``"logits"`` or
            ``"log_probs"``.
        every: record every ``every``-th step (and the start); distances are then between
            consecutive recorded states.
        seed: stored in the dataset's attributes (the tracker itself draws no random numbers).
        per_tensor: also record ``param_step_sq_tensor`` (one value per parameter tensor).
        save_path: write the dataset there (netCDF, see :func:`save_run`) at each
            :meth:`end_epoch` and at :meth:`detach`; each write replaces the file atomically.
        save_every: also write it once ``save_every`` steps have completed since the last
            write (at the start of the next step, so the scalars logged after a step are
            in): a crashed run loses at most ``save_every`` completed steps.
        attrs: extra global attributes for the dataset (e.g. the run's configuration).

    Usage::

        tracker = Tracker(model, probe_x).attach(optimizer)   # any torch.optim optimizer
        for epoch in range(E):
            for x, y in loader:
                optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward()
                optimizer.step()                  # recorded by the optimizer's step hook
                tracker.log(loss=loss.item())     # attached to the step just taken
            tracker.end_epoch(test_acc=...)
        ds = tracker.dataset

    Without an optimizer object, call :meth:`record` after each update instead of attaching.

    Steps: step 0 is the state when tracking starts (at construction, refreshed by
    :meth:`attach` while no step has been taken); step t is the state after the t-th
    update. At step 0 the step quantities are NaN and the running sums 0.

    Cost: one probe forward and one flat copy of θ per recorded step; the outputs measured
    after a step serve as the "before" of the next. The function is measured in eval
    semantics with the BatchNorm running statistics of that moment, so for a BatchNorm
    model ``function_step_sq`` also contains the change of the running statistics made by
    the training forward passes between two records. Quantities are accumulated on the
    model's device and copied to the host only when :attr:`dataset` is built.
    """

    def __init__(
        self,
        model: nn.Module,
        probe,
        output: str = "probs",
        every: int = 1,
        *,
        seed: int | None = None,
        per_tensor: bool = True,
        save_path: str | os.PathLike | None = None,
        save_every: int | None = None,
        attrs: Mapping[str, Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output = check_output(output)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = int(every)
        if save_every is not None:
            if isinstance(save_every, bool) or not isinstance(save_every, numbers.Integral):
                raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
            if save_every < 1:
                raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
            if save_path is None:
                raise ValueError("save_every needs save_path: the file to write the run to")
        self.save_path = None if save_path is None else Path(save_path)
        self.save_every = None if save_every is None else int(save_every)
        self.seed = seed
        self.per_tensor = bool(per_tensor)
        self.extra_attrs = dict(attrs or {})

        xs = [x for x, _ in batches(probe, name="probe")]
        self._probe = xs[0] if len(xs) == 1 else torch.cat(xs)
        self._view = function_view(model, self.output)
        # θ: the trainable parameters when tracking starts, in named_parameters() order (the
        # Parameter objects themselves, read under no_grad; also after model.to(...))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True) to track")
        self._params = params
        self._names = list(params)
        self._sizes = [p.numel() for p in params.values()]
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_attrs: dict[str, Any] = {}
        self._handles: list = []
        self._start()

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        """Measure the start (step 0) and reset everything recorded."""
        p = next(iter(self._params.values()))
        x = self._probe.to(p.device)
        if x.is_floating_point() and p.is_floating_point():
            x = x.to(p.dtype)
        self._probe = x
        self._step = 0
        self._epochs = 0  # completed epochs
        self._in_step = False
        self._calls: list = []  # frames of the step calls in progress
        self._pending: dict[str, Any] = {}
        self._pending_passes: int | None = 0
        self._since_save = 0
        self._save_due = False
        flat, out = self._measure_state()
        self._init = self._prev = self._epoch_state = (flat, out)
        self._row_dtype = torch.promote_types(flat.dtype, out.dtype)
        nan = torch.full((len(_ROW) + self._n_tensor_cols(),), math.nan, dtype=self._row_dtype)
        nan[1:3] = 0.0
        self._rows: list[Tensor] = [nan.to(flat.device)]
        self._row_steps = [0]
        self._row_epochs = [0]
        self._row_passes: list[float] = [math.nan]
        self._row_scalars: list[dict[str, Any]] = [{}]
        self._epoch_rows: list[Tensor] = []
        self._epoch_steps: list[int] = []
        self._epoch_scalars: list[dict[str, Any]] = []

    def _n_tensor_cols(self) -> int:
        return len(self._sizes) if self.per_tensor else 1

    @torch.no_grad()
    def _measure_state(self) -> tuple[Tensor, Tensor]:
        """One flat copy of θ and one probe forward (eval semantics, never changes model)."""
        flat = flatten(self._params)
        try:
            # the view at its current θ: calling the module itself under the view's measuring
            # semantics gives view(x) exactly, without functional_call's parameter swap
            with self._view.measuring():
                out = apply_output(self.model(self._probe), self.output)
        except RuntimeError as e:
            raise ValueError(
                f"probe: the model cannot evaluate the probe inputs of shape "
                f"{tuple(self._probe.shape)}: {e}"
            ) from e
        return flat, out.detach()

    @torch.no_grad()
    def _record_row(self) -> None:
        flat, out = self._measure_state()
        pflat, pout = self._prev
        iflat, iout = self._init
        d = flat - pflat
        d0 = flat - iflat
        sq = [
            output_distance(out, pout, squared=True).to(self._row_dtype),
            torch.dot(d0, d0).to(self._row_dtype),
            output_distance(out, iout, squared=True).to(self._row_dtype),
        ]
        parts = d.split(self._sizes) if self.per_tensor else (d,)
        sq.extend(torch.dot(s, s).to(self._row_dtype) for s in parts)
        self._rows.append(torch.stack(sq))  # one small tensor; no host sync
        self._row_steps.append(self._step)
        self._row_epochs.append(self._epochs + 1)
        passes = self._pending_passes
        self._row_passes.append(math.nan if passes is None else float(passes))
        self._pending_passes = 0
        self._row_scalars.append({})
        self._prev = (flat, out)

    def _after_step(self, passes: int | None) -> None:
        """Count one update; record it when due."""
        self._step += 1
        if passes is None or self._pending_passes is None:
            self._pending_passes = None
        else:
            self._pending_passes += int(passes)
        recorded = self._step % self.every == 0
        if recorded:
            self._record_row()
            if self._pending:
                self._row_scalars[-1].update(self._pending)
        self._pending = {}
        self._since_save += 1
        if self.save_every is not None and self._since_save >= self.save_every:
            self._save_due = True  # written when the next step starts, with its logs

    def _save_if_due(self) -> None:
        if self._save_due:
            self.save(self.save_path)

    # ------------------------------------------------------------------ hooks
    def attach(self, optimizer: torch.optim.Optimizer) -> Tracker:
        """Record every ``every``-th ``optimizer.step()`` through the optimizer's step hooks.

        Works with any ``torch.optim.Optimizer`` (SGD, Adam, LBFGS, fsgeom's HCGD, one's own
        subclass) without changing the training loop or the optimizer's behaviour. If no
        step has been taken yet, the start (step 0) is re-measured now. The optimizer's
        class and hyperparameters (from ``param_groups``) go into the dataset attributes.
        Returns the tracker.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (it provides step hooks), got "
                f"{type(optimizer).__name__}; for a hand-written loop call tracker.record()"
            )
        if self._optimizer is not None:
            raise RuntimeError("the tracker is already attached; call detach() first")
        mine = {id(p) for p in self.model.parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(id(p) in mine for p in held):
            raise ValueError("optimizer does not update any parameter of the tracked model")
        if self._step == 0:
            self._start()
        self._optimizer = optimizer
        groups = [
            {k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        cls = type(optimizer)
        self._optimizer_attrs = {
            "optimizer": cls.__name__,
            "optimizer_class": f"{cls.__module__}.{cls.__qualname__}",
            "optimizer_hyperparameters": groups[0] if len(groups) == 1 else groups,
        }
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        return self

    def detach(self) -> Tracker:
        """Remove the step hooks; what was recorded stays. Returns the tracker."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizer = None
        self._in_step = False
        self._calls = []
        if self.save_path is not None:
            self.save(self.save_path)
        return self

    # A subclass whose step() calls super().step() fires the hooks twice, nested; only the
    # outermost call counts. Each call is known by the frame of torch's step wrapper that
    # runs the hooks; an entry whose frame is no longer on the stack (a step that raised)
    # is discarded.
    def _live_calls(self, frame) -> list:
        if not self._calls:
            return []
        on_stack = set()
        while frame is not None:
            on_stack.add(id(frame))
            frame = frame.f_back
        return [f for f in self._calls if id(f) in on_stack]

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        caller = sys._getframe(1)
        self._calls = self._live_calls(caller)
        if not self._calls:
            self._pending = {}
            self._save_if_due()
        self._calls.append(caller)
        self._in_step = True

    def _post_hook(self, optimizer, args, kwargs) -> None:
        caller = sys._getframe(1)
        self._calls = [f for f in self._live_calls(caller) if f is not caller]
        if self._calls:
            return
        self._in_step = False
        self._after_step(getattr(optimizer, "last_step_passes", None))

    def record(self, passes: int | None = None) -> None:
        """Count one update made without an attached optimizer; measure it when due.

        Call it right after each update. ``passes``: the forward+backward passes the update
        used, if known.
        """
        if self._optimizer is not None:
            raise RuntimeError(
                "the tracker is attached to an optimizer whose steps are recorded by its "
                "hooks; call detach() before recording by hand"
            )
        self._save_if_due()
        self._after_step(passes)

    # ------------------------------------------------------------------ scalars
    def log(self, **scalars) -> None:
        """Attach scalars (e.g. ``loss=...``) to the step just taken.

        Called after ``optimizer.step()`` (or :meth:`record`) the values belong to that step;
        called inside the step (from an LBFGS-style closure) to the step in progress; before
        the first step to step 0. Values for steps that are not recorded (``every > 1``)
        are dropped. Numbers or one-element tensors; a name logged again overwrites.
        """
        _check_names(scalars, self._epoch_names(), "log")
        values = {k: _scalar(k, v) for k, v in scalars.items()}
        if self._in_step:
            self._pending.update(values)
        elif self._row_steps[-1] == self._step:
            self._row_scalars[-1].update(values)

    def end_epoch(self, **scalars) -> None:
        """Mark the end of an epoch, with per-epoch scalars (``test_acc=...``).

        Records the current state if the last step was not recorded, then stores on
        dimension ``epoch_end`` (values 1, 2, ...) the parameter and function distances
        from the previous end of epoch (the start for the first) and from the start.
        """
        _check_names(scalars, self._step_names(), "end_epoch")
        values = {k: _scalar(k, v) for k, v in scalars.items()}
        if self._in_step:
            raise RuntimeError("end_epoch() called inside optimizer.step()")
        if self._row_steps[-1] != self._step:
            self._record_row()
        with torch.no_grad():
            flat, out = self._prev
            eflat, eout = self._epoch_state
            iflat, iout = self._init
            row = torch.stack(
                [
                    (flat - eflat).square().sum().double().sqrt(),
                    output_distance(out, eout).double(),
                    (flat - iflat).square().sum().double().sqrt(),
                    output_distance(out, iout).double(),
                ]
            )
        self._epoch_rows.append(row)
        self._epoch_steps.append(self._step)
        self._epoch_scalars.append(values)
        self._epoch_state = self._prev
        self._epochs += 1
        if self.save_path is not None:
            self.save(self.save_path)

    def _step_names(self) -> set[str]:
        return {k for row in self._row_scalars for k in row} | set(self._pending)

    def _epoch_names(self) -> set[str]:
        return {k for row in self._epoch_scalars for k in row}

    # ------------------------------------------------------------------ output
    @property
    def step(self) -> int:
        """Number of updates counted so far."""
        return self._step

    @property
    def epoch(self) -> int:
        """Number of completed epochs (calls to :meth:`end_epoch`)."""
        return self._epochs

    def _attrs(self) -> dict[str, Any]:
        import fsgeom

        attrs: dict[str, Any] = {
            "title": "fsgeom tracker run",
            "model": type(self.model).__name__,
            "model_summary": repr(self.model),
            "num_params": int(sum(self._sizes)),
            "probe_size": int(self._probe.shape[0]),
            "probe_shape": list(self._probe.shape[1:]),
            "output": self.output,
            "function_semantics": "eval mode, running statistics at the moment of measurement",
            "every": self.every,
            "steps": self._step,
            "fsgeom_version": fsgeom.__version__,
            "torch_version": str(torch.__version__),
        }
        attrs.update(self._optimizer_attrs)
        if self.seed is not None:
            attrs["seed"] = self.seed
        attrs.update(self.extra_attrs)
        return attrs

    @property
    def dataset(self) -> xr.Dataset:
        """Everything recorded so far as an :class:`xarray.Dataset`.

        Dimension ``step`` (the recorded steps, 0 = the start) with coordinate ``epoch``
        (the epoch a step belongs to: 0 for the start, then 1, 2, …); the step variables of
        the module doc, ``param_step_sq_tensor`` on (``step``, ``tensor``), ``passes`` when
        reported, and the scalars given to :meth:`log` (NaN where not logged). After an
        :meth:`end_epoch`, dimension ``epoch_end`` (1..E) with coordinate
        ``epoch_end_step`` and the epoch variables plus the scalars given to
        :meth:`end_epoch`. Attributes: optimizer class and hyperparameters, model summary,
        parameter count, probe size and shape, output space, ``every``, seed, versions.
        Values are float64; each access builds a new dataset (one device→host copy).
        """
        table = torch.stack(self._rows).cpu().numpy()
        dims = ("step",)
        data: dict[str, Any] = {}
        table = table.astype(np.float64)
        per = table[:, len(_ROW) :]
        steps = np.stack([per.sum(axis=1), table[:, 0]], axis=1)
        data["param_step_sq"] = (dims, steps[:, 0].copy())
        data["function_step_sq"] = (dims, steps[:, 1].copy())
        steps[0] = 0.0  # step 0 is the start, where the running sums begin
        data["csdt_param"] = (dims, np.cumsum(steps[:, 0]))
        data["csdt_function"] = (dims, np.cumsum(steps[:, 1]))
        data["param_dist_init"] = (dims, np.sqrt(table[:, 1]))
        data["function_dist_init"] = (dims, np.sqrt(table[:, 2]))
        if self.per_tensor:
            data["param_step_sq_tensor"] = (("step", "tensor"), per)
        passes = np.array(self._row_passes, dtype=np.float64)
        if not np.isnan(passes[1:]).all():
            data["passes"] = (dims, passes)
        for name in sorted(self._step_names() - set(self._pending)):
            col = [_to_float(row.get(name, math.nan)) for row in self._row_scalars]
            data[name] = (dims, np.array(col, dtype=np.float64), {"long_name": name})
        coords: dict[str, Any] = {
            "step": ("step", np.array(self._row_steps, dtype=np.int64)),
            "epoch": ("step", np.array(self._row_epochs, dtype=np.int64), {
                "long_name": "epoch the step belongs to (0: the start)", "units": "1"}),
        }  # fmt: skip
        if self.per_tensor:
            coords["tensor"] = ("tensor", np.array(self._names, dtype=str), {
                "long_name": "parameter tensor (named_parameters order)"})  # fmt: skip
        if self._epoch_rows:
            etable = torch.stack(self._epoch_rows).cpu().numpy()
            for i, name in enumerate(EPOCH_VARIABLES):
                data[name] = (("epoch_end",), etable[:, i])
            for name in sorted(self._epoch_names()):
                col = [_to_float(row.get(name, math.nan)) for row in self._epoch_scalars]
                data[name] = (("epoch_end",), np.array(col, dtype=np.float64), {"long_name": name})
            n = len(self._epoch_rows)
            coords["epoch_end"] = ("epoch_end", np.arange(1, n + 1, dtype=np.int64), {
                "long_name": "epoch number (end of)", "units": "1"})  # fmt: skip
            coords["epoch_end_step"] = ("epoch_end", np.array(self._epoch_steps, np.int64), {
                "long_name": "step at the end of the epoch", "units": "1"})  # fmt: skip
        ds = xr.Dataset(data, coords=coords, attrs=self._attrs())
        ds["step"].attrs.update(long_name="optimizer updates since the start", units="1")
        for name, (long_name, kind) in {**STEP_VARIABLES, **EPOCH_VARIABLES}.items():
            if name in ds:
                ds[name].attrs.update(long_name=long_name, units=_units(kind, self.output))
        return ds

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write :attr:`dataset` to ``path`` (default: ``save_path``) as netCDF via h5netcdf,
        atomically (see :func:`save_run`). Returns the path."""
        if path is None:
            if self.save_path is None:
                raise ValueError("path: give a file to write to (the tracker has no save_path)")
            path = self.save_path
        self._since_save = 0
        self._save_due = False
        return save_run(self.dataset, path)

    def __repr__(self) -> str:
        return (
            f"Tracker({type(self.model).__name__}, probe={tuple(self._probe.shape)}, "
            f"output={self.output!r}, every={self.every}, step={self._step}, "
            f"epochs={self._epochs}, attached={self._optimizer is not None})"
        )


def _to_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


# ---------------------------------------------------------------------------------------
# Files

_JSON_KEY = "fsgeom_json_attrs"


def _encode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF stores str, int and float attributes; everything else is JSON-encoded."""
    out: dict[str, Any] = {}
    encoded = []
    for k, v in attrs.items():
        if isinstance(v, str):
            out[k] = str(v)  # plain str (h5py cannot store str subclasses)
        elif isinstance(v, (numbers.Integral, numbers.Real, np.number)) and not isinstance(v, bool):
            out[k] = v
        else:
            try:
                out[k] = json.dumps(_jsonable(v) if not isinstance(v, (list, dict)) else v)
            except TypeError:
                out[k] = json.dumps(_jsonable(v))
            encoded.append(k)
    if encoded:
        out[_JSON_KEY] = json.dumps(encoded)
    return out


def _decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    attrs = dict(attrs)
    encoded = json.loads(attrs.pop(_JSON_KEY, "[]"))
    out = {}
    for k, v in attrs.items():
        if k in encoded:
            out[k] = json.loads(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def save_run(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a run's dataset to a netCDF file (h5netcdf engine), atomically.

    Attributes netCDF cannot hold (dicts, lists, booleans, None) are stored as JSON text
    and listed in the attribute ``fsgeom_json_attrs``; :func:`open_run` decodes them, so
    ``open_run(save_run(ds, p))`` is identical to ``ds``. The file is written next to
    ``path`` and renamed over it, so a crash never leaves a half-written file.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = ds.copy(deep=False)
    out.attrs = _encode_attrs(ds.attrs)
    for name in out.variables:
        out[name].attrs = _encode_attrs(ds[name].attrs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        out.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def open_run(path: str | os.PathLike) -> xr.Dataset:
    """Read a dataset written by :func:`save_run` / :meth:`Tracker.save` into memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no run file at {str(path)!r}")
    with xr.open_dataset(path, engine="h5netcdf") as f:
        ds = f.load()
    ds.attrs = _decode_attrs(ds.attrs)
    for name in ds.variables:
        ds[name].attrs = _decode_attrs(ds[name].attrs)
        ds[name].encoding = {}
    return ds


# ---------------------------------------------------------------------------------------
# Combining runs


def combine(
    datasets: Sequence[xr.Dataset] | Mapping[Any, xr.Dataset],
    dim: str | Sequence[str] = "run",
) -> xr.Dataset:
    """Stack runs along new dimensions, aligned on ``step`` (outer join, NaN-padded).

    Args:
        datasets: a sequence of run datasets, or a mapping ``label -> dataset`` (labels are
            tuples when ``dim`` names several dimensions).
        dim: the new dimension(s), e.g. ``"seed"`` or ``("optimizer", "seed")``. For a
            sequence, each run's label is read from its attribute of that name (for example
            ``seed`` or ``optimizer``); a single ``dim`` that no run has as an attribute is
            numbered 0, 1, ...

    Returns:
        One dataset with dims ``(*dim, step, ...)``. Several dims form a full grid: missing
        combinations are NaN. Global attributes equal across runs are kept; those that differ
        become coordinates along the new dimension(s): numbers and strings as they are,
        other values (e.g. ``optimizer_hyperparameters``) as JSON text. Coordinates along ``step``
        that differ between runs (``epoch``) get the new dimension(s) too.
    """
    dims = (dim,) if isinstance(dim, str) else tuple(dim)
    if not dims or not all(isinstance(d, str) for d in dims):
        raise ValueError(f"dim must be a dimension name or a sequence of names, got {dim!r}")
    if isinstance(datasets, Mapping):
        labels = [k if isinstance(k, tuple) else (k,) for k in datasets]
        runs = list(datasets.values())
        if any(len(lab) != len(dims) for lab in labels):
            raise ValueError(f"datasets: each key must give one label per dim {dims}")
    else:
        runs = list(datasets)
        if not runs:
            raise ValueError("datasets is empty")
        if len(dims) == 1 and not any(dims[0] in r.attrs for r in runs):
            labels = [(i,) for i in range(len(runs))]
        else:
            labels = []
            for i, r in enumerate(runs):
                missing = [d for d in dims if d not in r.attrs]
                if missing:
                    raise ValueError(
                        f"datasets[{i}] has no attribute {missing[0]!r} to label it along "
                        f"{missing[0]!r}; pass a mapping label -> dataset instead"
                    )
                labels.append(tuple(r.attrs[d] for d in dims))
    if not runs:
        raise ValueError("datasets is empty")
    for i, r in enumerate(runs):
        if not isinstance(r, xr.Dataset):
            raise TypeError(f"datasets[{i}] must be an xarray.Dataset, got {type(r).__name__}")
        clash = [d for d in dims if d in r.dims or d in r.variables]
        if clash:
            raise ValueError(f"datasets[{i}] already has a dimension or variable {clash[0]!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"datasets: duplicate labels along {dims}: {labels}")

    # attributes that differ between runs and are plain scalars become coordinates
    # (JSON text for the others, e.g. optimizer_hyperparameters; "" where a run lacks it)
    keys = {k for r in runs for k in r.attrs if k not in dims}
    varying = {}
    for k in sorted(keys):
        vals = [r.attrs.get(k) for r in runs]
        if any(v != vals[0] for v in vals[1:]):
            if all(isinstance(v, (str, numbers.Real)) and not isinstance(v, bool) for v in vals):
                varying[k] = vals
            else:
                varying[k] = ["" if v is None else json.dumps(_jsonable(v)) for v in vals]
    run_dim = "__run__" if len(dims) > 1 else dims[0]
    out = xr.concat(
        runs,
        dim=run_dim,
        join="outer",
        coords="different",
        compat="equals",
        combine_attrs="drop_conflicts",
        data_vars="all",
    )
    out = out.assign_coords({d: (run_dim, [lab[j] for lab in labels]) for j, d in enumerate(dims)})
    for k, vals in varying.items():
        if k not in out.variables:
            out = out.assign_coords({k: (run_dim, vals)})
        out.attrs.pop(k, None)
    if len(dims) > 1:
        out = out.set_index({run_dim: list(dims)}).unstack(run_dim)
        out = out.transpose(*dims, ...)
    return out
