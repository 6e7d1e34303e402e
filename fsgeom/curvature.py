"""Curvature of a network in function space: the L² metric, the Fisher (exact and
Monte-Carlo) and the empirical Fisher, as matrix-free operators.

Every operator here is a generalized Gauss–Newton matrix averaged over N examples::

    A = 1/N Σ_i J_iᵀ M_i J_i,        J_i = ∂z(x_i)/∂θ   (z: the module's raw output)

and differs only by the small output-space matrix M_i (C×C for C classes), built in closed
form from the logits z_i (p_i = softmax(z_i), S_i = diag(p_i) − p_i p_iᵀ):

================================  =================================================
operator                          M_i
================================  =================================================
``L2Metric(output="logits")``     I                      (G = 1/N Σ J_zᵀ J_z)
``L2Metric(output="probs")``      S_i S_i                (J_p = S J_z: *not* the Fisher)
``L2Metric(output="log_probs")``  (I − 1p_iᵀ)ᵀ(I − 1p_iᵀ)
``Fisher()``                      S_i                    (exact, no label sampling)
``Fisher(mc_samples=k)``          1/k Σ_s r_s r_sᵀ,  r_s = e_{y_s} − p_i, y_s ~ p_i
``Fisher(likelihood="gaussian")`` I/σ²  (MC: 1/k Σ_s ε_s ε_sᵀ/σ², ε_s ~ N(0, I))
``EmpiricalFisher()``             r_i r_iᵀ,  r_i = ∂ℓ(z_i, y_i)/∂z_i at the observed label
================================  =================================================

so ``EmpiricalFisher`` is 1/N Σ_i g_i g_iᵀ with g_i = J_iᵀ r_i the per-example loss
gradient, computed without ever forming the N×P matrix of per-example gradients.

**Products.** A product ``A @ v`` is a Jacobian-vector product (u = J v), the closed-form
M, and one vector-Jacobian product (Jᵀ M u). A *fresh* product (the first on a batch)
does both in one forward pass: forward-mode dual numbers give z and J v while autograd
records the graph for the vjp. Products that share a batch (``matmat``, ``spectrum``,
``solve``, ``to_scipy``, a second ``@``) reuse a *linearization* built once per batch:
the retained forward graph of the first product for the vjp and either the
double-backward trick (J v = ∂⟨Jᵀu, v⟩/∂u through a backward graph built once) or
``torch.func.linearize`` for the jvp (chosen by ``linearization=``).

**Data.** ``data`` is anything :func:`fsgeom.data.batches` accepts. Over a loader the
average is exact (sums over all examples, divided by their total number) and a product
holds one batch in memory at a time; a batch larger than ``chunk_size`` is processed in
chunks. Linearizations are cached only for a single batch of at most ``chunk_size``
examples (``cache="auto"``); ``cache=True`` caches every chunk (memory ∝ data).

**State.** An operator is the curvature at θ as it was when the operator was built (a copy
of θ is kept); build a new one after the model changes — construction is cheap and does no
computation. The model is never modified: evaluation uses :class:`FunctionView`
semantics (eval mode; BatchNorm on running statistics unless ``batch_stats=True``), never
updates BatchNorm statistics and never writes ``.grad``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .data import batches
from .functional import (
    FunctionView,
    Params,
    as_params,
    check_output,
    flatten,
    num_params,
    trainable_params,
)

__all__ = [
    "CurvatureOperator",
    "DENSE_MAX_ENTRIES",
    "EmpiricalFisher",
    "Fisher",
    "L2Metric",
    "solve",
    "spectrum",
]

#: ``to_dense()`` refuses matrices with more entries than this (P² > limit); raise it per
#: call with ``to_dense(max_entries=...)`` or globally by assigning this module attribute.
DENSE_MAX_ENTRIES: int = 2**26
#: ``spectrum``/``solve``/``diagonal`` use dense linear algebra up to this many parameters.
DENSE_AUTO_MAX_PARAMS: int = 2048
LINEARIZATIONS = ("auto", "double_backward", "linearize", "none")
#: with ``linearization="auto"``, models with convolutions or BatchNorm are traced with
#: ``torch.func.linearize`` when a fresh product takes longer than this; faster ones keep
#: fresh products (the trace would cost more than it saves).
LINEARIZE_MIN_SECONDS: float = 0.05


# ---------------------------------------------------------------------------------------
# Output-space matrices M_i, applied to u of shape (N, *S, K): K columns at once


def _softmax_metric(p: Tensor, kind: str) -> Callable[[Tensor], Tensor]:
    """M for softmax outputs; ``p`` is (N, ..., C), u is (N, ..., C, K)."""
    pc = p.unsqueeze(-1)

    def s(u: Tensor) -> Tensor:  # S u = p ⊙ u − p (pᵀu)
        pu = pc * u
        return pu - pc * pu.sum(-2, keepdim=True)

    if kind == "fisher":
        return s
    if kind == "probs":
        return lambda u: s(s(u))
    if kind == "log_probs":

        def m(u: Tensor) -> Tensor:  # Aᵀ A u with A = I − 1pᵀ
            au = u - (pc * u).sum(-2, keepdim=True)
            return au - pc * au.sum(-2, keepdim=True)

        return m
    raise AssertionError(kind)


def _outer_metric(r: Tensor) -> Callable[[Tensor], Tensor]:
    """M = 1/k Σ_s r_s r_sᵀ with residuals ``r`` of shape (N, *S, k)."""
    k = r.shape[-1]

    def m(u: Tensor) -> Tensor:  # u: (N, *S, K)
        n = u.shape[0]
        rf = r.reshape(n, -1, k)
        uf = u.reshape(n, rf.shape[1], -1)
        coeff = torch.bmm(rf.transpose(1, 2), uf)  # (N, k, K)
        return torch.bmm(rf, coeff).reshape(u.shape) / k

    return m


# ---------------------------------------------------------------------------------------
# One chunk of examples: fresh products and the cached linearization


class _Piece:
    """A chunk of ``n`` examples; computes Σ_{i∈chunk} J_iᵀ M_i J_i v (a sum, not a mean)."""

    def __init__(self, op: CurvatureOperator, x: Tensor, y: Tensor | None, index: int, keep: bool):
        self.op, self.x, self.y, self.index, self.keep = op, x, y, index, keep
        self.n = int(x.shape[0])
        self.metric: Callable[[Tensor], Tensor] | None = None
        self.theta: dict[str, Tensor] | None = None
        self.z: Tensor | None = None  # logits carrying the retained autograd graph
        self.jvp: Callable[[Params], Tensor] | None = None
        self.products = 0
        self.fused_seconds = math.inf
        self.fused_only = False

    # -- helpers
    def _f(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.op.view.logits(params, self.x)

    def _leaves(self) -> dict[str, Tensor]:
        return {k: p.detach().requires_grad_() for k, p in self.op.params.items()}

    def _set_metric(self, z: Tensor) -> None:
        if self.metric is None:
            self.metric = self.op._metric(z.detach(), self.y, self.index)

    def _vjp(self, z: Tensor, theta: dict[str, Tensor], w: Tensor, retain: bool) -> Params:
        grads = torch.autograd.grad(
            z, list(theta.values()), w, retain_graph=retain, allow_unused=True
        )
        return {
            k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(theta.items(), grads)
        }

    # -- products
    def product(self, v: Params) -> Params:
        with torch.enable_grad():
            if self.jvp is None and self.keep and self.products > 0 and not self.fused_only:
                method = self.op._linearization(self.fused_seconds)
                if method == "none":
                    self.fused_only = True
                    self.z = self.theta = None  # free the retained graph
                else:
                    self.build(method)
            self.products += 1
            if self.jvp is not None:
                u = self.jvp(v)
                w = self.metric(u.unsqueeze(-1)).squeeze(-1)
                return self._vjp(self.z, self.theta, w, retain=True)
            t0 = time.perf_counter()
            out = self._fused(v, retain=self.keep and self.products == 1)
            self.fused_seconds = min(self.fused_seconds, time.perf_counter() - t0)
            return out

    def _fused(self, v: Params, retain: bool) -> Params:
        """z, J v by forward-mode dual numbers in one pass; then one vjp on its graph."""
        theta = self._leaves()
        try:
            with fwAD.dual_level():
                dual = {k: fwAD.make_dual(theta[k], v[k]) for k in theta}
                z, u = fwAD.unpack_dual(self._f(dual))
        except (NotImplementedError, RuntimeError) as e:  # an op without forward-mode AD
            if "forward AD" not in str(e) and "forward-mode" not in str(e):
                raise
            self.op.linearization = "double_backward"
            self.build("double_backward")
            return self.product(v)
        self._set_metric(z)
        u = torch.zeros_like(z) if u is None else u.detach()
        w = self.metric(u.unsqueeze(-1)).squeeze(-1)
        out = self._vjp(z, theta, w, retain=retain)
        if retain:
            self.z, self.theta = z, theta
        return out

    def build(self, method: str) -> None:
        """Build the reusable linearization of this chunk (once): ``method`` is
        ``"linearize"`` or ``"double_backward"``."""
        if self.jvp is not None:
            return
        with torch.enable_grad():
            if self.z is None:
                self.theta = self._leaves()
                self.z = self._f(self.theta)
            self._set_metric(self.z)
            if method == "linearize":
                try:
                    with warnings.catch_warnings():  # FX const-folding chatter
                        warnings.simplefilter("ignore", UserWarning)
                        _, jfn = torch.func.linearize(self._f, dict(self.op.params))
                    self.jvp = lambda v: jfn(dict(v))
                    return
                except Exception:  # untraceable model: fall back, same numbers
                    self.op.linearization = "double_backward"
            z, theta = self.z, self.theta
            u0 = torch.zeros_like(z, requires_grad=True)
            g = torch.autograd.grad(
                z, list(theta.values()), u0, create_graph=True, allow_unused=True
            )
            used = [(k, gi) for k, gi in zip(theta, g) if gi is not None and gi.requires_grad]

            def jvp(v: Params) -> Tensor:
                if not used:
                    return torch.zeros_like(z)
                (jv,) = torch.autograd.grad(
                    [gi for _, gi in used], u0, [v[k] for k, _ in used], retain_graph=True
                )
                return jv

            self.jvp = jvp

    # -- dense pieces (small networks): per-chunk Jacobian (n, *S, P)
    def jacobian_terms(self, max_elements: int = 2**24) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (J, M J) for sub-chunks, J of shape (m, *S, P)."""
        p_count = self.op.num_params
        if self.op.view.batch_stats:  # examples are coupled: never split the batch
            m = self.n
        else:
            with torch.no_grad():
                d = max(1, self.op.view.logits(self.op.params, self.x[:1])[0].numel())
            m = max(1, max_elements // (d * p_count))
        for s in range(0, self.n, m):
            xs = self.x[s : s + m]
            sub = self if m >= self.n else _Piece(self.op, xs, self._y_slice(s, m), -1, False)
            if sub is not self:
                sub.metric = self._sub_metric(s, m)
            jac = torch.func.jacrev(lambda p, xs=xs: self.op.view.logits(p, xs))(
                dict(self.op.params)
            )
            z = self.op.view.logits(self.op.params, xs).detach()
            cols = [j.reshape(*z.shape, -1) for j in jac.values()]
            jmat = torch.cat(cols, -1) if cols else z.new_zeros(*z.shape, 0)
            sub._set_metric(z)
            yield jmat, sub.metric(jmat)

    def _y_slice(self, s: int, m: int) -> Tensor | None:
        return None if self.y is None else self.y[s : s + m]

    def _sub_metric(self, s: int, m: int) -> Callable[[Tensor], Tensor] | None:
        if self.metric is None:
            with torch.no_grad():
                z = self.op.view.logits(self.op.params, self.x)
            self._set_metric(z)
        full = self.metric

        def sub(u: Tensor) -> Tensor:  # embed the sub-chunk into the chunk's metric
            pad = u.new_zeros(self.n, *u.shape[1:])
            pad[s : s + m] = u
            return full(pad)[s : s + m]

        return sub


# ---------------------------------------------------------------------------------------
# The operators


class CurvatureOperator:
    """Base class: a symmetric PSD matrix A = 1/N Σ_i J_iᵀ M_i J_i (+ δ·I) on θ.

    Subclasses define the output-space matrix M_i (:meth:`_metric`). Shapes: ``A`` is
    ``(P, P)`` with P the number of trainable scalars; vectors use the flat layout of
    :func:`fsgeom.functional.flatten` (or are parameter dicts).

    Args:
        model: an ``nn.Module`` or a :class:`FunctionView` (its output space and BatchNorm
            semantics are used).
        data: a tensor of inputs, ``(inputs, targets)`` or an iterable of batches.
        damping: δ ≥ 0 added to the diagonal (``op + δ`` does the same).
        params: θ at which to evaluate (dict or flat vector); default the model's current
            trainable parameters (copied).
        batch_stats: BatchNorm on batch statistics (without updating running statistics);
            batches are then never split into chunks.
        chunk_size: most examples processed at once.
        cache: ``"auto"`` (cache the linearization of a single batch of at most
            ``chunk_size`` examples), ``True`` (cache every chunk) or ``False``.
        linearization: how a cached linearization computes J v: ``"double_backward"``
            (cheap to build; fast for linear/elementwise layers), ``"linearize"``
            (``torch.func.linearize``: slower to build, faster for convolutions and
            BatchNorm), ``"none"`` (every product is a fresh one) or ``"auto"``:
            ``"double_backward"`` for models without convolution or BatchNorm layers;
            with them ``"linearize"`` when the batch's first (fresh) product took longer
            than ``LINEARIZE_MIN_SECONDS``, else ``"none"``. All give the same numbers up
            to rounding.
    """

    _needs_targets = False
    _output = "logits"

    def __init__(
        self,
        model: nn.Module | FunctionView,
        data,
        *,
        damping: float = 0.0,
        params: Mapping[str, Tensor] | Tensor | None = None,
        batch_stats: bool = False,
        chunk_size: int = 2048,
        cache: bool | str = "auto",
        linearization: str = "auto",
    ):
        if isinstance(model, FunctionView):
            self.view = FunctionView(model.model, model.output, model.batch_stats)
        elif isinstance(model, nn.Module):
            self.view = FunctionView(model, "logits", batch_stats)
        else:
            raise TypeError(
                f"model must be an nn.Module or a FunctionView, got {type(model).__name__}"
            )
        current = trainable_params(self.view.model)
        if not current:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        src = current if params is None else as_params(params, current, "params")
        self.params: Params = {k: t.detach().clone() for k, t in src.items()}
        self.num_params = num_params(self.params)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.damping = _check_damping(damping)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        if linearization not in LINEARIZATIONS:
            raise ValueError(
                f"linearization must be one of {LINEARIZATIONS}, got {linearization!r}"
            )
        self.linearization = linearization
        self.data = self._check_data(data)
        self.cache = cache
        self._store: dict = {"pieces": None, "num_examples": None}

    # -- data
    def _check_data(self, data):
        single = isinstance(data, Tensor) or (
            isinstance(data, tuple) and bool(data) and isinstance(data[0], Tensor)
        )
        if not single:
            try:
                it = iter(data)
            except TypeError:
                raise TypeError(
                    "data must be a tensor of inputs, a tuple (inputs, targets) or an iterable "
                    f"of such batches, got {type(data).__name__}"
                ) from None
            if it is data:
                raise TypeError(
                    "data is a one-shot iterator (a generator?): every product passes over the "
                    "data again, so pass a list of batches or a re-iterable loader"
                )
        self._single = single
        # validate eagerly for a single batch (cheap); loaders are validated while streamed
        if single:
            for _ in batches(data, need_targets=self._needs_targets):
                pass
        return data

    def _keep(self, n: int) -> bool:
        if self.cache is True:
            return True
        if self.cache is False or self.linearization == "none":
            return False
        return self._single and (n <= self.chunk_size or self.view.batch_stats)

    def _linearization(self, fused_seconds: float) -> str:
        """The linearization for a batch whose fresh product took ``fused_seconds``."""
        if self.linearization != "auto":
            return self.linearization
        slow_db = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
        if not any(isinstance(m, slow_db) for m in self.view.model.modules()):
            return "double_backward"
        # torch.func.linearize costs a trace (~0.1-1 s): worth it for expensive products only
        return "linearize" if fused_seconds > LINEARIZE_MIN_SECONDS else "none"

    def _pieces(self) -> Iterator[_Piece]:
        store = self._store
        if store["pieces"] is not None:
            yield from store["pieces"]
            return
        kept: list[_Piece] = []
        all_kept = True
        index = 0
        total = 0
        for x, y in batches(self.data, need_targets=self._needs_targets):
            x = x.to(self.device)
            y = None if y is None else y.to(self.device)
            n = x.shape[0]
            step = n if self.view.batch_stats else self.chunk_size
            for s in range(0, n, step):
                keep = self._keep(n)
                piece = _Piece(
                    self, x[s : s + step], None if y is None else y[s : s + step], index, keep
                )
                index += 1
                total += piece.n
                if keep:
                    kept.append(piece)
                else:
                    all_kept = False
                yield piece
        if store["num_examples"] is not None and store["num_examples"] != total:
            raise ValueError(
                f"data yielded {total} examples on this pass but {store['num_examples']} "
                "before; the operator needs the same examples on every pass"
            )
        store["num_examples"] = total
        if all_kept and kept:
            store["pieces"] = kept

    @property
    def num_examples(self) -> int:
        """N, the number of examples averaged over (one pass over the data if unknown)."""
        if self._store["num_examples"] is None:
            self._store["num_examples"] = sum(
                x.shape[0] for x, _ in batches(self.data, need_targets=self._needs_targets)
            )
        return self._store["num_examples"]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    # -- the output-space matrix; subclasses override
    def _metric(self, z: Tensor, y: Tensor | None, index: int) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    # -- products
    def _apply(self, v: Params) -> Params:
        acc: Params | None = None
        n = 0
        for piece in self._pieces():
            out = piece.product(v)
            if acc is None:
                acc = out
            else:
                for k in acc:
                    acc[k] = acc[k] + out[k]
            n += piece.n
        out = {k: a / n for k, a in acc.items()}
        if self.damping:
            out = {k: o + self.damping * v[k] for k, o in out.items()}
        return out

    def _as_params(self, v, name: str = "v") -> tuple[Params, bool]:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        is_flat = isinstance(v, Tensor)
        p = as_params(v, self.params, name)
        for k, t in p.items():
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype} for {k!r}")
        return {k: t.to(device=self.device, dtype=self.dtype) for k, t in p.items()}, is_flat

    def matvec(self, v: Tensor | Mapping[str, Tensor]) -> Tensor | Params:
        """A v. ``v``: a flat vector ``(P,)`` or a parameter dict; returns the same kind
        (in the operator's dtype and device)."""
        p, is_flat = self._as_params(v)
        out = self._apply(p)
        return flatten(out) if is_flat else out

    def matmat(self, vs: Tensor) -> Tensor:
        """A V for ``V`` of shape ``(P, K)``: K products sharing one linearization per batch."""
        if isinstance(vs, np.ndarray):
            vs = torch.from_numpy(vs)
        if not isinstance(vs, Tensor) or vs.dim() != 2 or vs.shape[0] != self.num_params:
            shape = tuple(vs.shape) if isinstance(vs, Tensor) else type(vs).__name__
            raise ValueError(
                f"V must be a matrix of shape ({self.num_params}, K) (one flat parameter "
                f"vector per column), got {shape}"
            )
        cols = [flatten(self._apply(self._as_params(c, "V column")[0])) for c in vs.T]
        if not cols:
            return vs.new_zeros(self.num_params, 0, dtype=self.dtype)
        return torch.stack(cols, 1)

    def __matmul__(self, v):
        if isinstance(v, (Tensor, np.ndarray)) and v.ndim == 2:
            return self.matmat(v)
        return self.matvec(v)

    # -- damping
    def damped(self, delta: float) -> CurvatureOperator:
        """A + δ·I (shares this operator's cached linearizations)."""
        out = copy.copy(self)
        out.damping = self.damping + _check_damping(delta)
        return out

    def __add__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self.damped(float(other))
        return NotImplemented

    __radd__ = __add__

    # -- dense, scipy, diagonal, trace
    def to_dense(self, max_entries: int | None = None) -> Tensor:
        """The matrix A (+ δ·I) as a dense ``(P, P)`` tensor.

        Built from the Jacobian (one vjp per output scalar, vectorized) without P products.
        Refuses when P² exceeds ``max_entries`` (default :data:`DENSE_MAX_ENTRIES`).
        """
        limit = DENSE_MAX_ENTRIES if max_entries is None else int(max_entries)
        p = self.num_params
        if p * p > limit:
            size = p * p * torch.finfo(self.dtype).bits // 8
            raise MemoryError(
                f"to_dense() would build a {p}×{p} matrix ({p * p:.3g} entries, "
                f"{size / 2**30:.3g} GiB); the limit is {limit:.3g} entries. Use matrix-free "
                "products (op @ v, spectrum, solve), or raise the limit with "
                "to_dense(max_entries=...) or fsgeom.curvature.DENSE_MAX_ENTRIES = ..."
            )
        dense = torch.zeros(p, p, dtype=self.dtype, device=self.device)
        n = 0
        for piece in self._pieces():
            for jmat, mj in piece.jacobian_terms():
                dense += jmat.reshape(-1, p).T @ mj.reshape(-1, p)
            n += piece.n
        dense /= n
        dense = (dense + dense.T) / 2
        if self.damping:
            dense += self.damping * torch.eye(p, dtype=self.dtype, device=self.device)
        return dense

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) for eigsh, cg, ...

        Products share the cached linearization of each batch."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            v = torch.from_numpy(x).to(device=self.device, dtype=self.dtype)
            p, _ = self._as_params(v)
            return flatten(self._apply(p)).detach().cpu().double().numpy()

        def mm(xs):
            return np.stack([mv(c) for c in np.asarray(xs).T], 1)

        p = self.num_params
        return LinearOperator(
            (p, p), matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64
        )

    def diagonal(self, method: str = "auto", samples: int = 100, seed: int = 0) -> Tensor:
        """diag(A) as a flat ``(P,)`` tensor.

        ``"exact"``: Σ_i diag(J_iᵀ M_i J_i) from the Jacobian (one vjp per output scalar,
        never P×P). ``"hutchinson"``: 1/s Σ_s ζ_s ⊙ (A ζ_s) with ``samples`` Rademacher
        vectors ζ_s from a generator seeded by ``seed``. ``"auto"``: exact when P ≤
        ``DENSE_AUTO_MAX_PARAMS``.
        """
        method = self._estimator(method)
        if method == "exact":
            p = self.num_params
            diag = torch.zeros(p, dtype=self.dtype, device=self.device)
            n = 0
            for piece in self._pieces():
                for jmat, mj in piece.jacobian_terms():
                    diag += (jmat.reshape(-1, p) * mj.reshape(-1, p)).sum(0)
                n += piece.n
            return diag / n + self.damping
        acc = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        for zeta in self._rademacher(samples, seed):
            acc += zeta * flatten(self._apply(self._as_params(zeta)[0]))
        return acc / samples

    def trace(self, method: str = "auto", samples: int = 100, seed: int = 0) -> Tensor:
        """tr(A) (0-dim): exact (sum of :meth:`diagonal`) or Hutchinson 1/s Σ ζᵀAζ."""
        method = self._estimator(method)
        if method == "exact":
            return self.diagonal("exact").sum()
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for zeta in self._rademacher(samples, seed):
            total += zeta @ flatten(self._apply(self._as_params(zeta)[0]))
        return total / samples

    def _estimator(self, method: str) -> str:
        if method not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
        if method == "auto":
            return "exact" if self.num_params <= DENSE_AUTO_MAX_PARAMS else "hutchinson"
        return method

    def _rademacher(self, samples: int, seed: int) -> Iterator[Tensor]:
        if int(samples) < 1:
            raise ValueError(f"samples must be a positive integer, got {samples}")
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(int(samples)):
            z = torch.randint(0, 2, (self.num_params,), generator=gen).to(self.dtype) * 2 - 1
            yield z.to(self.device)

    def __repr__(self) -> str:
        extra = f", damping={self.damping:g}" if self.damping else ""
        return (
            f"{type(self).__name__}({type(self.view.model).__name__}, "
            f"params={self.num_params}{self._describe()}{extra})"
        )

    def _describe(self) -> str:
        return ""


def _check_damping(delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
        raise ValueError(f"damping must be a non-negative number, got {delta!r}")
    if not math.isfinite(delta):
        raise ValueError(f"damping must be finite, got {delta!r}")
    return float(delta)


def _class_scores(z: Tensor, who: str) -> None:
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(
            f"{who} needs class scores of shape (N, C) with C >= 2 (the model's logits), but "
            f"the model's output has shape {tuple(z.shape)}"
            + (
                "; for regression use Fisher(..., likelihood='gaussian')"
                if who.startswith("Fisher")
                else ""
            )
        )


class L2Metric(CurvatureOperator):
    """The L² metric G = 1/N Σ_i J_iᵀ J_i, J_i = ∂f(x_i)/∂θ in the output space ``output``.

    Its quadratic form δᵀGδ is the linearized squared L² distance of a step δ (see
    :func:`fsgeom.linearized_l2_distance`). In ``"probs"`` it equals J_zᵀ S² J_z with
    S = diag(p) − ppᵀ — not the Fisher. ``output``: ``"probs"`` (default), ``"logits"``
    or ``"log_probs"``; with a :class:`FunctionView` its output space is used. Other
    arguments: see :class:`CurvatureOperator`.
    """

    def __init__(self, model: nn.Module | FunctionView, data, output: str | None = None, **kw):
        if isinstance(model, FunctionView):
            if output is not None and output != model.output:
                raise ValueError(
                    f"output={output!r} disagrees with the view's output space {model.output!r}"
                )
            output = model.output
        self.output = check_output("probs" if output is None else output)
        super().__init__(model, data, **kw)

    def _metric(self, z, y, index):
        if self.output == "logits":
            return lambda u: u
        if z.dim() < 2:
            raise ValueError(
                f"L2Metric(output={self.output!r}) needs outputs of shape (N, ..., C) with a "
                f"class dimension last; the model's output has shape {tuple(z.shape)}"
            )
        return _softmax_metric(torch.softmax(z, -1), self.output)

    def _describe(self) -> str:
        return f", output={self.output!r}"


LIKELIHOODS = ("categorical", "gaussian")


class Fisher(CurvatureOperator):
    """The Fisher information of the model's predictive distribution, 1/N Σ_i F_i.

    * ``likelihood="categorical"`` (classifiers; the module outputs logits z ``(N, C)``):
      exactly F = 1/N Σ_i J_zᵢᵀ (diag(p_i) − p_i p_iᵀ) J_zᵢ, no label sampling.
    * ``likelihood="gaussian"`` (regression; the output is the mean of N(f(x), σ²I)):
      F = 1/N Σ_i J_iᵀ J_i / σ².
    * ``mc_samples=k``: the Monte-Carlo estimator 1/N Σ_i 1/k Σ_s g_is g_isᵀ with
      g_is = ∇_θ log p(y_s | x_i), y_s ~ p_θ(·|x_i) drawn with ``generator`` (default: a
      generator seeded with 0 — the global RNG is never used). The labels are drawn once per
      chunk, so the operator is a fixed matrix (over a loader: if it yields the same
      batches in the same order).

    Other arguments: see :class:`CurvatureOperator`.
    """

    def __init__(
        self,
        model: nn.Module | FunctionView,
        data,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        likelihood: str = "categorical",
        sigma: float = 1.0,
        **kw,
    ):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if mc_samples is not None and (isinstance(mc_samples, bool) or int(mc_samples) < 1):
            raise ValueError(f"mc_samples must be None or a positive integer, got {mc_samples!r}")
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.likelihood = likelihood
        self.mc_samples = None if mc_samples is None else int(mc_samples)
        self.sigma = float(sigma)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self._seed = int(torch.randint(0, 2**62, (), generator=gen)) if self.mc_samples else 0
        super().__init__(model, data, **kw)

    def _chunk_generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self._seed + 1_000_003 * index) % 2**63)

    def _metric(self, z, y, index):
        k = self.mc_samples
        if self.likelihood == "gaussian":
            if k is None:
                scale = 1.0 / self.sigma**2
                return lambda u: u * scale
            eps = torch.randn(
                (*z.shape, k), generator=self._chunk_generator(index), dtype=torch.float64
            ).to(z)
            return _outer_metric(eps / self.sigma)
        _class_scores(z, "Fisher(likelihood='categorical')")
        p = torch.softmax(z, -1)
        if k is None:
            return _softmax_metric(p, "fisher")
        ys = torch.multinomial(
            p.detach().double().cpu(), k, replacement=True, generator=self._chunk_generator(index)
        ).to(z.device)  # (N, k)
        onehot = torch.nn.functional.one_hot(ys, z.shape[1]).to(z.dtype)  # (N, k, C)
        r = (onehot - p.unsqueeze(1)).transpose(1, 2)  # (N, C, k)
        return _outer_metric(r)

    def _describe(self) -> str:
        s = f", likelihood={self.likelihood!r}"
        if self.likelihood == "gaussian":
            s += f", sigma={self.sigma:g}"
        if self.mc_samples:
            s += f", mc_samples={self.mc_samples}"
        return s


LOSSES = ("cross_entropy", "mse")


class EmpiricalFisher(CurvatureOperator):
    """The empirical Fisher E = 1/N Σ_i g_i g_iᵀ, g_i = ∇_θ ℓ(f(x_i), y_i) at the
    *observed* targets — not the Fisher.

    ``data`` must carry targets. ``loss``: ``"cross_entropy"`` (logits ``(N, C)``,
    integer labels ``(N,)`` or class probabilities ``(N, C)``), ``"mse"`` (ℓ_i =
    mean_c (f_c(x_i) − y_ic)², torch's ``MSELoss`` of one example) or a callable
    ``loss(output_i, target_i) -> scalar`` for one example (differentiated with
    ``torch.func.grad`` under ``vmap``). Products use r_i = ∂ℓ_i/∂z_i:
    E v = 1/N Jᵀ (r ⊙ (rᵀ J v)), never forming the N×P per-example gradients.
    Other arguments: see :class:`CurvatureOperator`.
    """

    _needs_targets = True

    def __init__(self, model: nn.Module | FunctionView, data, loss="cross_entropy", **kw):
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
        self.loss = loss
        super().__init__(model, data, **kw)

    def _residual(self, z: Tensor, y: Tensor) -> Tensor:
        if callable(self.loss):
            return torch.func.vmap(torch.func.grad(self.loss))(z, y.to(z.device))
        if self.loss == "mse":
            if y.shape != z.shape:
                raise ValueError(
                    f"loss='mse' needs targets shaped like the outputs {tuple(z.shape)}, got "
                    f"{tuple(y.shape)}"
                )
            d = z[0].numel()
            return 2.0 * (z - y.to(z.dtype)) / d
        _class_scores(z, "EmpiricalFisher(loss='cross_entropy')")
        p = torch.softmax(z, -1)
        if y.dtype.is_floating_point and y.shape == z.shape:
            return p - y.to(z.dtype)
        if y.dim() != 1 or y.dtype.is_floating_point:
            raise ValueError(
                "loss='cross_entropy' needs integer class labels of shape (N,) or class "
                f"probabilities of shape {tuple(z.shape)}; got {y.dtype} {tuple(y.shape)}"
            )
        c = z.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(
                f"targets must be class indices in [0, {c - 1}], got "
                f"min {int(y.min())}, max {int(y.max())}"
            )
        return p - torch.nn.functional.one_hot(y.long(), c).to(z.dtype)

    def _metric(self, z, y, index):
        r = self._residual(z, y).detach()
        return _outer_metric(r.unsqueeze(-1))

    def _describe(self) -> str:
        return f", loss={self.loss!r}"


# ---------------------------------------------------------------------------------------
# Spectra and solves


def _dense_ok(op: CurvatureOperator, method: str, names: tuple[str, str]) -> bool:
    """Whether ``solve``/... should go dense for ``method`` in ("auto", *names)."""
    if method not in ("auto", *names):
        raise ValueError(f"method must be one of {('auto', *names)}, got {method!r}")
    if method == "auto":
        return op.num_params <= DENSE_AUTO_MAX_PARAMS
    return method == names[0]


def spectrum(
    op: CurvatureOperator,
    k: int = 10,
    *,
    method: str = "auto",
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a curvature operator (damping included).

    Returns ``(eigenvalues (k,), eigenvectors (P, k))`` in descending order, in the
    operator's dtype; eigenvectors are orthonormal columns in the flat parameter layout.

    ``method``:

    * ``"lanczos"``: Lanczos with full reorthogonalization in torch (the Krylov basis is
      kept, P×m), products sharing the cached linearization; it grows the Krylov space
      until every wanted Ritz pair (θ_j, y_j) has residual ‖A y_j − θ_j y_j‖ ≤ tol·θ_1, or
      until ``maxiter`` products (default max(20k, 200), at most P). Start vector from
      ``seed``.
    * ``"arpack"``: ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos) on
      :meth:`CurvatureOperator.to_scipy`, relative tolerance ``tol``.
    * ``"dense"``: ``eigh`` of :meth:`CurvatureOperator.to_dense`.
    * ``"auto"``: dense up to ``DENSE_AUTO_MAX_PARAMS`` parameters (or when k = P), else
      ``"lanczos"``.
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
    methods = ("auto", "dense", "lanczos", "arpack")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    p = op.num_params
    if isinstance(k, bool) or int(k) < 1 or int(k) > p:
        raise ValueError(f"k must be an integer in [1, {p}] (the number of parameters), got {k}")
    k = int(k)
    if method == "auto":
        method = "dense" if p <= DENSE_AUTO_MAX_PARAMS or k >= p else "lanczos"
    if method == "arpack" and k >= p:
        method = "dense"
    if method == "dense":
        evals, evecs = torch.linalg.eigh(op.to_dense().double())
        evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    elif method == "arpack":
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(p)
        vals, vecs = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0)
        order = np.argsort(vals)[::-1]
        evals = torch.from_numpy(vals[order].copy())
        evecs = torch.from_numpy(vecs[:, order].copy())
    else:
        evals, evecs = _lanczos(op, k, tol, maxiter, seed)
    return evals.to(device=op.device, dtype=op.dtype), evecs.to(device=op.device, dtype=op.dtype)


def _lanczos(op: CurvatureOperator, k: int, tol: float, maxiter: int | None, seed: int):
    """Lanczos with full reorthogonalization (basis in float64) for the top-k pairs."""
    p = op.num_params
    m_max = min(p, max(20 * k, 200) if maxiter is None else int(maxiter))
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(p, generator=gen, dtype=torch.float64).to(op.device)
    q /= torch.linalg.vector_norm(q)
    basis = torch.empty(min(m_max, 2 * k + 20), p, dtype=torch.float64, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []

    def mv(v: Tensor) -> Tensor:
        vp = dict(zip(op.params, _split(v.to(op.dtype), op.params)))
        return flatten(op._apply(vp)).double()

    check_every = max(1, k // 2)
    for j in range(m_max):
        if j == basis.shape[0]:  # grow the basis geometrically
            grown = torch.empty(min(m_max, 2 * j), p, dtype=torch.float64, device=op.device)
            grown[:j] = basis
            basis = grown
        basis[j] = q
        w = mv(q)
        alpha = float(q @ w)
        alphas.append(alpha)
        b = basis[: j + 1]
        w = w - b.T @ (b @ w)  # full reorthogonalization, twice
        w = w - b.T @ (b @ w)
        beta = float(torch.linalg.vector_norm(w))
        m = j + 1
        scale = max(abs(a) for a in alphas)
        breakdown = beta <= 1e-10 * max(scale, 1e-300)  # an invariant subspace was found
        done = m == m_max or (breakdown and m >= k)
        if m >= k and (done or (m - k) % check_every == 0):
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if m > 1:
                off = torch.tensor(betas, dtype=torch.float64)
                t += torch.diag(off, 1) + torch.diag(off, -1)
            theta, s = torch.linalg.eigh(t)
            theta, s = theta.flip(0)[:k], s.flip(1)[:, :k]
            resid = beta * s[-1].abs()  # ‖A y − θ y‖ for each Ritz pair
            top = max(float(theta[0].abs()), 1e-300)
            if done or bool((resid <= tol * top).all()):
                vecs = basis[:m].T @ s.to(basis.device)
                return theta, vecs
        if breakdown:  # continue with a fresh direction orthogonal to the basis
            w = torch.randn(p, generator=gen, dtype=torch.float64).to(op.device)
            w = w - b.T @ (b @ w)
            w = w - b.T @ (b @ w)
            betas.append(0.0)
            q = w / torch.linalg.vector_norm(w)
            continue
        betas.append(beta)
        q = w / beta
    raise AssertionError("unreachable")


def solve(
    op: CurvatureOperator,
    g: Tensor | Mapping[str, Tensor],
    damping: float = 0.0,
    *,
    method: str = "auto",
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: Tensor | Mapping[str, Tensor] | None = None,
    return_info: bool = False,
):
    """Solve (A + δ·I) x = g: the natural-gradient direction x = (A + δI)⁻¹ g.

    ``g``: flat ``(P,)`` vector or parameter dict; the result is of the same kind.
    ``method``: ``"cg"`` (matrix-free conjugate gradients, stopping when
    ‖r‖ ≤ tol·‖g‖ or after ``maxiter`` iterations, default 10·P capped at 1000),
    ``"dense"`` (Cholesky of the dense matrix when damped, else the minimum-norm solution
    from its eigendecomposition, eigenvalues below P·ε·λ_max treated as 0) or ``"auto"``
    (dense up to ``DENSE_AUTO_MAX_PARAMS`` parameters). Without damping, A is singular
    whenever P > N·C; CG from x0 = 0 then
    converges to the minimum-norm solution when g lies in A's range (true for the loss
    gradient and the Fisher or empirical Fisher). With ``return_info=True`` returns
    ``(x, {"iterations", "residual", "converged", "method"})``.
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
    a = op.damped(damping) if damping else op
    gp, is_flat = op._as_params(g, "g")
    b = flatten(gp)
    if _dense_ok(op, method, ("dense", "cg")):
        dense = a.to_dense().double()
        bd = b.double()
        x = None
        if a.damping > 0:
            chol, info = torch.linalg.cholesky_ex(dense)
            if int(info) == 0:
                x = torch.cholesky_solve(bd[:, None], chol)[:, 0]
        if x is None:  # (numerically) singular: minimum-norm solution via the eigenbasis
            lam, vecs = torch.linalg.eigh(dense)
            cut = lam.abs().max() * lam.numel() * torch.finfo(torch.float64).eps
            inv = torch.where(lam > cut, 1.0 / lam, torch.zeros_like(lam))
            x = vecs @ (inv * (vecs.T @ bd))
        x = x.to(op.dtype)
        res = float(torch.linalg.vector_norm(dense @ x.double() - bd))
        info = {"iterations": 0, "residual": res, "converged": True, "method": "dense"}
    else:
        x, info = _cg(
            a, b, tol, maxiter, None if x0 is None else flatten(op._as_params(x0, "x0")[0])
        )
    out = x if is_flat else {k: t for k, t in zip(gp, _split(x, gp))}
    return (out, info) if return_info else out


def _split(x: Tensor, like: Params) -> list[Tensor]:
    out, i = [], 0
    for t in like.values():
        out.append(x[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _cg(a: CurvatureOperator, b: Tensor, tol: float, maxiter: int | None, x0: Tensor | None):
    def mv(v: Tensor) -> Tensor:
        return flatten(a._apply(dict(zip(a.params, _split(v, a.params)))))

    maxiter = min(10 * b.numel(), 1000) if maxiter is None else int(maxiter)
    bnorm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - mv(x) if x0 is not None else b.clone()
    if bnorm == 0:
        return x, {"iterations": 0, "residual": 0.0, "converged": True, "method": "cg"}
    p = r.clone()
    rs = r @ r
    it = 0
    converged = math.sqrt(float(rs)) <= tol * bnorm
    while not converged and it < maxiter:
        ap = mv(p)
        pap = p @ ap
        if pap <= 0:  # direction in the null space: the minimum-norm iterate is final
            break
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        it += 1
        converged = math.sqrt(float(rs_new)) <= tol * bnorm
        p = r + (rs_new / rs) * p
        rs = rs_new
    res = math.sqrt(float(rs))
    return x, {"iterations": it, "residual": res, "converged": converged, "method": "cg"}
