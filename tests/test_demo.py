"""The embedded default: a locally pretrained reference model and the whole pipeline on it."""

import json

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geocache import demo
from geocache.demo import ROWS, run_demo
from geocache.testing import tiny_reference_recipe
from geocache.reference import RECIPES, ReferenceRecipe, _split_documents, build_reference_model, corpus, examples, recipe_for

def _ink(text: str) -> str:
    return re.sub(r"\s", "", text)


TINY = tiny_reference_recipe()


def test_reference_model_is_trained_cached_and_reused(tiny_reference):
    recipe, ref_dir, path = tiny_reference
    assert recipe == TINY
    report = json.loads((path / "reference.json").read_text())
    assert set(report["domains"]) == {"code", "prose"}
    for domain in report["domains"].values():
        assert domain["entropy_mean"] < domain["log_vocab"]  # trained: less flat than uniform
        assert domain["heldout_loss"] < domain["log_vocab"]
        assert sum(domain["entropy_histogram"]["counts"]) == domain["positions"] > 0
    # The pretraining's loss curve is logged as JSON Lines: every 10 steps, the first and the last.
    log = [json.loads(line) for line in (path / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == sorted({1, *range(10, TINY.steps + 1, 10), TINY.steps})
    assert log[-1]["loss"] < log[0]["loss"] < 1.5 * report["log_vocab"]
    assert log[0]["learning_rate"] < log[1]["learning_rate"] > log[-1]["learning_rate"]  # warmup, then cosine decay
    # The tune and held-out splits are written as JSONL examples of documents kept out of pretraining.
    splits = _split_documents(TINY)
    for name in ("code", "prose"):
        for split in ("tune", "heldout"):
            rows = [json.loads(line) for line in (path / f"{split}-{name}.jsonl").read_text().splitlines()]
            assert rows and all(0 < len(r["text"]) <= TINY.example_chars for r in rows)
            assert _ink("".join(r["text"] for r in rows)) == _ink("".join(splits[name][split]))
        assert report["documents"][name] == {k: len(v) for k, v in splits[name].items()}
    calls = []
    assert build_reference_model(TINY, cache_dir=ref_dir, log=calls.append) == path and calls == []  # reused, not retrained
    other = ReferenceRecipe(**{**TINY.__dict__, "seed": 1})
    assert other.key() != TINY.key()


def test_demo_runs_end_to_end_and_reports_before_and_after(tmp_path, monkeypatch, tiny_reference):
    monkeypatch.setenv("GEOCACHE_HOME", str(tiny_reference[1]))  # the session's tiny reference model, reused
    lines = []
    results = run_demo(tmp_path / "demo", steps=4, recipe=TINY, log=lines.append)
    assert set(results) == {"plain DoRA SFT", "geometry-aware"}
    for run in results.values():
        # The adapter moved. Before it did, the cached KL is zero up to the cache's float16 log-probs
        # (the sampled tail term reads them at the samples: ~1e-5 here).
        assert abs(run["before"]["eval_KL_mean"]) < 1e-4 and run["after"]["eval_KL_mean"] > 10 * abs(run["before"]["eval_KL_mean"])
        assert run["before"]["eval_router_jaccard"] > 0.99
    table = lines[-1]
    assert all(title in table for title, _ in ROWS)
    assert (tmp_path / "demo" / "demo.md").read_text().strip() == table
    # A demo's directory from before the marker existed is still known by its results and caches.
    (tmp_path / "demo" / demo.DEMO_MARKER).unlink()
    assert demo._earlier_demo(tmp_path / "demo")


def test_reference_splits_are_disjoint_deterministic_and_cover_the_capped_corpus():
    a, b = _split_documents(TINY), _split_documents(TINY)
    assert a == b
    for name, splits in a.items():
        docs = [d for s in splits.values() for d in s]
        assert len(set(map(id, docs))) == len(docs) and all(splits[s] for s in ("pretrain", "tune", "heldout"))
        assert set(docs) <= set(corpus(name))
        assert sum(map(len, docs)) >= TINY.max_chars_per_domain or len(docs) == len(corpus(name))
    other = _split_documents(ReferenceRecipe(**{**TINY.__dict__, "seed": 3}))
    assert other["prose"]["heldout"] != a["prose"]["heldout"]


@pytest.mark.parametrize("recipe", [TINY, RECIPES["moe"]], ids=["tiny", "moe"])
def test_reference_splits_keep_a_files_code_and_docstrings_together(recipe):
    from geocache.reference import _docstrings

    splits = _split_documents(recipe)
    for split in ("tune", "heldout"):
        docstrings = {_docstrings(d) for d in splits["code"][split]} - {""}
        assert docstrings, split  # the check below has something to check
        assert not docstrings & set(splits["prose"]["pretrain"])  # held-out code's docstrings were never pretrained on
        assert docstrings & set(splits["prose"][split])  # ... they are held out with it (where the prose cap reached them)


def test_prose_holds_docstrings_and_help_topics_and_recipes_meet_the_issue():
    from pydoc_data.topics import topics

    prose = corpus("prose")
    assert len(prose) > len(topics) and prose[: len(topics)] == [topics[k] for k in sorted(topics)]
    assert any("Return" in d for d in prose[len(topics):])  # docstrings of the standard library
    for name, recipe in RECIPES.items():
        assert recipe.vocab_size >= 8192 and recipe.domains == ("code", "prose")
    assert RECIPES["moe"].is_moe and RECIPES["moe"].num_experts >= 8 and RECIPES["moe"].num_experts_per_tok == 2
    assert not RECIPES["dense"].is_moe
    assert recipe_for("dense", steps=5).steps == 5 and recipe_for("dense", steps=5).key() != RECIPES["dense"].key()
    with pytest.raises(ValueError, match="must be one of"):
        recipe_for("sparse")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n\t"), max_size=400), st.integers(1, 50))
def test_examples_cut_at_lines_within_the_limit_and_lose_nothing_but_blank_pieces(doc, max_chars):
    pieces = examples(doc, max_chars)
    assert all(0 < len(p) <= max_chars and p.strip() for p in pieces)
    assert _ink("".join(pieces)) == _ink(doc)  # only whitespace-only pieces are dropped
    # Pieces end at line ends unless a single line is longer than the limit.
    for p in pieces[:-1]:
        assert p.endswith("\n") or len(p) == max_chars or "\n" not in p


def test_the_demo_builds_the_moe_recipe_cut_to_its_pretrain_steps(monkeypatch, tmp_path):
    """The first run must take minutes: the default model is the MoE recipe at 500 steps, and the
    CLI's --pretrain-steps reaches the recipe (2500: the benchmarks' own model, reused)."""
    import geocache.demo as demo
    from click.testing import CliRunner

    from geocache_cli.main import main

    asked = []

    def stop(recipe, log=print):
        asked.append(recipe)
        raise RuntimeError("stop after choosing the model")

    monkeypatch.setattr(demo, "build_reference_model", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        run_demo(tmp_path / "a")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "b"), "--pretrain-steps", "2500"])
    assert isinstance(result.exception, RuntimeError)
    assert asked[0] == recipe_for("moe", steps=demo.DEMO_PRETRAIN_STEPS) and demo.DEMO_PRETRAIN_STEPS == 500
    assert asked[1] == RECIPES["moe"] and RECIPES["moe"].steps == 2500


def test_the_demo_refuses_a_directory_it_did_not_write(tmp_path):
    """--out DIR: the demo replaced a user's own train.jsonl there without a word."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("my data\n")
    with pytest.raises(ValueError, match="is a non-empty directory the demo did not write"):
        run_demo(mine)
    assert (mine / "train.jsonl").read_text() == "my data\n"
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        run_demo(tmp_path / "new", steps=0)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):  # the reference recipe's, before anything is written
        run_demo(tmp_path / "new", pretrain_steps=0)
    assert not (tmp_path / "new").exists()
    # A demo.json of the user's does not make the directory a demo's (its train.jsonl was replaced).
    (mine / "demo.json").write_text('{"my": "results"}')
    with pytest.raises(ValueError, match="is a non-empty directory the demo did not write"):
        run_demo(mine)
    assert (mine / "train.jsonl").read_text() == "my data\n"
