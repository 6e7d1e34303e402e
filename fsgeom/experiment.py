"""One training run as a config → an ``xarray.Dataset``; sweeps of runs over any executor.

A run (:func:`run`) trains a model from :mod:`fsgeom.models` on a dataset from
:mod:`fsgeom.data` with a named optimizer, optionally tracked by
:class:`fsgeom.tracking.Tracker`, and returns one dataset holding

* per epoch (dim ``epoch_end``, values 1..E): ``train_loss``, ``train_acc``, ``test_loss``,
  ``test_acc`` (full splits, eval mode, large batches, no autograd), ``lr`` and
  ``passes_total`` (cumulative forward+backward passes at the end of the epoch);
* per step (dim ``step``): ``loss`` (the training mini-batch loss), ``passes`` (passes that
  step used: 2 for a plain optimizer — one forward, one backward — else the optimizer's
  ``last_step_passes``, e.g. 2 + 3n for HCGD) and ``passes_total`` along steps
  (``passes_cum``);
* with tracking, every variable of the tracker's dataset (CSDT in parameter and function
  space, distances at three scales, …);
* attributes: the config as JSON (``config``), its hash (``config_hash``), the main fields.

Everything random is seeded from ``RunConfig.seed`` — model initialization, training
order, HCGD's validation stream, the probe, dropout — and the caller's global RNG is
restored afterwards, so a run is reproducible and has no side effect on the caller.

:func:`sweep` runs a list of configs through any ``concurrent.futures``-style executor
(local processes by default; ``dask.distributed``'s ``Client.get_executor()`` for a
cluster), shows a tqdm bar, saves each finished run to ``out_dir`` (so a restarted sweep
skips it), reports failed runs with their configs without losing the others, and returns
the runs combined along new dimensions (by default ``optimizer`` × ``seed``, where the
``optimizer`` coordinate holds each config's display name :attr:`RunConfig.variant`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from . import data as fdata
from . import models as fmodels

__all__ = [
    "OPTIMIZERS",
    "PLAIN_STEP_PASSES",
    "RunConfig",
    "RunFailure",
    "SweepError",
    "config_hash",
    "evaluate",
    "load_data",
    "make_optimizer",
    "open_result",
    "run",
    "save_result",
    "sweep",
    "torch_threads",
]

#: Passes used by one step of a plain optimizer: one forward and one backward pass.
PLAIN_STEP_PASSES = 2

_TORCH_OPTIMIZERS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}
_FSGEOM_OPTIMIZERS = {
    "hcgd": "HCGD",
    "hcadam": "HCAdam",
    "ngd": "NaturalGradientByGD",
    "natural_gradient": "NaturalGradient",
    "hilbert": "HilbertConstrained",
}
#: Optimizer names understood by :class:`RunConfig` → class name (torch.optim or fsgeom.optim).
OPTIMIZERS: dict[str, str] = {**_TORCH_OPTIMIZERS, **_FSGEOM_OPTIMIZERS}
_DATASETS = ("digits", "mnist", "cifar10")
_MODELS = ("mlp", "cnn_bn", "squeezenet")
# Fields that say where/how a run executes but not what it computes: not part of the hash.
_NON_IDENTITY = ("data_root", "label")


@dataclass
class RunConfig:
    """Everything that defines one training run (JSON-serializable, hashable by content).

    Attributes:
        dataset: ``"digits"`` (embedded), ``"mnist"`` or ``"cifar10"`` (see :func:`load_data`).
        model: ``"mlp"``, ``"cnn_bn"`` or ``"squeezenet"`` (:func:`fsgeom.models.build`).
        optimizer: a key of :data:`OPTIMIZERS` (``"sgd"``, ``"adam"``, ``"hcgd"``, …).
        hparams: keyword arguments of the optimizer (``lr``, ``momentum``, ``lam``,
            ``inner_lr``, ``n_corrections``, …). For ``"hilbert"``, ``base`` names the base
            optimizer and ``base_hparams`` its arguments.
        epochs: passes over the training set.
        batch_size: training mini-batch size.
        val_batch_size: batch size of the validation stream handed to fsgeom optimizers
            (drawn from the *training* set, independently of the training order).
        probe_size: size of the tracker's fixed probe batch (drawn from the training set).
        eval_batch_size: batch size of the end-of-epoch train/test evaluation.
        seed: seeds model initialization, data order, validation stream, probe, dropout.
        track: attach a :class:`fsgeom.tracking.Tracker`.
        track_every: record every ``track_every`` optimizer steps.
        output: output space measured by the tracker (``"probs"``, ``"logits"``, …).
        lr_milestones: epochs after which every learning rate (``lr`` and, when present,
            ``inner_lr``) is multiplied by ``lr_gamma`` (Fig. 4: ``(150,)``, 0.1).
        lr_gamma: the factor.
        train_size, test_size: use only the first N examples of a fixed (seed 0)
            permutation of each split — the same subset for every run (``None``: all).
        data_root: folder of the dataset files (``None``: the loader's default).
        label: a display name for the variant (``None``: derived from optimizer and hparams).
    """

    dataset: str = "digits"
    model: str = "mlp"
    optimizer: str = "sgd"
    hparams: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})
    epochs: int = 10
    batch_size: int = 64
    val_batch_size: int = 256
    probe_size: int = 256
    eval_batch_size: int = 2048
    seed: int = 0
    track: bool = True
    track_every: int = 1
    output: str = "probs"
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    train_size: int | None = None
    test_size: int | None = None
    data_root: str | None = None
    label: str | None = None

    def __post_init__(self):
        self.hparams = dict(self.hparams or {})
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        self.validate()

    def validate(self) -> RunConfig:
        """Check every field; raise ``ValueError`` naming the field and what was expected."""
        if self.dataset not in _DATASETS:
            raise ValueError(f"dataset must be one of {_DATASETS}, got {self.dataset!r}")
        if self.model not in _MODELS:
            raise ValueError(f"model must be one of {_MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("epochs", "batch_size", "val_batch_size", "probe_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.track_every, (int, np.integer)) or self.track_every < 1:
            raise ValueError(f"track_every must be a positive integer, got {self.track_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
        if not isinstance(self.hparams, dict):
            raise ValueError(f"hparams must be a dict, got {type(self.hparams).__name__}")
        if self.output not in ("logits", "probs", "log_probs"):
            raise ValueError(
                f"output must be 'logits', 'probs' or 'log_probs', got {self.output!r}"
            )
        return self

    # -- serialization ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serializable dict of the fields."""
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build from a dict; unknown keys raise ``ValueError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> RunConfig:
        """A copy with some fields changed (``hparams`` is merged, not replaced, if given
        as ``hparams_update``)."""
        update = changes.pop("hparams_update", None)
        new = dataclasses.replace(self, **changes)
        if update:
            new.hparams = {**new.hparams, **update}
        return new

    @property
    def variant(self) -> str:
        """The display name: ``label`` or ``optimizer`` + its hyperparameters."""
        if self.label:
            return self.label
        hp = ",".join(f"{k}={v}" for k, v in sorted(self.hparams.items()))
        return f"{self.optimizer}({hp})"

    @property
    def hash(self) -> str:
        return config_hash(self)


def config_hash(cfg: RunConfig) -> str:
    """A 16-hex-digit hash of the fields that determine the result (not ``data_root``,
    ``label``): two configs with the same hash compute the same run."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NON_IDENTITY}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Data, optimizer, evaluation


def _derived_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one random stream of a run."""
    h = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None) -> fdata.Dataset:
    return fdata.load(name, root=root)


def load_data(
    name: str,
    root: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
) -> fdata.Dataset:
    """Load a dataset (cached per process) and optionally keep fixed subsets of its splits.

    The subsets are the first ``train_size`` / ``test_size`` examples of a permutation
    drawn with seed 0, identical for every run, so runs differing only in seed see the same
    data. Datasets come from :func:`fsgeom.data.load`.
    """
    ds = _load_cached(name, None if root is None else str(root))

    def subset(x, y, n):
        if n is None or n >= len(x):
            return x, y
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        return x[idx], y[idx]

    if train_size is None and test_size is None:
        return ds
    trx, tr_y = subset(ds.train_x, ds.train_y, train_size)
    tex, te_y = subset(ds.test_x, ds.test_y, test_size)
    return fdata.Dataset(ds.name, trx, tr_y, tex, te_y, ds.num_classes, dict(ds.attrs))


def make_optimizer(
    cfg: RunConfig, model: nn.Module, validation: Iterable | None = None
) -> torch.optim.Optimizer:
    """Instantiate ``cfg.optimizer`` with ``cfg.hparams`` on ``model``'s parameters.

    fsgeom optimizers also receive ``model=`` and ``validation=`` (the validation stream)
    unless ``hparams`` sets them. ``"hilbert"`` wraps ``hparams["base"]`` (a torch
    optimizer name) built with ``hparams["base_hparams"]``.
    """
    name = cfg.optimizer
    hp = dict(cfg.hparams)
    params = [p for p in model.parameters() if p.requires_grad]
    if name in _TORCH_OPTIMIZERS:
        cls = getattr(torch.optim, _TORCH_OPTIMIZERS[name])
        try:
            return cls(params, **hp)
        except TypeError as e:
            raise ValueError(
                f"hparams {hp} are not valid for torch.optim.{cls.__name__}: {e}"
            ) from None
    from . import optim as foptim

    cls = getattr(foptim, _FSGEOM_OPTIMIZERS[name])
    hp.setdefault("model", model)
    if validation is not None:
        hp.setdefault("validation", validation)
    if name == "hilbert":
        base = hp.pop("base", "sgd")
        if base not in _TORCH_OPTIMIZERS:
            raise ValueError(f"hparams['base'] must be one of {sorted(_TORCH_OPTIMIZERS)}")
        base_opt = getattr(torch.optim, _TORCH_OPTIMIZERS[base])(
            params, **hp.pop("base_hparams", {})
        )
        return cls(base_opt, **hp)
    try:
        return cls(params, **hp)
    except TypeError as e:
        raise ValueError(
            f"hparams {cfg.hparams} are not valid for fsgeom.optim.{cls.__name__}: {e}"
        ) from None


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048):
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in eval mode.

    Returns ``(loss, acc)`` as floats. The model's train/eval flags are restored (via
    :func:`fsgeom.functional.measuring`); no gradient is computed.
    """
    from .functional import measuring

    total_loss, correct = 0.0, 0
    with measuring(model):
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(-1) == yb).sum())
    return total_loss / len(x), correct / len(x)


@contextmanager
def torch_threads(n: int | None):
    """Temporarily set ``torch.set_num_threads(n)`` (``None``: leave unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------
# One run


def _scale_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    groups = optimizer.param_groups
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None and base.param_groups is not groups:
        groups = list(groups) + list(base.param_groups)
    for g in groups:
        for key in ("lr", "inner_lr"):
            if key in g:
                g[key] = g[key] * factor
    if "inner_lr" in getattr(optimizer, "defaults", {}) and not any(
        "inner_lr" in g for g in groups
    ):
        optimizer.defaults["inner_lr"] *= factor


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0].get("lr", float("nan")))


_PROCESS_STATE_LOCK = threading.RLock()


def run(
    cfg: RunConfig | Mapping[str, Any],
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    """Train once as ``cfg`` says and return the run's dataset (see the module doc).

    Deterministic given ``cfg`` (and the torch build/thread count): all randomness comes
    from generators seeded by ``cfg.seed``; the caller's global RNG is saved and restored.
    ``progress`` shows a tqdm bar over epochs.
    """
    if isinstance(cfg, Mapping):
        cfg = RunConfig.from_dict(cfg)
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig or a dict, got {type(cfg).__name__}")
    cfg.validate()
    # torch's default generator (weight init, dropout) and thread count are process-wide:
    # runs in threads of one process take turns, so each stays deterministic. Processes
    # (sweep's default executor) run in parallel.
    with _PROCESS_STATE_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(cfg.seed, "global"))  # dropout etc.
        return _run(cfg, progress, torch.device(device))


def _run(cfg: RunConfig, progress: bool, device: torch.device) -> xr.Dataset:
    t_start = time.perf_counter()
    ds = load_data(cfg.dataset, cfg.data_root, cfg.train_size, cfg.test_size)
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)
    if cfg.model == "mlp":  # flatten once rather than at every step
        train_x, test_x = train_x.flatten(1), test_x.flatten(1)
    model = fmodels.build(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed).to(device)
    model.train()
    loader = fdata.TensorLoader(
        train_x, train_y, batch_size=cfg.batch_size, seed=_derived_seed(cfg.seed, "order")
    )
    validation = None
    if cfg.optimizer in _FSGEOM_OPTIMIZERS:
        validation = fdata.ValidationStream(
            train_x,
            batch_size=min(cfg.val_batch_size, len(train_x)),
            seed=_derived_seed(cfg.seed, "validation"),
        )
    optimizer = make_optimizer(cfg, model, validation)

    tracker = None
    if cfg.track:
        from .tracking import Tracker

        g = torch.Generator().manual_seed(_derived_seed(cfg.seed, "probe"))
        n_probe = min(cfg.probe_size, len(train_x))
        probe = train_x[torch.randperm(len(train_x), generator=g)[:n_probe]]
        tracker = Tracker(
            model, probe, output=cfg.output, every=cfg.track_every, seed=int(cfg.seed)
        )
        tracker.attach(optimizer)

    steps_per_epoch = len(loader)
    n_steps = cfg.epochs * steps_per_epoch
    step_passes = np.zeros(n_steps, dtype=np.int64)
    step_loss = np.zeros(n_steps, dtype=np.float64)
    metrics = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr")}
    epoch_passes = []
    epoch_seconds = []
    milestones = set(cfg.lr_milestones)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc=f"{cfg.variant} seed={cfg.seed}", unit="epoch")
    t = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            losses = []
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                step_passes[t] = int(getattr(optimizer, "last_step_passes", PLAIN_STEP_PASSES))
                losses.append(loss.detach())
                t += 1
            if losses:
                step_loss[t - len(losses) : t] = torch.stack(losses).double().cpu().numpy()
            if not np.isfinite(step_loss[t - len(losses) : t]).all():
                warnings.warn(
                    f"{cfg.variant} seed={cfg.seed}: non-finite training loss in epoch {epoch}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            tr_loss, tr_acc = evaluate(model, train_x, train_y, cfg.eval_batch_size)
            te_loss, te_acc = evaluate(model, test_x, test_y, cfg.eval_batch_size)
            lr = _current_lr(optimizer)
            for k, v in zip(metrics, (tr_loss, tr_acc, te_loss, te_acc, lr)):
                metrics[k].append(v)
            epoch_passes.append(int(step_passes[:t].sum()))
            epoch_seconds.append(time.perf_counter() - t_epoch)
            if tracker is not None:
                tracker.end_epoch(
                    train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc
                )
            if epoch in milestones:
                _scale_lrs(optimizer, cfg.lr_gamma)
            if bar is not None:
                bar.set_postfix(test_acc=f"{te_acc:.4f}", loss=f"{tr_loss:.3f}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.detach()

    out = _assemble(cfg, tracker, metrics, epoch_passes, epoch_seconds, step_passes, step_loss)
    out.attrs["wall_seconds"] = float(time.perf_counter() - t_start)
    out.attrs["steps_per_epoch"] = int(steps_per_epoch)
    out.attrs["num_params"] = int(sum(p.numel() for p in model.parameters()))
    return out


def _assemble(cfg, tracker, metrics, epoch_passes, epoch_seconds, step_passes, step_loss):
    n_epochs = len(epoch_passes)
    epochs = np.arange(1, n_epochs + 1)
    n = len(step_passes)
    steps_per_epoch = n // max(n_epochs, 1)
    long = {
        "train_loss": ("training cross-entropy (eval mode, full split)", "nats"),
        "train_acc": ("training accuracy (eval mode, full split)", "1"),
        "test_loss": ("test cross-entropy", "nats"),
        "test_acc": ("test accuracy", "1"),
        "lr": ("learning rate during the epoch", "1"),
    }
    epoch_vars = {
        k: xr.Variable(
            "epoch_end",
            np.asarray(v, dtype=np.float64),
            {"long_name": long[k][0], "units": long[k][1]},
        )
        for k, v in metrics.items()
    }
    epoch_vars["passes_total"] = xr.Variable(
        "epoch_end",
        np.asarray(epoch_passes, dtype=np.int64),
        {"long_name": "cumulative forward+backward passes at the end of the epoch", "units": "1"},
    )
    epoch_vars["epoch_seconds"] = xr.Variable(
        "epoch_end",
        np.asarray(epoch_seconds, dtype=np.float64),
        {"long_name": "wall time of the epoch (training + evaluation)", "units": "s"},
    )
    cum = np.r_[0, np.cumsum(step_passes)]  # cum[t]: passes after t updates
    losses = np.r_[np.nan, step_loss]
    if tracker is not None:
        ds = tracker.dataset.copy()
        steps = _tracker_steps(ds, n)
    else:
        steps = np.arange(0, n + 1)
        ds = xr.Dataset(
            coords={
                "step": ("step", steps, {"long_name": "optimizer updates since the start"}),
                "epoch": ("step", np.r_[0, (steps[1:] - 1) // max(steps_per_epoch, 1) + 1]),
                "epoch_end": ("epoch_end", epochs),
                "epoch_end_step": ("epoch_end", epochs * steps_per_epoch),
            }
        )
    for k, v in epoch_vars.items():
        ds[k] = v
    # passes at a recorded step = passes since the previous recorded step, so that the sum
    # over recorded steps is the total even when only every k-th step is recorded
    prev = np.r_[0, cum[steps[:-1]]]
    passes = (cum[steps] - prev).astype(np.float64)
    passes[steps == 0] = np.nan
    ds["passes"] = xr.Variable(
        "step",
        passes,
        {
            "long_name": "forward+backward passes of the step (since the previous recorded step)",
            "units": "1",
        },
    )
    ds["passes_cum"] = xr.Variable(
        "step", cum[steps], {"long_name": "cumulative passes after the step", "units": "1"}
    )
    ds["loss"] = xr.Variable(
        "step", losses[steps], {"long_name": "training mini-batch loss", "units": "nats"}
    )
    ds.attrs.update(
        {
            "config": cfg.to_json(),
            "config_hash": cfg.hash,
            "variant": cfg.variant,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "optimizer_name": cfg.optimizer,
            "seed": int(cfg.seed),
        }
    )
    return ds


def _tracker_steps(ds: xr.Dataset, n_steps: int) -> np.ndarray:
    """The tracker's recorded steps (0: the start, t: after the t-th update), checked."""
    if "step" not in ds.coords:
        raise RuntimeError("the tracker dataset has no 'step' coordinate")
    s = np.asarray(ds["step"].values, dtype=np.int64)
    if len(s) and (s.min() < 0 or s.max() > n_steps):
        raise RuntimeError(
            f"tracker steps {s.min()}..{s.max()} do not fit the {n_steps} optimizer steps"
        )
    return s


# ---------------------------------------------------------------------------------------
# Saving


def save_result(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a run's (or sweep's) dataset to netCDF atomically
    (:func:`fsgeom.tracking.save_run`: non-netCDF attributes stored as JSON)."""
    from .tracking import save_run

    return save_run(ds, path)


def open_result(path: str | os.PathLike) -> xr.Dataset:
    """Read a dataset written by :func:`save_result` fully into memory."""
    from .tracking import open_run

    return open_run(path)


# ---------------------------------------------------------------------------------------
# Sweeps


@dataclass
class RunFailure:
    """A run that raised: its config, the exception text and the traceback."""

    config: RunConfig
    error: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.config.variant} seed={self.config.seed}: {self.error}\n  config: " + (
            self.config.to_json()
        )


class SweepError(RuntimeError):
    """Raised by :func:`sweep` when every run failed (or ``errors='raise'``)."""

    def __init__(self, failures: Sequence[RunFailure], partial: xr.Dataset | None = None):
        self.failures = list(failures)
        self.partial = partial
        msg = f"{len(self.failures)} run(s) failed:\n" + "\n".join(f"- {f}" for f in self.failures)
        super().__init__(msg)


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _run_in_worker(cfg_json: str, threads: int | None) -> xr.Dataset:
    """The task a sweep submits: one run from its JSON config, with limited threads."""
    with torch_threads(threads):
        return run(RunConfig.from_json(cfg_json))


def result_path(out_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    """Where :func:`sweep` saves the run of ``cfg``: ``out_dir/runs/<hash>.nc``."""
    return Path(out_dir) / "runs" / f"{cfg.hash}.nc"


def sweep(
    configs: Iterable[RunConfig | Mapping[str, Any]],
    executor: cf.Executor | Any | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    dims: Sequence[str] = ("optimizer", "seed"),
    max_workers: int = 2,
    threads_per_worker: int | None = 1,
    errors: str = "warn",
    progress: bool = True,
    on_result: Callable[[RunConfig, xr.Dataset], None] | None = None,
    run_missing: bool = True,
) -> xr.Dataset:
    """Run many configs and combine their datasets along new dimensions.

    Args:
        configs: :class:`RunConfig` objects or dicts. Two configs may not share both
            their ``dims`` values (e.g. the same variant and seed).
        executor: anything with ``submit(fn, *args) -> Future`` whose futures work with
            :func:`concurrent.futures.as_completed` — a ``ProcessPoolExecutor``, a
            ``ThreadPoolExecutor``, ``dask.distributed.Client.get_executor()``, or a
            ``dask.distributed.Client`` itself (its executor is used). ``None``: a local
            ``ProcessPoolExecutor`` with ``max_workers`` workers (spawned, each limited to
            ``threads_per_worker`` torch threads), shut down afterwards. ``"sequential"``:
            run in this process.
        out_dir: if given, each finished run is saved to ``out_dir/runs/<config hash>.nc``
            as soon as it finishes, and configs already saved there are loaded instead of
            run (resume); failures are written to ``out_dir/failures.json``.
        dims: the config attributes that index the result. ``"optimizer"`` (default, with
            ``"seed"``) takes each config's :attr:`RunConfig.variant` — its ``label``, else
            optimizer name + hyperparameters — so that differently tuned runs of one
            optimizer stay apart; any other RunConfig field or ``hparams`` key works too.
        threads_per_worker: torch threads per run (avoids oversubscription).
        errors: ``"warn"`` (default): warn with each failed config and return the others;
            ``"raise"``: raise :class:`SweepError` after all runs finished (its ``partial``
            holds the combined finished runs). If every run failed, always raises.
        progress: show a tqdm bar.
        on_result: called in this process with each finished (or loaded) run.
        run_missing: ``False`` only collects the runs already saved in ``out_dir`` (e.g.
            while a long sweep is still running elsewhere); the others are left out, with
            a warning.

    Returns:
        The runs' datasets combined with :func:`fsgeom.tracking.combine` along ``dims``
        (missing combinations are NaN), with ``attrs["failed_runs"]`` (JSON list of the
        failed configs and errors, ``"[]"`` if none).
    """
    if errors not in ("warn", "raise"):
        raise ValueError(f"errors must be 'warn' or 'raise', got {errors!r}")
    cfgs = [RunConfig.from_dict(c) if isinstance(c, Mapping) else c for c in configs]
    if not cfgs:
        raise ValueError("configs is empty: give at least one RunConfig")
    for i, c in enumerate(cfgs):
        if not isinstance(c, RunConfig):
            raise TypeError(f"configs[{i}] must be a RunConfig or a dict, got {type(c).__name__}")
        c.validate()
    keys = [_dim_values(c, dims) for c in cfgs]
    seen: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise ValueError(
                f"configs[{seen[k]}] and configs[{i}] have the same {tuple(dims)} = {k}; "
                "give them different labels or seeds, or add a dimension to dims"
            )
        seen[k] = i

    results: dict[int, xr.Dataset] = {}
    failures: list[RunFailure] = []
    todo = []
    for i, c in enumerate(cfgs):
        p = result_path(out_dir, c) if out_dir is not None else None
        if p is not None and p.exists():
            try:
                results[i] = open_result(p)
                if on_result:
                    on_result(c, results[i])
                continue
            except Exception as e:  # unreadable (e.g. truncated): run it again
                warnings.warn(f"could not read saved run {p} ({e}); running it again", stacklevel=2)
        todo.append(i)
    if not run_missing:
        if out_dir is None:
            raise ValueError("run_missing=False needs out_dir, where the saved runs are")
        if todo:
            warnings.warn(
                f"{len(todo)} of {len(cfgs)} run(s) not saved yet in {out_dir}; collecting "
                f"the {len(results)} finished one(s)",
                stacklevel=2,
            )
        if not results:
            raise ValueError(f"no run of this sweep is saved in {out_dir} yet")
        todo = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfgs), initial=len(results), desc="sweep", unit="run")

    def finish(i: int, ds: xr.Dataset | None, exc: BaseException | None, tb: str = ""):
        c = cfgs[i]
        if exc is not None:
            f = RunFailure(c, f"{type(exc).__name__}: {exc}", tb)
            failures.append(f)
            if bar is not None:
                bar.write(f"run failed: {f}")
        else:
            results[i] = ds
            if out_dir is not None:
                save_result(ds, result_path(out_dir, c))
            if on_result:
                on_result(c, ds)
        if bar is not None:
            bar.update()

    if isinstance(executor, str) and executor != "sequential":
        raise ValueError(f"executor must be 'sequential', None or an executor, got {executor!r}")
    if executor is not None and not isinstance(executor, str):
        if not (hasattr(executor, "submit") or hasattr(executor, "get_executor")):
            raise TypeError(
                "executor must have submit(fn, *args) (concurrent.futures-style) or be a "
                f"dask.distributed Client, got {type(executor).__name__}"
            )
    own = None
    if todo:
        if executor == "sequential":
            for i in todo:
                try:
                    ds = _run_in_worker(cfgs[i].to_json(), threads_per_worker)
                    finish(i, ds, None)
                except Exception as e:
                    finish(i, None, e, traceback.format_exc())
        else:
            if executor is None:
                import multiprocessing as mp

                own = executor = cf.ProcessPoolExecutor(
                    max_workers=max_workers,
                    mp_context=mp.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(threads_per_worker,),
                )
            elif hasattr(executor, "get_executor") and not hasattr(executor, "shutdown"):
                executor = executor.get_executor()  # a dask.distributed Client
            elif type(executor).__name__ == "Client" and hasattr(executor, "get_executor"):
                executor = executor.get_executor()
            try:
                futures = {
                    executor.submit(_run_in_worker, cfgs[i].to_json(), threads_per_worker): i
                    for i in todo
                }
                for fut in cf.as_completed(futures):
                    i = futures[fut]
                    try:
                        ds = fut.result()
                    except Exception as e:
                        finish(i, None, e, "".join(traceback.format_exception(e)))
                    else:
                        finish(i, ds, None)
            finally:
                if own is not None:
                    own.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
        bar.close()

    failed_json = json.dumps([{"config": f.config.to_dict(), "error": f.error} for f in failures])
    if out_dir is not None and failures:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "failures.json").write_text(
            json.dumps(
                [
                    {"config": f.config.to_dict(), "error": f.error, "traceback": f.traceback}
                    for f in failures
                ],
                indent=2,
            )
        )
    combined = None
    if results:
        order = sorted(results)
        combined = combine_runs([results[i] for i in order], [cfgs[i] for i in order], dims)
        combined.attrs["failed_runs"] = failed_json
    if failures:
        if combined is None or errors == "raise":
            raise SweepError(failures, combined)
        warnings.warn(
            f"{len(failures)} of {len(cfgs)} run(s) failed (finished runs are kept):\n"
            + "\n".join(f"- {f}" for f in failures),
            RuntimeWarning,
            stacklevel=2,
        )
    return combined


def _dim_values(cfg: RunConfig, dims: Sequence[str]) -> tuple:
    out = []
    for d in dims:
        if d in ("optimizer", "variant"):
            out.append(cfg.variant)
        elif d in {f.name for f in dataclasses.fields(cfg)}:
            v = getattr(cfg, d)
            out.append(json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)
        elif d in cfg.hparams:
            out.append(cfg.hparams[d])
        else:
            raise ValueError(
                f"dims: {d!r} is neither 'optimizer', a RunConfig field nor an hparams key"
            )
    return tuple(out)


def combine_runs(
    datasets: Sequence[xr.Dataset], configs: Sequence[RunConfig], dims: Sequence[str]
) -> xr.Dataset:
    """Stack run datasets along new dimensions ``dims`` (values from each run's config, see
    :func:`sweep`) with :func:`fsgeom.tracking.combine`, aligned on ``step`` and
    ``epoch_end`` (outer join: absent combinations and shorter runs are NaN);
    ``attrs["configs"]`` lists every config (JSON)."""
    from .tracking import combine

    if len(datasets) != len(configs):
        raise ValueError("datasets and configs must have the same length")
    keys = [_dim_values(c, dims) for c in configs]
    runs = {}
    for k, d in zip(keys, datasets):
        d = d.copy()
        for name in dims:  # e.g. the tracker's "optimizer" / "seed" attributes
            d.attrs.pop(name, None)
        runs[k] = d
    out = combine(runs, dim=tuple(dims))
    out.attrs["configs"] = json.dumps([c.to_dict() for c in configs])
    return out
