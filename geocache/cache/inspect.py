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


def summarize(url: str) -> dict:
    fs, root = _fs(url)
    m = read_manifest(fs, root)
    kinds = {"lm": 0, "router": 0, "other": 0}
    for name, n in bytes_by_array(url).items():
        kinds[_kind(name)] += n
    tokens = max(m.counts["tokens"], 1)
    return {
        "cache": url,
        "complete": m.complete,
        "backend": m.backend,
        "geocache_version": m.geocache_version,
        "base_model": f"{m.base_model['id']} ({m.base_model['model_type']}, {m.base_model['output_size']} output rows, tokenizer {m.base_model['tokenizer_size']})",
        "data": _data_line(m.data),
        "k / m": f"{m.statistics['k']} / {m.statistics['m']}",
        "moe": "dense" if not m.moe else f"{len(m.moe['layers'])} layers x {m.moe['num_experts']} experts, top-{m.moe['top_k']}, {m.moe['scoring']}, router {m.moe['router_mode']}",
        "sequences": m.counts["sequences"],
        "tokens": m.counts["tokens"],
        "labelled positions": m.counts["positions"],
        "input rows left out": f"{m.counts.get('skipped_rows', 0)} malformed, {m.counts.get('unlabelled_rows', 0)} with no label within max_length",
        "input rows truncated": m.counts.get("truncated_rows", "not recorded"),
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "lm bytes/token": round(kinds["lm"] / tokens, 2),
        "router bytes/token": round(kinds["router"] / tokens, 2),
        "token data bytes/token": round(kinds["other"] / tokens, 2),
    }


def _data_line(data: dict) -> str:
    """Where the cached sequences come from and how they were cut, in one line."""
    source, prep = data.get("source", {}), data.get("preprocessing", {})
    where = source.get("id") or ", ".join(map(str, source.get("files", []))) or "?"
    cut = f"max_length {prep.get('max_length')}, {'packed' if prep.get('packing') else 'truncated'}"
    return f"{where} ({cut})"


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
