"""Interpolated Kneser-Ney n-gram language model over event ids, in numpy.

The likelihood baseline of `mgpt.evaluate`: it sees the same sequences as the GPT
(conditioning token, events, EOS) and predicts the same positions (every event and
the EOS; never the conditioning token), so its nats/event compare directly.

Counts live in sorted arrays keyed by a 64-bit polynomial hash of each n-gram
(collisions are negligible at 2^-64 per pair), so fitting is a few `np.unique`
calls per order and scoring a few `np.searchsorted`s: millions of events take
seconds.

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .) + D_k * N1+(h .) / c_k(h .) * P_{k-1}(w | h')

where c is the raw count at the highest order and the continuation count
N1+(. h w) (distinct left neighbours) below it; h' drops h's oldest token; a
context never seen backs off entirely (P_k = P_{k-1}); P_0 is uniform over the
vocabulary. D_k = n1 / (n1 + 2 n2) from the count-of-counts unless given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: h -> h * M + x is a bijection mod 2^64 for fixed x


def _gram_hashes(tokens: np.ndarray, order: int) -> list[np.ndarray]:
    """hashes[k][t] = hash of tokens[t-k+1 .. t] (the k-gram ending at t); hashes[0] = 0.

    Positions t < k-1 get hashes of shorter grams; callers pad each sequence with
    order-1 PADs, so every position they use has a full-length history.
    """
    tokens = tokens.astype(np.uint64) + np.uint64(1)
    hashes = [np.zeros(len(tokens), np.uint64)]
    with np.errstate(over="ignore"):
        for _ in range(order):
            prev = np.concatenate([np.zeros(1, np.uint64), hashes[-1][:-1]])
            hashes.append(prev * _MULT + tokens)
    return hashes


class _Table:
    """Sorted keys -> values, for vectorised lookups (missing keys give 0)."""

    def __init__(self, keys: np.ndarray, *values: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.values = [v[order] for v in values]

    def get(self, query: np.ndarray) -> list[np.ndarray]:
        if len(self.keys) == 0:
            return [np.zeros(len(query)) for _ in self.values]
        pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        hit = self.keys[pos] == query
        return [np.where(hit, v[pos], 0) for v in self.values]


def _discount(counts: np.ndarray) -> float:
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    if n1 == 0 or n2 == 0:
        return 0.75
    return float(np.clip(n1 / (n1 + 2.0 * n2), 0.05, 0.95))


class KneserNey:
    """`KneserNey(order, vocab_size).fit(sequences)`; `log_probs(sequence)` in nats.

    Each sequence is one piece as the models see it: `[STYLE, events..., EOS]`. The
    first token is context only; positions 1.. are predicted. `pad_id` fills the
    history before a piece starts.
    """

    def __init__(self, order: int, vocab_size: int, *, pad_id: int = 0, discounts: Sequence[float] | None = None):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if discounts is not None and len(discounts) != order:
            raise ValueError(f"discounts: need one per order ({order}), got {len(discounts)}")
        self.order = order
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self._fixed_discounts = None if discounts is None else [float(d) for d in discounts]
        self.discounts: list[float] = []
        self._grams: list[_Table] = []  # per order k=1..N: gram hash -> count
        self._contexts: list[_Table] = []  # per order: context hash -> (total count, distinct followers)

    def _padded(self, sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """All sequences concatenated, each after order-1 PADs; and the predicted positions."""
        pad = np.full(self.order - 1, self.pad_id, np.int64)
        parts, targets, offset = [], [], 0
        for s in sequences:
            s = np.asarray(s, np.int64)
            parts += [pad, s]
            start = offset + len(pad)
            targets.append(np.arange(start + 1, start + len(s)))
            offset = start + len(s)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(targets)

    def fit(self, sequences: Sequence[np.ndarray]) -> "KneserNey":
        tokens, t = self._padded(sequences)
        if len(t) == 0:
            raise ValueError("n-gram: no training events")
        h = _gram_hashes(tokens, self.order)
        self._grams, self._contexts, self.discounts = [], [], []
        for k in range(1, self.order + 1):
            if k == self.order:  # raw counts of the n-grams that occur
                keys, first, counts = np.unique(h[k][t], return_index=True, return_counts=True)
                rep = t[first]
            else:  # continuation counts: distinct (k+1)-grams that end in this k-gram
                _, first_up = np.unique(h[k + 1][t], return_index=True)
                keys, first, counts = np.unique(h[k][t[first_up]], return_index=True, return_counts=True)
                rep = t[first_up][first]
            ctx = h[k - 1][rep - 1] if k > 1 else np.zeros(len(keys), np.uint64)
            ctx_keys, inverse = np.unique(ctx, return_inverse=True)
            totals = np.bincount(inverse, weights=counts).astype(np.float64)
            types = np.bincount(inverse).astype(np.float64)
            self._grams.append(_Table(keys, counts.astype(np.float64)))
            self._contexts.append(_Table(ctx_keys, totals, types))
            d = self._fixed_discounts[k - 1] if self._fixed_discounts else _discount(counts)
            self.discounts.append(d)
        return self

    def _probs_at(self, h: list[np.ndarray], t: np.ndarray) -> np.ndarray:
        p = np.full(len(t), 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            (count,) = self._grams[k - 1].get(h[k][t])
            ctx = h[k - 1][t - 1] if k > 1 else np.zeros(len(t), np.uint64)
            total, types = self._contexts[k - 1].get(ctx)
            d = self.discounts[k - 1]
            safe = np.maximum(total, 1.0)
            interpolated = np.maximum(count - d, 0.0) / safe + d * types / safe * p
            p = np.where(total > 0, interpolated, p)
        return p

    def log_probs(self, sequence: np.ndarray) -> np.ndarray:
        """ln P(token_i | history) for i = 1..len-1 (nats), float64[len-1]."""
        tokens, t = self._padded([sequence])
        h = _gram_hashes(tokens, self.order)
        return np.log(self._probs_at(h, t))

    def nll(self, sequences: Sequence[np.ndarray]) -> tuple[float, int]:
        """(total nats, number of predicted tokens) over many sequences, in one pass."""
        tokens, t = self._padded(sequences)
        if len(t) == 0:
            return 0.0, 0
        h = _gram_hashes(tokens, self.order)
        return float(-np.log(self._probs_at(h, t)).sum()), int(len(t))
