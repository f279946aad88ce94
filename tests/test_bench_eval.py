"""Exact held-out evaluation (geocache/bench/evaluate.py) and the calibration benchmark's smoke run."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from geocache.bench.evaluate import brier, exact_heldout
from geocache.cache import collate_cache_rows, open_cache
from geocache.data import DataConfig
from geocache.precompute import PrecomputeConfig, precompute
from geocache.losses import router_jaccard
from geocache.signals import labelled_positions, shift_and_select
from geocache.trainer import add_dora_adapter


def test_brier_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 11, generator=g) * 3, torch.randint(0, 11, (7,), generator=g)
    q = torch.softmax(logits, -1)
    loop = [sum((q[i, v].item() - (v == targets[i].item())) ** 2 for v in range(11)) for i in range(7)]
    assert brier(logits, targets).tolist() == pytest.approx(loop, abs=1e-6)


def _hand_ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(-1)
    correct = (pred == targets).double()
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.double().mean().item() * abs(correct[inside].mean().item() - conf[inside].double().mean().item())
    return total


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3"])
def test_exact_heldout_of_an_identity_adapter_equals_its_base_and_a_hand_computed_ece(tmp_path, tiny_model_dir, model_type):
    model_dir = tiny_model_dir(model_type)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3}) + "\n" for i in range(10)))
    precompute(PrecomputeConfig(model=str(model_dir), data=[str(data)], out=str(tmp_path / "c"), k=8, progress=False,
                                data_config=DataConfig(max_length=48)))
    torch.manual_seed(0)
    model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(model_dir), r=4, alpha=8).eval()  # B = 0: the identity
    res = exact_heldout(model, tmp_path / "c", batch_size=3, calibration=True)
    assert res["positions"] == open_cache(str(tmp_path / "c")).manifest.counts["positions"]
    assert abs(res["kl_forward"]) < 1e-6 and abs(res["dH"]) < 1e-5
    assert res["task_loss"] == pytest.approx(res["base_task_loss"], abs=1e-5)
    assert res["ece"] == pytest.approx(res["base_ece"], abs=1e-6) and res["brier"] == pytest.approx(res["base_brier"], abs=1e-6)
    assert ("router_jaccard" in res) == (model_type == "qwen3_moe")
    if model_type == "qwen3_moe":
        assert res["router_jaccard"] == pytest.approx(1.0)
    # ECE by hand from the base's own logits over the same positions.
    cache = open_cache(str(tmp_path / "c"))
    batch = collate_cache_rows([cache[i] for i in range(len(cache))])
    with torch.no_grad(), model.disable_adapter():
        q, targets = shift_and_select(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert res["base_ece"] == pytest.approx(_hand_ece(torch.softmax(q.float(), -1), targets), abs=1e-5)
    assert res["base_task_loss"] == pytest.approx(torch.nn.functional.cross_entropy(q.float(), targets).item(), rel=1e-5)
    if model_type == "qwen3_moe":  # a moved adapter: router Jaccard against transformers' own router logits
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        moved = exact_heldout(model, tmp_path / "c", batch_size=3, calibration=True)
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        with torch.no_grad():
            tuned = model(**inputs).router_logits
            with model.disable_adapter():
                base = model(**inputs).router_logits
        rows, _ = labelled_positions(batch["labels"])
        k = model.config.num_experts_per_tok
        want = torch.stack([router_jaccard(b[rows].topk(k, -1).indices, t[rows].topk(k, -1).indices) for t, b in zip(tuned, base)]).mean()
        assert moved["router_jaccard"] < 0.99 and moved["router_jaccard"] == pytest.approx(want.item(), abs=1e-6)
    # A moved adapter: every mean equals geocache.signals' definitions on the same positions.
    from geocache.signals import geometry_signals

    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.3)
        moved = exact_heldout(model, tmp_path / "c", batch_size=4, calibration=True)
        tuned = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    ref = geometry_signals(tuned, base, batch["labels"])
    for key, sig in (("kl_forward", "kl_forward"), ("kl_reverse", "kl_reverse"), ("dH", "dH"), ("cal_gap", "cal_gap"), ("task_loss", "nll")):
        assert moved[key] == pytest.approx(ref[sig].mean().item(), rel=1e-4, abs=1e-6), key
    assert moved["kl_forward"] > 1e-4


def test_bench_calibration_smoke(tmp_path, tiny_reference):
    from geocache.bench.calibration import CalibrationConfig, razor, run_calibration

    recipe, ref_dir, _ = tiny_reference
    cfg = CalibrationConfig(out=str(tmp_path / "results"), work_dir=str(tmp_path / "work"), recipe=recipe, cache_dir=str(ref_dir),
                            methods=("plain", "kl-1.0", "geometry-poor"), datasets=("instruct",), steps=3, learning_rate=2e-2, max_length=64,
                            tune_sequences=24, eval_sequences=4, device="cpu")
    result = run_calibration(cfg, log=lambda *_: None)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"calibration.{ext}").stat().st_size > 0
    runs = result["runs"]
    instruct = [json.loads(line) for line in (tmp_path / "work" / "instruct-train.jsonl").read_text().splitlines()]
    assert instruct and all(r["prompt"].startswith("Write the docstring") and "def " in r["prompt"] and r["completion"] for r in instruct)
    assert [(r["dataset"], r["method"]) for r in runs] == [("instruct", "plain"), ("instruct", "kl-1.0"), ("instruct", "geometry-poor")]
    for e in ("code", "prose", "instruct"):
        # Same base, same held-out text: the base's numbers do not depend on the run.
        assert len({round(r["eval"][e]["base_ece"], 9) for r in runs}) == 1
        assert len({round(r["eval"][e]["base_task_loss"], 9) for r in runs}) == 1
        for r in runs:
            v = r["eval"][e]
            assert 0 <= v["ece"] <= 1 and 0 <= v["router_jaccard"] <= 1 and v["kl_forward"] > 0 and 0 <= v["brier"] <= 2
    assert result["razor"]["runs"] == 3 and -1 <= result["razor"]["spearman"] <= 1
    assert razor(runs[:2])["spearman"] != razor(runs[:2])["spearman"]  # NaN with fewer than 3 runs
    with pytest.raises(ValueError, match="unknown methods"):
        CalibrationConfig(methods=("plain", "magic"))
