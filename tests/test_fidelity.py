"""The cache-fidelity benchmark: its comparison against the exact KL, its choice of defaults, and a
smoke run of ``geocache bench fidelity`` on a tiny reference model."""

import json
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from geocache.bench.fidelity import TARGETS, FidelityConfig, choose_defaults, compare, run_fidelity
from geocache.signals import cached_kl, compute_base_stats

TAUS = (0.08, 0.15)


def _logits(P=96, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(P, V, generator=g) * 2.5
    tuned = base + torch.randn(P, V, generator=g) * 0.6
    return base, tuned


def test_compare_is_exact_at_full_vocabulary_and_lower_bounds_below_it():
    base, tuned = _logits()
    V = base.shape[1]
    stats = {k: compute_base_stats(base, k, 4, generator=torch.Generator().manual_seed(1)) for k in (8, V)}
    rows = compare(tuned, base, stats, ms=(0, 2, 4), thresholds=TAUS, relerr_floor=1e-3, chunk=40)
    exact_fwd = kl_divergence(Categorical(logits=base), Categorical(logits=tuned))
    exact_rev = kl_divergence(Categorical(logits=tuned), Categorical(logits=base))
    by = {(r["direction"], r["estimator"], r["k"], r["m"]): r for r in rows}
    # One row per estimator and k; the sampled ones once per m > 0; the coarse reverse once per k.
    assert set(by) == {(d, e, k, m) for k in (8, V) for d, e, m in
                       [("forward", "topk_tail", 0), ("forward", "topk_renorm", 0), ("forward", "topk_sampled", 2),
                        ("forward", "topk_sampled", 4), ("forward", "topk_hybrid", 2), ("forward", "topk_hybrid", 4),
                        ("forward", "topk_cv", 2), ("forward", "topk_cv", 4),
                        ("reverse", "coarse", 0)]}
    for r in rows:
        exact = exact_fwd if r["direction"] == "forward" else exact_rev
        assert r["exact_mean"] == pytest.approx(exact.mean().item(), rel=1e-5)
        if r["k"] == V:  # nothing outside the cached set: every estimator is the exact KL
            assert abs(r["agg_bias"]) < 1e-5 and r["grad_cos"] > 1 - 1e-6 and r["spearman"] > 0.9999
            assert all(r[f"mask_agree@{t}"] == 1.0 for t in TAUS)
            assert abs(r["tail_mass_mean"]) < 1e-6 and abs(r["tail_kl_share"]) < 1e-5
        else:
            q_tail = 1 - torch.softmax(base, -1).topk(8, -1).values.sum(-1)
            assert r["tail_mass_mean"] == pytest.approx(q_tail.mean().item(), rel=1e-5) and 0 < r["tail_kl_share"] < 1
    # topk_cv is read as the loss reads it: at k = V the tuned tail mass 1 − Σ_S q is rounding
    # noise, so every row takes the sampled value; at k = 8 only the rare peaked rows do.
    assert by[("forward", "topk_cv", V, 4)]["fallback_share"] == 1.0 and by[("forward", "topk_cv", 8, 4)]["fallback_share"] < 0.1
    assert all(r["fallback_share"] is None for r in rows if r["estimator"] != "topk_cv")
    for d, e in (("forward", "topk_tail"), ("reverse", "coarse")):  # coarse-graining never adds KL
        assert by[(d, e, 8, 0)]["agg_bias"] < 0
    # Mask agreement and penalty error, by hand from the library's own estimator.
    r = by[("forward", "topk_tail", 8, 0)]
    cached = cached_kl(tuned, stats[8], "topk_tail").double()
    ex = exact_fwd.double()
    for t in TAUS:
        assert r[f"mask_agree@{t}"] == pytest.approx(sum(bool(c > t) == bool(x > t) for c, x in zip(cached, ex)) / len(ex))
        pen_c, pen_e = (cached - t).clamp_min(0).sum(), (ex - t).clamp_min(0).sum()
        assert r[f"penalty_relerr@{t}"] == pytest.approx(((pen_c - pen_e).abs() / pen_e).item(), rel=1e-4)
    # The gradient cosine against autograd through the exact KL, computed apart.
    z = tuned.clone().requires_grad_(True)
    (g_c,) = torch.autograd.grad(cached_kl(z, stats[8], "topk_tail").sum(), z)
    z2 = tuned.clone().requires_grad_(True)
    (g_e,) = torch.autograd.grad(kl_divergence(Categorical(logits=base), Categorical(logits=z2)).sum(), z2)
    assert r["grad_cos"] == pytest.approx(torch.nn.functional.cosine_similarity(g_c.flatten(), g_e.flatten(), dim=0).item(), abs=1e-5)


def _row(est, k, m, bias, agree, cos, nbytes, relerr=0.01):
    return {"direction": "forward", "estimator": est, "k": k, "m": m, "agg_bias": bias, "relerr_p50": relerr, "grad_cos": cos,
            "bytes": {"arrow": nbytes}, **{f"mask_agree@{t}": agree for t in TAUS}}


def test_choose_defaults_takes_the_cheapest_configuration_meeting_every_target_in_its_worst_case():
    rows = [
        _row("topk_tail", 16, 0, -0.004, 0.999, 0.9995, 80.0),
        _row("topk_tail", 16, 0, -0.009, 0.999, 0.9995, 82.0),  # a second domain misses the bias target
        _row("topk_tail", 32, 0, -0.002, 0.999, 0.9999, 150.0),
        _row("topk_sampled", 32, 4, 0.001, 0.999, 0.9999, 170.0),
        _row("topk_renorm", 8, 0, 0.0001, 0.999, 0.9999, 40.0, relerr=0.0),
        _row("topk_renorm", 8, 0, 0.0001, 0.990, 0.9999, 40.0),  # fails mask agreement somewhere
        _row("topk_tail", 256, 0, -0.0001, 1.0, 1.0, 900.0),  # too many bytes
    ]
    d = choose_defaults(rows, TAUS)
    assert (d["estimator"], d["k"], d["m"], d["meets_targets"]) == ("topk_tail", 32, 0, True)
    assert d["candidates_meeting"] == [["topk_tail", 32, 0], ["topk_sampled", 32, 4]]
    assert d["worst_case"]["bytes_per_token"] == 150.0
    none = choose_defaults([_row("topk_tail", 16, 0, -0.02, 0.99, 0.99, 80.0), _row("topk_tail", 32, 0, -0.006, 0.999, 0.9995, 150.0)], TAUS)
    assert none["meets_targets"] is False and none["k"] == 32  # the smallest shortfall
    # Over the bytes budget is never the fallback while something fits in it.
    over = choose_defaults([_row("topk_tail", 16, 0, -0.02, 0.99, 0.99, 80.0), _row("topk_tail", 256, 0, -0.006, 0.999, 0.9995, 900.0)], TAUS)
    assert over["meets_targets"] is False and over["k"] == 16
    assert TARGETS["bytes_per_token"] == 200.0


@pytest.mark.parametrize("name", ["eval_sequences", "max_length", "tune_sequences", "batch_size"])
def test_fidelity_refuses_a_non_positive_size_before_any_work(name):
    with pytest.raises(ValueError, match=rf"--{name.replace('_', '-')}=0 must be >= 1"):
        FidelityConfig(**{name: 0})


def test_bench_fidelity_smoke_on_a_tiny_reference_model(tmp_path, tiny_reference):
    recipe, ref_dir, model_dir = tiny_reference
    vocab = json.loads((model_dir / "reference.json").read_text())["vocab_size"]
    cfg = FidelityConfig(out=str(tmp_path / "results"), work_dir=str(tmp_path / "work"), recipe=recipe, cache_dir=str(ref_dir), steps=(6,),
                         ks=(8, vocab), ms=(0, 2), eval_sequences=4, max_length=64, tune_sequences=32, learning_rate=5e-2, device="cpu")
    result = run_fidelity(cfg, log=lambda *_: None)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"fidelity.{ext}").stat().st_size > 0
    assert json.loads((tmp_path / "results" / "fidelity.json").read_text())["defaults"] == result["defaults"]
    assert max(result["lse_max_abs_diff"].values()) < 1e-4  # the cache's rows line up with the live base
    rows = result["rows"]
    assert {r["domain"] for r in rows} == {"code", "prose"}
    for r in rows:
        assert r["exact_mean"] > 1e-3  # the SFT moved the model
        if r["k"] == vocab:  # exact up to the cache's float16 log-probs
            assert abs(r["agg_bias"]) < 0.02 and r["grad_cos"] > 0.99, r
        elif r["estimator"] in ("topk_tail", "coarse"):
            assert r["agg_bias"] < 0.005, r  # lower bounds (float16 rounding aside)
        for b in ("arrow", "zarr"):
            assert 0 < r["bytes"][b]
    small = next(r for r in rows if r["k"] == 8 and r["estimator"] == "topk_tail")
    full = next(r for r in rows if r["k"] == vocab and r["estimator"] == "topk_tail")
    assert small["bytes"]["arrow"] < full["bytes"]["arrow"]
    sampled = {r["m"]: r for r in rows if r["k"] == 8 and r["estimator"] == "topk_sampled" and r["domain"] == "code"}
    assert set(sampled) == {2} and sampled[2]["bytes"]["arrow"] > small["bytes"]["arrow"]
    md = (tmp_path / "results" / "fidelity.md").read_text()
    assert "Chosen by this benchmark" in md and "DistillKit" in md and not math.isnan(result["defaults"]["worst_case"]["grad_cos"])


def test_bench_parity_smoke_trains_both_modes_and_compares_them_exactly(tmp_path, tiny_reference):
    from geocache.bench.parity import ParityConfig, rel_diff, run_parity

    recipe, ref_dir, _ = tiny_reference
    assert rel_diff(1.0, 1.02) == pytest.approx(0.02 / 1.02) and rel_diff(0.0, 0.0) == 0.0 and rel_diff(-1.0, 1.0) == 2.0
    cfg = ParityConfig(out=str(tmp_path / "results"), work_dir=str(tmp_path / "work"), recipe=recipe, cache_dir=str(ref_dir), steps=4,
                       learning_rate=2e-2, max_length=64, tune_sequences=32, eval_sequences=4, logging_steps=2, device="cpu", kl_estimator="topk_tail")
    result = run_parity(cfg, log=lambda *_: None)
    assert result["cache_defaults"]["kl_estimator"] == "topk_tail"
    assert {r["kl_estimator"] for r in result["runs"]["cache"]["log"]} == {"topk_tail"}  # the cache run trained with it
    for ext in ("json", "md", "png"):
        assert (tmp_path / "results" / f"parity.{ext}").stat().st_size > 0
    assert set(result["runs"]) == {"cache", "live"}
    for mode, run in result["runs"].items():
        assert [r["step"] for r in run["log"]] == [2, 4]
        assert {r["base_mode"] for r in run["log"]} == {mode}
        for h in run["heldout"].values():
            assert h["kl_forward"] > 0 and h["positions"] > 0
    for dom in ("code", "prose"):
        for metric, v in result["comparison"][dom].items():
            assert v["rel_diff"] == pytest.approx(rel_diff(v["cache"], v["live"]))
    # Same start, seed and data: the first logged task losses are close (the base term differs only
    # by the estimator).
    c, lv = result["runs"]["cache"]["log"][0]["task_loss"], result["runs"]["live"]["log"][0]["task_loss"]
    assert rel_diff(c, lv) < 0.05


def test_the_penalty_gradient_cosine_is_that_of_the_losss_hinge_computed_by_autograd():
    """penalty_grad_cos@τ: cosine between the gradients of Σ max(KL − τ, 0), cached vs exact, each
    side masked by its own KL, checked against autograd through the hinge itself."""
    base, tuned = _logits(P=64, V=40, seed=3)
    stats = {8: compute_base_stats(base, 8, 4, generator=torch.Generator().manual_seed(2))}
    rows = compare(tuned, base, stats, ms=(4,), thresholds=TAUS, relerr_floor=1e-3, chunk=24)
    z = tuned.clone().requires_grad_(True)
    exact = kl_divergence(Categorical(logits=base), Categorical(logits=z))
    for est in ("topk_tail", "topk_sampled", "topk_renorm"):
        row = next(r for r in rows if r["estimator"] == est and r["direction"] == "forward")
        cached = cached_kl(z, stats[8], est)
        for tau in TAUS:
            (g_c,) = torch.autograd.grad((cached - tau).clamp_min(0).sum(), z, retain_graph=True)
            (g_e,) = torch.autograd.grad((exact - tau).clamp_min(0).sum(), z, retain_graph=True)
            want = torch.nn.functional.cosine_similarity(g_c.flatten(), g_e.flatten(), dim=0).item()
            assert row[f"penalty_grad_cos@{tau}"] == pytest.approx(want, abs=1e-5), (est, tau)
            assert row[f"penalty_grad_cos@{tau}"] != pytest.approx(row["grad_cos"], abs=1e-6)  # not the raw KL's
