"""geocache train: base modes agree, runs resume exactly, ranks agree, bad input is refused."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from geocache.base import CacheBase, LiveBase, PeriodicBase
from geocache.cache import CacheError, collate_cache_rows, open_cache
from geocache.config import GeometryConfig
from geocache.data import DataConfig
from geocache.precompute import PrecomputeConfig, precompute
from geocache.testing import MOE_MODEL_TYPES, build_tiny_model
from geocache.train import TrainConfig, train
from geocache.trainer import GeometryTrainer, add_dora_adapter, default_target_modules
from geocache_cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
ALL_ON = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0, lambda_router=0.5)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    import inspect
    import textwrap

    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    chunks = [c for c in inspect.getsource(textwrap).split("\n\n") if c.strip()][:24]
    rows = [{"prompt": f"Explain part {i}:\n", "completion": c} for i, c in enumerate(chunks)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def moe_cache(tmp_path_factory, tiny_model_dir, sft_data):
    """A MoE model and caches of it at k = vocab and at k = 64."""
    model = tiny_model_dir("qwen3_moe")
    root = tmp_path_factory.mktemp("caches")
    for k in (512, 64):
        precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(root / f"k{k}"), k=k, m=4, progress=False, data_config=DataConfig(max_length=64)))
    return model, root


def _trainer(model_dir, cache_path, base, out, geometry=ALL_ON, eval_dataset=None, **args):
    torch.manual_seed(0)
    model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(model_dir), r=4, alpha=8)
    targs = TrainingArguments(output_dir=str(out), report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0, **args)
    return GeometryTrainer(model=model, args=targs, train_dataset=open_cache(str(cache_path)), eval_dataset=eval_dataset, geometry_config=geometry,
                           base=base)


def _loss_and_grads(trainer, rows):
    batch = collate_cache_rows(rows)
    trainer.model.train()
    # Perturb the adapter so that tuned != base and every term has a gradient.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_one_step_from_the_cache_at_k_vocab_matches_the_live_base(tmp_path, moe_cache):
    model, root = moe_cache
    rows = [open_cache(str(root / "k512"))[i] for i in range(4)]
    l_cache, g_cache = _loss_and_grads(_trainer(model, root / "k512", CacheBase(), tmp_path / "a"), rows)
    l_live, g_live = _loss_and_grads(_trainer(model, root / "k512", LiveBase(want_router=True), tmp_path / "b"), rows)
    # The only difference: the cache stores log-probs and router logits in float16.
    torch.testing.assert_close(l_cache, l_live, rtol=1e-3, atol=1e-4)
    assert g_cache.keys() == g_live.keys() and len(g_cache) > 10
    for name in g_cache:
        torch.testing.assert_close(g_cache[name], g_live[name], rtol=2e-2, atol=2e-4)


def test_packed_rows_train_on_each_example_alone_as_the_cache_holds_them(tmp_path, tiny_model_dir, sft_data):
    """Packed rows: the tuned forward (and a live base's) must not let an example attend to the
    ones packed before it, or the cache's statistics (each example alone) would not be the base's
    of what the tuned model sees. At the adapter's initialisation the tuned model is the base: its
    logsumexp at every labelled position equals the cached one."""
    from geocache.base import _forward_base
    from geocache.signals import labelled_positions

    model_dir = tiny_model_dir("qwen3")
    cache_path = tmp_path / "packed"
    precompute(PrecomputeConfig(model=str(model_dir), data=[str(sft_data)], out=str(cache_path), k=8, m=2, progress=False,
                                data_config=DataConfig(max_length=128, packing=True)))
    cache = open_cache(str(cache_path))
    batch = collate_cache_rows([cache[i] for i in range(min(4, len(cache)))])
    assert "position_ids" in batch and (batch["position_ids"][:, 1:] == 0).any()  # examples start mid-row
    trainer = _trainer(model_dir, cache_path, CacheBase(), tmp_path / "run")
    rows, _ = labelled_positions(batch["labels"])
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    tuned_lse = outputs.logits.detach().float().reshape(-1, outputs.logits.shape[-1])[rows].logsumexp(-1)
    torch.testing.assert_close(tuned_lse, batch["base"].lse, rtol=0, atol=1e-4)
    with trainer.model.disable_adapter():
        live = _forward_base(trainer.model, batch, want_router=False).lm
    torch.testing.assert_close(live.float().reshape(-1, live.shape[-1])[rows].logsumexp(-1), batch["base"].lse, rtol=0, atol=1e-4)


def test_a_model_that_lets_packed_examples_attend_to_each_other_is_refused_a_packed_cache(tmp_path, tiny_model_dir, sft_data):
    """GPT-OSS builds its attention masks without the position ids: a packed second example's logits
    moved by ~0.25 with the example before it, and training from a packed cache was silently not
    what the cache holds (precompute runs each example alone)."""
    from geocache.base import check_packed_attention

    for kind in ("llama", "qwen3", *MOE_MODEL_TYPES):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind))
        if kind == "gpt_oss":
            with pytest.raises(ValueError, match=r"the model \(gpt_oss\) lets attention cross the examples of a packed row"):
                check_packed_attention(model)
        else:
            check_packed_attention(model)  # the block-diagonal mask from position_ids
    # the probe's premise, independently: the second example alone vs after another, by hand
    gpt = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt_oss")).eval()
    second = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        alone = gpt(input_ids=second).logits[0]
        packed = gpt(input_ids=torch.cat([torch.tensor([[11, 3, 8]]), second], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]])).logits[0, 3:]
    assert (alone - packed).abs().max() > 1e-3
    model_dir = tiny_model_dir("gpt_oss")
    cache_path = tmp_path / "packed"
    precompute(PrecomputeConfig(model=str(model_dir), data=[str(sft_data)], out=str(cache_path), k=8, m=2, progress=False,
                                data_config=DataConfig(max_length=128, packing=True)))
    with pytest.raises(ValueError, match=r"cannot train on a packed cache exactly: precompute the cache without --packing"):
        _trainer(model_dir, cache_path, CacheBase(), tmp_path / "run")


def test_a_topk_router_cache_gives_no_router_drift_at_the_adapters_init(tmp_path, moe_cache, sft_data):
    """A top-(k+1) router cache (what --router auto keeps for large MoE models): the router loss at
    the adapter's initialisation (tuned = base) was the escaped mass, ~0.72 a layer, with a gradient
    pulling the routers onto the base's top-k from the first step; now ~0, like a full cache."""
    model, root = moe_cache
    path = tmp_path / "topk"
    precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(path), k=64, m=4, router="topk", progress=False,
                                data_config=DataConfig(max_length=64)))
    rows = [open_cache(str(path))[i] for i in range(4)]
    trainer = _trainer(model, path, CacheBase(), tmp_path / "a")
    batch = collate_cache_rows(rows)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    metrics = trainer._flush("train")
    assert abs(metrics["router_divergence"]) < 1e-4 and metrics["router_jaccard"] == 1.0, metrics
    # after the adapter moves, it measures drift as the full cache does, from below
    l_topk, _ = _loss_and_grads(trainer, rows)
    topk = trainer._flush("train")["router_divergence"]
    full_trainer = _trainer(model, root / "k64", CacheBase(), tmp_path / "b")
    _loss_and_grads(full_trainer, [open_cache(str(root / "k64"))[i] for i in range(4)])
    full = full_trainer._flush("train")["router_divergence"]
    assert 0.3 * full < topk <= full * (1 + 1e-3), (topk, full)
    # a top-k cache from before the log-probs were written: the escaped mass, with a warning that says so
    old = {k: v for k, v in batch.items() if k != "router_topk_logprobs"}
    with pytest.warns(UserWarning, match="the router loss is the escaped mass .* not 0 at the base"):
        trainer.compute_loss(trainer.model, old)
    assert trainer._flush("train")["router_divergence"] > 0.3


def test_per_layer_router_metrics_are_keyed_by_decoder_layer_as_the_manifest_and_profile_number_them(tmp_path, tiny_model_dir, sft_data):
    model = tiny_model_dir("deepseek_v3")  # its first decoder layer is dense: MoE layers 1 and 2
    path = tmp_path / "c"
    manifest = precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(path), k=8, m=2, progress=False,
                                           data_config=DataConfig(max_length=64)))
    assert manifest.moe["layers"] == [1, 2]
    trainer = _trainer(model, path, CacheBase(), tmp_path / "run")
    trainer.compute_loss(trainer.model, collate_cache_rows([open_cache(str(path))[i] for i in range(2)]))
    keys = {k for k in trainer._flush("train") if "_per_layer/" in k}
    assert keys == {f"router_{m}_per_layer/{i}" for m in ("jaccard", "divergence") for i in (1, 2)}  # were /0 and /1


def test_at_k_64_the_cached_loss_is_within_the_estimators_error(tmp_path, moe_cache):
    """topk_tail misses exactly the divergence inside the tail: KL − KL_tail = p_T · KL(p|tail ‖ q|tail)."""
    from geocache.signals import labelled_positions

    model, root = moe_cache
    rows = [open_cache(str(root / "k64"))[i] for i in range(4)]
    geometry = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, lambda_kl=1.0, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0,
                              kl_estimator="topk_tail")
    t_cache = _trainer(model, root / "k64", CacheBase(), tmp_path / "a", geometry)
    t_live = _trainer(model, root / "k64", LiveBase(), tmp_path / "b", geometry)
    l_cache, _ = _loss_and_grads(t_cache, rows)
    l_live, _ = _loss_and_grads(t_live, rows)
    kl_cache = t_cache._flush("train")["KL_mean"]
    kl_live = t_live._flush("train")["KL_mean"]
    assert kl_cache <= kl_live + 1e-5
    # With λ_KL = 1 and every position penalised, the loss gap is the KL gap.
    assert (l_live - l_cache).item() == pytest.approx(kl_live - kl_cache, abs=1e-5)
    batch = collate_cache_rows(rows)
    peft_model = t_live.model
    with torch.no_grad():
        tuned = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    idx, _ = labelled_positions(batch["labels"])
    lp = torch.log_softmax(base.reshape(-1, base.shape[-1])[idx].double(), -1)
    lq = torch.log_softmax(tuned.reshape(-1, tuned.shape[-1])[idx].double(), -1)
    tail = torch.ones_like(lp, dtype=torch.bool).scatter_(1, batch["base"].topk_ids, False)
    lp_t, lq_t = lp.masked_fill(~tail, -torch.inf), lq.masked_fill(~tail, -torch.inf)
    p_mass = lp_t.logsumexp(-1)
    p_cond, q_cond = lp_t - p_mass.unsqueeze(-1), lq_t - lq_t.logsumexp(-1, keepdim=True)
    within = torch.where(tail, p_cond.exp() * (p_cond - q_cond), torch.zeros_like(lp)).sum(-1)
    expected_gap = (p_mass.exp() * within).mean().item()
    assert kl_live - kl_cache == pytest.approx(expected_gap, rel=2e-2, abs=2e-5)


def test_short_runs_with_cache_and_live_end_with_matching_metrics(tmp_path, moe_cache):
    model, root = moe_cache
    logs = {}
    for name, base in (("cache", CacheBase()), ("live", LiveBase(want_router=True))):
        tr = _trainer(model, root / "k512", base, tmp_path / name, max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=4)
        tr.train()
        logs[name] = [r for r in tr.state.log_history if "loss" in r]
    for a, b in zip(logs["cache"], logs["live"]):
        for key in ("task_loss", "KL_mean", "dH_mean", "cal_gap_mean", "router_jaccard", "router_divergence"):
            assert a[key] == pytest.approx(b[key], rel=2e-2, abs=2e-4), key
    assert logs["cache"][-1]["KL_mean"] > 1e-3  # the adapter really moved
    assert logs["cache"][-1]["base_mode"] == "cache" and logs["live"][-1]["base_mode"] == "live"


def test_periodic_queries_the_base_every_n_steps(tmp_path, moe_cache):
    model, root = moe_cache
    calls = []

    class Spy(LiveBase):
        def __call__(self, model, batch, step):
            calls.append(step)
            return super().__call__(model, batch, step)

    tr = _trainer(model, root / "k512", PeriodicBase(Spy(want_router=True), every=3), tmp_path / "p", max_steps=7, per_device_train_batch_size=2, logging_steps=1)
    tr.train()
    assert calls == [0, 3, 6]
    logged = {r["step"]: r for r in tr.state.log_history if "loss" in r}
    assert "KL_mean" in logged[1] and "KL_mean" not in logged[2]  # step 2 ran on steps without a base
    # The masks that read the base are undefined without one, not 0 (which would dilute their means).
    assert "positions_penalized_KL" in logged[1] and "positions_penalized_KL" not in logged[2] and "positions_penalized_H" not in logged[2]
    assert "positions_penalized_cal" in logged[2]  # the calibration mask needs no base


def test_periodic_evaluation_queries_the_base_on_every_batch(tmp_path, moe_cache):
    model, root = moe_cache
    periodic = _trainer(model, root / "k512", PeriodicBase(LiveBase(want_router=True), every=10), tmp_path / "p", per_device_eval_batch_size=4)
    live = _trainer(model, root / "k512", LiveBase(want_router=True), tmp_path / "l", per_device_eval_batch_size=4)
    eval_set = open_cache(str(root / "k512"))
    for tr in (periodic, live):
        tr.state.global_step = 3  # not a multiple of 10: a training step here would have no base
    got, want = periodic.evaluate(eval_set), live.evaluate(eval_set)
    for key in ("eval_loss", "eval_KL_mean", "eval_dH_mean", "eval_positions_penalized_KL", "eval_router_jaccard", "eval_router_divergence"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


def test_eval_loss_and_metrics_are_per_position_means_whatever_the_eval_batch_size(tmp_path, moe_cache):
    """Trainer's own eval_loss is a mean of batch means, so it moved with the eval batch size; the
    geometry trainer reports the loss per labelled position, as every other eval metric."""
    from geocache.signals import labelled_positions

    model, root = moe_cache
    eval_set = open_cache(str(root / "k512"))
    results = {}
    for bs in (4, 3):  # batches that cut the rows differently (and a short last batch)
        tr = _trainer(model, root / "k512", CacheBase(), tmp_path / f"b{bs}", per_device_eval_batch_size=bs)
        results[bs] = tr.evaluate(eval_set)
    for key in ("eval_loss", "eval_task_loss", "eval_KL_mean", "eval_dH_mean", "eval_cal_gap_mean", "eval_router_jaccard"):
        assert results[3][key] == pytest.approx(results[4][key], rel=1e-5, abs=1e-7), key
    # The reference: every penalty weighed in, per position, summed over the whole set by hand.
    tr = _trainer(model, root / "k512", CacheBase(), tmp_path / "ref")
    total = positions = 0
    with torch.no_grad():
        for i in range(len(eval_set)):
            batch = collate_cache_rows([eval_set[i]])
            n = labelled_positions(batch["labels"])[0].numel()
            tr.model.eval()
            total += tr.compute_loss(tr.model, batch).item() * n
            positions += n
    assert results[4]["eval_loss"] == pytest.approx(total / positions, rel=1e-5)


def test_logged_metrics_do_not_depend_on_gradient_accumulation(tmp_path, moe_cache):
    """One step of 4 sequences, as one batch or as 4 accumulated micro-batches: the same loss and the
    same per-position metrics (num_items_in_batch counts all 4 micro-batches' positions)."""
    model, root = moe_cache
    logs = {}
    for bs, ga in ((4, 1), (1, 4)):
        tr = _trainer(model, root / "k64", CacheBase(), tmp_path / f"{bs}x{ga}", max_steps=2, logging_steps=1, learning_rate=1e-2,
                      per_device_train_batch_size=bs, gradient_accumulation_steps=ga, train_sampling_strategy="sequential")
        tr.train()
        logs[bs] = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs[4]) == len(logs[1]) == 2
    for a, b in zip(logs[4], logs[1]):
        for key in ("loss", "task_loss", "kl_penalty", "cal_penalty", "entropy_penalty", "KL_mean", "cal_gap_mean", "router_divergence"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_adding_the_adapter_prints_no_warning_about_a_name_only_peft_uses(tiny_model_dir):
    """peft 0.21 reads ``model.is_gradient_checkpointing``, deprecated in transformers 5: every
    train printed a FutureWarning naming something the user never wrote."""
    import warnings

    from peft import LoraConfig, get_peft_model

    def deprecations(wrap):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")))
        return [w for w in seen if "is_gradient_checkpointing" in str(w.message)]

    filters = list(warnings.filters)
    assert deprecations(lambda m: get_peft_model(m, LoraConfig(target_modules=["q_proj"], use_dora=True)))  # the premise
    assert deprecations(lambda m: add_dora_adapter(m, r=2)) == []
    assert warnings.filters == filters  # silenced around the wrap only


def test_default_targets_avoid_fused_experts_and_routers(tiny_model_dir):
    for model_type in MOE_MODEL_TYPES:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(model_type))
        if model_type == "deepseek_v3":
            with pytest.warns(UserWarning, match="peft remaps their names onto fused experts"):
                targets = default_target_modules(model)
            assert not any(t.endswith(("gate_proj", "up_proj", "down_proj")) for t in targets)
        else:
            targets = default_target_modules(model)
        assert targets and not any("experts." in t and "shared" not in t for t in targets)
        assert not any(t.endswith(("mlp.gate", "mlp.router", "lm_head")) for t in targets)
        peft_model = add_dora_adapter(model, r=2, alpha=4)  # DoRA on every default target works
        assert peft_model.peft_config["default"].use_dora
        if model_type == "qwen2_moe":
            assert any("shared_expert." in t for t in targets)
    with pytest.raises(ValueError, match="does not support DoRA"):
        add_dora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral")), adapt_experts=True)


class _Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated kill")


def test_a_killed_run_resumed_from_its_checkpoint_continues_with_the_same_losses(tmp_path, moe_cache):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k512"), max_steps=6, save_steps=3, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, geometry=ALL_ON, lora_r=4, lora_alpha=8)
    full = train(TrainConfig(out=str(tmp_path / "full"), **common))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **common), callbacks=[_Crash(4)])
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    losses = lambda tr: {r["step"]: r["loss"] for r in tr.state.log_history if "loss" in r}  # noqa: E731
    full_l, resumed_l = losses(full), losses(resumed)
    for step in (4, 5, 6):
        assert resumed_l[step] == pytest.approx(full_l[step], rel=1e-5), step
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_a_resume_from_a_checkpoint_whose_optimizer_state_was_deleted_warns(tmp_path, moe_cache, recwarn):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), out=str(tmp_path / "run"), save_steps=2, use_cpu=True, lora_r=2, progress=False)
    train(TrainConfig(max_steps=2, **common))
    train(TrainConfig(max_steps=3, resume=True, **common))  # the whole checkpoint: nothing to say
    assert not [w for w in recwarn if "resumed run" in str(w.message)]
    (tmp_path / "run" / "checkpoint-3" / "optimizer.pt").unlink()  # pruned to save space (the last step is saved too)
    with pytest.warns(UserWarning, match=r"checkpoint-3 has no optimizer state \(optimizer.pt\): Adam's moments restart; the resumed "
                                         r"run will not have the losses of an uninterrupted one"):
        train(TrainConfig(max_steps=4, resume=True, **common))


def test_train_cli_writes_adapter_logs_and_resolved_config(tmp_path, moe_cache):
    from peft import PeftModel

    model, root = moe_cache
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--cache", str(root / "k64"), "--eval-cache", str(root / "k64"), "--out", str(out),
            "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "2", "--per-device-train-batch-size", "4",
            "--lora-r", "4", "--lambda-kl", "0.3", "--use-cpu", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = next(r for r in records if "loss" in r)
    for key in ("task_loss", "KL_mean", "dH_mean", "cal_gap_mean", "positions_penalized_KL", "positions_penalized_cal",
                "positions_penalized_H", "kl_threshold", "dh_threshold", "cal_threshold", "tokens_per_s", "base_mode",
                "router_jaccard", "router_divergence", "router_jaccard_per_layer/0"):
        assert key in train_rec, key
    eval_rec = next(r for r in records if "eval_loss" in r)
    assert {"eval_KL_mean", "eval_dH_mean", "eval_cal_gap_mean", "eval_router_jaccard"} <= set(eval_rec)
    resolved = (out / "geocache_run.yaml").read_text()
    assert "lambda_kl: 0.3" in resolved and "max_steps: 4" in resolved and "progress" not in resolved  # a terminal setting, not recorded
    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_magnitude_vector" in n for n, _ in tuned.named_parameters())  # DoRA, loaded back


def test_compile_loss_from_the_cli_trains_to_the_eager_losses(tmp_path, moe_cache):
    """--compile-loss (on the CPU through Inductor's C++ backend; on CUDA it is the default)
    reaches the loss, is recorded, and three steps give the eager loss's values."""
    model, root = moe_cache
    losses = {}
    for flag in ("--compile-loss", "--no-compile-loss"):
        out = tmp_path / flag
        args = ["train", "--model", str(model), "--cache", str(root / "k64"), "--out", str(out), "--max-steps", "3", "--logging-steps", "1",
                "--per-device-train-batch-size", "4", "--lora-r", "2", "--learning-rate", "0.01", "--kl-threshold", "0", "--final-kl-threshold",
                "0", "--use-cpu", "--no-progress", flag]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert f"compile_loss: {str(flag == '--compile-loss').lower()}" in (out / "geocache_run.yaml").read_text()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [(r["loss"], r["KL_mean"]) for r in records if "loss" in r]
    compiled, eager = losses["--compile-loss"], losses["--no-compile-loss"]
    assert len(compiled) == 3 and compiled[-1][1] > compiled[0][1] > 0  # the adapter moved away from the base
    assert [x for pair in compiled for x in pair] == pytest.approx([x for pair in eager for x in pair], rel=1e-4, abs=1e-8)


def test_an_eval_cache_without_an_eval_schedule_is_evaluated_once_at_the_end(tmp_path, moe_cache):
    model, root = moe_cache
    train(TrainConfig(model=str(model), cache=str(root / "k64"), eval_cache=str(root / "k64"), out=str(tmp_path / "run"), max_steps=3,
                      per_device_train_batch_size=4, logging_steps=1, use_cpu=True, lora_r=2, progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_KL_mean" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval_KL_mean"] > 0  # (it was opened, checked and never used)


def test_load_best_model_at_end_saves_the_best_checkpoints_adapter_and_says_so(tmp_path, moe_cache):
    model, root = moe_cache
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--cache", str(root / "k64"), "--eval-cache", str(root / "k64"), "--out", str(out),
            "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2", "--per-device-train-batch-size", "4", "--learning-rate", "0.01",
            "--lora-r", "4", "--use-cpu", "--no-progress", "--training-args", "load_best_model_at_end=true",
            "--training-args", "metric_for_best_model=eval_KL_mean", "--training-args", "greater_is_better=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    evals = {r["step"]: r["eval_KL_mean"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_KL_mean" in r}
    best = min(evals, key=evals.get)  # the drift from the base grows with the steps: step 2's
    assert best == 2 and evals[2] < evals[4]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    at_best = load_file(out / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert f"the adapter saved is the best checkpoint's, checkpoint-{best} (eval_KL_mean {evals[best]:.6g})" in result.output


def test_bad_inputs_are_refused_in_one_sentence(tmp_path, moe_cache, tiny_model_dir, tokenizer_dir, sft_data):
    model, root = moe_cache
    base = dict(cache=str(root / "k64"), max_steps=2, use_cpu=True, lora_r=2, lora_alpha=4)
    other = build_tiny_model(tmp_path / "other", "qwen3_moe", tokenizer_dir=tokenizer_dir, seed=3)
    with pytest.raises(CacheError, match="this model's weights differ"):
        train(TrainConfig(model=str(other), out=str(tmp_path / "a"), **base))
    with pytest.raises(CacheError, match="is not a geocache cache"):
        train(TrainConfig(model=str(model), out=str(tmp_path / "b"), **{**base, "cache": str(tmp_path)}))
    # Another base mode's options would do nothing: refused, before any work.
    for extra, message in ((dict(base="live", base_model=str(model)), r"base_model is for a separate base model \(base copy, or periodic "
                            r"with periodic_inner=copy\); with base='live' it would do nothing"),
                           (dict(base="periodic", offload_base=True), "offload_base is for a separate base model .* with base='periodic'"),
                           (dict(periodic_every=3), "periodic_every is for base periodic; with base='cache' it would do nothing"),
                           (dict(base="copy", periodic_inner="copy"), "periodic_inner is for base periodic; with base='copy'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(model=str(model), out=str(tmp_path / "b"), **{**base, **extra})
    TrainConfig(model=str(model), out=str(tmp_path / "b"), **{**base, "base": "periodic", "periodic_inner": "copy", "base_model": str(model),
                                                               "offload_base": True, "periodic_every": 3})  # all of them its own
    # ... found before the model loads (a large base takes minutes): here no model exists at all.
    with pytest.raises(CacheError, match="is not a geocache cache"):
        train(TrainConfig(model=str(tmp_path / "no-model"), out=str(tmp_path / "b"), **{**base, "cache": str(tmp_path)}))
    with pytest.raises(CacheError, match="is not a geocache cache"):
        train(TrainConfig(model=str(tmp_path / "no-model"), out=str(tmp_path / "b"), **{**base, "eval_cache": str(tmp_path)}))
    dense = tiny_model_dir("llama")
    dense_cache = tmp_path / "dense-cache"
    precompute(PrecomputeConfig(model=str(dense), data=[str(sft_data)], out=str(dense_cache), k=8, progress=False))
    with pytest.raises(ValueError, match="is dense"):
        train(TrainConfig(model=str(dense), out=str(tmp_path / "c"), layer_weights=[1.0, 1.0], **{**base, "cache": str(dense_cache)}))
    # a wrong number of layer weights: refused at setup, not inside the first step after the run's record was written
    with pytest.raises(ValueError, match="layer_weights has 2 entries but the model has 3 MoE layers"):
        train(TrainConfig(model=str(model), out=str(tmp_path / "e"), layer_weights=[1.0, 1.0], **base))
    assert not (tmp_path / "e").exists()
    # explicit targets that peft turns into fused-expert parameters: one sentence, not peft's
    with pytest.raises(ValueError, match=r"^peft cannot put DoRA on target_modules=\['gate_up_proj'\] of this qwen3_moe model \([^\n]*\); the default"):
        train(TrainConfig(model=str(model), out=str(tmp_path / "e"), target_modules=["gate_up_proj"], **base))
    train(TrainConfig(model=str(model), out=str(tmp_path / "d"), **base))
    with pytest.raises(ValueError, match="holds another run; pass --resume"):
        train(TrainConfig(model=str(model), out=str(tmp_path / "d"), **base))
    with pytest.raises(ValueError, match="eval_steps was given but no eval_cache"):
        TrainConfig(model="m", cache="c", out="o", eval_steps=3)


def test_the_python_api_checks_its_caches_against_the_base_like_the_cli(tmp_path, moe_cache, tokenizer_dir):
    """GeometryTrainer, given a cache, refuses one built for another model (the CLI did, the API
    trained on it); a model already wrapped in an adapter has its base's fingerprint."""
    from peft import LoraConfig, get_peft_model

    model, root = moe_cache
    other = build_tiny_model(tmp_path / "other", "qwen3_moe", tokenizer_dir=tokenizer_dir, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, remove_unused_columns=False)
    cache = open_cache(str(root / "k64"))
    with pytest.raises(CacheError, match=r"was built for base model .*, and this model's weights differ from it"):
        GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(other), r=2), args=args, train_dataset=cache)
    with pytest.raises(CacheError, match="weights differ"):  # the eval cache too
        GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(other), r=2), args=args,
                        train_dataset=open_cache(str(root / "k64")), eval_dataset={"held": cache})
    for wrapped in (add_dora_adapter(AutoModelForCausalLM.from_pretrained(model), r=2),
                    get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))):
        cache.check_compatible(wrapped)  # the adapter is left out of the fingerprint
        GeometryTrainer(model=wrapped, args=args, train_dataset=cache, eval_dataset=cache)


@pytest.mark.parametrize("adapter_name", ["default", "mlp", "0", "weight"])
def test_the_fingerprint_leaves_out_adapters_whatever_their_name(moe_cache, adapter_name):
    from peft import LoraConfig, get_peft_model

    from geocache.models import model_fingerprint

    model, _ = moe_cache
    want = model_fingerprint(AutoModelForCausalLM.from_pretrained(model))
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                                                      modules_to_save=["lm_head"]), adapter_name=adapter_name)
    assert model_fingerprint(wrapped) == want


def test_a_copy_base_is_checked_against_the_cache_not_the_starting_model(tmp_path, moe_cache, tokenizer_dir, sft_data):
    """--base copy is for starting weights that differ from the base: the cache is the base's
    (--base-model), so it is checked against that one; the model being tuned must share its tokens."""
    model, root = moe_cache
    start = build_tiny_model(tmp_path / "start", "qwen3_moe", tokenizer_dir=tokenizer_dir, seed=3)  # another start, same tokenizer
    common = dict(cache=str(root / "k64"), max_steps=2, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    trained = train(TrainConfig(model=str(start), base="copy", base_model=str(model), out=str(tmp_path / "a"), **common))
    assert trained.state.global_step == 2
    with pytest.raises(CacheError, match="weights differ"):  # the cache is not the start's either way
        train(TrainConfig(model=str(model), base="copy", base_model=str(start), out=str(tmp_path / "b"), **common))
    assert not (tmp_path / "b").exists()  # refused before the run directory was written
    from geocache.testing import build_tokenizer

    build_tokenizer(tmp_path / "tok400", vocab_size=400)
    small = build_tiny_model(tmp_path / "small", "qwen3_moe", tokenizer_dir=tmp_path / "tok400")
    with pytest.raises(CacheError, match="config differs"):  # a base of another vocabulary: one sentence, not an IndexError
        train(TrainConfig(model=str(model), base="periodic", periodic_inner="copy", base_model=str(small), out=str(tmp_path / "c"), **common))


def test_yaml_numbers_in_exponent_form_or_quoted_are_numbers_and_text_is_refused(tmp_path, moe_cache):
    """PyYAML reads ``1e-4`` (no dot) as a string: it reached the optimizer as text (a traceback) and
    the refused run's record was left behind, so the corrected command needed --overwrite."""
    model, root = moe_cache
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model}\ncache: {root / 'k64'}\nlearning_rate: 1e-4\nmax_steps: '2'\nlora_r: 2\nuse_cpu: true\n"
                   "geometry:\n  lambda_kl: 5e-2\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "a"), "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "a" / "geocache_run.yaml").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["max_steps"] == 2 and saved["geometry"]["lambda_kl"] == 0.05
    for bad, message in (("max_steps: 2.5", "max_steps=2.5 must be an integer"), ("max_steps: two", "max_steps='two' must be an integer")):
        cfg.write_text(re.sub(r"max_steps: .*", bad, cfg.read_text()))
        result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--no-progress"])
        assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output
        assert not (tmp_path / "b").exists()
    assert TrainConfig(model="m", cache="c", out="o", max_steps=2.0, revision="12e4567").max_steps == 2  # a whole float is an int
    from geocache.config import read_yaml

    # a git revision that looks like a number in exponent form stays the text it is
    assert read_yaml("revision: 12e4567\nlearning_rate: 1e-4\n") == {"revision": "12e4567", "learning_rate": "1e-4"}


def test_the_cli_reports_a_nan_stop_in_one_sentence(monkeypatch, tmp_path):
    import geocache.train

    def nan_run(cfg, **_):
        raise FloatingPointError(f"the loss is nan at step 2; training stopped, and the last good checkpoint in {cfg.out} is kept")

    monkeypatch.setattr(geocache.train, "train", nan_run)
    result = CliRunner().invoke(main, ["train", "--model", "m", "--cache", "c", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.startswith("error: the loss is nan at step 2") and "Traceback" not in result.output


def test_every_model_goes_to_the_trainers_device(monkeypatch, tmp_path, moe_cache):
    """The tuned model and a copy base load on ``TrainingArguments.device`` (the local rank's GPU under
    torchrun, the CPU with --use-cpu), an offloaded copy on the CPU, never on whatever GPU is first."""
    import geocache.train

    model, root = moe_cache
    devices, real = [], geocache.train.load_model_and_tokenizer

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(geocache.train, "load_model_and_tokenizer", spy)
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=1, use_cpu=True, lora_r=2, lora_alpha=4, progress=False, base="copy")
    trainer = train(TrainConfig(out=str(tmp_path / "a"), **common))
    assert devices == [trainer.args.device, trainer.args.device] and devices[0] == torch.device("cpu")
    assert next(trainer.base_source.base_model.parameters()).device == trainer.args.device
    devices.clear()
    train(TrainConfig(out=str(tmp_path / "b"), offload_base=True, **common))
    assert devices[1] == "cpu"


class _Poison(TrainerCallback):
    """Makes a trainable weight NaN right after the optimizer step ``at`` (before that step's save)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def _all_finite(checkpoint):
    weights = load_file(checkpoint / "adapter_model.safetensors")
    return weights and all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, moe_cache):
    model, root = moe_cache
    out = tmp_path / "r"
    # Weights poisoned after step 3 (no save there): step 4's loss is NaN, checkpoint-2 is the good one.
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 4 \(after 3 completed steps\); training stopped, "
                                                 r"and the last good checkpoint is .*checkpoint-2$"):
        train(TrainConfig(model=str(model), cache=str(root / "k64"), out=str(out), max_steps=5, save_steps=2, use_cpu=True, lora_r=2, lora_alpha=4,
                          progress=False), callbacks=[_Poison(3)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and _all_finite(out / "checkpoint-2")


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path, moe_cache):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), save_steps=2, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    # Poisoned by step 4's update, saved at step 4: refused, and checkpoint-2 named as the good one.
    with pytest.raises(FloatingPointError, match=r"the trainable weight .*lora_A.* is not finite after step 4, so checkpoint-4 was not written; "
                                                 r"training stopped, and the last good checkpoint is .*checkpoint-2$"):
        train(TrainConfig(out=str(tmp_path / "a"), max_steps=5, **common), callbacks=[_Poison(4)])
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2"] and _all_finite(tmp_path / "a" / "checkpoint-2")
    # Poisoned before the first save: nothing on disk to go back to, and the message says so.
    with pytest.raises(FloatingPointError, match=r"so checkpoint-2 was not written; training stopped, and there is no checkpoint in .* yet"):
        train(TrainConfig(out=str(tmp_path / "b"), max_steps=3, **common), callbacks=[_Poison(2)])
    assert not list((tmp_path / "b").glob("checkpoint-*")) and not (tmp_path / "b" / "adapter").exists()


def test_two_processes_over_gloo_train_like_one_with_the_same_global_batch(tmp_path, moe_cache, sft_data):
    model, root = moe_cache
    # 5 eval rows for a global eval batch of 4: accelerate repeats 3 rows to even out the last batch
    # across the 2 processes; the eval metrics leave them out, as gather_for_metrics does.
    precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(tmp_path / "eval5"), k=512, m=4, progress=False,
                                data_config=DataConfig(max_length=64, max_sequences=5)))
    common = ["--model", str(model), "--cache", str(root / "k512"), "--max-steps", "3", "--logging-steps", "1", "--save-steps", "100",
              "--train-sampling-strategy", "sequential", "--lora-r", "4", "--learning-rate", "0.01",
              "--kl-threshold", "0", "--final-kl-threshold", "0", "--eval-cache", str(tmp_path / "eval5"), "--eval-steps", "3"]
    one = subprocess.run([sys.executable, "-m", "geocache_cli.main", "train", *common, "--use-cpu", "--out", str(tmp_path / "one"), "--per-device-train-batch-size", "4"],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573", "-m", "geocache_cli.main",
                          # without a GPU, no --use-cpu: several processes on a CPU-only machine train data-parallel by themselves
                          "train", *common, *(["--use-cpu"] if torch.cuda.is_available() else []), "--out", str(tmp_path / "two"),
                          "--per-device-train-batch-size", "2"],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "find_unused_parameters=True was specified" not in two.stderr  # no graph walk for unused adapter weights
    # The logged metrics cover both ranks' positions (each rank accumulates its own shard), so they
    # match the single process's, train and eval.
    records = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")}
    train_keys = ("loss", "task_loss", "kl_penalty", "KL_mean", "dH_mean", "cal_gap_mean", "positions_penalized_cal", "router_jaccard")
    train_logs = {run: [r for r in recs if "task_loss" in r] for run, recs in records.items()}
    assert len(train_logs["one"]) == len(train_logs["two"]) == 3
    for a, b in zip(train_logs["one"], train_logs["two"]):
        for key in train_keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    evals = {run: next(r for r in recs if "eval_loss" in r) for run, recs in records.items()}
    for key in ("eval_loss", "eval_task_loss", "eval_KL_mean", "eval_cal_gap_mean", "eval_router_jaccard"):
        assert evals["two"][key] == pytest.approx(evals["one"][key], rel=1e-4, abs=1e-6), key
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(a[n].abs().max() for n in a if "lora_B" in n) > 1e-4  # trained away from the zero init
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_nan_loss_on_one_process_stops_every_process_with_one_sentence(tmp_path, moe_cache):
    model, root = moe_cache
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(f"""
import os, sys
import torch
from geocache.losses import GeometryAwareLoss
from geocache.train import TrainConfig, train

real = GeometryAwareLoss.forward
calls = []
def poisoned(self, *args, **kwargs):  # rank 1's third loss is NaN, rank 0's never
    loss, metrics = real(self, *args, **kwargs)
    calls.append(1)
    return (loss * float("nan"), metrics) if os.environ["RANK"] == "1" and len(calls) == 3 else (loss, metrics)
GeometryAwareLoss.forward = poisoned
try:
    train(TrainConfig(model={str(model)!r}, cache={str(root / "k64")!r}, out={str(tmp_path / "run")!r}, max_steps=5, lora_r=2,
                      per_device_train_batch_size=2, progress=False, save_steps=100))
except FloatingPointError as exc:
    print(f"rank {{os.environ['RANK']}}: {{exc}}", file=sys.stderr)
    sys.exit(2)
""")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577", str(script)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "rank 1: the loss is nan at step 3 (after 2 completed steps)" in done.stderr, done.stderr[-3000:]
    assert "rank 0: the loss is not finite on another process at step 3 (after 2 completed steps)" in done.stderr, done.stderr[-3000:]


def test_copy_base_with_the_same_weights_equals_the_live_base(tmp_path, moe_cache):
    from geocache.base import CopyBase

    model, root = moe_cache
    rows = [open_cache(str(root / "k512"))[i] for i in range(4)]
    l_live, g_live = _loss_and_grads(_trainer(model, root / "k512", LiveBase(want_router=True), tmp_path / "a"), rows)
    copy = CopyBase(AutoModelForCausalLM.from_pretrained(model), want_router=True)
    assert not any(p.requires_grad for p in copy.base_model.parameters())
    l_copy, g_copy = _loss_and_grads(_trainer(model, root / "k512", copy, tmp_path / "b"), rows)
    torch.testing.assert_close(l_copy, l_live)
    for name in g_live:
        torch.testing.assert_close(g_copy[name], g_live[name])


@pytest.mark.filterwarnings("error:`gradient_checkpointing` is deprecated:FutureWarning")  # transformers' new name is used where it exists
def test_gradient_checkpointing_trains_the_adapter_identically(tmp_path, moe_cache):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=3, use_cpu=True, learning_rate=1e-2, lora_r=4, progress=False, logging_steps=1)
    plain = train(TrainConfig(out=str(tmp_path / "a"), **common))
    ckpt = train(TrainConfig(out=str(tmp_path / "b"), gradient_checkpointing=True, **common))
    inner = lambda tr: tr.model.get_base_model()  # noqa: E731
    assert inner(ckpt).is_activation_checkpointing and not inner(plain).is_activation_checkpointing  # it was on, and only there
    losses = lambda tr: [r["loss"] for r in tr.state.log_history if "loss" in r]  # noqa: E731
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert max(a[n].abs().max() for n in a if "lora_B" in n) > 1e-4
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_close_to_float32(tmp_path, moe_cache):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=3, use_cpu=True, learning_rate=1e-2, lora_r=4, progress=False, logging_steps=1)
    fp32 = train(TrainConfig(out=str(tmp_path / "a"), **common))
    bf16 = train(TrainConfig(out=str(tmp_path / "b"), bf16=True, **common))
    losses = lambda tr: [r["loss"] for r in tr.state.log_history if "loss" in r]  # noqa: E731
    assert losses(bf16) == pytest.approx(losses(fp32), rel=1e-2)
    assert bf16.args.bf16 and all(torch.isfinite(torch.tensor(losses(bf16))))


def test_overwrite_replaces_a_geocache_run_but_never_deletes_another_directory(tmp_path, moe_cache, tiny_model_dir):
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=1, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match=r"run directory .*mine' is not empty and holds no geocache run"):
        train(TrainConfig(out=str(mine), overwrite=True, **common))
    assert (mine / "notes.txt").read_text() == "not a run"
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), save_steps=1, **common))
    (run / "left-over.txt").write_text("from the previous run")
    # a replacement refused on the way (here another model's cache) keeps the old run: it was deleted first
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CacheError, match="was built for base model"):
        train(TrainConfig(**{**common, "model": str(tiny_model_dir("qwen3"))}, out=str(run), overwrite=True))
    assert (run / "left-over.txt").exists() and (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    train(TrainConfig(out=str(run), overwrite=True, **common))
    assert not (run / "left-over.txt").exists() and (run / "adapter").is_dir()


def test_fp16_on_a_cpu_run_is_refused_before_the_run_directory_is_touched(tmp_path, moe_cache):
    model, root = moe_cache
    with pytest.raises(ValueError, match=r"--fp16 has no effect on a CPU run .*use --bf16"):  # accelerate trained float32 silently
        train(TrainConfig(model=str(model), cache=str(root / "k64"), out=str(tmp_path / "r"), max_steps=1, use_cpu=True, fp16=True, progress=False))
    assert not (tmp_path / "r").exists()
    # --bf16, which that message points to, then runs on a machine without an accelerator whether or
    # not --use-cpu is given (transformers refused it: "Your setup doesn't support bf16/gpu").
    if not torch.accelerator.is_available():
        trainer = train(TrainConfig(model=str(model), cache=str(root / "k64"), out=str(tmp_path / "b"), max_steps=1, bf16=True, progress=False))
        assert trainer.args.bf16 and trainer.args.device.type == "cpu"


def test_reentrant_checkpointing_with_a_router_loss_is_refused(tmp_path, moe_cache):
    """Reentrant checkpointing runs the forward without autograd: the router logits the hooks record
    had no graph, and the router term was a constant in the loss (the gradient of λ_router = 0)."""
    model, root = moe_cache
    rows = [open_cache(str(root / "k64"))[i] for i in range(2)]
    trainer = _trainer(model, root / "k64", CacheBase(), tmp_path / "a", activation_checkpointing=True,
                       activation_checkpointing_kwargs={"use_reentrant": True})
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})  # what Trainer.train does
    with pytest.raises(ValueError, match=r"the router loss gets no gradient under reentrant activation checkpointing"):
        _loss_and_grads(trainer, rows)
    # without a router loss nothing needs the graph: it trains
    off = _trainer(model, root / "k64", CacheBase(), tmp_path / "b", geometry=GeometryConfig(**{**ALL_ON.to_dict(), "lambda_router": 0.0}))
    off.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    loss, grads = _loss_and_grads(off, rows)
    assert torch.isfinite(loss) and grads


def test_a_router_loss_needs_router_statistics_in_the_training_and_the_eval_cache(tmp_path, moe_cache, sft_data):
    model, root = moe_cache
    no_router = tmp_path / "no-router"
    precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(no_router), k=64, m=4, router="none", progress=False,
                                data_config=DataConfig(max_length=64)))
    common = dict(model=str(model), max_steps=1, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    with pytest.raises(CacheError, match=r"the cache .*no-router' holds no router statistics"):
        train(TrainConfig(cache=str(no_router), out=str(tmp_path / "a"), **common))
    with pytest.raises(CacheError, match=r"the eval cache .*no-router' holds no router statistics"):
        train(TrainConfig(cache=str(root / "k64"), eval_cache=str(no_router), eval_steps=1, out=str(tmp_path / "b"), **common))
    # Without a router loss the statistics are not needed.
    train(TrainConfig(cache=str(root / "k64"), eval_cache=str(no_router), eval_steps=1, out=str(tmp_path / "c"), geometry={"lambda_router": 0.0},
                      **common))


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory, tiny_model_dir, sft_data):
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("dense") / "cache"
    precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(out), k=8, progress=False, data_config=DataConfig(max_length=64)))
    return model, out


def test_a_dense_model_refuses_a_router_loss_it_was_asked_for_and_skips_the_default(tmp_path, dense_cache):
    model, cache = dense_cache
    common = dict(model=str(model), cache=str(cache), max_steps=1, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    refusal = r"lambda_router=0.5 asks for a router loss, but model .* is dense"
    with pytest.raises(ValueError, match=refusal):  # as the CLI and YAML give it
        train(TrainConfig(out=str(tmp_path / "a"), geometry={"lambda_router": 0.5}, **common))
    with pytest.raises(ValueError, match=refusal):  # from Python
        train(TrainConfig(out=str(tmp_path / "b"), geometry=GeometryConfig(lambda_router=0.5), **common))
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--cache", str(cache), "--out", str(tmp_path / "c"), "--max-steps", "1",
                                       "--use-cpu", "--no-progress", "--lambda-router", "0.5"])
    assert result.exit_code == 2 and re.search(refusal, result.output) and "Traceback" not in result.output
    train(TrainConfig(out=str(tmp_path / "d"), **common))  # the default λ_router: skipped without configuration
    train(TrainConfig(out=str(tmp_path / "e"), geometry={"lambda_router": 0.0, "lambda_kl": 0.3}, **common))


def test_resume_refuses_changed_settings_and_allows_a_longer_run(tmp_path, moe_cache):
    model, root = moe_cache
    out = tmp_path / "run"
    common = dict(model=str(model), cache=str(root / "k64"), out=str(out), max_steps=2, save_steps=2, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    train(TrainConfig(**common))
    saved = (out / "geocache_run.yaml").read_text()
    with pytest.raises(ValueError, match=r"--resume would continue run .* with lora_r=4, but it was started with lora_r=2"):
        train(TrainConfig(**{**common, "lora_r": 4, "resume": True}))
    with pytest.raises(ValueError, match=r"with cache '.*k512', which holds other rows than the cache it was started with \('.*k64' then\)"):
        train(TrainConfig(**{**common, "cache": str(root / "k512"), "resume": True}))
    with pytest.raises(ValueError, match=r"with geometry.lambda_kl=0.3, but it was started with geometry.lambda_kl=0.1"):
        train(TrainConfig(**{**common, "geometry": {"lambda_kl": 0.3}, "resume": True}))
    assert (out / "geocache_run.yaml").read_text() == saved
    # Longer, logged more often, the cache written with a trailing slash: the same run.
    resumed = train(TrainConfig(**{**common, "max_steps": 3, "logging_steps": 1, "cache": str(root / "k64") + "/", "resume": True}))
    assert resumed.state.global_step == 3 and "max_steps: 3" in (out / "geocache_run.yaml").read_text()
    # The cache moved elsewhere (to a local disk, say): the same rows, the same run.
    shutil.copytree(root / "k64", tmp_path / "moved")
    resumed = train(TrainConfig(**{**common, "max_steps": 4, "cache": str(tmp_path / "moved"), "resume": True}))
    assert resumed.state.global_step == 4
    # Another precompute at that path (other data, same settings): refused, though the path is the run's.
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"other text {i} " * 5}) for i in range(12)))
    manifest = json.loads((tmp_path / "moved" / "manifest.json").read_text())
    precompute(PrecomputeConfig(model=str(model), data=[str(other)], out=str(tmp_path / "moved"), k=64, m=4, progress=False, overwrite=True,
                                data_config=DataConfig(max_length=64)))
    assert manifest["statistics"] == json.loads((tmp_path / "moved" / "manifest.json").read_text())["statistics"]
    with pytest.raises(ValueError, match=r"with cache '.*moved', which holds other rows than the cache it was started with \('.*moved' then\): "
                                         r"another precompute's data, model or settings"):
        train(TrainConfig(**{**common, "max_steps": 5, "cache": str(tmp_path / "moved"), "resume": True}))


def test_all_linear_targets_the_default_modules_on_dense_and_moe_models(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    for model_type in ("llama", "qwen3_moe"):
        adapted = []
        for targets in (None, ["all-linear"], "all-linear"):
            peft_model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir(model_type)), r=2, alpha=4, target_modules=targets)
            adapted.append({n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)})
        assert adapted[0] and adapted[1] == adapted[0] and adapted[2] == adapted[0], model_type
    with pytest.raises(ValueError, match=r"mixes 'all-linear' with module names"):
        add_dora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), target_modules=["all-linear", "q_proj"])


def test_the_router_loss_weight_is_the_schedulers_and_the_gate_doubles_it(tmp_path, moe_cache):
    from geocache.gate import double_lambdas

    model, root = moe_cache
    rows = [open_cache(str(root / "k512"))[i] for i in range(4)]
    router_only = GeometryConfig(lambda_kl=0.0, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.5)
    tr = _trainer(model, root / "k512", CacheBase(), tmp_path / "a", router_only)
    loss_half, _ = _loss_and_grads(tr, rows)
    divergence = tr._flush("train")["router_divergence"]
    assert divergence > 1e-6
    tr.geometry_scheduler.lambda_router = 1.0  # the config still says 0.5
    loss_one, _ = _loss_and_grads(tr, rows)
    assert (loss_one - loss_half).item() == pytest.approx(0.5 * divergence, rel=1e-3)
    lambdas = double_lambdas(tr)  # the V2 gate's action
    assert tr.geometry_scheduler.lambda_router == 2.0 and lambdas["lambda_router"] == 1.0
    loss_two, _ = _loss_and_grads(tr, rows)
    assert (loss_two - loss_half).item() == pytest.approx(1.5 * divergence, rel=1e-3)


def test_a_run_shorter_than_one_logging_window_still_logs_its_metrics(tmp_path, moe_cache):
    model, root = moe_cache
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--cache", str(root / "k64"), "--out", str(out), "--max-steps", "1",
                                       "--lora-r", "2", "--use-cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert "train_loss" in last and {"task_loss", "KL_mean", "router_divergence", "tokens_per_s"} <= set(last)
    shown = re.search(r"last task loss (\S+)$", result.output.strip()).group(1)
    assert float(shown) == pytest.approx(last["task_loss"], abs=1e-4)


def test_tokens_per_s_counts_neither_setup_nor_evaluation(tmp_path, moe_cache, monkeypatch):
    import types

    import geocache.trainer

    model, root = moe_cache
    now = [0.0]  # a fake clock: each optimizer step takes 1 s, each eval batch 100 s, the setup 1000 s
    monkeypatch.setattr(geocache.trainer, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    class Step(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            now[0] += 1.0

    class SlowEval(CacheBase):
        def __call__(self, model, batch, step):
            now[0] += 0.0 if model.training else 100.0
            return super().__call__(model, batch, step)

    data = open_cache(str(root / "k64"))
    tr = _trainer(model, root / "k64", SlowEval(), tmp_path / "t", eval_dataset=data, max_steps=2, logging_steps=2, eval_strategy="steps", eval_steps=1,
                  per_device_train_batch_size=2, train_sampling_strategy="sequential")
    tr.add_callback(Step())
    now[0] += 1000.0
    tr.train()
    tokens = int(collate_cache_rows([data[i] for i in range(4)])["attention_mask"].sum())
    logged = next(r for r in tr.state.log_history if "loss" in r)
    assert logged["tokens_per_s"] == pytest.approx(tokens / 2.0)  # the two steps' tokens over their 2 s


def test_a_dense_run_resumes_from_its_own_saved_config(tmp_path, dense_cache):
    """The saved geocache_run.yaml holds every geometry field, the default λ_router among them:
    fed back with --config it must resume the run, not be read as asking a dense model for a router loss."""
    model, cache = dense_cache
    out = tmp_path / "run"
    args = ["--model", str(model), "--cache", str(cache), "--use-cpu", "--no-progress", "--lora-r", "2", "--lora-alpha", "4", "--save-steps", "1"]
    first = CliRunner().invoke(main, ["train", *args, "--out", str(out), "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["train", "--config", str(out / "geocache_run.yaml"), "--resume", "--max-steps", "2"])
    assert again.exit_code == 0, again.output
    assert "trained 2 steps" in again.output


def test_an_eval_cache_of_another_slice_is_accepted_and_other_token_shapes_are_named(tmp_path, tiny_model_dir, sft_data):
    model = tiny_model_dir("llama")
    caches = {}
    for name, split, max_length in (("train", "train[:16]", 64), ("eval", "train[16:]", 64), ("short", "train[16:]", 32)):
        caches[name] = tmp_path / name
        precompute(PrecomputeConfig(model=str(model), data=[str(sft_data)], out=str(caches[name]), k=8, progress=False,
                                    data_config=DataConfig(max_length=max_length, split=split)))
    common = dict(model=str(model), cache=str(caches["train"]), max_steps=1, eval_steps=1, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    trainer = train(TrainConfig(out=str(tmp_path / "a"), eval_cache=str(caches["eval"]), **common))
    assert any("eval_task_loss" in r for r in trainer.state.log_history)
    with pytest.raises(CacheError, match=r"preprocessed differently from the training cache \(preprocessing.max_length: 64 != 32, training != eval\)"):
        train(TrainConfig(out=str(tmp_path / "b"), eval_cache=str(caches["short"]), **common))


def test_hf_default_arguments_keep_the_caches_columns(tmp_path, moe_cache, monkeypatch):
    """TrainingArguments' default remove_unused_columns=True would drop the base statistics (the
    model's forward names none of them): the trainer turns it off, saying so, and trains."""
    model, root = moe_cache
    torch.manual_seed(0)
    targs = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True, max_steps=1, per_device_train_batch_size=2)
    assert targs.remove_unused_columns
    with pytest.warns(UserWarning, match="remove_unused_columns=True would drop the cache's base statistics"):
        trainer = GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(model), r=2, alpha=4), args=targs,
                                  train_dataset=open_cache(str(root / "k64")))
    assert trainer.train().global_step == 1
    monkeypatch.chdir(tmp_path)  # HF's default arguments name an output directory under the working one
    with pytest.warns(UserWarning, match="remove_unused_columns=True"):  # no args at all: HF's defaults, the same
        GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(model), r=2, alpha=4), train_dataset=open_cache(str(root / "k64")))


def test_target_modules_written_as_one_string_are_one_module(tmp_path, moe_cache):
    model, root = moe_cache
    assert TrainConfig(model="m", cache="c", out="o", target_modules="q_proj").target_modules == ["q_proj"]
    assert TrainConfig(model="m", cache="c", out="o", target_modules="all-linear").target_modules == ["all-linear"]
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text("target_modules: q_proj\nmax_steps: 1\nsave_steps: 1\nlora_r: 2\nlora_alpha: 4\n")
    cli = ["train", "--config", str(tmp_path / "cfg.yaml"), "--model", str(model), "--cache", str(root / "k64"), "--out", str(out), "--use-cpu", "--no-progress"]
    result = CliRunner().invoke(main, cli)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [*cli, "--resume", "--target-modules", "q_proj", "--max-steps", "2"])  # the CLI gives a list
    assert result.exit_code == 0, result.output


def test_metrics_take_the_prefix_evaluation_loop_is_given_positionally(tmp_path, moe_cache):
    model, root = moe_cache
    trainer = _trainer(model, root / "k64", CacheBase(), tmp_path / "e", per_device_eval_batch_size=4)
    loader = trainer.get_eval_dataloader(open_cache(str(root / "k64")))
    metrics = trainer.evaluation_loop(loader, "check", None, None, "heldout").metrics
    assert "heldout_KL_mean" in metrics and not any(k.startswith("None_") for k in metrics)


def test_a_resumed_run_logs_each_step_once(tmp_path, moe_cache):
    """Steps logged after the last checkpoint by a run that then stopped are logged again by the
    resumed run: metrics.jsonl keeps one record per step, as log_history does."""
    import shutil

    model, root = moe_cache
    out = tmp_path / "run"
    common = dict(model=str(model), cache=str(root / "k64"), out=str(out), max_steps=4, save_steps=2, logging_steps=1, use_cpu=True,
                  lora_r=2, lora_alpha=4, progress=False)
    train(TrainConfig(**common))
    shutil.rmtree(out / "checkpoint-4")  # stopped after logging step 4, before its checkpoint,
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # and killed while writing a record
    train(TrainConfig(**common, resume=True))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def test_eval_on_start_evaluates_the_start_of_a_run_not_of_its_resume(tmp_path, moe_cache):
    model, root = moe_cache
    out = tmp_path / "run"
    common = dict(model=str(model), cache=str(root / "k64"), eval_cache=str(root / "k64"), out=str(out), save_steps=2, eval_steps=2,
                  eval_on_start=True, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    train(TrainConfig(**common, max_steps=2))
    train(TrainConfig(**common, max_steps=4, resume=True))
    evals = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in json.loads(line)]
    assert evals == [0, 2, 4]  # the resume did not evaluate checkpoint-2 again


def test_unknown_train_options_are_named_and_geometry_keys_are_pointed_under_geometry():
    with pytest.raises(ValueError, match=r"^eval_on_start was given but no eval_cache to evaluate on$"):  # was refused after the record
        TrainConfig(model="m", cache="c", out="o", eval_on_start=True)
    with pytest.raises(ValueError, match=r"^unknown train option\(s\) \['lamda'\]$"):
        TrainConfig.from_dict({"model": "m", "cache": "c", "out": "o", "lamda": 1})
    with pytest.raises(ValueError, match=r"unknown train option\(s\) \['lambda_kl'\] \(lambda_kl: geometry options, which a config file "
                                         r"holds under `geometry:`\)"):
        TrainConfig.from_dict({"model": "m", "cache": "c", "out": "o", "lambda_kl": 0.2})
    with pytest.raises(ValueError, match=r"^unknown train option\(s\) \['lr', 'seeed'\] \(did you mean: lr → learning_rate\?, seeed → seed\?\)$"):
        TrainConfig.from_dict({"model": "m", "cache": "c", "out": "o", "lr": 1e-4, "seeed": 1})
    from geocache.precompute import config_from_options

    # the command line's --top-k/--tail-samples are keys of a config file too (README: "keys are its options' names")
    assert (config_from_options({"model": "m", "data": "d", "out": "o", "top_k": 8, "tail_samples": 2}).k,
            config_from_options({"model": "m", "data": "d", "out": "o", "top_k": 8, "tail_samples": 2}).m) == (8, 2)
    with pytest.raises(ValueError, match=r"^top_k and k name the same setting: give one$"):
        config_from_options({"model": "m", "data": "d", "out": "o", "top_k": 8, "k": 4})
    with pytest.raises(ValueError, match=r"^unknown precompute option\(s\) \['tail_sample'\] \(did you mean: tail_sample → "):
        config_from_options({"model": "m", "data": "d", "out": "o", "tail_sample": 8})


def test_label_smoothing_is_refused_in_one_sentence(tmp_path, moe_cache):
    model, root = moe_cache
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1: the geometry-aware loss does not smooth labels"):
        GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(model), r=2), args=args,
                        train_dataset=open_cache(str(root / "k64")))


def test_resume_refuses_another_number_of_processes(tmp_path, moe_cache, monkeypatch):
    """The global batch is per-device batch × accumulation × processes: a resume keeps all three."""
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), out=str(tmp_path / "run"), max_steps=1, save_steps=1, use_cpu=True,
                  lora_r=2, lora_alpha=4, progress=False)
    train(TrainConfig(**common))
    assert "num_processes: 1" in (tmp_path / "run" / "geocache_run.yaml").read_text()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="with num_processes=2, but it was started with num_processes=1"):
        train(TrainConfig(**common, resume=True))


def test_the_saved_run_config_reloads_without_side_effects_and_a_failed_start_can_be_rerun(tmp_path, moe_cache, monkeypatch):
    """geocache_run.yaml held overwrite/resume: reloaded as --config it deleted the run or failed;
    a run refused inside its first step left a record that only --overwrite could replace; a
    resume of a finished run trained one step past max_steps (transformers does)."""
    model, root = moe_cache
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    common = ["--model", str(model), "--cache", str(root / "k64"), "--max-steps", "2", "--save-steps", "2", "--lora-r", "2",
              "--use-cpu", "--no-progress"]
    first = CliRunner().invoke(main, ["train", "--out", "run/", "--overwrite", *common])
    assert first.exit_code == 0, first.output
    assert f"adapter saved in run{os.sep}adapter;" in first.output  # not run//adapter
    record = yaml.safe_load((run / "geocache_run.yaml").read_text())
    assert not {"overwrite", "resume", "progress"} & set(record) and os.path.isabs(record["cache"])
    assert record["out"] == str(run)  # every local path absolute: reloaded from elsewhere, the record names this run
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    again = CliRunner().invoke(main, ["train", "--config", str(run / "geocache_run.yaml"), "--out", "run"])
    assert again.exit_code == 2 and "holds another run; pass --resume" in again.output  # not silently wiped
    resumed = CliRunner().invoke(main, ["train", "--config", str(run / "geocache_run.yaml"), "--out", "run", "--resume"])
    assert resumed.exit_code == 2 and "already trained 2 steps, and max_steps=2; raise --max-steps" in resumed.output, resumed.output
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter and not (run / "checkpoint-3").exists()
    # a run stopped inside its first step (here: a NaN loss) leaves a record and no checkpoint: a plain rerun starts it again
    import geocache.trainer as gt

    real = gt.GeometryAwareLoss.forward
    monkeypatch.setattr(gt.GeometryAwareLoss, "forward", lambda self, *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(real(self, *a, **k)))
    failed = CliRunner().invoke(main, ["train", "--out", "fresh", *common])
    assert failed.exit_code == 2 and (tmp_path / "fresh" / "geocache_run.yaml").exists() and not list((tmp_path / "fresh").glob("checkpoint-*"))
    monkeypatch.setattr(gt.GeometryAwareLoss, "forward", real)
    no_ckpt = CliRunner().invoke(main, ["train", "--out", "fresh", "--resume", *common])
    assert no_ckpt.exit_code == 2 and "stopped before its first; start it again without --resume" in no_ckpt.output
    rerun = CliRunner().invoke(main, ["train", "--out", "fresh", *common])
    assert rerun.exit_code == 0, rerun.output  # was "holds another run; pass --resume ... or --overwrite"
    assert (tmp_path / "fresh" / "adapter").is_dir()


def test_a_moe_model_given_a_dense_models_cache_is_one_sentence(tmp_path, moe_cache, tiny_model_dir, sft_data):
    model, _ = moe_cache
    dense_cache = tmp_path / "dense"
    precompute(PrecomputeConfig(model=str(tiny_model_dir("llama")), data=[str(sft_data)], out=str(dense_cache), k=8, progress=False))
    with pytest.raises(CacheError, match="was built for base model"):  # was AttributeError: 'NoneType' object has no attribute 'get'
        train(TrainConfig(model=str(model), cache=str(dense_cache), out=str(tmp_path / "r"), max_steps=1, use_cpu=True, progress=False))


def test_hub_kernels_are_off_when_the_hub_is_offline(tmp_path, moe_cache):
    """transformers 5.25 loads models with use_kernels=True and re-kernelizes on model.train(): on
    CUDA that fetches kernels from the hub, and offline every training run ended at its first step
    (seen on an H200). Models geocache loads, a user's model given to GeometryTrainer and a copy
    base are kept to torch's own layers when the hub is offline."""
    from geocache.base import CopyBase
    from geocache.models import load_model_and_tokenizer

    model, root = moe_cache
    assert AutoModelForCausalLM.from_pretrained(model).use_kernels  # transformers' default: the premise
    assert not load_model_and_tokenizer(str(model))[0].use_kernels
    trainer = _trainer(model, root / "k64", CopyBase(AutoModelForCausalLM.from_pretrained(model)), tmp_path / "a")
    assert not trainer.model.get_base_model().use_kernels and not trainer.base_source.base_model.use_kernels


def test_a_failed_start_holding_other_files_or_a_live_run_is_never_deleted(tmp_path, moe_cache):
    from geocache.train import RUNNING, _process_start

    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=1, use_cpu=True, lora_r=2, progress=False)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "geocache_run.yaml").write_text(yaml.safe_dump({"model": str(model)}))  # a record copied as a template
    (exp / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="holds another run"):
        train(TrainConfig(out=str(exp), **common))
    assert (exp / "notes.md").read_text() == "mine"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "geocache_run.yaml").write_text(yaml.safe_dump({"model": str(model)}))
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / "geocache_run.yaml").write_text(yaml.safe_dump({"model": str(model)}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here = socket.gethostname()
    try:
        locks = [f"{sleeper.pid}\n",  # a bare pid: a lock written before the host was recorded
                 json.dumps({"pid": sleeper.pid, "host": here, "start": _process_start(sleeper.pid)})]  # a run still training
        for lock in locks:
            (busy / RUNNING).write_text(lock)
            with pytest.raises(ValueError, match=r"is in use: a training process \(pid \d+\) is still running in it"):
                train(TrainConfig(out=str(busy), **common))
        # On another host (a shared filesystem) the process cannot be checked: refused, saying how to release it.
        (busy / RUNNING).write_text(json.dumps({"pid": sleeper.pid, "host": here + "-other", "start": "1"}))
        with pytest.raises(ValueError, match=rf"a training process \(pid \d+ on host {here}-other; if it is gone, delete .*busy/"
                                             r"\.geocache-running\) is still running in it"):
            train(TrainConfig(out=str(busy), **common))
        assert (busy / "geocache_run.yaml").exists()
        # The pid of a live process that started at another time than the run: the pid was reused
        # (a restarted container numbers its processes anew), the run is gone.
        (reused / RUNNING).write_text(json.dumps({"pid": sleeper.pid, "host": here, "start": "1"}))
        train(TrainConfig(out=str(reused), **common))
        assert (reused / "adapter").is_dir() and not (reused / RUNNING).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    (busy / RUNNING).write_text(locks[1])
    train(TrainConfig(out=str(busy), **common))  # its process gone: a failed start, started again
    assert (busy / "adapter").is_dir() and not (busy / RUNNING).exists()


def test_the_run_lock_names_this_process_its_host_and_start_time(tmp_path):
    from geocache.train import RUNNING, _lock_record, _process_start, _running_process

    record = json.loads(_lock_record())
    assert record == {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
    assert record["start"] == Path(f"/proc/{os.getpid()}/stat").read_text().split()[21]  # starttime (this command name has no spaces)
    assert _process_start(2**22 + 7) is None  # no such process
    (tmp_path / RUNNING).write_text(_lock_record())
    assert _running_process(tmp_path) is None  # this process's own lock


def test_an_offloaded_copy_base_trains_on_a_packed_cache(tmp_path, tiny_model_dir, sft_data):
    """The packed-attention probe read the embedding's device, which accelerate's offload leaves on
    meta: 'Cannot copy out of meta tensor' (the same command trained before the probe)."""
    from geocache.base import CopyBase

    model_dir = tiny_model_dir("llama")
    path = tmp_path / "packed"
    precompute(PrecomputeConfig(model=str(model_dir), data=[str(sft_data)], out=str(path), k=8, m=2, progress=False,
                                data_config=DataConfig(max_length=64, packing=True)))
    copy = CopyBase(AutoModelForCausalLM.from_pretrained(model_dir), offload=True, device=torch.device("cpu"))
    trainer = _trainer(model_dir, path, copy, tmp_path / "run", geometry=GeometryConfig(lambda_router=0.0))
    loss, _ = _loss_and_grads(trainer, [open_cache(str(path))[i] for i in range(2)])
    assert torch.isfinite(loss)


def test_a_model_whose_forward_takes_no_position_ids_is_refused_a_packed_cache_in_one_sentence():
    from geocache.base import check_packed_attention

    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, use_cache=False):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"takes no position_ids .* precompute the cache without --packing"):
        check_packed_attention(NoPositions())


def test_other_training_arguments_pass_through_to_transformers_and_geocaches_own_are_refused(tmp_path, moe_cache):
    """What TRL's CLI takes for any TrainingArguments field (weight decay, clipping, the optimizer,
    report_to, dataloader workers): ``training_args``, from YAML and ``--training-args KEY=VALUE``."""
    model, root = moe_cache
    common = dict(model=str(model), cache=str(root / "k64"), max_steps=2, save_steps=2, use_cpu=True, lora_r=2, lora_alpha=4, progress=False)
    extra = {"weight_decay": 0.5, "max_grad_norm": 0.25, "adam_beta2": 0.9, "optim": "adamw_torch", "dataloader_num_workers": 1,
             "per_device_eval_batch_size": 3}  # (one that geocache gives a default: was "multiple values for keyword argument")
    trainer = train(TrainConfig(**common, out=str(tmp_path / "api"), training_args=extra))
    assert trainer.state.global_step == 2  # batches through a worker process, too
    assert {k: getattr(trainer.args, k) for k in extra} == {**extra, "optim": "adamw_torch"}
    assert trainer.args.learning_rate == TrainConfig(**common, out="o").learning_rate  # geocache's own options still set the rest
    assert trainer.args.dataloader_pin_memory is False  # a CPU run: pinning only warned, once per worker
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__ == "AdamW"
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.9) and {g["weight_decay"] for g in trainer.optimizer.param_groups} >= {0.5}
    # The CLI: a config file's mapping, overridden key by key on the command line; recorded, and a resume must keep it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"training_args": {"weight_decay": 0.1, "adam_beta2": 0.95}}))
    out = tmp_path / "cli"
    args = ["train", "--config", str(cfg), "--model", str(model), "--cache", str(root / "k64"), "--out", str(out), "--max-steps", "2",
            "--save-steps", "2", "--lora-r", "2", "--use-cpu", "--no-progress", "--training-args", "weight_decay=0.3", "--training-args", "report_to=none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "geocache_run.yaml").read_text())["training_args"] == {"weight_decay": 0.3, "adam_beta2": 0.95, "report_to": "none"}
    assert not (out / "runs").exists()  # report_to=none: no TensorBoard log, whatever is installed
    again = CliRunner().invoke(main, [*args[:-4], "--training-args", "weight_decay=0.2", "--resume", "--max-steps", "3"])
    assert again.exit_code == 2 and "with training_args={'adam_beta2': 0.95, 'weight_decay': 0.2}, but it was started with" in again.output, again.output
    # Refused in one sentence, before the run directory is touched.
    for pairs, message in [
        (["learning_rate=1"], "training_args 'learning_rate' is set by geocache: set it with geocache's own --learning-rate"),
        (["remove_unused_columns=true"], "training_args 'remove_unused_columns' is set by geocache: geocache's trainer needs its own value"),
        (["weight_decy=0.1"], "unknown TrainingArguments option(s) ['weight_decy'] (did you mean: weight_decy → weight_decay?)"),
        (["optim=bogus"], "transformers refuses these TrainingArguments (bogus is not a valid OptimizerNames"),
        (["weight_decay"], "--training-args 'weight_decay' must be KEY=VALUE"),
        (["report_to=[tensorboard, not_a_logger]"], "report_to=['not_a_logger'"),
    ]:
        bad = CliRunner().invoke(main, ["train", "--model", str(model), "--cache", str(root / "k64"), "--out", str(tmp_path / "bad"),
                                        "--use-cpu", *[x for p in pairs for x in ("--training-args", p)]])
        assert bad.exit_code == 2 and message in bad.output and bad.output.count("\n") == 1, bad.output
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=r"unknown train option\(s\) \['weight_decay'\] \(weight_decay: transformers TrainingArguments, "
                                         r"which a config file holds under `training_args:`\)"):
        TrainConfig.from_dict({"model": "m", "cache": "c", "out": "o", "weight_decay": 0.1})


def test_a_model_with_its_own_code_runs_only_with_trust_remote_code(tmp_path, tokenizer_dir, sft_data):
    """A checkpoint whose config names modeling files beside it (``auto_map``), as hub models with
    custom code do: precompute could be told --trust-remote-code, train could not, so such a base
    was cached and never trained on."""
    model = build_tiny_model(tmp_path / "m", "llama", tokenizer_dir=tokenizer_dir)
    (model / "configuration_custom.py").write_text("from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (model / "modeling_custom.py").write_text("from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
                                              "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "c"
    pre = ["precompute", "--model", str(model), "--data", str(sft_data), "--out", str(cache), "--top-k", "8", "--max-length", "32",
           "--max-sequences", "8", "--no-progress"]
    refused = CliRunner().invoke(main, pre)
    assert refused.exit_code == 2 and refused.output.strip().endswith("comes with its own modeling code, which runs only with "
                                                                      "--trust-remote-code (read that code first)"), refused.output
    assert CliRunner().invoke(main, [*pre, "--trust-remote-code"]).exit_code == 0
    run = ["train", "--model", str(model), "--cache", str(cache), "--max-steps", "1", "--lora-r", "2", "--use-cpu", "--no-progress"]
    refused = CliRunner().invoke(main, [*run, "--out", str(tmp_path / "r1")])
    assert refused.exit_code == 2 and "runs only with --trust-remote-code" in refused.output and not (tmp_path / "r1").exists()
    result = CliRunner().invoke(main, [*run, "--out", str(tmp_path / "r2"), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "r2" / "geocache_run.yaml").read_text())["trust_remote_code"] is True
    # copy mode loads its base the same way
    copy = CliRunner().invoke(main, [*run, "--out", str(tmp_path / "r3"), "--trust-remote-code", "--base", "copy"])
    assert copy.exit_code == 0, copy.output


def test_other_lora_options_reach_peft_and_the_saved_adapter(tmp_path, moe_cache):
    """PEFT options beyond r/alpha/dropout/targets (rsLoRA, which layers, extra modules to save):
    ``lora_args``, from YAML and ``--lora-args KEY=VALUE``; DoRA itself and geocache's own options are refused there."""
    from peft import PeftModel

    model, root = moe_cache
    out = tmp_path / "run"
    run = ["train", "--model", str(model), "--cache", str(root / "k64"), "--max-steps", "1", "--lora-r", "4", "--lora-alpha", "8",
           "--use-cpu", "--no-progress"]
    result = CliRunner().invoke(main, [*run, "--out", str(out), "--lora-args", "use_rslora=true",
                                       "--lora-args", "exclude_modules=[model.layers.1.self_attn.q_proj]"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["use_dora"] is True
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / "adapter")
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in tuned.named_parameters() if "lora_A" in n}
    assert "model.layers.1.self_attn.q_proj" not in adapted and "model.layers.0.self_attn.q_proj" in adapted
    scaling = next(m.scaling["default"] for m in tuned.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling)
    assert scaling == pytest.approx(8 / 4 ** 0.5)  # rsLoRA's alpha/√r, not alpha/r
    assert yaml.safe_load((out / "geocache_run.yaml").read_text())["lora_args"] == {
        "use_rslora": True, "exclude_modules": ["model.layers.1.self_attn.q_proj"]}
    for pair, message in [("use_dora=false", "lora_args 'use_dora' is set by geocache: geocache trains a DoRA adapter of a causal LM"),
                          ("r=3", "lora_args 'r' is set by geocache: set it with geocache's own --lora-r"),
                          ("use_rslor=true", "unknown LoraConfig option(s) ['use_rslor'] (did you mean: use_rslor → use_rslora?)"),
                          # peft ignores it for targets named in full (seen: every layer adapted, its config saying layer 0)
                          ("layers_to_transform=[0]", "lora_args 'layers_to_transform' would be ignored: peft applies it only to targets"),
                          ("init_lora_weights=bogus", "with lora_args={'init_lora_weights': 'bogus'} (Unknown initialization"),
                          # the adapter-off model would not be the base (trained on in live mode; the cache refused as another model's)
                          ("init_lora_weights=olora", "init_lora_weights='olora' rewrites the base's own weights")]:
        bad = CliRunner().invoke(main, [*run, "--out", str(tmp_path / "bad"), "--lora-args", pair])
        assert bad.exit_code == 2 and message in bad.output and bad.output.count("\n") == 1, bad.output
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=r"\(use_rslora: peft LoraConfig options, which a config file holds under `lora_args:`\)"):
        TrainConfig.from_dict({"model": "m", "cache": "c", "out": "o", "use_rslora": True})


def test_the_trainer_takes_a_peft_config_as_trls_trainers_do(tmp_path, moe_cache):
    from peft import LoraConfig, PeftModel

    model_dir, root = moe_cache
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=4)
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GeometryTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, peft_config=config, train_dataset=open_cache(str(root / "k64")),
                              base=LiveBase(want_router=True), geometry_config=ALL_ON)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].use_dora
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert any("KL_mean" in r for r in trainer.state.log_history)
    by_name = GeometryTrainer(str(model_dir), args, peft_config=config, train_dataset=open_cache(str(root / "k64")))  # a path, as TRL takes it
    assert isinstance(by_name.model, PeftModel) and by_name.processing_class is not None
    assert by_name.processing_class.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    with pytest.raises(ValueError, match="already carries a PEFT adapter: give peft_config or an adapted model, not both"):
        GeometryTrainer(model=trainer.model, args=args, peft_config=config, train_dataset=open_cache(str(root / "k64")))
    # an initialisation that moves part of the base into the adapter leaves no base to measure against
    olora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="olora", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"init_lora_weights='olora' rewrites the base's own weights"):
        GeometryTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, peft_config=olora,
                        train_dataset=open_cache(str(root / "k64")), base=LiveBase(want_router=True))
    from peft import get_peft_model

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), olora)  # wrapped by the user: known by its config
    with pytest.raises(ValueError, match=r"adapter 'default' was initialised with init_lora_weights='olora', which rewrites"):
        GeometryTrainer(model=adapted, args=args, train_dataset=open_cache(str(root / "k64")), base=LiveBase(want_router=True))


def test_a_peft_config_on_a_moe_model_is_seeded_placed_and_its_data_checked(tmp_path, moe_cache):
    """TRL users' habits on a fused-experts MoE model: "all-linear" with DoRA and no targets at all
    (peft: "lora.ParamWrapper does not work with use_dora=True" / "No target_modules passed"), the
    adapter's initialisation seeded by TrainingArguments.seed, and a tokenised dataset."""
    import datasets
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    model_dir, root = moe_cache
    cache = open_cache(str(root / "k64"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=4, seed=7)
    expected = set(default_target_modules(AutoModelForCausalLM.from_pretrained(model_dir)))
    adapters = []
    for targets in ("all-linear", None, "all-linear"):
        config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=targets, task_type="CAUSAL_LM", init_lora_weights="gaussian")
        trainer = GeometryTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, peft_config=config, train_dataset=cache)
        assert set(trainer.model.peft_config["default"].target_modules) == expected, targets
        assert {n.removeprefix("base_model.model.") for n, m in trainer.model.named_modules() if isinstance(m, LoraLayer)} == expected
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n})
        torch.manual_seed(len(adapters))  # whatever ran before: the seed in TrainingArguments decides
    assert all(torch.equal(adapters[0][n], adapters[2][n]) for n in adapters[0])  # the same script, the same adapter
    # A dataset without base statistics: one sentence when the trainer is built, not KeyError 'lse' at step 1.
    tokenised = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})
    with pytest.raises(ValueError, match=r"train_dataset rows hold \['input_ids', 'labels'\] but no base statistics: GeometryTrainer trains "
                                         r"on a geocache cache, geocache.open_cache\(path\)"):
        GeometryTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args, peft_config=config, train_dataset=tokenised)
    with pytest.raises(ValueError, match=r"eval_dataset rows hold .* but no base statistics"):
        GeometryTrainer(model=add_dora_adapter(AutoModelForCausalLM.from_pretrained(model_dir), r=2), args=args, train_dataset=cache,
                        eval_dataset={"held-out": tokenised})


def test_a_checkpoint_write_that_fails_is_one_sentence_and_resume_skips_what_it_left(tmp_path, moe_cache, monkeypatch):
    """torch.save reports a full disk as a RuntimeError (a traceback), and the half-written
    checkpoint (no trainer_state.json) was what --resume picked: "No such file ... trainer_state.json"."""
    from peft import PeftModel  # noqa: F401  (the adapters are compared as files)

    model, root = moe_cache
    run = ["train", "--model", str(model), "--cache", str(root / "k64"), "--max-steps", "4", "--save-steps", "2", "--lora-r", "2",
           "--per-device-train-batch-size", "2", "--lora-dropout", "0.3", "--use-cpu", "--no-progress"]
    assert CliRunner().invoke(main, [*run, "--out", str(tmp_path / "whole")]).exit_code == 0
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    failed = CliRunner().invoke(main, [*run, "--out", str(out)])
    assert failed.exit_code == 2 and failed.output.count("\n") == 1, failed.output
    assert "writing checkpoint-4 failed (" in failed.output and "is the disk full?): training stopped, and the last good checkpoint is" in failed.output
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()  # what the failed write left
    monkeypatch.setattr(torch, "save", real_save)
    with pytest.warns(UserWarning, match=r"checkpoint-4 in .* was not written to its end \(a failed write\): removed; resuming from checkpoint-2"):
        resumed = CliRunner().invoke(main, [*run, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if it had never failed (dropout's RNG included)
    # a checkpoint that lacks its RNG state (the process that writes it died) is not resumed from either
    (out / "checkpoint-4" / "rng_state.pth").unlink()
    from geocache.trainer import last_complete_checkpoint

    assert last_complete_checkpoint(out, 1) == (str(out / "checkpoint-2"), [str(out / "checkpoint-4")])
    assert last_complete_checkpoint(out, 2)[0] is None  # two processes write rng_state_0/_1.pth: none here is whole for them


def test_a_process_whose_peer_stopped_says_so_in_one_sentence(tmp_path, moe_cache):
    """An error on one process left the other in a collective, which printed gloo's "Connection
    closed by peer" as a long traceback beside the one sentence that said why."""
    model, root = moe_cache
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(f"""
import os, sys
from geocache.losses import GeometryAwareLoss
from geocache_cli.main import main

real = GeometryAwareLoss.forward
calls = []
def failing(self, *args, **kwargs):  # rank 1 refuses its second batch, rank 0 never
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise ValueError("a bad batch on rank 1")
    return real(self, *args, **kwargs)
GeometryAwareLoss.forward = failing
sys.argv = ["geocache", "train", "--model", {str(model)!r}, "--cache", {str(root / "k64")!r}, "--out", {str(tmp_path / "run")!r},
            "--max-steps", "4", "--lora-r", "2", "--per-device-train-batch-size", "2", "--save-steps", "100", "--no-progress"]
main()
""")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581", str(script)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "error: a bad batch on rank 1" in done.stderr, done.stderr[-3000:]
    assert "error: process 0 stops because another process of this run stopped (its error says why)" in done.stderr, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]
