"""Access to transformers-5 MoE blocks through their own modules: routing scores in the space the
router selects in, and single experts' ungated outputs.

transformers 5 fuses the experts of a block into 3-D parameters and its ``experts(x, idx, w)``
returns only the routing-weighted sum, so one expert's output E_a(x) is computed here from that
module's own parameters and activation (written by hand: transformers exposes no per-expert call).
``recombine`` rebuilds the block's output from these pieces; the tests check it against the block's
forward for every fixture architecture (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3, GPT-OSS).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, MoE block) for every layer whose MLP holds fused experts."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:  # not a decoder stack geocache knows (e.g. GPT-2's transformer.h): no MoE blocks
        return []
    out = []
    for i, layer in enumerate(layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and getattr(experts, "gate_up_proj", None) is not None and experts.gate_up_proj.dim() == 3:
            out.append((i, layer.mlp))
    return out


def router_of(block: nn.Module) -> nn.Module:
    return block.router if hasattr(block, "router") else block.gate


def routing_choice(model: nn.Module) -> dict | None:
    """How the routers choose their experts, where that is not the top-k of the router logits:
    routers with a per-expert correction bias rank their scores (sigmoid for DeepSeek-V3, softmax
    for LongCat-Flash, as ``moe_layout`` reads the config) plus the bias, DeepSeek-V3 within the
    ``topk_group`` best of ``n_group`` expert groups (a group scored by its two best experts).
    Returns ``{"bias": [L, E] float32, "scoring", "n_group", "topk_group"}`` over the MoE layers,
    or None (routers without a bias: the top-k of the logits is the routed set)."""
    from geocache.models import moe_layout

    from accelerate.utils import align_module_device

    routers = [router_of(block) for _, block in moe_blocks(model)]
    if not routers or not all(hasattr(r, "e_score_correction_bias") for r in routers):
        return None
    biases = []
    for r in routers:  # an offloaded router (a device_map) holds its buffer only inside its forward
        with align_module_device(r, torch.device("cpu")):
            biases.append(r.e_score_correction_bias.detach().float().cpu())
    layout = moe_layout(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return {
        "bias": torch.stack(biases),
        "scoring": layout["scoring"] if layout else "sigmoid",
        "n_group": int(getattr(routers[0], "num_group", 1) or 1),
        "topk_group": int(getattr(routers[0], "topk_group", 1) or 1),
    }


def choice_scores(logits: torch.Tensor, choice: dict | None, dim: int = -1) -> torch.Tensor:
    """Router logits ``[L, ..., E, ...]`` (experts along ``dim``, MoE layers first) as the scores
    the routers rank experts by, with experts outside the chosen groups at −inf: their top-k is
    the routed set. Without a ``choice`` (``routing_choice``) the logits themselves."""
    if choice is None:
        return logits
    x = logits.float().movedim(dim, -1)  # [L, ..., E]
    bias = choice["bias"].to(x.device)
    probs = x.softmax(-1) if choice.get("scoring") == "softmax" else x.sigmoid()
    scores = probs + bias.view(bias.shape[0], *([1] * (x.dim() - 2)), bias.shape[1])
    g, keep = choice["n_group"], choice["topk_group"]
    if g > 1 and keep < g:
        grouped = scores.unflatten(-1, (g, scores.shape[-1] // g))  # [L, ..., G, E/G]
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [L, ..., G]
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, group_score.topk(keep, dim=-1).indices, True)
        scores = grouped.masked_fill(~kept.unsqueeze(-1), -math.inf).flatten(-2)
    return scores.movedim(-1, dim)


@contextmanager
def recorded_router_logits(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record the router logits ``[tokens, E]`` of every MoE layer during the forwards run inside
    the block, in layer order, by forward hooks on the routers (their first output, as
    transformers' own recorder takes it). The same tensors as ``output_router_logits=True``, with
    their autograd graph, without the load-balancing loss transformers computes whenever it
    returns them (0.5-1.2 ms of a 35 ms step of the tiny training benchmark). Hooks are
    removed on exit, so a gradient-checkpointing recomputation in backward records nothing.
    ``enabled=False`` records nothing (the list stays empty)."""
    logits: list[torch.Tensor] = []

    def hook(module, args, output):
        logits.append(output[0] if isinstance(output, tuple) else output)

    handles = [router_of(block).register_forward_hook(hook) for _, block in moe_blocks(model)] if enabled else []
    try:
        yield logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def selection(block: nn.Module, x: torch.Tensor) -> dict:
    """The block's routing of tokens ``x [N, H]``: ``scores [N, E]`` in the space the router ranks
    experts in (softmax probabilities; DeepSeek-V3: sigmoid + correction bias; GPT-OSS: raw logits),
    the router's own ``selected [N, k]`` and ``weights [N, k]``, and ``logits [N, E]``."""
    router = router_of(block)
    logits, weights, selected = router(x)
    name = type(block).__name__
    if name == "GptOssMLP":
        scores = logits.float()
    elif name == "DeepseekV3MoE":
        scores = logits.float().sigmoid() + router.e_score_correction_bias.float()
    else:
        scores = logits.float().softmax(-1)
    return {"scores": scores, "selected": selected, "weights": weights, "logits": logits}


def top_k(block: nn.Module) -> int:
    return int(router_of(block).top_k)


@torch.no_grad()
def expert_output(experts: nn.Module, x: torch.Tensor, a: int) -> torch.Tensor:
    """Expert ``a``'s ungated output on tokens ``x [N, H]`` → ``[N, H]``."""
    if getattr(experts, "is_transposed", False):  # GPT-OSS: [E, H, 2I] interleaved gate/up, biases, clamped GLU
        h = x @ experts.gate_up_proj[a] + experts.gate_up_proj_bias[a]
        gate, up = h[..., ::2].clamp(max=experts.limit), h[..., 1::2].clamp(-experts.limit, experts.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * experts.alpha))) @ experts.down_proj[a] + experts.down_proj_bias[a]
    gate, up = F.linear(x, experts.gate_up_proj[a]).chunk(2, dim=-1)  # [E, 2I, H]: gate rows, then up rows
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[a])


@torch.no_grad()
def expert_outputs(experts: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``E_{ids[n]}(x[n])`` for per-token expert ids ``[N]`` → ``[N, H]``: the experts module called
    with one expert per token and weight 1 (its own kernels, whichever implementation is set)."""
    return experts(x, ids.long().unsqueeze(1), torch.ones(len(ids), 1, dtype=x.dtype, device=x.device))


@torch.no_grad()
def shared_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shared experts' contribution (Qwen2-MoE: sigmoid-gated; DeepSeek-V3: ungated), or zeros."""
    if hasattr(block, "shared_expert"):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if hasattr(block, "shared_experts"):
        return block.shared_experts(x)
    return torch.zeros_like(x)


@torch.no_grad()
def recombine(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · E_{i_k}(x) + shared(x) with the router's own choice: the block's output on ``x [N, H]``."""
    r = selection(block, x)
    y = shared_output(block, x).float()
    for j in range(r["selected"].shape[1]):
        y = y + r["weights"][:, j, None].float() * expert_outputs(block.experts, x, r["selected"][:, j]).float()
    return y.to(x.dtype)


@torch.no_grad()
def block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's own forward on ``x [N, H]`` (called as ``[1, N, H]``; GPT-OSS's tuple unpacked)."""
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


@torch.no_grad()
def v2_tokens(block: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """Per token of ``x [N, H]`` (the block's input): the routing margin and κ(e_k, e_{k+1}),
    κ(e_k, e_r) of SPEC's V2, from the block's own router and experts (``geocache.v2``)."""
    from geocache.v2 import kappa, routing_ranks

    r = selection(block, x)
    ranks = routing_ranks(r["scores"], top_k(block), r["selected"], generator=generator)
    n = len(x)
    # The three experts of every token in one call of the experts module.
    out = expert_outputs(block.experts, x.repeat(3, 1), torch.cat([ranks["e_k"], ranks["e_next"], ranks["e_rand"]]))
    e_k, e_next, e_rand = out[:n], out[n : 2 * n], out[2 * n :]
    return {**ranks, "selected": r["selected"], "kappa_next": kappa(e_k, e_next), "kappa_rand": kappa(e_k, e_rand)}
