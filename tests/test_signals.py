"""Geometry signals, base statistics and cached KL estimators against independent references."""

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from geocache.signals import (
    BaseStats,
    base_kl_terms,
    cached_kl,
    calibration_gap,
    compute_base_stats,
    entropy,
    geometry_signals,
    kl_forward,
    kl_reverse,
    labelled_positions,
    nll,
)


def brute_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def brute_signals(q_row, p_row, y):
    """Per-position signals with Python floats and loops: the independent reference."""
    q, p = brute_softmax(q_row), brute_softmax(p_row)
    h_q = -sum(x * math.log(x) for x in q if x > 0)
    h_p = -sum(x * math.log(x) for x in p if x > 0)
    kl_f = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    kl_r = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q) if qi > 0)
    n = -math.log(q[y])
    return {"H_q": h_q, "H_p": h_p, "dH": h_q - h_p, "kl_forward": kl_f, "kl_reverse": kl_r, "nll": n, "cal_gap": n - h_q}


def test_labelled_positions_shift_labels_once_and_drop_ignored():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    rows, targets = labelled_positions(labels)
    # Row b*T + t predicts labels[b, t+1]; -100 labels (and the first token) never count.
    assert rows.tolist() == [0, 2, 4, 5]
    assert targets.tolist() == [6, 7, 1, 2]


def test_exact_signals_match_brute_force_loops():
    g = torch.Generator().manual_seed(0)
    tuned, base = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3] = labels[1, 1] = -100
    sig = geometry_signals(tuned, base, labels)
    rows, targets = labelled_positions(labels)
    flat_q, flat_p = tuned.reshape(-1, 7).double().tolist(), base.reshape(-1, 7).double().tolist()
    for i, (r, y) in enumerate(zip(rows.tolist(), targets.tolist())):
        ref = brute_signals(flat_q[r], flat_p[r], y)
        for name, value in ref.items():
            assert sig[name][i].item() == pytest.approx(value, abs=2e-5), name


def test_exact_signals_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    q_logits, p_logits = torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)
    cq, cp = torch.distributions.Categorical(logits=q_logits), torch.distributions.Categorical(logits=p_logits)
    torch.testing.assert_close(entropy(q_logits), cq.entropy())
    torch.testing.assert_close(kl_forward(p_logits, q_logits), torch.distributions.kl_divergence(cp, cq))
    torch.testing.assert_close(kl_reverse(p_logits, q_logits), torch.distributions.kl_divergence(cq, cp))
    y = torch.arange(6) % 11
    torch.testing.assert_close(nll(q_logits, y), -cq.log_prob(y))
    torch.testing.assert_close(calibration_gap(q_logits, y), -cq.log_prob(y) - cq.entropy())


def test_half_precision_logits_are_computed_in_float32():
    logits = (torch.randn(4, 50) * 8).to(torch.bfloat16)
    h = entropy(logits)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, torch.distributions.Categorical(logits=logits.double()).entropy().float())


# --------------------------------------------------------------------------------------------
# compute_base_stats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,vocab,k,block_size,chunk_size",
    [
        (7, 13, 3, 256, None),  # vocabulary smaller than one block
        (9, 1000, 5, 64, 4),  # block path, ragged last block (1000 = 15·64 + 40)
        (5, 1000, 5, 7, 2),  # tiny blocks, many candidates
        (4, 300, 300, 64, 3),  # k = V
        (6, 513, 20, 16, 5),  # k·block > V/2: full top-k path
    ],
)
def test_base_stats_match_references(n, vocab, k, block_size, chunk_size):
    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(n, vocab, generator=g) * 4
    logits[0, 17 % vocab] = 30.0  # one very peaked row
    got = compute_base_stats(logits, k=k, m=3, block_size=block_size, chunk_size=chunk_size, generator=g)
    ref = logits.double()
    torch.testing.assert_close(got.lse.double(), ref.logsumexp(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.entropy.double(), torch.distributions.Categorical(logits=ref).entropy(), rtol=0, atol=1e-5)
    top_vals = ref.topk(k, dim=-1).values
    torch.testing.assert_close(got.topk_logprobs.double(), top_vals - ref.logsumexp(-1, keepdim=True), rtol=0, atol=1e-5)
    # ids are the tokens whose log-probs were reported, distinct, sorted by descending probability
    torch.testing.assert_close(ref.gather(1, got.topk_ids), top_vals, rtol=0, atol=1e-6)
    assert all(len(set(r)) == k for r in got.topk_ids.tolist())
    assert (got.topk_logprobs[:, :-1] >= got.topk_logprobs[:, 1:]).all()


def test_base_stats_of_selected_rows_equal_stats_of_those_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 40, generator=g)
    rows = torch.tensor([3, 0, 19, 7])
    a = compute_base_stats(logits, k=4, rows=rows)
    b = compute_base_stats(logits[rows], k=4)
    torch.testing.assert_close(a.lse, b.lse)
    assert torch.equal(a.topk_ids, b.topk_ids)


def test_tail_samples_follow_the_base_distribution_restricted_to_the_tail():
    g = torch.Generator().manual_seed(4)
    vocab, k, draws = 30, 5, 6000
    row = torch.randn(vocab, generator=g) * 2
    stats_ = compute_base_stats(row.expand(draws // 4, vocab).contiguous(), k=k, m=4, generator=g, block_size=8)
    top = set(stats_.topk_ids[0].tolist())
    ids = stats_.sample_ids.flatten()
    assert not top & set(ids.tolist()), "a tail sample landed in the top-k"
    lp = torch.log_softmax(row.double(), -1)
    torch.testing.assert_close(stats_.sample_logprobs.double(), lp[stats_.sample_ids], rtol=0, atol=1e-5)
    tail = [j for j in range(vocab) if j not in top]
    p_tail = lp.exp()[tail] / lp.exp()[tail].sum()
    observed = np.bincount(ids.numpy(), minlength=vocab)[tail]
    assert sps.chisquare(observed, p_tail.numpy() * observed.sum()).pvalue > 1e-3


def test_tail_samples_are_reproducible_with_a_seeded_generator_and_chunking_does_not_change_statistics():
    logits = torch.randn(10, 200, generator=torch.Generator().manual_seed(5))
    a = compute_base_stats(logits, k=8, m=4, generator=torch.Generator().manual_seed(9), chunk_size=3)
    b = compute_base_stats(logits, k=8, m=4, generator=torch.Generator().manual_seed(9), chunk_size=3)
    c = compute_base_stats(logits, k=8, m=4, generator=torch.Generator().manual_seed(9), chunk_size=10)
    assert torch.equal(a.sample_ids, b.sample_ids)
    torch.testing.assert_close(a.lse, c.lse)
    torch.testing.assert_close(a.entropy, c.entropy)
    assert torch.equal(a.topk_ids, c.topk_ids)
    assert torch.equal(a.sample_ids, c.sample_ids)  # a row's draws are its own uniforms', whatever the chunks
    torch.testing.assert_close(a.sample_logprobs, c.sample_logprobs)


def test_uniforms_make_each_rows_samples_independent_of_the_call():
    """Rows called one group at a time, each with its own generator's uniforms, get the samples
    of one call over them all with those uniforms side by side (precompute may batch sequences)."""
    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(6)) * 3
    u = [torch.rand(n, 4, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, n in enumerate((5, 7))]
    whole = compute_base_stats(logits, k=8, m=4, uniforms=torch.cat(u), chunk_size=4)
    parts = [compute_base_stats(logits[:5], k=8, m=4, generator=torch.Generator().manual_seed(0)),
             compute_base_stats(logits[5:], k=8, m=4, generator=torch.Generator().manual_seed(1), chunk_size=3)]
    assert torch.equal(whole.sample_ids, torch.cat([p.sample_ids for p in parts]))
    with pytest.raises(ValueError, match=r"uniforms must be \[12, 4, 2\] \(rows, samples, two draws\), not \(12, 4\)"):
        compute_base_stats(logits, k=8, m=4, uniforms=torch.rand(12, 4, dtype=torch.float64))


@given(st.lists(st.sampled_from([0.0, 1e-30, 1e-12, 1.0, 3.0]), min_size=2, max_size=12), st.floats(0, 1, exclude_max=True))
@settings(max_examples=200, deadline=None)
def test_inverting_the_cdf_never_draws_a_zero_weight_index(weights, u):
    from geocache.signals import _invert_cdf

    w = torch.tensor(weights, dtype=torch.float32)
    if w.sum() == 0:
        w[0] = 1.0
    for x in (u, 1 - 2**-53, 0.0):
        i = int(_invert_cdf(w.unsqueeze(0), torch.tensor([[x]], dtype=torch.float64)))
        assert 0 <= i < len(weights) and w[i] > 0
        below = float(w[:i].double().sum())
        assert below <= x * float(w.double().sum()) or i == int((w > 0).nonzero().max())  # the inverse CDF's index


def test_empty_tail_marks_samples_missing():
    stats_ = compute_base_stats(torch.randn(3, 6), k=6, m=2)
    assert torch.isneginf(stats_.sample_logprobs).all()


def test_bfloat16_base_logits_give_float32_statistics():
    logits = (torch.randn(4, 300) * 5).to(torch.bfloat16)
    got = compute_base_stats(logits, k=4)
    assert got.lse.dtype == torch.float32
    torch.testing.assert_close(got.lse, logits.float().logsumexp(-1))


def test_non_finite_base_logits_are_an_error_naming_the_rows():
    logits = torch.randn(5, 40)
    logits[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at rows \[3\]"):
        compute_base_stats(logits, k=2)
    logits[3, 2] = float("inf")
    # With a row selection, the error names the rows of the logits tensor it was given.
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        compute_base_stats(logits, k=2, rows=torch.tensor([0, 3, 4]), chunk_size=1)


def test_minus_inf_logits_are_a_masked_vocabulary_not_an_error():
    """−inf logits (tokens a model never emits) are probability 0: statistics equal
    torch.distributions', the masked ids are never in the top-k nor sampled."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) * 3
    masked = torch.tensor([0, 5, 6, 39])
    logits[:, masked] = -math.inf
    got = compute_base_stats(logits, k=8, m=16, generator=torch.Generator().manual_seed(0), block_size=4)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(got.lse, logits.logsumexp(-1))
    torch.testing.assert_close(got.entropy, dist.entropy())
    assert not torch.isin(got.topk_ids, masked).any() and not torch.isin(got.sample_ids, masked).any()
    assert torch.isfinite(got.sample_logprobs).all()


def test_a_masked_vocabulary_smaller_than_k_gives_finite_cached_kl():
    """Only 3 tokens can occur and k = 5: the top-k holds tokens of probability 0 (log p = −inf)."""
    logits = torch.full((4, 12), -math.inf)
    logits[:, [1, 4, 9]] = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    base = compute_base_stats(logits, k=5, m=2, generator=torch.Generator().manual_seed(0))
    assert torch.isneginf(base.topk_logprobs).any()
    tuned = logits.clone()
    tuned[:, [1, 4, 9]] += 0.3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    # The exact values on the 3 tokens that can occur (the others have probability 0 on both sides).
    sub_p, sub_q = logits[:, [1, 4, 9]].double(), tuned[:, [1, 4, 9]].double()
    exact = {"forward": kl_forward(sub_p, sub_q), "reverse": kl_reverse(sub_p, sub_q)}
    for masked in (tuned, tuned.clamp_min(-1e4)):  # −inf itself, and a large finite stand-in
        for estimator in ("topk_tail", "topk_sampled", "topk_cv", "topk_hybrid", "topk_renorm"):
            for direction in ("forward", "reverse"):
                kl = cached_kl(masked, base, estimator, direction)
                assert torch.isfinite(kl).all(), (estimator, direction)
                # k = 5 covers all the mass: every estimator is exact
                torch.testing.assert_close(kl.double(), exact[direction], rtol=1e-5, atol=1e-6, msg=f"{estimator} {direction}")
        # the exact signals from full logits too: masked tokens add 0, not NaN
        torch.testing.assert_close(entropy(masked).double(), entropy(sub_q), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_forward(logits, masked).double(), exact["forward"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_reverse(logits, masked).double(), exact["reverse"], rtol=1e-5, atol=1e-6)
        labels = torch.tensor([[-100, 1, 4, 9]])
        sig = geometry_signals(masked[None], logits[None], labels)
        assert all(torch.isfinite(v).all() for v in sig.values()), {k: v for k, v in sig.items()}
    z = tuned.clone().requires_grad_(True)  # and the gradient is finite (0 on the masked tokens)
    kl_forward(logits, z).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad[:, [0, 2, 3]] == 0).all()


@pytest.mark.parametrize("k", [0, 41])
def test_k_outside_the_vocabulary_is_an_error(k):
    with pytest.raises(ValueError, match=f"k={k} must be between 1 and the vocabulary size 40"):
        compute_base_stats(torch.randn(2, 40), k=k)


# --------------------------------------------------------------------------------------------
# Cached estimators
# --------------------------------------------------------------------------------------------

rows_and_vocab = st.tuples(st.integers(1, 4), st.integers(2, 24), st.integers(0, 2**31 - 1))


def _pair(n, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, g)


@settings(max_examples=60, deadline=None)
@given(rows_and_vocab, st.data())
def test_topk_tail_is_a_lower_bound_and_reverse_coarse_too(shape, data):
    n, vocab, seed = shape
    p_logits, q_logits, g = _pair(n, vocab, seed)
    k = data.draw(st.integers(1, vocab))
    base = compute_base_stats(p_logits, k=k, m=2, generator=g)
    # p_T = 1 − Σ_S p is rounded (absolute error ~1e-16); its logarithm, hence the tail term, is
    # off by ~1e-16 / p_T, which a tiny tail (a peaked base, k close to V) makes larger than 1e-10.
    p_t = (1 - base.topk_logprobs.exp().sum(-1)).clamp_min(1e-300)
    tol = 1e-10 + 1e-14 / p_t
    assert (cached_kl(q_logits, base, "topk_tail") <= kl_forward(p_logits, q_logits) + tol).all()
    assert (cached_kl(q_logits, base, direction="reverse") <= kl_reverse(p_logits, q_logits) + tol).all()
    assert (cached_kl(q_logits, base, "topk_tail") >= -1e-12).all()


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lift", [12.0, 6.0, 0.0])
def test_reverse_coarse_kl_stays_a_lower_bound_when_the_cache_rounds_a_tiny_tail(stored, lift):
    """The cache stores top-k log-probs in 16 bits; 1 − Σ_S p then cannot resolve a tail of ~1e-4
    (a peaked base) and came out ≤ 0 on a fifth of the rows, whose log p_T was floored at the float
    minimum: the coarse reverse KL, a lower bound by SPEC, read several times the exact one."""
    g = torch.Generator().manual_seed(int(lift) + (stored == torch.float16))
    n, vocab, k = 2000, 1000, 64
    p_logits = torch.randn(n, vocab, generator=g)
    p_logits[:, :k] += lift  # lift 12: the top-64 holds ~99.99% of the mass
    exact_stats = compute_base_stats(p_logits, k=k, m=0)
    rounded = BaseStats(exact_stats.lse, exact_stats.entropy, exact_stats.topk_ids, exact_stats.topk_logprobs.to(stored))
    tail = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, exact_stats.topk_ids, False)
    for boost in (0.0, 4.0):  # the tuned model as the base, and with every token outside the top-k raised e^4
        q_logits = torch.where(tail, p_logits + boost, p_logits)
        exact = kl_reverse(p_logits.double(), q_logits.double())
        cached = cached_kl(q_logits, rounded, direction="reverse").double()
        # The head term reads rounded log-probs: off by up to Σ_S q |log p| u (u the unit roundoff).
        lq_s = q_logits.double().log_softmax(-1).gather(1, exact_stats.topk_ids)
        head_rounding = (lq_s.exp() * exact_stats.topk_logprobs.double().abs()).sum(-1) * torch.finfo(stored).eps / 2
        assert (cached <= exact + head_rounding + 1e-6).all(), (cached - exact - head_rounding).max()
        # ... and not a vacuous bound where the tail is within the stored precision's reach (the
        # boost leaves q's shape inside the tail alone: the coarse partition loses nothing)
        if lift == 0.0 and boost:
            torch.testing.assert_close(cached.sum() / exact.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0.05, atol=0)  # bf16: 8 bits


@settings(max_examples=60, deadline=None)
@given(rows_and_vocab, st.sampled_from(["topk_tail", "topk_sampled", "topk_cv", "topk_hybrid", "topk_renorm"]), st.sampled_from(["forward", "reverse"]))
def test_every_estimator_is_exact_when_k_is_the_vocabulary(shape, estimator, direction):
    n, vocab, seed = shape
    p_logits, q_logits, g = _pair(n, vocab, seed)
    base = compute_base_stats(p_logits, k=vocab, m=2, generator=g)
    exact = kl_forward(p_logits, q_logits) if direction == "forward" else kl_reverse(p_logits, q_logits)
    torch.testing.assert_close(cached_kl(q_logits, base, estimator, direction), exact, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(rows_and_vocab, st.floats(-50, 50), st.floats(-50, 50))
def test_estimators_are_invariant_to_adding_a_constant_to_the_logits(shape, c_p, c_q):
    n, vocab, seed = shape
    p_logits, q_logits, _ = _pair(n, vocab, seed)
    k = max(1, vocab // 3)
    a = compute_base_stats(p_logits, k=k, m=3, generator=torch.Generator().manual_seed(1))
    b = compute_base_stats(p_logits + c_p, k=k, m=3, generator=torch.Generator().manual_seed(1))
    for est in ("topk_tail", "topk_sampled", "topk_cv", "topk_hybrid", "topk_renorm"):
        torch.testing.assert_close(cached_kl(q_logits, a, est), cached_kl(q_logits + c_q, b, est), rtol=1e-7, atol=1e-9)


def _constructed_case():
    """A base with a fat tail and a tuned model that moved mass inside the tail."""
    vocab, k = 40, 5
    p_logits = torch.zeros(vocab, dtype=torch.float64)
    p_logits[:k] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0], dtype=torch.float64)
    q_logits = p_logits.clone()
    q_logits[:k] += torch.tensor([0.5, -0.5, 0.3, 0.0, -0.2], dtype=torch.float64)
    q_logits[k : k + 10] += 1.5  # redistributes tail mass: invisible to the top-k head
    return p_logits, q_logits, k


def test_topk_sampled_is_unbiased_and_topk_renorm_is_not():
    p_logits, q_logits, k = _constructed_case()
    reps = 4000
    base = compute_base_stats(p_logits.expand(reps, -1).contiguous(), k=k, m=4, generator=torch.Generator().manual_seed(0))
    exact = kl_forward(p_logits, q_logits).item()
    sampled = cached_kl(q_logits.expand(reps, -1), base, "topk_sampled")
    stderr = sampled.std().item() / math.sqrt(reps)
    assert abs(sampled.mean().item() - exact) < 4 * stderr
    renorm = cached_kl(q_logits.expand(1, -1), base.select(slice(0, 1)), "topk_renorm").item()
    tail = cached_kl(q_logits.expand(1, -1), base.select(slice(0, 1)), "topk_tail").item()
    assert abs(renorm - exact) > 20 * stderr and abs(renorm - exact) > 0.4 * exact  # biased: blind to the tail
    assert tail < exact - 20 * stderr  # the coarse-grained bound loses the within-tail move


def test_topk_hybrid_has_the_control_variate_value_and_the_coarse_grained_gradient():
    p_logits, q_logits, k = _constructed_case()
    reps = 64
    base = compute_base_stats(p_logits.expand(reps, -1).contiguous(), k=k, m=4, generator=torch.Generator().manual_seed(0))
    z = {e: q_logits.expand(reps, -1).clone().requires_grad_(True) for e in ("topk_hybrid", "topk_sampled", "topk_tail", "topk_cv")}
    kl = {e: cached_kl(z[e], base, e) for e in z}
    torch.testing.assert_close(kl["topk_hybrid"], kl["topk_cv"], rtol=1e-12, atol=1e-12)
    assert (kl["topk_hybrid"] - kl["topk_sampled"]).abs().max() > 1e-3
    grads = {e: torch.autograd.grad(kl[e].sum(), z[e])[0] for e in z}
    torch.testing.assert_close(grads["topk_hybrid"], grads["topk_tail"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grads["topk_hybrid"], grads["topk_sampled"])
    # The tail gradient is the same for every draw of the samples; the sampled one is not.
    assert torch.allclose(grads["topk_hybrid"], grads["topk_hybrid"][:1].expand_as(grads["topk_hybrid"]))
    assert not torch.allclose(grads["topk_sampled"], grads["topk_sampled"][:1].expand_as(grads["topk_sampled"]))


def _every_draw(p_logits: torch.Tensor, k: int, m: int) -> tuple[BaseStats, torch.Tensor]:
    """Every ordered m-tuple of tail tokens as one row of BaseStats, and each tuple's probability
    under m independent draws from p(·|tail): the sampling distribution, enumerated."""
    import itertools

    lp = torch.log_softmax(p_logits, -1)
    order = lp.argsort(descending=True)
    top, tail = order[:k], order[k:]
    draws = torch.tensor(list(itertools.product(tail.tolist(), repeat=m)))
    n = draws.shape[0]
    p_tail = lp[tail].exp() / lp[tail].exp().sum()
    where = torch.full((len(p_logits),), -1, dtype=torch.long)
    where[tail] = torch.arange(len(tail))
    prob = p_tail[where[draws]].prod(-1)
    base = BaseStats(
        lse=torch.logsumexp(p_logits, -1).expand(n).clone(),
        entropy=-(lp.exp() * lp).sum().expand(n).clone(),
        topk_ids=top.expand(n, -1).clone(),
        topk_logprobs=lp[top].expand(n, -1).clone(),
        sample_ids=draws,
        sample_logprobs=lp[draws],
    )
    return base, prob


@pytest.mark.parametrize("drift", [0.05, 1.5])
def test_topk_cv_is_exactly_unbiased_and_beats_topk_sampled_near_the_base(drift):
    """Expectation and variance over every possible draw of m = 4 tail samples (7^4 tuples), not a
    Monte Carlo estimate: the control-variate value has the exact KL as its mean, like the plain
    sampled one. Near the base (drift 0.05) its variance is a small fraction of the sampled one's;
    far from it (1.5, tail tokens moved by up to 3 nats) it is no worse."""
    g = torch.Generator().manual_seed(3)
    vocab, k, m = 10, 3, 4
    p_logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    q_logits = p_logits + drift * torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    base, prob = _every_draw(p_logits, k, m)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    exact = kl_forward(p_logits, q_logits).item()
    z = q_logits.expand(len(prob), -1)
    values = {e: cached_kl(z, base, e) for e in ("topk_sampled", "topk_cv")}
    mean = {e: (prob * v).sum().item() for e, v in values.items()}
    var = {e: (prob * (v - mean[e]) ** 2).sum().item() for e, v in values.items()}
    assert mean["topk_cv"] == pytest.approx(exact, rel=1e-10, abs=1e-13)
    assert mean["topk_sampled"] == pytest.approx(exact, rel=1e-10, abs=1e-13)
    if drift < 0.1:
        assert var["topk_cv"] < 0.1 * var["topk_sampled"]
    else:
        assert var["topk_cv"] < var["topk_sampled"]
    # Each row's value against loops over the samples: the coarse-grained KL plus p_T times the
    # samples' mean of e^u − 1 − u, u = log(q/p) − log(q_T/p_T) (head and p_T from the statistics).
    lq = torch.log_softmax(q_logits, -1)
    p_s = base.topk_logprobs[0].exp()
    head = (p_s * (base.topk_logprobs[0] - lq[base.topk_ids[0]])).sum().item()
    p_t = 1 - p_s.sum().item()
    q_t = 1 - lq[base.topk_ids[0]].exp().sum().item()
    for i in torch.randint(0, len(prob), (25,), generator=g).tolist():
        us = [b - a - math.log(q_t / p_t) for a, b in zip(base.sample_logprobs[i].tolist(), lq[base.sample_ids[i]].tolist())]
        want = head + p_t * math.log(p_t / q_t) + p_t * sum(math.expm1(u) - u for u in us) / len(us)
        assert values["topk_cv"][i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert values["topk_cv"][i].item() >= cached_kl(q_logits[None], base.select(slice(i, i + 1)), "topk_tail").item() - 1e-12


def test_topk_cv_carries_the_sampled_gradient_and_skips_missing_samples():
    p_logits, q_logits, k = _constructed_case()
    reps = 32
    base = compute_base_stats(p_logits.expand(reps, -1).contiguous(), k=k, m=5, generator=torch.Generator().manual_seed(0))
    z = {e: q_logits.expand(reps, -1).clone().requires_grad_(True) for e in ("topk_cv", "topk_sampled")}
    kl = {e: cached_kl(z[e], base, e) for e in z}
    grads = {e: torch.autograd.grad(kl[e].sum(), z[e])[0] for e in z}
    torch.testing.assert_close(grads["topk_cv"], grads["topk_sampled"], rtol=0, atol=0)
    assert (kl["topk_cv"] - kl["topk_sampled"]).abs().max() > 1e-3
    # Missing samples (−inf, as for an empty tail) weigh nothing: the rows equal rows without them.
    holed = BaseStats(**{f.name: getattr(base, f.name).clone() for f in fields(BaseStats)})
    holed.sample_logprobs[:, 1] = -math.inf
    holed.sample_logprobs[:4, 3] = -math.inf
    keep = [0, 2, 4]
    short = BaseStats(base.lse, base.entropy, base.topk_ids, base.topk_logprobs, base.sample_ids[:, keep], base.sample_logprobs[:, keep])
    with_holes = cached_kl(q_logits.expand(reps, -1), holed, "topk_cv")
    torch.testing.assert_close(with_holes[:4], cached_kl(q_logits.expand(4, -1), short.select(slice(0, 4)), "topk_cv"))
    keep = [0, 2, 3, 4]
    short = BaseStats(base.lse, base.entropy, base.topk_ids, base.topk_logprobs, base.sample_ids[:, keep], base.sample_logprobs[:, keep])
    torch.testing.assert_close(with_holes[4:], cached_kl(q_logits.expand(reps - 4, -1), short.select(slice(4, None)), "topk_cv"))


def test_topk_cv_reads_q_t_from_the_top_k_only_where_that_is_precise():
    """In the loss's fast path the tuned tail mass is 1 − Σ_S q (no vocabulary pass): the same value
    as from the summed tail, except where the tuned tail has collapsed below float32's reach of
    that difference, where the sampled value (which needs no q_T) is taken instead."""
    from geocache.signals import cached_kl_terms, log_probs, log_tail_mass

    g = torch.Generator().manual_seed(5)
    p_logits = torch.randn(6, 50, generator=g) * 2
    base = compute_base_stats(p_logits, k=8, m=6, generator=g)
    ids = base.topk_ids.long()
    z = torch.randn(6, 50, generator=g) * 2
    z[:2] = -30.0  # rows 0-1: the tuned model keeps (almost) nothing outside the cached top-k
    z[:2].scatter_(1, ids[:2], 5.0)
    lq = log_probs(z)
    lq_s, lq_x, tail = lq.gather(-1, ids), lq.gather(-1, base.sample_ids.long()), log_tail_mass(lq, ids)
    with_tail = {e: cached_kl_terms(lq_s, lq_x, tail, base, e)[0] for e in ("topk_cv", "topk_sampled")}
    fast = {e: cached_kl_terms(lq_s, lq_x, None, base, e)[0] for e in ("topk_cv", "topk_sampled")}
    assert (tail[:2].exp() < 1e-3).all() and (tail[2:].exp() > 1e-2).all()
    torch.testing.assert_close(fast["topk_cv"][2:], with_tail["topk_cv"][2:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast["topk_cv"][:2], fast["topk_sampled"][:2], rtol=0, atol=0)
    assert not torch.allclose(with_tail["topk_cv"][:2], with_tail["topk_sampled"][:2])


def test_topk_cv_falls_back_where_float16_rounding_swamps_the_tail_mass():
    """A peaked base (two likely tokens, the rest 25 nats below) cached as a cache stores it, log-probs
    in float16: p_T = 1 − Σ_S p is then rounding noise (~1e-4) against a true tail of ~1e-9, and
    dividing by it inside the control variate's logarithm blew an exact KL of 0 up to ~6 nats.
    Such rows take topk_sampled's value, on both paths (tuned tail mass given or not)."""
    from geocache.signals import cached_kl_terms, log_probs, log_tail_mass

    z = torch.full((64, 1000), -25.0)
    z[:, 0], z[:, 1] = 0.0, torch.linspace(-1.5, 1.5, 64)
    b = compute_base_stats(z, k=8, m=16, generator=torch.Generator().manual_seed(1))
    stored = BaseStats(b.lse, b.entropy, b.topk_ids, b.topk_logprobs.half(), b.sample_ids, b.sample_logprobs.half())
    lq = log_probs(z)  # the tuned model is the base: the exact KL is 0
    ids = stored.topk_ids.long()
    lq_s, lq_x, tail = lq.gather(-1, ids), lq.gather(-1, stored.sample_ids.long()), log_tail_mass(lq, ids)
    for estimator in ("topk_cv", "topk_hybrid"):
        assert cached_kl(z, stored, estimator).abs().max() < 1e-3
        assert cached_kl_terms(lq_s, lq_x, tail, stored, estimator)[0].abs().max() < 1e-3
    assert cached_kl_terms(lq_s, lq_x, None, stored, "topk_cv")[0].abs().max() < 1e-3
    assert not base_kl_terms(stored, torch.float32, "topk_cv").cv_ok.any()
    # In float32 (a live base's statistics) 1 − Σ_S p cannot resolve a tail of 1e-8 either; in
    # float64 it can, and there is no fallback.
    assert not base_kl_terms(b, torch.float32, "topk_cv").cv_ok.any()
    b64 = compute_base_stats(z.double(), k=8, m=16, generator=torch.Generator().manual_seed(1))
    assert base_kl_terms(b64, torch.float64, "topk_cv").cv_ok.all()
    assert cached_kl(z.double(), b64, "topk_cv").abs().max() < 1e-3


def test_topk_cv_takes_the_sampled_value_where_the_tuned_tail_collapsed():
    """A tuned tail mass below float32's smallest normal is floored; the control variate would
    then be off by p_T, so the row takes topk_sampled's value (the exact KL is ~85 nats here)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 200, generator=g)
    b = compute_base_stats(p, k=8, m=64, generator=torch.Generator().manual_seed(1))
    q = p.clone().scatter_(1, b.topk_ids.long(), 60.0)
    q[torch.ones_like(q, dtype=torch.bool).scatter_(1, b.topk_ids.long(), False)] -= 60.0
    torch.testing.assert_close(cached_kl(q, b, "topk_cv"), cached_kl(q, b, "topk_sampled"), rtol=0, atol=0)
    torch.testing.assert_close(cached_kl(q, b, "topk_cv"), kl_forward(p, q), rtol=1e-5, atol=0)


def test_base_stats_select_and_sizes():
    base = compute_base_stats(torch.randn(6, 30), k=4, m=2)
    assert (base.num_positions, base.k, base.m) == (6, 4, 2)
    sub = base.select(torch.tensor([5, 1]))
    assert torch.equal(sub.topk_ids, base.topk_ids[[5, 1]])
    assert isinstance(sub, BaseStats)


def test_rounded_cached_logprobs_at_k_equal_vocab_add_no_phantom_tail():
    """With k = V the tail is empty on both sides: rounding noise in Σ p must not become a tail term."""
    p_logits, q_logits, g = _pair(6, 300, 11, scale=0.5)  # flat: float16 rounding of log p is coarsest
    base = compute_base_stats(p_logits.float(), k=300, m=0, generator=g)
    base.topk_logprobs = base.topk_logprobs.half()
    assert (1 - base.topk_logprobs.double().exp().sum(-1)).abs().max() > 1e-5  # the noise is there
    exact = kl_forward(p_logits, q_logits)
    for direction in ("forward", "reverse"):
        est = cached_kl(q_logits.float(), base, "topk_tail", direction).double()
        ref = exact if direction == "forward" else kl_reverse(p_logits, q_logits)
        torch.testing.assert_close(est, ref, rtol=2e-2, atol=1e-4)


def test_base_terms_for_one_estimator_serve_it_and_refuse_another():
    """``base_kl_terms(..., estimator)`` leaves out what that estimator never reads; its KL and
    sparse gradient equal those from every term, and another estimator is refused, not fed None."""
    from geocache.signals import base_kl_terms, cached_kl_terms, log_probs, log_tail_mass

    g = torch.Generator().manual_seed(4)
    base = BaseStats.from_logits(torch.randn(1, 9, 40, generator=g), torch.randint(0, 40, (1, 9), generator=g), k=6, m=3, generator=g)
    lq = log_probs(torch.randn(8, 40, generator=g))
    lq_s, lq_x, tail = lq.gather(-1, base.topk_ids.long()), lq.gather(-1, base.sample_ids.long()), log_tail_mass(lq, base.topk_ids.long())
    for estimator, direction in [("topk_sampled", "forward"), ("topk_tail", "forward"), ("topk_hybrid", "forward"),
                                 ("topk_renorm", "forward"), ("topk_tail", "reverse")]:
        few = base_kl_terms(base, torch.float32, estimator, direction)
        args = (lq_s, lq_x, None if estimator in ("topk_sampled", "topk_renorm") else tail, base, estimator, direction)
        want, want_coef = cached_kl_terms(*args, terms=base_kl_terms(base, torch.float32))
        got, got_coef = cached_kl_terms(*args, terms=few)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_coef, want_coef):
            torch.testing.assert_close(a, b)
    few = base_kl_terms(base, torch.float32, "topk_renorm")
    assert few.p_s is None and few.w_x is None
    for estimator in ("topk_sampled", "topk_tail"):
        with pytest.raises(ValueError, match="computed for another estimator"):
            cached_kl_terms(lq_s, lq_x, tail, base, estimator, "forward", terms=few)


# --------------------------------------------------------------------------------------------
# compute_base_stats(compiled=True): the dense work as one torch.compile'd reduction
# --------------------------------------------------------------------------------------------

STAT_NAMES = ("lse", "entropy", "topk_ids", "topk_logprobs", "sample_ids", "sample_logprobs")


def hard_logits(n, vocab, k, dtype, seed):
    """Logits with the cases the pass must keep: a peaked row, a fully masked block (−inf, and
    another at the dtype's lowest finite value), a row whose only finite logits are its top-k (an
    empty tail), and a ragged last block (vocab % 32 != 0)."""
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    logits[0, 17] = 40.0
    logits[1, 64:96] = -math.inf
    logits[2, k:] = -math.inf
    logits[n - 1, 128:160] = torch.finfo(dtype).min  # a block masked with the dtype's lowest finite value, not −inf
    return logits.to(dtype)


def assert_same_stats(got, ref, atol):
    for name in STAT_NAMES:
        a, b = getattr(got, name), getattr(ref, name)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_statistics_equal_the_eager_pass_and_the_references(dtype, monkeypatch):
    """Through torch.compile (Inductor's C++ backend here): the same top-k and tail samples as the
    eager pass, the values within rounding, on selected rows in shuffled order, cut into chunks."""
    from geocache import signals

    n, vocab, k, m = 12, 1000, 5, 6
    logits = hard_logits(n, vocab, k, dtype, seed=1)
    rows = torch.tensor([3, 0, 11, 2, 7, 1, 9])
    u = torch.rand(len(rows), m, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = compute_base_stats(logits, k=k, m=m, rows=rows, uniforms=u, compiled=False)
    monkeypatch.setattr(signals, "_compiled_chunk_rows", lambda *a: 3)  # three chunks
    got = compute_base_stats(logits, k=k, m=m, rows=rows, uniforms=u, compiled=True)
    assert got.lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_same_stats(got, ref, atol=1e-12 if dtype == torch.float64 else 2e-6)
    exact = logits[rows].double()
    torch.testing.assert_close(got.lse.double(), exact.logsumexp(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.entropy.double(), torch.distributions.Categorical(logits=exact).entropy(), rtol=0, atol=1e-5)
    assert torch.isneginf(got.sample_logprobs[3]).all() and torch.isfinite(got.sample_logprobs[[0, 1, 2, 4, 5, 6]]).all()
    assert not (got.sample_ids.unsqueeze(-1) == got.topk_ids.unsqueeze(1)).any(-1)[[0, 1, 2, 4, 5, 6]].any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(40, 700), st.integers(1, 6), st.integers(0, 5), st.sampled_from([4, 8, 32]),
       st.floats(0.1, 12), st.integers(0, 2**31 - 1))
def test_the_compiled_pass_formulas_equal_the_eager_pass(n, vocab, k, m, block, scale, seed):
    """The combination of per-block moments into lse, entropy, top-k, tail masses and samples,
    with the kernel run eagerly (the formulas the compiled code computes), over shapes and scales."""
    from geocache.signals import _block_moments, _compiled_pass

    if not k * block < vocab // 2:
        return  # the blocks do not apply there; compute_base_stats takes its full top-k
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    u = torch.rand(n, m, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = compute_base_stats(logits, k=k, m=m, uniforms=u, block_size=block, compiled=False)
    got = _compiled_pass(_block_moments, logits, None, k, m, u, block)
    assert_same_stats(got, ref, atol=1e-5)


def test_the_compiled_pass_names_non_finite_rows_and_falls_back_once_when_it_cannot_compile(request):
    from geocache import signals

    logits = hard_logits(6, 500, 4, torch.float32, seed=3)
    logits[4, 9] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at rows \[4\]"):
        compute_base_stats(logits, k=4, m=2, rows=torch.tensor([0, 4, 5]), compiled=True)
    logits[4, 9] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf at rows \[4\]"):
        signals._compiled_pass(signals._block_moments, logits, torch.tensor([0, 4]), 4, 2, torch.rand(2, 2, 2, dtype=torch.float64), 32)
    logits[4, 9] = 0.0
    request.getfixturevalue("no_cxx_compiler")  # from here on, compiling fails
    eager = compute_base_stats(logits, k=4, m=2, generator=torch.Generator().manual_seed(0), compiled=False)
    with pytest.warns(UserWarning, match=r"compile_stats: torch.compile could not build the statistics kernel here \(InductorError: InvalidCxxCompiler: .*\); the statistics pass runs eagerly instead"):
        got = compute_base_stats(logits, k=4, m=2, generator=torch.Generator().manual_seed(0), compiled=True)
    assert_same_stats(got, eager, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_stats(compute_base_stats(logits, k=4, m=2, generator=torch.Generator().manual_seed(0), compiled=True), eager, atol=0)


def test_the_statistics_pass_compiles_only_where_asked_and_torch_compile_is_on(monkeypatch):
    """Default: CUDA with Triton only (so never on this CPU); asked for, it compiles unless
    TORCH_COMPILE_DISABLE/TORCHDYNAMO_DISABLE is set; with k·block over half the vocabulary
    (no blocks to reduce over) the eager pass serves."""
    import torch._dynamo

    from geocache import compiled

    logits = torch.randn(4, 500)
    used = []
    real = compiled.kernels
    monkeypatch.setattr(compiled, "kernels", lambda feature, fns, **kw: used.append(feature) or real(feature, fns, **kw))
    compute_base_stats(logits, k=4)
    compute_base_stats(logits, k=8, compiled=True)  # 8·32 = 256 > 500 / 2
    with torch._dynamo.config.patch(disable=True):
        compute_base_stats(logits, k=4, compiled=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        compute_base_stats(logits, k=4, compiled=True)
    assert used == []
    compute_base_stats(logits, k=4, compiled=True)
    assert used == ["compile_stats"]
    assert compiled.by_default("cpu") is False
