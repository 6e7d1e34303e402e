"""Comparing metrics: the "Fisher versus L²" study.

Named measurements of how two curvature operators (``L2Metric``, ``Fisher``,
``EmpiricalFisher`` of :mod:`fsgeom.curvature`, or dense symmetric matrices) differ:

* :func:`principal_angles` / :func:`eigenspace_overlap` — do their top-k eigenspaces agree?
* :func:`preconditioned_directions` / :func:`direction_alignment` — do G⁻¹g, F⁻¹g, E⁻¹g
  and g point the same way?
* :func:`quadratic_form_ratio` — how differently do they measure the same directions
  (vᵀAv / vᵀBv over random and gradient directions)?
* :func:`condition_number` / :func:`effective_rank` — how ill-conditioned and how
  low-rank is each?

Operators are used matrix-free (``spectrum``, ``solve``, products); a dense ``(P, P)``
tensor is accepted wherever an operator is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from .curvature import CurvatureOperator, solve, spectrum
from .functional import flatten

__all__ = [
    "condition_number",
    "direction_alignment",
    "effective_rank",
    "eigenspace_overlap",
    "preconditioned_directions",
    "principal_angles",
    "quadratic_form_ratio",
    "random_directions",
]

Operator = CurvatureOperator | Tensor


def _check_matrix(a: Tensor, name: str) -> Tensor:
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square matrix (P, P), got shape {tuple(a.shape)}")
    return a


def _size(a: Operator, name: str) -> int:
    if isinstance(a, CurvatureOperator):
        return a.num_params
    if isinstance(a, Tensor):
        return _check_matrix(a, name).shape[0]
    raise TypeError(f"{name} must be a CurvatureOperator or a dense (P, P) tensor, got {type(a)}")


def _top_eigvecs(a: Operator | Tensor, k: int, name: str, **kw) -> Tensor:
    """Orthonormal top-k eigenvectors (P, k) of an operator or a dense (P, P) matrix."""
    if isinstance(a, CurvatureOperator):
        return spectrum(a, k, **kw)[1].double()
    if isinstance(a, Tensor) and a.dim() == 2 and a.shape[0] == a.shape[1]:
        _, vecs = torch.linalg.eigh(((a + a.T) / 2).double())
        return vecs.flip(1)[:, :k]
    raise TypeError(f"{name} must be a CurvatureOperator or a dense (P, P) matrix, got {type(a)}")


def _mv(a: Operator, v: Tensor) -> Tensor:
    if isinstance(a, CurvatureOperator):
        return flatten(a._apply(a._as_params(v)[0]))
    return a.to(v.dtype) @ v


def principal_angles(a: Operator, b: Operator, k: int = 10, **spectrum_kw) -> Tensor:
    """Principal angles (radians, ascending, shape ``(k,)``) between the top-k eigenspaces
    of ``a`` and ``b``.

    With orthonormal bases U_a, U_b (P×k), the cosines of the angles are the singular
    values of U_aᵀ U_b. 0 means a shared direction, π/2 an orthogonal one. Extra keyword
    arguments go to :func:`fsgeom.curvature.spectrum` (e.g. ``method``, ``tol``).
    """
    if _size(a, "a") != _size(b, "b"):
        raise ValueError(f"a and b act on different sizes: {_size(a, 'a')} vs {_size(b, 'b')}")
    ua, ub = _top_eigvecs(a, k, "a", **spectrum_kw), _top_eigvecs(b, k, "b", **spectrum_kw)
    cos = torch.linalg.svdvals(ua.T @ ub).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def eigenspace_overlap(a: Operator, b: Operator, k: int = 10, **spectrum_kw) -> float:
    """Overlap of the top-k eigenspaces, ‖U_aᵀ U_b‖_F² / k = mean cos² of the principal
    angles: 1 for identical subspaces, k/P expected for random ones, 0 for orthogonal."""
    angles = principal_angles(a, b, k, **spectrum_kw)
    return float(torch.cos(angles).square().mean())


def preconditioned_directions(
    g: Tensor | Mapping[str, Tensor],
    operators: Mapping[str, CurvatureOperator],
    damping: float = 1e-3,
    **solve_kw,
) -> dict[str, Tensor]:
    """The directions A⁻¹g for each named operator, plus ``"g"`` itself.

    ``g``: a gradient (flat ``(P,)`` or parameter dict). Each direction is
    :func:`fsgeom.curvature.solve` (A + δI) x = g with ``damping`` δ (the damping keeps
    singular metrics well-posed). Returns flat ``(P,)`` tensors, e.g.
    ``{"g": g, "L2": G⁻¹g, "Fisher": F⁻¹g, "EmpiricalFisher": E⁻¹g}``.
    """
    if not operators:
        raise ValueError("operators must name at least one operator")
    first = next(iter(operators.values()))
    gflat = flatten(first._as_params(g, "g")[0])
    out = {"g": gflat}
    for name, op in operators.items():
        if name == "g":
            raise ValueError("the name 'g' is reserved for the unpreconditioned gradient")
        out[name] = solve(op, gflat, damping, **solve_kw)
    return out


def direction_alignment(directions: Mapping[str, Tensor]) -> xr.DataArray:
    """Cosine similarity cos(u, v) = uᵀv / (‖u‖‖v‖) between every pair of directions.

    Returns a symmetric ``xarray.DataArray`` with dims ``("a", "b")`` labelled by the
    directions' names (ones on the diagonal), ready for a seaborn heatmap.
    """
    names = list(directions)
    if not names:
        raise ValueError("directions is empty")
    vecs = []
    for n in names:
        v = directions[n]
        v = flatten(v) if isinstance(v, Mapping) else v
        if v.dim() != 1:
            raise ValueError(f"direction {n!r} must be a flat vector, got shape {tuple(v.shape)}")
        vecs.append(v.double())
    sizes = {v.numel() for v in vecs}
    if len(sizes) > 1:
        raise ValueError(f"directions have different lengths: {sorted(sizes)}")
    mat = torch.stack(vecs)
    unit = mat / torch.linalg.vector_norm(mat, dim=1, keepdim=True).clamp_min(1e-300)
    cos = (unit @ unit.T).clamp(-1.0, 1.0).numpy()
    return xr.DataArray(
        cos, dims=("a", "b"), coords={"a": names, "b": names}, name="cosine_similarity"
    )


def random_directions(num_params: int, n: int = 10, seed: int = 0) -> Tensor:
    """``n`` random unit directions (P, n), Gaussian then normalized, from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(int(num_params), int(n), generator=gen, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v, dim=0, keepdim=True)


def quadratic_form_ratio(a: Operator, b: Operator, directions: Tensor | Sequence[Tensor]) -> Tensor:
    """vᵀAv / vᵀBv for each direction v (columns of a ``(P, n)`` matrix, a flat vector,
    or a sequence of flat vectors). Returns ``(n,)`` float64; ``inf`` where vᵀBv = 0.

    A ratio far from constant across directions means the two metrics disagree on which
    directions are long; compare random directions (:func:`random_directions`) with
    gradient directions.
    """
    p = _size(a, "a")
    if _size(b, "b") != p:
        raise ValueError(f"a and b act on different sizes: {p} vs {_size(b, 'b')}")
    if isinstance(directions, Tensor):
        cols = [directions] if directions.dim() == 1 else list(directions.T)
    else:
        cols = [flatten(d) if isinstance(d, Mapping) else d for d in directions]
    out = []
    for i, v in enumerate(cols):
        if v.dim() != 1 or v.numel() != p:
            raise ValueError(
                f"direction {i} must be a flat vector of {p} elements, got shape {tuple(v.shape)}"
            )
        vv = v.to(a.dtype)
        qa = float(vv.double() @ _mv(a, vv).double())
        qb = float(vv.double() @ _mv(b, vv).double())
        out.append(qa / qb if qb != 0 else math.inf)
    return torch.tensor(out, dtype=torch.float64)


def _eigenvalues(a: Operator | Tensor) -> Tensor:
    if isinstance(a, CurvatureOperator):
        return torch.linalg.eigvalsh(a.to_dense().double())
    if a.dim() == 1:
        return a.double()
    return torch.linalg.eigvalsh(((_check_matrix(a, "a") + a.T) / 2).double())


def condition_number(a: Operator | Tensor, rtol: float | None = None) -> float:
    """κ = λ_max / λ_min of a PSD operator, dense matrix, or vector of eigenvalues.

    With ``rtol`` the smallest eigenvalue is taken over the numerically nonzero spectrum
    (λ > rtol·λ_max): the conditioning on the metric's range. Without it, a singular
    metric (P > N·C without damping) gives ``inf``. Operators go through
    :meth:`~fsgeom.curvature.CurvatureOperator.to_dense` (small networks).
    """
    lam = _eigenvalues(a)
    lmax = float(lam.max())
    if lmax <= 0:
        return math.inf
    if rtol is not None:
        lam = lam[lam > rtol * lmax]
    lmin = float(lam.min())
    return lmax / lmin if lmin > 0 else math.inf


def effective_rank(a: Operator | Tensor, kind: str = "entropy") -> float:
    """Effective rank of a PSD operator, dense matrix or vector of eigenvalues.

    ``"entropy"`` (Roy & Vetterli, 2007): exp(−Σ p_j log p_j), p_j = λ_j / Σ λ;
    ``"participation"``: (Σ λ_j)² / Σ λ_j². Both equal r for r equal nonzero
    eigenvalues; negative round-off eigenvalues are clipped to 0.
    """
    if kind not in ("entropy", "participation"):
        raise ValueError(f"kind must be 'entropy' or 'participation', got {kind!r}")
    lam = _eigenvalues(a).clamp_min(0)
    total = float(lam.sum())
    if total <= 0:
        return 0.0
    if kind == "participation":
        return total**2 / float(lam.square().sum())
    pj = lam[lam > 0] / total
    return float(np.exp(-(pj * pj.log()).sum().item()))
