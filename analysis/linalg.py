"""The math of the LoRA paper's analysis (Hu et al. 2021, arXiv 2106.09685, Section 7, App. H).

Pure functions on tensors, no I/O. Conventions:

- W and dW are ``d_out x d_in`` as in `nn.Linear`; LoRA's A is ``r x d_in`` and B is
  ``d_out x r``, so ``dW = (alpha / r) * B @ A``.
- ``M = U diag(S) Vh`` is the thin SVD, S descending. The *right* singular vectors of M are
  the rows of Vh (they live in R^d_in), the *left* ones the columns of U (R^d_out). A *basis*
  is returned as orthonormal columns, ``(d, k)``, ordered by singular value: the paper's
  U^i, "the columns of U corresponding to the top-i singular vectors".
- Precision: SVDs run in float64 on CPU. On CUDA they run in float32 unless the input is
  float64 (about 1e-6 absolute error on phi, far below what a figure or table shows).
- Singular vectors of repeated singular values, or beyond a matrix's rank, are not unique,
  so phi of cells that split such a group depends on the solver. Cells that take whole groups
  (e.g. ``i = j = rank``) are well defined.
- Every function that decomposes a matrix also takes its `SVD` (from `svd` or
  `svd_of_product`), so a command decomposes each matrix once and reuses it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lora_repro.errors import UserError

SIDES = ("right", "left")


class SVD(NamedTuple):
    """Thin SVD ``M = U @ diag(S) @ Vh``: U (d_out, k), S (k,) descending, Vh (k, d_in)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The (d_out, d_in) shape of the decomposed matrix."""
        return self.U.shape[0], self.Vh.shape[1]


Matrix = Tensor | SVD


# ---------------------------------------------------------------- decompositions and bases


def _work_dtype(M: Tensor) -> torch.dtype:
    """float64 on CPU (or for float64 input), float32 on an accelerator."""
    if M.dtype == torch.float64 or M.device.type == "cpu":
        return torch.float64
    return torch.float32


def _check_matrix(M: Tensor, name: str) -> None:
    if not isinstance(M, Tensor) or M.ndim != 2 or not M.is_floating_point() or M.numel() == 0:
        what = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise UserError(f"{name}: expected a non-empty 2-D float tensor, got {what}")
    if not torch.isfinite(M).all():
        raise UserError(f"{name} has NaN or inf entries; only finite matrices can be analysed")


def _check_count(k: int, n: int, what: str, of: str = "") -> int:
    """`k` as an int in 1..n, else a UserError naming `what` (and `of`, what n counts)."""
    of = f" ({of})" if of else ""
    try:
        k = operator.index(k)
    except TypeError:
        raise UserError(f"{what}={k!r}: expected an integer in 1..{n}{of}") from None
    if not 1 <= k <= n:
        raise UserError(f"{what}={k} is out of range: allowed 1..{n}{of}")
    return k


def svd(M: Tensor, name: str = "M") -> SVD:
    """Thin SVD of a finite matrix M (d_out, d_in), in the working precision (module doc)."""
    _check_matrix(M, name)
    U, S, Vh = torch.linalg.svd(M.to(_work_dtype(M)), full_matrices=False)
    return SVD(U, S, Vh)


def svd_of_product(B: Tensor, A: Tensor) -> SVD:
    """Exact thin SVD of ``dW = B @ A`` (d_out, d_in) from LoRA's factors, never forming dW.

    B (d_out, r), A (r, d_in); the result has k = min(r, d_out, d_in) singular triplets.
    Costs O((d_out + d_in) r^2) instead of O(d_out d_in min(d_out, d_in)). Written by hand
    because `torch.svd_lowrank` is randomized: with ``B = Qb Rb`` and ``A^T = Qa Ra``,
    ``B A = Qb (Rb Ra^T) Qa^T`` and the small core's SVD ``u s vh`` gives U = Qb u, Vh = vh Qa^T.
    Scale B (or A) by alpha / r first where the norm of dW matters.
    """
    _check_matrix(B, "B")
    _check_matrix(A, "A")
    if B.shape[1] != A.shape[0]:
        raise UserError(f"B {tuple(B.shape)}, A {tuple(A.shape)}: B's columns must equal A's rows")
    dtype = _work_dtype(B)
    Qb, Rb = torch.linalg.qr(B.to(dtype))  # (d_out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return SVD(Qb @ u, s, vh @ Qa.T)


def _as_svd(M: Matrix, name: str) -> SVD:
    return M if isinstance(M, SVD) else svd(M, name)


def singular_basis(M: Matrix, k: int | None = None, side: str = "right", name: str = "M") -> Tensor:
    """The top-k singular vectors of M (d_out, d_in) as orthonormal columns.

    side="right": ``Vh[:k].T``, shape (d_in, k); side="left": ``U[:, :k]``, shape (d_out, k).
    k defaults to all min(d_out, d_in) of them.
    """
    if side not in SIDES:
        raise UserError(f"side={side!r}: allowed 'right' (rows of Vh) or 'left' (columns of U)")
    s = _as_svd(M, name)
    n = s.S.shape[0]
    k = n if k is None else _check_count(k, n, "k", f"{name} has {n} singular vectors")
    return s.Vh[:k].T if side == "right" else s.U[:, :k]


# ---------------------------------------------------------------- subspace similarity (Eq. 4)


def basis_similarity_grid(U1: Tensor, U2: Tensor) -> Tensor:
    """Eq. 4 for every (i, j) at once, on orthonormal bases ordered by importance.

    U1 (d, k1), U2 (d, k2). Returns phi (k1, k2) with
    ``phi[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)``, in [0, 1].
    With G = U1^T U2 (k1, k2), the squared norm is the sum of G**2 over a <= i, b <= j:
    a cumulative sum over both axes, so the whole grid costs one (k1 x d) @ (d x k2) product.
    """
    if U1.shape[0] != U2.shape[0]:
        raise UserError(f"bases live in different spaces: R^{U1.shape[0]} vs R^{U2.shape[0]}")
    energy = (U1.T @ U2).square().cumsum(0).cumsum(1)  # (k1, k2)
    i = torch.arange(1, U1.shape[1] + 1, device=energy.device, dtype=energy.dtype)
    j = torch.arange(1, U2.shape[1] + 1, device=energy.device, dtype=energy.dtype)
    return energy / torch.minimum(i[:, None], j[None, :])


def delta_similarity_grid(
    M1: Matrix, M2: Matrix, k1: int | None = None, k2: int | None = None, side: str = "right"
) -> Tensor:
    """phi(M1, M2, i, j) for i <= k1, j <= k2 on the top singular directions of two matrices.

    M1, M2: (d_out, d_in) matrices (e.g. two dW, or W and dW as in Appendix H.3) or their SVDs;
    side picks right (R^d_in) or left (R^d_out) singular vectors. Returns (k1, k2).
    """
    U1 = singular_basis(M1, k1, side, "M1")
    U2 = singular_basis(M2, k2, side, "M2")
    return basis_similarity_grid(U1, U2)


def subspace_similarity_grid(A1: Matrix, A2: Matrix) -> Tensor:
    """Eq. 4, phi(A1, A2, i, j) for all i, j: Section 7.2, Figures 3, 4, 6 and 7.

    A1 (r1, d_in), A2 (r2, d_in): LoRA A matrices; U_A are their right-singular vectors.
    Returns (r1, r2) (at most min(r, d_in) per axis); ``grid[i-1, j-1] = phi(A1, A2, i, j)``.
    """
    return delta_similarity_grid(A1, A2, side="right")


def subspace_similarity_grid_left(B1: Matrix, B2: Matrix) -> Tensor:
    """Eq. 4 on the left-singular vectors of B1 (d_out, r1) and B2 (d_out, r2): footnote 7.

    Returns (r1, r2).
    """
    return delta_similarity_grid(B1, B2, side="left")


def subspace_similarity(A1: Matrix, A2: Matrix, i: int, j: int) -> float:
    """Eq. 4: ``phi(A1, A2, i, j) = ||U1^i^T U2^j||_F^2 / min(i, j)`` in [0, 1] (Section 7.2).

    A1 (r1, d_in), A2 (r2, d_in); U1^i (d_in, i) holds A1's top-i right-singular vectors and
    U2^j (d_in, j) A2's top-j. i in 1..r1, j in 1..r2.
    """
    U1 = singular_basis(A1, name="A1")
    U2 = singular_basis(A2, name="A2")
    if U1.shape[0] != U2.shape[0]:
        raise UserError(f"A1 and A2 must share d_in: got {U1.shape[0]} and {U2.shape[0]}")
    i = _check_count(i, U1.shape[1], "i", f"A1 has {U1.shape[1]} right-singular vectors")
    j = _check_count(j, U2.shape[1], "j", f"A2 has {U2.shape[1]} right-singular vectors")
    return float((U1[:, :i].T @ U2[:, :j]).square().sum() / min(i, j))


def top_singular_similarity(
    W: Matrix, dW: Matrix, ks: Sequence[int], j: int, side: str = "right"
) -> Tensor:
    """phi(W, dW, k, j) for each k in ks: how much of dW's top-j directions lies in W's top-k.

    Appendix H.3, Figure 8. W, dW: (d_out, d_in) or their SVDs; j is usually the LoRA rank r
    (all of dW's directions). Returns (len(ks),). Random baseline: max(k, j) / d
    (`expected_random_similarity_grid`), d = d_in for side="right", d_out for "left".
    """
    if len(ks) == 0:
        raise UserError("ks is empty: give at least one number of W's top singular directions")
    U_W = singular_basis(W, side=side, name="W")
    ks = [_check_count(k, U_W.shape[1], "k", f"W has {U_W.shape[1]} singular vectors")
          for k in ks]
    U_dW = singular_basis(dW, j, side, "dW")
    column = basis_similarity_grid(U_W[:, : max(ks)], U_dW)[:, -1]
    return column[torch.tensor([k - 1 for k in ks], device=column.device)]


# ---------------------------------------------------------------- projections (Section 7.3)


def projection_norm(W: Tensor, M: Matrix, r: int) -> float:
    """``||U^T W V^T||_F``: W projected on M's top-r singular directions (Section 7.3, Table 7).

    W (d_out, d_in); M (d_out, d_in) or its SVD. U (d_out, r) holds M's top-r left-singular
    vectors and V (r, d_in) its top-r right-singular vectors as rows, so V^T is (d_in, r) and
    ``U^T W V^T`` is (r, r). Equals ``||U U^T W V^T V||_F``, the norm of W's projection.
    Use r <= rank(M): singular vectors beyond the rank are arbitrary (`svd_of_product` of
    LoRA's factors returns only the r that exist).
    """
    _check_matrix(W, "W")
    s = _as_svd(M, "M")
    if tuple(W.shape) != s.shape:
        raise UserError(f"W {tuple(W.shape)} and M {s.shape} must have the same shape")
    r = _check_count(r, s.S.shape[0], "r", f"M has {s.S.shape[0]} singular vectors")
    U, Vh = s.U[:, :r], s.Vh[:r]
    return float(torch.linalg.matrix_norm(U.T @ W.to(U) @ Vh.T))


def amplification_factor(W: Tensor, dW: Matrix, r: int) -> float:
    """``||dW||_F / ||U^T W V^T||_F`` with U, V dW's top-r directions (Appendix H.4).

    W, dW (d_out, d_in); dW may be its SVD (then ||dW||_F is the norm of its singular
    values). The paper: 6.91 / 0.32 = 21.5 for r = 4 in GPT-3's 48th layer (Table 7).
    Returns inf if W has no component in those directions.
    """
    s = _as_svd(dW, "dW")
    return _ratio(float(torch.linalg.vector_norm(s.S)), projection_norm(W, s, r))


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.inf


def projection_norms(
    W: Tensor, dW: Matrix, r: int, generator: torch.Generator | None = None,
    W_svd: SVD | None = None,
) -> dict[str, float]:
    """One column of Table 7: ``||U^T W V^T||_F`` for U, V the top-r directions of dW, of W
    and of a random matrix, with ||W||_F, ||dW||_F and the amplification factor.

    W, dW (d_out, d_in); pass ``W_svd = svd(W)`` to reuse W's decomposition across ranks.
    Keys: "dW", "W", "random", "norm_W", "norm_dW", "amplification".
    """
    s = _as_svd(dW, "dW")
    on_dW = projection_norm(W, s, r)
    norm_dW = float(torch.linalg.vector_norm(s.S))
    return {
        "dW": on_dW,
        "W": projection_norm(W, W_svd if W_svd is not None else svd(W, "W"), r),
        "random": random_projection_norm(W, r, generator),
        "norm_W": float(torch.linalg.matrix_norm(W.to(s.S))),
        "norm_dW": norm_dW,
        "amplification": _ratio(norm_dW, on_dW),
    }


# ---------------------------------------------------------------- random baselines


def _draw(
    shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor | None = None
) -> Tensor:
    """A standard Gaussian float64 draw on `generator`'s device, moved to `like`'s if given."""
    device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    return x if like is None else x.to(like)


def random_subspace_similarity_grid(
    r1: int, r2: int, d_in: int, generator: torch.Generator | None = None
) -> Tensor:
    """Eq. 4 between two standard Gaussian matrices of shapes (r1, d_in) and (r2, d_in).

    The "random Gaussian" panel of Figure 4. Returns (r1, r2) float64 on the generator's
    device; its expectation is `expected_random_similarity_grid(r1, r2, d_in)`.
    """
    for what, n in (("r1", r1), ("r2", r2)):
        _check_count(n, d_in, what, f"d_in={d_in}")
    return subspace_similarity_grid(_draw((r1, d_in), generator), _draw((r2, d_in), generator))


def expected_random_similarity_grid(k1: int, k2: int, d: int) -> Tensor:
    """E phi(i, j) = max(i, j) / d for independent uniformly random subspaces of R^d.

    If Q (d, j) is a uniformly random orthonormal basis, E[Q Q^T] = (j / d) I, so for any
    orthonormal P (d, i): ``E ||P^T Q||_F^2 = tr(P^T E[Q Q^T] P) = i j / d``, and dividing by
    min(i, j) gives max(i, j) / d. Returns (k1, k2) float64.
    """
    i = torch.arange(1, k1 + 1, dtype=torch.float64)
    j = torch.arange(1, k2 + 1, dtype=torch.float64)
    return torch.maximum(i[:, None], j[None, :]) / d


def _random_basis(d: int, k: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """A uniformly random orthonormal basis (d, k): Q of the QR of a Gaussian (d, k)."""
    Q, _ = torch.linalg.qr(_draw((d, k), generator, like))
    return Q


def random_projection_norm(W: Tensor, r: int, generator: torch.Generator | None = None) -> float:
    """``||U^T W V^T||_F`` for a random matrix's top-r directions: the "Random" row of Table 7.

    W (d_out, d_in). The top-r left and right singular subspaces of a Gaussian matrix are
    independent and uniformly distributed, so they are drawn directly as QR bases of Gaussian
    (d_out, r) and (d_in, r) matrices: the same distribution without a d_out x d_in SVD.
    E[norm^2] = r^2 ||W||_F^2 / (d_out d_in) (Table 7: 0.02 and 0.33 for r = 4, 64).
    """
    _check_matrix(W, "W")
    r = _check_count(r, min(W.shape), "r", f"W is {tuple(W.shape)}")
    W = W.to(_work_dtype(W))
    U = _random_basis(W.shape[0], r, generator, W)  # (d_out, r)
    V = _random_basis(W.shape[1], r, generator, W)  # (d_in, r)
    return float(torch.linalg.matrix_norm(U.T @ W @ V))


# ---------------------------------------------------------------- effective rank


def effective_rank(M: Matrix, method: str = "entropy", energy: float = 0.9) -> float:
    """The effective rank of M, to compare full fine-tuning's dW with LoRA's.

    M: a matrix (d_out, d_in), its `SVD`, or its singular values (k,) (compute them once
    with `torch.linalg.svdvals` to get both methods from one decomposition).
    method="entropy": Roy & Vetterli (2007), ``exp(H(p))`` with ``p = S / sum(S)`` (singular
    values normalized to sum 1, 0 log 0 = 0); real-valued, between 1 and rank(M).
    method="energy": the smallest k whose top-k singular values hold `energy` of
    ``||M||_F^2 = sum(S^2)`` (0.9: 90%). Both return 0.0 for the zero matrix.
    """
    if method not in ("entropy", "energy"):
        raise UserError(f"method={method!r}: allowed 'entropy' (Roy & Vetterli) or 'energy'")
    if not 0.0 < energy <= 1.0:
        raise UserError(f"energy={energy}: allowed a fraction in (0, 1]")
    S = _singular_values(M)
    if not S.any():
        return 0.0
    if method == "entropy":
        p = S[S > 0] / S.sum()
        return float(torch.exp(-(p * p.log()).sum()))
    held = S.square().cumsum(0) / S.square().sum()
    # Tolerance: 9 equal values out of 10 hold 0.9 of the energy, up to rounding.
    return float(int((held < energy - 1e-12).sum()) + 1)


def _singular_values(M: Matrix) -> Tensor:
    """Singular values (k,) of a matrix, an `SVD`, or already singular values (sorted)."""
    if isinstance(M, SVD):
        return M.S
    if isinstance(M, Tensor) and M.ndim == 1:
        if M.is_floating_point() and (M >= 0).all() and torch.isfinite(M).all():
            return M.to(_work_dtype(M)).sort(descending=True).values
        raise UserError("singular values must be finite and non-negative")
    _check_matrix(M, "M")
    return torch.linalg.svdvals(M.to(_work_dtype(M)))
