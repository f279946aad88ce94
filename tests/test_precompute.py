"""precompute → cache → reader, checked against a direct forward of the base, plus bad input and faults."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from geocache import GeometryAwareLoss
from geocache.cache import CacheError, CacheWriteError, collate_cache_rows, open_cache
from geocache.cache.inspect import verify
from geocache.data import BadRowError, DataConfig
from geocache.precompute import PrecomputeConfig, precompute
from geocache.signals import labelled_positions
from geocache.testing import MODEL_TYPES, build_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Text, prompt/completion and chat rows with some length spread."""
    import inspect
    import textwrap

    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    chunks = [c for c in inspect.getsource(textwrap).split("\n\n") if c.strip()][:30]
    rows = [{"text": c} for c in chunks]
    rows.insert(3, {"prompt": "Q: what is wrap?", "completion": " A: it wraps text."})
    rows.insert(7, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run(model, data, out, **kw) -> object:
    data_kw = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    cfg = PrecomputeConfig(model=str(model), data=[str(data)], out=str(out), progress=False, data_config=DataConfig(**{"max_length": 48, **data_kw}), **kw)
    return precompute(cfg)


def rows_of(path):
    cache = open_cache(str(path))
    return [cache[i] for i in range(len(cache))]


def assert_same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert torch.equal(ra[key], rb[key]), key


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cached_statistics_equal_a_direct_forward(tmp_path, tiny_model_dir, data_file, model_type):
    model_dir = tiny_model_dir(model_type)
    manifest = run(model_dir, data_file, tmp_path / "c", k=16, m=2, shard_sequences=7, batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache = open_cache(str(tmp_path / "c"))
    assert len(cache) == manifest.counts["sequences"] > 20
    moe = manifest.moe
    assert (moe is None) == (model_type in ("llama", "qwen3"))
    for i in (0, 3, 7, len(cache) - 1):
        row = cache[i]
        with torch.no_grad():
            out = model(row["input_ids"].unsqueeze(0), output_router_logits=moe is not None)
        rows, _ = labelled_positions(row["labels"].unsqueeze(0))
        logits = out.logits[0][rows].double()
        torch.testing.assert_close(row["lse"].double(), logits.logsumexp(-1), rtol=0, atol=1e-4)
        torch.testing.assert_close(row["entropy"].double(), torch.distributions.Categorical(logits=logits).entropy(), rtol=0, atol=1e-4)
        lp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(lp.gather(1, row["topk_ids"]), lp.topk(16).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(row["topk_logprobs"].double(), lp.topk(16).values, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(row["tail_logprobs"].double(), lp.gather(1, row["tail_ids"]), rtol=2e-3, atol=2e-3)
        if moe is not None:
            router = torch.stack(out.router_logits)[:, rows].transpose(0, 1)
            assert row["router_logits"].shape == (len(rows), len(moe["layers"]), 8)
            torch.testing.assert_close(row["router_logits"].float(), router, rtol=2e-3, atol=2e-3)


def test_loss_from_the_cache_at_k_equal_vocab_equals_the_loss_from_live_logits(tmp_path, tiny_model_dir, data_file):
    model_dir = tiny_model_dir("qwen3")
    run(model_dir, data_file, tmp_path / "c", k=512, backend="arrow")
    cache = open_cache(str(tmp_path / "c"))
    batch = collate_cache_rows([cache[i] for i in (0, 1, 2, 3)])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        base_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tuned = (base_logits + 0.3 * torch.randn_like(base_logits)).requires_grad_()
    loss_fn = GeometryAwareLoss(kl_threshold=0.0, final_kl_threshold=0.0)
    cached, m_cached = loss_fn(tuned, batch["base"], batch["labels"])
    live, m_live = loss_fn(tuned, base_logits, batch["labels"])
    # float16 log-probs in the cache are the only difference
    torch.testing.assert_close(cached, live, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m_cached["KL_mean"], m_live["KL_mean"], rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(m_cached["dH_mean"], m_live["dH_mean"], rtol=1e-4, atol=1e-5)


def test_both_backends_store_the_same_rows_and_a_dataloader_shuffles_them(tmp_path, tiny_model_dir, data_file):
    model_dir = tiny_model_dir("olmoe")
    run(model_dir, data_file, tmp_path / "z", k=8, m=2, backend="zarr", shard_sequences=5)
    run(model_dir, data_file, tmp_path / "a", k=8, m=2, backend="arrow", shard_sequences=5)
    assert_same_rows(rows_of(tmp_path / "z"), rows_of(tmp_path / "a"))
    cache = open_cache(str(tmp_path / "z"))
    loader = torch.utils.data.DataLoader(cache, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_cache_rows)
    seen = 0
    for batch in loader:
        assert batch["base"].num_positions == labelled_positions(batch["labels"])[0].numel()
        assert batch["router_logits"].shape[0] == batch["base"].num_positions
        seen += batch["input_ids"].shape[0]
    assert seen == len(cache)


def _batch_by_hand(rows: list[dict], pad: int = 0) -> dict:
    """The batch ``collate_cache_rows`` must build, written the slow, obvious way."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), pad), "labels": torch.full((len(rows), width), -100),
           "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
    if "position_ids" in rows[0]:
        out["position_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        for t in range(len(r["input_ids"])):
            out["input_ids"][b, t], out["labels"][b, t], out["attention_mask"][b, t] = r["input_ids"][t], r["labels"][t], 1
            if "position_ids" in out:
                out["position_ids"][b, t] = r["position_ids"][t]
    for key in rows[0]:
        if key not in out:
            out[key] = torch.cat([r[key] for r in rows])
    return out


@pytest.mark.parametrize("packing,workers,backend", [(False, 0, "arrow"), (True, 0, "arrow"), (False, 2, "arrow"), (False, 0, "zarr")])
def test_the_batched_fetch_a_dataloader_uses_equals_row_by_row_reads(tmp_path, tiny_model_dir, data_file, packing, workers, backend):
    """DataLoader calls ``__getitems__`` (rows located, sliced into the batch by the collate); the
    batch must be the one built from ``cache[i]`` rows, value for value, with the statistics' ids
    as int32, in worker processes too, where the batch is views of one shared-memory buffer."""
    run(tiny_model_dir("qwen3_moe"), data_file, tmp_path / "c", k=8, m=2, router="topk", shard_sequences=4, packing=packing, backend=backend)
    cache = open_cache(str(tmp_path / "c"))
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(cache, batch_size=5, sampler=order, collate_fn=collate_cache_rows, num_workers=workers)
    start = 0
    names = {"sample_ids": "tail_ids", "sample_logprobs": "tail_logprobs"}
    for batch in loader:
        idx = order[start : start + 5]
        start += len(idx)
        ref = _batch_by_hand([cache[i] for i in idx])
        assert set(batch) - {"base"} == set(ref) - {"lse", "entropy", "topk_ids", "topk_logprobs", "tail_ids", "tail_logprobs"}
        assert ("position_ids" in batch) == packing
        for key in batch:
            if key == "base":
                for f in ("lse", "entropy", "topk_ids", "topk_logprobs", "sample_ids", "sample_logprobs"):
                    assert torch.equal(getattr(batch["base"], f), ref[names.get(f, f)].to(getattr(batch["base"], f).dtype)), f
            else:
                assert torch.equal(batch[key], ref[key].to(batch[key].dtype)), key
        tensors = [batch[k] for k in batch if k != "base"] + [getattr(batch["base"], f) for f in ("lse", "topk_ids", "sample_logprobs")]
        if workers:  # sent from the worker as one shared-memory segment
            assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1 and all(t.is_shared() for t in tensors)
        assert batch["base"].topk_ids.dtype == batch["router_topk_ids"].dtype == torch.int32
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        rows, _ = labelled_positions(batch["labels"])
        assert batch["base"].num_positions == rows.numel() == batch["router_topk_ids"].shape[0]
        # Off the CPU the ids are widened where they land (meta: no real device needed).
        assert batch["base"].to("meta").topk_ids.dtype == torch.int64
    assert start == len(cache)


def test_the_batched_fetch_is_a_sequence_of_the_rows(tmp_path, tiny_model_dir, data_file):
    run(tiny_model_dir("qwen3"), data_file, tmp_path / "c", k=8, m=2, shard_sequences=4)
    cache = open_cache(str(tmp_path / "c"))
    n = len(cache)
    rows = cache.__getitems__([3, -1, 0, 5])
    assert len(rows) == 4
    for got, i in zip([rows[0], rows[1], rows[2], *rows[3:]], [3, n - 1, 0, 5]):
        want = cache[i]
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(torch.from_numpy(np.asarray(got[key])).to(want[key].dtype), want[key]), (i, key)
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match=f"row {bad} out of range for a cache of {n} rows"):
            cache.__getitems__([0, bad])


def test_dataloader_workers_share_which_shards_were_verified(tmp_path, tiny_model_dir, data_file):
    """Checksums are checked once per cache, not once per worker per epoch: a forked worker's
    verification is visible to the parent (and to the next epoch's workers)."""
    run(tiny_model_dir("qwen3"), data_file, tmp_path / "c", k=8, backend="arrow", shard_sequences=4)
    cache = open_cache(str(tmp_path / "c"))
    assert len(cache.manifest.shards) > 2 and not cache._verified.any()
    loader = torch.utils.data.DataLoader(cache, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_cache_rows)
    assert sum(b["input_ids"].shape[0] for b in loader) == len(cache)
    assert cache._verified.all() and not cache._views  # the workers did it, the parent opened nothing


def test_zarr_rows_through_the_decoded_chunk_cache_equal_uncached_reads(tmp_path, tiny_model_dir, data_file, monkeypatch):
    from geocache.cache.backends import ZarrBackend

    monkeypatch.setattr(ZarrBackend.__init__, "__defaults__", (64, 3))  # 64-row chunks: rows straddle chunks
    path = tmp_path / "z"
    precompute(PrecomputeConfig(model=str(tiny_model_dir("qwen3")), data=[str(data_file)], out=str(path), k=8, m=2, backend="zarr",
                                progress=False, data_config=DataConfig(max_length=48)))
    plain = open_cache(str(path), decoded_cache_bytes=0)
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(1)).tolist()
    for budget in (1 << 30, 4096):  # everything kept; a few chunks kept, evicting as it goes
        cached = open_cache(str(path), decoded_cache_bytes=budget)
        for i in order + order[:5]:
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert 0 < cached._chunks.bytes <= budget
        loads = len(cached._chunks._lru)
        assert (loads < 40) == (budget == 4096)  # the small budget evicted; the large one kept every chunk
    assert plain._chunks.bytes == 0


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_a_reader_pickles_without_its_open_shards(tmp_path, tiny_model_dir, data_file, backend):
    """What a spawned DataLoader worker receives: the reader, not the shards it has mapped or decoded."""
    import pickle

    run(tiny_model_dir("qwen3"), data_file, tmp_path / "c", k=8, backend=backend)
    cache = open_cache(str(tmp_path / "c"))
    rows = [cache[i] for i in range(len(cache))]  # opens every shard (and fills Zarr's chunk cache)
    blob = pickle.dumps(cache)
    assert len(blob) < sum(v.numel() * v.element_size() for r in rows for v in r.values()) / 4
    copy = pickle.loads(blob)
    assert not copy._views and copy._chunks.bytes == 0
    assert all(torch.equal(copy[i][k], rows[i][k]) for i in range(len(copy)) for k in rows[i])


@pytest.mark.parametrize("model_type,products", [("qwen3", "one per batch"), ("qwen3_moe", "one per batch"), ("qwen3", "several per batch")])
def test_the_fused_head_caches_what_the_full_logits_give(tmp_path, tiny_model_dir, data_file, model_type, products, monkeypatch):
    import geocache.precompute
    from geocache.precompute import _hidden_only, _plain_head

    if products == "several per batch":  # 40 rows of logits per matrix product: sequences grouped, one alone when longer
        monkeypatch.setattr(geocache.precompute, "_PROJECT_BYTES", 40 * 512 * 4)

    model_dir = tiny_model_dir(model_type)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    head = _plain_head(model)
    assert head is model.get_output_embeddings()  # the fused path is taken for these models
    ids = torch.arange(5, 40).unsqueeze(0)
    with torch.no_grad(), _hidden_only(head) as kept:
        empty = model(ids).logits
    with torch.no_grad():
        full = model(ids).logits
    assert empty.shape == (1, 0, full.shape[-1]) and len(kept) == 1  # the model never projected a row itself
    torch.testing.assert_close(head(kept[0]), full, rtol=0, atol=1e-6)
    run(model_dir, data_file, tmp_path / "fused", k=16, m=4, batch_size=3)
    run(model_dir, data_file, tmp_path / "full", k=16, m=4, batch_size=3, fused_head=False)
    fused, unfused = rows_of(tmp_path / "fused"), rows_of(tmp_path / "full")
    assert len(fused) == len(unfused) > 20
    for a, b in zip(fused, unfused):
        assert a.keys() == b.keys()
        for key in a:
            if a[key].dtype.is_floating_point:  # a product of 256 rows vs one of the whole batch: float rounding
                torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4)
            else:
                assert torch.equal(a[key], b[key]), key


def test_logits_changed_after_the_head_are_cached_as_the_model_returns_them(tmp_path, tokenizer_dir, data_file):
    from transformers import AutoConfig

    from geocache.precompute import _plain_head

    config = AutoConfig.for_model("gemma2", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # logits of a trained model's spread, where the cap bends them
    assert _plain_head(model) is None  # soft-capping after the head: the probe sees it
    model_dir = tmp_path / "gemma2"
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    run(model_dir, data_file, tmp_path / "c", k=8)
    row = open_cache(str(tmp_path / "c"))[1]
    with torch.no_grad():
        logits = model(row["input_ids"].unsqueeze(0)).logits[0]
    rows, _ = labelled_positions(row["labels"].unsqueeze(0))
    with torch.no_grad():  # what the cache would hold if the head's projection were taken as the logits
        projected = model.lm_head(model.model(row["input_ids"].unsqueeze(0)).last_hidden_state)[0]
    assert (projected[rows].logsumexp(-1) - logits[rows].logsumexp(-1)).abs().min() > 0.1
    torch.testing.assert_close(row["lse"], logits[rows].logsumexp(-1), rtol=0, atol=1e-4)
    assert torch.equal(row["topk_ids"], logits[rows].topk(8).indices)


def test_dropout_is_off_and_statistics_are_reproducible(tmp_path, tokenizer_dir, data_file):
    model_dir = build_tiny_model(tmp_path / "m", "llama", tokenizer_dir=tokenizer_dir, attention_dropout=0.5, mlp_bias=True)
    cfg = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert cfg.attention_dropout == 0.5
    run(model_dir, data_file, tmp_path / "a", k=4, m=3)
    run(model_dir, data_file, tmp_path / "b", k=4, m=3)
    assert_same_rows(rows_of(tmp_path / "a"), rows_of(tmp_path / "b"))


def test_packed_sequences_cache_each_example_as_if_alone(tmp_path, tiny_model_dir, data_file):
    model_dir = tiny_model_dir("qwen3")
    run(model_dir, data_file, tmp_path / "single", k=8, max_length=48)
    run(model_dir, data_file, tmp_path / "packed", k=8, max_length=48, packing=True)
    single, packed = rows_of(tmp_path / "single"), rows_of(tmp_path / "packed")
    assert len(packed) < len(single)
    assert "position_ids" in packed[0]
    cat = lambda rows, key: torch.cat([r[key] for r in rows])  # noqa: E731
    # Same examples, same statistics: packing only changed how rows are grouped.
    torch.testing.assert_close(cat(packed, "lse"), cat(single, "lse"))
    assert torch.equal(cat(packed, "topk_ids"), cat(single, "topk_ids"))


def test_models_with_more_output_rows_than_the_tokenizer(tmp_path, tokenizer_dir, data_file):
    model_dir = build_tiny_model(tmp_path / "m", "qwen3", tokenizer_dir=tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(576)  # like Qwen2.5: 152,064 rows for a 151,936-token tokenizer
    model.save_pretrained(model_dir)
    manifest = run(model_dir, data_file, tmp_path / "c", k=4)
    assert manifest.base_model["output_size"] == 576 and manifest.base_model["tokenizer_size"] == 512
    row = open_cache(str(tmp_path / "c"))[0]
    with torch.no_grad():
        logits = model.eval()(row["input_ids"].unsqueeze(0)).logits[0]
    rows, _ = labelled_positions(row["labels"].unsqueeze(0))
    torch.testing.assert_close(row["lse"], logits[rows].logsumexp(-1), rtol=0, atol=1e-4)


def test_bad_inputs_are_one_clear_sentence(tmp_path, tiny_model_dir, tokenizer_dir, data_file):
    dense = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="k=513 exceeds the 512 output rows"):
        run(dense, data_file, tmp_path / "a", k=513)
    with pytest.raises(ValueError, match=r"router statistics were asked for \(router=full\), but model .* is dense"):
        run(dense, data_file, tmp_path / "b", router="full")
    with pytest.raises(ValueError, match=r"router statistics were asked for \(router_k=4\), but model .* is dense"):  # (it said router=auto)
        run(dense, data_file, tmp_path / "b", router_k=4)
    moe = tiny_model_dir("qwen3_moe")  # a router_k that applies to nothing was silently ignored
    with pytest.raises(ValueError, match=r"router_k=3 applies only to top-k router statistics, and this run caches full ones: pass --router topk"):
        run(moe, data_file, tmp_path / "b", router="full", router_k=3)
    with pytest.raises(ValueError, match=r"caches full ones \(--router auto keeps full router logits for this model's 3 MoE layers × 8 experts\)"):
        run(moe, data_file, tmp_path / "b", router_k=3)
    assert not (tmp_path / "b").exists()
    nan_dir = build_tiny_model(tmp_path / "nan", "llama", tokenizer_dir=tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(nan_dir)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    model.save_pretrained(nan_dir)
    with pytest.raises(ValueError, match=r"sequence 0: base logits contain NaN or inf"):
        run(nan_dir, data_file, tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n{"text": "also fine"}\n')
    with pytest.raises(ValueError, match="row 1: field 'text' is empty"):
        run(dense, bad, tmp_path / "d")
    manifest = run(dense, bad, tmp_path / "e", skip_bad_rows=True)
    assert manifest.counts["sequences"] == 2 and manifest.counts["skipped_rows"] == 1


def test_an_existing_cache_is_refused_unless_overwrite_or_resume(tmp_path, tiny_model_dir, data_file):
    model = tiny_model_dir("llama")
    run(model, data_file, tmp_path / "c", k=4)
    with pytest.raises(CacheError, match="already holds a geocache cache; pass --overwrite"):
        run(model, data_file, tmp_path / "c", k=4)
    with pytest.raises(CacheError, match=r"different settings \(statistics.k: 4 != 8\)"):
        run(model, data_file, tmp_path / "c", k=8, resume=True)
    # The same weights in another dtype give other statistics: a resume must not mix them.
    with pytest.raises(CacheError, match=r"different settings \(base_model.dtype: 'float32' != 'bfloat16'\)"):
        run(model, data_file, tmp_path / "c", k=4, resume=True, dtype="bfloat16")
    # An --overwrite whose data cannot be read (a mistyped path, a bad first row, nothing to cache)
    # stops before it removes anything: the cache it was to replace is still whole.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    for data, error in ((tmp_path / "missing.jsonl", FileNotFoundError), (bad, BadRowError), (bad, ValueError)):
        with pytest.raises(error):
            run(model, data, tmp_path / "c", k=8, overwrite=True, skip_bad_rows=error is ValueError)
        assert verify(str(tmp_path / "c")) is None and open_cache(str(tmp_path / "c")).manifest.statistics["k"] == 4
    run(model, data_file, tmp_path / "c", k=8, overwrite=True)
    assert open_cache(str(tmp_path / "c")).manifest.statistics["k"] == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not an empty directory or a geocache cache"):
        run(model, data_file, tmp_path / "other", k=4)


def test_check_compatible_refuses_another_model_or_tokenizer(tmp_path, tiny_model_dir, tokenizer_dir, data_file):
    model_dir = tiny_model_dir("qwen3_moe")
    run(model_dir, data_file, tmp_path / "c", k=4)
    cache = open_cache(str(tmp_path / "c"))
    cache.check_compatible(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "o", "qwen3_moe", tokenizer_dir=tokenizer_dir, seed=1))
    with pytest.raises(CacheError, match=r"was built for base model '[^']*', and this model's weights differ"):  # (no "revision None")
        cache.check_compatible(other)
    with pytest.raises(TypeError, match="takes the model first .* got a .*Tokenizer.* as the model"):  # swapped: was an AttributeError
        cache.check_compatible(AutoTokenizer.from_pretrained(model_dir), other)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{{ messages }}"
    with pytest.raises(CacheError, match="another tokenizer"):
        cache.check_compatible(tokenizer=tok)
    expected = cache.manifest.fingerprint()
    expected["data"]["preprocessing"]["max_length"] = 2048
    with pytest.raises(CacheError, match=r"different settings \(data.preprocessing.max_length: 48 != 2048\)"):
        cache.check_compatible(expected=expected)


@pytest.mark.parametrize("split", ["train[2:4]", "train[40%:80%]"])
def test_a_bad_row_in_a_slice_is_named_by_its_row_in_the_data(tmp_path, tiny_model_dir, split):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": 3} if i == 2 else {"text": f"row {i}"}) for i in range(5)))
    with pytest.raises(BadRowError, match=r"^row 2: field 'text' must be a string"):  # was 'row 0'
        run(tiny_model_dir("llama"), data, tmp_path / "c", k=4, split=split)


def test_an_edited_manifest_count_is_caught_by_the_reader_and_verify(tmp_path, tiny_model_dir, data_file):
    """The manifest is not checksummed itself: a shard's row count lowered by one made the reader
    drop a row silently (raised: a bare IndexError), and an edited total passed verify."""
    out = tmp_path / "c"
    run(tiny_model_dir("llama"), data_file, out, k=4, shard_sequences=10)
    original = (out / "manifest.json").read_text()
    for delta in (-1, 1):
        record = json.loads(original)
        record["shards"][1]["sequences"] += delta
        record["counts"]["sequences"] += delta  # consistently: the shard itself must be checked
        (out / "manifest.json").write_text(json.dumps(record))
        cache = open_cache(str(out))
        with pytest.raises(CacheError, match=r"shard shards/rank000-000001\.arrow of cache .* holds 10 sequences, .* but the manifest lists "
                                             rf"{10 + delta}, .*: the cache is corrupt"):
            collate_cache_rows(cache.__getitems__(list(range(len(cache)))))  # a DataLoader's batched fetch
        assert "shard shards/rank000-000001.arrow fails the schema check: counts differ" in verify(str(out))
    record = json.loads(original)
    record["counts"]["sequences"] = 999
    (out / "manifest.json").write_text(json.dumps(record))
    assert verify(str(out)) == f"the manifest's total of sequences (999) is not the sum over its shards ({json.loads(original)['counts']['sequences']})"


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_inspect_names_the_shard_it_cannot_read(tmp_path, tiny_model_dir, data_file, backend):
    import shutil

    from geocache.cache.inspect import summarize

    out = tmp_path / "c"
    run(tiny_model_dir("llama"), data_file, out, k=4, backend=backend, shard_sequences=10)
    shard = next((out / "shards").glob("rank000-000001*"))
    if backend == "zarr":
        shutil.rmtree(shard)
        message = r"shard shards/rank000-000001\.zarr of cache .* is missing"
    else:
        shard.write_bytes(shard.read_bytes()[:100])
        message = r"shard shards/rank000-000001\.arrow of cache .* cannot be read"
    with pytest.raises(CacheError, match=message):
        summarize(str(out))


def test_a_flipped_byte_is_caught_by_verify_and_by_the_reader(tmp_path, tiny_model_dir, data_file):
    for backend in ("zarr", "arrow"):
        out = tmp_path / backend
        run(tiny_model_dir("llama"), data_file, out, k=4, backend=backend, shard_sequences=10)
        assert verify(str(out)) is None
        files = sorted(p for p in (out / "shards").rglob("rank000-000001*") if p.is_file()) or sorted(
            p for p in (out / "shards" / "rank000-000001.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"
        )
        target = files[-1]
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
        assert verify(str(out)) == "shard shards/rank000-000001" + (".zarr" if backend == "zarr" else ".arrow") + " fails its checksum"
        cache = open_cache(str(out))
        cache[0]  # shard 0 is intact
        with pytest.raises(CacheError, match="fails its checksum"):
            cache[12]
        with pytest.raises(CacheError, match="fails its checksum"):  # a DataLoader's batched fetch
            cache.__getitems__([0, 12])
        if backend == "zarr":  # unverified, the chunk's own crc32c fails where the batch is built
            batch = open_cache(str(out), verify=False).__getitems__([0, 12])
            with pytest.raises(CacheError, match=r"shard shards/rank000-000001\.zarr of cache .* cannot be read \(Stored and computed checksum do not match"):
                collate_cache_rows(batch)


def test_a_full_disk_fails_clearly_and_keeps_only_whole_shards(tmp_path, tiny_model_dir, data_file, monkeypatch):
    from geocache.cache import backends

    model = tiny_model_dir("llama")
    run(model, data_file, tmp_path / "ref", k=4, shard_sequences=8, backend="zarr")
    real_write, calls = backends.ZarrBackend.write, []

    def flaky_write(self, fs, path, arrays):
        calls.append(path)
        if len(calls) == 3:
            real_write(self, fs, path, {k: v[:1] for k, v in arrays.items()})  # something half-written...
            raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk fills
        return real_write(self, fs, path, arrays)

    monkeypatch.setattr(backends.ZarrBackend, "write", flaky_write)
    with pytest.raises(CacheWriteError, match=r"could not write shard shards/rank000-000002.zarr .*: the disk is full; nothing half-written"):
        run(model, data_file, tmp_path / "c", k=4, shard_sequences=8, backend="zarr")
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == ["rank000-000000.zarr", "rank000-000001.zarr"]
    assert [r["event"] for r in log_of(tmp_path / "c")] == ["start", "shard", "shard", "stopped"]
    assert "the disk is full" in log_of(tmp_path / "c")[-1]["error"]
    # Read before its resume, the cache is named incomplete, with what it holds and how to go on.
    incomplete = r"is incomplete: it has no manifest.json yet, and its parts list 2 committed shard\(s\) of a precompute that did not finish"
    with pytest.raises(CacheError, match=incomplete + r" \(interrupted, or still running\); rerun that precompute with --resume"):
        open_cache(str(tmp_path / "c"))
    with pytest.raises(CacheError, match=incomplete):
        verify(str(tmp_path / "c"))
    monkeypatch.setattr(backends.ZarrBackend, "write", real_write)
    run(model, data_file, tmp_path / "c", k=4, shard_sequences=8, resume=True, backend="zarr")
    assert_same_rows(rows_of(tmp_path / "c"), rows_of(tmp_path / "ref"))
    # The resume kept the stopped run's records and added its own after them.
    log = log_of(tmp_path / "c")
    assert [r["event"] for r in log[:4]] == ["start", "shard", "shard", "stopped"] and log[4]["event"] == "start"
    assert log[4]["resume"] is True and log[4]["sequences_committed"] == 16 and log[-1]["event"] == "end"
    assert [r["shard"] for r in log if r["event"] == "shard"] == [s.name for s in open_cache(str(tmp_path / "c")).manifest.shards]


def log_of(cache, rank=0):
    return [json.loads(line) for line in (Path(cache) / "logs" / f"precompute-rank-{rank:03d}.jsonl").read_text().splitlines()]


def test_the_precompute_log_has_a_record_per_shard_and_the_totals(tmp_path, tiny_model_dir, data_file, monkeypatch):
    model = tiny_model_dir("qwen3_moe")
    manifest = run(model, data_file, tmp_path / "c", k=4, m=2, shard_sequences=8, batch_size=4)
    log = log_of(tmp_path / "c")
    assert [r["event"] for r in log] == ["start"] + ["shard"] * len(manifest.shards) + ["end"]
    start, shards, end = log[0], log[1:-1], log[-1]
    assert (start["k"], start["m"], start["backend"], start["router"], start["resume"], start["world_size"]) == (4, 2, manifest.backend, "full", False, 1)
    # Each shard record is the manifest's shard, with this rank's running totals.
    assert [(r["shard"], r["shard_sequences"], r["shard_tokens"], r["shard_bytes"]) for r in shards] == [
        (s.name, s.sequences, s.tokens, s.bytes) for s in manifest.shards]
    assert [r["sequences"] for r in shards] == np.cumsum([s.sequences for s in manifest.shards]).tolist()
    assert [r["tokens"] for r in shards] == np.cumsum([s.tokens for s in manifest.shards]).tolist()
    assert all(r["tokens_per_s"] > 0 and r["forward_s"] > 0 and r["statistics_s"] > 0 for r in shards)
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(log, log[1:]))
    c = manifest.counts
    assert end["cache"] == {"complete": True, "sequences": c["sequences"], "tokens": c["tokens"], "positions": c["positions"],
                            "shards": len(manifest.shards), "bytes": sum(s.bytes for s in manifest.shards),
                            "bytes_per_token": round(sum(s.bytes for s in manifest.shards) / c["tokens"], 2)}
    assert (end["sequences"], end["tokens"], end["skipped_rows"]) == (c["sequences"], c["tokens"], 0)
    assert verify(str(tmp_path / "c")) is None  # the log is beside the data, not part of it
    # A log that cannot be written is one sentence; the shards committed before it are kept.
    from geocache import precompute as module

    real = module.atomic_write_text

    def full_for_logs(fs, path, text):
        if "/logs/" in path and text.count("\n") >= 3:  # start and one shard written, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fs, path, text)

    monkeypatch.setattr(module, "atomic_write_text", full_for_logs)
    with pytest.raises(CacheWriteError, match=r"could not write the precompute log .*precompute-rank-000.jsonl: the disk is full; "
                                              r"the shards committed so far are kept, so free space and rerun with --resume"):
        run(model, data_file, tmp_path / "d", k=4, m=2, shard_sequences=8, batch_size=4)
    monkeypatch.setattr(module, "atomic_write_text", real)
    run(model, data_file, tmp_path / "d", k=4, m=2, shard_sequences=8, batch_size=4, resume=True)
    assert_same_rows(rows_of(tmp_path / "d"), rows_of(tmp_path / "c"))
    # Ctrl-C: the sequences already handed to the writer are committed, the log says it stopped,
    # and a resume gives the uninterrupted arrays.
    from geocache.precompute import _Run

    real_records, calls = _Run.records, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_records(self, batch)

    monkeypatch.setattr(_Run, "records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(model, data_file, tmp_path / "e", k=4, m=2, shard_sequences=8, batch_size=4)
    monkeypatch.setattr(_Run, "records", real_records)
    log = log_of(tmp_path / "e")
    assert [r["event"] for r in log] == ["start", "shard", "shard", "stopped"] and log[-1]["error"] == "KeyboardInterrupt"
    assert log[-2]["sequences"] == 12  # 3 batches of 4: a shard of 8 and the 4 queued behind it
    run(model, data_file, tmp_path / "e", k=4, m=2, shard_sequences=8, batch_size=4, resume=True)
    assert_same_rows(rows_of(tmp_path / "e"), rows_of(tmp_path / "c"))


def test_a_resume_between_batches_recomputes_the_cut_batch_for_exactly_the_same_arrays(tmp_path, tiny_model_dir, monkeypatch):
    """Shards of 5 sequences, batches of 4, rows of mixed lengths: an interruption after shard 1
    falls inside batch 2 (sequences 4-7). Each batch is padded to its longest row, and the forward's
    rounding depends on that width; so the resumed run recomputes that whole batch and keeps its
    rows from sequence 5 on, instead of starting a batch of other rows (and width) at 5."""
    import inspect
    import textwrap

    from geocache.cache import backends

    data = tmp_path / "mixed.jsonl"
    chunks = [c for c in inspect.getsource(textwrap).split("\n") if c.strip()][:40]
    data.write_text("\n".join(json.dumps({"text": c}) for c in chunks))  # lines of 2 to ~40 tokens
    model = tiny_model_dir("qwen3_moe")
    kw = dict(k=8, m=2, shard_sequences=5, batch_size=4, backend="arrow")
    run(model, data, tmp_path / "ref", **kw)
    real_write, calls = backends.ArrowBackend.write, []

    def failing_write(self, fs, path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated interruption")
        return real_write(self, fs, path, arrays)

    monkeypatch.setattr(backends.ArrowBackend, "write", failing_write)
    with pytest.raises(Exception):
        run(model, data, tmp_path / "c", **kw)
    monkeypatch.setattr(backends.ArrowBackend, "write", real_write)
    assert len(list((tmp_path / "c" / "shards").iterdir())) == 1  # only shard 0 (sequences 0-4) committed
    run(model, data, tmp_path / "c", resume=True, **kw)
    assert_same_rows(rows_of(tmp_path / "c"), rows_of(tmp_path / "ref"))


def test_a_resume_checks_every_ranks_part_not_only_its_own(tmp_path, tiny_model_dir, data_file):
    """A 2-process run killed before rank 0 wrote its part leaves only rank 1's: a 1-process resume
    must still see that the cache was split over 2 processes (it found no rank-0 part, so checked nothing)."""
    model = tiny_model_dir("llama")
    run(model, data_file, tmp_path / "c", k=4, shard_sequences=8)
    parts = tmp_path / "c" / "parts"
    record = json.loads((parts / "rank-000.json").read_text())
    record.update(world_size=2, complete=False)
    (parts / "rank-001.json").write_text(json.dumps(record))
    (parts / "rank-000.json").unlink()
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"cannot resume cache .*: it was built with different settings \(world_size: 2 != 1\)"):
        run(model, data_file, tmp_path / "c", k=4, shard_sequences=8, resume=True)
    # A part's temporary file, half-written by a kill, is not a part: the resume goes on.
    run(model, data_file, tmp_path / "d", k=4, shard_sequences=8)
    (tmp_path / "d" / "parts" / ".tmp-rank-000.json").write_text('{"format_version": ')
    run(model, data_file, tmp_path / "d", k=4, shard_sequences=8, resume=True)


def _cli(*args):
    return [sys.executable, "-m", "geocache_cli.main", "precompute", *args, "--no-progress"]


def test_a_killed_precompute_resumes_to_exactly_the_uninterrupted_arrays(tmp_path, tiny_model_dir, data_file):
    model = tiny_model_dir("qwen2_moe")
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join([data_file.read_text()] * 3))
    args = ["--model", str(model), "--data", str(big), "--top-k", "8", "--tail-samples", "2", "--max-length", "48", "--shard-sequences", "6", "--batch-size", "2"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "ref")), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "c")), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = tmp_path / "c" / "parts" / "rank-000.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(json.loads(part.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "precompute finished before it could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(str(tmp_path / "c"))
    done = subprocess.run(_cli(*args, "--out", str(tmp_path / "c"), "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_rows(rows_of(tmp_path / "c"), rows_of(tmp_path / "ref"))


def test_two_processes_over_gloo_cache_the_same_rows_as_one(tmp_path, tiny_model_dir, data_file):
    model = tiny_model_dir("mixtral")
    args = ["--model", str(model), "--data", str(data_file), "--top-k", "8", "--tail-samples", "2", "--max-length", "48", "--shard-sequences", "4"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571", "-m", "geocache_cli.main"]
    done = subprocess.run(
        torchrun + _cli(*args, "--out", str(tmp_path / "two"))[3:],
        env={**ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    two = open_cache(str(tmp_path / "two"))
    assert two.manifest.world_size == 2 and {s.rank for s in two.manifest.shards} == {0, 1}
    assert_same_rows(rows_of(tmp_path / "two"), rows_of(tmp_path / "one"))
    assert done.stdout.count("cached ") == 1, done.stdout  # one summary, from rank 0
    for rank in (0, 1):  # each rank logs its own shards, and the whole cache's totals at the end
        log = log_of(tmp_path / "two", rank)
        assert [r["shard"] for r in log if r["event"] == "shard"] == [s.name for s in two.manifest.shards if s.rank == rank]
        assert log[-1]["event"] == "end" and log[-1]["cache"]["sequences"] == len(two)
    # A dry run under torchrun estimates the whole run once (not each rank's share, once per rank).
    dry = subprocess.run(torchrun + _cli(*args, "--dry-run")[3:], env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-2000:]
    estimate = json.loads(dry.stdout)
    counts = open_cache(str(tmp_path / "one")).manifest.counts
    assert (estimate["sequences"], estimate["tokens"], estimate["positions"]) == (counts["sequences"], counts["tokens"], counts["positions"])


def test_an_fsspec_url_works_as_output(tiny_model_dir, data_file):
    for backend in ("zarr", "arrow"):
        url = f"memory://geocache-test-{backend}"
        run(tiny_model_dir("llama"), data_file, url, k=4, backend=backend, shard_sequences=10)
        cache = open_cache(url)
        assert len(cache) > 20 and verify(url) is None
        assert cache[5]["lse"].shape[0] == labelled_positions(cache[5]["labels"].unsqueeze(0))[0].numel()


def test_plain_zarr_and_pyarrow_read_the_documented_schema(tmp_path, tiny_model_dir, data_file):
    """docs/cache-format.md: a reader with no geocache gets the same arrays."""
    import pyarrow as pa
    import zarr

    model = tiny_model_dir("qwen3_moe")
    run(model, data_file, tmp_path / "z", k=8, m=2, backend="zarr", shard_sequences=10)
    run(model, data_file, tmp_path / "a", k=8, m=2, backend="arrow", shard_sequences=10)
    ref = rows_of(tmp_path / "z")
    manifest = json.loads((tmp_path / "z" / "manifest.json").read_text())
    shard = manifest["shards"][1]
    g = zarr.open_group(str(tmp_path / "z" / shard["name"]), mode="r")
    tok_off, pos_off = g["token_offsets"][:], g["position_offsets"][:]
    seq = g["sequence_index"][:]
    j = 3
    row = ref[int(seq[j])]
    assert np.array_equal(g["input_ids"][tok_off[j] : tok_off[j + 1]], row["input_ids"].numpy())
    assert np.array_equal(g["topk_logprobs"][pos_off[j] : pos_off[j + 1]], row["topk_logprobs"].numpy())
    assert np.array_equal(g["router_logits"][pos_off[j] : pos_off[j + 1]], row["router_logits"].numpy())
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    batch = pa.ipc.open_file(pa.memory_map(str(tmp_path / "a" / manifest_a["shards"][1]["name"]))).get_batch(0)
    seq_a = batch.column("sequence_index").to_numpy()
    assert int(seq_a[j]) == int(seq[j])
    topk = np.array(batch.column("topk_ids")[j].as_py())
    assert np.array_equal(topk, row["topk_ids"].numpy())


def test_timings_split_forward_statistics_and_background_writing(tmp_path, tiny_model_dir, data_file):
    timings = {}
    cfg = PrecomputeConfig(model=str(tiny_model_dir("llama")), data=[str(data_file)], out=str(tmp_path / "c"), k=4, progress=False, shard_sequences=5)
    precompute(cfg, timings=timings)
    assert set(timings) == {"forward_s", "statistics_s", "write_s", "wall_s"}
    assert all(v > 0 for v in timings.values())
    assert timings["forward_s"] + timings["statistics_s"] < timings["wall_s"]


def test_a_hub_dataset_is_read_at_the_commit_the_manifest_records(monkeypatch, tmp_path, tiny_model_dir):
    """The hub's answer for the revision is recorded once and loaded, so a resume reads the same data."""
    import datasets
    import huggingface_hub

    class Info:
        sha = "c0ffee"

    loads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, revision=None: Info())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: loads.append(kw.get("revision")) or [{"text": f"row {i} of the corpus"} for i in range(5)])
    manifest = precompute(PrecomputeConfig(model=str(tiny_model_dir("llama")), data=["org/corpus"], out=str(tmp_path / "c"), k=4, progress=False))
    assert manifest.data["source"] == {"kind": "hub", "id": "org/corpus", "revision": None, "commit": "c0ffee"}
    assert loads == ["c0ffee"] and manifest.counts["sequences"] == 5


def test_geocache_open_cache_is_the_readers_entry_point(tmp_path, tiny_model_dir, data_file):
    import geocache

    run(tiny_model_dir("llama"), data_file, tmp_path / "c", k=4)
    assert geocache.open_cache is open_cache
    assert_same_rows(rows_of(tmp_path / "c"), [geocache.open_cache(str(tmp_path / "c"))[i] for i in range(len(open_cache(str(tmp_path / "c"))))])


def test_a_resume_names_the_model_and_data_by_content_not_by_path(tmp_path, tiny_model_dir, data_file, monkeypatch):
    model = tiny_model_dir("llama")
    run(model, data_file, tmp_path / "c", k=4)
    before = rows_of(tmp_path / "c")
    # the same files, named relative to another working directory (a job script run elsewhere)
    monkeypatch.chdir(data_file.parent)
    manifest = run(os.path.relpath(model), data_file.name, tmp_path / "c", k=4, resume=True)
    assert manifest.counts["sequences"] == len(before)
    assert_same_rows(rows_of(tmp_path / "c"), before)
    other = data_file.parent / "other.jsonl"
    other.write_text(data_file.read_text().replace("wrap", "WRAP"))
    with pytest.raises(CacheError, match=r"different settings \(data.source.sha256: "):
        run(model, other, tmp_path / "c", k=4, resume=True)


def test_check_compatible_refuses_other_preprocessing(tmp_path, tiny_model_dir, data_file):
    run(tiny_model_dir("llama"), data_file, tmp_path / "c", k=4, packing=True)
    cache = open_cache(str(tmp_path / "c"))
    cache.check_compatible(data_config=DataConfig(max_length=48, packing=True))
    with pytest.raises(CacheError, match=r"built with different preprocessing \(preprocessing.max_length: 48 != 2048\)"):
        cache.check_compatible(data_config=DataConfig(max_length=2048, packing=True))
    with pytest.raises(CacheError, match=r"preprocessing.packing: True != False"):
        cache.check_compatible(data_config=DataConfig(max_length=48))


def test_rows_left_without_labels_are_counted_in_the_manifest_and_the_estimate(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "long_prompts.jsonl"
    rows = [{"prompt": "word " * 80, "completion": " answer"}] * 3 + [{"text": "a short text row"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = tiny_model_dir("llama")
    estimate = run(model, data, tmp_path / "unused", k=4, dry_run=True)
    assert estimate["sequences"] == 1 and estimate["unlabelled_rows"] == 3
    manifest = run(model, data, tmp_path / "c", k=4)
    assert manifest.counts["sequences"] == 1 and manifest.counts["unlabelled_rows"] == 3
    assert "left out 3 row(s) with no label within max_length=48" in capsys.readouterr().err


def test_rows_longer_than_max_length_are_counted_in_the_manifest_the_estimate_and_inspect(tmp_path, tiny_model_dir, capsys):
    from geocache.cache.inspect import summarize

    data = tmp_path / "long.jsonl"
    rows = [{"text": "word " * 80}, {"text": "a short text row"}, {"text": "other " * 60}, {"text": "short again"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = tiny_model_dir("llama")
    estimate = run(model, data, tmp_path / "unused", k=4, dry_run=True)
    assert estimate["sequences"] == 4 and estimate["truncated_rows"] == 2
    manifest = run(model, data, tmp_path / "c", k=4, packing=True)
    assert manifest.counts["truncated_rows"] == 2
    assert "truncated 2 row(s) longer than max_length=48 tokens (their ends are not cached); first: row 0" in capsys.readouterr().err
    assert summarize(str(tmp_path / "c"))["input rows truncated"] == 2


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_router_topk_mode_caches_the_routed_experts_of_a_direct_forward(tmp_path, tiny_model_dir, data_file, model_type):
    """The first top_k cached ids are the experts the model routes each position to (DeepSeek-V3:
    by sigmoid scores plus a correction bias, within its best expert groups; a random bias here,
    so that the raw logits' top-k would be another set), with the base's log-probs at them."""
    from geocache.moe import moe_blocks, router_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(model_type)).eval()
    if model_type == "deepseek_v3":
        g = torch.Generator().manual_seed(0)
        for _, block in moe_blocks(model):
            router_of(block).e_score_correction_bias.copy_(torch.randn(router_of(block).e_score_correction_bias.shape, generator=g))
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir(model_type)).save_pretrained(tmp_path / "model")
    manifest = run(tmp_path / "model", data_file, tmp_path / "c", k=4, router="topk", router_k=3)
    assert manifest.moe["router_mode"] == "topk" and manifest.moe["router_k"] == 3
    top_k = manifest.moe["top_k"]
    cache = open_cache(str(tmp_path / "c"))
    differs_from_raw_topk = 0
    for i in (0, 5, len(cache) - 1):
        row = cache[i]
        assert "router_logits" not in row
        routed = []
        handles = [router_of(b).register_forward_hook(lambda m, a, out: routed.append((out[0], out[-1]))) for _, b in moe_blocks(model)]
        with torch.no_grad():
            model(row["input_ids"].unsqueeze(0))
        for h in handles:
            h.remove()
        rows, _ = labelled_positions(row["labels"].unsqueeze(0))
        logits = torch.stack([lg for lg, _ in routed])[:, rows].transpose(0, 1)  # [P, L, E]
        selected = torch.stack([ids for _, ids in routed])[:, rows].transpose(0, 1)  # [P, L, top_k], the router's own choice
        ids = row["router_topk_ids"]
        assert torch.equal(ids[..., :top_k].sort(-1).values, selected.sort(-1).values)
        # log r in the router's own scoring, by hand: softmax, or sigmoid scores normalised (DeepSeek-V3)
        log_r = logits.log_softmax(-1) if model_type != "deepseek_v3" else (logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)).log()
        torch.testing.assert_close(row["router_topk_logprobs"].float(), log_r.gather(-1, ids), rtol=2e-3, atol=2e-3)
        differs_from_raw_topk += int((logits.topk(top_k, -1).indices.sort(-1).values != selected.sort(-1).values).any())
    assert differs_from_raw_topk == (3 if model_type == "deepseek_v3" else 0)  # the test can tell the two apart


def test_the_progress_bar_counts_rows_with_an_eta_when_nothing_caps_the_sequences(tmp_path, tiny_model_dir, data_file, capsys):
    n_rows = sum(1 for line in data_file.read_text().splitlines() if line.strip())
    cfg = PrecomputeConfig(model=str(tiny_model_dir("llama")), data=[str(data_file)], out=str(tmp_path / "c"), k=4, batch_size=4,
                           data_config=DataConfig(max_length=48))
    manifest = precompute(cfg)
    err = capsys.readouterr().err
    last = [line for line in err.replace("\r", "\n").strip().splitlines() if line.startswith("precompute")][-1]  # the bar's last state
    assert f"{n_rows}/{n_rows}" in last and "row" in last and f"seq={manifest.counts['sequences']}" in last, last
    import re

    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", last), last  # elapsed<remaining: a total to count down to


def test_no_progress_shows_no_bar_not_even_transformers_loading_one(tmp_path, tiny_model_dir, data_file, capsys):
    from transformers.utils import logging as hf_logging

    model = str(tiny_model_dir("llama"))
    was = hf_logging.is_progress_bar_enabled()  # (off in this suite: conftest.py)
    hf_logging.enable_progress_bar()
    try:
        for progress, out in ((True, "a"), (False, "b")):
            precompute(PrecomputeConfig(model=model, data=[str(data_file)], out=str(tmp_path / out), k=4, progress=progress,
                                        data_config=DataConfig(max_length=48)))
            err = capsys.readouterr().err
            assert ("Loading weights" in err and "precompute" in err) if progress else ("Loading weights" not in err and "it/s" not in err), err
            assert hf_logging.is_progress_bar_enabled()  # as it was, after the run
    finally:
        if not was:
            hf_logging.disable_progress_bar()


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_a_dry_run_reads_no_weights_and_estimates_what_a_run_stores(tmp_path, tiny_model_dir, data_file, model_type, monkeypatch):
    import transformers

    model = tiny_model_dir(model_type)
    manifest = run(model, data_file, tmp_path / "c", k=8, m=2)
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: pytest.fail("a dry run loaded the weights"))
    estimate = run(model, data_file, tmp_path / "unused", k=8, m=2, dry_run=True)
    assert not (tmp_path / "unused").exists()
    keys = ("sequences", "tokens", "positions", "skipped_rows", "unlabelled_rows", "truncated_rows")
    assert {k: estimate[k] for k in keys} == {k: manifest.counts[k] for k in keys} and estimate["sequences"] > 20
    assert (estimate["router_bytes"] > 0) == (manifest.moe is not None)
    with pytest.raises(ValueError, match="k=100000 exceeds the 512 output rows"):
        run(model, data_file, tmp_path / "unused", k=100000, dry_run=True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real)


def test_a_cache_written_before_add_bos_existed_still_resumes_and_checks(tmp_path, tiny_model_dir, tokenizer_dir, data_file):
    """Manifests from before the add_bos field: read as add_bos false (they never added one), which
    is also what the flag does with a tokenizer that puts nothing before a text."""
    model = tiny_model_dir("llama")
    run(model, data_file, tmp_path / "c", k=4)
    for path in [tmp_path / "c" / "manifest.json", *sorted((tmp_path / "c" / "parts").glob("*.json"))]:
        raw = json.loads(path.read_text())
        assert raw["data"]["preprocessing"].pop("add_bos") is False  # this tokenizer adds nothing
        path.write_text(json.dumps(raw))
    before = rows_of(tmp_path / "c")
    run(model, data_file, tmp_path / "c", k=4, resume=True)  # the default add_bos=True: nothing to add here
    assert_same_rows(rows_of(tmp_path / "c"), before)
    cache = open_cache(str(tmp_path / "c"))
    cache.check_compatible(tokenizer=AutoTokenizer.from_pretrained(model), data_config=DataConfig(max_length=48))
    cache.check_compatible(data_config=DataConfig(max_length=48))


def _spread_over_cpu_and_disk(model_dir) -> dict:
    """A device_map that offloads the embedding, the output head and every other layer to disk
    (accelerate then keeps their weights on ``meta`` between forwards), the rest on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(config.num_hidden_layers)})
    device_map.update({"model.embed_tokens": "disk", "lm_head": "disk"})
    return device_map


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "deepseek_v3"])
def test_a_base_spread_by_a_device_map_with_disk_offload_caches_what_it_caches_whole(tmp_path, tiny_model_dir, data_file, model_type):
    """Offloaded weights exist only inside their modules' forwards: the fused head steps aside
    (the model's own logits are read), the input goes where the embedding runs, and the model's
    fingerprint reads the offloaded weights, so the cache is the one the whole model gives and
    passes ``check_compatible`` against it."""
    model_dir = tiny_model_dir(model_type)
    router = {"router": "topk"} if model_type == "deepseek_v3" else {}  # ranked by its routers' correction biases, offloaded too
    whole = run(model_dir, data_file, tmp_path / "whole", k=8, m=4, fused_head=False, **router)
    device_map = _spread_over_cpu_and_disk(model_dir)
    spread = run(model_dir, data_file, tmp_path / "spread", k=8, m=4, device_map=json.dumps(device_map), offload_folder=str(tmp_path / "offload"),
                 **router)
    spread_model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert spread_model.lm_head.weight.device.type == "meta" and spread_model.model.embed_tokens.weight.device.type == "meta"  # really offloaded
    assert spread.base_model == whole.base_model
    assert_same_rows(rows_of(tmp_path / "whole"), rows_of(tmp_path / "spread"))
    if model_type == "qwen3_moe":
        assert "router_logits" in open_cache(str(tmp_path / "spread"))[0]
    open_cache(str(tmp_path / "spread")).check_compatible(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))


def test_device_map_options_are_checked_in_one_sentence(tmp_path, tiny_model_dir, data_file):
    dense = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="give --device-map too"):
        run(dense, data_file, tmp_path / "a", offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match="--device and --device-map contradict each other"):
        run(dense, data_file, tmp_path / "b", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="is not a valid JSON mapping"):
        run(dense, data_file, tmp_path / "c", device_map='{"lm_head": cpu}')
    with pytest.raises(ValueError, match="must be a mapping of devices to sizes"):
        run(dense, data_file, tmp_path / "d", device_map="auto", max_memory="20GiB")
    assert PrecomputeConfig(model="m", data="d", out="o", device_map='{"": "cpu"}', max_memory='{"cpu": "1GiB"}').max_memory == {"cpu": "1GiB"}


def test_chat_rows_in_a_json_array_with_null_fields_cache_as_their_jsonl(tmp_path, tiny_model_dir):
    """datasets streams a .json array whose messages mix types as one JSON string per message."""
    model = tiny_model_dir("llama")
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"hello number {i}", "tool_calls": None}]} for i in range(3)]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run(model, tmp_path / "chat.json", tmp_path / "a")
    run(model, tmp_path / "chat.jsonl", tmp_path / "b")
    assert_same_rows(rows_of(tmp_path / "a"), rows_of(tmp_path / "b"))
    assert len(rows_of(tmp_path / "a")) == 3


def test_a_run_stopped_before_its_first_shard_does_not_block_the_next(tmp_path, tiny_model_dir, data_file):
    model = tiny_model_dir("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="row 1: field 'text' is empty"):
        run(model, bad, tmp_path / "out")
    assert [r["event"] for r in log_of(tmp_path / "out")] == ["start", "stopped"] and "row 1" in log_of(tmp_path / "out")[1]["error"]
    assert run(model, data_file, tmp_path / "out").counts["sequences"] > 0  # no --overwrite needed: nothing was committed
    assert log_of(tmp_path / "out")[0]["event"] == "start" and [r["event"] for r in log_of(tmp_path / "out")].count("start") == 1  # a fresh log
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="exists and is not an empty directory or a geocache cache"):
        run(model, data_file, tmp_path / "other", resume=True)  # --resume never writes into a stranger's directory
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_run_that_caches_no_sequence_fails_naming_why(tmp_path, tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{"txt": "wrong field"}\n')
    with pytest.raises(ValueError, match=r"no sequence was cached from data .*: 2 malformed row\(s\) skipped \(first: row 0.* and 0 left "
                                         r"without a label; fix the data and rerun$"):
        run(model, bad, tmp_path / "out", skip_bad_rows=True)
    assert not (tmp_path / "out").exists()  # (one process knows before it writes anything)
    # Several processes find out at the end and leave an empty cache (a manifest marked incomplete,
    # no shard), said so (not "interrupted": a resume would cache nothing again).
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "some text to cache"}\n')
    run(model, good, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest.update(complete=False, shards=[], counts={"sequences": 0, "tokens": 0, "positions": 0, "skipped_rows": 2, "unlabelled_rows": 0})
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "parts" / "rank-000.json").write_text(json.dumps(manifest))
    for shard in (tmp_path / "out" / "shards").iterdir():
        shard.unlink()
    with pytest.raises(CacheError, match=r"is empty: its precompute cached no sequence \(2 malformed row\(s\) skipped, 0 left without a "
                                         r"label\); fix the data \(or --max-length\) and rerun it"):
        open_cache(str(tmp_path / "out"))
    assert verify(str(tmp_path / "out")) == "the cache is empty: its precompute cached no sequence; fix the data (or --max-length) and rerun it"
    # Prompts that fill max_length: the clause names it. A dry run warns of it (it exits 0: an estimate).
    long_prompts = tmp_path / "pc.jsonl"
    long_prompts.write_text("\n".join(json.dumps({"prompt": "a long question " * 3, "completion": " yes"}) for _ in range(3)))
    estimate = run(model, long_prompts, tmp_path / "dry", dry_run=True, max_length=8)
    assert estimate["sequences"] == 0 and not (tmp_path / "dry").exists()
    assert "warning: this run would cache no sequence from data" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"0 malformed row\(s\) skipped and 3 left without a label within max_length=8 \(their prompts fill "
                                         r"it\); raise --max-length or fix the data, and rerun"):
        run(model, long_prompts, tmp_path / "pc", max_length=8)
    # A rerun, fixed, goes into an empty cache's directory without --overwrite (there was nothing to
    # keep), and so does a --resume (there is nothing to resume: it starts afresh).
    assert run(model, long_prompts, tmp_path / "out", max_length=64).counts["sequences"] == 3 and verify(str(tmp_path / "out")) is None
    assert [r["event"] for r in log_of(tmp_path / "out")] == ["start", "shard", "end"]  # a fresh log
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest.update(complete=False, shards=[])
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "parts" / "rank-000.json").write_text(json.dumps(manifest))
    for shard in (tmp_path / "out" / "shards").iterdir():
        shard.unlink()
    assert run(model, long_prompts, tmp_path / "out", max_length=64, resume=True).counts["sequences"] == 3


def test_a_float16_load_of_the_base_matches_a_float32_cache_and_back(tmp_path, tiny_model_dir, data_file):
    """float16 weights round to bfloat16 differently from the float32 ones on some values
    (double rounding): the fingerprint's second hash matches them; float16 against bfloat16
    stays refused, with the reason."""
    from geocache.models import model_fingerprint

    model_dir = tiny_model_dir("qwen3_moe")
    load = {d: AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, d)) for d in ("float32", "float16", "bfloat16")}
    fps = {d: model_fingerprint(m) for d, m in load.items()}
    assert fps["float16"]["weights_sha256"] != fps["float32"]["weights_sha256"]  # what refused them before
    assert fps["bfloat16"]["weights_sha256"] == fps["float32"]["weights_sha256"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    run(model_dir, data_file, tmp_path / "f32", max_sequences=2)
    run(model_dir, data_file, tmp_path / "f16", max_sequences=2, dtype="float16")
    for cache, models in (("f32", ("float32", "float16", "bfloat16")), ("f16", ("float16", "float32"))):
        for d in models:
            open_cache(str(tmp_path / cache)).check_compatible(load[d], tok)
    with pytest.raises(CacheError, match="a float16 and a bfloat16 load of one model are two roundings of it"):
        open_cache(str(tmp_path / "f16")).check_compatible(load["bfloat16"], tok)


def test_a_resume_of_a_topk_router_cache_from_before_its_log_probs_is_refused(tmp_path, tiny_model_dir, data_file):
    """Its shards hold raw router logits; resumed, the new shards would hold log-probs beside them
    (verify said ok, training failed naming an array). The manifest says which values it holds."""
    model = tiny_model_dir("qwen3_moe")
    manifest = run(model, data_file, tmp_path / "c", k=4, router="topk", shard_sequences=4)
    assert manifest.moe["router_topk_values"] == "logprobs"
    part = tmp_path / "c" / "parts" / "rank-000.json"
    record = json.loads(part.read_text())
    del record["moe"]["router_topk_values"]  # as written before it existed, then interrupted
    record.update(complete=False, shards=record["shards"][:1])
    part.write_text(json.dumps(record))
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"router_topk_values"):
        run(model, data_file, tmp_path / "c", k=4, router="topk", shard_sequences=4, resume=True)


def test_statistics_chunks_are_sized_by_memory_on_an_accelerator():
    """On a GPU a quarter-sequence chunk (the CPU's default, for its cache) made the statistics
    pass twice as slow (cuda_check.md); there chunks are 512 MiB of float32 per buffer whatever
    the call's rows (883 at V = 151,936), so a 1,023-position sequence is not cut in four."""
    import torch

    from geocache.precompute import _stats_chunk_rows
    from geocache.signals import compute_base_stats, default_chunk_rows

    assert _stats_chunk_rows(151_936, torch.device("cpu")) is None
    rows = _stats_chunk_rows(151_936, torch.device("cuda", 0))
    assert rows == 883 and rows * 151_936 * 4 <= 1 << 29
    assert rows > default_chunk_rows(151_936, "cuda", 1_023) == 256  # the default would have cut the sequence in four
    assert _stats_chunk_rows(1 << 31, torch.device("cuda")) == 1  # never zero rows
    # and the chunking changes no statistic, the tail samples included (drawn from each row's own
    # uniforms), so a cache built on a GPU this way holds what the CPU's chunks would have drawn
    logits = torch.randn(40, 300, generator=torch.Generator().manual_seed(0)) * 3
    a = compute_base_stats(logits, k=8, m=4, generator=torch.Generator().manual_seed(1))
    b = compute_base_stats(logits, k=8, m=4, generator=torch.Generator().manual_seed(1), chunk_size=40)
    assert a.sample_ids.shape == (40, 4)
    for name in ("lse", "entropy", "topk_ids", "topk_logprobs", "sample_ids", "sample_logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("fused_head", [True, False])
def test_one_statistics_call_per_group_of_sequences_caches_the_same_arrays(tmp_path, tiny_model_dir, data_file, monkeypatch, fused_head):
    """What an accelerator does (one compute_base_stats call over a projected group of sequences,
    each sequence's tail samples from its own generator's uniforms) caches exactly what one call
    per sequence does, tail samples included; a NaN base logit is still named by its sequence."""
    from geocache import precompute as pre

    model_dir = tiny_model_dir("qwen3_moe")
    run(model_dir, data_file, tmp_path / "per-sequence", k=8, m=4, batch_size=5, fused_head=fused_head)
    monkeypatch.setattr(pre._Run, "batch_statistics", True)
    calls = []
    real = pre.compute_base_stats
    monkeypatch.setattr(pre, "compute_base_stats", lambda *a, **kw: calls.append(kw.get("uniforms")) or real(*a, **kw))
    run(model_dir, data_file, tmp_path / "grouped", k=8, m=4, batch_size=5, fused_head=fused_head)
    assert calls and max(u.shape[0] for u in calls) > 48  # several sequences' rows in one call
    assert_same_rows(rows_of(tmp_path / "per-sequence"), rows_of(tmp_path / "grouped"))


def test_a_grouped_statistics_call_names_the_sequence_of_a_non_finite_logit():
    import types

    import torch

    from geocache.precompute import _Run

    run_ = types.SimpleNamespace(cfg=types.SimpleNamespace(k=4, m=2, seed=0, compile_stats=None), batch_statistics=True)
    source = torch.randn(7, 50)
    source[5, 3] = float("nan")  # the second sequence's third row
    with pytest.raises(ValueError, match=r"^sequence 11: base logits contain NaN or inf at rows \[2\]"):
        _Run._statistics(run_, source, None, [10, 11], [3, 4])
    source[5, 3] = 0.0
    grouped = _Run._statistics(run_, source, None, [10, 11], [3, 4])
    run_.batch_statistics = False
    alone = _Run._statistics(run_, source, None, [10, 11], [3, 4])
    assert [len(s.lse) for s in grouped] == [3, 4]
    for a, b in zip(grouped, alone):
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.topk_ids, b.topk_ids)


def test_compile_stats_caches_the_eager_arrays_to_rounding(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """--compile-stats (on CUDA by default; forced here, Inductor's C++ backend) caches the same
    top-k ids and tail samples as the eager pass and the same log-probs, lse and entropy to float
    rounding; the tokens and labels are untouched."""
    from geocache import compiled

    model_dir = tiny_model_dir("qwen3")
    run(model_dir, data_file, tmp_path / "eager", k=4, m=4, batch_size=5, compile_stats=False)
    calls = []
    real = compiled.run
    monkeypatch.setattr(compiled, "run", lambda feature, *a: calls.append(feature) or real(feature, *a))
    run(model_dir, data_file, tmp_path / "compiled", k=4, m=4, batch_size=5, compile_stats=True)
    assert calls and set(calls) == {"compile_stats"}
    eager, got = rows_of(tmp_path / "eager"), rows_of(tmp_path / "compiled")
    assert len(eager) == len(got) > 0
    for a, b in zip(eager, got):
        assert a.keys() == b.keys()
        for key in a:
            if a[key].is_floating_point():
                half = a[key].dtype == torch.float16  # stored log-probs: one float16 rounding apart at most
                torch.testing.assert_close(b[key], a[key], rtol=1e-3 if half else 0, atol=1e-6 if half else 2e-6, msg=key)
            else:
                assert torch.equal(a[key], b[key]), key
