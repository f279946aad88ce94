"""The geometry-aware loss of the design note: task loss plus selective KL, calibration and entropy
penalties, the MoE router divergence, and the adaptive threshold schedule.

``GeometryAwareLoss`` never holds more than one chunk of ``[positions × vocab]`` float32
temporaries beyond the logits it is given and their gradient: it walks the labelled positions a
chunk at a time, computes every per-position signal and, when the logits require grad, the
gradient of the whole loss with respect to that chunk of logits in closed form (written in the
comments below). Plain autograd would keep a float32 log-softmax of every chunk alive until
backward, which is the whole ``[N, V]`` tensor again (torchtune's chunked losses avoid the
logits, not those). The closed forms are checked against autograd with ``gradcheck``.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from geocache import compiled
from geocache.moe import choice_scores
from geocache.config import GeometryConfig
from geocache.signals import (
    SAMPLED_ESTIMATORS,
    BaseStats,
    base_kl_terms,
    cached_kl_terms,
    default_chunk_rows,
    float32_math,
    labelled_positions,
    math_dtype,
)

BaseInput = Union[torch.Tensor, BaseStats, None]


# float16 closed-form gradients are stored as this many times their coefficients (see
# ``GeometryAwareLoss.forward``): entries up to ~1,000x a probability stay finite, down to ~1e-9 nonzero.
_FP16_PRESCALE = 64.0


class _AttachGrad(torch.autograd.Function):
    """Returns ``value`` and hands back a gradient for ``logits`` computed beforehand, times
    ``scale`` (a Python float, applied with the backward's own scale in float32 arithmetic)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        factor = grad_output.item() * ctx.scale
        if factor == 1.0:
            return grad, None, None, None
        return grad.mul(factor), None, None, None


def _rows_into(flat: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``flat[rows]`` in the math dtype, written into a reused buffer (no fresh [n, V] alloc)."""
    out = buf[: rows.shape[0]]
    if flat.dtype == out.dtype:
        return torch.index_select(flat, 0, rows, out=out)
    return out.copy_(flat.index_select(0, rows))


def _dot_rows(a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row, the product written into a reused buffer (``vecdot`` would allocate
    a fresh [n, V] temporary each call)."""
    return torch.mul(a, b, out=tmp).sum(-1)


def _log_softmax_rows(z: torch.Tensor, logp: torch.Tensor, p: torch.Tensor, tmp: torch.Tensor):
    """log p, p and H(p) of logit rows ``z [n, V]`` into the given buffers; returns (logp, p,
    H [n], whether the rows hold −inf logits). Three passes over the rows (fused log-softmax,
    fused softmax, a dot per row): at a small vocabulary the loss is a sum of such passes, so each
    one counts."""
    torch.log_softmax(z, -1, out=logp)
    torch.softmax(z, -1, out=p)  # not exp(log p): torch.exp took twice as long on CPU (measured)
    h = -_dot_rows(p, logp, tmp)
    masked = not math.isfinite(h.sum())  # one reduction (isfinite().all() is five operations); H ≤ log V, no overflow
    if masked:
        # −inf logits (a masked vocabulary) give 0·(−inf) = NaN: clamp log p so that 0·log 0 is 0.
        logp.clamp_min_(torch.finfo(logp.dtype).min)
        h = -_dot_rows(p, logp, tmp)
    return logp, p, h, masked


class _Tail(NamedTuple):
    log_mass: torch.Tensor  # [n] log q_T, −inf where the tail is empty (k = V)
    masked: torch.Tensor  # [n, V] 0 on the top-k; off it, masked / mass = q_j / q_T
    mass: torch.Tensor  # [n]


def _tail_into(q: torch.Tensor, lq: torch.Tensor, ids: torch.Tensor, buf: torch.Tensor) -> _Tail:
    """The tuned tail outside ``ids``: log q_T and q restricted to it, into ``buf``.

    q_T is summed over the tail's own entries (never 1 − Σ_S q, which cancels catastrophically
    when the tuned tail collapses): two passes where a log-space logsumexp takes five. Rows whose
    tail mass is so small that its entries may have underflowed (q_T < √tiny) are redone in log
    space, so that log q_T and q_j / q_T stay exact however far the tail collapses."""
    masked = buf.copy_(q).scatter_(1, ids, 0.0)
    mass = masked.sum(-1)
    log_mass = mass.log()
    if ids.shape[1] >= q.shape[1]:  # k = V: no tail
        return _Tail(log_mass.fill_(-math.inf), masked, mass.fill_(1.0))
    small = mass < math.sqrt(torch.finfo(q.dtype).tiny)
    if bool(small.any()):
        r = small.nonzero().squeeze(1)
        lt = lq.index_select(0, r).scatter_(1, ids.index_select(0, r).long(), -math.inf)
        lm = lt.logsumexp(-1)
        log_mass[r] = lm
        # Divided by their own sum, not only shifted by lm: where every tail logit is masked
        # (−inf, held at the float minimum), lm rounds back to that minimum and exp(lt − lm) is 1
        # on each tail token instead of 1/|tail|.
        e = lt.sub_(lm.unsqueeze(-1)).exp_()
        masked[r] = e.div_(e.sum(-1, keepdim=True))
        mass[r] = 1.0
    return _Tail(log_mass, masked, mass)


class GeometryAwareLoss(nn.Module):
    """Task loss + λ_KL·KL hinge + λ_cal·calibration hinge + λ_H·entropy-drop hinge.

    Per labelled position (label after the causal shift ≠ -100), with p the base and q the tuned
    next-token distribution (float32 softmax):

        loss = mean[NLL] + λ_KL·mean[(KL − τ_KL)₊] + λ_cal·mean[(NLL − H(q) − τ_cal)₊]
               + λ_H·mean[(−dH − τ_H)₊],      dH = H(q) − H(p)

    ``KL`` is ``config.kl_direction`` (forward KL(p‖q) by default), exact when ``base`` is full
    base logits and ``config.kl_estimator`` when ``base`` is cached ``BaseStats``. Means are over
    the N labelled positions (or over ``num_items_in_batch`` when given, for gradient accumulation
    and data parallelism). The base is a constant: no gradient flows to it.
    """

    def __init__(self, config: Optional[GeometryConfig] = None, **overrides) -> None:
        super().__init__()
        base = (config or GeometryConfig()).to_dict()
        self.config = GeometryConfig.from_dict({**base, **overrides})

    @float32_math
    def forward(
        self,
        tuned_logits: torch.Tensor,
        base: BaseInput,
        labels: torch.Tensor,
        *,
        thresholds: Optional[Mapping[str, float]] = None,
        num_items_in_batch: Optional[int] = None,
    ) -> tuple[torch.Tensor, dict]:
        """tuned_logits ``[B, T, V]`` float; base: full base logits ``[B, T, V]``, ``BaseStats``
        with one row per labelled position (``labelled_positions`` order), or None when no base is
        available this step (``periodic`` mode): then only the task and calibration terms, which
        need no base, apply, and the base metrics are NaN; labels ``[B, T]`` long,
        -100 ignored, not yet shifted. ``thresholds`` (from ``AdaptiveGeometryScheduler``) override
        the config's ``kl_threshold``/``dh_threshold``/``cal_threshold`` for this call.

        Returns ``(loss, metrics)``: a scalar, and detached scalars named as in the design note
        (``task_loss``, ``KL_mean``, ``dH_mean``, ``cal_gap_mean``, ``positions_penalized_KL``,
        ``positions_penalized_cal``, ``positions_penalized_H``) plus the direction, estimator and
        thresholds in force. The loss is divided by ``num_items_in_batch`` (default: this call's
        labelled positions); the metrics, ``task_loss`` and the penalties included, are means over
        this call's positions whatever the normaliser.
        """
        cfg = self.config
        th = {"kl_threshold": cfg.kl_threshold, "dh_threshold": cfg.dh_threshold, "cal_threshold": cfg.cal_threshold}
        th.update(thresholds or {})
        if tuned_logits.dim() != 3 or labels.shape != tuned_logits.shape[:2]:
            raise ValueError(
                f"tuned_logits must be [batch, seq, vocab] and labels [batch, seq]; got {tuple(tuned_logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        vocab = tuned_logits.shape[-1]
        rows, targets = labelled_positions(labels)
        if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
            raise ValueError(f"labels must be -100 or token ids in [0, {vocab}); found {targets.min()}..{targets.max()}")
        estimator = self._check_base(base, tuned_logits, rows.numel())
        n = rows.numel()
        denom = float(num_items_in_batch) if num_items_in_batch else float(max(n, 1))
        need_grad = torch.is_grad_enabled() and tuned_logits.requires_grad
        # float16 gradients are stored before the backward's scale (GradScaler's 65,536 and up) is
        # known: divided by the normaliser they would underflow (q/denom below float16's smallest
        # normal), and 65,536 itself is not a float16. So they are stored as 64·(coefficients), and
        # the backward multiplies by its scale / (64·denom) in float32 arithmetic.
        grad_scale = 1.0 if tuned_logits.dtype != torch.float16 else 1.0 / (_FP16_PRESCALE * denom)
        with torch.no_grad():  # the gradient is computed in closed form inside the pass
            grad_denom = denom if grad_scale == 1.0 else 1.0 / _FP16_PRESCALE
            kernels, result = self._fused_kernels(tuned_logits, base), None
            if kernels is not None:
                try:
                    result = self._fused_pass(kernels, tuned_logits, base, rows, targets, th, grad_denom, need_grad)
                except compiled.CompileFailed:  # warned once; the chunked pass from now on
                    pass
            per_pos, grad = result or self._chunked_pass(tuned_logits, base, rows, targets, th, grad_denom, need_grad)

        kl, h_q, h_p, nll = per_pos
        d_h, gap = h_q - h_p, nll - h_q
        # Stacked, so that the penalties, sums and means are a few operations whatever their number
        # (at a small vocabulary the loss is mostly per-operation overhead).
        excess = torch.stack((kl - th["kl_threshold"], gap - th["cal_threshold"], d_h.neg().sub_(th["dh_threshold"])))
        sums = torch.cat((excess.clamp_min(0).sum(1), nll.sum().unsqueeze(0))).div_(denom)  # kl, cal, H penalties; task
        value = sums[3] + (cfg.lambda_kl * sums[0] + cfg.lambda_cal * sums[1] + cfg.lambda_entropy * sums[2])
        value = value.to(torch.float32) if value.dtype != torch.float64 else value
        loss = _AttachGrad.apply(tuned_logits, value, grad, grad_scale) if need_grad else value
        # Reported per position of this call, whatever the normaliser: with gradient accumulation or
        # several processes num_items_in_batch counts every micro-batch's positions, and a metric
        # divided by it would shrink with their number (the trainer weights calls by positions).
        kl_pen, cal_pen, h_pen, task = sums if denom == max(n, 1) else sums * (denom / max(n, 1))
        # Means of KL, dH, gap, H(q), H(p) and of the three hinge masks (excess > 0 ⇔ above its threshold).
        means = torch.cat((torch.stack((kl, d_h, gap, h_q, h_p)), (excess > 0).to(kl.dtype))).mean(1) if n else kl.new_zeros(8)
        if base is None:  # the base's metrics, the masks and penalties that read it, are undefined without one
            means[[0, 1, 4, 5, 7]] = float("nan")
            # NaN, not the 0 they add to the loss: a log window of periodic steps averages them over
            # the steps that had a base, as it does KL_mean (zeros would shrink them by the period).
            kl_pen, h_pen = kl_pen.new_tensor(float("nan")), h_pen.new_tensor(float("nan"))
        kl_m, dh_m, gap_m, hq_m, hp_m, pen_kl, pen_cal, pen_h = means

        metrics = {
            "task_loss": task,
            "KL_mean": kl_m,
            "dH_mean": dh_m,
            "cal_gap_mean": gap_m,
            "H_q_mean": hq_m,
            "H_p_mean": hp_m,
            "kl_penalty": kl_pen,
            "cal_penalty": cal_pen,
            "entropy_penalty": h_pen,
            "positions_penalized_KL": pen_kl,
            "positions_penalized_cal": pen_cal,
            "positions_penalized_H": pen_h,
            "num_positions": n,
            "kl_direction": cfg.kl_direction,
            "kl_estimator": estimator,
            **th,
        }
        return loss, metrics

    def _check_base(self, base: BaseInput, tuned_logits: torch.Tensor, n: int) -> str:
        """Validates ``base`` against the logits; returns the KL estimator name in use."""
        if base is None:
            return "none"
        if isinstance(base, BaseStats):
            if base.num_positions != n:
                raise ValueError(
                    f"base statistics hold {base.num_positions} positions but the labels mark {n}: "
                    "the cache and the batch are not aligned"
                )
            if n and int(base.topk_ids.max()) >= tuned_logits.shape[-1]:
                raise ValueError(
                    f"cached top-k ids reach {int(base.topk_ids.max())} but the model has {tuned_logits.shape[-1]} "
                    "output rows: the cache was built for another vocabulary"
                )
            if self.config.kl_estimator in SAMPLED_ESTIMATORS and self.config.kl_direction == "forward" and base.m == 0:
                raise ValueError(
                    f"kl_estimator={self.config.kl_estimator!r} needs tail samples, but the base statistics have m=0: "
                    "precompute with --tail-samples > 0, or choose kl_estimator='topk_tail'"
                )
            return self.config.kl_estimator if self.config.kl_direction == "forward" else "coarse"
        if isinstance(base, torch.Tensor):
            if base.shape != tuned_logits.shape:
                raise ValueError(f"base logits {tuple(base.shape)} must match tuned logits {tuple(tuned_logits.shape)}")
            return "exact"
        raise TypeError(f"base must be base logits (a tensor) or BaseStats, not {type(base).__name__}")

    def _fused_kernels(self, logits: torch.Tensor, base: BaseInput):
        """The compiled kernels when ``compile_loss`` (or its default) asks for them and the call
        suits them: float32, float64 or bfloat16 logits (read as they are, the math in float32 or
        float64; float16's pre-scaled gradient stays eager), cached statistics or no base, and an
        estimator that does not read the tuned tail mass. None: the eager chunked pass."""
        cfg = self.config
        wanted = cfg.compile_loss if cfg.compile_loss is not None else compiled.by_default(logits.device)
        if not wanted or logits.dtype == torch.float16 or isinstance(base, torch.Tensor):
            return None
        if base is not None and (cfg.kl_direction != "forward" or cfg.kl_estimator in ("topk_tail", "topk_hybrid")):
            return None
        if compiled.disabled():  # the kernels would run eagerly over every row at once, [rows × V] temporaries
            return None  # and all; chunk instead
        return _compiled_kernels()

    def _fused_pass(self, kernels, logits, base, rows, targets, th, denom, need_grad):
        """``_chunked_pass``'s results through two compiled kernels over every logit row at once:
        one reduction (log-sum-exp and H(q), reading each row twice and writing nothing of its
        size) and, with a gradient, one elementwise pass writing it (q ⊙ (a + b·log q), zero on
        unlabelled rows, whose a and b are 0). No chunk buffers: the only [rows × V] tensor is the
        gradient. Every row is computed, labelled or not, as the model's own cross-entropy does."""
        cfg = self.config
        stats_kernel, grad_kernel = kernels
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        dtype = math_dtype(flat.dtype)
        lse_all, h_all = _run_compiled(stats_kernel, flat)
        lse, h_q = lse_all[rows], h_all[rows]
        k, m, ids = _sparse_ids(base, targets)
        flat_ids = rows.unsqueeze(-1) * vocab + ids
        # log q at the ids, floored as the eager pass floors it (a masked vocabulary's −inf).
        lq_ids = flat.take(flat_ids).to(dtype).sub_(lse.unsqueeze(-1)).clamp_min_(torch.finfo(dtype).min)
        nll = -lq_ids[:, -1]
        if base is None:
            kl, h_p = torch.zeros_like(h_q), h_q
        else:
            h_p = base.entropy.to(dtype)
            kl, (alpha, s_coef, x_coef, _) = cached_kl_terms(
                lq_ids[:, :k], lq_ids[:, k : k + m], None, None, cfg.kl_estimator, cfg.kl_direction,
                terms=base_kl_terms(base, dtype, cfg.kl_estimator, cfg.kl_direction),
            )
        per_pos = (kl, h_q, h_p, nll)
        if not need_grad:
            return per_pos, None
        # The same coefficients as the eager pass (see its docstring), spread over every row.
        c, b, d = _hinge_coefficients(cfg, th, denom, kl, nll, h_q, h_p)
        a = torch.addcmul(c, d, alpha) if base is not None else c
        a_h = torch.addcmul(a, b, h_q)
        coef = lse_all.new_zeros(2, flat.shape[0]).index_copy_(1, rows, torch.stack((a_h, b)))
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format)
        _run_compiled(grad_kernel, flat, lse_all, coef[0], coef[1], grad)
        # The sparse terms and the label's −c·e_y, their values side by side as in the eager pass.
        v = torch.cat([s_coef * d.unsqueeze(-1), x_coef * d.unsqueeze(-1), c.neg().unsqueeze(-1)], 1) if base is not None else c.neg().unsqueeze(-1)
        if grad.dtype == dtype:  # added onto the dense part in the math dtype, as the eager pass does
            grad.view(-1).scatter_add_(0, flat_ids.view(-1), v.reshape(-1))
        else:
            # bfloat16: adding onto the rounded dense part would round twice. The ids' entries are
            # written whole instead: their dense part again in float32 (the kernel's formula, at
            # the ids) plus every sparse value aimed at the same id (an id may repeat within a row:
            # a sample, the label), rounded once, as the eager pass rounds its float32 rows.
            dense = lq_ids.exp().mul_(a_h.unsqueeze(-1) + b.unsqueeze(-1) * lq_ids)
            total = _sum_over_repeats(ids, v).add_(dense)
            grad.view(-1).scatter_(0, flat_ids.view(-1), total.reshape(-1).to(grad.dtype))
        return per_pos, grad.view_as(logits)

    def _chunked_pass(self, logits, base, rows, targets, th, denom, need_grad):
        """Per-position KL, H(q), H(p), NLL ``[N]`` and, if asked, d(loss)/d(logits) ``[B, T, V]``.

        Gradient of the loss for one position's logits z (q = softmax z, y the label), with the
        hinge masks m_KL, m_cal, m_H, all divided by the normaliser:
          ∂NLL = q − e_y;  ∂H(q) = −q ⊙ (log q + H(q));  ∂gap = ∂NLL − ∂H(q);  ∂(−dH) = −∂H(q)
          ⇒ g = q ⊙ (a + b·(log q + H(q))) − c·e_y + λ_KL·m_KL·∂KL
        with a = c = 1 + λ_cal·m_cal and b = λ_cal·m_cal + λ_H·m_H.
        ∂KL: forward exact q − p; reverse exact q ⊙ (log q − log p − KL); cached: see
        ``signals.cached_kl_terms`` (alpha·q plus sparse terms on the top-k ids and samples).

        Two ways to walk the positions. *Spans* (cached statistics without the tuned tail, or no
        base; float32 logits; labelled rows nearly gap-free, as in packed or plain-text batches):
        a chunk is the range of logit rows from its first to its last labelled position, read
        in place, the few unlabelled rows inside computed and their gradient zeroed at the end.
        q is written straight into the gradient's rows and q·log q over log q, so the only
        [chunk × V] buffer is log q (with a gradient; q's too without): at a small vocabulary one
        chunk holds the whole batch for the memory the rows walk spends on a quarter of it.
        *Rows* otherwise: a chunk is a set of labelled rows, read through a copy where they are
        not contiguous, with four buffers (six with full base logits), a quarter of the positions.
        At a small vocabulary every chunk costs some 80 small tensor operations (each a few µs on
        a CPU), so fewer chunks is faster (the tiny training benchmark's loss: 2.6 → 1.9 ms).
        """
        cfg = self.config
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        dtype = math_dtype(logits.dtype)
        device = logits.device
        n_total = rows.numel()
        exact = isinstance(base, torch.Tensor)
        cached = base is not None and not exact
        forward = cfg.kl_direction == "forward"
        # Only topk_tail, topk_hybrid and the reverse KL read the tuned tail mass: skip its passes.
        need_tail = cached and (cfg.kl_estimator in ("topk_tail", "topk_hybrid") or not forward)
        spannable = flat.dtype == dtype and not exact and not need_tail
        # A span with the gradient keeps q in the gradient's own rows: one buffer (log q), else two.
        plan, spans = _chunk_plan(rows, vocab, device, cfg.chunk_size, spannable, buffers=1 if need_grad else 2)
        width = max((n_span for *_, n_span in plan), default=1)  # rows of a chunk's buffers
        out = torch.empty(4, n_total, dtype=dtype, device=device)
        # Spans write every labelled row's gradient and zero the rest at the end.
        # Row-major whatever the logits' strides: spans scatter into a flat view of their rows.
        fresh = torch.empty_like if spans else torch.zeros_like
        grad = fresh(flat, memory_format=torch.contiguous_format) if need_grad else None

        def buffer() -> torch.Tensor:
            return torch.empty(width, vocab, dtype=dtype, device=device)

        lq = buffer()
        q = None if spans and need_grad else buffer()
        zq = None if spans else buffer()
        tmp = None if spans else buffer()
        if exact:
            base_flat, lp, p = base.reshape(-1, vocab), buffer(), buffer()
        # One gather and one scatter per chunk: the cached top-k ids, the tail samples and the
        # label, side by side [N, k + m + 1].
        k, m, ids = _sparse_ids(base if cached else None, targets)
        if cached:
            terms, h_p_all = base_kl_terms(base, dtype, cfg.kl_estimator, cfg.kl_direction), base.entropy.to(dtype)  # the base's side, once
        most = max((stop - start for start, stop, *_ in plan), default=1)  # labelled rows in a chunk
        vals = torch.empty(most, ids.shape[1], dtype=dtype, device=device)
        in_place_grad = need_grad and grad.dtype == dtype

        for start, stop, r0, n_span in plan:
            n = stop - start
            r, ids_c = rows[start:stop], ids[start:stop]
            # z: the chunk's logit rows; local: where its labelled rows sit among them (None: all of
            # them, in order); g_rows: where its gradient goes in place (None: through a copy).
            local, g_rows = None, None
            if r0 is not None:  # contiguous rows, or a span
                z = flat[r0 : r0 + n_span] if flat.dtype == dtype else _rows_into(flat, r, zq)
                g_rows = grad[r0 : r0 + n_span] if in_place_grad else None
                if n_span != n:
                    local = r - r0
            else:
                z = _rows_into(flat, r, zq)
            if spans:
                # log q, its entries at the ids, then q (into the gradient's rows when there is a
                # gradient), then q·log q in place of log q: H(q) is its row sum, and the gradient
                # below needs q and q·log q only.
                lq_c = torch.log_softmax(z, -1, out=lq[:n_span])
                if local is None:
                    lq_ids = lq_c.gather(1, ids_c)
                else:  # the labelled rows' entries, read by flat index
                    flat_ids = local.unsqueeze(-1) * vocab + ids_c
                    lq_ids = lq_c.take(flat_ids)
                q_c = torch.softmax(z, -1, out=g_rows if g_rows is not None else q[:n_span])
                qlq = lq_c.mul_(q_c)
                h_all = qlq.sum(-1).neg_()
                masked_vocab = not math.isfinite(h_all.sum())
                if masked_vocab:  # −inf logits (a masked vocabulary): 0·(−inf) = NaN must be 0,
                    h_all = qlq.nan_to_num_(nan=0.0).sum(-1).neg_()
                    lq_ids.clamp_min_(torch.finfo(dtype).min)  # and log q floored, as in the rows walk
                h_q = h_all if local is None else h_all.index_select(0, local)
            else:
                lq_c, q_c, h_all, masked_vocab = _log_softmax_rows(z, lq[:n_span], q[:n_span], tmp[:n_span])
                h_q, lq_ids = h_all, lq_c.gather(1, ids_c)
            nll = -lq_ids[:, -1]
            if base is None:  # no base this step: KL and dH contribute nothing
                kl, h_p = torch.zeros_like(h_q), h_q
            elif exact:
                lp_c, p_c, h_p, _ = _log_softmax_rows(_rows_into(base_flat, r, zq), lp[:n], p[:n], tmp[:n])
                if forward:  # Σ p (log p − log q) = −H(p) − Σ p log q
                    kl = -h_p - _dot_rows(p_c, lq_c, tmp[:n])
                else:  # Σ q (log q − log p) = −H(q) − Σ q log p
                    kl = -h_q - _dot_rows(q_c, lp_c, tmp[:n])
            else:
                h_p = h_p_all[start:stop]
                # q restricted to the tail (outside the cached top-k) and its mass q_T.
                tail = _tail_into(q_c, lq_c, ids_c[:, :k], zq[:n]) if need_tail else None
                kl, (alpha, s_coef, x_coef, tail_coef) = cached_kl_terms(
                    lq_ids[:, :k], lq_ids[:, k : k + m], tail and tail.log_mass, None, cfg.kl_estimator, cfg.kl_direction,
                    terms=terms.select(slice(start, stop)),
                )
            torch.stack((kl, h_q, h_p, nll), out=out[:, start:stop])
            if not need_grad:
                continue

            c, b, d = _hinge_coefficients(cfg, th, denom, kl, nll, h_q, h_p)
            if exact and forward:
                a = c + d
            elif cached:
                a = torch.addcmul(c, d, alpha)
            else:
                a = c
            g = g_rows if g_rows is not None else tmp[:n]
            if spans:  # q·(a + b·H) + b·(q·log q), q already in g; spread over the span's rows
                g.mul_(_spread(a + b * h_q, local, n_span).unsqueeze(-1))
                if bool(b.any()):
                    g.addcmul_(qlq, _spread(b, local, n_span).unsqueeze(-1))
            elif bool(b.any()):  # q ⊙ (b·log q + (a + b·H)), two passes
                torch.addcmul((a + b * h_q).unsqueeze(-1), lq_c, b.unsqueeze(-1), out=g).mul_(q_c)
                if masked_vocab:  # b · (float minimum) can overflow to −inf, and 0 · −inf is NaN
                    g.masked_fill_(q_c == 0, 0.0)
            else:
                torch.mul(q_c, a.unsqueeze(-1), out=g)
            if exact and forward:
                g.sub_(p_c.mul_(d.unsqueeze(-1)))
            elif exact:  # reverse: + d · q ⊙ (log q − log p − KL), built in the log p buffer
                g.add_(lp_c.sub_(lq_c).neg_().sub_(kl.unsqueeze(-1)).mul_(q_c).mul_(d.unsqueeze(-1)))
            if cached and tail is not None and bool(tail_coef.any()):  # + d·tail_coef·q_j/q_T off the top-k
                g.add_(tail.masked.mul_((d * tail_coef / tail.mass).unsqueeze(-1)))
            # The sparse terms (d·s_coef on the top-k, d·x_coef on the samples) and the label's
            # −c·e_y in one scatter, their values written side by side into one buffer.
            v = vals[:n]
            if cached:
                torch.mul(s_coef, d.unsqueeze(-1), out=v[:, :k])
                torch.mul(x_coef, d.unsqueeze(-1), out=v[:, k : k + m])
            torch.neg(c, out=v[:, -1])
            if local is None:
                g.scatter_add_(1, ids_c, v)
            else:
                g.view(-1).scatter_add_(0, flat_ids.view(-1), v.view(-1))
            if g_rows is None:
                if r0 is not None:
                    grad[r0 : r0 + n] = g
                else:
                    grad.index_copy_(0, r, g.to(grad.dtype))

        if spans and need_grad:  # unlabelled rows: inside spans computed (on zero coefficients), outside never written
            unlabelled = torch.ones(flat.shape[0], dtype=torch.bool, device=device).index_fill_(0, rows, False)
            grad.index_fill_(0, unlabelled.nonzero().squeeze(1), 0.0)
        return tuple(out), (grad.view_as(logits) if need_grad else None)


def _sparse_ids(base: Optional[BaseStats], targets: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """k, m and the ids the loss reads and scatters at, per labelled position: the cached top-k,
    the tail samples and the label side by side ``[N, k + m + 1]`` (the label alone without
    cached statistics)."""
    if base is None:
        return 0, 0, targets.unsqueeze(-1)
    return base.k, base.m, torch.cat([base.topk_ids.long(), base.sample_ids.long(), targets.unsqueeze(-1)], 1)


def _hinge_coefficients(cfg, th, denom, kl, nll, h_q, h_p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c, b and d of the loss's gradient (``_chunked_pass``'s docstring) per position: the hinge
    masks as 0/1, the λ's and the normaliser folded in on the Python side."""
    m_kl = (kl > th["kl_threshold"]).to(kl.dtype)
    m_cal = (nll - h_q > th["cal_threshold"]).to(kl.dtype)
    m_h = (h_q - h_p < -th["dh_threshold"]).to(kl.dtype)
    c = m_cal.mul(cfg.lambda_cal / denom).add_(1.0 / denom)
    b = torch.add(m_cal.mul_(cfg.lambda_cal / denom), m_h, alpha=cfg.lambda_entropy / denom)
    return c, b, m_kl.mul_(cfg.lambda_kl / denom)


def _spread(x: torch.Tensor, local: Optional[torch.Tensor], n_span: int) -> torch.Tensor:
    """Per-position values ``[n]`` over a span's ``n_span`` rows (0 on its unlabelled ones)."""
    return x if local is None else x.new_zeros(n_span).index_copy_(0, local, x)


def _fused_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log Σ exp z and H(softmax z) per row of ``z [R, V]``, as one reduction once compiled.
    H = log s − Σ e·(z − max) / s with e = exp(z − max), s = Σ e: shifted by the row max, so the
    difference never cancels at the scale of the logits; e = 0 (a −inf logit) adds nothing.
    bfloat16 logits are read as they are and the math runs in float32 (no float32 copy)."""
    z = z.float() if z.dtype == torch.bfloat16 else z
    zmax = z.amax(-1, keepdim=True)
    shifted = z - zmax
    e = torch.exp(shifted)
    s = e.sum(-1)
    log_s = s.log()
    ez = torch.where(e > 0, e * shifted, 0.0).sum(-1)
    return zmax.squeeze(-1) + log_s, log_s - ez / s


def _fused_grad(z: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = q ⊙ (a + b·log q)`` with q = softmax z (per-row a and b), 0 where q is 0 (a −inf
    logit, whose b·log q would make 0·−inf), as one elementwise pass once compiled; ``out`` may
    be bfloat16 (the value rounded once, as it is stored)."""
    z = z.float() if z.dtype == torch.bfloat16 else z
    lq = z - lse.unsqueeze(-1)
    q = torch.exp(lq)
    out.copy_(torch.where(q > 0, q * (a.unsqueeze(-1) + b.unsqueeze(-1) * lq), 0.0))


def _sum_over_repeats(ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """For each entry of ``ids [n, K]``, the sum of ``v [n, K]`` over the entries of its row with
    the same id (itself included): rows sorted, each run of equal ids summed as a difference of
    float64 running sums (exact to ~1e-16 of the row's total, where float32 would lose small
    values beside large ones), then put back in the entries' order. O(n·K), no [n, K, K] matrix."""
    n, width = ids.shape
    sid, perm = ids.sort(dim=-1, stable=True)
    sums = v.gather(1, perm).double().cumsum(-1)
    run = torch.cat([sums.new_zeros(n, 1), sums], 1)  # [n, K + 1]: run[j] = sum of the first j sorted values
    pos = torch.arange(width, device=ids.device).expand(n, width)
    new_run = torch.ones_like(sid, dtype=torch.bool)
    new_run[:, 1:] = sid[:, 1:] != sid[:, :-1]
    start = torch.where(new_run, pos, 0).cummax(-1).values  # first entry of each entry's run
    last = torch.ones_like(new_run)
    last[:, :-1] = new_run[:, 1:]
    end = torch.where(last, pos, width).flip(-1).cummin(-1).values.flip(-1)  # its last entry
    totals = (run.gather(1, end + 1) - run.gather(1, start)).to(v.dtype)
    return torch.empty_like(totals).scatter_(1, perm, totals)


def _compiled_kernels():
    """``torch.compile`` of ``_fused_stats`` and ``_fused_grad`` (dynamic shapes, so batches of
    other lengths reuse the compiled code), or None once compiling them has failed here."""
    return compiled.kernels("compile_loss", (_fused_stats, _fused_grad), dynamic=True)


def _run_compiled(kernel, *args):
    """Call a compiled kernel: a compile failure warns once and raises ``CompileFailed``, after
    which the eager chunked pass runs (same values)."""
    return compiled.run("compile_loss", "the loss's kernels", "the loss runs eagerly", kernel, *args)


def _chunk_plan(
    rows: torch.Tensor, vocab: int, device, chunk_size: Optional[int], spannable: bool, buffers: int = 2
) -> tuple[list[tuple], bool]:
    """The chunks of ``_chunked_pass``: ``[(start, stop, r0, n_span)]`` over the labelled
    positions ``rows[start:stop]``, with ``r0`` the first logit row of a contiguous range of
    ``n_span`` rows holding them (None where they are read through a copy), and whether the
    chunks are spans. Spans (needing ``buffers`` chunk buffers) are used when ``spannable`` and
    every span's unlabelled rows add at most an eighth (or one row) to it."""
    n_total = rows.numel()
    if n_total == 0:
        return [], False
    if spannable:
        chunk = chunk_size or default_chunk_rows(vocab, device, n_total, buffers=buffers)
        starts = list(range(0, n_total, chunk))
        stops = starts[1:] + [n_total]
        ends = torch.stack([rows[starts], rows[[s - 1 for s in stops]]]).tolist()
        widths = [e - b + 1 for b, e in zip(*ends)]
        # Each span at most an eighth (and one row) wider than its labelled rows, so that its
        # buffer stays within 9/8 of a chunk: a long padding run sends the batch to the rows walk.
        if all(w - (stop - start) <= max(1, (stop - start) // 8) for w, start, stop in zip(widths, starts, stops)):
            return list(zip(starts, stops, ends[0], widths)), True
    chunk = chunk_size or default_chunk_rows(vocab, device, n_total, buffers=4)
    # A chunk whose labelled rows run without a gap (one sequence, or a packed row) reads the
    # logits and writes the gradient in place instead of through index_select/index_copy.
    gaps = (rows[1:] - rows[:-1] != 1).nonzero().flatten().tolist() if n_total > 1 else []
    plan = []
    for start in range(0, n_total, chunk):
        stop = min(start + chunk, n_total)
        contiguous = bisect_left(gaps, start) == bisect_left(gaps, stop - 1)
        plan.append((start, stop, int(rows[start]) if contiguous else None, stop - start))
    return plan, False


# ----------------------------------------------------------------------------------------------
# Adaptive thresholds
# ----------------------------------------------------------------------------------------------


class AdaptiveGeometryScheduler:
    """The note's threshold schedule: KL threshold linear from ``initial_kl`` to ``final_kl`` over
    ``warmup_steps``, then held; dH and calibration thresholds fixed. Also carries ``lambda_router``
    (the note's ``scheduler.λ_router``)."""

    def __init__(
        self,
        initial_kl: float = 0.15,
        final_kl: float = 0.08,
        warmup_steps: int = 1000,
        dh_threshold: float = 0.1,
        cal_threshold: float = 0.05,
        lambda_router: float = 0.1,
    ) -> None:
        # GeometryConfig holds the validation rules; building one validates these values.
        cfg = GeometryConfig(
            kl_threshold=initial_kl,
            final_kl_threshold=final_kl,
            kl_warmup_steps=warmup_steps,
            dh_threshold=dh_threshold,
            cal_threshold=cal_threshold,
            lambda_router=lambda_router,
        )
        self.initial_kl, self.final_kl, self.warmup_steps = cfg.kl_threshold, cfg.final_kl_threshold, cfg.kl_warmup_steps
        self.dh_threshold, self.cal_threshold, self.lambda_router = cfg.dh_threshold, cfg.cal_threshold, cfg.lambda_router

    @classmethod
    def from_config(cls, config: GeometryConfig) -> "AdaptiveGeometryScheduler":
        final = config.kl_threshold if config.final_kl_threshold is None else config.final_kl_threshold
        return cls(config.kl_threshold, final, config.kl_warmup_steps, config.dh_threshold, config.cal_threshold, config.lambda_router)

    def get_thresholds(self, step: int) -> dict[str, float]:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        ratio = min(step / self.warmup_steps, 1.0)
        kl = self.initial_kl - ratio * (self.initial_kl - self.final_kl)
        return {"kl_threshold": kl, "dh_threshold": self.dh_threshold, "cal_threshold": self.cal_threshold}


# ----------------------------------------------------------------------------------------------
# MoE router divergence
# ----------------------------------------------------------------------------------------------


def midband_layer_weights(n_layers: int, floor: float = 0.1) -> torch.Tensor:
    """Layer weights ``[n_layers]`` summing to 1 that emphasise the middle of the MoE stack.

    A smooth bump over layer position x = (l + ½)/n: flat at 1 over the middle third, falling as
    cos² to ``floor`` at the ends (SPEC: "a smooth bump ... peaking at the middle third").
    """
    return _midband_layer_weights(n_layers, floor).clone()


@functools.lru_cache(maxsize=64)
def _midband_layer_weights(n_layers: int, floor: float) -> torch.Tensor:  # once per shape, not every training step
    if n_layers <= 0:
        raise ValueError(f"n_layers={n_layers} must be positive")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor={floor} must be in [0, 1]")
    x = (torch.arange(n_layers, dtype=torch.float64) + 0.5) / n_layers
    dist = ((x - 0.5).abs() - 1 / 6).clamp(min=0) / (1 / 3)
    w = floor + (1 - floor) * torch.cos(0.5 * math.pi * dist.clamp(max=1)) ** 2
    return (w / w.sum()).float()


def resolve_layer_weights(layer_weights: Optional[Sequence[float] | torch.Tensor], n_layers: int) -> torch.Tensor:
    """Explicit weights (validated, normalised to sum 1) or ``midband_layer_weights(n_layers)``."""
    if layer_weights is None:
        return midband_layer_weights(n_layers)
    w = torch.as_tensor(layer_weights, dtype=torch.float32).flatten()
    if w.numel() != n_layers:
        raise ValueError(f"layer_weights has {w.numel()} entries but the model has {n_layers} MoE layers")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"layer_weights {w.tolist()} must be finite, >= 0 and not all zero")
    return w / w.sum()


def router_log_probs(router_logits: torch.Tensor, scoring: str = "softmax", dim: int = -1) -> torch.Tensor:
    """log r over experts (``dim``) in float32 (float64 kept): softmax, or normalised sigmoid
    scores (DeepSeek-V3)."""
    x = router_logits.to(math_dtype(router_logits.dtype))
    if scoring == "softmax":
        return torch.log_softmax(x, dim)
    if scoring == "sigmoid":
        ls = torch.nn.functional.logsigmoid(x)
        return ls - ls.logsumexp(dim, keepdim=True)
    raise ValueError(f"router scoring {scoring!r} must be 'softmax' or 'sigmoid'")


def router_jaccard(base_sets: torch.Tensor, tuned_sets: torch.Tensor) -> torch.Tensor:
    """|S_base ∩ S_tuned| / |S_base ∪ S_tuned| per token. Sets ``[N, k]`` of distinct ids → ``[N]``."""
    inter = (base_sets.unsqueeze(-1) == tuned_sets.unsqueeze(-2)).any(-1).sum(-1)
    union = base_sets.shape[-1] + tuned_sets.shape[-1] - inter
    return inter.float() / union.float()


class _RouterDivergence(torch.autograd.Function):
    """Per-layer router drift ``[L]`` (mean over tokens) of stacked tuned router logits
    ``[L, N, E]``, at token ``rows`` (all when None), against a target ``[L, E, P]``: base
    log-probs (→ KL(r_base‖r_tuned)) or base top-k membership, bool (→ escaped mass
    1 − Σ_{e∈S} r_tuned(e)). Also returns the tuned log-probs ``[L, E, P]`` (no gradient) for
    the membership metric.

    The gradient in closed form, per token, w.r.t. the tuned logits z: softmax scoring,
    KL: r_t − r_b; escaped mass: r_t ⊙ (M − 1_S) with M = Σ_{e∈S} r_t(e). Sigmoid scoring
    (log r = logsigmoid z − logsumexp logsigmoid z) multiplies either by σ(−z). Written by hand
    because at a few experts the autograd graph of the same math (row selection, transposes,
    log-softmax; the selection's backward an index_add) costs more than the forward."""

    @staticmethod
    def forward(ctx, tuned, rows, target, scoring, coarse=False):
        sel = tuned if rows is None else tuned.index_select(1, rows)
        # Rows in increasing order (labelled positions are) are distinct: their gradient is copied
        # back; others may repeat, and theirs is summed.
        ctx.repeats = rows is not None and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all())
        # Experts in the middle, tokens last ([L, E, P], contiguous): softmax and top-k over a
        # few experts then run along contiguous tokens, 14x faster on CPU than over a last dim of 8.
        x = sel.transpose(1, 2).to(math_dtype(sel.dtype), memory_format=torch.contiguous_format)
        log_rt = router_log_probs(x, scoring, dim=1)
        rt = log_rt.exp()
        if target.dtype == torch.bool:
            kept = (rt * target).sum(1, keepdim=True)
            div = kept.squeeze(1).neg().add_(1.0)
            grad = rt.mul_(kept - target.to(kept.dtype))
        elif coarse:
            # KL over the partition S ∪ {rest}: the base's log-probs on S (−inf off it), its rest
            # mass 1 − Σ_S p; the tuned rest R = Σ_{e∉S} r. Gradient r − p̃, p̃ = p on S and
            # p_rest · r / R off it (the base's coarse distribution spread as the tuned one).
            in_s = torch.isfinite(target)
            pb = target.exp()
            p_rest = pb.sum(1, keepdim=True).neg_().add_(1.0).clamp_min_(0.0)
            p_rest = p_rest.masked_fill(in_s.all(1, keepdim=True), 0.0)  # S holds every expert: no rest (no host sync)
            log_rest = log_rt.masked_fill(in_s, -math.inf).logsumexp(1, keepdim=True)
            log_p_rest = p_rest.clamp_min(1e-30).log()
            rest_term = torch.where(p_rest > 0, p_rest * (log_p_rest - log_rest), 0.0)
            div = torch.where(in_s, pb * (target - log_rt), 0.0).sum(1) + rest_term.squeeze(1)
            # p_rest · r / R in log space: R may underflow (tuned logits of −200 off S) where r/R does not
            spread = torch.where((p_rest > 0) & (log_rest > -math.inf), (log_rt + log_p_rest - log_rest).exp(), 0.0)
            grad = torch.where(in_s, rt - pb, rt - spread)
        else:
            rb = target.exp()
            div = (rb * (target - log_rt)).sum(1)
            grad = rt.sub_(rb)
        if scoring == "sigmoid":
            grad.mul_(torch.sigmoid(-x))
        n = div.shape[1]
        ctx.save_for_backward(grad, rows)
        ctx.shape, ctx.dtype, ctx.n = tuned.shape, tuned.dtype, max(n, 1)
        ctx.mark_non_differentiable(log_rt)
        return (div.mean(1) if n else div.sum(1)), log_rt

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_layer, _unused):
        grad, rows = ctx.saved_tensors
        g = grad.mul(grad_layer.div(ctx.n).view(-1, 1, 1)).transpose(1, 2).to(ctx.dtype)  # [L, P, E]
        if rows is None:
            return g, None, None, None, None
        full = g.new_zeros(ctx.shape)
        return (full.index_add_(1, rows, g) if ctx.repeats else full.index_copy_(1, rows, g)), None, None, None, None


@float32_math
def router_divergence_loss(
    tuned_router_logits: Sequence[torch.Tensor] | torch.Tensor,
    base_router_logits: Sequence[torch.Tensor] | torch.Tensor,
    layer_weights: Optional[Sequence[float] | torch.Tensor] = None,
    top_k: int = 2,
    *,
    mask: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
    scoring: str = "softmax",
    choice: Optional[dict] = None,
    base_logprobs: Optional[Sequence[torch.Tensor] | torch.Tensor] = None,
) -> tuple[torch.Tensor, dict]:
    """Differentiable router drift, weighted over MoE layers, with top-k Jaccard as a metric.

    tuned_router_logits: one ``[N, E]`` float tensor per MoE layer (as transformers returns them),
    or them stacked ``[L, N, E]``. base_router_logits: per layer (or stacked) either full base
    logits ``[N, E]`` float → KL(r_base‖r_tuned), or base expert ids ``[N, ≥top_k]`` int (top
    first) → escaped mass 1 − Σ_{e∈S_base} r_tuned(e) over the first ``top_k`` ids (SPEC's
    divergence when only the sets are known; not 0 at the base). With base ids, ``base_logprobs``
    (the base's log r at every given id, ``[N, r]`` per layer or stacked, what a top-k router cache
    holds) gives instead KL over the coarse partition S ∪ {rest}, S = all the given ids: 0 at the
    base and a lower bound of the full KL(r_base‖r_tuned), as ``topk_tail`` is for the LM.
    mask ``[N]`` bool selects the tokens that
    count. ``rows`` (integer) instead selects the tuned logits' tokens that the base's
    ``len(rows)`` tokens stand for (the labelled positions of a forward, ``labelled_positions``):
    the selection happens inside, its gradient written back with one copy (summed where rows
    repeat). The note's Jaccard has no gradient, so it is reported (``router_jaccard``, mean over
    tokens and layers) but not trained on. All layers are computed at once, stacked. ``choice``
    (``geocache.moe.routing_choice``) gives the sets S as the routers choose them where that is not
    the top-k of the logits (DeepSeek-V3: biased sigmoid scores within the best expert groups).
    """
    n_layers = len(tuned_router_logits)
    if n_layers == 0 or len(base_router_logits) != n_layers:
        raise ValueError(f"got {n_layers} tuned and {len(base_router_logits)} base router layers; they must match and be > 0")
    if mask is not None and rows is not None:
        raise ValueError("give the router loss a mask or rows, not both")
    weights = resolve_layer_weights(layer_weights, n_layers)

    def stacked(layers) -> torch.Tensor:
        if isinstance(layers, torch.Tensor):
            return layers
        shapes = {tuple(t.shape[1:]) for t in layers}
        if len(shapes) > 1:
            raise ValueError(f"router layers must share one shape per token; got {sorted(shapes)}")
        return torch.stack(list(layers))

    tuned, base = stacked(tuned_router_logits), stacked(base_router_logits)
    if base_logprobs is not None:
        base_logprobs = stacked(base_logprobs)
        if base.is_floating_point() or base_logprobs.shape != base.shape:
            raise ValueError(f"base_logprobs go with base expert ids of the same shape; got {tuple(base_logprobs.shape)} beside "
                             f"{'float logits' if base.is_floating_point() else 'ids'} {tuple(base.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"the router loss's mask must be a bool tensor, not {mask.dtype}; give integer indices as rows=")
        rows, base = mask.nonzero().squeeze(1), base[:, mask]
        base_logprobs = base_logprobs[:, mask] if base_logprobs is not None else None
    if rows is not None:
        rows = rows.to(device=tuned.device, dtype=torch.long)
    n_tokens = tuned.shape[1] if rows is None else rows.numel()
    if n_tokens != base.shape[1]:
        raise ValueError(f"tuned router logits cover {n_tokens} tokens but base ones {base.shape[1]}")
    n_experts = tuned.shape[-1]
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} exceeds the {n_experts} experts")
    if base.is_floating_point():
        target = router_log_probs(base.transpose(1, 2).contiguous(), scoring, dim=1)  # [L, E, P]
        base_sets = _top_k_members(target if choice is None else choice_scores(base.transpose(1, 2), choice, dim=1), top_k)
    else:
        ids = base[..., :top_k].long().transpose(1, 2)  # [L, k, P]
        target = base_sets = torch.zeros(base.shape[0], n_experts, base.shape[1], dtype=torch.bool, device=base.device).scatter_(1, ids, True)
        if base_logprobs is not None:  # [L, E, P]: log r_base on every given id, −inf off them
            target = torch.full(base_sets.shape, -math.inf, dtype=math_dtype(base_logprobs.dtype), device=base.device).scatter_(
                1, base.long().transpose(1, 2), base_logprobs.transpose(1, 2).to(math_dtype(base_logprobs.dtype)))
    per_layer_div, log_rt = _RouterDivergence.apply(tuned, rows, target.to(tuned.device), scoring, base_logprobs is not None)
    if choice is None:
        tuned_sets = _top_k_members(log_rt, top_k)
    else:
        chosen = (tuned if rows is None else tuned.index_select(1, rows)).detach()
        tuned_sets = _top_k_members(choice_scores(chosen.transpose(1, 2), choice, dim=1), top_k)
    if n_tokens:
        # The tuned sets hold exactly top_k experts, the base's too unless given as ids (which may
        # repeat): |union| = |base set| + top_k − |intersection|.
        base_sets = base_sets.to(tuned_sets.device)
        inter = (base_sets & tuned_sets).sum(1).float()
        size = top_k if base.is_floating_point() else base_sets.sum(1).float()
        per_layer_jacc = (inter / (size + top_k - inter)).mean(-1)
    else:  # no tokens: no drift
        per_layer_jacc = torch.ones(n_layers, device=per_layer_div.device)
    loss = (weights.to(per_layer_div.device) * per_layer_div).sum()
    return loss, {
        "router_divergence": loss.detach(),
        "router_jaccard": per_layer_jacc.mean(),
        "router_divergence_per_layer": per_layer_div.detach(),
        "router_jaccard_per_layer": per_layer_jacc,
    }


def _top_k_members(x: torch.Tensor, k: int) -> torch.Tensor:
    """Membership ``[L, E, N]`` bool of the k largest of ``x [L, E, N]`` along the experts (dim 1)
    (``topk`` along a dim of a few experts is 20x slower here). Exactly k members per token: of
    experts tied at a maximum (float16/bfloat16 router logits do tie), the lowest index is taken
    first.

    The k-th largest value by k − 1 rounds of removing the maxima, and every expert at or above
    it: exact for each token where that selects k experts (no tie across the k-th place). The
    few tokens with such a tie are redone by a stable sort."""
    rest = x
    for _ in range(k - 1):
        rest = rest.masked_fill(rest >= rest.amax(1, keepdim=True), -math.inf)
    member = x >= rest.amax(1, keepdim=True)
    tied = member.sum(1) != k  # [L, N]
    if bool(tied.any()):
        layer, token = tied.nonzero(as_tuple=True)
        order = torch.sort(x[layer, :, token], dim=1, descending=True, stable=True).indices[:, :k]
        member[layer, :, token] = torch.zeros_like(member[layer, :, token]).scatter_(1, order, True)
    return member
