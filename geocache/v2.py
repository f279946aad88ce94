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
per-layer accumulator; ``geocache/profile.py`` runs a model and feeds it.
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


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_mean_difference(x: np.ndarray, y: Optional[np.ndarray] = None, *, paired: bool = False, n_resamples: int = 1000,
                              level: float = 0.95, seed: int = 0, replicates: Optional[list] = None) -> Verdict:
    """mean(x) − mean(y) with a percentile bootstrap interval: tokens resampled with replacement
    within each group (two groups), or pairs resampled together (``paired``: x and y per token).
    With ``y`` None the statistic is mean(x). Pass = value < 0 and the interval's upper end < 0.
    ``replicates``, a list, receives the bootstrap statistics (for aggregating layers).

    scipy's ``stats.bootstrap`` computes the same interval but holds n_resamples × n indices at
    once; this draws the resamples' indices in blocks so that memory stays bounded."""
    gen = torch.Generator().manual_seed(seed)
    x = np.asarray(x, dtype=np.float64)
    d = x - np.asarray(y, dtype=np.float64) if (paired and y is not None) else x
    groups = [d] if (paired or y is None) else [x, np.asarray(y, dtype=np.float64)]
    if any(len(g) == 0 for g in groups):
        return Verdict(float("nan"), float("nan"), float("nan"), False, len(groups[0]), len(groups[1]) if len(groups) > 1 else 0)
    # Resampled in float32 torch (multi-threaded gather; half numpy's time here), means accumulated by torch's cascade sum.
    groups32 = [torch.from_numpy(g.astype(np.float32)) for g in groups]
    stats = np.zeros(n_resamples)
    block = max(1, (1 << 22) // max(len(g) for g in groups))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        means = [g[torch.randint(0, len(g), (b, len(g)), generator=gen)].mean(dim=1).double().numpy() for g in groups32]
        stats[start : start + b] = means[0] - (means[1] if len(means) > 1 else 0.0)
    value = float(groups[0].mean() - (groups[1].mean() if len(groups) > 1 else 0.0))
    if replicates is not None:
        replicates.append(stats)
    lo, hi = _percentile_ci(stats, level)
    return Verdict(value, lo, hi, bool(value < 0 and hi < 0), len(groups[0]), len(groups[1]) if len(groups) > 1 else 0)


@dataclass
class StrataConfig:
    boundary_q: float = field(default=0.10, metadata={"help": "Boundary: margin below this quantile."})
    interior_q: float = field(default=0.50, metadata={"help": "Interior: margin above this quantile."})
    boundary_abs: Optional[float] = field(default=None, metadata={"help": "Boundary: margin below this value (overrides the quantile)."})
    interior_abs: Optional[float] = field(default=None, metadata={"help": "Interior: margin above this value (overrides the quantile)."})

    def __post_init__(self) -> None:
        if not 0 < self.boundary_q <= self.interior_q < 1:
            raise ValueError(f"quantiles must satisfy 0 < boundary_q ({self.boundary_q}) <= interior_q ({self.interior_q}) < 1")

    def thresholds(self, margins: np.ndarray) -> tuple[float, float]:
        lo = self.boundary_abs if self.boundary_abs is not None else float(np.quantile(margins, self.boundary_q))
        hi = self.interior_abs if self.interior_abs is not None else float(np.quantile(margins, self.interior_q))
        return lo, hi


def c1_c2(margin: np.ndarray, kappa_next: np.ndarray, kappa_rand: np.ndarray, strata: StrataConfig, n_resamples: int = 1000,
          seed: int = 0, replicates: Optional[dict] = None) -> dict:
    """C1 ΔBI and C2 ΔBrand (with bootstrap intervals and verdicts) of one layer's tokens.
    ``replicates``, a dict, receives each statistic's bootstrap replicates (see ``aggregate``)."""
    lo, hi = strata.thresholds(margin)
    boundary, interior = margin < lo, margin > hi
    if strata.boundary_abs is None and not boundary.any():  # ties at the quantile: take the lowest margins
        boundary = margin <= lo
    reps: dict = {"delta_bi": [], "delta_brand": []}
    c1 = bootstrap_mean_difference(kappa_next[boundary], kappa_next[interior], n_resamples=n_resamples, seed=seed, replicates=reps["delta_bi"])
    c2 = bootstrap_mean_difference(kappa_next[boundary], kappa_rand[boundary], paired=True, n_resamples=n_resamples, seed=seed + 1,
                                   replicates=reps["delta_brand"])
    if replicates is not None:
        replicates.update({k: v[0] if v else None for k, v in reps.items()})
    return {
        "delta_bi": c1.to_dict(),
        "delta_brand": c2.to_dict(),
        "tokens": {"all": int(len(margin)), "boundary": int(boundary.sum()), "interior": int(interior.sum())},
        "thresholds": {"boundary": lo, "interior": hi},
        "kappa_next_boundary": float(kappa_next[boundary].mean()) if boundary.any() else float("nan"),
        "kappa_next_interior": float(kappa_next[interior].mean()) if interior.any() else float("nan"),
        "kappa_rand_boundary": float(kappa_rand[boundary].mean()) if boundary.any() else float("nan"),
    }


def aggregate(layers: list[dict], replicates: list[dict], weights: np.ndarray, level: float = 0.95) -> dict:
    """A weighted mean over layers of ΔBI and ΔBrand, its interval from the layers' independent
    bootstrap replicates combined with the same weights. Layers without a statistic are left out
    and the remaining weights renormalised."""
    out = {}
    for key in ("delta_bi", "delta_brand"):
        ok = [i for i, (lay, rep) in enumerate(zip(layers, replicates)) if rep.get(key) is not None and np.isfinite(lay[key]["value"])]
        if not ok:
            out[key] = Verdict(float("nan"), float("nan"), float("nan"), False, 0).to_dict()
            continue
        w = np.asarray([weights[i] for i in ok], dtype=np.float64)
        w = w / w.sum()
        value = float(sum(wi * layers[i][key]["value"] for wi, i in zip(w, ok)))
        stats = sum(wi * replicates[i][key] for wi, i in zip(w, ok))
        lo, hi = _percentile_ci(stats, level)
        out[key] = Verdict(value, lo, hi, bool(value < 0 and hi < 0), int(sum(layers[i][key]["tokens"] for i in ok))).to_dict()
    return out


class LayerReservoir:
    """A uniform sample (Algorithm R) of at most ``capacity`` tokens' (margin, κ_next, κ_rand) for
    one layer: any number of tokens streams through in bounded memory."""

    def __init__(self, capacity: int = 200_000, seed: int = 0):
        self.capacity = capacity
        self.data = np.empty((capacity, 3), dtype=np.float32)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, margin: torch.Tensor, kappa_next: torch.Tensor, kappa_rand: torch.Tensor) -> None:
        rows = torch.stack([margin.float(), kappa_next.float(), kappa_rand.float()], 1).cpu().numpy()
        fill = min(len(rows), max(self.capacity - self.seen, 0))
        if fill:
            self.data[self.seen : self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if len(rest):
            # Token t (0-based global index i) replaces a uniform slot with probability capacity / (i + 1).
            idx = self.seen + fill + np.arange(len(rest))
            slots = (self.rng.random(len(rest)) * (idx + 1)).astype(np.int64)
            keep = slots < self.capacity
            self.data[slots[keep]] = rest[keep]  # later tokens overwrite earlier ones in order, as in Algorithm R
        self.seen += len(rows)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = self.data[: min(self.seen, self.capacity)].astype(np.float64)
        return d[:, 0], d[:, 1], d[:, 2]
