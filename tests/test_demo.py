"""The embedded default: a locally pretrained reference model and the whole pipeline on it."""

import json

from geocache.demo import ROWS, run_demo
from geocache.reference import ReferenceRecipe, build_reference_model

TINY = ReferenceRecipe(vocab_size=768, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, moe_intermediate_size=32,
                       intermediate_size=64, steps=30, batch_size=8, seq_len=64, max_chars_per_domain=200_000)


def test_reference_model_is_trained_cached_and_reused(tmp_path):
    path = build_reference_model(TINY, cache_dir=tmp_path, log=lambda *_: None)
    report = json.loads((path / "reference.json").read_text())
    assert set(report["domains"]) == {"code", "prose"}
    for domain in report["domains"].values():
        assert domain["entropy_mean"] < domain["log_vocab"]  # trained: less flat than uniform
        assert domain["heldout_loss"] < domain["log_vocab"]
    calls = []
    assert build_reference_model(TINY, cache_dir=tmp_path, log=calls.append) == path and calls == []  # reused, not retrained
    other = ReferenceRecipe(**{**TINY.__dict__, "seed": 1})
    assert other.key() != TINY.key()


def test_demo_runs_end_to_end_and_reports_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCACHE_HOME", str(tmp_path / "home"))
    lines = []
    results = run_demo(tmp_path / "demo", steps=4, recipe=TINY, log=lines.append)
    assert set(results) == {"plain DoRA SFT", "geometry-aware"}
    for run in results.values():
        assert abs(run["before"]["eval_KL_mean"]) < 1e-6 < run["after"]["eval_KL_mean"]  # the adapter moved
        assert run["before"]["eval_router_jaccard"] > 0.99
    table = lines[-1]
    assert all(title in table for title, _ in ROWS)
    assert (tmp_path / "demo" / "demo.md").read_text().strip() == table
