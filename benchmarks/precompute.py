#!/usr/bin/env python
"""Precompute overhead: ``geocache.precompute.precompute`` against a bare base forward over exactly
the same padded batches, at three model shapes.

Shapes (random weights, fine for timing; models, tokenizers, data and caches go to a temporary
directory):

- ``tiny``: ``geocache.testing.tiny_config("qwen3", vocab_size=512)`` (3 layers, hidden 32) with a
  512-entry BPE tokenizer: per-sequence Python overhead dominates.
- ``qwen3-0.6b``: Qwen3-0.6B's shape: 28 layers, hidden 1024, intermediate 3072, 16 heads, 8 KV
  heads, head_dim 128, 151,936 output rows, tied embeddings (596M parameters).
- ``qwen3-0.6b-2l``: the same cut to 2 layers, where the vocabulary projection dominates.

The big shapes use a 4,096-entry BPE tokenizer (``geocache.testing.build_tokenizer``); the model's
151,936 output rows are all covered by the statistics. Data: the ``.py`` sources of ``json``,
``email`` and ``asyncio`` in ``--lines-per-example``-line examples, so nearly every sequence is
truncated to ``--max-length`` tokens.

Per shape and repetition, each step in a fresh subprocess (this script with ``--worker``):

1. **precompute**: ``precompute(PrecomputeConfig(model, data, out, backend=--backend, k=64, m=8,
   dtype="float32", batch_size=B, progress=False, data_config=DataConfig(max_length,
   max_sequences)), timings=...)``. ``timings`` gives ``forward_s`` (the model call: with the
   default ``fused_head`` the model stops at its last hidden states), ``statistics_s``
   (``compute_base_stats`` per sequence, which then projects the labelled rows through the output
   layer itself, plus the copies to host numpy records), ``write_s`` (the
   background writer thread: pack, zstd-encode, write, checksum, commit; it overlaps the main loop)
   and ``wall_s``. The benchmark also wraps, from the outside and without changing them, a few
   names the module looks up at call time: ``load_model_and_tokenizer`` (model load), ``_Run``'s
   constructor (load + fingerprints + manifest template), ``_Run.sequences`` (time spent producing
   the next tokenised sequence: dataset streaming and tokenisation), ``_flush`` (one batch: forward,
   statistics, record building, and handing the records to the writer) and ``ShardWriter``
   (``put`` blocking on a full queue, ``close`` waiting for the last shard, and the writer thread's
   own CPU time via ``time.thread_time``). A forward pre-hook records every batch shape.
2. **bare forward**: load the model once with ``geocache.models.load_model_and_tokenizer``; read
   the sequences back from that cache (``open_cache`` + ``collate_cache_rows`` with the tokenizer's
   pad id, same order, same batch size: identical padded shapes, checked against the hook's
   list); compute ``model_fingerprint(model)`` as precompute does before its first forward (it
   reads a strided sample of every weight tensor, which pages the memory-mapped weights in: without
   it the first bare batch was ~30% slower than the rest at the 2-layer cut); then time
   ``with torch.no_grad(): model(input_ids=..., attention_mask=..., use_cache=False)`` over all
   batches, ``--bare-passes`` times in the same process. **The reference is the fastest pass**
   (pass 1 is in the state precompute's single pass is in; later passes are warmer, so taking the
   minimum charges any remaining first-pass cost to precompute: conservative).

**The ratio** (target ≤ 1.05x at the 0.6B shape, ≤ 1.3x at the 2-layer cut):
``precompute main loop = Σ _flush + close wait`` (forward + statistics + record building + waits
on the writer; excludes model load, fingerprints, dataset streaming/tokenisation and the manifest
merge) divided by the bare forward (fastest pass). Also reported: ``(wall_s − model load) / bare``
(everything but the load), and ``forward_s / bare`` (is the forward itself slowed, e.g. by the
writer thread competing for the cores?). Minimum over ``--reps`` repetitions for every number.

Results go to ``benchmarks/results/precompute.{json,md,png}`` (``--replot`` re-renders the Markdown
and PNG from the JSON). ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import add_measurement_args, loadavg, provenance, provenance_markdown, spawn_measured, spawn_worker, write_corpus_jsonl  # noqa: E402

NAME = "precompute"
TARGETS = {"qwen3-0.6b": 1.05, "qwen3-0.6b-2l": 1.3}
QWEN3_06B = dict(
    num_hidden_layers=28,
    hidden_size=1024,
    intermediate_size=3072,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
SHAPES = ("tiny", "qwen3-0.6b", "qwen3-0.6b-2l")
DESCRIPTION = {
    "tiny": 'tiny_config("qwen3", vocab_size=512): 3 layers, hidden 32',
    "qwen3-0.6b": "Qwen3-0.6B shape: 28 layers, hidden 1024, 151,936 output rows, tied",
    "qwen3-0.6b-2l": "Qwen3-0.6B shape cut to 2 layers",
}


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def worker_build(p: dict) -> dict:
    """Save a random model of the shape and its tokenizer into p["out"]."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from geocache.testing import tiny_config

    tok = AutoTokenizer.from_pretrained(p["tokenizer"])
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    if p["shape"] == "tiny":
        config = tiny_config("qwen3", vocab_size=512, **ids)
    else:
        layers = 2 if p["shape"] == "qwen3-0.6b-2l" else QWEN3_06B["num_hidden_layers"]
        config = AutoConfig.for_model("qwen3", **{**QWEN3_06B, "num_hidden_layers": layers}, **ids)
    torch.manual_seed(p["seed"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(p["out"])
    tok.save_pretrained(p["out"])
    return {
        "shape": p["shape"],
        "parameters": sum(x.numel() for x in model.parameters()),
        "output_rows": int(model.get_output_embeddings().weight.shape[0]),
        "tokenizer_size": len(tok),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "build_s": time.perf_counter() - started,
    }


def worker_precompute(p: dict) -> dict:
    """One instrumented precompute; see the module docstring for what each wrapper measures."""
    import resource
    import threading

    import geocache.precompute as pre
    from geocache.data import DataConfig

    inst = {"load_s": 0.0, "run_init_s": 0.0, "data_s": 0.0, "flush_s": 0.0, "flushes": 0, "put_wait_s": 0.0,
            "close_wait_s": 0.0, "writer_cpu_s": 0.0, "writer_commits": 0}
    shapes: list = []
    fwd_started: list = []
    fwd_times: list = []
    fwd_ended: list = []
    rec_spans: list = []  # (entry, exit) of every _Run.records call

    orig_load = pre.load_model_and_tokenizer

    def timed_load(*a, **kw):
        t0 = time.perf_counter()
        out = orig_load(*a, **kw)
        inst["load_s"] += time.perf_counter() - t0
        return out

    orig_init = pre._Run.__init__

    def timed_init(self, *a, **kw):
        t0 = time.perf_counter()
        orig_init(self, *a, **kw)
        inst["run_init_s"] += time.perf_counter() - t0
        def pre_hook(mod, args, kwargs):
            shapes.append(list(kwargs["input_ids"].shape))
            fwd_started.append(time.perf_counter())

        def post_hook(mod, args, kwargs, output):
            fwd_ended.append(time.perf_counter())
            fwd_times.append(fwd_ended[-1] - fwd_started[-1])

        self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self.model.register_forward_hook(post_hook, with_kwargs=True)

    orig_sequences = pre._Run.sequences

    def timed_sequences(self, *args, **kwargs):
        it = orig_sequences(self, *args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                inst["data_s"] += time.perf_counter() - t0
                return
            inst["data_s"] += time.perf_counter() - t0
            yield item

    orig_records = pre._Run.records

    def timed_records(self, batch):
        t0 = time.perf_counter()
        out = orig_records(self, batch)  # returns after `out`/logits of the batch are released
        rec_spans.append((t0, time.perf_counter()))
        return out

    orig_flush = pre._flush

    def timed_flush(*a, **kw):
        t0 = time.perf_counter()
        out = orig_flush(*a, **kw)
        inst["flush_s"] += time.perf_counter() - t0
        inst["flushes"] += 1
        return out

    class TimedShardWriter(pre.ShardWriter):
        def put(self, record):
            t0 = time.perf_counter()
            super().put(record)
            inst["put_wait_s"] += time.perf_counter() - t0

        def close(self):
            t0 = time.perf_counter()
            super().close()
            inst["close_wait_s"] += time.perf_counter() - t0

        def _commit(self, records):
            assert threading.current_thread() is self._thread
            c0 = time.thread_time()
            super()._commit(records)
            inst["writer_cpu_s"] += time.thread_time() - c0
            inst["writer_commits"] += 1

    pre.load_model_and_tokenizer = timed_load
    pre._Run.__init__ = timed_init
    pre._Run.sequences = timed_sequences
    pre._flush = timed_flush
    pre._Run.records = timed_records
    pre.ShardWriter = TimedShardWriter

    cfg = pre.PrecomputeConfig(
        model=p["model"],
        data=[p["data"]],
        out=p["out"],
        backend=p["backend"],
        k=p["k"],
        m=p["m"],
        dtype="float32",
        batch_size=p["batch_size"],
        progress=False,
        overwrite=True,
        compile_stats=p.get("compile_stats"),
        data_config=DataConfig(max_length=p["max_length"], max_sequences=p["sequences"]),
    )
    import torch

    timings: dict = {}
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    manifest = pre.precompute(cfg, timings=timings)
    call_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    loop = inst["flush_s"] + inst["close_wait_s"]
    # Per batch: building the padded batch (records entry -> forward pre-hook) and everything after the
    # model call up to records' return (statistics_s, plus releasing the batch's output on return).
    inst["records_s"] = sum(b - a for a, b in rec_spans)
    inst["before_forward_s"] = sum(f - a for (a, _), f in zip(rec_spans, fwd_started))
    inst["after_forward_s"] = sum(b - e for (_, b), e in zip(rec_spans, fwd_ended))
    return {
        "shape": p["shape"],
        "timings": timings,
        "instrumentation": inst,
        "call_s": call_s,
        "main_loop_s": loop,
        "records_other_s": inst["flush_s"] - timings["forward_s"] - timings["statistics_s"] - inst["put_wait_s"],
        "release_after_statistics_s": inst["after_forward_s"] - timings["statistics_s"],
        "unaccounted_s": timings["wall_s"] - inst["run_init_s"] - inst["data_s"] - loop,
        "batch_shapes": shapes,
        "forward_per_batch_s": fwd_times,
        "counts": manifest.counts,
        "torch_threads": torch.get_num_threads(),
        "rusage": {"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt},
        "loadavg_after": loadavg(),
    }


def statistics_breakdown(model, cache, batch, p: dict, pad: int, reps: int = 3) -> dict:
    """On the first batch's real logits: compute_base_stats per sequence with host copies (what
    precompute does), once over all the batch's labelled rows, and a bare logsumexp over the same
    rows; min of ``reps`` each after one warm-up."""
    import numpy as np
    import torch

    from geocache.signals import compute_base_stats, labelled_positions

    ids, mask = batch
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    width, vocab = logits.shape[1], logits.shape[2]
    flat = logits.reshape(-1, vocab)
    n_rows = ids.shape[0]
    labels = [cache[i]["labels"] for i in range(n_rows)]
    per_seq_rows = [labelled_positions(lab.unsqueeze(0))[0] + b * width for b, lab in enumerate(labels)]
    all_rows = torch.cat(per_seq_rows)

    def per_sequence(compiled=False):
        for b, rows in enumerate(per_seq_rows):
            st = compute_base_stats(flat, k=p["k"], m=p["m"], rows=rows, generator=torch.Generator().manual_seed(b), compiled=compiled)
            st.lse.float().cpu().numpy(), st.entropy.float().cpu().numpy()
            st.topk_ids.cpu().numpy().astype(np.uint32), st.topk_logprobs.cpu().numpy().astype(np.float16)
            st.sample_ids.cpu().numpy().astype(np.uint32), st.sample_logprobs.cpu().numpy().astype(np.float16)

    variants = {
        "per_sequence_with_host_copies": per_sequence,
        # compile_stats: the same calls with the dense work as one torch.compile'd reduction (the
        # first call, which compiles, is the warm-up)
        "per_sequence_compiled": lambda: per_sequence(compiled=True),
        "once_over_batch_rows": lambda: compute_base_stats(flat, k=p["k"], m=p["m"], rows=all_rows, generator=torch.Generator().manual_seed(0)),
        "once_over_batch_rows_compiled": lambda: compute_base_stats(flat, k=p["k"], m=p["m"], rows=all_rows, generator=torch.Generator().manual_seed(0), compiled=True),
        "logsumexp_of_selected_rows": lambda: torch.logsumexp(flat.index_select(0, all_rows), -1),
        "logsumexp_all_rows": lambda: torch.logsumexp(flat, -1),
    }
    out = {"rows": int(all_rows.numel()), "logit_rows": int(flat.shape[0]), "vocab": int(vocab)}
    for name, fn in variants.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name + "_s"] = min(times)
    return out


def worker_bare(p: dict) -> dict:
    """Bare base forward over the cache's sequences, batched as precompute batched them."""
    import resource

    import torch

    from geocache.cache import collate_cache_rows, open_cache
    from geocache.models import load_model_and_tokenizer

    from geocache.models import model_fingerprint

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(p["model"], dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_fingerprint(model)  # what precompute does before its first forward (pages the weights in)
    fingerprint_s = time.perf_counter() - t0
    cache = open_cache(p["out"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(cache), p["batch_size"]):
        rows = [cache[i] for i in range(start, min(start + p["batch_size"], len(cache)))]
        b = collate_cache_rows(rows, pad_token_id=pad)
        batches.append((b["input_ids"], b["attention_mask"]))
    passes, rus = [], []
    for _ in range(p["passes"]):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        per_batch = []
        t0 = time.perf_counter()
        for ids, mask in batches:
            tb = time.perf_counter()
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            del out
            per_batch.append(time.perf_counter() - tb)
        passes.append({"s": time.perf_counter() - t0, "per_batch_s": per_batch})
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rus.append({"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt})
    stats = statistics_breakdown(model, cache, batches[0], p, pad) if p.get("stats_breakdown", True) else None
    return {
        "shape": p["shape"],
        "statistics_breakdown": stats,
        "load_s": load_s,
        "fingerprint_s": fingerprint_s,
        "batch_shapes": [list(ids.shape) for ids, _ in batches],
        "passes": passes,
        "rusage": rus,
        "torch_threads": torch.get_num_threads(),
        "loadavg_after": loadavg(),
    }


# ----------------------------------------------------------------------------------------------
# Summaries and reports
# ----------------------------------------------------------------------------------------------


def summarise(data: dict) -> list[dict]:
    """Per shape: min over repetitions of every component, and the ratios."""
    out = []
    for shape in data["config"]["shapes"]:
        pre = [r for r in data["precompute"] if r.get("shape") == shape and "error" not in r]
        bare = [r for r in data["bare"] if r.get("shape") == shape and "error" not in r]
        if not pre or not bare:
            out.append({"shape": shape, "error": "missing measurements"})
            continue
        bare1 = min(r["passes"][0]["s"] for r in bare)
        bare2 = min(r["passes"][-1]["s"] for r in bare)
        ref = min(x["s"] for r in bare for x in r["passes"])
        mn = lambda f: min(f(r) for r in pre)  # noqa: E731
        s = {
            "shape": shape,
            "reps": len(pre),
            "sequences": pre[0]["counts"]["sequences"],
            "tokens": pre[0]["counts"]["tokens"],
            "positions": pre[0]["counts"]["positions"],
            "batches": len(pre[0]["batch_shapes"]),
            "batch_shape": pre[0]["batch_shapes"][0],
            "shapes_identical": all(r["batch_shapes"] == bare[0]["batch_shapes"] for r in pre),
            "bare_pass1_s": bare1,
            "bare_pass2_s": bare2,
            "bare_ref_s": ref,
            "bare_max_s": max(x["s"] for r in bare for x in r["passes"]),
            "bare_load_s": min(r["load_s"] for r in bare),
            "forward_s": mn(lambda r: r["timings"]["forward_s"]),
            "statistics_s": mn(lambda r: r["timings"]["statistics_s"]),
            "write_s": mn(lambda r: r["timings"]["write_s"]),
            "writer_cpu_s": mn(lambda r: r["instrumentation"]["writer_cpu_s"]),
            "put_wait_s": mn(lambda r: r["instrumentation"]["put_wait_s"]),
            "close_wait_s": mn(lambda r: r["instrumentation"]["close_wait_s"]),
            "records_other_s": mn(lambda r: r["records_other_s"]),
            "before_forward_s": min((r["instrumentation"].get("before_forward_s") for r in pre), default=None, key=lambda v: v if v is not None else 1e9),
            "release_after_statistics_s": min((r.get("release_after_statistics_s") for r in pre), default=None, key=lambda v: v if v is not None else 1e9),
            "main_loop_s": mn(lambda r: r["main_loop_s"]),
            "wall_s": mn(lambda r: r["timings"]["wall_s"]),
            "load_s": mn(lambda r: r["instrumentation"]["load_s"]),
            "run_init_s": mn(lambda r: r["instrumentation"]["run_init_s"]),
            "data_s": mn(lambda r: r["instrumentation"]["data_s"]),
            "wall_minus_load_s": mn(lambda r: r["timings"]["wall_s"] - r["instrumentation"]["load_s"]),
            "other_cpu_s_max": max(r.get("other_cpu_s", 0.0) for r in pre + bare),
            "per_rep_ratio": [r["main_loop_s"] / ref for r in pre],
            "sys_s_precompute": mn(lambda r: r["rusage"]["sys_s"]),
            "sys_s_bare_pass1": min(r["rusage"][0]["sys_s"] for r in bare),
        }
        n = len(pre[0]["batch_shapes"])
        if all(len(r.get("forward_per_batch_s", [])) == n for r in pre):
            s["forward_per_batch_precompute_s"] = [min(r["forward_per_batch_s"][i] for r in pre) for i in range(n)]
            s["forward_per_batch_bare_s"] = [min(x["per_batch_s"][i] for r in bare for x in r["passes"]) for i in range(n)]
        s["statistics_breakdown"] = next((r["statistics_breakdown"] for r in bare if r.get("statistics_breakdown")), None)
        s["ratio"] = s["main_loop_s"] / ref
        s["ratio_vs_pass1"] = s["main_loop_s"] / bare1
        s["ratio_wall_minus_load"] = s["wall_minus_load_s"] / ref
        s["ratio_forward"] = s["forward_s"] / ref
        s["ratio_statistics"] = s["statistics_s"] / ref
        s["target"] = TARGETS.get(shape)
        s["verdict"] = None if s["target"] is None else ("PASS" if s["ratio"] <= s["target"] else "FAIL")
        out.append(s)
    return out


def analysis(summary: list[dict]) -> list[str]:
    """Where the time above the bare forward goes, in numbers."""
    lines = []
    for s in summary:
        if "error" in s:
            continue
        extra = s["main_loop_s"] - s["bare_ref_s"]
        parts = {
            # With the fused head the projection moved from the model call into the statistics pass:
            # only their sum compares with the bare forward.
            f"model call ({s['forward_s']:.2f} s) + statistics pass with host copies ({s['statistics_s']:.2f} s) over bare":
                s["forward_s"] + s["statistics_s"] - s["bare_ref_s"],
            "record building / batch padding": s["records_other_s"],
            "waiting on the writer (put + close)": s["put_wait_s"] + s["close_wait_s"],
        }
        body = ", ".join(f"{k} {v:+.2f} s ({v / s['bare_ref_s']:+.1%})" for k, v in parts.items())
        verdict = f" — target ≤ {s['target']}x: **{s['verdict']}**" if s["target"] else ""
        if s["verdict"] == "FAIL":
            verdict += f", missed by {s['ratio'] - s['target']:.2f}x ({(s['ratio'] / s['target'] - 1):.1%} over)"
        lines.append(
            f"- **{s['shape']}**: main loop {s['main_loop_s']:.2f} s vs bare forward {s['bare_ref_s']:.2f} s = "
            f"{s['ratio']:.3f}x{verdict}. Extra {extra:+.2f} s = {body} (components are minima over repetitions, so they "
            f"need not add up exactly). The writer thread used {s['writer_cpu_s']:.2f} CPU-s ({s['write_s']:.2f} s wall) "
            f"beside the main loop on {os.cpu_count()} cores."
        )
    return lines


def notes(summary: list[dict]) -> list[str]:
    """Readings of the split measurements (forward per batch, statistics breakdown)."""
    out = []
    for s in summary:
        if "error" in s:
            continue
        pre, bare = s.get("forward_per_batch_precompute_s"), s.get("forward_per_batch_bare_s")
        if pre and bare:
            first = pre[0] / bare[0]
            rest = sum(pre[1:]) / max(sum(bare[1:]), 1e-12) if len(pre) > 1 else None
            out.append(
                f"- **{s['shape']}, forward**: precompute's model calls took {sum(pre):.2f} s against {sum(bare):.2f} s for the "
                f"fastest bare call per batch ({sum(pre) / sum(bare):.3f}x; first batch {first:.3f}x"
                + (f", the others {rest:.3f}x" if rest else "")
                + ")."
            )
            if s.get("release_after_statistics_s") is not None:
                out[-1] += (
                    f" *records/padding* ({s['records_other_s']:.2f} s) splits into building the padded batch before the model "
                    f"call ({s['before_forward_s']:.2f} s) and the time from the end of `statistics_s` to `records` returning "
                    f"({s['release_after_statistics_s']:.2f} s: releasing the batch's output (its last hidden states, with "
                    "the fused head) and the statistics' buffers)."
                )
        b = s.get("statistics_breakdown")
        if b:
            ps, once, lse = b["per_sequence_with_host_copies_s"], b["once_over_batch_rows_s"], b["logsumexp_all_rows_s"]
            out.append(
                f"- **{s['shape']}, statistics**: {ps / b['rows'] * 1e3:.3f} ms per labelled row at V = {b['vocab']:,} as precompute "
                f"calls it (per sequence, with host copies) = {ps / lse:.2f}x a bare `logsumexp` over all the batch's logit rows; one call over "
                f"the whole batch would take {once / ps:.2f}x of that. In the run, `statistics_s` was {s['statistics_s']:.2f} s = "
                f"{s['statistics_s'] / s['bare_ref_s']:.1%} of the bare forward."
            )
    for s in summary:
        if s.get("verdict") == "FAIL":
            stat_share = s["statistics_s"] / s["bare_ref_s"]
            out.append(
                f"- **Why {s['shape']} misses ≤ {s['target']}x**: the statistics pass alone is {stat_share:.1%} of the bare forward "
                f"(the target leaves {s['target'] - 1:.0%} for everything); the model calls themselves came out "
                f"{s['forward_s'] / s['bare_ref_s'] - 1:+.1%} against the fastest bare pass (bare passes ranged "
                f"{s['bare_ref_s']:.2f}-{s.get('bare_max_s', s['bare_pass2_s']):.2f} s, so part of this is run-to-run spread); "
                f"record building + freeing the logits {s['records_other_s'] / s['bare_ref_s']:.1%}; the writer "
                f"{(s['put_wait_s'] + s['close_wait_s']) / s['bare_ref_s']:.1%} (it does not compete for the cores here: "
                f"{s['writer_cpu_s']:.2f} CPU-s in all)."
            )
            b = s.get("statistics_breakdown")
            if b:
                floor = b["logsumexp_all_rows_s"] * s["batches"] / s["bare_ref_s"]
                out[-1] += (
                    f" A bare `logsumexp` over the batch's logits, about the least any pass reading every float32 logit once can "
                    f"cost, is already ~{floor:.1%} of the forward here (first batch's {b['logsumexp_all_rows_s'] * 1e3:.0f} ms × "
                    f"{s['batches']} batches), so on this CPU ≤ {s['target']}x needs the statistics to overlap the forward "
                    "(another thread/stream, or on the accelerator), not only to be cheaper."
                )
    return out


def write_markdown(path: Path, data: dict) -> None:
    cfg, prov = data["config"], data["provenance"]
    summary = data["summary"]
    models = {m["shape"]: m for m in data["models"] if "error" not in m}
    lines = [
        "# Precompute overhead vs a bare base forward",
        "",
        f"Generated by `benchmarks/precompute.py` on {prov['date_utc']} in {data['total_runtime_s']:.0f} s.",
        "",
        f"**What and how.** `precompute(PrecomputeConfig(..., backend=\"{cfg.get('backend', 'zarr')}\", k={cfg['k']}, m={cfg['m']}, dtype=\"float32\", "
        f"batch_size=B, progress=False, data_config=DataConfig(max_length={cfg['max_length']}, max_sequences=N)))` on random "
        "models of three shapes, in a fresh subprocess per run; then, in another fresh subprocess, the model loaded once with "
        "`load_model_and_tokenizer` and `model(input_ids, attention_mask, use_cache=False)` under `no_grad` timed over exactly "
        "the padded batches precompute formed (read back from its cache with `open_cache` + `collate_cache_rows`, same order "
        "and batch size; shapes checked against a forward pre-hook inside precompute), after `model_fingerprint(model)` as "
        "precompute does (it pages the memory-mapped weights in). The reference is the fastest bare pass (pass 1 matches "
        "precompute's state; pass 2 is warmer, so the minimum charges any first-pass cost to precompute). Data: the standard-library sources of "
        f"json, email, asyncio in {cfg['lines_per_example']}-line examples. Every number is the minimum over {cfg['reps']} "
        "repetitions (precompute and bare forward interleaved). Every measurement is rerun (up to "
        f"{cfg.get('retries', 0)} times) when other processes took more than {cfg.get('max_other_share', 1):.0%} of the machine's CPU "
        "while it ran; the cleanest attempt is kept.",
        "",
        "**What each number includes.**",
        "",
        "- *bare forward*: the model calls only, summed over the batches (no data loading, no statistics).",
        "- *forward_s*: precompute's timer around its model call (same call, plus `output_router_logits=False`; with the default "
        "`fused_head` a hook hands the output projection an empty slice, so the model stops at its last hidden states).",
        "- *statistics_s*: precompute's timer from the end of the forward to the end of the batch's records: "
        "`compute_base_stats` per sequence (with `fused_head`, including the output projection of the labelled rows, 256 per "
        "matrix product) and the copies of its results into numpy records. *forward_s + statistics_s* is the comparable sum.",
        "- *records/padding*: the rest of `_flush` = Σ`_flush` − forward_s − statistics_s − put waits: building the padded "
        "id/mask tensors before the model call, releasing the batch's output (the logits) and the statistics' buffers when "
        "`records` returns, and the progress bar (split in the readings below).",
        "- *writer waits*: time the main thread blocked in `ShardWriter.put` (queue full) and in `close` (last shard).",
        "- *main loop* = Σ`_flush` + close wait = forward_s + statistics_s + records/padding + writer waits. Excludes model "
        "load, fingerprints, dataset streaming + tokenisation (*data*) and the manifest merge. **ratio = main loop / bare forward.**",
        "- *write_s*: the writer thread's wall time (pack, zstd + crc32c encode, write, checksum, commit); it runs beside the "
        "main loop, so it is not added; *writer CPU* is that thread's CPU time, which the forward and statistics lose on a 2-core machine.",
        "- *wall − load*: `timings['wall_s']` minus the model load: everything else, data and fingerprints included.",
        "",
        *provenance_markdown(prov, data["loadavg_at_end"]),
        "",
        "## Shapes",
        "",
        "| shape | parameters | output rows | tokenizer | sequences × max tokens | batch | batches (padded shape) | tokens | labelled positions |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for s in summary:
        if "error" in s:
            continue
        m = models.get(s["shape"], {})
        lines.append(
            f"| {s['shape']} ({DESCRIPTION[s['shape']]}) | {m.get('parameters', 0) / 1e6:,.1f}M | {m.get('output_rows', 0):,} | "
            f"{m.get('tokenizer_size', 0):,} | {s['sequences']} × {cfg['max_length']} | {cfg['batch'][s['shape']]} | "
            f"{s['batches']} ({'×'.join(map(str, s['batch_shape']))}; identical in both: {s['shapes_identical']}) | {s['tokens']:,} | {s['positions']:,} |"
        )
    lines += [
        "",
        "## Results (seconds; min over repetitions)",
        "",
        "| shape | bare forward pass 1 | pass 2 | **bare (ref = min)** | forward_s | statistics_s | records/padding | writer waits (put + close) | **main loop** | **ratio** | target | verdict | per-rep ratios | write_s (overlaps) | writer CPU | wall − load | (wall − load) / bare | forward_s / bare | load | data | other CPU (max, s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        if "error" in s:
            lines.append(f"| {s['shape']} | error: {s['error']} |" + " |" * 20)
            continue
        lines.append(
            f"| {s['shape']} | {s['bare_pass1_s']:.3f} | {s['bare_pass2_s']:.3f} | **{s['bare_ref_s']:.3f}** | {s['forward_s']:.3f} | {s['statistics_s']:.3f} | "
            f"{s['records_other_s']:.3f} | {s['put_wait_s']:.3f} + {s['close_wait_s']:.3f} | **{s['main_loop_s']:.3f}** | "
            f"**{s['ratio']:.3f}x** ({s['ratio_vs_pass1']:.3f}x vs pass 1) | {('≤ %gx' % s['target']) if s['target'] else '—'} | {s['verdict'] or '—'} | "
            f"{', '.join(f'{x:.3f}' for x in s['per_rep_ratio'])} | {s['write_s']:.3f} | {s['writer_cpu_s']:.3f} | "
            f"{s['wall_minus_load_s']:.2f} | {s['ratio_wall_minus_load']:.2f}x | {s['ratio_forward']:.3f}x | {s['load_s']:.2f} | "
            f"{s['data_s']:.2f} | {s['other_cpu_s_max']:.1f} |"
        )
    lines += ["", "## Where the time above the bare forward goes", "", *analysis(summary), ""]
    per_batch = [s for s in summary if s.get("forward_per_batch_precompute_s")]
    if per_batch:
        lines += [
            "### Forward per batch (s): precompute (min over repetitions) vs bare (min over passes and repetitions)",
            "",
            "Precompute's forward per batch is timed by forward hooks on the model (pre-hook to hook), so it excludes "
            "precompute's own padding and the `_sync`; the bare one is the timed model call.",
            "",
            "| shape | batch | precompute forward | bare forward | precompute / bare |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in per_batch:
            for i, (a, b) in enumerate(zip(s["forward_per_batch_precompute_s"], s["forward_per_batch_bare_s"])):
                lines.append(f"| {s['shape']} | {i} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
        lines.append("")
    breakdown = [s for s in summary if s.get("statistics_breakdown")]
    if breakdown:
        lines += [
            "### The statistics pass on one batch's real logits (ms, min of 3 after a warm-up, in the bare-forward process)",
            "",
            "*per sequence* = what precompute does: `compute_base_stats(logits, k, m, rows=<that sequence's labelled rows>)` "
            "once per sequence, then the copies to numpy; *once* = one call over all the batch's labelled rows; the two "
            "`logsumexp` columns are one plain reduction over the same rows (after `index_select`) and over all logit rows "
            "(padding included, no copy: about the floor for any pass that reads every logit once; the `index_select` copy of "
            "the selected rows into fresh memory makes the other slower). *compiled* = the same calls with `compiled=True` "
            "(`compile_stats`: the reduction as one torch.compile'd kernel); where k·32 ≥ V/2 (the tiny shape) the blocks do not "
            "apply and it is the eager pass.",
            "",
            "| shape | labelled rows / logit rows | vocab | per sequence + host copies | once over the batch | logsumexp (selected rows) | logsumexp (all rows) | per sequence / logsumexp (all rows) | per sequence / once | ms per row (per sequence) | per sequence, compiled | once, compiled | compiled / eager (per sequence, once) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in breakdown:
            b = s["statistics_breakdown"]
            ps, once, lse, lse_all = (b[k] for k in ("per_sequence_with_host_copies_s", "once_over_batch_rows_s", "logsumexp_of_selected_rows_s", "logsumexp_all_rows_s"))
            psc, oncec = b.get("per_sequence_compiled_s"), b.get("once_over_batch_rows_compiled_s")  # absent before compile_stats
            compiled_cols = (f"{psc * 1e3:.1f} | {oncec * 1e3:.1f} | {psc / ps:.2f}x, {oncec / once:.2f}x" if psc else "— | — | —")
            lines.append(
                f"| {s['shape']} | {b['rows']:,} / {b['logit_rows']:,} | {b['vocab']:,} | {ps * 1e3:.1f} | {once * 1e3:.1f} | {lse * 1e3:.1f} | "
                f"{lse_all * 1e3:.1f} | {ps / lse_all:.2f}x | {ps / once:.2f}x | {ps / b['rows'] * 1e3:.3f} | {compiled_cols} |"
            )
        lines.append("")
    lines += ["### Readings", "", *notes(summary)]
    lines += ["", f"Raw numbers (every repetition, per-batch bare times, rusage): `{NAME}.json`; plot: `{NAME}.png`.", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, data: dict) -> None:
    """One panel per shape (own y scale): bare forward, precompute's stacked main loop, the writer thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in data["summary"] if "error" not in s]
    if not summary:
        return
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 5.6), squeeze=False)
    colors = {"forward": "#4c72b0", "statistics": "#dd8452", "records": "#8172b2", "waits": "#c44e52", "bare": "#55a868", "write": "#937860"}
    for ax, s in zip(axes[0], summary):
        b = s["bare_ref_s"]
        ax.bar(0, b, 0.6, color=colors["bare"], label="bare forward (fastest pass)")
        ax.text(0, b, f"{b:.2f} s", ha="center", va="bottom", fontsize=8)
        bottom = 0.0
        for key, val, label in (
            ("forward", s["forward_s"], "precompute forward_s"),
            ("statistics", s["statistics_s"], "statistics_s"),
            ("records", max(s["records_other_s"], 0.0), "records / padding"),
            ("waits", s["put_wait_s"] + s["close_wait_s"], "waits on writer (put + close)"),
        ):
            ax.bar(1, val, 0.6, bottom=bottom, color=colors[key], label=label)
            bottom += val
        ax.text(1, bottom, f"{s['main_loop_s']:.2f} s\n= {s['ratio']:.3f}x", ha="center", va="bottom", fontsize=8)
        ax.bar(2, s["write_s"], 0.6, color=colors["write"], hatch="//", alpha=0.8, label="write_s: writer thread (overlaps)")
        ax.text(2, s["write_s"], f"{s['write_s']:.2f} s", ha="center", va="bottom", fontsize=8)
        if s["target"]:
            ax.axhline(s["target"] * b, color="k", ls="--", lw=1, label=f"target ≤ {s['target']}x bare")
        ax.set_xticks([0, 1, 2], ["bare\nforward", "precompute\nmain loop", "writer\nthread"])
        ax.set_ylim(0, max(bottom, b * (s["target"] or 1)) * 1.7)  # head room for the legend
        ax.set_ylabel("seconds")
        ax.set_title(f"{s['shape']}: {s['batches']} batches of {'×'.join(map(str, s['batch_shape']))}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Precompute (zarr, k={data['config']['k']}, m={data['config']['m']}, float32) vs bare forward, same batches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Precompute wall time vs a bare base forward over the same batches, at three model shapes. "
        "Writes precompute.{json,md,png}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--backend", default="arrow", choices=["arrow", "zarr"], help="cache backend (arrow: PrecomputeConfig's default)")
    ap.add_argument("--k", type=int, default=64, help="top-k")
    ap.add_argument("--m", type=int, default=8, help="tail samples")
    ap.add_argument("--compile-stats", choices=["default", "on", "off"], default="default",
                    help="precompute's compile_stats (default: its own, on CUDA with Triton, off elsewhere)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sequence (DataConfig.max_length)")
    ap.add_argument("--lines-per-example", type=int, default=60, help="source lines per JSONL example (long enough to fill max_length)")
    ap.add_argument("--tiny-sequences", type=int, default=128)
    ap.add_argument("--tiny-batch", type=int, default=8)
    ap.add_argument("--big-sequences", type=int, default=16, help="sequences at the 0.6B shape")
    ap.add_argument("--big-batch", type=int, default=4)
    ap.add_argument("--cut-sequences", type=int, default=32, help="sequences at the 2-layer cut")
    ap.add_argument("--cut-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of precompute and of the bare forward (min reported)")
    ap.add_argument("--bare-passes", type=int, default=2, help="timed passes of the bare forward per process (pass 1 is the reference)")
    ap.add_argument("--seed", type=int, default=0)
    add_measurement_args(ap)
    ap.add_argument("--work-dir", type=Path, default=None, help="where models, data and caches go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help=f"where {NAME}.{{json,md,png}} go")
    ap.add_argument("--replot", action="store_true", help=f"only re-render {NAME}.md and .png from {NAME}.json in --out-dir")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        params = json.loads(args.worker)
        fn = {"build": worker_build, "precompute": worker_precompute, "bare": worker_bare}[params["task"]]
        print(json.dumps(fn(params)), flush=True)
        return
    out = Path(args.out_dir)
    if args.replot:
        data = json.loads((out / f"{NAME}.json").read_text())
        data["summary"] = summarise(data)
        write_markdown(out / f"{NAME}.md", data)
        write_plot(out / f"{NAME}.png", data)
        print(f"re-rendered {out / f'{NAME}.md'} and {out / f'{NAME}.png'} from {out / f'{NAME}.json'}")
        return

    started = time.perf_counter()
    prov = provenance()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    config["batch"] = {"tiny": args.tiny_batch, "qwen3-0.6b": args.big_batch, "qwen3-0.6b-2l": args.cut_batch}
    config["sequences"] = {"tiny": args.tiny_sequences, "qwen3-0.6b": args.big_sequences, "qwen3-0.6b-2l": args.cut_sequences}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="geocache-precompute-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    script = Path(__file__).resolve()
    models, pre_runs, bare_runs, idle_log = [], [], [], []

    def measured(params: dict, label: str) -> dict:
        r, attempts = spawn_measured(script, params, args.worker_timeout, max_busy=args.max_busy, idle_timeout=args.idle_timeout,
                                     max_other_share=args.max_other_share, retries=args.retries, label=label)
        idle_log.extend(attempts)
        return r
    try:
        from geocache.testing import build_tokenizer

        data_path = work / "data.jsonl"
        corpus = write_corpus_jsonl(data_path, args.lines_per_example)
        build_tokenizer(work / "tok-512", vocab_size=512)
        build_tokenizer(work / "tok-4096", vocab_size=4096)
        for shape in args.shapes:
            model_dir = work / f"model-{shape}"
            tok = work / ("tok-512" if shape == "tiny" else "tok-4096")
            m = spawn_worker(script, {"task": "build", "shape": shape, "tokenizer": str(tok), "out": str(model_dir), "seed": args.seed}, args.worker_timeout)
            models.append(m if "error" not in m else {**m, "shape": shape})
            if "error" in m:
                print(f"[build] {shape}: ERROR {m['error']}\n{m.get('stderr_tail', '')}", flush=True)
                continue
            print(f"[build] {shape}: {m['parameters'] / 1e6:.1f}M parameters, {m['output_rows']:,} output rows ({m['build_s']:.0f} s)", flush=True)
            common = {"shape": shape, "model": str(model_dir), "out": str(work / f"cache-{shape}"), "batch_size": config["batch"][shape]}
            for rep in range(args.reps):
                r = measured({"task": "precompute", "data": str(data_path), "backend": args.backend, "k": args.k, "m": args.m,
                              "compile_stats": {"default": None, "on": True, "off": False}[args.compile_stats],
                              "max_length": args.max_length, "sequences": config["sequences"][shape], **common}, f"precompute {shape} rep {rep}")
                pre_runs.append(r if "error" not in r else {**r, "shape": shape})
                if "error" in r:
                    print(f"[precompute] {shape}: ERROR {r['error']}\n{r.get('stderr_tail', '')}", flush=True)
                    break
                t, i = r["timings"], r["instrumentation"]
                print(f"[precompute] {shape} rep {rep}: wall {t['wall_s']:.2f} s, load {i['load_s']:.2f}, data {i['data_s']:.2f}, "
                      f"forward {t['forward_s']:.2f}, statistics {t['statistics_s']:.2f}, write {t['write_s']:.2f} "
                      f"(writer CPU {i['writer_cpu_s']:.2f}), main loop {r['main_loop_s']:.2f}, other CPU {r['other_cpu_s']:.1f} s", flush=True)
                b = measured({"task": "bare", "passes": args.bare_passes, "k": args.k, "m": args.m, "stats_breakdown": rep == 0, **common},
                             f"bare {shape} rep {rep}")
                bare_runs.append(b if "error" not in b else {**b, "shape": shape})
                if "error" in b:
                    print(f"[bare] {shape}: ERROR {b['error']}\n{b.get('stderr_tail', '')}", flush=True)
                    break
                passes = ", ".join(f"{x['s']:.2f}" for x in b["passes"])
                print(f"[bare] {shape} rep {rep}: passes {passes} s -> ratio "
                      f"{r['main_loop_s'] / b['passes'][0]['s']:.3f}x, other CPU {b['other_cpu_s']:.1f} s", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)  # the 0.6B model is 2.4 GB
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    data = {
        "provenance": prov,
        "config": config,
        "targets": TARGETS,
        "corpus": corpus,
        "models": models,
        "precompute": pre_runs,
        "bare": bare_runs,
        "measurement_attempts": idle_log,
    }
    data["summary"] = summarise(data)
    data["total_runtime_s"] = time.perf_counter() - started
    data["loadavg_at_end"] = loadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(out / f"{NAME}.md", data)
    write_plot(out / f"{NAME}.png", data)
    for line in analysis(data["summary"]) + notes(data["summary"]):
        print(line)
    print(f"wrote {out / f'{NAME}.json'}, {out / f'{NAME}.md'}, {out / f'{NAME}.png'} in {data['total_runtime_s']:.0f} s")
    failed = [s["shape"] for s in data["summary"] if "error" in s]
    if failed:  # the report keeps what was measured; the exit status says that something was not
        sys.exit(f"no measurement for {', '.join(failed)}: see the [precompute]/[bare] ERROR lines above")


if __name__ == "__main__":
    main()
