#!/usr/bin/env python
"""Cache storage: Zarr vs Arrow backends: bytes per token, write speed, and shuffled random-access
read speed against a plain sequential read of the same bytes.

Setup (everything generated into a temporary directory, never into the repository):

- Data: the ``.py`` files of the standard-library packages ``json``, ``email`` and ``asyncio``, cut
  into examples of ``--lines-per-example`` lines, one JSONL ``{"text": ...}`` row each; precompute
  keeps the first ``--sequences`` of them at ``max_length`` ``--max-length`` (default: 448
  sequences, ~92k tokens, 2 shards of 256 sequences).
- Tokenizer: ``geocache.testing.build_tokenizer`` (byte-level BPE, ``--tokenizer-vocab`` entries).
- Model: a random qwen3-shaped model (``--layers`` layers, hidden ``--hidden``) whose output
  projection has ``--vocab`` rows, more than the tokenizer has: the cached statistics cover all of
  them, so top-k picks among 32,768 candidates. Freshly initialised weights give near-uniform
  logits (std ~0.16): sorted float16 log-probs of a near-uniform distribution compress far better
  than a real model's, so the output projection is rescaled so the logits' standard deviation on
  the corpus is ``--logit-std`` (default 3; the resulting mean entropy is reported).
- Optional MoE variant (``--moe-experts``; 0 to skip): a 2-layer qwen3_moe model of the same
  shape, built at k = ``--moe-k`` with ``router=full`` and ``router=topk``, to report router
  bytes/token apart from the LM statistics.

Per (backend, k), each step in a fresh subprocess (this script with the hidden ``--worker`` flag):

(a) **Build** with the real ``geocache.precompute.precompute(PrecomputeConfig(..., backend, k,
    m=--m, progress=False, data_config=DataConfig(max_length, max_sequences)), timings=...)``.
    Bytes/token from ``geocache.cache.inspect.summarize`` ("lm", "router", "token data" bytes per
    token: Zarr by file sizes, Arrow split in proportion to the arrays' in-memory sizes), plus the
    shards' bytes (manifest) and the whole directory (manifest and parts included) per token.
(b) **Write MB/s** = the shards' stored bytes / ``timings["write_s"]`` (seconds the background
    writer thread spent packing, encoding, writing, checksumming and committing shards).
(c) **Shuffled read**: ``DataLoader(open_cache(path), batch_size=--batch-size, shuffle=True,
    num_workers=w, collate_fn=collate_cache_rows)`` for w in ``--workers``: one warm-up epoch, then
    timed epochs (each from ``iter(loader)`` to the last batch, so worker start-up, which with the
    default ``persistent_workers=False`` happens every epoch, is included) until ``--min-read-s``
    seconds have passed. tokens/s = the cache's tokens / mean epoch seconds. A fresh
    ``open_cache`` per w.
(c') **Batch-size sweep** (diagnostic): the same 0-worker shuffled read at each of
    ``--sweep-batch-sizes``, against the same limit. A least-squares line through the time per
    batch against the rows it holds splits the shuffled read into a cost per batch and a cost per
    row; however large the batch, the ratio to the limit cannot exceed (limit's time per row) /
    (cost per row).
(d) **Plain sequential read of the same bytes**: every file under the cache directory read in
    sorted order, warm page cache (one untimed pass first), min of ``--plain-reps``, two ways:
    ``open(f, "rb").read()`` (a new bytes object per file) and ``readinto`` through one reused
    8 MiB buffer. ``read()`` of a file above glibc's largest mmap threshold (32 MiB: the Arrow
    shards at k=256) gets fresh pages from the kernel every time and pays a page fault per 4 KiB
    (the minor faults are recorded), so it can be several times slower than the bytes need; the
    faster of the two is taken as **the limit**. tokens/s = tokens / seconds.
    Ratio = shuffled / limit per (backend, k, workers) (the ratio to ``read()`` is reported beside
    it); target ``>= 0.3``. An extra diagnostic row per cache uses ``persistent_workers=True`` (worker
    start-up and checksums paid in the warm-up epoch only).

Diagnostics in the read worker (0 workers, warm), streamed one batch at a time in random order:
``cache.__getitems__`` for the batch's rows (what ``DataLoader`` calls), ``collate_cache_rows``,
and ``collate_cache_rows(rows, shared=True)`` (what a DataLoader worker does: the batch collated
into one shared-memory buffer, sent as one segment), each timed apart; ``shard_checksum`` of every shard (done once per
cache: the reader keeps its "verified" flags in shared memory); and the mean time of one row's
slice of each array through the backend's ``ShardView``.

Before every subprocess the script waits (up to ``--idle-timeout`` s) until other processes use
at most ``--max-busy`` of the machine; every measurement records the CPU seconds other processes
used while it ran (``/proc/stat`` busy time minus this benchmark's own).

Reference points (published, not measured here): DistillKit stores ~300 bytes/token at k=128 (16
exact log-probs + a fitted tail) and ~114 bytes/token at k=50.

Results go to ``benchmarks/results/storage.{json,md,png}`` with the command line, machine and
versions (``--replot`` re-renders the Markdown and PNG from the JSON). ``--help`` for the options.
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

from _common import (  # noqa: E402
    add_measurement_args,
    MB,
    dir_bytes,
    fmt,
    loadavg,
    provenance,
    provenance_markdown,
    spawn_measured,
    write_corpus_jsonl,
)

NAME = "storage"
TARGET_RATIO = 0.3
# Published reference points: (k, bytes/token, label).
DISTILLKIT = [(128, 300.0, "DistillKit k=128 (16 exact + fitted tail)"), (50, 114.0, "DistillKit k=50")]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _sample_batch(tokenizer, data_path: Path, n: int, max_length: int):
    import torch

    texts = [json.loads(line)["text"] for _, line in zip(range(n), open(data_path))]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].to(torch.long)


def build_model(out_dir: Path, tok_dir: Path, data_path: Path, args, moe: bool) -> dict:
    """Random qwen3 (or qwen3_moe) model with ``--vocab`` output rows; logits rescaled to ``--logit-std``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from geocache.testing import tiny_config

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        max_position_embeddings=max(512, args.max_length),
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    if moe:
        config = tiny_config(
            "qwen3_moe",
            vocab_size=args.vocab,
            num_experts=args.moe_experts,
            num_experts_per_tok=args.moe_top_k,
            moe_intermediate_size=max(8, args.hidden // 2),
            decoder_sparse_step=1,
            **shape,
        )
    else:
        config = tiny_config("qwen3", vocab_size=args.vocab, **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = _sample_batch(tok, data_path, 16, args.max_length)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        std0 = float(logits.std())
        scale = args.logit_std / std0 if args.logit_std > 0 else 1.0
        model.get_output_embeddings().weight.mul_(scale)
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()
        logp = logits.log_softmax(-1)
        entropy = float(-(logp.exp() * logp).sum(-1).mean())
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return {
        "path": str(out_dir),
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "output_rows": args.vocab,
        "tokenizer_size": len(tok),
        "logit_std_initial": std0,
        "logit_scale": scale,
        "logit_std": float(logits.std()),
        "mean_entropy_nats_sample": entropy,
        **({"num_experts": args.moe_experts, "top_k": args.moe_top_k} if moe else {}),
    }


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def raw_lm_bytes_per_position(k: int, m: int, id_bytes: int = 2) -> int:
    """Uncompressed LM statistics per labelled position: lse + entropy (float32), k and m (id, float16)."""
    return 4 + 4 + k * (id_bytes + 2) + m * (id_bytes + 2)


def worker_build(p: dict) -> dict:
    import resource

    from geocache.cache.inspect import summarize
    from geocache.cache.reader import read_manifest, _fs
    from geocache.data import DataConfig
    from geocache.precompute import PrecomputeConfig, precompute

    out = p["out"]
    if os.path.exists(out):
        shutil.rmtree(out)
    cfg = PrecomputeConfig(
        model=p["model"],
        data=[p["data"]],
        out=out,
        backend=p["backend"],
        k=p["k"],
        m=p["m"],
        router=p.get("router", "auto"),
        batch_size=p["precompute_batch_size"],
        shard_sequences=p["shard_sequences"],
        progress=False,
        data_config=DataConfig(max_length=p["max_length"], max_sequences=p["sequences"], packing=p.get("packing", False)),
    )
    timings: dict = {}
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    precompute(cfg, timings=timings)
    elapsed = time.perf_counter() - started
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = summarize(out)
    fs, root = _fs(out)
    manifest = read_manifest(fs, root)
    total, n_files = dir_bytes(Path(out))
    # Mean entropy of the cached positions (how peaked the base distribution is).
    from geocache.cache import open_cache

    cache = open_cache(out, verify=False)
    ent_sum = ent_n = 0.0
    for i in range(0, len(cache), max(1, len(cache) // 32)):
        e = cache[i]["entropy"]
        ent_sum, ent_n = ent_sum + float(e.sum()), ent_n + e.numel()
    return {
        "backend": p["backend"],
        "k": p["k"],
        "m": p["m"],
        "router": p.get("router", "auto"),
        "moe": manifest.moe,
        "timings": timings,
        "precompute_call_s": elapsed,
        "rusage": {
            "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt,
        },
        "summary": summary,
        "counts": manifest.counts,
        "shards": len(manifest.shards),
        "shard_bytes": sum(s.bytes for s in manifest.shards),
        "dir_bytes": total,
        "dir_files": n_files,
        "id_dtype": manifest.statistics["id_dtype"],
        "mean_entropy_nats": ent_sum / max(ent_n, 1),
    }


def _plain_read(files: list[str]) -> int:
    """Every file whole into memory with ``open().read()`` (a new bytes object per file)."""
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            total += len(fh.read())
    return total


def _plain_readinto(files: list[str], buf: bytearray) -> int:
    """Every file sequentially through one reused buffer (no fresh allocation per file)."""
    total, view = 0, memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def plain_read_by_size(work: Path, sizes_mb: list[int], reps: int) -> list[dict]:
    """The plain read's speed against file size: files of random bytes, read like the limit (one
    reused 8 MiB buffer, warm page cache, min of ``reps``), to see whether a cache smaller than the
    CPU's caches makes the limit look faster than a real one would."""
    out = []
    buf = bytearray(8 << 20)
    for mb in sizes_mb:
        path = work / f"plain-{mb}MB.bin"
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        _plain_readinto([str(path)], buf)  # warm the page cache
        best = min(_timed(lambda p=str(path): _plain_readinto([p], buf)) for _ in range(reps))
        out.append({"mb": mb, "s": best, "gb_per_s": mb / 1024 / best})
        path.unlink()
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batch_tensors(batch: dict) -> list:
    """Every tensor of a collated batch, the ``BaseStats`` fields included."""
    import torch

    tensors = [v for v in batch.values() if torch.is_tensor(v)]
    base = batch["base"]
    return tensors + [getattr(base, f) for f in ("lse", "entropy", "topk_ids", "topk_logprobs", "sample_ids", "sample_logprobs")
                      if torch.is_tensor(getattr(base, f, None))]


def read_floor(cache, perm: list[int], batch_size: int, reps: int = 5) -> dict:
    """What no collate behind a DataLoader can beat, for the epoch in ``perm`` order: (1) ``copies``:
    only the copies a numpy collate makes, one ``np.concatenate`` per array per batch (tokens as
    int64, ids as int32, as ``collate_cache_rows`` gives them; nothing padded) into outputs
    allocated once, the rows located and sliced beforehand: for Zarr, decoding is left out with
    the slicing); (2) ``memcpy``: one contiguous copy per batch of as many bytes as that batch's
    outputs hold, between two buffers reused for every batch (cache-hot): an optimistic bound for
    a compiled gather, which would read rows scattered over the shards and widen their ids. Min
    over ``reps`` epochs each (seconds per epoch)."""
    import numpy as np

    from geocache.cache.backends import TOKEN_KEYS
    from geocache.cache.reader import LONG_KEYS

    batches = []
    for start in range(0, len(perm), batch_size):
        located = cache.__getitems__(perm[start : start + batch_size]).located
        parts = {k: [a[k][t0:t1] if k in TOKEN_KEYS else a[k][p0:p1] for a, t0, t1, p0, p1 in located] for k in located[0][0]}
        batches.append(parts)
    out_dtype = {k: np.int64 if k in TOKEN_KEYS else np.int32 if k in LONG_KEYS else v[0].dtype for k, v in batches[0].items()}
    outs, nbytes = {}, []
    for parts in batches:
        total = 0
        for k, ps in parts.items():
            n = sum(len(x) for x in ps)
            total += n * int(np.prod(ps[0].shape[1:], dtype=np.int64)) * np.dtype(out_dtype[k]).itemsize
            if k not in outs or len(outs[k]) < n:
                outs[k] = np.empty((n, *ps[0].shape[1:]), out_dtype[k])
        tokens = sum(len(x) for x in parts["input_ids"])
        nbytes.append(total + tokens * 8)  # and the attention mask, int64
    mask = np.empty(max(len(outs["input_ids"]), 1), np.int64)
    # (output view, parts) per array per batch, and the batch's mask view: nothing left to compute
    plan = [([(outs[k][: sum(len(x) for x in ps)], ps) for k, ps in parts.items()], mask[: sum(len(x) for x in parts["input_ids"])])
            for parts in batches]

    def copies() -> None:
        for arrays, batch_mask in plan:
            for out, ps in arrays:
                np.concatenate(ps, out=out, casting="unsafe")
            batch_mask.fill(1)

    src, dst = np.ones(max(nbytes), np.uint8), np.empty(max(nbytes), np.uint8)

    def memcpy() -> None:
        for n in nbytes:
            dst[:n] = src[:n]

    copies(), memcpy()  # warm
    return {"copies_s": min(_timed(copies) for _ in range(reps)), "memcpy_s": min(_timed(memcpy) for _ in range(reps)),
            "output_bytes": int(sum(nbytes)), "batches": len(batches)}


def worker_read(p: dict) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from geocache.cache import collate_cache_rows, get_backend, open_cache
    from geocache.cache.manifest import shard_checksum
    from geocache.cache.reader import _fs

    path = p["out"]
    torch.manual_seed(p["seed"])
    files = sorted(os.path.join(r, f) for r, _, fs_ in os.walk(path) for f in fs_)
    probe = open_cache(path, verify=False)
    tokens, sequences = probe.manifest.counts["tokens"], len(probe)
    del probe

    # (d) plain sequential read of every file, warm: read() whole, and through a reused buffer.
    import resource

    buf = bytearray(8 << 20)
    nbytes = _plain_read(files)
    _plain_readinto(files, buf)
    plain = {}
    for name, fn in (("read", lambda: _plain_read(files)), ("readinto", lambda: _plain_readinto(files, buf))):
        times, faults = [], []
        for _ in range(p["plain_reps"]):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            assert fn() == nbytes
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        plain[name] = {"times_s": times, "s": min(times), "tokens_per_s": tokens / min(times), "mb_per_s": nbytes / min(times) / MB,
                       "minor_faults": faults}
    plain_s = min(plain["read"]["s"], plain["readinto"]["s"])  # the limit: the faster of the two
    result = {
        "backend": p["backend"],
        "k": p["k"],
        "tokens": tokens,
        "sequences": sequences,
        "plain": {
            "bytes": nbytes,
            "files": len(files),
            **plain,
            "s": plain_s,
            "tokens_per_s": tokens / plain_s,
            "mb_per_s": nbytes / plain_s / MB,
        },
        "shuffled": [],
    }

    # (c) shuffled DataLoader epochs (the persistent-workers row is a diagnostic: start-up paid once).
    def epochs_of(loader) -> list[float]:
        # A warm-up epoch, then timed epochs until --min-read-s have passed (one epoch of a small
        # cache lasts milliseconds: its first batches' costs would dominate a single epoch).
        epochs = []
        while len(epochs) < 2 or sum(epochs[1:]) < p["min_read_s"]:
            t0 = time.perf_counter()
            rows = 0
            for batch in loader:
                rows += batch["input_ids"].shape[0]
            epochs.append(time.perf_counter() - t0)
            assert rows == sequences, (rows, sequences)
        return epochs

    settings = [(w, False) for w in p["workers"]] + [(w, True) for w in p.get("persistent_workers", [])]
    for workers, persistent in settings:
        cache = open_cache(path)
        loader = DataLoader(cache, batch_size=p["batch_size"], shuffle=True, num_workers=workers, collate_fn=collate_cache_rows,
                            persistent_workers=persistent)
        epochs = epochs_of(loader)
        timed = epochs[1:]
        mean_s = sum(timed) / len(timed)
        result["shuffled"].append(
            {
                "workers": workers,
                "persistent_workers": persistent,
                "warmup_s": epochs[0],
                "epochs_s": timed,
                "s": mean_s,
                "tokens_per_s": tokens / mean_s,
                "ratio_to_plain": plain_s / mean_s,
                "ratio_to_plain_read": plain["read"]["s"] / mean_s,
            }
        )

    # (c') 0 workers at other batch sizes: separates what the shuffled read pays per batch
    # (DataLoader, allocation, one concatenation per array) from what it pays per row (slices,
    # padding copies). A diagnostic beside the --batch-size verdict, not a replacement for it.
    result["batch_sweep"] = []
    for batch_size in p.get("sweep_batch_sizes", []):
        cache = open_cache(path)
        loader = DataLoader(cache, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=collate_cache_rows)
        timed = epochs_of(loader)[1:]
        mean_s = sum(timed) / len(timed)
        result["batch_sweep"].append({"batch_size": batch_size, "tokens_per_batch": tokens / -(-sequences // batch_size), "epochs_s": timed,
                                      "s": mean_s, "tokens_per_s": tokens / mean_s, "ratio_to_plain": plain_s / mean_s})

    # Diagnostics, single process, warm.
    cache = open_cache(path)
    for i in range(len(cache)):  # opens (and verifies) every shard once
        cache[i]
    # Streamed like a DataLoader with 0 workers (rows of one batch alive at a time), timed apart:
    # cache.__getitems__ for the batch's rows (what DataLoader calls), collate_cache_rows, and moving
    # the batch's tensors into shared memory (what a DataLoader worker does before sending a batch).
    perm = torch.randperm(len(cache)).tolist()
    getitem_s = collate_s = share_s = 0.0
    row_bytes = batch_bytes = n_batches = n_tensors = 0
    for start in range(0, len(perm), p["batch_size"]):
        t0 = time.perf_counter()
        rows = cache.__getitems__(perm[start : start + p["batch_size"]])
        t1 = time.perf_counter()
        batch = collate_cache_rows(rows)
        t2 = time.perf_counter()
        getitem_s, collate_s = getitem_s + (t1 - t0), collate_s + (t2 - t1)
        row_bytes += sum(t.nbytes for r in rows for t in r.values())
        batch_bytes += sum(t.numel() * t.element_size() for t in _batch_tensors(batch))
        n_batches += 1
        del rows, batch
    # What a DataLoader worker does instead, in a pass of its own (freeing shared-memory tensors
    # changes how the allocator serves the next batch): collate into one shared-memory buffer.
    for start in range(0, len(perm), p["batch_size"]):
        rows = cache.__getitems__(perm[start : start + p["batch_size"]])
        t3 = time.perf_counter()
        batch = collate_cache_rows(rows, shared=True)
        share_s += time.perf_counter() - t3
        n_tensors += len({t.untyped_storage().data_ptr() for t in _batch_tensors(batch)})
        del rows, batch
    # The DataLoader's own cost per batch: the same sampler, batch size and 0 workers over a
    # dataset whose rows are their indices (nothing read, nothing collated); min of 5 epochs.
    class _Indices(torch.utils.data.Dataset):
        def __len__(self):
            return len(cache)

        def __getitems__(self, indices):
            return indices

    empty = DataLoader(_Indices(), batch_size=p["batch_size"], shuffle=True, collate_fn=lambda rows: rows)
    loader_s = []
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in empty:
            pass
        loader_s.append(time.perf_counter() - t0)
    loader_us_per_batch = min(loader_s[1:]) / len(empty) * 1e6
    floor = read_floor(cache, perm, p["batch_size"])
    floor.update(loader_s=min(loader_s[1:]))
    for name in ("copies", "memcpy"):
        floor[f"{name}_ratio"] = plain_s / (floor["loader_s"] + floor[f"{name}_s"])
    fs, root = _fs(path)
    t0 = time.perf_counter()
    for s in cache.manifest.shards:
        shard_checksum(fs, os.path.join(root, s.name))
    checksum_s = time.perf_counter() - t0
    backend = get_backend(cache.manifest.backend)
    shard0 = os.path.join(root, cache.manifest.shards[0].name)
    t0 = time.perf_counter()
    view = backend.open(fs, shard0)
    open_s = time.perf_counter() - t0
    n_probe = min(64, len(view))
    slice_ms = {}
    for name, arr in view.arrays.items():
        token_key = name in ("input_ids", "labels", "position_ids")
        offsets = view.token_offsets if token_key else view.position_offsets
        t0 = time.perf_counter()
        for i in range(n_probe):
            np.asarray(arr[int(offsets[i]) : int(offsets[i + 1])])
        slice_ms[name] = (time.perf_counter() - t0) / n_probe * 1e3
    result["diagnostics"] = {
        "getitem_s": getitem_s,
        "getitem_tokens_per_s": tokens / getitem_s,
        "getitem_ms_per_row": getitem_s / len(perm) * 1e3,
        "rows": len(perm),
        "row_bytes_per_token": row_bytes / tokens,
        "batch_bytes_per_token": batch_bytes / tokens,
        "collate_s": collate_s,
        "collate_ms_per_batch": collate_s / n_batches * 1e3,
        "shared_collate_ms_per_batch": share_s / n_batches * 1e3,
        "shared_segments_per_batch": n_tensors / n_batches,
        "streamed_tokens_per_s": tokens / (getitem_s + collate_s),
        "dataloader_us_per_batch": loader_us_per_batch,
        "floor": floor,
        "checksum_all_shards_s": checksum_s,
        "open_first_shard_s": open_s,
        "slice_ms_per_row_by_array": slice_ms,
        "slice_ms_per_row_total": sum(slice_ms.values()),
        "arrays_per_row": len(slice_ms),
    }
    return result


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _rows(data: dict, key: str) -> dict:
    return {(r["backend"], r["k"]): r for r in data[key] if "error" not in r}


def conclusion(data: dict) -> str:
    """The 'Default backend' paragraph, from the measured numbers."""
    builds, reads = _rows(data, "builds"), _rows(data, "reads")
    ks = data["config"]["ks"]
    parts, faster, smaller = [], {"zarr": 0, "arrow": 0}, {"zarr": 0, "arrow": 0}
    for k in ks:
        bz, ba, rz, ra = builds.get(("zarr", k)), builds.get(("arrow", k)), reads.get(("zarr", k)), reads.get(("arrow", k))
        if not (bz and ba and rz and ra):
            continue
        size_z = bz["shard_bytes"] / bz["counts"]["tokens"]
        size_a = ba["shard_bytes"] / ba["counts"]["tokens"]
        tz = {s["workers"]: s["tokens_per_s"] for s in rz["shuffled"] if not s.get("persistent_workers")}
        ta = {s["workers"]: s["tokens_per_s"] for s in ra["shuffled"] if not s.get("persistent_workers")}
        speed = {w: ta[w] / tz[w] for w in tz if w in ta}
        faster["arrow" if min(speed.values()) > 1 else "zarr"] += 1
        smaller["zarr" if size_z < size_a else "arrow"] += 1
        parts.append(
            f"k={k}: Arrow reads {', '.join(f'{v:.0f}x' for v in speed.values())} faster shuffled "
            f"(workers {', '.join(str(w) for w in speed)}), Zarr stores {size_a / size_z:.2f}x fewer bytes/token "
            f"({size_z:.0f} vs {size_a:.0f})"
        )
    if not parts:
        return "Not enough measurements to compare the backends."
    read_winner = max(faster, key=faster.get)
    size_winner = max(smaller, key=smaller.get)
    pass_a = [s["ratio_to_plain"] >= TARGET_RATIO for (b, _), r in reads.items() if b == "arrow" for s in r["shuffled"] if not s.get("persistent_workers")]
    pass_z = [s["ratio_to_plain"] >= TARGET_RATIO for (b, _), r in reads.items() if b == "zarr" for s in r["shuffled"] if not s.get("persistent_workers")]
    text = (
        f"**Default backend.** The numbers favour **{read_winner.capitalize()}** as the default. "
        + "; ".join(parts)
        + ". "
        f"The cache is written once and read every epoch by the trainer, in random order; the read side is what "
        f"a training run pays. {read_winner.capitalize()} met the ≥ {TARGET_RATIO}x-of-plain-read target in "
        f"{sum(pass_a if read_winner == 'arrow' else pass_z)} of {len(pass_a if read_winner == 'arrow' else pass_z)} "
        f"configurations, {('Zarr' if read_winner == 'arrow' else 'Arrow')} in "
        f"{sum(pass_z if read_winner == 'arrow' else pass_a)} of {len(pass_z if read_winner == 'arrow' else pass_a)}. "
    )
    if size_winner != read_winner:
        text += (
            f"{size_winner.capitalize()} is the choice when disk or network bytes are the constraint (archival, "
            f"remote object stores read sequentially), at the read speed shown."
        )
    return text


def write_markdown(path: Path, data: dict) -> None:
    cfg, prov = data["config"], data["provenance"]
    builds, reads = _rows(data, "builds"), _rows(data, "reads")
    model = data["models"]["dense"]
    lines = [
        "# Cache storage: Zarr vs Arrow",
        "",
        f"Generated by `benchmarks/storage.py` on {prov['date_utc']} in {data['total_runtime_s']:.0f} s.",
        "",
        "**What and how.** Caches built with the real `geocache.precompute.precompute` "
        f"(m={cfg['m']}, max_length {cfg['max_length']}{', packed' if cfg.get('packing') else ''}, {cfg['sequences']} sequences, "
        f"batch {cfg['precompute_batch_size']}, "
        f"{cfg['shard_sequences']} sequences per shard) on the `.py` sources of the standard-library packages "
        f"{', '.join(data['corpus']['packages'])} cut into {cfg['lines_per_example']}-line examples "
        f"({data['corpus']['rows']} rows available). Base: random {model['model_type']} model, {cfg['layers']} layers, hidden "
        f"{cfg['hidden']}, **{model['output_rows']:,} output rows** (tokenizer {model['tokenizer_size']:,} entries; "
        f"ids stored as {next(iter(builds.values()))['id_dtype'] if builds else '?'}), output projection rescaled "
        f"x{model['logit_scale']:.1f} so that logits have std {model['logit_std']:.2f} "
        f"(freshly initialised: {model['logit_std_initial']:.2f}, near-uniform, unrealistically compressible); "
        f"mean entropy of the cached positions in the table below. Each build and each read set runs in a fresh "
        "subprocess. **Bytes/token** = stored bytes / tokens (not labelled positions), from "
        "`geocache.cache.inspect.summarize` (LM statistics, token data = ids + labels + offsets + index + metadata; "
        "Zarr by file sizes, Arrow split in proportion to in-memory array sizes) and the directory's total. "
        "**Write MB/s** = shard bytes / `timings['write_s']` (writer thread: pack, encode, write, checksum, commit). "
        f"**Shuffled read** = `DataLoader(open_cache(path), batch_size={cfg['batch_size']}, shuffle=True, num_workers=w, "
        f"collate_fn=collate_cache_rows)`, one warm-up epoch, then timed epochs for at least {cfg.get('min_read_s', 0)} s in all, "
        "mean epoch reported (worker start-up included in every epoch: "
        "`persistent_workers=False`, the default; a `persistent_workers=True` row is a diagnostic); **plain read** = every file "
        f"of the cache directory read sequentially, warm page cache, min of {cfg['plain_reps']}, with `open().read()` and through "
        "one reused 8 MiB buffer (`readinto`); the faster is **the limit** (`read()` of a file over glibc's 32 MiB mmap "
        "threshold pays a page fault per 4 KiB on every read, which is the allocator, not the bytes); all as cache "
        "tokens / seconds. Every measurement is rerun (up to "
        f"{cfg.get('retries', 0)} times) when other processes took more than {cfg.get('max_other_share', 1):.0%} of the machine's "
        "CPU while it ran; the cleanest attempt is kept. This VM runs DAMON with a `pageout` scheme (pages idle ≥ 60 s are "
        "reclaimed), hence a warm-up pass before every timed read.",
        "",
        *provenance_markdown(prov, data["loadavg_at_end"]),
        "",
        "## Bytes per token",
        "",
        "| backend | k | tokens | labelled positions | mean entropy (nats) | raw LM bytes / position | LM B/token | token data B/token | router B/token | shards B/token | directory B/token | vs Arrow |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in cfg["ks"]:
        for backend in cfg["backends"]:
            b = builds.get((backend, k))
            if not b:
                lines.append(f"| {backend} | {k} | error | | | | | | | | | |")
                continue
            s, tok = b["summary"], b["counts"]["tokens"]
            ref = builds.get(("arrow", k))
            vs = f"{b['shard_bytes'] / ref['shard_bytes']:.2f}x" if ref else "—"
            lines.append(
                f"| {backend} | {k} | {tok:,} | {b['counts']['positions']:,} | {b['mean_entropy_nats']:.2f} | "
                f"{raw_lm_bytes_per_position(k, b['m'])} | {s['lm bytes/token']:.1f} | {s['token data bytes/token']:.2f} | "
                f"{s['router bytes/token']:.1f} | {b['shard_bytes'] / tok:.1f} | {b['dir_bytes'] / tok:.1f} | {vs} |"
            )
    lines += [
        "",
        "Reference points (published, not measured here): "
        + "; ".join(f"{label}: ~{bpt:.0f} bytes/token" for _, bpt, label in DISTILLKIT)
        + ". Raw LM bytes per position = 4 (lse) + 4 (entropy) + k·(2 + 2) + m·(2 + 2) (uint16 ids, float16 log-probs).",
    ]
    moe = [r for r in data.get("moe_builds", []) if "error" not in r]
    if moe:
        mm = data["models"].get("moe", {})
        lines += [
            "",
            f"### MoE variant (router statistics apart): {mm.get('model_type')} {cfg['layers']} layers × "
            f"{mm.get('num_experts')} experts, top-{mm.get('top_k')}, k={cfg['moe_k']}",
            "",
            "| backend | router mode | router k | LM B/token | router B/token | token data B/token | shards B/token | write MB/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in moe:
            s, tok = r["summary"], r["counts"]["tokens"]
            rm = r["moe"] or {}
            lines.append(
                f"| {r['backend']} | {rm.get('router_mode')} | {rm.get('router_k') or '—'} | {s['lm bytes/token']:.1f} | "
                f"{s['router bytes/token']:.1f} | {s['token data bytes/token']:.2f} | {r['shard_bytes'] / tok:.1f} | "
                f"{r['shard_bytes'] / max(r['timings']['write_s'], 1e-9) / MB:.1f} |"
            )
    lines += [
        "",
        "## Write",
        "",
        "| backend | k | precompute wall (s) | forward_s | statistics_s | write_s (writer thread) | shard MB | write MB/s | process user / sys CPU (s) | other CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k in cfg["ks"]:
        for backend in cfg["backends"]:
            b = builds.get((backend, k))
            if not b:
                continue
            t = b["timings"]
            lines.append(
                f"| {backend} | {k} | {t['wall_s']:.1f} | {t['forward_s']:.1f} | {t['statistics_s']:.1f} | {t['write_s']:.2f} | "
                f"{b['shard_bytes'] / MB:.1f} | {b['shard_bytes'] / max(t['write_s'], 1e-9) / MB:.0f} | "
                f"{b['rusage']['user_s']:.0f} / {b['rusage']['sys_s']:.0f} | {b['other_cpu_s']:.1f} |"
            )
    lines += [
        "",
        "## Read: shuffled DataLoader vs plain sequential read",
        "",
        "| backend | k | plain MB | plain `read()` (ms) | plain reused buffer (ms) | plain tokens/s (faster = limit) | workers | shuffled epoch (s, mean) | timed epochs | warm-up epoch (s) | shuffled tokens/s | **shuffled / limit** | shuffled / `read()` | target | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in cfg["ks"]:
        for backend in cfg["backends"]:
            r = reads.get((backend, k))
            if not r:
                continue
            pl = r["plain"]
            for s in r["shuffled"]:
                ok = "PASS" if s["ratio_to_plain"] >= TARGET_RATIO else "FAIL"
                persistent = s.get("persistent_workers")
                w = f"{s['workers']} persistent (diagnostic)" if persistent else str(s["workers"])
                pr, pi = pl.get("read", {}).get("s"), pl.get("readinto", {}).get("s")
                lines.append(
                    f"| {backend} | {k} | {pl['bytes'] / MB:.1f} | {fmt(pr and pr * 1e3, '.1f')} | {fmt(pi and pi * 1e3, '.1f')} | "
                    f"{pl['tokens_per_s']:,.0f} | {w} | {s['s']:.4f} | {len(s.get('epochs_s', [s['s']]))} | {s['warmup_s']:.3f} | {s['tokens_per_s']:,.0f} | "
                    f"**{s['ratio_to_plain']:.4f}** | {fmt(s.get('ratio_to_plain_read'), '.4f')} | ≥ {TARGET_RATIO} | {'—' if persistent else ok} |"
                )
    if data.get("plain_read_by_size"):
        lines += [
            "",
            "**Plain read against file size** (random bytes, one reused 8 MiB buffer, warm page cache, min of "
            f"{data['config']['plain_reps']}): "
            + ", ".join(f"{x['mb']} MB {x['gb_per_s']:.1f} GB/s" for x in data["plain_read_by_size"])
            + (". A limit measured on a small cache is the limit of a large one (fastest/slowest "
               f"{max(x['gb_per_s'] for x in data['plain_read_by_size']) / min(x['gb_per_s'] for x in data['plain_read_by_size']):.2f})."
               if max(x["gb_per_s"] for x in data["plain_read_by_size"]) <= 1.25 * min(x["gb_per_s"] for x in data["plain_read_by_size"])
               else ". The speed depends on the size here: small caches overstate the limit."),
        ]
    sweeps = [(backend, k, reads[(backend, k)]) for k in cfg["ks"] for backend in cfg["backends"] if reads.get((backend, k), {}).get("batch_sweep")]
    if sweeps:
        sizes = sorted({x["batch_size"] for *_, r in sweeps for x in r["batch_sweep"]})
        lines += [
            "",
            "## Shuffled read against batch size (0 workers; diagnostic)",
            "",
            f"The verdicts above are at batch size {cfg['batch_size']}. Same cache, sampler and collate as above; each cell: "
            "shuffled / limit (mean tokens per batch). *Per batch* and *per row*: a least-squares line through the mean "
            "time per batch against the mean rows per batch (a negative per-batch cost: smaller than the noise); *bound* = "
            "the limit's time per row / the cost per row, the ratio no batch size can exceed.",
            "",
            "| backend | k | " + " | ".join(f"batch {b}" for b in sizes) + f" | smallest batch at ≥ {TARGET_RATIO} "
            "| per batch (µs) | per row (µs) | limit per row (µs) | bound |",
            "|---|---:|" + "---:|" * len(sizes) + "---:|---:|---:|---:|---:|",
        ]
        for backend, k, r in sweeps:
            by = {x["batch_size"]: x for x in r["batch_sweep"]}
            first = next((b for b in sizes if b in by and by[b]["ratio_to_plain"] >= TARGET_RATIO), None)
            fit = sweep_fit(r)
            lines.append(
                f"| {backend} | {k} | "
                + " | ".join(f"{by[b]['ratio_to_plain']:.3f} ({by[b]['tokens_per_batch']:,.0f})" if b in by else "—" for b in sizes)
                + f" | {first if first is not None else 'none measured'} | {fit['batch_s'] * 1e6:.0f} | {fit['row_s'] * 1e6:.2f} "
                f"| {fit['plain_row_s'] * 1e6:.2f} | {fit['bound']:.3f} |"
            )
    lines += [
        "",
        "## Where the shuffled read's time goes (single process, warm)",
        "",
        "Streamed in random order one batch at a time, as a 0-worker DataLoader does, with each step timed apart. "
        "*shared collate* = `collate_cache_rows(rows, shared=True)`, what a DataLoader worker runs: the batch collated into one "
        "shared-memory buffer, sent to the main process as that one segment (the fd passing and unpickling on the other side "
        "come on top).",
        "",
        "| backend | k | `__getitems__` ms/row | array slices ms/row (sum over arrays) | slowest array slice (ms) | collate ms/batch | `__getitems__` + collate tokens/s | rows B/token (stored dtypes) | batch B/token (padded; ids int32) | shared collate ms/batch (segments) | sha256 of all shards (s) | open one shard (ms) | other CPU during reads (s) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in cfg["ks"]:
        for backend in cfg["backends"]:
            r = reads.get((backend, k))
            if not r:
                continue
            d = r["diagnostics"]
            slowest = max(d["slice_ms_per_row_by_array"].items(), key=lambda kv: kv[1])
            lines.append(
                f"| {backend} | {k} | {d['getitem_ms_per_row']:.3f} | {d['slice_ms_per_row_total']:.3f} ({d['arrays_per_row']} arrays) | "
                f"{slowest[0]} {slowest[1]:.3f} | {d['collate_ms_per_batch']:.3f} | {fmt(d.get('streamed_tokens_per_s'))} | "
                f"{d.get('row_bytes_per_token', float('nan')):.0f} | {d.get('batch_bytes_per_token', float('nan')):.0f} | "
                f"{fmt(d.get('shared_collate_ms_per_batch'), '.2f')} ({fmt(d.get('shared_segments_per_batch'), '.0f')}) | "
                f"{d['checksum_all_shards_s']:.3f} | {d['open_first_shard_s'] * 1e3:.1f} | {r['other_cpu_s']:.1f} |"
            )
    floors = [(backend, k, reads[(backend, k)]) for k in cfg["ks"] for backend in cfg["backends"]
              if (backend, k) in reads and "floor" in reads[(backend, k)]["diagnostics"]]
    if floors:
        lines += [
            "",
            "## The floor behind a DataLoader (single process, warm)",
            "",
            "The same shuffled epoch with everything but the unavoidable taken away, against the plain read (the limit): "
            "*DataLoader alone* = the same sampler and batch size over a dataset that returns the indices (nothing read); "
            "*numpy copies* = only the `np.concatenate` per array per batch that a numpy collate makes (tokens to int64, "
            "ids to int32; nothing padded; outputs allocated once; rows located and sliced beforehand, which for Zarr leaves its "
            "decoding out); *one memcpy per batch* = a single contiguous copy of as many bytes as the batch's outputs hold, "
            "between two buffers reused for every batch (cache-hot): an optimistic bound for a compiled gather, which would "
            "read rows scattered over the shards. *Best ratio* = plain read / (DataLoader alone + copies): no reader through "
            "a 0-worker `DataLoader` can exceed it on this machine (worker processes copy in parallel, and pay to send batches).",
            "",
            "| backend | k | batches | plain read (ms) | DataLoader alone (ms) | numpy copies (ms) | one memcpy per batch (ms) | batch outputs MB | best ratio, numpy collate | best ratio, compiled collate (optimistic) | measured shuffled / plain (0 workers) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for backend, k, r in floors:
            f = r["diagnostics"]["floor"]
            measured = next((x["ratio_to_plain"] for x in r["shuffled"] if x["workers"] == 0 and not x.get("persistent_workers")), float("nan"))
            lines.append(
                f"| {backend} | {k} | {f['batches']} | {r['plain']['s'] * 1e3:.2f} | {f['loader_s'] * 1e3:.2f} | {f['copies_s'] * 1e3:.2f} | "
                f"{f['memcpy_s'] * 1e3:.2f} | {f['output_bytes'] / MB:.1f} | {f['copies_ratio']:.3f} | {f['memcpy_ratio']:.3f} | {measured:.3f} |"
            )
    lines += ["", "## Findings", "", *data.get("findings", []), "", conclusion(data), "", f"Raw numbers: `{NAME}.json`; plot: `{NAME}.png`.", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = data["config"]
    builds, reads = _rows(data, "builds"), _rows(data, "reads")
    colors = {"zarr": "#4c72b0", "arrow": "#dd8452"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.8))

    ks = cfg["ks"]
    for backend in cfg["backends"]:
        pts = [(k, builds[(backend, k)]) for k in ks if (backend, k) in builds]
        if not pts:
            continue
        x = [k for k, _ in pts]
        left.plot(x, [b["shard_bytes"] / b["counts"]["tokens"] for _, b in pts], "o-", color=colors[backend], label=f"{backend}: stored (shards)")
        left.plot(x, [b["summary"]["lm bytes/token"] for _, b in pts], "s--", color=colors[backend], alpha=0.7, label=f"{backend}: LM statistics only")
        for k, b in pts:
            v = b["shard_bytes"] / b["counts"]["tokens"]
            left.annotate(f"{v:.0f}", (k, v), textcoords="offset points", xytext=(6, -10 if backend == "zarr" else 4), fontsize=8, color=colors[backend])
    if builds:
        any_b = next(iter(builds.values()))
        frac = any_b["counts"]["positions"] / any_b["counts"]["tokens"]
        grid = [min(ks) * (max(ks) / min(ks)) ** (i / 20) for i in range(21)]
        left.plot(grid, [raw_lm_bytes_per_position(k, cfg["m"]) * frac for k in grid], ":", color="gray", label="raw LM bytes (uncompressed formula)")
    for k, bpt, label in DISTILLKIT:
        left.plot([k], [bpt], "*", ms=14, color="#c44e52", label=label)
        left.annotate(f"{label}:\n~{bpt:.0f} B/token (published)", (k, bpt), textcoords="offset points", xytext=(8, -22), fontsize=7.5,
                      color="#c44e52", ha="left")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(sorted(set(ks) | {50, 128}), [str(k) for k in sorted(set(ks) | {50, 128})])
    left.set_xlabel("k (top-k log-probs per position), m = %d" % cfg["m"])
    left.set_ylabel("bytes per token")
    left.set_title("Stored bytes per token")
    left.legend(fontsize=7, loc="upper left")
    left.grid(alpha=0.3, which="both")

    groups = [(b, k) for k in ks for b in cfg["backends"] if (b, k) in reads]
    settings = [(w, False) for w in cfg["workers"]] + [(w, True) for w in cfg.get("persistent_workers", [])]
    series = [("plain sequential read (limit)", None, "#55a868")] + [
        (f"shuffled DataLoader, {w} workers" + (" (persistent)" if ps else ""), (w, ps), c)
        for (w, ps), c in zip(settings, ("#8172b2", "#937860", "#da8bc3", "#8c8c8c"))
    ]
    width = 0.8 / len(series)
    for i, (label, w, color) in enumerate(series):
        for j, g in enumerate(groups):
            r = reads[g]
            x = j + (i - (len(series) - 1) / 2) * width
            if w is None:
                v = r["plain"]["tokens_per_s"]
                right.bar(x, v, width, color=color, label=label if j == 0 else None)
                right.plot([x - width / 2, x + width * (len(series) - 0.5)], [v * TARGET_RATIO] * 2, "k--", lw=0.8,
                           label=f"target: {TARGET_RATIO}x plain" if j == 0 else None)
            else:
                s = next((s for s in r["shuffled"] if (s["workers"], bool(s.get("persistent_workers"))) == w), None)
                if s is None:
                    continue
                right.bar(x, s["tokens_per_s"], width, color=color, label=label if j == 0 else None)
                right.text(x, s["tokens_per_s"], f"{s['ratio_to_plain']:.3g}x", ha="center", va="bottom", fontsize=6.5, rotation=90)
    right.set_yscale("log")
    lo, hi = right.get_ylim()
    right.set_ylim(lo, hi * 30)  # head room for the legend
    right.set_xticks(range(len(groups)), [f"{b}\nk={k}" for b, k in groups], fontsize=8)
    right.set_ylabel("tokens / s (log)")
    right.set_title("Read speed, warm page cache (labels: shuffled / plain)")
    right.legend(fontsize=7, loc="upper center", ncol=2)
    right.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _tps(r: dict, workers: int, persistent: bool = False):
    s = next((s for s in r["shuffled"] if s["workers"] == workers and bool(s.get("persistent_workers")) == persistent), None)
    return s and s["tokens_per_s"]


def _w0(r: dict) -> "dict | None":
    """The 0-worker shuffled-read measurement of one read result."""
    return next((s for s in r["shuffled"] if s["workers"] == 0 and not s.get("persistent_workers")), None)


def sweep_fit(r: dict) -> dict:
    """The batch-size sweep of one read record as a cost per batch plus a cost per row (least
    squares on mean time per batch against mean rows per batch), the limit's time per row, and
    the bound on the ratio that no batch size can pass: limit per row / cost per row."""
    import numpy as np

    n_batches = [-(-r["sequences"] // x["batch_size"]) for x in r["batch_sweep"]]
    rows = [r["sequences"] / n for n in n_batches]
    per_batch = [x["s"] / n for x, n in zip(r["batch_sweep"], n_batches)]
    row_s, batch_s = np.polyfit(rows, per_batch, 1)
    plain_row_s = r["plain"]["s"] / r["sequences"]
    return {"batch_s": float(batch_s), "row_s": float(row_s), "plain_row_s": plain_row_s, "bound": plain_row_s / float(row_s)}


def findings(data: dict) -> list[str]:
    """Observations computed from the numbers (the conclusion follows them)."""
    reads, builds = _rows(data, "reads"), _rows(data, "builds")
    out = []
    z = sorted((r for (b, _), r in reads.items() if b == "zarr"), key=lambda r: r["k"])
    a = sorted((r for (b, _), r in reads.items() if b == "arrow"), key=lambda r: r["k"])
    ks = lambda rs: ", ".join(str(r["k"]) for r in rs)  # noqa: E731
    if z:
        d = [r["diagnostics"] for r in z]
        out.append(
            f"- **Zarr rows come from a cache of decoded chunks** (k = {ks(z)}; `open_cache(decoded_cache_bytes=1 GiB)`, "
            "LRU, per process): warm, a row costs "
            + ", ".join(f"{(x['getitem_s'] + x['collate_s']) / x['rows'] * 1e3:.0f} µs" for x in d)
            + " (`__getitems__` + its share of `collate_cache_rows`, which slices the arrays). Without it every `arr[a:b]` goes through zarr's synchronous wrapper around its asyncio loop and "
            "decodes (zstd + crc32c) the whole 2,048-row chunk holding the row: the 8 array slices of a row, timed alone "
            "on the first shard, take "
            + ", ".join(f"{x['slice_ms_per_row_total']:.1f} ms" for x in d)
            + ". The first epoch pays the decoding once per chunk (warm-up epoch "
            + ", ".join(f"{_w0(r)['warmup_s']:.2f} s" for r in z if _w0(r))
            + " against "
            + ", ".join(f"{_w0(r)['s']:.3f} s" for r in z if _w0(r))
            + " warm); non-persistent DataLoader workers are new processes every epoch, so they decode again every epoch."
        )
    if a:
        d = [r["diagnostics"] for r in a]
        w0 = {r["k"]: next((s for s in r["shuffled"] if s["workers"] == 0 and not s.get("persistent_workers")), None) for r in a}
        out.append(
            f"- **Arrow, 0 workers** (k = {ks(a)}): `__getitems__` (what `DataLoader` calls for a batch: it checks the "
            "indices and locates each row's shard and offsets, slicing nothing) costs "
            + ", ".join(f"{x['getitem_ms_per_row'] * 1e3:.1f} µs" for x in d)
            + " per row; `collate_cache_rows` slices every array of every row (memory-mapped numpy views in their stored "
            "dtypes; the slices alone, timed apart on one shard, take "
            + ", ".join(f"{x['slice_ms_per_row_total'] * 1e3:.0f} µs" for x in d)
            + " per row) straight into one concatenation per array and takes "
            + ", ".join(f"{x['collate_ms_per_batch']:.2f} ms" for x in d)
            + " per batch of 8 (padding, ids widened from uint16 to int32, not int64): the batch "
            "holds "
            + ", ".join(f"{x['batch_bytes_per_token']:.0f}" for x in d)
            + " bytes/token against "
            + ", ".join(f"{builds[('arrow', r['k'])]['shard_bytes'] / r['tokens']:.0f}" for r in a if ("arrow", r["k"]) in builds)
            + " stored. The ratio to the plain read ("
            + ", ".join(f"{w0[r['k']]['ratio_to_plain']:.3f}" for r in a if w0[r["k"]])
            + ") compares a per-batch cost with a copy from the page cache"
            + (
                " whose speed against the file's size was ("
                + ", ".join(f"{x['gb_per_s']:.1f} GB/s for {x['mb']} MB" for x in data["plain_read_by_size"])
                + " of random bytes, same reused-buffer read, in the parent process; the CPU's last-level cache is far "
                "smaller than the largest). At 0.3x "
                if data.get("plain_read_by_size") else ": at 0.3x "
            )
            + "the reader would have "
            + ", ".join(f"{r['plain']['s'] / TARGET_RATIO / r['sequences'] * 1e6:.0f}" for r in a)
            + " µs per row (batching and collation included), against the "
            + ", ".join(f"{w0[r['k']]['s'] / r['sequences'] * 1e6:.0f}" for r in a if w0[r["k"]])
            + " µs it takes. Per batch of "
            + f"{data['config']['batch_size']}, the 0.3x budget is "
            + ", ".join(f"{r['plain']['s'] / TARGET_RATIO / -(-r['sequences'] // data['config']['batch_size']) * 1e6:.0f}" for r in a)
            + " µs, of which the DataLoader's own machinery (an empty dataset, same sampler) takes "
            + ", ".join(f"{x['dataloader_us_per_batch']:.0f}" for x in d if x.get("dataloader_us_per_batch") is not None)
            + " µs and `__getitems__` "
            + ", ".join(f"{x['getitem_ms_per_row'] * 1e3 * data['config']['batch_size']:.0f}" for x in d)
            + " µs."
        )
        swept = sorted((r for r in reads.values() if r.get("batch_sweep")), key=lambda r: (r["backend"] != "arrow", r["k"]))
        if swept:
            parts = []
            for r in swept:
                sweep = sorted(r["batch_sweep"], key=lambda x: x["batch_size"])
                first = next((x for x in sweep if x["ratio_to_plain"] >= TARGET_RATIO), None)
                fit = sweep_fit(r)
                parts.append(
                    f"{r['backend']} k={r['k']}: {fit['batch_s'] * 1e6:.0f} µs a batch + {fit['row_s'] * 1e6:.1f} µs a row against "
                    f"{fit['plain_row_s'] * 1e6:.1f} µs a row for the limit, bound {fit['bound']:.2f}x, "
                    + (f"{TARGET_RATIO}x from batch {first['batch_size']}" if first
                       else f"{sweep[-1]['ratio_to_plain']:.2f}x at batch {sweep[-1]['batch_size']}"))
            out.append(
                "- **Rows, not batches, set the ceiling** (0 workers, the batch-size sweep, a line fitted through time per batch "
                "against rows per batch): " + "; ".join(parts) + ". Larger batches spread the per-batch cost (the DataLoader, "
                "allocating the batch, one concatenation per array), but every row still costs one slice per array and, for "
                "token arrays of unequal lengths, one padding copy each: numpy calls of a few hundred ns each, "
                "which for short rows at small k outweigh the bytes the row holds. Longer (packed) rows carry more bytes per "
                f"such call. The verdicts are at batch {data['config']['batch_size']} and are kept as measured."
            )
        bs = data["config"]["batch_size"]
        n_batches = {r["k"]: -(-r["sequences"] // bs) for r in a}
        w2 = {r["k"]: next((s for s in r["shuffled"] if s["workers"] == 2 and not s.get("persistent_workers")), None) for r in a}
        w2p = {r["k"]: next((s for s in r["shuffled"] if s["workers"] == 2 and s.get("persistent_workers")), None) for r in a}
        slower = [w0[r["k"]]["tokens_per_s"] / w2[r["k"]]["tokens_per_s"] for r in a if w0[r["k"]] and w2[r["k"]]]
        if slower:
            out.append(
                f"- **Arrow with 2 workers is {min(slower):.1f}-{max(slower):.1f}x slower than with none** (k = {ks(a)}): the epoch "
                "takes "
                + ", ".join(f"{w2[r['k']]['s'] / n_batches[r['k']] * 1e3:.1f} ms" for r in a if w2[r["k"]])
                + " per batch ("
                + ", ".join(f"{w2p[r['k']]['s'] / n_batches[r['k']] * 1e3:.1f} ms" for r in a if w2p[r["k"]])
                + " with persistent workers, so it is per-batch cost, not start-up) against "
                + ", ".join(f"{(x['getitem_ms_per_row'] * bs + x['collate_ms_per_batch']):.2f} ms" for x in d)
                + " to produce a batch in one process. A worker collates straight into shared memory ("
                + ", ".join(f"{x['shared_collate_ms_per_batch']:.2f} ms" for x in d)
                + f" per batch) and sends it as {d[0]['shared_segments_per_batch']:.0f} segment; creating the segment, passing "
                "its descriptor, rebuilding the tensors in the main process and three processes on two cores make up the rest. "
                "Shard checksums (sha256 of all shards: "
                + ", ".join(
                    f"{r['diagnostics']['checksum_all_shards_s'] * 1e3:.0f} ms for {r['plain']['bytes'] / MB:.0f} MB"
                    for r in a
                )
                + ") are checked once per cache, not per worker per epoch: the verified flags live in shared memory."
            )
        big = [r for r in a if r["plain"].get("read", {}).get("s", 0) > 2 * r["plain"].get("readinto", {}).get("s", 1e9)]
        if big:
            r = big[0]
            out.append(
                f"- **The plain `read()` itself is slow for files over 32 MiB**: Arrow k={r['k']} ({r['plain']['bytes'] / MB:.0f} MB "
                f"in 2 shards) reads in {r['plain']['read']['s'] * 1e3:.1f} ms with `read()` "
                f"({r['plain']['read']['minor_faults'][-1]:,} minor faults per pass) but {r['plain']['readinto']['s'] * 1e3:.1f} ms "
                "through a reused buffer: glibc serves allocations above its 32 MiB mmap ceiling with fresh pages every "
                "time. The limit uses the faster read; against `read()` the shuffled Arrow read would pass."
            )
    slow = [b for b in builds.values() if b["timings"]["statistics_s"] > b["timings"]["forward_s"]]
    if slow:
        b0 = slow[0]
        out.append(
            "- **Building these caches** is dominated by the statistics pass, not the forward: "
            + ", ".join(
                f"{b['backend']} k={b['k']}: forward {b['timings']['forward_s']:.1f} s, statistics {b['timings']['statistics_s']:.1f} s"
                for b in sorted(slow, key=lambda b: (b["k"], b["backend"]))
            )
            + f" (a 2-layer, hidden-{data['config']['hidden']} base is nearly all output projection; `benchmarks/precompute.py` "
            f"measures realistic shapes). A quarter of the process CPU is the kernel's: {b0['rusage']['sys_s']:.0f} s system of "
            f"{b0['rusage']['user_s'] + b0['rusage']['sys_s']:.0f} s, {b0['rusage']['minor_faults'] / 1e6:.1f}M minor page faults "
            f"({b0['backend']} k={b0['k']}): each batch's logits and buffers are fresh allocations served by mmap."
        )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Zarr vs Arrow cache backends: bytes/token, write MB/s, shuffled DataLoader read vs plain "
        "sequential read. Writes storage.{json,md,png}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", nargs="+", default=["zarr", "arrow"], choices=["zarr", "arrow"])
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256], help="top-k values")
    ap.add_argument("--m", type=int, default=8, help="tail samples per position")
    ap.add_argument("--vocab", type=int, default=32768, help="output rows of the random base model")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the base model")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the base model")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096, help="entries of the BPE tokenizer (< --vocab is fine)")
    ap.add_argument("--logit-std", type=float, default=3.0, help="rescale the output projection so logits have this std (0: keep init)")
    ap.add_argument("--max-length", type=int, default=256, help="DataConfig.max_length")
    ap.add_argument("--packing", action="store_true", help="DataConfig.packing: whole examples packed into rows of --max-length")
    ap.add_argument("--sequences", type=int, default=448, help="DataConfig.max_sequences")
    ap.add_argument("--lines-per-example", type=int, default=20, help="source lines per JSONL example")
    ap.add_argument("--precompute-batch-size", type=int, default=8, help="PrecomputeConfig.batch_size")
    ap.add_argument("--shard-sequences", type=int, default=256, help="PrecomputeConfig.shard_sequences")
    ap.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size")
    ap.add_argument("--sweep-batch-sizes", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                    help="extra diagnostic rows: the 0-worker shuffled read at these batch sizes (the ratio against tokens per batch)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    ap.add_argument("--persistent-workers", type=int, nargs="*", default=[2],
                    help="extra diagnostic rows: these num_workers with persistent_workers=True (start-up paid once)")
    ap.add_argument("--min-read-s", type=float, default=1.0, help="timed shuffled epochs last at least this long in all (one warm-up epoch first)")
    ap.add_argument("--plain-reps", type=int, default=5, help="timed repetitions of the plain read (min reported)")
    ap.add_argument("--plain-sizes-mb", type=int, nargs="*", default=[8, 32, 128, 1024],
                    help="sizes of random-byte files whose plain read speed is measured beside the caches'")
    ap.add_argument("--moe-experts", type=int, default=64, help="experts of the MoE variant (0: skip it)")
    ap.add_argument("--moe-top-k", type=int, default=8, help="experts per token of the MoE variant")
    ap.add_argument("--moe-k", type=int, default=64, help="top-k of the MoE variant's caches")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model weights and the shuffles")
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
        fn = {"build": worker_build, "read": worker_read}[params["task"]]
        print(json.dumps(fn(params)), flush=True)
        return
    out = Path(args.out_dir)
    if args.replot:
        data = json.loads((out / f"{NAME}.json").read_text())
        data["findings"] = findings(data)
        write_markdown(out / f"{NAME}.md", data)
        write_plot(out / f"{NAME}.png", data)
        print(f"re-rendered {out / f'{NAME}.md'} and {out / f'{NAME}.png'} from {out / f'{NAME}.json'}")
        return

    started = time.perf_counter()
    prov = provenance()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="geocache-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    script = Path(__file__).resolve()
    try:
        from geocache.testing import build_tokenizer

        data_path = work / "data.jsonl"
        corpus = write_corpus_jsonl(data_path, args.lines_per_example)
        build_tokenizer(work / "tokenizer", vocab_size=args.tokenizer_vocab)
        models = {"dense": build_model(work / "model", work / "tokenizer", data_path, args, moe=False)}
        print(f"[model] dense: {models['dense']['parameters']:,} params, logits x{models['dense']['logit_scale']:.1f} -> std "
              f"{models['dense']['logit_std']:.2f}, sample entropy {models['dense']['mean_entropy_nats_sample']:.2f} nats", flush=True)
        if args.moe_experts:
            models["moe"] = build_model(work / "model-moe", work / "tokenizer", data_path, args, moe=True)
        common = {
            "data": str(data_path),
            "m": args.m,
            "max_length": args.max_length,
            "packing": args.packing,
            "sequences": args.sequences,
            "precompute_batch_size": args.precompute_batch_size,
            "shard_sequences": args.shard_sequences,
        }
        idle_log, builds, reads, moe_builds = [], [], [], []

        def measured(params: dict, label: str) -> dict:
            r, attempts = spawn_measured(script, params, args.worker_timeout, max_busy=args.max_busy, idle_timeout=args.idle_timeout,
                                         max_other_share=args.max_other_share, retries=args.retries, label=label)
            idle_log.extend(attempts)
            return r

        for k in args.ks:
            for backend in args.backends:
                params = {"task": "build", "model": models["dense"]["path"], "out": str(work / f"cache-{backend}-k{k}"), "backend": backend, "k": k, **common}
                r = measured(params, f"build {backend} k={k}")
                builds.append(r if "error" not in r else {**r, "backend": backend, "k": k})
                if "error" in r:
                    print(f"[build] {backend} k={k}: ERROR {r['error']}\n{r.get('stderr_tail', '')}", flush=True)
                    continue
                t = r["timings"]
                print(
                    f"[build] {backend:>5} k={k:>3}: {r['shard_bytes'] / r['counts']['tokens']:7.1f} B/token "
                    f"(LM {r['summary']['lm bytes/token']}), wall {t['wall_s']:.1f} s (fwd {t['forward_s']:.1f}, stats "
                    f"{t['statistics_s']:.1f}, write {t['write_s']:.2f}), other CPU {r['other_cpu_s']:.1f} s",
                    flush=True,
                )
        for k in args.ks:
            for backend in args.backends:
                if not any(b.get("backend") == backend and b.get("k") == k and "error" not in b for b in builds):
                    continue
                params = {
                    "task": "read",
                    "out": str(work / f"cache-{backend}-k{k}"),
                    "backend": backend,
                    "k": k,
                    "workers": args.workers,
                    "persistent_workers": args.persistent_workers,
                    "batch_size": args.batch_size,
                    "sweep_batch_sizes": args.sweep_batch_sizes,
                    "plain_reps": args.plain_reps,
                    "min_read_s": args.min_read_s,
                    "seed": args.seed,
                }
                r = measured(params, f"read {backend} k={k}")
                reads.append(r if "error" not in r else {**r, "backend": backend, "k": k})
                if "error" in r:
                    print(f"[read] {backend} k={k}: ERROR {r['error']}\n{r.get('stderr_tail', '')}", flush=True)
                    continue
                shuf = ", ".join(f"w={s['workers']}{'p' if s['persistent_workers'] else ''}: {s['tokens_per_s']:,.0f} tok/s "
                                 f"({s['ratio_to_plain']:.4f}x)" for s in r["shuffled"])
                print(f"[read]  {backend:>5} k={k:>3}: plain {r['plain']['tokens_per_s']:,.0f} tok/s; shuffled {shuf}", flush=True)
        plain_by_size = plain_read_by_size(work, args.plain_sizes_mb, args.plain_reps)
        print("[plain] " + ", ".join(f"{x['mb']} MB: {x['gb_per_s']:.1f} GB/s" for x in plain_by_size), flush=True)
        if args.moe_experts:
            for backend in args.backends:
                for router in ("full", "topk"):
                    params = {"task": "build", "model": models["moe"]["path"], "out": str(work / f"cache-moe-{backend}-{router}"),
                              "backend": backend, "k": args.moe_k, "router": router, **common}
                    r = measured(params, f"moe build {backend} {router}")
                    moe_builds.append(r if "error" not in r else {**r, "backend": backend, "k": args.moe_k})
                    if "error" in r:
                        print(f"[moe]   {backend} {router}: ERROR {r['error']}\n{r.get('stderr_tail', '')}", flush=True)
                        continue
                    print(f"[moe]   {backend:>5} {router}: router {r['summary']['router bytes/token']} B/token, LM {r['summary']['lm bytes/token']} B/token", flush=True)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    data = {
        "provenance": prov,
        "config": config,
        "target_shuffled_over_plain": TARGET_RATIO,
        "reference_points": [{"k": k, "bytes_per_token": b, "label": label} for k, b, label in DISTILLKIT],
        "corpus": corpus,
        "models": models,
        "builds": builds,
        "reads": reads,
        "moe_builds": moe_builds,
        "plain_read_by_size": plain_by_size,
        "measurement_attempts": idle_log,
    }
    data["total_runtime_s"] = time.perf_counter() - started
    data["loadavg_at_end"] = loadavg()
    data["findings"] = findings(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(out / f"{NAME}.md", data)
    write_plot(out / f"{NAME}.png", data)
    print(conclusion(data))
    print(f"wrote {out / f'{NAME}.json'}, {out / f'{NAME}.md'}, {out / f'{NAME}.png'} in {data['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
