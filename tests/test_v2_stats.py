"""V2 arithmetic: κ, routing ranks, strata, the bootstrap intervals and the bounded-memory reservoir."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geocache.v2 import StrataConfig, TokenReservoir, c1_c2, kappa, routing_ranks, v2_statistics


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


def _synthetic(rng, n_seq=60, per_seq=25, seq_effect=0.0):
    """Tokens with known strata effects: margin ~ U(0, 1) (population boundary: m < 0.1, interior:
    m > 0.5); κ_next lower by 0.1 on boundary tokens (true ΔBI = −0.1), κ_rand above κ_next by 0.05
    (true ΔBrand = −0.05); ``seq_effect`` adds a shared random shift per sequence (correlated tokens)."""
    n = n_seq * per_seq
    seq = np.repeat(np.arange(n_seq), per_seq)
    margin = rng.uniform(0, 1, n)
    shift = rng.normal(0, seq_effect, n_seq)[seq] if seq_effect else 0.0
    k_next = 0.5 - 0.1 * (margin < 0.1) + rng.normal(0, 0.2, n) + shift
    k_rand = k_next + 0.05 + rng.normal(0, 0.1, n) + (rng.normal(0, seq_effect, n_seq)[seq] if seq_effect else 0.0)
    return margin, k_next, k_rand, seq


@pytest.mark.parametrize("clustered", [False, True])
def test_bootstrap_intervals_cover_the_true_differences_at_their_nominal_rate(clustered):
    """Over many seeds the 95% intervals contain the true ΔBI and ΔBrand ~95% of the time; with
    correlated tokens within sequences only the sequence (cluster) bootstrap does."""
    runs, cover_bi, cover_brand, cover_token_level = 200, 0, 0, 0
    for seed in range(runs):
        rng = np.random.default_rng(20_000 + seed)
        margin, k_next, k_rand, seq = _synthetic(rng, seq_effect=0.15 if clustered else 0.0)
        out = c1_c2(margin, k_next, k_rand, StrataConfig(), n_resamples=400, seed=seed, sequence=seq)
        cover_bi += out["delta_bi"]["ci_low"] <= -0.1 <= out["delta_bi"]["ci_high"]
        cover_brand += out["delta_brand"]["ci_low"] <= -0.05 <= out["delta_brand"]["ci_high"]
        if clustered:
            tok = c1_c2(margin, k_next, k_rand, StrataConfig(), n_resamples=400, seed=seed)  # every token its own cluster
            cover_token_level += tok["delta_brand"]["ci_low"] <= -0.05 <= tok["delta_brand"]["ci_high"]
    # Binomial(200, 0.95): sd 1.5%; percentile intervals run slightly narrow at these sizes.
    assert 0.89 <= cover_bi / runs <= 0.99 and 0.89 <= cover_brand / runs <= 0.99
    if clustered:
        assert cover_token_level / runs < 0.8  # ignoring the sequences is over-confident


def test_intervals_agree_with_scipy_and_verdicts_follow_the_sign_rule():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    margin, k_next, k_rand, _ = _synthetic(rng, n_seq=200, per_seq=10)
    out = c1_c2(margin, k_next, k_rand, StrataConfig(), n_resamples=4000, seed=1)
    b = margin < np.quantile(margin, 0.1)
    d = k_next[b] - k_rand[b]
    ref = bootstrap((d,), np.mean, n_resamples=4000, method="percentile", rng=2).confidence_interval
    # Ours resamples all tokens (the boundary count varies per replicate); scipy only the boundary ones.
    assert out["delta_brand"]["ci_low"] == pytest.approx(ref.low, abs=0.01) and out["delta_brand"]["ci_high"] == pytest.approx(ref.high, abs=0.01)
    assert out["delta_brand"]["value"] == pytest.approx(d.mean())
    for key in ("delta_bi", "delta_brand"):
        v = out[key]
        assert v["pass"] == (v["value"] < 0 and v["ci_high"] < 0) and v["pass"]
    flipped = c1_c2(margin, k_rand, k_next, StrataConfig(), n_resamples=500)
    assert flipped["delta_brand"]["value"] > 0 and not flipped["delta_brand"]["pass"]


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
    with pytest.raises(ValueError, match="must not exceed"):
        StrataConfig(boundary_abs=0.5, interior_abs=0.1)
    with pytest.raises(ValueError, match="no tokens"):
        c1_c2(np.array([]), np.array([]), np.array([]), StrataConfig())


def test_aggregates_weight_the_layers_and_carry_their_correlation():
    rng = np.random.default_rng(3)
    margin, k_next, k_rand, seq = _synthetic(rng, n_seq=100, per_seq=20, seq_effect=0.1)
    # Two layers that see the same tokens: identical statistics, perfectly correlated.
    two = v2_statistics(np.stack([margin, margin], 1), np.stack([k_next, k_next], 1), np.stack([k_rand, k_rand], 1), StrataConfig(),
                        sequence=seq, weights={"mean": np.array([0.5, 0.5]), "first": np.array([1.0, 0.0])}, n_resamples=500, seed=0)
    one = c1_c2(margin, k_next, k_rand, StrataConfig(), n_resamples=500, seed=0, sequence=seq)
    for key in ("delta_bi", "delta_brand"):
        agg = two["aggregate"]["mean"][key]
        assert agg["value"] == pytest.approx(one[key]["value"])
        # Independent replicates per layer would shrink the interval by ~1/√2; shared ones do not.
        assert agg["ci_high"] - agg["ci_low"] == pytest.approx(one[key]["ci_high"] - one[key]["ci_low"], rel=1e-9)
        assert two["aggregate"]["first"][key]["value"] == pytest.approx(one[key]["value"])
    three = v2_statistics(np.stack([margin] * 3, 1), np.stack([k_next, k_next + 0.3, k_next], 1), np.stack([k_rand] * 3, 1), StrataConfig(),
                          sequence=seq, weights={"w": np.array([0.2, 0.6, 0.2])}, n_resamples=100)
    vals = [lay["delta_brand"]["value"] for lay in three["layers"]]
    assert three["aggregate"]["w"]["delta_brand"]["value"] == pytest.approx(0.2 * vals[0] + 0.6 * vals[1] + 0.2 * vals[2])


def test_one_sequence_is_refused_and_aggregates_without_any_layer_statistic_have_no_value():
    rng = np.random.default_rng(4)
    margin, k_next, k_rand, seq = _synthetic(rng, n_seq=20, per_seq=10, seq_effect=0.1)
    with pytest.raises(ValueError, match="needs at least 2, but the data gave 1"):
        c1_c2(margin, k_next, k_rand, StrataConfig(), n_resamples=50, sequence=np.zeros(len(margin), dtype=int))
    # No boundary token in any layer (every margin above -1): no C1 or C2 anywhere, so no aggregate either (not 0).
    out = v2_statistics(np.stack([margin, margin], 1), np.stack([k_next, k_next], 1), np.stack([k_rand, k_rand], 1),
                        StrataConfig(boundary_abs=-1.0), sequence=seq, weights={"mean": np.array([0.5, 0.5])}, n_resamples=50)
    for key in ("delta_bi", "delta_brand"):
        agg = out["aggregate"]["mean"][key]
        assert np.isnan(agg["value"]) and not agg["pass"]
    # A layer with C2 but no C1 (boundary tokens, no interior ones) still counts in the C2 aggregate.
    only_c2 = v2_statistics(np.stack([margin, margin], 1), np.stack([k_next, k_next], 1), np.stack([k_rand, k_rand], 1),
                            StrataConfig(boundary_abs=float(np.median(margin)), interior_abs=float(margin.max()) + 1), sequence=seq,
                            weights={"mean": np.array([0.5, 0.5])}, n_resamples=50)
    assert np.isnan(only_c2["aggregate"]["mean"]["delta_bi"]["value"])
    assert only_c2["aggregate"]["mean"]["delta_brand"]["value"] == pytest.approx(only_c2["layers"][0]["delta_brand"]["value"])


def test_reservoir_keeps_everything_until_full_then_a_uniform_sample_shared_by_its_columns():
    r = TokenReservoir(capacity=1000, width=2, seed=0)
    idx = np.arange(600, dtype=np.float64)
    r.add(np.stack([idx, -idx], 1), idx.astype(np.int64))
    data, seq = r.arrays()
    assert r.seen == 600 and np.array_equal(data[:, 0], idx) and np.array_equal(seq, idx)
    means = []
    for rep in range(20):
        r = TokenReservoir(capacity=1000, width=2, seed=rep)
        for start in range(0, 20_000, 700):  # uneven batches
            idx = np.arange(start, min(start + 700, 20_000), dtype=np.float64)
            r.add(np.stack([idx, -idx], 1), idx.astype(np.int64))
        data, seq = r.arrays()
        assert len(data) == 1000 and len(np.unique(data[:, 0])) == 1000 and r.seen == 20_000
        assert np.array_equal(data[:, 1], -data[:, 0]) and np.array_equal(seq, data[:, 0].astype(np.int64))  # columns stay together
        means.append(data[:, 0].mean())
        # Every tenth of the stream holds ~a tenth of the sample.
        assert np.abs(np.histogram(data[:, 0], bins=10, range=(0, 20_000))[0] - 100).max() < 45
    assert np.mean(means) == pytest.approx(9999.5, rel=0.02)
    with pytest.raises(ValueError, match="capacity"):
        TokenReservoir(0, 1)
