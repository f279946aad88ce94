"""``geocache cache inspect`` and ``verify``: a cache's summary, and a full integrity check."""

from __future__ import annotations

import posixpath
from typing import Optional

import numpy as np

from geocache.cache.backends import ROUTER_KEYS, get_backend
from geocache.cache.manifest import shard_checksum
from geocache.cache.reader import _fs, read_manifest

LM_KEYS = ("lse", "entropy", "topk_ids", "topk_logprobs", "tail_ids", "tail_logprobs")


def _shard_bytes_by_array(fs, path: str) -> dict[str, int]:
    """Stored (compressed) bytes of one shard per array. Zarr: each array's files; Arrow (one file):
    the file's size split in proportion to the arrays' in-memory sizes."""
    files = fs.find(path) if fs.isdir(path) else []
    out: dict[str, int] = {}
    if not files:
        view = get_backend("arrow").open(fs, path)
        sizes = {k: np.asarray(v).nbytes for k, v in view.arrays.items()}
        total, whole = fs.size(path), sum(sizes.values()) or 1
        return {k: int(total * n / whole) for k, n in sizes.items()}
    for f in files:
        name = posixpath.relpath(f, path).split("/")[0]
        out[name] = out.get(name, 0) + fs.size(f)
    return out


def bytes_by_array(url: str) -> dict[str, int]:
    """Stored bytes per array name over all shards of a cache (group metadata under ``zarr.json``)."""
    from geocache.cache.reader import CacheError

    fs, root = _fs(url)
    out: dict[str, int] = {}
    for s in read_manifest(fs, root).shards:
        path = posixpath.join(root, s.name)
        if not fs.exists(path):
            raise CacheError(f"shard {s.name} of cache {url!r} is missing (geocache cache verify checks every shard)")
        try:
            sizes = _shard_bytes_by_array(fs, path)
        except Exception as exc:  # a damaged shard: named, not a decoder's message alone
            raise CacheError(f"shard {s.name} of cache {url!r} cannot be read ({exc}; geocache cache verify checks every shard)") from None
        for k, v in sizes.items():
            out[k] = out.get(k, 0) + v
    return out


def _kind(name: str) -> str:
    return "lm" if name in LM_KEYS else "router" if name in ROUTER_KEYS else "other"


def describe(url: str) -> dict:
    """What a cache holds, as typed fields (``geocache cache inspect --json``): numbers as numbers,
    the model, data and MoE layout as mappings, ``moe`` null for a dense model."""
    fs, root = _fs(url)
    m = read_manifest(fs, root)
    kinds = {"lm": 0, "router": 0, "other": 0}
    for name, n in bytes_by_array(url).items():
        kinds[_kind(name)] += n
    tokens = max(m.counts["tokens"], 1)
    source, prep = m.data.get("source", {}), m.data.get("preprocessing", {})
    return {
        "cache": url,
        "complete": m.complete,
        "backend": m.backend,
        "geocache_version": m.geocache_version,
        "base_model": {k: m.base_model.get(k) for k in ("id", "revision", "model_type", "output_size", "tokenizer_size", "dtype")},
        "data": {"source": source.get("id") or [str(f) for f in source.get("files", [])], "max_length": prep.get("max_length"),
                 "packing": bool(prep.get("packing"))},
        "k": m.statistics["k"],
        "m": m.statistics["m"],
        "moe": None if not m.moe else {"layers": len(m.moe["layers"]), **{k: m.moe.get(k) for k in ("num_experts", "top_k", "scoring",
                                                                                                     "router_mode", "router_k")}},
        "sequences": m.counts["sequences"],
        "tokens": m.counts["tokens"],
        "labelled_positions": m.counts["positions"],
        "skipped_rows": m.counts.get("skipped_rows", 0),
        "unlabelled_rows": m.counts.get("unlabelled_rows", 0),
        "truncated_rows": m.counts.get("truncated_rows"),  # null: not recorded (caches from before it)
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "lm_bytes_per_token": round(kinds["lm"] / tokens, 2),
        "router_bytes_per_token": round(kinds["router"] / tokens, 2),
        "token_data_bytes_per_token": round(kinds["other"] / tokens, 2),
    }


def summarize(url: str) -> dict:
    """``describe`` as the lines ``geocache cache inspect`` prints (display strings)."""
    d = describe(url)
    b, moe = d["base_model"], d["moe"]
    return {
        "cache": url,
        "complete": d["complete"],
        "backend": d["backend"],
        "geocache_version": d["geocache_version"],
        "base_model": f"{b['id']} ({b['model_type']}, {b['output_size']} output rows, tokenizer {b['tokenizer_size']})",
        "data": _data_line(d["data"]),
        "k / m": f"{d['k']} / {d['m']}",
        "moe": "dense" if not moe else f"{moe['layers']} layers x {moe['num_experts']} experts, top-{moe['top_k']}, {moe['scoring']}, router {moe['router_mode']}",
        "sequences": d["sequences"],
        "tokens": d["tokens"],
        "labelled positions": d["labelled_positions"],
        "input rows left out": f"{d['skipped_rows']} malformed, {d['unlabelled_rows']} with no label within max_length",
        "input rows truncated": d["truncated_rows"] if d["truncated_rows"] is not None else "not recorded",
        "shards": d["shards"],
        "bytes": d["bytes"],
        "lm bytes/token": d["lm_bytes_per_token"],
        "router bytes/token": d["router_bytes_per_token"],
        "token data bytes/token": d["token_data_bytes_per_token"],
    }


def _data_line(data: dict) -> str:
    """Where the cached sequences come from and how they were cut (``describe``'s ``data``), in one line."""
    source = data["source"]
    where = (source if isinstance(source, str) else ", ".join(source)) or "?"
    return f"{where} (max_length {data['max_length']}, {'packed' if data['packing'] else 'truncated'})"


def verify(url: str) -> Optional[str]:
    """None if every shard matches its checksum and schema; else a sentence naming the first bad one."""
    fs, root = _fs(url)
    m = read_manifest(fs, root)
    backend = get_backend(m.backend)
    k, mm = m.statistics["k"], m.statistics["m"]
    if not m.complete and not m.counts.get("sequences"):
        return "the cache is empty: its precompute cached no sequence; fix the data (or --max-length) and rerun it"
    if not m.complete:  # its shards may all check out, but it is not what precompute was asked for
        return "the cache is incomplete (an interrupted precompute): rerun it with --resume"
    for key in ("sequences", "tokens", "positions"):
        total = sum(getattr(s, key) for s in m.shards)
        if m.counts.get(key) != total:
            return f"the manifest's total of {key} ({m.counts.get(key)}) is not the sum over its shards ({total})"
    for s in m.shards:
        path = posixpath.join(root, s.name)
        if not fs.exists(path):
            return f"shard {s.name} is missing"
        if shard_checksum(fs, path)[0] != s.sha256:
            return f"shard {s.name} fails its checksum"
        try:
            view = backend.open(fs, path)
            problems = []
            if len(view) != s.sequences or int(view.token_offsets[-1]) != s.tokens or int(view.position_offsets[-1]) != s.positions:
                problems.append("counts differ from the manifest")
            for name, width in (("topk_ids", k), ("topk_logprobs", k), ("tail_ids", mm), ("tail_logprobs", mm)):
                if (name in view.arrays) != (width > 0 or name.startswith("topk")):
                    problems.append(f"array {name} is {'missing' if name not in view.arrays else 'unexpected'}")
                elif name in view.arrays and tuple(view.arrays[name].shape[1:]) != (width,):
                    problems.append(f"array {name} has shape {tuple(view.arrays[name].shape)}")
            expected = np.arange(s.first_sequence, s.first_sequence + s.sequences * s.stride, s.stride)
            if not np.array_equal(view.sequence_index, expected):
                problems.append("its sequence indices are not the ones the manifest lists")
        except Exception as exc:  # a decoder error is a bad shard, not a crash
            return f"shard {s.name} cannot be read ({exc})"
        if problems:
            return f"shard {s.name} fails the schema check: {problems[0]}"
    return None
