"""V2 set-boundary redundancy of MoE layers (SPEC, "V2 (MoE only)"): the statistics.

For a layer with top-k routing, in the architecture's own scoring space, per token:

- margin m = s_(k) − s_(k+1) (the k-th selected expert's score minus the first unselected one's);
- e_k the k-th ranked selected expert, e_{k+1} the first unselected, e_r a random unselected expert
  other than e_{k+1}; E_a(x) expert a's ungated output on the layer's input x;
- κ(a, b) = ‖E_a(x) − E_b(x)‖ / (‖E_a(x)‖ + ‖E_b(x)‖) ∈ [0, 1].

Boundary tokens have a margin below the ``boundary_q`` quantile (or an absolute threshold), interior
tokens above the ``interior_q`` quantile (or threshold). Then

- C1 ΔBI    = mean_boundary κ(e_k, e_{k+1}) − mean_interior κ(e_k, e_{k+1})  (two groups),
- C2 ΔBrand = mean_boundary κ(e_k, e_{k+1}) − mean_boundary κ(e_k, e_r)      (paired, per token),

each passing when negative with the upper end of its 95% bootstrap interval below 0.

This module holds the arithmetic (κ, strata, the bootstrap, the verdicts) and a bounded-memory
token reservoir; ``geocache/profile.py`` runs a model and feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


def kappa(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖a − b‖ / (‖a‖ + ‖b‖) per row of ``[N, H]`` outputs → ``[N]`` in [0, 1] (0 for two zero rows)."""
    a, b = a.float(), b.float()
    return (a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1)).clamp_min(eps)


def routing_ranks(scores: torch.Tensor, top_k: int, selected: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> dict:
    """From routing scores ``[N, E]`` in the space the router selects in: ``margin`` [N] and the
    expert ids ``e_k`` (the selected expert with the lowest score), ``e_next`` (the unselected one
    with the highest) and ``e_rand`` (uniform over the other unselected experts) [N].

    ``selected [N, k]`` is the router's own choice; default: the top-k of ``scores``. They differ for
    group-limited routing (DeepSeek-V3), where an expert of a dropped group may outscore a selected
    one: the margin is then negative, and the token counts as a boundary token."""
    n, n_experts = scores.shape
    if not 1 <= top_k <= n_experts - 2:
        raise ValueError(f"V2 needs at least top_k + 2 experts; this layer has {n_experts} with top_k={top_k}")
    scores = scores.float()
    if selected is None:
        selected = scores.topk(top_k, dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, selected, True)
    e_k = scores.masked_fill(~chosen, float("inf")).argmin(-1)
    rest = scores.masked_fill(chosen, float("-inf")).argsort(dim=-1, descending=True)[:, : n_experts - top_k]
    e_next = rest[:, 0]
    pick = torch.randint(0, n_experts - top_k - 1, (n,), generator=generator).to(scores.device)
    e_rand = rest.gather(1, (1 + pick).unsqueeze(1)).squeeze(1)
    margin = scores.gather(1, e_k[:, None]).squeeze(1) - scores.gather(1, e_next[:, None]).squeeze(1)
    return {"margin": margin, "e_k": e_k, "e_next": e_next, "e_rand": e_rand}


@dataclass
class Verdict:
    value: float
    ci_low: float
    ci_high: float
    passed: bool
    n: int  # tokens behind it (boundary tokens; C1 also counts interior ones in ``n_other``)
    n_other: int = 0

    def to_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "pass": self.passed, "tokens": self.n,
                **({"tokens_other": self.n_other} if self.n_other else {})}


@dataclass
class StrataConfig:
    boundary_q: float = field(default=0.10, metadata={"help": "Boundary: margin below this quantile."})
    interior_q: float = field(default=0.50, metadata={"help": "Interior: margin above this quantile."})
    boundary_abs: Optional[float] = field(default=None, metadata={"help": "Boundary: margin below this value (overrides the quantile)."})
    interior_abs: Optional[float] = field(default=None, metadata={"help": "Interior: margin above this value (overrides the quantile)."})

    def __post_init__(self) -> None:
        if not 0 < self.boundary_q <= self.interior_q < 1:
            raise ValueError(f"quantiles must satisfy 0 < boundary_q ({self.boundary_q}) <= interior_q ({self.interior_q}) < 1")
        if self.boundary_abs is not None and self.interior_abs is not None and self.boundary_abs > self.interior_abs:
            raise ValueError(f"boundary_abs ({self.boundary_abs}) must not exceed interior_abs ({self.interior_abs})")

    def thresholds(self, margins: np.ndarray) -> tuple[float, float]:
        if len(margins) == 0:
            raise ValueError("no tokens to stratify: the data gave no routed tokens")
        lo = self.boundary_abs if self.boundary_abs is not None else float(np.quantile(margins, self.boundary_q))
        hi = self.interior_abs if self.interior_abs is not None else float(np.quantile(margins, self.interior_q))
        return lo, hi

    def masks(self, margins: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """(boundary, interior) token masks and the thresholds. With quantile thresholds and ties at
        the boundary quantile (no margin strictly below it), the tied lowest margins are boundary."""
        lo, hi = self.thresholds(margins)
        boundary, interior = margins < lo, margins > hi
        if self.boundary_abs is None and not boundary.any():
            boundary = margins <= lo
        return boundary, interior, (lo, hi)


def _verdict(value: float, reps: np.ndarray, level: float, n: int, n_other: int = 0) -> Verdict:
    reps = reps[np.isfinite(reps)]
    if not np.isfinite(value) or len(reps) == 0:
        return Verdict(float("nan"), float("nan"), float("nan"), False, n, n_other)
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Verdict(float(value), float(lo), float(hi), bool(value < 0 and hi < 0), n, n_other)


def v2_statistics(margin: np.ndarray, kappa_next: np.ndarray, kappa_rand: np.ndarray, strata: StrataConfig, *,
                  sequence: Optional[np.ndarray] = None, weights: Optional[dict[str, np.ndarray]] = None, n_resamples: int = 1000,
                  level: float = 0.95, seed: int = 0) -> dict:
    """C1 ΔBI and C2 ΔBrand of every layer, and their weighted aggregates over layers, with
    percentile bootstrap intervals. Inputs ``[n, L]`` (n tokens, the same tokens in every layer)
    and ``sequence [n]``, each token's sequence id (default: every token its own).

    The bootstrap resamples whole *sequences* with replacement (tokens of a sequence are correlated),
    and one resample serves every layer and every aggregate, so that the aggregates' intervals
    carry the layers' correlation. A statistic is a ratio of sums over tokens, so a replicate is a
    matrix product of sequence counts with per-sequence sums (``[R, S] @ [S, 5L]``)."""
    if len(margin) == 0:
        raise ValueError("no tokens to stratify: the data gave no routed tokens")
    margin, kappa_next, kappa_rand = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (margin, kappa_next, kappa_rand))
    n, n_layers = margin.shape
    sequence = np.arange(n) if sequence is None else np.asarray(sequence)
    cols, strata_info = [], []
    for layer in range(n_layers):
        b, i, thr = strata.masks(margin[:, layer])
        k = kappa_next[:, layer]
        cols += [k * b, b, k * i, i, (k - kappa_rand[:, layer]) * b]
        strata_info.append((int(b.sum()), int(i.sum()), thr, b, i))
    tokens = np.stack(cols, 1)  # [n, 5L]
    seq_ids, inverse = np.unique(sequence, return_inverse=True)
    per_seq = np.zeros((len(seq_ids), tokens.shape[1]))
    np.add.at(per_seq, inverse, tokens)

    def stats(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # sums [..., 5L] → C1, C2 [..., L]
        s = sums.reshape(*sums.shape[:-1], n_layers, 5)
        with np.errstate(invalid="ignore", divide="ignore"):
            return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3], s[..., 4] / s[..., 1]

    c1, c2 = stats(per_seq.sum(0))
    gen = torch.Generator().manual_seed(seed)
    n_seq = len(seq_ids)
    if n_seq < 2:  # every resample would be that one sequence: intervals of width 0, verdicts of nothing
        raise ValueError(f"the bootstrap resamples whole sequences and needs at least 2, but the data gave {n_seq}: give more held-out text")
    seq_t = torch.from_numpy(per_seq)
    r1, r2 = np.empty((n_resamples, n_layers)), np.empty((n_resamples, n_layers))
    block = max(1, (1 << 22) // max(n_seq, 1))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        counts = torch.zeros(b, n_seq, dtype=torch.float64).scatter_add_(1, torch.randint(0, n_seq, (b, n_seq), generator=gen),
                                                                            torch.ones(b, n_seq, dtype=torch.float64))
        r1[start : start + b], r2[start : start + b] = stats((counts @ seq_t).numpy())
    layers = []
    for layer, (nb, ni, (lo, hi), b, i) in enumerate(strata_info):
        layers.append({
            "delta_bi": _verdict(c1[layer], r1[:, layer], level, nb, ni).to_dict(),
            "delta_brand": _verdict(c2[layer], r2[:, layer], level, nb).to_dict(),
            "tokens": {"all": n, "boundary": nb, "interior": ni, "sequences": n_seq},
            "thresholds": {"boundary": lo, "interior": hi},
            "kappa_next_boundary": float(kappa_next[b, layer].mean()) if nb else float("nan"),
            "kappa_next_interior": float(kappa_next[i, layer].mean()) if ni else float("nan"),
            "kappa_rand_boundary": float(kappa_rand[b, layer].mean()) if nb else float("nan"),
        })
    aggregates = {}
    n_boundary, n_interior = sum(s[0] for s in strata_info), sum(s[1] for s in strata_info)
    for name, weights_of_layers in (weights or {}).items():
        aggregates[name] = {}
        for key, c, r, counts in (("delta_bi", c1, r1, (n_boundary, n_interior)), ("delta_brand", c2, r2, (n_boundary,))):
            ok = np.isfinite(c)  # layers without this statistic are left out, the rest renormalised
            w = np.where(ok, np.asarray(weights_of_layers, dtype=np.float64), 0.0)
            if w.sum() <= 0:  # no layer has it: no value (NaN, no verdict), not 0
                aggregates[name][key] = _verdict(float("nan"), np.empty(0), level, *counts).to_dict()
                continue
            w = w / w.sum()
            aggregates[name][key] = _verdict(float(np.sum(w * np.where(ok, c, 0))), np.where(ok, r, 0) @ w, level, *counts).to_dict()
    return {"layers": layers, "aggregate": aggregates}


def c1_c2(margin: np.ndarray, kappa_next: np.ndarray, kappa_rand: np.ndarray, strata: StrataConfig, n_resamples: int = 1000, seed: int = 0,
          sequence: Optional[np.ndarray] = None) -> dict:
    """C1 ΔBI and C2 ΔBrand of one layer's tokens (``v2_statistics`` with one layer)."""
    return v2_statistics(margin, kappa_next, kappa_rand, strata, sequence=sequence, n_resamples=n_resamples, seed=seed)["layers"][0]


class TokenReservoir:
    """A uniform sample (Algorithm R) of at most ``capacity`` tokens, each a row of ``width`` floats
    and a sequence id: one slot draw per token, so that every column (every layer) keeps the same
    tokens. Any number of tokens streams through in bounded memory."""

    def __init__(self, capacity: int, width: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"reservoir capacity {capacity} must be >= 1")
        self.capacity = capacity
        self.data = np.empty((capacity, width), dtype=np.float32)
        self.sequence = np.empty(capacity, dtype=np.int64)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray, sequence: np.ndarray) -> None:
        rows, sequence = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1), np.asarray(sequence)
        fill = min(len(rows), max(self.capacity - self.seen, 0))
        if fill:
            self.data[self.seen : self.seen + fill], self.sequence[self.seen : self.seen + fill] = rows[:fill], sequence[:fill]
        if len(rows) > fill:
            # Token i (0-based over the stream) replaces a uniform slot with probability capacity / (i + 1);
            # of several tokens of this batch drawing one slot, the last one stays, as in Algorithm R.
            idx = self.seen + np.arange(fill, len(rows))
            slots = (self.rng.random(len(idx)) * (idx + 1)).astype(np.int64)
            keep = np.flatnonzero(slots < self.capacity)
            last = keep[::-1][np.unique(slots[keep][::-1], return_index=True)[1]]
            self.data[slots[last]], self.sequence[slots[last]] = rows[fill + last], sequence[fill + last]
        self.seen += len(rows)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.seen, self.capacity)
        return self.data[:k].astype(np.float64), self.sequence[:k]
