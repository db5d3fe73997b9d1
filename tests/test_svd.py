"""Claims about edgelora.svd: Eckart-Young optimality, energy-based ranks, LoRA rank reduction and initialisers."""

from __future__ import annotations

import math

import pytest
import torch

from edgelora.errors import EdgeloraError
from edgelora.svd import (
    compression_ratio,
    extract_lora_from_delta,
    int8_residual_init,
    pissa_init,
    rank_for_energy,
    reduce_lora_rank,
    truncated_svd,
)

# |measured ||M - BA||_F - predicted| relative to ||M||_F. The prediction is float64; measuring from
# float32 factors perturbs B @ A by a few float32 ulps (eps = 6e-8) per entry, so a relative 1e-5
# leaves ~100x headroom; float64 factors are off by ~1e-15, so 1e-10 is still loose.
FRO_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Randomized SVD (oversample 10, 4 power iterations) on a fast-decaying spectrum: at most 1% above optimal.
RANDOMIZED_REL_TOL = 0.01


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An (m, n) matrix with singular values s (descending, len <= min(m, n)) and random singular vectors."""
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * s.double()) @ V.T).to(dtype)


def fake_quant_int8(W: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8, round to nearest: stands in for the project's shared quantizer."""
    scale = W.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(W / scale), -127, 127) * scale


def fro(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 48), (40, 90)])
@pytest.mark.parametrize("rank", [1, 5, 20])
def test_exact_error_is_eckart_young(dtype, shape, rank):
    M = torch.randn(*shape, generator=gen(1), dtype=torch.float64).to(dtype)
    s = torch.linalg.svdvals(M.double())
    optimal = math.sqrt(float((s[rank:] ** 2).sum()))
    lr = truncated_svd(M, rank=rank, method="exact")
    assert lr.A.shape == (rank, shape[1]) and lr.B.shape == (shape[0], rank)
    assert lr.A.dtype == dtype and lr.B.dtype == dtype
    assert lr.rank == rank
    assert lr.error_fro == pytest.approx(optimal, rel=1e-12)
    assert abs(fro(M - lr.B @ lr.A) - optimal) <= FRO_TOL[dtype] * fro(M)
    assert lr.relative_error == pytest.approx(optimal / fro(M), rel=1e-12)
    assert torch.allclose(lr.singular_values, s, rtol=1e-6)


def test_factors_are_balanced():
    M = torch.randn(50, 30, generator=gen(2), dtype=torch.float64)
    lr = truncated_svd(M, rank=7)
    s = lr.singular_values[:7]
    assert torch.allclose(lr.A @ lr.A.T, torch.diag(s), atol=1e-10)  # sqrt(S) V^T V sqrt(S)
    assert torch.allclose(lr.B.T @ lr.B, torch.diag(s), atol=1e-10)  # sqrt(S) U^T U sqrt(S)


def test_rank_larger_than_matrix_is_clamped():
    M = torch.randn(12, 5, generator=gen(3))
    lr = truncated_svd(M, rank=50)
    assert lr.rank == 5 and lr.A.shape == (5, 5) and lr.B.shape == (12, 5)
    assert lr.energy_kept == pytest.approx(1.0) and lr.error_fro == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_energy_selects_minimal_rank(energy):
    s = torch.tensor([8.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    M = with_spectrum(30, 20, s, seed=4)
    k = rank_for_energy(s, energy)
    assert cum[k - 1] >= energy - 1e-12
    assert k == 1 or cum[k - 2] < energy
    lr = truncated_svd(M, energy=energy)
    assert lr.rank == k
    assert lr.energy_kept == pytest.approx(float(cum[k - 1]), rel=1e-10)


def test_rank_for_energy_examples():
    assert rank_for_energy(torch.tensor([3.0, 1.0]), 0.9) == 1
    assert rank_for_energy(torch.tensor([3.0, 1.0]), 0.91) == 2
    assert rank_for_energy(torch.zeros(4), 0.5) == 1


@pytest.fixture(scope="module")
def big_decaying() -> tuple[torch.Tensor, torch.Tensor]:
    # sigma_i = e^(-i/10); past i = 400 they are below float32 round-off of M, so the matrix stops there.
    s = torch.exp(-torch.arange(400, dtype=torch.float64) / 10.0)
    return with_spectrum(2048, 1536, s, seed=5, dtype=torch.float32), s


def test_randomized_within_one_percent_of_optimal(big_decaying):
    M, s = big_decaying
    rank = 32
    optimal = math.sqrt(float((s[rank:] ** 2).sum()))  # the exact SVD's error, known by construction
    lr = truncated_svd(M, rank=rank)  # auto: min side 1536 > 1024 -> randomized
    assert len(lr.singular_values) == rank + 10  # the sketch, not a full spectrum
    assert lr.error_fro == pytest.approx(fro(M - lr.B @ lr.A), rel=1e-6)  # measured, not inferred
    assert optimal <= lr.error_fro * (1 + 1e-4)
    assert lr.error_fro <= optimal * (1 + RANDOMIZED_REL_TOL)


def test_randomized_energy_uses_exact_total(big_decaying):
    M, s = big_decaying
    k_true = rank_for_energy(s, 0.999)
    lr = truncated_svd(M, energy=0.999, method="randomized")
    assert abs(lr.rank - k_true) <= 1
    assert lr.energy_kept >= 0.999 - 1e-6


def test_randomized_is_seeded_and_leaves_global_rng_alone():
    M = torch.randn(300, 200, generator=gen(6))
    state = torch.get_rng_state()
    a = truncated_svd(M, rank=4, method="randomized", seed=3)
    b = truncated_svd(M, rank=4, method="randomized", seed=3)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert torch.equal(torch.get_rng_state(), state)


def test_extract_recovers_exact_low_rank_delta():
    g = gen(7)
    W = torch.randn(96, 64, generator=g)
    delta = torch.randn(96, 6, generator=g) @ torch.randn(6, 64, generator=g) * 0.1
    lr = extract_lora_from_delta(W, W + delta, rank=6)
    assert fro(lr.B @ lr.A - delta) <= 1e-5 * fro(delta)
    assert extract_lora_from_delta(W, W + delta, energy=1.0).rank == 6  # round-off energy is ~1e-14


def test_reduce_to_same_rank_is_identity():
    g = gen(8)
    A, B = torch.randn(8, 64, generator=g), torch.randn(96, 8, generator=g)
    lr = reduce_lora_rank(A, B, rank=8, scaling=2.0)
    assert lr.rank == 8 and lr.error_fro == pytest.approx(0.0, abs=1e-9)
    assert fro(lr.B @ lr.A - 2.0 * B @ A) <= FRO_TOL[torch.float32] * fro(2.0 * B @ A)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_reduce_matches_truncated_svd_of_product(rank):
    g = gen(9)
    A, B = torch.randn(12, 40, generator=g, dtype=torch.float64), torch.randn(70, 12, generator=g, dtype=torch.float64)
    product = 0.5 * B @ A
    lr = reduce_lora_rank(A, B, rank=rank, scaling=0.5)
    ref = truncated_svd(product, rank=rank, method="exact")
    assert torch.allclose(lr.singular_values, ref.singular_values[:12], rtol=1e-10)
    assert lr.error_fro == pytest.approx(ref.error_fro, rel=1e-10)
    assert torch.allclose(lr.B @ lr.A, ref.B @ ref.A, atol=1e-10)
    assert fro(product - lr.B @ lr.A) == pytest.approx(ref.error_fro, rel=1e-8)


def test_reduce_by_energy():
    A, B = torch.randn(16, 32, generator=gen(10)), torch.randn(48, 16, generator=gen(11))
    lr = reduce_lora_rank(A, B, energy=0.9)
    assert lr.rank == rank_for_energy(lr.singular_values, 0.9) and lr.energy_kept >= 0.9


def test_pissa_reproduces_w():
    W = torch.randn(80, 60, generator=gen(12))
    A, B, W_res = pissa_init(W, 8)
    assert torch.allclose(B @ A + W_res, W, atol=1e-6)
    top = truncated_svd(W, rank=8)
    assert torch.allclose(B @ A, top.B @ top.A, atol=1e-6)  # the principal part, not just any split


def test_int8_residual_init_absorbs_quantization_error():
    W = torch.randn(128, 96, generator=gen(13), dtype=torch.float64) * 0.05
    rank = 8
    A, B, Q = int8_residual_init(W, rank, fake_quant_int8)
    assert torch.equal(Q, fake_quant_int8(W))  # the base is the int8 base deployment ships
    before, after = fro(W - Q), fro(W - (Q + B @ A))
    assert after < before
    s = torch.linalg.svdvals(W - Q)
    assert before**2 - after**2 == pytest.approx(float((s[:rank] ** 2).sum()), rel=1e-8)  # Eckart-Young
    A3, B3, Q3 = int8_residual_init(W, rank, fake_quant_int8, n_iter=3)
    assert fro(W - (Q3 + B3 @ A3)) <= after


def test_zero_matrix():
    lr = truncated_svd(torch.zeros(10, 6), energy=0.9)
    assert lr.rank == 1 and lr.energy_kept == 1.0 and lr.error_fro == 0.0 and lr.relative_error == 0.0
    assert not lr.A.any() and not lr.B.any()
    assert truncated_svd(torch.zeros(10, 6), rank=3).rank == 3
    randomized = truncated_svd(torch.zeros(30, 20), energy=0.5, method="randomized")
    assert randomized.rank == 1 and randomized.error_fro == 0.0


def test_compression_ratio():
    assert compression_ratio((768, 768), 8) == pytest.approx(48.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda M: truncated_svd(M, rank=0), r"rank must be an integer >= 1, got 0"),
        (lambda M: truncated_svd(M, rank=2.5), r"rank must be an integer >= 1, got 2.5"),
        (lambda M: truncated_svd(M, energy=0.0), r"energy must be in \(0, 1\], got 0.0"),
        (lambda M: truncated_svd(M, energy=1.5), r"energy must be in \(0, 1\], got 1.5"),
        (lambda M: truncated_svd(M), r"exactly one of rank or energy"),
        (lambda M: truncated_svd(M, rank=2, energy=0.5), r"exactly one of rank or energy"),
        (lambda M: truncated_svd(M, rank=2, method="qr"), r"method must be one of auto, exact, randomized, got 'qr'"),
        (lambda M: truncated_svd(M[0], rank=2), r"M must be a 2-D floating-point tensor"),
        (lambda M: truncated_svd(M / 0.0, rank=2), r"M \(6, 5\) contains NaN or Inf"),
        (lambda M: rank_for_energy(torch.ones(3), -0.1), r"energy must be in \(0, 1\], got -0.1"),
        (lambda M: reduce_lora_rank(M[:3], M[:, :4], rank=1), r"disagree on r"),
        (lambda M: extract_lora_from_delta(M, M.T, rank=1), r"differ in shape"),
        (lambda M: int8_residual_init(M, 2, fake_quant_int8, n_iter=0), r"n_iter must be an integer >= 1, got 0"),
        (lambda M: int8_residual_init(M, 2, lambda W: W[:1]), r"quantize must return a tensor of W's shape"),
        (lambda M: compression_ratio((4, 4), 0), r"rank must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_edgelora_error(call, match):
    with pytest.raises(EdgeloraError, match=match):
        call(torch.randn(6, 5, generator=gen(14)))
