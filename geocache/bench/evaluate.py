"""Exact held-out evaluation of a tuned adapter against its base: the live base, not the cache.

The tuned model and its base are the same PEFT model with the adapter on and off, so nothing is
loaded twice. Sequences come from a cache (its ``input_ids`` and labels; its statistics unused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from geocache.base import model_inputs
from geocache.signals import finite_log, shift_and_select


def load_tuned(model_dir: str | Path, adapter: str | Path, device: Optional[str] = None):
    """The base model with a trained adapter on top (PEFT), in eval mode."""
    from peft import PeftModel

    from geocache.models import load_model_and_tokenizer, quiet_peft_wrap

    base, tokenizer = load_model_and_tokenizer(str(model_dir), device=device)
    with quiet_peft_wrap():
        return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def brier(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score per position: Σ_v (q_v − 1[v = y])² = Σ q² − 2 q_y + 1. ``[N, V]`` → ``[N]``."""
    q = torch.softmax(logits.float(), -1)
    return (q * q).sum(-1) - 2 * q.gather(-1, targets[:, None]).squeeze(-1) + 1


@torch.no_grad()
def exact_heldout(model, cache_path: str | Path, batch_size: int = 8, calibration: bool = False, n_bins: int = 15) -> dict:
    """Means over the cache's labelled positions of the exact signals of tuned vs base: ``task_loss``
    (NLL) and ``base_task_loss``, ``kl_forward``, ``kl_reverse``, ``dH``, ``cal_gap``, ``H_tuned``,
    ``H_base``. With ``calibration``: top-1 ``ece`` / ``base_ece`` (torchmetrics'
    ``MulticlassCalibrationError``, ``n_bins`` equal-width bins, L1), ``brier`` / ``base_brier``, and
    for MoE models ``router_jaccard`` (top-k expert sets, tuned vs base, mean over MoE layers)."""
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.base import select_router_rows
    from geocache.losses import router_jaccard
    from geocache.models import moe_layout
    from geocache.moe import choice_scores, recorded_router_logits, routing_choice

    cache = open_cache(str(cache_path))
    if cache.manifest.data.get("preprocessing", {}).get("packing"):
        from geocache.base import check_packed_attention

        check_packed_attention(model)
    device = next(model.parameters()).device
    layout = moe_layout(model) if calibration else None
    choice = routing_choice(model) if layout is not None else None
    ece = base_ece = None
    if calibration:
        from torchmetrics.classification import MulticlassCalibrationError

        vocab = model.get_output_embeddings().weight.shape[0]
        ece, base_ece = (MulticlassCalibrationError(num_classes=vocab, n_bins=n_bins, norm="l1").to(device) for _ in range(2))
    sums: dict[str, float] = {}
    n = 0
    for start in range(0, len(cache), batch_size):
        batch = collate_cache_rows([cache[i] for i in range(start, min(start + batch_size, len(cache)))])
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        labels = batch["labels"].to(device)
        # Router logits by hooks, as in training (output_router_logits=True adds transformers'
        # load-balancing loss to every forward).
        with recorded_router_logits(model, enabled=layout is not None) as tuned_router:
            out = model(**inputs)
        q, targets = shift_and_select(out.logits.float(), labels)
        with model.disable_adapter(), recorded_router_logits(model, enabled=layout is not None) as base_router:
            base_out = model(**inputs)
        p, _ = shift_and_select(base_out.logits.float(), labels)
        # Each log-softmax once; the same definitions as geocache.signals (tests check against them).
        lq, lp = finite_log(torch.log_softmax(q, -1)), finite_log(torch.log_softmax(p, -1))  # masked tokens add 0, not NaN
        pq, pp = lq.exp(), lp.exp()
        h_q, h_p = -(pq * lq).sum(-1), -(pp * lp).sum(-1)
        nll_q, nll_p = -lq.gather(-1, targets[:, None]).squeeze(-1), -lp.gather(-1, targets[:, None]).squeeze(-1)
        values = {
            "task_loss": nll_q,
            "base_task_loss": nll_p,
            "kl_forward": (pp * (lp - lq)).sum(-1),
            "kl_reverse": (pq * (lq - lp)).sum(-1),
            "dH": h_q - h_p,
            "cal_gap": nll_q - h_q,
            "H_tuned": h_q,
            "H_base": h_p,
        }
        if calibration:
            # Brier: Σ_v (q_v − 1[v = y])² = Σ q² − 2 q_y + 1
            values["brier"] = (pq * pq).sum(-1) - 2 * (-nll_q).exp() + 1
            values["base_brier"] = (pp * pp).sum(-1) - 2 * (-nll_p).exp() + 1
            ece.update(pq, targets)
            base_ece.update(pp, targets)
            if layout is not None:
                k = layout["top_k"]
                # [L, P, E], ranked as the routers choose (DeepSeek-V3: biased scores within groups)
                tuned_r = choice_scores(select_router_rows(tuned_router, labels), choice)
                base_r = choice_scores(select_router_rows(base_router, labels), choice)
                values["router_jaccard"] = torch.stack(
                    [router_jaccard(b.topk(k, -1).indices, t.topk(k, -1).indices) for t, b in zip(tuned_r, base_r)]
                ).mean(0)
        for key, v in values.items():
            sums[key] = sums.get(key, 0.0) + v.double().sum().item()
        n += targets.numel()
    result = {key: v / max(n, 1) for key, v in sums.items()} | {"positions": n}
    if calibration:
        result |= {"ece": ece.compute().item(), "base_ece": base_ece.compute().item()}
    return result
