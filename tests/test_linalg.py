"""Properties of the analysis math (`analysis.linalg`): Eq. 4, Table 7, Appendix H."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import linalg as L
from lora_repro.errors import UserError

TOL = 1e-9
few = settings(max_examples=25, deadline=None, database=None)  # no .hypothesis/ folder


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(d, seed=0):
    """A random (d, d) orthogonal matrix."""
    Q, _ = torch.linalg.qr(gaussian(d, d, seed=seed))
    return Q


shapes = st.tuples(
    st.integers(1, 8), st.integers(1, 8), st.integers(16, 40), st.integers(0, 2**31 - 1)
)


@st.composite
def pairs(draw):
    """Two Gaussian A matrices, (r1, d) and (r2, d)."""
    r1, r2, d, seed = draw(shapes)
    return gaussian(r1, d, seed=seed), gaussian(r2, d, seed=seed + 1)


# ---------------------------------------------------------------- Eq. 4


@few
@given(pairs())
def test_phi_is_in_unit_interval_and_grid_is_symmetric(pair):
    A1, A2 = pair
    grid = L.subspace_similarity_grid(A1, A2)
    assert grid.shape == (A1.shape[0], A2.shape[0])
    assert grid.min() >= -TOL and grid.max() <= 1 + TOL
    torch.testing.assert_close(L.subspace_similarity_grid(A2, A1), grid.T, rtol=0, atol=TOL)


@few
@given(pairs())
def test_grid_equals_the_per_cell_definition(pair):
    A1, A2 = pair
    grid = L.subspace_similarity_grid(A1, A2)
    for i in range(1, A1.shape[0] + 1):
        for j in range(1, A2.shape[0] + 1):
            cell = L.subspace_similarity(A1, A2, i, j)
            assert cell == pytest.approx(grid[i - 1, j - 1].item(), abs=TOL)
            assert cell == pytest.approx(L.subspace_similarity(A2, A1, j, i), abs=TOL)


@few
@given(shapes)
def test_a_matrix_is_fully_similar_to_itself_and_to_row_rotations(shape):
    r, _, d, seed = shape
    A = gaussian(r, d, seed=seed)
    # Rotating the rows (Q A, Q orthogonal) keeps A's right-singular vectors: A = U S Vh,
    # Q A = (Q U) S Vh. So every diagonal cell is 1, not only i = j = r.
    QA = orthogonal(r, seed=seed + 1) @ A
    for i in range(1, r + 1):
        assert L.subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=TOL)
        assert L.subspace_similarity(A, QA, i, i) == pytest.approx(1.0, abs=1e-7)


@few
@given(shapes)
def test_mixing_rows_keeps_the_whole_row_space(shape):
    r, _, d, seed = shape
    A = gaussian(r, d, seed=seed)
    # M invertible (condition number <= e^2): M A has A's row space but other singular
    # vectors, so only cells that take all r directions on one side are identities.
    spread = torch.diag(torch.linspace(-1, 1, r, dtype=torch.float64).exp())
    M = orthogonal(r, seed + 1) @ spread @ orthogonal(r, 7)
    grid = L.subspace_similarity_grid(A, M @ A)
    torch.testing.assert_close(grid[-1, :], torch.ones(r, dtype=grid.dtype), rtol=0, atol=1e-7)
    torch.testing.assert_close(grid[:, -1], torch.ones(r, dtype=grid.dtype), rtol=0, atol=1e-7)


@few
@given(shapes)
def test_orthogonal_row_spaces_have_zero_similarity(shape):
    r1, r2, d, seed = shape
    Q = orthogonal(d, seed)  # rows r1.. of Q are orthogonal to rows ..r1
    A1 = gaussian(r1, r1, seed=seed + 1) @ Q[:r1]
    A2 = gaussian(r2, r2, seed=seed + 2) @ Q[r1 : r1 + r2]
    assert L.subspace_similarity_grid(A1, A2).abs().max() < 1e-12


def test_left_grid_is_the_right_grid_of_the_transposes():
    B1, B2 = gaussian(50, 4, seed=1), gaussian(50, 6, seed=2)
    torch.testing.assert_close(
        L.subspace_similarity_grid_left(B1, B2), L.subspace_similarity_grid(B1.T, B2.T)
    )


def test_delta_grid_of_products_with_orthonormal_b_equals_the_a_grid():
    A1, A2 = gaussian(4, 30, seed=1), gaussian(6, 30, seed=2)
    B1, B2 = orthogonal(20, 3)[:, :4], orthogonal(20, 4)[:, :6]  # orthonormal columns
    grid = L.delta_similarity_grid(B1 @ A1, B2 @ A2, 4, 6, side="right")
    torch.testing.assert_close(grid, L.subspace_similarity_grid(A1, A2), rtol=0, atol=1e-8)
    # The left side of dW = B A is B's column space.
    left = L.delta_similarity_grid(B1 @ A1, B2 @ A2, 4, 6, side="left")
    assert left[-1, -1].item() == pytest.approx(L.subspace_similarity_grid_left(B1, B2)[-1, -1])


def test_svd_of_product_matches_a_dense_svd():
    B, A = gaussian(40, 5, seed=1), gaussian(5, 30, seed=2)
    fast, dense = L.svd_of_product(B, A), L.svd(B @ A)
    torch.testing.assert_close(fast.S, dense.S[:5])
    torch.testing.assert_close(fast.U @ torch.diag(fast.S) @ fast.Vh, B @ A)
    grid = L.delta_similarity_grid(fast, dense, 5, 5)
    torch.testing.assert_close(grid.diagonal(), torch.ones(5, dtype=grid.dtype))


def test_random_grid_mean_matches_max_i_j_over_d():
    g = torch.Generator().manual_seed(0)
    d, trials = 1024, 100
    mean = sum(L.random_subspace_similarity_grid(8, 64, d, g) for _ in range(trials)) / trials
    expected = L.expected_random_similarity_grid(8, 64, d)
    # A cell's relative std is about sqrt(2 / (i j trials)): test the cells where 4.5 sigma
    # < 10% (the worst of ~400 cells over seeds 0-9 was 4.6%).
    i, j = torch.meshgrid(torch.arange(1, 9), torch.arange(1, 65), indexing="ij")
    tested = i * j * trials >= 4000
    assert tested.sum() == 410
    rel = ((mean - expected).abs() / expected)[tested]
    assert rel.max() < 0.1


# ---------------------------------------------------------------- Section 7.3, Appendix H


def hand_built(d_out=40, d_in=30):
    """W = U diag(s) V^T with known s, and dW along W's 5th..8th singular directions."""
    U, V = orthogonal(d_out, 1)[:, :d_in], orthogonal(d_in, 2)
    s = torch.linspace(30, 1, d_in, dtype=torch.float64)  # distinct, descending
    t = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    W = U @ torch.diag(s) @ V.T
    dW = U[:, 4:8] @ torch.diag(t) @ V[:, 4:8].T
    return W, dW, s, t


def test_projection_norm_on_known_directions():
    W, dW, s, t = hand_built()
    assert L.projection_norm(W, dW, 4) == pytest.approx(s[4:8].norm().item())
    assert L.projection_norm(W, dW, 2) == pytest.approx(s[4:6].norm().item())
    assert L.projection_norm(W, W, 3) == pytest.approx(s[:3].norm().item())
    factor = t.norm().item() / s[4:8].norm().item()
    assert L.amplification_factor(W, dW, 4) == pytest.approx(factor)
    assert L.amplification_factor(W, L.svd(dW), 4) == pytest.approx(factor)
    # W's column space is the first 30 of orthogonal(40, 1)'s columns; a dW outside it:
    outside = orthogonal(40, 1)[:, 35:36] @ orthogonal(30, 2)[:, :1].T
    assert L.amplification_factor(W, outside, 1) > 1e12
    assert L.amplification_factor(torch.zeros_like(W), dW, 4) == math.inf


def test_projection_norms_is_a_column_of_table_7():
    W, dW, s, t = hand_built()
    column = L.projection_norms(W, dW, 4, torch.Generator().manual_seed(0))
    assert column["dW"] == pytest.approx(s[4:8].norm().item())
    assert column["W"] == pytest.approx(s[:4].norm().item())
    assert column["norm_W"] == pytest.approx(s.norm().item())
    assert column["norm_dW"] == pytest.approx(t.norm().item())
    assert column["amplification"] == pytest.approx(column["norm_dW"] / column["dW"])
    assert 0 < column["random"] < column["W"]


def test_random_projection_norm_mean_square():
    W = gaussian(64, 48, seed=3) @ torch.diag(torch.linspace(2, 0.1, 48, dtype=torch.float64))
    g, r, trials = torch.Generator().manual_seed(0), 4, 400
    mean_sq = sum(L.random_projection_norm(W, r, g) ** 2 for _ in range(trials)) / trials
    expected = r**2 * W.square().sum().item() / (64 * 48)
    assert mean_sq == pytest.approx(expected, rel=0.1)


def test_top_singular_similarity_counts_shared_directions():
    W, dW, _, _ = hand_built()
    ks = [1, 4, 5, 6, 7, 8, 20, 30]
    phi = L.top_singular_similarity(W, dW, ks, 4)
    expected = [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]  # |{5..8} within top-k| / 4
    torch.testing.assert_close(phi, torch.tensor(expected, dtype=phi.dtype), rtol=0, atol=1e-9)
    left = L.top_singular_similarity(L.svd(W), L.svd(dW), ks, 4, side="left")
    torch.testing.assert_close(left, phi, rtol=0, atol=1e-9)


def test_effective_rank():
    flat = torch.diag(torch.tensor([1.0] * 10 + [0.0] * 6))
    assert L.effective_rank(flat) == pytest.approx(10.0)
    assert L.effective_rank(flat, "energy") == 9.0
    assert L.effective_rank(flat, "energy", energy=1.0) == 10.0
    one = gaussian(12, 1, seed=1) @ gaussian(1, 9, seed=2)
    assert L.effective_rank(5 * one) == pytest.approx(1.0, abs=1e-6)
    assert L.effective_rank(one, "energy") == 1.0
    skewed = torch.diag(torch.tensor([3.0, 1.0]))  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert L.effective_rank(skewed) == pytest.approx(math.exp(entropy))
    assert L.effective_rank(torch.zeros(3, 3)) == 0.0
    values = torch.tensor([1.0, 3.0])  # singular values in any order
    assert L.effective_rank(values) == pytest.approx(L.effective_rank(skewed))
    assert L.effective_rank(L.svd(skewed), "energy") == 1.0  # 9 / 10 of the energy


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda A: L.subspace_similarity(A, A, 0, 1),
        lambda A: L.subspace_similarity(A, A, 1, 5),
        lambda A: L.subspace_similarity(A, A, 1.5, 1),
        lambda A: L.subspace_similarity(A, gaussian(4, 9), 1, 1),
        lambda A: L.subspace_similarity_grid(A, A.clone().fill_(float("nan"))),
        lambda A: L.subspace_similarity_grid(A[0], A),
        lambda A: L.delta_similarity_grid(A, A, side="up"),
        lambda A: L.projection_norm(A, A.T, 1),
        lambda A: L.effective_rank(A, "rank"),
        lambda A: L.effective_rank(-A[0]),
        lambda A: L.top_singular_similarity(A, A, [0, 2], 1),
    ],
)
def test_bad_arguments_raise_one_line_user_errors(call):
    with pytest.raises(UserError) as info:
        call(gaussian(4, 10))
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_cuda_grid_matches_cpu_in_float32():
    A1, A2 = gaussian(8, 1024, seed=1), gaussian(64, 1024, seed=2)
    cpu = L.subspace_similarity_grid(A1, A2)
    cuda = L.subspace_similarity_grid(A1.float().cuda(), A2.float().cuda())
    assert cuda.dtype == torch.float32
    torch.testing.assert_close(cuda.cpu().double(), cpu, rtol=0, atol=1e-5)
    fast = L.svd_of_product(gaussian(1024, 8).float().cuda(), A1.float().cuda())
    assert fast.U.is_cuda and L.effective_rank(fast) > 1
