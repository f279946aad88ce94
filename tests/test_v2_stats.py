"""V2 arithmetic: κ, routing ranks, strata, the bootstrap intervals and the bounded-memory reservoir."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geocache.v2 import LayerReservoir, StrataConfig, bootstrap_mean_difference, c1_c2, kappa, routing_ranks


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_kappa_is_a_bounded_normalised_distance(n, h, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    k = kappa(a, b)
    loop = [float(np.linalg.norm(a[i] - b[i]) / (np.linalg.norm(a[i]) + np.linalg.norm(b[i]))) for i in range(n)]
    assert k.tolist() == pytest.approx(loop, rel=1e-5, abs=1e-7)
    assert ((k >= 0) & (k <= 1 + 1e-6)).all()
    assert kappa(a, a).abs().max() < 1e-6 and (kappa(a, -a) - 1).abs().max() < 1e-6
    torch.testing.assert_close(kappa(a, b), kappa(b, a))


def test_routing_ranks_pick_the_kth_the_next_and_a_random_unselected_expert():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5000, 8, generator=g)
    r = routing_ranks(scores, top_k=2, generator=torch.Generator().manual_seed(1))
    order = scores.argsort(-1, descending=True)
    assert torch.equal(r["e_k"], order[:, 1]) and torch.equal(r["e_next"], order[:, 2])
    torch.testing.assert_close(r["margin"], scores.gather(1, order[:, 1:2]).squeeze(1) - scores.gather(1, order[:, 2:3]).squeeze(1))
    assert (r["margin"] >= 0).all()
    rank_of_rand = (order == r["e_rand"].unsqueeze(1)).float().argmax(1)
    assert (rank_of_rand >= 3).all()  # never selected, never e_{k+1}
    counts = torch.bincount(rank_of_rand - 3, minlength=5).float()  # uniform over the 5 remaining ranks
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03
    with pytest.raises(ValueError, match="top_k \\+ 2 experts"):
        routing_ranks(torch.randn(3, 4), top_k=3)


@pytest.mark.parametrize("paired", [False, True])
def test_bootstrap_interval_covers_the_true_difference_at_its_nominal_rate(paired):
    """Over many seeds, the 95% percentile interval contains the true mean difference ~95% of the time."""
    true_diff, covered, runs = -0.3, 0, 300
    for seed in range(runs):
        rng = np.random.default_rng(10_000 + seed)
        x = rng.normal(1.0 + true_diff, 1.0, 150)
        y = x - true_diff + rng.normal(0, 0.5, 150) if paired else rng.normal(1.0, 1.5, 220)
        v = bootstrap_mean_difference(x, y, paired=paired, n_resamples=400, seed=seed)
        covered += v.ci_low <= true_diff <= v.ci_high
    # Binomial(300, 0.95): sd 1.26%; percentile intervals run slightly narrow at these sizes.
    assert 0.91 <= covered / runs <= 0.985


def test_bootstrap_verdicts_and_scipy_agreement():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    x, y = rng.normal(0.0, 1.0, 400), rng.normal(0.5, 1.0, 300)
    ours = bootstrap_mean_difference(x, y, n_resamples=4000, seed=1)
    ref = bootstrap((x, y), lambda a, b, axis: a.mean(axis) - b.mean(axis), n_resamples=4000, method="percentile", rng=2).confidence_interval
    assert ours.ci_low == pytest.approx(ref.low, abs=0.03) and ours.ci_high == pytest.approx(ref.high, abs=0.03)
    assert ours.passed and ours.value == pytest.approx(x.mean() - y.mean()) and (ours.n, ours.n_other) == (400, 300)
    null = bootstrap_mean_difference(rng.normal(0, 1, 500), rng.normal(0, 1, 500), n_resamples=2000)
    assert not null.passed or null.ci_high >= 0
    positive = bootstrap_mean_difference(y, x, n_resamples=2000)
    assert positive.value > 0 and not positive.passed
    assert np.isnan(bootstrap_mean_difference(np.array([]), x).value)


def test_c1_c2_on_planted_strata():
    rng = np.random.default_rng(0)
    n = 4000
    margin = rng.exponential(1.0, n)
    low = margin < np.quantile(margin, 0.1)
    # Boundary tokens: e_k and e_{k+1} near copies (small κ); everywhere else, and for random experts, far apart.
    kappa_next = np.where(low, rng.uniform(0.05, 0.15, n), rng.uniform(0.4, 0.6, n))
    kappa_rand = rng.uniform(0.4, 0.6, n)
    out = c1_c2(margin, kappa_next, kappa_rand, StrataConfig(), n_resamples=1000)
    assert out["delta_bi"]["pass"] and out["delta_brand"]["pass"]
    assert out["tokens"]["boundary"] == 400 and out["tokens"]["interior"] == 2000
    assert out["delta_bi"]["value"] == pytest.approx(kappa_next[low].mean() - kappa_next[margin > np.quantile(margin, 0.5)].mean())
    null = c1_c2(margin, rng.uniform(0.4, 0.6, n), rng.uniform(0.4, 0.6, n), StrataConfig(), n_resamples=1000)
    for key in ("delta_bi", "delta_brand"):
        assert null[key]["ci_low"] < 0 < null[key]["ci_high"] and not null[key]["pass"]
    absolute = c1_c2(margin, kappa_next, kappa_rand, StrataConfig(boundary_abs=0.05, interior_abs=2.0), n_resamples=200)
    assert absolute["tokens"]["boundary"] == int((margin < 0.05).sum()) and absolute["thresholds"] == {"boundary": 0.05, "interior": 2.0}
    with pytest.raises(ValueError, match="quantiles"):
        StrataConfig(boundary_q=0.6, interior_q=0.5)


def test_reservoir_keeps_everything_until_full_then_a_uniform_sample():
    r = LayerReservoir(capacity=1000, seed=0)
    idx = torch.arange(600, dtype=torch.float32)
    r.add(idx, idx * 0, idx * 0)
    assert r.seen == 600 and np.array_equal(r.arrays()[0], np.arange(600))
    means = []
    for rep in range(20):
        r = LayerReservoir(capacity=1000, seed=rep)
        for start in range(0, 20_000, 700):  # uneven batches
            idx = torch.arange(start, min(start + 700, 20_000), dtype=torch.float32)
            r.add(idx, idx, idx)
        m, _, _ = r.arrays()
        assert len(m) == 1000 and len(np.unique(m)) == 1000 and r.seen == 20_000
        means.append(m.mean())
        # Every tenth of the stream holds ~a tenth of the sample.
        assert np.abs(np.histogram(m, bins=10, range=(0, 20_000))[0] - 100).max() < 45
    assert np.mean(means) == pytest.approx(9999.5, rel=0.02)
