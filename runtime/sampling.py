"""Choosing the next token from a row of logits: greedy, or temperature, top-k then top-p (nucleus) sampling.

The filters follow the order and the tie rules of transformers' logits warpers (temperature, then top-k,
then top-p), so a setting means the same here as in training-side evaluation. Randomness comes only from
the numpy Generator passed in: the same seed gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora.errors import EdgeloraError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 switch those
    filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not np.isfinite(self.temperature) or self.temperature < 0:
            raise EdgeloraError(f"temperature {self.temperature!r} must be a number >= 0 (0: greedy)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise EdgeloraError(f"top_p {self.top_p!r} must be in (0, 1] (1: off)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise EdgeloraError(f"top_k {self.top_k!r} must be an integer >= 0 (0: off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_NUCLEUS_CANDIDATES = 1024  # top-p sorts this many likeliest tokens (x4 until they hold the mass it needs)


def candidates(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw can give and their probabilities: softmax(logits / temperature) over what top-k and
    top-p keep, renormalized (float64). Not for greedy settings.

    top-k keeps every token tied with the k-th largest logit; top-p keeps the fewest most likely tokens whose
    probabilities sum to at least top_p (at least one; ties ranked by token id).
    """
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature  # (vocab,)
    ids = np.arange(z.size)
    if sampling.top_k and sampling.top_k < z.size:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        ids = np.flatnonzero(z >= kth)
        z = z[ids]
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        ranked = np.arange(p.size)
        n = _NUCLEUS_CANDIDATES
        while n < p.size:  # a full sort of a 50k vocabulary costs more than a small model's step: sort the
            top = np.sort(np.argpartition(p, -n)[-n:])  # likeliest n tokens if they hold the mass needed
            if p[top].sum() >= sampling.top_p:
                ranked = top
                break
            n *= 4
        order = ranked[np.argsort(-p[ranked], kind="stable")]  # most likely first
        before = np.cumsum(p[order]) - p[order]  # probability mass of the tokens ranked above each one
        order = order[before < sampling.top_p]
        ids, p = ids[order], p[order] / p[order].sum()
    return ids, p


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """`candidates` as a distribution over the whole vocabulary (zeros where a filter drops a token)."""
    ids, p = candidates(logits, sampling)
    full = np.zeros(np.asarray(logits).shape[-1])
    full[ids] = p
    return full


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
    """One token id from one row of logits (vocab,): argmax when greedy, else a draw from `candidates`."""
    if sampling.greedy:
        return int(np.argmax(logits))
    ids, p = candidates(logits, sampling)
    cdf = np.cumsum(p)
    return int(ids[np.searchsorted(cdf, rng.random() * cdf[-1], side="right")])
