"""GeometryAwareLoss, the scheduler and the router divergence against references computed another way."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from geocache import (
    AdaptiveGeometryScheduler,
    BaseStats,
    GeometryAwareLoss,
    GeometryConfig,
    midband_layer_weights,
    router_divergence_loss,
    router_jaccard,
)
from geocache.signals import cached_kl, kl_forward, kl_reverse, labelled_positions

ESTIMATORS = ["topk_tail", "topk_sampled", "topk_cv", "topk_hybrid", "topk_renorm"]
DIRECTIONS = ["forward", "reverse"]


def reference_loss(tuned, base, labels, cfg: GeometryConfig, estimator=None, dtype=torch.float64):
    """The note's sketch with SPEC's masking, written with plain autograd ops in float64.

    ``base`` is full logits (exact KL) or BaseStats (KL from ``signals.cached_kl``).
    """
    rows, y = labelled_positions(labels)
    q = tuned.reshape(-1, tuned.shape[-1])[rows].to(dtype)
    task = F.cross_entropy(q, y, reduction="none")
    h_q = -(F.softmax(q, -1) * F.log_softmax(q, -1)).sum(-1)
    if isinstance(base, BaseStats):
        h_p = base.entropy.double()
        kl = cached_kl(q, base, estimator or cfg.kl_estimator, cfg.kl_direction)
    else:
        p = base.reshape(-1, base.shape[-1])[rows].double()
        h_p = -(F.softmax(p, -1) * F.log_softmax(p, -1)).sum(-1)
        kl = kl_forward(p, q) if cfg.kl_direction == "forward" else kl_reverse(p, q)
    d_h, gap = h_q - h_p, task - h_q
    kl_pen = torch.where(kl > cfg.kl_threshold, kl - cfg.kl_threshold, torch.zeros_like(kl))
    cal_pen = torch.where(gap > cfg.cal_threshold, gap - cfg.cal_threshold, torch.zeros_like(gap))
    h_pen = torch.where(d_h < -cfg.dh_threshold, -d_h - cfg.dh_threshold, torch.zeros_like(d_h))
    loss = task.mean() + cfg.lambda_kl * kl_pen.mean() + cfg.lambda_cal * cal_pen.mean() + cfg.lambda_entropy * h_pen.mean()
    return loss, {"KL_mean": kl.mean(), "dH_mean": d_h.mean(), "cal_gap_mean": gap.mean(), "task_loss": task.mean()}


def make_batch(seed=0, B=3, T=6, V=13, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    tuned = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    base = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[-1, 4] = labels[1, 1] = -100
    return tuned, base, labels, g


# Thresholds low enough, and λ's large enough, that every hinge is active on some positions.
ACTIVE = dict(lambda_kl=0.5, lambda_cal=0.7, lambda_entropy=0.3, kl_threshold=0.3, final_kl_threshold=0.3, dh_threshold=0.05, cal_threshold=0.2)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_exact_loss_and_gradient_match_the_autograd_reference(direction):
    tuned, base, labels, _ = make_batch()
    loss_fn = GeometryAwareLoss(kl_direction=direction, chunk_size=4, **ACTIVE)
    x = tuned.clone().requires_grad_()
    loss, metrics = loss_fn(x, base, labels)
    loss.backward()
    x_ref = tuned.clone().requires_grad_()
    ref, ref_metrics = reference_loss(x_ref, base, labels, loss_fn.config)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, value in ref_metrics.items():
        torch.testing.assert_close(metrics[name], value.detach())
    assert 0 < metrics["positions_penalized_KL"] < 1 or metrics["positions_penalized_KL"] == 1
    assert metrics["kl_direction"] == direction and metrics["kl_estimator"] == "exact"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("k", [4, 13])
def test_cached_loss_and_gradient_match_the_autograd_reference(direction, estimator, k):
    tuned, base_logits, labels, g = make_batch(seed=k)
    stats = BaseStats.from_logits(base_logits, labels, k=k, m=3, generator=g)
    loss_fn = GeometryAwareLoss(kl_direction=direction, kl_estimator=estimator, chunk_size=5, **ACTIVE)
    x = tuned.clone().requires_grad_()
    loss, metrics = loss_fn(x, stats, labels)
    loss.backward()
    x_ref = tuned.clone().requires_grad_()
    ref, _ = reference_loss(x_ref, stats, labels, loss_fn.config)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert metrics["kl_estimator"] == (estimator if direction == "forward" else "coarse")


# topk_hybrid and topk_cv are left out: their gradients are by construction topk_tail's and
# topk_sampled's, not their own values' (checked against autograd through signals.cached_kl above,
# and in test_signals).
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("base_kind", ["exact", *(e for e in ESTIMATORS if e not in ("topk_hybrid", "topk_cv"))])
def test_gradcheck_in_float64(direction, base_kind):
    tuned, base_logits, labels, g = make_batch(seed=7, B=2, T=5, V=9)
    estimator = "topk_tail" if base_kind == "exact" else base_kind
    base = base_logits if base_kind == "exact" else BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    loss_fn = GeometryAwareLoss(kl_direction=direction, kl_estimator=estimator, chunk_size=3, **ACTIVE)
    x = tuned.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, base, labels)[0], (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["topk_tail", "topk_hybrid"])
def test_a_collapsed_tuned_tail_is_penalised_not_read_as_an_empty_tail(estimator):
    """The tuned tail mass is summed over the tail's own entries; when they underflow (here e^-150
    a token, float32) the tail must be redone in log space, not read as the empty tail of k = V
    (which would drop the penalty) nor as zeros (which would drop its gradient off the top-k)."""
    tuned, base_logits, labels, g = make_batch(seed=5, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    rows, _ = labelled_positions(labels)
    collapsed = tuned.reshape(-1, tuned.shape[-1]).clone()
    keep = torch.full_like(collapsed[rows], -150.0).scatter(1, stats.topk_ids.long(), 0.0)
    collapsed[rows] = keep
    collapsed = collapsed.view_as(tuned)
    loss_fn = GeometryAwareLoss(kl_estimator=estimator, lambda_kl=1.0, lambda_cal=0.0, lambda_entropy=0.0, kl_threshold=0.0, final_kl_threshold=0.0)
    x = collapsed.clone().requires_grad_()
    loss, metrics = loss_fn(x, stats, labels)
    loss.backward()
    # The value: autograd through signals.cached_kl in float32, whose log q_T is a logsumexp over
    # the tail (−147.8 here) floored at log(tiny) = −87.3, as the loss's is.
    ref32, ref_m = reference_loss(collapsed.clone(), stats, labels, loss_fn.config, dtype=torch.float32)
    p_t = 1 - stats.topk_logprobs.double().exp().sum(-1)
    assert metrics["KL_mean"] > (p_t * 80).mean()  # p_T (log p_T − log q_T) with log q_T at the floor
    torch.testing.assert_close(metrics["KL_mean"], ref_m["KL_mean"].float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, ref32.float(), rtol=1e-5, atol=0)
    # The gradient: the floor is on the value only; the float64 reference (no floor reached) has
    # the exact gradient, tail entries (q_j / q_T = 1/|tail| each) included.
    x_ref = collapsed.double().requires_grad_()
    ref64, _ = reference_loss(x_ref, stats, labels, loss_fn.config)
    ref64.backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "base_kind,walk",
    [("exact", "rows"), ("topk_tail", "rows"), ("topk_sampled", "rows"), ("topk_sampled", "spans"), ("topk_cv", "spans"), (None, "spans")],
)
def test_a_masked_vocabulary_of_minus_inf_logits_gives_finite_loss_and_gradient(base_kind, walk):
    """Token ids a model never emits (−inf logits, in the tuned and the base model alike) must act
    as tokens of probability 0: the loss and gradient equal those of logits at −1e4 there, whether
    the positions are walked as rows or as spans (nearly gap-free labels)."""
    from geocache.losses import _chunk_plan

    tuned, base_logits, labels, g = make_batch(seed=11, T=6 if walk == "rows" else 20, dtype=torch.float32)
    if walk == "spans":
        labels[:] = torch.randint(0, 13, labels.shape, generator=g)
    masked = torch.tensor([2, 7])
    labels = labels.masked_fill(torch.isin(labels, masked), 0)
    spannable = base_kind in ("topk_sampled", "topk_cv", None)
    assert _chunk_plan(labelled_positions(labels)[0], 13, "cpu", None, spannable)[1] == (walk == "spans")
    results = []
    for fill in (-math.inf, -1e4):
        t, b = tuned.clone(), base_logits.clone()
        t[..., masked], b[..., masked] = fill, fill
        estimator = "topk_tail" if base_kind in ("exact", None) else base_kind
        if base_kind is None:
            base = None
        else:
            k = 12 if walk == "spans" else 4  # spans: k above the 11 tokens left, masked ones in the top-k at p = 0
            base = b if base_kind == "exact" else BaseStats.from_logits(b, labels, k=k, m=3, generator=torch.Generator().manual_seed(0))
        x = t.requires_grad_()
        loss, metrics = GeometryAwareLoss(kl_estimator=estimator, **ACTIVE)(x, base, labels)
        loss.backward()
        results.append((loss, metrics["KL_mean"], metrics["H_q_mean"], x.grad))
    for got, want in zip(results[0], results[1]):
        assert torch.isfinite(got).all() or (base_kind is None and got.dim() == 0 and torch.isnan(got))  # no base: KL_mean is NaN
        torch.testing.assert_close(got, want, equal_nan=True)


def test_a_tuned_tail_masked_to_minus_inf_spreads_its_gradient_uniformly():
    """Every tuned logit outside the cached top-k at −inf: the tail term's gradient q_j/q_T is the
    uniform 1/|tail| limit, as for tail logits all equal and far below the top-k (−200: their
    probabilities underflow float32 too, and log q_T meets the same floor).
    (topk_tail: a sampled value would be infinite there, the tuned model giving 0 to tokens the
    base draws.)"""
    estimator = "topk_tail"
    tuned, base_logits, labels, g = make_batch(seed=13, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    rows, _ = labelled_positions(labels)
    # Each labelled position's label: its most probable cached token (finite under the mask).
    labels_on_topk = labels.clone()
    b, t = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    labels_on_topk[b, t + 1] = stats.topk_ids[:, 0].long()
    out = []
    for fill in (-math.inf, -200.0):
        z = tuned.reshape(-1, tuned.shape[-1]).clone()
        keep = torch.full_like(z[rows], fill).scatter(1, stats.topk_ids.long(), z[rows].gather(1, stats.topk_ids.long()))
        z[rows] = keep
        x = z.view_as(tuned).requires_grad_()
        loss, metrics = GeometryAwareLoss(kl_estimator=estimator, **ACTIVE)(x, stats, labels_on_topk)
        loss.backward()
        out.append((loss, metrics["KL_mean"], x.grad))
    for got, want in zip(*out):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_bfloat16_logits_on_gap_free_chunks_match_float32():
    """Rows without a gap are read and written in place; bfloat16 logits take the cast path."""
    tuned, base_logits, labels, g = make_batch(seed=17, dtype=torch.float32)
    labels = labels.masked_fill(labels == -100, 1)  # no ignored position: chunks run unbroken
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    x16 = tuned.to(torch.bfloat16).requires_grad_()
    x32 = tuned.to(torch.bfloat16).float().requires_grad_()
    for x in (x16, x32):
        loss, _ = GeometryAwareLoss(chunk_size=2, **ACTIVE)(x, stats, labels)
        loss.backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad.to(torch.bfloat16).float())


def test_cached_loss_equals_exact_loss_when_k_is_the_vocabulary():
    tuned, base_logits, labels, g = make_batch(seed=3)
    stats = BaseStats.from_logits(base_logits, labels, k=13, m=2, generator=g)
    for estimator in ESTIMATORS:
        loss_fn = GeometryAwareLoss(kl_estimator=estimator, **ACTIVE)
        x1, x2 = tuned.clone().requires_grad_(), tuned.clone().requires_grad_()
        l1, _ = loss_fn(x1, stats, labels)
        l2, _ = loss_fn(x2, base_logits, labels)
        l1.backward(), l2.backward()
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(x1.grad, x2.grad)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(DIRECTIONS), st.sampled_from(["exact", "topk_tail"]))
def test_masked_positions_have_no_influence_on_loss_or_gradients(seed, direction, base_kind):
    tuned, base_logits, labels, g = make_batch(seed=seed)
    base = base_logits if base_kind == "exact" else BaseStats.from_logits(base_logits, labels, k=5, m=2, generator=g)
    loss_fn = GeometryAwareLoss(kl_direction=direction, **ACTIVE)
    # Logit rows that predict an ignored label, and the last position of every row, never count.
    counted = torch.zeros(tuned.shape[:2], dtype=torch.bool)
    rows, _ = labelled_positions(labels)
    counted.view(-1)[rows] = True
    noise = torch.randn(tuned.shape, generator=g, dtype=tuned.dtype) * 5 * (~counted).unsqueeze(-1)
    x1, x2 = tuned.clone().requires_grad_(), (tuned + noise).requires_grad_()
    l1, _ = loss_fn(x1, base, labels)
    l2, _ = loss_fn(x2, base, labels)
    l1.backward(), l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert (x1.grad[~counted] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-40, 40), st.sampled_from(DIRECTIONS))
def test_kl_is_nonnegative_zero_for_equal_inputs_and_invariant_to_logit_shifts(seed, c, direction):
    tuned, base_logits, labels, _ = make_batch(seed=seed)
    loss_fn = GeometryAwareLoss(kl_direction=direction)
    _, m = loss_fn(tuned, base_logits, labels)
    assert m["KL_mean"] >= 0
    _, same = loss_fn(tuned, tuned.clone(), labels)
    assert abs(same["KL_mean"]) < 1e-12 and abs(same["dH_mean"]) < 1e-12
    _, shifted = loss_fn(tuned + c, base_logits - c, labels)
    torch.testing.assert_close(shifted["KL_mean"], m["KL_mean"])


def test_penalties_are_zero_below_their_thresholds():
    tuned, base_logits, labels, _ = make_batch()
    loose = GeometryAwareLoss(kl_threshold=1e6, final_kl_threshold=1e6, dh_threshold=1e6, cal_threshold=1e6)
    loss, m = loose(tuned, base_logits, labels)
    torch.testing.assert_close(loss, m["task_loss"])
    assert m["positions_penalized_KL"] == m["positions_penalized_cal"] == m["positions_penalized_H"] == 0


@pytest.mark.parametrize(
    "lam,threshold",
    [("lambda_kl", "kl_threshold"), ("lambda_cal", "cal_threshold"), ("lambda_entropy", "dh_threshold")],
)
def test_each_penalty_is_linear_above_its_threshold(lam, threshold):
    """Lowering a threshold by δ while every position stays above it adds exactly λ·δ."""
    tuned, base_logits, labels, _ = make_batch(scale=4.0)
    tuned = tuned * 0.05  # flat tuned: far from the base, entropy far above it
    if threshold == "dh_threshold":
        tuned, base_logits = base_logits, tuned  # now entropy dropped everywhere
    if threshold == "cal_threshold":  # confident and wrong: every label is the least likely token
        tuned = tuned * 20
        labels[:, 1:] = torch.where(labels[:, 1:] == -100, -100, tuned[:, :-1].argmin(-1))
    others = dict(lambda_kl=0.0, lambda_cal=0.0, lambda_entropy=0.0, kl_threshold=1e6, final_kl_threshold=None, dh_threshold=1e6, cal_threshold=1e6)
    values = []
    for t in (0.0, 0.01, 0.02):
        cfg = {**others, lam: 0.7, threshold: t, "final_kl_threshold": None}
        loss, m = GeometryAwareLoss(**cfg)(tuned, base_logits, labels)
        assert m[{"kl_threshold": "positions_penalized_KL", "cal_threshold": "positions_penalized_cal", "dh_threshold": "positions_penalized_H"}[threshold]] == 1
        values.append((loss - m["task_loss"]).item())
    assert values[0] > 0
    assert values[0] - values[1] == pytest.approx(0.7 * 0.01, rel=1e-9)
    assert values[1] - values[2] == pytest.approx(0.7 * 0.01, rel=1e-9)


def test_chunk_size_does_not_change_loss_or_gradient():
    tuned, base_logits, labels, g = make_batch(dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=5, m=2, generator=g)
    results = []
    for chunk in (1, 4, 1000):
        x = tuned.clone().requires_grad_()
        loss, _ = GeometryAwareLoss(chunk_size=chunk, **ACTIVE)(x, stats, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


@pytest.mark.parametrize("estimator", ["topk_sampled", "topk_renorm", None])
@pytest.mark.parametrize("chunk", [7, 16, None])
def test_spans_across_sequence_gaps_match_the_autograd_reference(estimator, chunk):
    """Nearly gap-free labels (plain text: only each sequence's last row has no next token, plus
    one masked label) are walked in spans of logit rows that cross the gaps; the unlabelled rows
    inside are computed and must end with a zero gradient even when their logits are not finite."""
    from geocache.losses import _chunk_plan

    tuned, base_logits, labels, g = make_batch(seed=11, B=3, T=20, V=11)
    labels[:] = torch.randint(0, 11, labels.shape, generator=g)
    labels[1, 5] = -100
    rows, _ = labelled_positions(labels)
    plan, spans = _chunk_plan(rows, 11, "cpu", chunk, spannable=True)
    assert spans and any(n_span > stop - start for start, stop, _, n_span in plan)  # some span crosses a gap
    tuned[0, -1] = float("nan")  # the last row of sequence 0: no label, inside a span
    tuned[1, 4, 3] = float("inf")  # predicts the masked label
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g) if estimator else None
    loss_fn = GeometryAwareLoss(kl_estimator=estimator or "topk_sampled", chunk_size=chunk, **ACTIVE)
    x = tuned.clone().requires_grad_()
    loss, metrics = loss_fn(x, stats, labels)
    loss.backward()
    gap_rows = torch.ones(tuned.shape[0] * tuned.shape[1], dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.isfinite(x.grad).all() and (x.grad.reshape(-1, 11)[gap_rows] == 0).all()
    clean = tuned.clone()
    clean[0, -1], clean[1, 4, 3] = 0.0, 0.0  # the reference sees finite logits on the unlabelled rows
    x_ref = clean.requires_grad_()
    ref, _ = reference_loss(x_ref, stats, labels, loss_fn.config) if stats is not None else (None, None)
    if stats is None:  # no base: task and calibration terms only
        ref, _ = reference_loss(x_ref, base_logits, labels, GeometryAwareLoss(**dict(ACTIVE, lambda_kl=0.0, lambda_entropy=0.0)).config)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_spans_on_logits_that_are_not_row_major_match_contiguous_ones():
    """Vocabulary-major logits (a transposed view): the gradient is allocated row-major, so the
    spans' flat scatter works and the result equals that of the same logits made contiguous."""
    tuned, base_logits, labels, g = make_batch(seed=5, B=2, T=16, V=11, dtype=torch.float32)
    labels[:] = torch.randint(0, 11, labels.shape, generator=g)
    labels[0, 7] = -100  # a gap inside a span
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    strided = tuned.reshape(-1, 11).t().contiguous().t().reshape(tuned.shape)
    assert not strided.is_contiguous()
    results = []
    for t in (strided, tuned.contiguous()):
        x = t.clone(memory_format=torch.preserve_format).requires_grad_()
        loss, _ = GeometryAwareLoss(**ACTIVE)(x, stats, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_a_long_padding_run_keeps_span_buffers_within_a_chunk():
    """No span's buffer grows past 9/8 of its chunk (plus a row): 64-row chunks over a batch with
    one 212-token padding run go to the rows walk (a span over the run would hold 276 rows),
    though the padding is well under an eighth of the batch; one chunk over the whole batch
    stays a span."""
    from geocache.losses import _chunk_plan

    labels = torch.randint(0, 50, (8, 512))
    labels[3, 300:] = -100  # one short sequence, right-padded
    rows, _ = labelled_positions(labels)
    for chunk, want_spans in ((64, False), (None, True)):
        plan, spans = _chunk_plan(rows, 50, "cpu", chunk, spannable=True, buffers=1)
        assert spans == want_spans
        assert all(n_span - (stop - start) <= max(1, (stop - start) // 8) for start, stop, _, n_span in plan)
    assert len(_chunk_plan(rows, 50, "cpu", None, spannable=True, buffers=1)[0]) == 1


def test_spans_gradcheck_in_float64():
    tuned, base_logits, labels, g = make_batch(seed=3, B=2, T=9, V=7)
    labels[:] = torch.randint(0, 7, labels.shape, generator=g)
    stats = BaseStats.from_logits(base_logits, labels, k=3, m=2, generator=g)
    loss_fn = GeometryAwareLoss(kl_estimator="topk_sampled", chunk_size=6, **ACTIVE)
    from geocache.losses import _chunk_plan

    assert _chunk_plan(labelled_positions(labels)[0], 7, "cpu", 6, spannable=True)[1]
    x = tuned.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, stats, labels)[0], (x,), eps=1e-6, atol=1e-6)


def test_thresholds_argument_overrides_the_config_for_one_call():
    tuned, base_logits, labels, _ = make_batch()
    loss_fn = GeometryAwareLoss(**ACTIVE)
    _, m = loss_fn(tuned, base_logits, labels, thresholds={"kl_threshold": 1e6})
    assert m["positions_penalized_KL"] == 0 and m["kl_threshold"] == 1e6


def test_num_items_in_batch_normalises_every_term():
    tuned, base_logits, labels, _ = make_batch()
    loss_fn = GeometryAwareLoss(**ACTIVE)
    n = labelled_positions(labels)[0].numel()
    x1, x2 = tuned.clone().requires_grad_(), tuned.clone().requires_grad_()
    (l1, m1), (l2, m2) = loss_fn(x1, base_logits, labels), loss_fn(x2, base_logits, labels, num_items_in_batch=4 * n)
    l1.backward(), l2.backward()
    torch.testing.assert_close(l2, l1 / 4)
    torch.testing.assert_close(x2.grad, x1.grad / 4)
    # The metrics are this call's per-position means whatever the normaliser (a trainer weights
    # micro-batches by their positions): the penalties and the task loss too.
    for key in ("task_loss", "kl_penalty", "cal_penalty", "entropy_penalty", "KL_mean", "positions_penalized_KL"):
        torch.testing.assert_close(m2[key], m1[key], msg=key)


def test_float16_gradient_survives_a_gradscaler_sized_backward():
    """float16 logits under a loss scale of 2**16 (GradScaler's first) and 2**10: the gradient is
    finite and matches float32 math on the same logits. Stored already divided by the normaliser it
    underflowed (most entries 0 at 256 positions, vocabulary 4,096), and 2**16 cast to float16 is inf."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 64, 4096
    tuned = (torch.randn(B, T, V, generator=g) * 2).half()
    base = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    stats = BaseStats.from_logits(base, labels, k=16, m=4, generator=g)
    x32 = tuned.float().requires_grad_()
    loss32, _ = GeometryAwareLoss(**ACTIVE)(x32, stats, labels)
    loss32.backward()
    for scale in (2.0**16, 2.0**10):
        x = tuned.clone().requires_grad_()
        loss, _ = GeometryAwareLoss(**ACTIVE)(x, stats, labels)
        assert loss.dtype == torch.float32
        (loss * scale).backward()
        assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
        grad = x.grad.float() / scale
        assert (grad - x32.grad).norm() / x32.grad.norm() < 2e-3
        assert (grad == 0).float().mean() <= (x32.grad == 0).float().mean() + 1e-3  # nothing lost to underflow


def test_bfloat16_logits_get_float32_math_and_a_bfloat16_gradient():
    tuned, base_logits, labels, g = make_batch(dtype=torch.float32, V=50)
    stats = BaseStats.from_logits(base_logits, labels, k=8, m=2, generator=g)
    x = tuned.to(torch.bfloat16).requires_grad_()
    loss, m = GeometryAwareLoss(**ACTIVE)(x, stats, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    loss32, _ = GeometryAwareLoss(**ACTIVE)(x32, stats, labels)
    loss32.backward()
    torch.testing.assert_close(loss, loss32)
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-3, rtol=1e-2)


def test_without_grad_the_loss_still_reports_everything():
    tuned, base_logits, labels, _ = make_batch()
    with torch.no_grad():
        loss, m = GeometryAwareLoss()(tuned.requires_grad_(), base_logits, labels)
    assert not loss.requires_grad and math.isfinite(loss.item())
    expected = {"task_loss", "KL_mean", "dH_mean", "cal_gap_mean", "positions_penalized_KL", "positions_penalized_cal", "positions_penalized_H", "kl_direction", "kl_estimator"}
    assert expected <= set(m)


def test_a_batch_without_labels_gives_zero_loss():
    tuned, base_logits, _, _ = make_batch()
    labels = torch.full(tuned.shape[:2], -100)
    x = tuned.clone().requires_grad_()
    loss, m = GeometryAwareLoss()(x, base_logits, labels)
    loss.backward()
    assert loss.item() == 0 and m["num_positions"] == 0 and (x.grad == 0).all()


def test_bad_inputs_are_one_clear_sentence():
    tuned, base_logits, labels, g = make_batch()
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=0, generator=g)
    loss_fn = GeometryAwareLoss()
    with pytest.raises(ValueError, match="not aligned"):
        loss_fn(tuned, stats.select(slice(0, 3)), labels)
    with pytest.raises(ValueError, match="another vocabulary"):
        loss_fn(tuned[..., :5], stats, labels.clamp(max=4))
    with pytest.raises(ValueError, match="must match tuned logits"):
        loss_fn(tuned, base_logits[..., :5], labels)
    with pytest.raises(ValueError, match="needs tail samples"):
        GeometryAwareLoss(kl_estimator="topk_sampled")(tuned, stats, labels)
    with pytest.raises(ValueError, match=r"token ids in \[0, 13\)"):
        loss_fn(tuned, base_logits, labels.masked_fill(labels == 0, 99) + 50)
    with pytest.raises(TypeError, match="BaseStats"):
        loss_fn(tuned, [1, 2], labels)


# --------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------


def test_scheduler_follows_the_notes_schedule():
    s = AdaptiveGeometryScheduler()
    assert s.get_thresholds(0) == {"kl_threshold": 0.15, "dh_threshold": 0.1, "cal_threshold": 0.05}
    assert s.get_thresholds(500)["kl_threshold"] == pytest.approx(0.115)
    assert s.get_thresholds(1000)["kl_threshold"] == pytest.approx(0.08)
    assert s.get_thresholds(10**6)["kl_threshold"] == pytest.approx(0.08)
    cfg = GeometryConfig(kl_threshold=0.2, final_kl_threshold=None, kl_warmup_steps=10)
    assert AdaptiveGeometryScheduler.from_config(cfg).get_thresholds(5)["kl_threshold"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(warmup_steps=0), "kl_warmup_steps=0 must be a positive integer"),
        (dict(initial_kl=0.05, final_kl=0.1), "final_kl_threshold=0.1 is above kl_threshold=0.05"),
        (dict(dh_threshold=-0.1), "dh_threshold=-0.1 must be a finite number >= 0"),
        (dict(lambda_router=-1.0), "lambda_router=-1.0 must be a finite number >= 0"),
    ],
)
def test_scheduler_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveGeometryScheduler(**kwargs)


# --------------------------------------------------------------------------------------------
# Router divergence
# --------------------------------------------------------------------------------------------


def test_router_jaccard_on_hand_made_sets():
    base = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 5]])
    tuned = torch.tensor([[1, 0], [1, 2], [3, 4], [5, 2]])
    assert router_jaccard(base, tuned).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1.0])


def test_router_kl_matches_torch_distributions_with_layer_weights():
    g = torch.Generator().manual_seed(0)
    tuned = [torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    base = [torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 1.0])
    loss, m = router_divergence_loss(tuned, base, w, top_k=2)
    per_layer = [
        torch.distributions.kl_divergence(torch.distributions.Categorical(logits=b), torch.distributions.Categorical(logits=t)).mean()
        for t, b in zip(tuned, base)
    ]
    expected = sum(wi * d for wi, d in zip(w / w.sum(), per_layer))
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    jacc = torch.stack([router_jaccard(b.topk(2).indices, t.topk(2).indices).mean() for t, b in zip(tuned, base)]).mean()
    torch.testing.assert_close(m["router_jaccard"], jacc.float())


def test_escaped_mass_from_base_topk_ids_and_mask():
    tuned = [torch.tensor([[2.0, 1.0, 0.0, -1.0], [3.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])]
    base_ids = [torch.tensor([[0, 1, 3], [2, 3, 0], [1, 2, 0]])]  # top-(k+1) cached; only the first k count
    mask = torch.tensor([True, True, False])
    loss, m = router_divergence_loss(tuned, base_ids, None, top_k=2, mask=mask)
    r0, r1 = torch.softmax(tuned[0][0], -1), torch.softmax(tuned[0][1], -1)
    expected = ((1 - (r0[0] + r0[1])) + (1 - (r1[2] + r1[3]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["router_jaccard"].item() == pytest.approx((1.0 + 0.0) / 2)


def _coarse_router_kl_reference(tuned, base, r, scoring):
    """KL(r_base‖r_tuned) over the partition {each of the base's r best experts} ∪ {the rest}, by a
    loop over tokens with plain autograd-able float64 (independent of the closed form)."""
    def probs(z):
        return torch.softmax(z, -1) if scoring == "softmax" else torch.sigmoid(z) / torch.sigmoid(z).sum(-1, keepdim=True)

    total = []
    for zt, zb in zip(tuned, base):
        pt, pb = probs(zt), probs(zb)
        kls = []
        for i in range(zt.shape[0]):
            s = pb[i].argsort(descending=True)[:r]
            rest = torch.ones(zt.shape[1], dtype=torch.bool)
            rest[s] = False
            a = torch.cat([pb[i][s], pb[i][rest].sum().unsqueeze(0)])
            b = torch.cat([pt[i][s], pt[i][rest].sum().unsqueeze(0)])
            kls.append(torch.where(a > 0, a * (a / b).log(), 0.0).sum())
        total.append(torch.stack(kls).mean())
    return torch.stack(total)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_kl_from_cached_topk_logprobs_is_the_coarse_kl_zero_at_the_base_and_a_lower_bound(scoring):
    """A top-k router cache (ids and the base's log r at them): the loss is KL over S ∪ {rest}. The
    escaped mass used before was ~0.7 with tuned = base, and pulled routing onto S from step 0."""
    from geocache.losses import router_log_probs

    g = torch.Generator().manual_seed(3)
    L, N, E, r = 2, 9, 8, 3
    base = torch.randn(L, N, E, generator=g, dtype=torch.float64) * 2
    tuned = (base + 0.5 * torch.randn(L, N, E, generator=g, dtype=torch.float64)).requires_grad_()
    ids = router_log_probs(base, scoring).argsort(-1, descending=True)[..., :r]
    logprobs = router_log_probs(base, scoring).gather(-1, ids)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    loss, m = router_divergence_loss(tuned, ids, w, top_k=2, scoring=scoring, base_logprobs=logprobs)
    want = (w * _coarse_router_kl_reference(tuned, base, r, scoring)).sum()
    torch.testing.assert_close(loss, want)
    (g_loss,) = torch.autograd.grad(loss, tuned)
    (g_want,) = torch.autograd.grad(want, tuned)
    torch.testing.assert_close(g_loss, g_want)
    full, _ = router_divergence_loss(tuned, base, w, top_k=2, scoring=scoring)
    assert 0 < loss.item() < full.item()  # a lower bound of the full KL
    at_base, _ = router_divergence_loss(base, ids, w, top_k=2, scoring=scoring, base_logprobs=logprobs)
    assert abs(at_base.item()) < 1e-12
    escaped, _ = router_divergence_loss(base, ids, w, top_k=2, scoring=scoring)
    assert escaped.item() > 0.05  # what the ids alone give at the base
    # float16 log-probs as the cache stores them: ~0 at the base, not the escaped mass
    at_base16, _ = router_divergence_loss(base.float(), ids, w, top_k=2, scoring=scoring, base_logprobs=logprobs.half())
    assert 0 <= at_base16.item() < 1e-5
    # S holding every expert: the coarse KL is the full KL
    all_ids = router_log_probs(base, scoring).argsort(-1, descending=True)
    every, _ = router_divergence_loss(tuned, all_ids, w, top_k=2, scoring=scoring, base_logprobs=router_log_probs(base, scoring).gather(-1, all_ids))
    torch.testing.assert_close(every, full)
    # the tuned router's mass off S underflowing (logits of −200 there): a finite gradient, not NaN
    far = base.float()  # float32, as training runs: exp(−200) underflows there
    far.scatter_(-1, router_log_probs(base, scoring).argsort(-1, descending=True)[..., r:], -200.0 if scoring == "softmax" else -400.0)
    far.requires_grad_()
    l_far, _ = router_divergence_loss(far, ids, w, top_k=2, scoring=scoring, base_logprobs=logprobs.float())
    (g_far,) = torch.autograd.grad(l_far, far)
    assert torch.isfinite(g_far).all()
    sub = torch.tensor([0, 2, 3])  # rows selected inside, as the trainer does
    assert torch.autograd.gradcheck(
        lambda z: router_divergence_loss(z, ids[:, sub], w, top_k=2, rows=sub, scoring=scoring, base_logprobs=logprobs[:, sub])[0],
        (tuned.detach().clone().requires_grad_(),))


def test_sigmoid_scoring_normalises_sigmoid_scores():
    tuned, base = [torch.randn(5, 8, dtype=torch.float64)], [torch.randn(5, 8, dtype=torch.float64)]
    loss, _ = router_divergence_loss(tuned, base, None, top_k=2, scoring="sigmoid")
    rt = torch.sigmoid(tuned[0]) / torch.sigmoid(tuned[0]).sum(-1, keepdim=True)
    rb = torch.sigmoid(base[0]) / torch.sigmoid(base[0]).sum(-1, keepdim=True)
    torch.testing.assert_close(loss, (rb * (rb / rt).log()).sum(-1).mean())


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("base_kind", ["logits", "ids"])
def test_router_divergence_gradcheck(base_kind, scoring):
    """The closed-form gradient against finite differences, over all tokens and over selected
    rows (the trainer's path: tokens 1, 3, 4, 6 of 7 stand for the base's 4)."""
    g = torch.Generator().manual_seed(1)
    tuned = [torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    if base_kind == "logits":
        base = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    else:
        base = [torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]]), torch.tensor([[3, 1], [0, 4], [2, 0], [4, 3]])]
    assert torch.autograd.gradcheck(lambda a, b: router_divergence_loss([a, b], base, None, top_k=2, scoring=scoring)[0], tuple(tuned))
    full = [torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    rows = torch.tensor([1, 3, 4, 6])
    assert torch.autograd.gradcheck(
        lambda a, b: router_divergence_loss([a, b], base, torch.tensor([1.0, 3.0]), top_k=2, rows=rows, scoring=scoring)[0], tuple(full)
    )


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("base_kind", ["logits", "ids"])
def test_router_divergence_rows_mask_and_preselected_agree_with_autograd(base_kind, scoring):
    """Rows selected inside (one index_copy in backward), a mask, and rows selected beforehand
    give the loss and gradient of the same formulas written with plain autograd."""
    g = torch.Generator().manual_seed(5)
    L, N, E = 3, 11, 6
    tuned = torch.randn(L, N, E, generator=g)
    rows = torch.tensor([0, 2, 3, 4, 7, 10])
    mask = torch.zeros(N, dtype=torch.bool).index_fill_(0, rows, True)
    base = torch.randn(L, len(rows), E, generator=g)
    if base_kind == "ids":
        base = base.argsort(-1, descending=True)[..., :3]
    w = torch.tensor([0.2, 0.5, 0.3])

    def reference(t):
        x = t[:, rows]
        ls = torch.nn.functional.logsigmoid(x) if scoring == "sigmoid" else x
        log_rt = ls.log_softmax(-1)
        if base_kind == "logits":
            lb = torch.nn.functional.logsigmoid(base) if scoring == "sigmoid" else base
            log_rb = lb.log_softmax(-1)
            div = (log_rb.exp() * (log_rb - log_rt)).sum(-1)
        else:
            div = 1 - log_rt.exp().gather(-1, base[..., :2]).sum(-1)
        return (w * div.mean(-1)).sum()

    t_ref = tuned.clone().requires_grad_()
    want = reference(t_ref)
    want.backward()
    # a mask selects the same tokens of tuned and base logits alike
    base_all = base.new_zeros(L, N, base.shape[-1]).index_copy_(1, rows, base)
    for kw in ({"rows": rows}, {"mask": mask}, {}):
        t = tuned.clone().requires_grad_()
        got, m = router_divergence_loss(t if kw else t[:, rows], base_all if "mask" in kw else base, w, top_k=2, scoring=scoring, **kw)
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(t.grad, t_ref.grad)
        assert t.grad[:, ~mask].abs().max() == 0
    # rows repeated or out of order (their gradients summed), as int32, against plain autograd
    odd = torch.tensor([3, 0, 3, 10, 2, 2], dtype=torch.int32)
    t_ref = tuned.clone().requires_grad_()
    rows_saved, rows = rows, odd.long()
    want = reference(t_ref)
    want.backward()
    t = tuned.clone().requires_grad_()
    got, _ = router_divergence_loss(t, base, w, top_k=2, scoring=scoring, rows=odd)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(t.grad, t_ref.grad)
    rows = rows_saved
    with pytest.raises(ValueError, match="a mask or rows, not both"):
        router_divergence_loss(tuned, base, w, rows=rows, mask=mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        router_divergence_loss(tuned, base_all, w, mask=mask.long())
    # The closed-form gradient is not itself differentiable: a second derivative says so instead
    # of silently leaving this loss out (here through a weight that carries a gradient).
    t, weight = tuned.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(router_divergence_loss(t, base, w, rows=rows)[0], t, grad_outputs=weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    with pytest.raises(ValueError, match="cover 5 tokens but base ones 6"):
        router_divergence_loss(tuned, base, w, rows=rows[:5])


def test_router_layers_given_stacked_or_as_a_list_agree_and_mixed_kinds_are_refused():
    g = torch.Generator().manual_seed(3)
    tuned = torch.randn(3, 6, 8, generator=g)
    base = torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    a, ma = router_divergence_loss(tuned, base, None, top_k=2, mask=mask)
    b, mb = router_divergence_loss(list(tuned), list(base), None, top_k=2, mask=mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ma["router_jaccard_per_layer"], mb["router_jaccard_per_layer"])
    per_layer = [router_divergence_loss([t[mask]], [p[mask]], None, top_k=2)[0] for t, p in zip(tuned, base)]
    torch.testing.assert_close(ma["router_divergence_per_layer"], torch.stack(per_layer))
    for top_k in (1, 2, 3):  # the membership sets against torch.topk's
        _, m = router_divergence_loss(tuned, base, None, top_k=top_k)
        want = torch.stack([router_jaccard(p.topk(top_k, -1).indices, t.topk(top_k, -1).indices).mean() for t, p in zip(tuned, base)])
        torch.testing.assert_close(m["router_jaccard_per_layer"], want)
        _, m = router_divergence_loss(tuned, base.argsort(-1, descending=True), None, top_k=top_k)  # base as expert ids
        torch.testing.assert_close(m["router_jaccard_per_layer"], want)
    with pytest.raises(ValueError, match="router layers must share one shape per token"):
        router_divergence_loss(list(tuned[:2]), [base[0], base[1, :, :2].argsort(-1)], None, top_k=2)


def test_midband_weights_peak_over_the_middle_third_and_sum_to_one():
    for n in (1, 2, 3, 7, 24, 61):
        w = midband_layer_weights(n)
        assert w.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w, w.flip(0))  # symmetric
        x = (torch.arange(n) + 0.5) / n
        middle = (x >= 1 / 3) & (x <= 2 / 3)
        if middle.any():
            assert torch.allclose(w[middle], w.max())
    w = midband_layer_weights(24)
    assert w[0] < w[4] < w[8] and w[0] == pytest.approx(0.1 * w.max().item(), rel=0.2)


def test_router_sets_hold_exactly_top_k_experts_when_logits_tie():
    """float16 router logits tie; each set still holds top_k experts (the lowest index first)."""
    tuned = torch.zeros(2, 5, 6, dtype=torch.float16)  # all tied
    base = torch.zeros(2, 5, 6, dtype=torch.float16)
    base[..., 4] = 1.0  # expert 4 first, then ties: 0
    _, m = router_divergence_loss(tuned, base, None, top_k=2)
    # tuned sets {0, 1}, base sets {4, 0}: Jaccard 1/3
    torch.testing.assert_close(m["router_jaccard_per_layer"], torch.full((2,), 1 / 3))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**31 - 1), st.sampled_from([2, 5, 16]))
def test_top_k_members_match_a_stable_sort_with_and_without_ties(k, seed, levels):
    """The membership sets equal the first k of a stable descending sort (ties: lowest index),
    whether no token ties (the fast path) or some do (few distinct levels force ties)."""
    from geocache.losses import _top_k_members

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (2, 4, 33), generator=g).float() + torch.rand(2, 4, 33, generator=g) * (levels == 16)
    order = torch.sort(-x, dim=1, stable=True).indices[:, :k]
    want = torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(_top_k_members(x, k), want)


def test_router_layer_weight_and_shape_errors():
    t = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match="layer_weights has 3 entries but the model has 2 MoE layers"):
        router_divergence_loss(t, t, [1, 1, 1])
    with pytest.raises(ValueError, match="must be finite, >= 0"):
        router_divergence_loss(t, t, [1, -1])
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 experts"):
        router_divergence_loss(t, t, None, top_k=5)
    with pytest.raises(ValueError, match="they must match"):
        router_divergence_loss(t, t[:1])


def test_without_a_base_only_task_and_calibration_terms_apply():
    tuned, base_logits, labels, _ = make_batch()
    cfg = dict(ACTIVE, lambda_kl=0.0, lambda_entropy=0.0)
    x1, x2 = tuned.clone().requires_grad_(), tuned.clone().requires_grad_()
    l1, m1 = GeometryAwareLoss(**ACTIVE)(x1, None, labels)
    l2, _ = GeometryAwareLoss(**cfg)(x2, base_logits, labels)  # the same terms, with a base present
    l1.backward(), l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert math.isnan(m1["KL_mean"]) and math.isnan(m1["dH_mean"]) and m1["kl_estimator"] == "none"
    # The masks that read the base are undefined too (NaN: a trainer's mean over steps skips them, where 0
    # would dilute it); the calibration mask needs no base.
    assert math.isnan(m1["positions_penalized_KL"]) and math.isnan(m1["positions_penalized_H"]) and m1["positions_penalized_cal"] > 0
    # and so are the penalties that read it (0 in the loss, NaN in the metrics), not the calibration one
    assert math.isnan(m1["kl_penalty"]) and math.isnan(m1["entropy_penalty"]) and m1["cal_penalty"] > 0


@pytest.mark.parametrize("estimator", ["topk_sampled", "topk_cv", "topk_tail"])
def test_the_loss_inside_a_users_autocast_block_computes_in_float32(estimator):
    """Called the standard AMP way (inside ``torch.autocast``), ``vecdot`` ran in bfloat16: the
    sampled tail term moved ~0.02 nats a position and the penalised fraction with it."""
    g = torch.Generator().manual_seed(0)
    V, N = 512, 96
    base_logits = torch.randn(1, N, V, generator=g) * 3.0
    tuned = (base_logits + 0.3 * torch.randn(1, N, V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (1, N), generator=g)
    stats = BaseStats.from_logits(base_logits, labels, k=64, m=4, generator=g)
    loss_fn = GeometryAwareLoss(kl_estimator=estimator, kl_threshold=0.0, final_kl_threshold=0.0)
    outside, m_out = loss_fn(tuned, stats, labels)
    (g_out,) = torch.autograd.grad(outside, tuned)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, m_in = loss_fn(tuned, stats, labels)
        kl_in = cached_kl(tuned[0, :-1], BaseStats.from_logits(base_logits, labels, k=64, m=4, generator=torch.Generator().manual_seed(1)), estimator)
    (g_in,) = torch.autograd.grad(inside, tuned)
    kl_out = cached_kl(tuned[0, :-1], BaseStats.from_logits(base_logits, labels, k=64, m=4, generator=torch.Generator().manual_seed(1)), estimator)
    assert inside.dtype == torch.float32 and kl_in.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_in, g_out, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(kl_in, kl_out, rtol=1e-6, atol=1e-7)
    assert m_in["KL_mean"] == m_out["KL_mean"]


# --- compile_loss: the fused kernels (torch.compile; on the CPU through Inductor's C++ backend) ---


@pytest.mark.parametrize("estimator", ["topk_cv", "topk_sampled", "topk_renorm", None])
def test_compiled_loss_matches_the_autograd_reference_and_the_eager_pass(estimator):
    """float64, every hinge active, a masked label and an unlabelled row of NaN logits inside
    the batch (its gradient must be 0, not NaN), a −inf logit on a labelled row."""
    tuned, base_logits, labels, g = make_batch(seed=3, B=3, T=12, V=11)
    tuned[0, -1] = float("nan")  # no next token: unlabelled
    tuned[2, 3, 2] = -math.inf
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g) if estimator else None
    results = {}
    for compiled in (True, False):
        loss_fn = GeometryAwareLoss(kl_estimator=estimator or "topk_cv", compile_loss=compiled, **ACTIVE)
        assert (loss_fn._fused_kernels(tuned, stats) is not None) == compiled
        x = tuned.clone().requires_grad_()
        loss, metrics = loss_fn(x, stats, labels)
        loss.backward()
        results[compiled] = loss.detach(), x.grad, metrics
    loss, grad, metrics = results[True]
    rows, _ = labelled_positions(labels)
    unlabelled = torch.ones(tuned.shape[0] * tuned.shape[1], dtype=torch.bool).index_fill_(0, rows, False)
    assert (grad.reshape(-1, 11)[unlabelled] == 0).all() and torch.isfinite(grad).all()
    if estimator:  # the reference needs finite logits on the rows it never reads, and a base
        clean = tuned.clone()
        clean[0, -1] = 0.0
        x_ref = clean.requires_grad_()
        ref, ref_metrics = reference_loss(x_ref, stats, labels, GeometryConfig(kl_estimator=estimator, **ACTIVE))
        ref.backward()
        if estimator != "topk_cv":  # topk_cv's gradient is topk_sampled's by construction, not its value's
            torch.testing.assert_close(grad, x_ref.grad)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(metrics["KL_mean"], ref_metrics["KL_mean"])
    eager_loss, eager_grad, eager_metrics = results[False]
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)
    for name in ("KL_mean", "dH_mean", "cal_gap_mean", "H_q_mean", "positions_penalized_KL", "positions_penalized_H"):
        torch.testing.assert_close(metrics[name], eager_metrics[name], equal_nan=True)


def test_compiled_loss_on_bfloat16_and_float32_logits_equals_the_eager_pass():
    """bfloat16 logits are read as they are (float32 math); the ids' gradient entries, where the
    dense and sparse parts meet (and a label that is also a top-k id), are rounded once, so the
    result equals the eager pass's bit for bit. float32 within rounding; no gradient: metrics only."""
    tuned, base_logits, labels, g = make_batch(seed=5, B=3, T=20, V=11, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    rows, targets = labelled_positions(labels)
    assert (stats.topk_ids == targets.unsqueeze(-1)).any()  # some label repeats a cached id
    for dtype in (torch.bfloat16, torch.float32):
        out = {}
        for compiled in (True, False):
            x = tuned.to(dtype).requires_grad_()
            loss, metrics = GeometryAwareLoss(compile_loss=compiled, **ACTIVE)(x, stats, labels)
            loss.backward()
            with torch.no_grad():
                _, eval_metrics = GeometryAwareLoss(compile_loss=compiled, **ACTIVE)(x, stats, labels)
            out[compiled] = loss.detach(), x.grad, eval_metrics["KL_mean"]
        assert out[True][1].dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(out[True][1], out[False][1]) and torch.equal(out[True][0], out[False][0])
        for a, b in zip(out[True], out[False]):
            torch.testing.assert_close(a, b)


def test_compiled_loss_without_labelled_positions_and_where_it_does_not_apply():
    tuned, base_logits, labels, g = make_batch(seed=2, B=2, T=5, V=11, dtype=torch.float32)
    none = torch.full_like(labels, -100)
    x = tuned.clone().requires_grad_()
    loss, metrics = GeometryAwareLoss(compile_loss=True)(x, None, none)
    loss.backward()
    assert loss.item() == 0 and metrics["num_positions"] == 0 and (x.grad == 0).all()
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    # the tuned tail's estimators, the reverse KL, full base logits and float16 stay eager
    assert GeometryAwareLoss(compile_loss=True, kl_estimator="topk_tail")._fused_kernels(tuned, stats) is None
    assert GeometryAwareLoss(compile_loss=True, kl_direction="reverse")._fused_kernels(tuned, stats) is None
    assert GeometryAwareLoss(compile_loss=True)._fused_kernels(tuned, base_logits) is None
    assert GeometryAwareLoss(compile_loss=True)._fused_kernels(tuned.half(), stats) is None
    # the default compiles on CUDA only
    assert GeometryAwareLoss()._fused_kernels(tuned, stats) is None


def test_compile_loss_under_torch_compile_disable_takes_the_chunked_pass():
    """With torch.compile switched off (TORCH_COMPILE_DISABLE=1), the fused formulas would run
    eagerly over every row at once, with [rows × V] temporaries: the chunked pass is taken."""
    import torch._dynamo

    tuned, base_logits, labels, g = make_batch(seed=2, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    assert GeometryAwareLoss(compile_loss=True)._fused_kernels(tuned, stats) is not None
    with torch._dynamo.config.patch(disable=True):  # TORCH_COMPILE_DISABLE=1
        assert GeometryAwareLoss(compile_loss=True)._fused_kernels(tuned, stats) is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        assert GeometryAwareLoss(compile_loss=True)._fused_kernels(tuned, stats) is None


def test_compile_failure_warns_once_and_the_loss_runs_eagerly(no_cxx_compiler):
    tuned, base_logits, labels, g = make_batch(seed=4, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    eager, _ = GeometryAwareLoss(compile_loss=False, **ACTIVE)(tuned, stats, labels)
    with pytest.warns(UserWarning, match=r"compile_loss: torch.compile could not build the loss's kernels here \(InductorError: InvalidCxxCompiler: No working C\+\+ compiler found in .*\); the loss runs eagerly"):
        loss, _ = GeometryAwareLoss(compile_loss=True, **ACTIVE)(tuned, stats, labels)
    torch.testing.assert_close(loss, eager)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = GeometryAwareLoss(compile_loss=True, **ACTIVE)(tuned, stats, labels)
    torch.testing.assert_close(again, eager)


def test_a_runtime_error_inside_the_compiled_kernels_is_not_taken_for_a_compile_failure(monkeypatch):
    from geocache import compiled

    def failing(fn, **kwargs):
        def run(*args):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return run

    monkeypatch.setattr(compiled, "_KERNELS", {})
    monkeypatch.setattr(torch, "compile", failing)
    tuned, base_logits, labels, g = make_batch(seed=4, dtype=torch.float32)
    stats = BaseStats.from_logits(base_logits, labels, k=4, m=3, generator=g)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        GeometryAwareLoss(compile_loss=True, **ACTIVE)(tuned, stats, labels)
    assert compiled._KERNELS["compile_loss"] is not None  # not switched off


@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_sums_over_repeated_ids_equal_a_loop(n, width, distinct, seed):
    """The bfloat16 compiled path's per-id totals (an id may repeat in a row: a sample, the label),
    against a brute-force loop; values of very different sizes keep their small parts."""
    from geocache.losses import _sum_over_repeats

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, distinct, (n, width), generator=g)
    v = torch.randn(n, width, generator=g) * torch.logspace(-8, 2, width)[torch.randperm(width, generator=g)]
    expected = torch.tensor([[sum(float(v[i, c]) for c in range(width) if ids[i, c] == ids[i, j]) for j in range(width)] for i in range(n)])
    torch.testing.assert_close(_sum_over_repeats(ids, v), expected.float(), rtol=1e-6, atol=1e-12)
