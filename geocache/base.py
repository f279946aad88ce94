"""Where the base distribution comes from during training: ``cache`` | ``live`` | ``copy`` | ``periodic``.

Every mode returns a ``BaseBatch`` for a training batch, and the loss cannot tell them apart:

| mode | base weights in memory | extra compute per step |
|---|---|---|
| ``cache`` | none beyond the model being tuned | none: statistics come with the batch |
| ``live`` | none extra: the PEFT model with its adapter disabled | one no-grad forward |
| ``copy`` | a second frozen model (optionally offloaded to CPU) | one forward |
| ``periodic`` | as ``live``/``copy`` | one forward every N steps |

``periodic`` gives no base on the other steps: there the loss keeps the task loss and the
calibration-gap penalty (which need only the tuned model) and drops the KL, entropy-drop and router
terms. That is what it loses: the base-relative penalties act on 1/N of the batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from geocache.moe import recorded_router_logits
from geocache.signals import BaseStats, labelled_positions

BASE_MODES = ("cache", "live", "copy", "periodic")


@dataclass
class BaseBatch:
    """The base side of one batch.

    lm: ``BaseStats`` over the labelled positions, full base logits ``[B, T, V]``, or None (no base).
    router: the MoE layers over the labelled positions, stacked ``[L, P, ...]``: base router
    logits ``[L, P, E]`` (float) or base expert ids ``[L, P, r]`` (int, best first); None for
    dense models or no base. router_logprobs: with ids, the base's log r at each ``[L, P, r]``
    (a top-k router cache), for the router loss's KL over those experts and the rest.
    """

    lm: Union[BaseStats, torch.Tensor, None]
    router: Optional[torch.Tensor] = None
    router_logprobs: Optional[torch.Tensor] = None


def _router_from_batch(batch: dict) -> Optional[torch.Tensor]:
    for key in ("router_logits", "router_topk_ids"):
        if key in batch:
            return batch[key].transpose(0, 1)  # [P, L, ...] → [L, P, ...], a view
    return None


def select_router_rows(router_logits, labels: Optional[torch.Tensor] = None, *, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router logits of a forward (one ``[B*T, E]`` tensor per MoE layer) at the labelled
    positions (of ``labels``, or ``rows`` from ``labelled_positions`` when the caller has them),
    stacked ``[L, P, E]``."""
    if rows is None:
        rows, _ = labelled_positions(labels)
    stacked = torch.stack([r.to(router_logits[0].device) for r in router_logits])  # a device_map spreads layers
    return stacked.index_select(1, rows.to(stacked.device))


class CacheBase:
    """Base statistics read from the cache beside each batch: no base forward at all."""

    mode = "cache"

    def __call__(self, model, batch: dict, step: int) -> BaseBatch:
        if "base" not in batch:
            raise ValueError("base mode 'cache' needs batches from a geocache cache (collate_cache_rows), which carry base statistics")
        logprobs = batch.get("router_topk_logprobs")
        return BaseBatch(batch["base"], _router_from_batch(batch), logprobs.transpose(0, 1) if logprobs is not None else None)


def model_inputs(batch: dict) -> dict:
    """The model's inputs from a batch of cache rows. Packed rows (``position_ids``) go without
    the 2-D attention mask, as HF's ``DataCollatorWithFlattening`` batches them: transformers
    builds the block-diagonal causal mask from the position ids only when ``attention_mask`` is
    None, and with a 2-D mask each packed example would attend to the ones before it in its row,
    which precompute never lets happen (the cache's statistics are of each example alone)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def check_packed_attention(model, what: str = "the model") -> None:
    """Refuse, in one sentence, a model whose forward lets packed examples attend to each other.

    Packed rows go with ``position_ids`` and no mask (``model_inputs``); most transformers models
    build the block-diagonal mask from them, but not every one (GPT-OSS builds its masks without
    the position ids). Probed with one forward of two rows that share a second example after
    different first ones: kept apart, the second example's logits are the same in both rows."""
    from geocache.models import model_kind

    emb = model.get_input_embeddings()
    vocab, device = emb.num_embeddings, emb.weight.device
    if device.type == "meta":  # offloaded by accelerate: inputs go where its hook runs the model
        hook = getattr(model, "_hf_hook", None) or getattr(emb, "_hf_hook", None)
        device = getattr(hook, "execution_device", None) or torch.device("cpu")
    n = 6
    second = torch.arange(3, 3 + 2 * n, 2) % vocab
    rows = torch.stack([torch.cat([torch.arange(1, 1 + n) % vocab, second]), torch.cat([torch.arange(n + 40, 40, -1) % vocab, second])])
    position_ids = torch.arange(n).repeat(2).expand(2, -1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                logits = model(input_ids=rows.to(device), position_ids=position_ids.to(device), use_cache=False).logits[:, n:].float()
            except TypeError as exc:  # a forward without position_ids: packed examples cannot be told apart
                raise ValueError(f"{what} ({model_kind(model)}) takes no position_ids ({exc}), so it cannot keep the examples of a packed row "
                                 "apart: precompute the cache without --packing") from None
    finally:
        model.train(was_training)
    scale = 1.0 + logits.abs().max().item()
    tol = (1e-4 if emb.weight.dtype in (torch.float32, torch.float64) else 2e-2) * scale
    if (logits[0] - logits[1]).abs().max().item() > tol:
        raise ValueError(f"{what} ({model_kind(model)}) lets attention cross the examples of a packed row (its forward does not build the "
                         "block-diagonal mask from position_ids), so it cannot train on a packed cache exactly: precompute the "
                         "cache without --packing")


def _forward_base(model, batch: dict, want_router: bool) -> BaseBatch:
    """One no-grad, eval-mode (dropout off) forward of ``model`` on the batch."""
    was_training = model.training
    model.eval()
    try:
        # Router logits through hooks: output_router_logits=True would also compute transformers'
        # load-balancing loss, which nothing here reads.
        with torch.no_grad(), recorded_router_logits(model, enabled=want_router) as router_logits:
            out = model(**model_inputs(batch), use_cache=False)
    finally:
        model.train(was_training)
    router = select_router_rows(router_logits, batch["labels"]) if router_logits else None
    return BaseBatch(out.logits, router)


class LiveBase:
    """The base is the tuned PEFT model with its adapter disabled: no second copy of the weights."""

    mode = "live"

    def __init__(self, want_router: bool = False):
        self.want_router = want_router

    def __call__(self, model, batch: dict, step: int) -> BaseBatch:
        disable = getattr(model, "disable_adapter", None)
        if disable is None:
            raise ValueError("base mode 'live' needs a PEFT model (its adapter disabled is the base); use 'copy' for a full model")
        with disable():
            return _forward_base(model, batch, self.want_router)


class CopyBase:
    """A separate frozen base model, for when the starting weights differ from the base (or the
    tuned model is not a PEFT model). ``offload`` keeps its weights on the CPU through accelerate
    and streams them to the compute device layer by layer."""

    mode = "copy"

    def __init__(self, base_model, want_router: bool = False, offload: bool = False, device: Optional[torch.device] = None):
        from geocache.models import no_hub_kernels_offline

        base_model.requires_grad_(False)
        base_model.eval()
        no_hub_kernels_offline(base_model)
        if offload:
            from accelerate import cpu_offload

            cpu_offload(base_model, execution_device=device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        elif device is not None:
            base_model.to(device)
        self.base_model = base_model
        self.want_router = want_router

    def __call__(self, model, batch: dict, step: int) -> BaseBatch:
        return _forward_base(self.base_model, batch, self.want_router)


class PeriodicBase:
    """Queries an inner ``live``/``copy`` base every ``every`` training steps (step 0 included); no
    base otherwise. Evaluation (the model in eval mode) queries it on every batch, so that eval
    metrics and ``eval_loss`` mean the same whatever step they are taken at."""

    mode = "periodic"

    def __init__(self, inner, every: int):
        if every < 1:
            raise ValueError(f"periodic base every={every} must be >= 1")
        self.inner, self.every = inner, every

    def __call__(self, model, batch: dict, step: int) -> BaseBatch:
        if step % self.every == 0 or not model.training:
            return self.inner(model, batch, step)
        return BaseBatch(None, None)

