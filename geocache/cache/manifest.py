"""``manifest.json``: what a cache holds, how it was made, and every shard with its checksum.

The manifest is plain JSON (data only). Shards are listed once committed; a shard on disk that the
manifest does not list is not part of the cache (an interrupted write) and is removed on resume.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
SHARDS_DIR = "shards"
LOGS_DIR = "logs"  # each rank's JSONL log of the precompute; never read by geocache


@dataclass
class ShardInfo:
    name: str  # path relative to the cache root, e.g. "shards/rank000-000003.zarr"
    rank: int
    index: int  # shard number within its rank
    first_sequence: int  # global index of its first sequence; the rest follow every `stride`
    stride: int  # the world size that wrote it: rank r holds sequences r, r + W, r + 2W, ...
    sequences: int
    tokens: int
    positions: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    geocache_version: str
    backend: str
    base_model: dict  # id, revision, model_type, config_sha256, weights_sha256, output_size, tokenizer_size, dtype
    tokenizer_sha256: str
    data: dict  # fingerprint of the input data and the exact preprocessing (DataConfig)
    statistics: dict  # k, m, temperature, seed, stored dtypes, id dtype
    moe: Optional[dict]  # layers, experts, top_k, scoring, router mode, router_k; None for dense
    world_size: int = 1
    complete: bool = False
    shards: list[ShardInfo] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"sequences": 0, "tokens": 0, "positions": 0})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            got = raw.get("format_version") if isinstance(raw, dict) else None
            raise ValueError(f"{where} has cache format version {got!r}; this geocache reads version {FORMAT_VERSION}")
        # Preprocessing fields added after format version 1 was first written, at the value that
        # reproduces what those caches hold (they never added a BOS).
        pre = raw.get("data", {}).get("preprocessing") if isinstance(raw.get("data"), dict) else None
        if isinstance(pre, dict):
            pre.setdefault("add_bos", False)
        try:
            raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"{where} does not have the cache manifest's fields ({exc})") from None

    def fingerprint(self) -> dict:
        """Everything that decides which tokens and which statistics are cached (a copy)."""
        return json.loads(json.dumps({
            # dtype too: the weights' fingerprint is the same loaded in float32 or bfloat16 (on
            # purpose), but the statistics are not, and a resume must not mix them.
            # The model and the data by content, not by the path they were given as: the same files
            # named from another directory are the same cache (the paths stay in the manifest).
            "base_model": {k: self.base_model.get(k) for k in ("config_sha256", "weights_sha256", "output_size", "dtype")},
            "tokenizer_sha256": self.tokenizer_sha256,
            "data": {**self.data, "source": {k: v for k, v in self.data.get("source", {}).items() if k != "files"}},
            "statistics": self.statistics,
            "moe": self.moe,
            "backend": self.backend,
            "world_size": self.world_size,
        }))

    def identity(self) -> str:
        """A short hash of what the cache's rows are: its fingerprint (model, tokenizer, data by
        content, preprocessing, statistics) and counts, not where it lies nor its backend or
        number of writing processes. A moved or copied cache keeps it; a cache rebuilt at the same
        path from other data or settings does not (what a resumed training run checks)."""
        what = {k: v for k, v in self.fingerprint().items() if k not in ("backend", "world_size")}
        what["counts"] = {k: self.counts.get(k) for k in ("sequences", "tokens", "positions")}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def recount(self) -> None:
        self.shards.sort(key=lambda s: (s.rank, s.index))
        self.counts = {
            "sequences": sum(s.sequences for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "positions": sum(s.positions for s in self.shards),
        }


def first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    """The first key path where two JSON-like values differ, as ``a.b.c: x != y``; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    if a != b:
        return f"{path}: {a!r} != {b!r}"
    return None


def shard_checksum(fs, path: str) -> tuple[str, int]:
    """sha256 over every file of a shard (a file, or a directory of files in sorted order), and its bytes."""
    h, total = hashlib.sha256(), 0
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for f in files:
        data = fs.cat_file(f)
        h.update(posixpath.relpath(f, path).encode() if f != path else b"")
        h.update(hashlib.sha256(data).digest())
        total += len(data)
    return h.hexdigest(), total
