"""``open_cache``: a cache as a random-access, sized ``Dataset`` of rows, plus batch collation.

Rows come back in global sequence order whatever the number of ranks that wrote them. Shards are
opened lazily, once per process (so ``DataLoader`` workers each open their own), and each shard's
checksum is verified the first time this process touches it.
"""

from __future__ import annotations

import os
import posixpath
from typing import Optional

import numpy as np
import torch

from geocache.cache.backends import ShardView, get_backend
from geocache.cache.manifest import MANIFEST, Manifest, first_difference, shard_checksum
from geocache.signals import IGNORE_INDEX, BaseStats, labelled_positions

LONG_KEYS = ("input_ids", "labels", "position_ids", "topk_ids", "tail_ids", "router_topk_ids")


class CacheError(ValueError):
    """A cache that cannot be read as asked: missing, incomplete, corrupt or incompatible."""


def _fs(url: str, storage_options: Optional[dict] = None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def read_manifest(fs, root: str) -> Manifest:
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        raise CacheError(f"{root!r} is not a geocache cache: it has no {MANIFEST} (was precompute run, or did it not finish?)")
    return Manifest.from_json(fs.cat_file(path).decode(), where=path)


class CacheReader(torch.utils.data.Dataset):
    """Rows of a cache: dicts of tensors with ``input_ids``, ``labels``, ``lse``, ``entropy``,
    ``topk_ids``, ``topk_logprobs`` (+ ``tail_ids``/``tail_logprobs`` when m > 0, ``router_logits``
    or ``router_topk_ids``/``router_topk_logits`` for MoE, ``position_ids`` when packed).

    Token arrays are ``[T]`` and per-position arrays ``[P, ...]`` where P is the number of
    labelled positions of the row (``labelled_positions`` order). Ids come back as int64;
    log-probs and router logits in their stored dtype.
    """

    def __init__(self, url: str, *, verify: bool = True, storage_options: Optional[dict] = None):
        self.url = url
        self.fs, self.root = _fs(url, storage_options)
        self.manifest = read_manifest(self.fs, self.root)
        if not self.manifest.complete:
            raise CacheError(f"cache {url!r} is incomplete (an interrupted precompute): rerun it with --resume")
        self.backend = get_backend(self.manifest.backend)
        self.verify = verify
        # Global order from the manifest alone: rank r holds sequences r, r + W, r + 2W, ...
        seq, shard_of, local = [], [], []
        for i, s in enumerate(self.manifest.shards):
            seq.append(np.arange(s.first_sequence, s.first_sequence + s.sequences * s.stride, s.stride))
            shard_of.append(np.full(s.sequences, i))
            local.append(np.arange(s.sequences))
        seq_all = np.concatenate(seq) if seq else np.zeros(0, dtype=np.int64)
        order = np.argsort(seq_all, kind="stable")
        self._shard_of = np.concatenate(shard_of)[order] if seq else seq_all
        self._local = np.concatenate(local)[order] if seq else seq_all
        self._views: dict[int, ShardView] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard_of)

    def _view(self, i: int) -> ShardView:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._views, self._pid = {}, os.getpid()
        view = self._views.get(i)
        if view is None:
            info = self.manifest.shards[i]
            path = posixpath.join(self.root, info.name)
            if not self.fs.exists(path):
                raise CacheError(f"shard {info.name} of cache {self.url!r} is missing")
            if self.verify and shard_checksum(self.fs, path)[0] != info.sha256:
                raise CacheError(f"shard {info.name} of cache {self.url!r} fails its checksum: the cache is corrupt")
            try:
                view = self.backend.open(self.fs, path)
            except Exception as exc:  # any decoder error on a shard means corruption to the user
                raise CacheError(f"shard {info.name} of cache {self.url!r} cannot be read ({exc})") from None
            self._views[i] = view
        return view

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"row {idx} out of range for a cache of {len(self)} rows")
        idx = int(idx) % len(self)
        view = self._view(int(self._shard_of[idx]))  # raises CacheError itself
        try:
            row = view.row(int(self._local[idx]))
        except Exception as exc:
            info = self.manifest.shards[int(self._shard_of[idx])]
            raise CacheError(f"shard {info.name} of cache {self.url!r} cannot be read ({exc})") from None
        return {k: torch.from_numpy(v.astype(np.int64) if k in LONG_KEYS else np.array(v)) for k, v in row.items()}

    def check_compatible(self, model=None, tokenizer=None, expected: Optional[dict] = None) -> None:
        """Refuse, in one sentence, a cache built for another model, revision, tokenizer or
        preprocessing. ``expected`` is a manifest fingerprint (``Manifest.fingerprint()``) of the
        run that wants to read this cache; any difference is named."""
        from geocache.data import tokenizer_fingerprint
        from geocache.models import model_fingerprint, output_size

        base = self.manifest.base_model
        if model is not None:
            fp = model_fingerprint(model)
            if fp["config_sha256"] != base["config_sha256"] or fp["weights_sha256"] != base["weights_sha256"]:
                which = "config" if fp["config_sha256"] != base["config_sha256"] else "weights"
                raise CacheError(
                    f"cache {self.url!r} was built for base model {base['id']!r} (revision {base.get('revision')}), "
                    f"and this model's {which} differ from it"
                )
            if output_size(model) != base["output_size"]:
                raise CacheError(f"cache {self.url!r} covers {base['output_size']} output rows but the model has {output_size(model)}")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest.tokenizer_sha256:
            raise CacheError(f"cache {self.url!r} was built with another tokenizer than the one given")
        if expected is not None:
            diff = first_difference(self.manifest.fingerprint(), expected)
            if diff:
                raise CacheError(f"cache {self.url!r} was built with different settings ({diff})")


def open_cache(url: str, *, verify: bool = True, storage_options: Optional[dict] = None) -> CacheReader:
    """Open a cache directory or fsspec URL for reading (see ``CacheReader``)."""
    return CacheReader(url, verify=verify, storage_options=storage_options)


def collate_cache_rows(rows: list[dict], pad_token_id: int = 0) -> dict:
    """Pad rows into a batch: ``input_ids``/``labels``/``attention_mask`` (and ``position_ids``)
    ``[B, T]`` (right padding, labels -100), ``base``: a ``BaseStats`` over the batch's labelled
    positions in ``labelled_positions`` order, and the router arrays concatenated ``[P, L, ...]``."""
    width = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long) if "position_ids" in rows[0] else None
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n], labels[b, :n], attention[b, :n] = r["input_ids"], r["labels"], 1
        if positions is not None:
            positions[b, :n] = r["position_ids"]
    cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k not in ("input_ids", "labels", "position_ids")}
    base = BaseStats(
        lse=cat["lse"],
        entropy=cat["entropy"],
        topk_ids=cat["topk_ids"],
        topk_logprobs=cat["topk_logprobs"],
        sample_ids=cat.get("tail_ids"),
        sample_logprobs=cat.get("tail_logprobs"),
    )
    assert base.num_positions == labelled_positions(labels)[0].numel(), "cache rows and their labels disagree"
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "base": base}
    if positions is not None:
        batch["position_ids"] = positions
    for k in ("router_logits", "router_topk_ids", "router_topk_logits"):
        if k in cat:
            batch[k] = cat[k]
    return batch
