"""Truncated SVD on plain torch tensors: low-rank fits, energy-based rank choice and LoRA initialisers.

A linear weight W is (out, in); a LoRA pair is A (r, in) and B (out, r) with delta = scaling * B @ A.
No model code lives here: `lora`, `inject` and the CLI's `extract` build on these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from edgelora.errors import EdgeloraError

__all__ = [
    "LowRank",
    "compression_ratio",
    "extract_lora_from_delta",
    "int8_residual_init",
    "pissa_init",
    "rank_for_energy",
    "reduce_lora_rank",
    "truncated_svd",
]

METHODS = ("auto", "exact", "randomized")
AUTO_EXACT_MAX_DIM = 1024  # "auto" runs a full SVD up to this smaller side, randomized above it
FLOAT64_MAX_DIM = 2048  # the exact path works in float64 up to this smaller side (cost ~ m n^2)
# Relative slack on the energy target: float64 round-off in sum(sigma^2) must not push the rank
# of an exactly rank-r matrix past r when energy=1.0 (its trailing sigma^2 sit near 1e-14 of the total).
ENERGY_SLACK = 1e-12
RANDOMIZED_START_SKETCH = 64  # first sketch width when the randomized path searches for an energy rank


@dataclass(frozen=True)
class LowRank:
    """A rank-`rank` factorisation M ~ B @ A with the sqrt of the singular values split evenly.

    `singular_values` are all of M's (descending) when exact, the computed ones when randomized, in the
    dtype the SVD ran in. `energy_kept` = kept sigma^2 / ||M||_F^2; `relative_error` = error_fro / ||M||_F.
    """

    A: Tensor  # (rank, in)
    B: Tensor  # (out, rank)
    singular_values: Tensor
    rank: int
    energy_kept: float
    error_fro: float
    relative_error: float


def _check_choice(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise EdgeloraError(f"pass exactly one of rank or energy, got rank={rank!r}, energy={energy!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise EdgeloraError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None:
        _check_energy(energy)


def _check_energy(energy: float) -> None:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise EdgeloraError(f"energy must be in (0, 1], got {energy!r}")


def _check_matrix(name: str, M: Tensor) -> None:
    if not isinstance(M, Tensor) or M.ndim != 2 or not M.is_floating_point():
        what = f"shape {tuple(M.shape)} dtype {M.dtype}" if isinstance(M, Tensor) else type(M).__name__
        raise EdgeloraError(f"{name} must be a 2-D floating-point tensor, got {what}")
    if M.numel() == 0:
        raise EdgeloraError(f"{name} must be non-empty, got shape {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise EdgeloraError(f"{name} {tuple(M.shape)} contains NaN or Inf; the SVD needs finite values")


def _energy_rank(s: Tensor, energy: float, total: float) -> int | None:
    """Smallest k with sum(s[:k]^2) >= energy * total, or None if the given values never get there."""
    if total <= 0.0:
        return 1  # nothing to keep: one (zero) component is the smallest usable adapter
    cum = torch.cumsum(s.double() ** 2, dim=0)
    hits = torch.nonzero(cum >= (energy - ENERGY_SLACK) * total)
    return int(hits[0]) + 1 if hits.numel() else None


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold at least `energy` of the total sum of sigma^2.

    Example: rank_for_energy(torch.tensor([3.0, 1.0]), 0.9) == 1  (9 / 10 of the energy).
    A zero spectrum gives 1.
    """
    _check_energy(energy)
    if singular_values.ndim != 1 or singular_values.numel() == 0:
        raise EdgeloraError(f"singular_values must be a non-empty 1-D tensor, got shape {tuple(singular_values.shape)}")
    total = float((singular_values.double() ** 2).sum())
    k = _energy_rank(singular_values, energy, total)
    return len(singular_values) if k is None else k


def _split(U: Tensor, S: Tensor, Vh: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A = sqrt(S_k) Vh_k (k, in), B = U_k sqrt(S_k) (out, k): both factors carry the same scale."""
    root = S[:k].sqrt()
    A = root[:, None] * Vh[:k]  # (k, in)
    B = U[:, :k] * root[None, :]  # (out, k)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def _from_full_svd(U: Tensor, S: Tensor, Vh: Tensor, rank: int | None, energy: float | None,
                   dtype: torch.dtype) -> LowRank:
    """Truncate a complete spectrum; errors follow from Eckart-Young (sqrt of discarded sigma^2)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    k = min(rank, len(S)) if rank is not None else _energy_rank(S, energy, total) or len(S)
    kept = float(sq[:k].sum())
    err = math.sqrt(max(float(sq[k:].sum()), 0.0))
    A, B = _split(U, S, Vh, k, dtype)
    return LowRank(A, B, S, k, kept / total if total > 0 else 1.0, err,
                   err / math.sqrt(total) if total > 0 else 0.0)


def _compute_dtype(M: Tensor, exact: bool) -> torch.dtype:
    if M.dtype == torch.float64 or (exact and min(M.shape) <= FLOAT64_MAX_DIM):
        return torch.float64
    return torch.float32  # torch.linalg has no half/bfloat16 SVD


def _randomized(M: Tensor, rank: int | None, energy: float | None, niter: int, oversample: int,
                seed: int) -> LowRank:
    work = M.to(_compute_dtype(M, exact=False))
    n = min(M.shape)
    total = float((work.double() ** 2).sum())  # ||M||_F^2 is exact even when the spectrum is not
    q = min(n, rank + oversample) if rank is not None else min(n, RANDOMIZED_START_SKETCH)
    while True:
        # svd_lowrank draws its test matrix from the global RNG: fork it so seeding leaves the caller's alone.
        with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(work, q=q, niter=niter)  # (out, q), (q,), (in, q)
        if rank is not None:
            k = min(rank, q)
            break
        k = _energy_rank(S, energy, total)
        if q == n or (k is not None and k + oversample <= q):
            k = len(S) if k is None else k
            break
        q = min(n, 2 * q)  # the sketch is too narrow to trust the top k: widen it and redo
    A, B = _split(U, S, V.mT, k, M.dtype)
    err = float(torch.linalg.matrix_norm(M.double() - B.double() @ A.double()))  # float64: no cancellation
    kept = float((S[:k].double() ** 2).sum())
    return LowRank(A, B, S, k, kept / total if total > 0 else 1.0, err,
                   err / math.sqrt(total) if total > 0 else 0.0)


def truncated_svd(M: Tensor, *, rank: int | None = None, energy: float | None = None, method: str = "auto",
                  niter: int = 4, oversample: int = 10, seed: int = 0) -> LowRank:
    """Best rank-k approximation M ~ B @ A (Eckart-Young), k given or chosen by kept energy.

    Args:
        rank: keep this many components; larger than min(M.shape) is clamped.
        energy: keep the fewest components whose sigma^2 sum to at least this fraction of ||M||_F^2.
        method: "exact" (torch.linalg.svd, float64 up to 2048 on the smaller side), "randomized"
            (torch.svd_lowrank, Halko et al.; errors are measured, not inferred) or "auto" (exact up to 1024).
        niter, oversample: randomized subspace iterations and extra sketch columns beyond k.
        seed: makes the randomized sketch repeatable; the global RNG state is left untouched.

    Randomized with energy: the total is ||M||_F^2 (exact); the sketch starts at 64 columns and doubles
    until the chosen k leaves `oversample` spare columns (or the sketch spans min(M.shape)).

    A zero matrix gives `rank` (or, with energy, 1) zero components, energy_kept 1.0 and zero error.
    Factors come back in M's dtype. Example: `lr = truncated_svd(W1 - W0, rank=8)`; `lr.B @ lr.A ~ W1 - W0`.
    """
    _check_matrix("M", M)
    _check_choice(rank, energy)
    if method not in METHODS:
        raise EdgeloraError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if niter < 0 or oversample < 0:
        raise EdgeloraError(f"niter and oversample must be >= 0, got niter={niter}, oversample={oversample}")
    if method == "auto":
        method = "exact" if min(M.shape) <= AUTO_EXACT_MAX_DIM else "randomized"
    if method == "randomized":
        return _randomized(M, rank, energy, niter, oversample, seed)
    U, S, Vh = torch.linalg.svd(M.to(_compute_dtype(M, exact=True)), full_matrices=False)
    return _from_full_svd(U, S, Vh, rank, energy, M.dtype)


def reduce_lora_rank(A: Tensor, B: Tensor, *, rank: int | None = None, energy: float | None = None,
                     scaling: float = 1.0) -> LowRank:
    """Best rank-k approximation of scaling * B @ A without forming the (out, in) product.

    QR of B and of A^T leaves an r x r core whose SVD is the product's, so this costs O((out + in) r^2).
    The scaling is folded into the returned factors: use them with scaling 1 (or divide B by the new
    layer's alpha/r). Asking for the adapter's own rank reproduces scaling * B @ A to float round-off.
    `singular_values` are the product's top min(r, out, in); all further ones are exactly zero.
    """
    _check_matrix("A", A)
    _check_matrix("B", B)
    if A.shape[0] != B.shape[1]:
        raise EdgeloraError(f"A (r, in) and B (out, r) disagree on r: A {tuple(A.shape)}, B {tuple(B.shape)}")
    _check_choice(rank, energy)
    Q_B, R_B = torch.linalg.qr(B.double())  # (out, r'), (r', r); float64 is cheap at O((out + in) r^2)
    Q_A, R_A = torch.linalg.qr(A.mT.double())  # (in, r''), (r'', r)
    U, S, Vh = torch.linalg.svd(scaling * R_B @ R_A.mT, full_matrices=False)  # core (r', r'')
    return _from_full_svd(Q_B @ U, S, Vh @ Q_A.mT, rank, energy, A.dtype)


def extract_lora_from_delta(W_base: Tensor, W_tuned: Tensor, *, rank: int | None = None,
                            energy: float | None = None, method: str = "auto") -> LowRank:
    """A LoRA pair (scaling 1) approximating a full fine-tune: truncated SVD of W_tuned - W_base."""
    _check_matrix("W_base", W_base)
    _check_matrix("W_tuned", W_tuned)
    if W_base.shape != W_tuned.shape:
        raise EdgeloraError(f"W_base {tuple(W_base.shape)} and W_tuned {tuple(W_tuned.shape)} differ in shape")
    return truncated_svd(W_tuned - W_base, rank=rank, energy=energy, method=method)


def pissa_init(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: A, B from W's top-`rank` singular triplets and the base replaced by W - B @ A.

    B @ A + W_residual equals W up to one float addition; train A and B with scaling 1.
    """
    lr = truncated_svd(W, rank=rank)
    return lr.A, lr.B, W - lr.B @ lr.A


def int8_residual_init(W: Tensor, rank: int, quantize: Callable[[Tensor], Tensor],
                       n_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ-style init: fit A, B (scaling 1) to the quantization residual so that Q + B @ A ~ W.

    Args:
        quantize: fake quantizer returning the dequantized tensor (pass the project's shared one, so
            Q is bit-for-bit the base that the int8 export ships).
        n_iter: 1 returns Q = quantize(W), the unchanged int8 base of deployment, and A, B the best
            rank-k fit of W - Q: the adapter absorbs the quantization residual. n_iter > 1 alternates
            Q = quantize(W - B @ A) and a refit (LoftQ); the base then becomes that Q, which must replace
            the deployed base, so it cannot be a base shared with other adapters. The iterate with the
            smallest ||W - Q - B @ A||_F is returned, so more iterations never do worse than one.

    Returns (A, B, Q): Q is the dequantized base the adapter was fitted against.
    """
    _check_matrix("W", W)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise EdgeloraError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    Q = quantize(W)
    if not isinstance(Q, Tensor) or Q.shape != W.shape:
        got = tuple(Q.shape) if isinstance(Q, Tensor) else type(Q).__name__
        raise EdgeloraError(f"quantize must return a tensor of W's shape {tuple(W.shape)}, got {got}")
    best: tuple[float, Tensor, Tensor, Tensor] | None = None
    for i in range(n_iter):
        lr = truncated_svd(W - Q, rank=rank)
        BA = lr.B @ lr.A  # (out, in)
        err = float(torch.linalg.matrix_norm((W - Q - BA).double()))
        if best is None or err < best[0]:
            best = (err, lr.A, lr.B, Q)
        if i + 1 < n_iter:
            Q = quantize(W - BA)
    return best[1], best[2], best[3]


def compression_ratio(shape: tuple[int, int], rank: int) -> float:
    """Parameters of a dense (out, in) matrix over those of a rank-r pair: out*in / (r*(out+in))."""
    out_f, in_f = shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise EdgeloraError(f"rank must be an integer >= 1, got {rank!r}")
    return out_f * in_f / (rank * (out_f + in_f))
