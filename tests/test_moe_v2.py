"""V2 on real fixture MoE blocks: per-expert outputs recombine into the block, and planted structure
(set through the blocks' own router and expert weights) is found with the right signs."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from geocache.moe import block_output, expert_output, expert_outputs, moe_blocks, recombine, recorded_router_logits, router_of, selection, v2_tokens
from geocache.testing import MOE_MODEL_TYPES, tiny_config
from geocache.v2 import StrataConfig, c1_c2


def _model(model_type, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=64, **overrides)).eval()


@pytest.mark.parametrize("model_type", MOE_MODEL_TYPES)
def test_router_logits_recorded_by_hooks_are_the_models_own_with_their_gradient(model_type):
    """What training reads instead of ``output_router_logits=True`` (which also computes the
    load-balancing loss): the same tensors, layer for layer, and gradients reach the routers."""
    model = _model(model_type).train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    want = model(input_ids=ids, output_router_logits=True).router_logits
    with recorded_router_logits(model) as got:
        out = model(input_ids=ids)
    assert len(got) == len(want) == len(moe_blocks(model)) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    sum(g.float().logsumexp(-1).sum() for g in got).backward()
    assert all(router_of(b).weight.grad is not None and router_of(b).weight.grad.abs().sum() > 0 for _, b in moe_blocks(model))
    model(input_ids=ids)  # outside the block nothing is recorded
    assert len(got) == len(want) and out.router_logits is None


@pytest.mark.parametrize("model_type", MOE_MODEL_TYPES)
def test_router_jaccard_compares_the_experts_the_routers_actually_choose(model_type):
    """S = the routed expert set: for DeepSeek-V3 (random correction bias, 4 groups, 2 kept) the
    top-k of sigmoid + bias within the best groups, not of the raw logits; for the others the
    top-k of the logits. Reference: each router's own indices, Jaccard by brute force."""
    from geocache.losses import router_divergence_loss
    from geocache.moe import routing_choice

    model = _model(model_type)
    g = torch.Generator().manual_seed(1)
    blocks = moe_blocks(model)
    if model_type == "deepseek_v3":
        for _, block in blocks:
            router_of(block).e_score_correction_bias.copy_(torch.randn(router_of(block).e_score_correction_bias.shape, generator=g))
    choice = routing_choice(model)
    assert (choice is not None) == (model_type == "deepseek_v3")
    hidden = model.config.hidden_size
    x_base = torch.randn(300, hidden, generator=g)
    x_tuned = x_base + 0.5 * torch.randn(300, hidden, generator=g)
    logits, routed = {}, {}
    with torch.no_grad():
        for name, x in (("base", x_base), ("tuned", x_tuned)):
            outs = [router_of(block)(x) for _, block in blocks]
            logits[name] = torch.stack([o[0] for o in outs]).float()  # [L, N, E]
            routed[name] = [o[-1] for o in outs]
    k = model.config.num_experts_per_tok
    want = sum(len(set(b.tolist()) & set(t.tolist())) / len(set(b.tolist()) | set(t.tolist()))
               for lb, lt in zip(routed["base"], routed["tuned"]) for b, t in zip(lb, lt)) / (300 * len(blocks))
    scoring = "sigmoid" if model_type == "deepseek_v3" else "softmax"
    _, metrics = router_divergence_loss(logits["tuned"], logits["base"], top_k=k, scoring=scoring, choice=choice)
    assert metrics["router_jaccard"].item() == pytest.approx(want, abs=1e-6)
    if model_type == "deepseek_v3":  # the raw logits' top-k is another set: the test tells them apart
        _, raw = router_divergence_loss(logits["tuned"], logits["base"], top_k=k, scoring=scoring)
        assert abs(raw["router_jaccard"].item() - want) > 0.01


def test_choice_scores_rank_softmax_routers_with_a_bias_by_softmax_plus_bias():
    """LongCat-Flash-style routing: softmax probabilities plus a correction bias, no groups."""
    from geocache.moe import choice_scores

    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(2, 50, 8, generator=g), 0.1 * torch.randn(2, 8, generator=g)
    got = choice_scores(logits, {"bias": bias, "scoring": "softmax", "n_group": 1, "topk_group": 1}).topk(2, -1).indices.sort(-1).values
    want = torch.stack([(logits[l].softmax(-1) + bias[l]).topk(2, -1).indices.sort(-1).values for l in range(2)])
    assert torch.equal(got, want)
    sig = choice_scores(logits, {"bias": bias, "scoring": "sigmoid", "n_group": 1, "topk_group": 1}).topk(2, -1).indices.sort(-1).values
    assert not torch.equal(sig, want)  # the scoring matters here


@pytest.mark.parametrize("model_type", MOE_MODEL_TYPES)
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_single_expert_outputs_with_the_real_routing_weights_rebuild_the_block(model_type, impl):
    model = _model(model_type)
    model.set_experts_implementation(impl)
    blocks = moe_blocks(model)
    expected = {"deepseek_v3": [1, 2]}.get(model_type, [0, 1, 2])
    assert [i for i, _ in blocks] == expected
    g = torch.Generator().manual_seed(1)
    for _, block in blocks:
        with torch.no_grad():  # zero-initialised biases would hide a wrong layout; randomise them
            router = router_of(block)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.normal_(0, 0.5, generator=g)
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                if hasattr(block.experts, name):
                    getattr(block.experts, name).normal_(0, 0.5, generator=g)
        x = torch.randn(11, model.config.hidden_size, generator=g)
        ref = block_output(block, x)
        got = recombine(block, x)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        # And the pieces are what they say: the selection equals the top-k of the scores (for
        # plain top-k routers) and each expert's output is its own.
        r = selection(block, x)
        if model_type != "deepseek_v3":  # group-limited routing may skip a higher-scoring expert
            assert torch.equal(r["selected"].sort(-1).values, r["scores"].topk(r["selected"].shape[1], -1).indices.sort(-1).values)
        a = expert_outputs(block.experts, x, torch.zeros(11, dtype=torch.long))
        b = expert_outputs(block.experts, x, torch.ones(11, dtype=torch.long))
        assert not torch.allclose(a, b)
        # The experts module called with one expert and weight 1 is that expert's ungated output,
        # as computed by hand from its fused parameters (per-token ids, mixed).
        ids = torch.arange(11) % block.experts.gate_up_proj.shape[0]
        by_hand = torch.stack([expert_output(block.experts, x[n : n + 1], int(ids[n]))[0] for n in range(11)])
        torch.testing.assert_close(expert_outputs(block.experts, x, ids), by_hand, rtol=1e-5, atol=1e-6)


def _circle(block, hidden, n_experts, smooth: float, plane_only: bool, scale: float = 4.0, seed=0):
    """Router: expert e's row points at angle θ_e = 2πe/E in a plane (u, v) of the hidden space, so the
    experts ranked after a token's best are its neighbours on the circle. Experts: weights that vary
    smoothly with θ_e (``smooth`` scales the varying part); with ``plane_only`` they differ only in
    how they read the (u, v) components of x."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.eye(hidden)[0], torch.eye(hidden)[1]
    theta = torch.arange(n_experts) * 2 * math.pi / n_experts
    ex = block.experts
    with torch.no_grad():
        router_of(block).weight.copy_(scale * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * v))
        gu, dn = ex.gate_up_proj, ex.down_proj
        base_gu, base_dn = torch.randn(gu.shape[1:], generator=g) * 0.3, torch.randn(dn.shape[1:], generator=g) * 0.3
        c1, s1 = torch.randn(gu.shape[1:], generator=g), torch.randn(gu.shape[1:], generator=g)
        if plane_only:  # the varying part reads only the u, v columns of x
            mask = torch.zeros(hidden)
            mask[:2] = 1
            c1, s1 = c1 * mask, s1 * mask
        for e in range(n_experts):
            gu[e] = base_gu + smooth * (math.cos(theta[e]) * c1 + math.sin(theta[e]) * s1)
            dn[e] = base_dn


def _groups_of_k_plus_1(block, hidden, n_experts, k, noise=0.02, seed=0):
    """Experts in groups of k + 1 with near-identical router rows and near-identical weights: when a
    token's best group is a full one, its members rank 1..k+1, so e_k and e_{k+1} are near copies
    (groups of k would put e_{k+1} in another group: the naive layout)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(n_experts) // (k + 1)
    n_groups = int(group.max()) + 1
    directions = torch.nn.functional.normalize(torch.randn(n_groups, hidden, generator=g), dim=-1)
    ex = block.experts
    with torch.no_grad():
        router_of(block).weight.copy_(3.0 * directions[group] + noise * torch.randn(n_experts, hidden, generator=g))
        gu = torch.randn(n_groups, *ex.gate_up_proj.shape[1:], generator=g) * 0.3
        dn = torch.randn(n_groups, *ex.down_proj.shape[1:], generator=g) * 0.3
        ex.gate_up_proj.copy_(gu[group] + noise * torch.randn(ex.gate_up_proj.shape, generator=g))
        ex.down_proj.copy_(dn[group] + noise * torch.randn(ex.down_proj.shape, generator=g))
    return group


def test_planted_adjacent_near_copies_pass_c2_and_independent_experts_do_not():
    model = _model("qwen3_moe")
    (_, block), H, E = moe_blocks(model)[0], model.config.hidden_size, model.config.num_experts
    k = router_of(block).top_k
    group = _groups_of_k_plus_1(block, H, E, k)
    x = torch.randn(6000, H, generator=torch.Generator().manual_seed(2))
    t = v2_tokens(block, x, generator=torch.Generator().manual_seed(3))
    # The planted sign, computed directly: e_{k+1} shares e_k's group far more often than e_r does.
    same_next = (group[t["e_k"]] == group[t["e_next"]]).float().mean()
    same_rand = (group[t["e_k"]] == group[t["e_rand"]]).float().mean()
    assert same_next > 0.5 > 0.2 > same_rand
    assert (t["kappa_next"] < t["kappa_rand"]).float().mean() > 0.6
    out = c1_c2(t["margin"].numpy(), t["kappa_next"].numpy(), t["kappa_rand"].numpy(), StrataConfig(), n_resamples=1000)
    assert out["delta_brand"]["value"] < 0 and out["delta_brand"]["pass"]

    # Independent random experts (and a random router): nothing singles out e_{k+1}.
    model = _model("qwen3_moe")
    _, block = moe_blocks(model)[0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        block.experts.gate_up_proj.normal_(0, 0.3, generator=g)
        block.experts.down_proj.normal_(0, 0.3, generator=g)
        router_of(block).weight.normal_(0, 1.0, generator=g)
    t = v2_tokens(block, x, generator=torch.Generator().manual_seed(3))
    null = c1_c2(t["margin"].numpy(), t["kappa_next"].numpy(), t["kappa_rand"].numpy(), StrataConfig(), n_resamples=1000)
    assert null["delta_brand"]["ci_low"] < 0 < null["delta_brand"]["ci_high"] and not null["delta_brand"]["pass"]


def test_planted_closer_experts_on_boundary_tokens_pass_c1():
    """Experts differ only in how they read x's routing-plane components, whose size r also scales
    the routing margin: low-margin (boundary) tokens see nearly identical experts."""
    model = _model("qwen3_moe")
    (_, block), H, E = moe_blocks(model)[0], model.config.hidden_size, model.config.num_experts
    # A gentle router (logits within a few units), so the softmax margin grows with r.
    _circle(block, H, E, smooth=2.0, plane_only=True, scale=0.5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6000, H, generator=g)
    x[:, :2] *= torch.rand(6000, 1, generator=g) * 3  # spread r = |(u·x, v·x)|
    t = v2_tokens(block, x, generator=torch.Generator().manual_seed(8))
    r = x[:, :2].norm(dim=-1)
    # Direct check of the planted mechanism first: κ(e_k, e_{k+1}) grows with r, and so does the margin.
    assert np.corrcoef(r.numpy(), t["kappa_next"].numpy())[0, 1] > 0.5
    assert np.corrcoef(r.numpy(), t["margin"].numpy())[0, 1] > 0.3
    out = c1_c2(t["margin"].numpy(), t["kappa_next"].numpy(), t["kappa_rand"].numpy(), StrataConfig(), n_resamples=1000)
    assert out["delta_bi"]["value"] < 0 and out["delta_bi"]["pass"]
    assert out["kappa_next_boundary"] < out["kappa_next_interior"]
