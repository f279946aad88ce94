"""``open_cache``: a cache as a random-access, sized ``Dataset`` of rows, plus batch collation.

Rows come back in global sequence order whatever the number of ranks that wrote them. Shards are
opened lazily, once per process (so ``DataLoader`` workers each open their own). Each shard's
checksum is verified the first time any process touches it: the "verified" flags live in shared
memory, so ``DataLoader`` workers (new processes every epoch unless ``persistent_workers``) do not
hash the whole cache again each epoch.

``DataLoader`` fetches a batch through ``__getitems__``, which returns a ``CacheRows``: the rows
located (shard arrays and offsets; indices checked, shards opened and verified) but not sliced.
``collate_cache_rows`` slices each array of each row straight into one concatenation per array, in
the stored dtypes (memory-mapped views for Arrow), and pads and widens the ids once per batch.
Per-row dicts of slices, and torch tensors built row by row, cost more than reading the bytes
(``benchmarks/results/storage.md``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from geocache.cache.backends import ROUTER_KEYS, TOKEN_KEYS, DecodedChunks, ShardView, get_backend
from geocache.cache.manifest import MANIFEST, PARTS_DIR, Manifest, first_difference, shard_checksum
from geocache.signals import IGNORE_INDEX, BaseStats

LONG_KEYS = ("input_ids", "labels", "position_ids", "topk_ids", "tail_ids", "router_topk_ids")


class CacheError(ValueError):
    """A cache that cannot be read as asked: missing, incomplete, corrupt or incompatible."""


def _fs(url: str, storage_options: Optional[dict] = None):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # fsspec's own words name the package ("Install s3fs to access S3")
        raise CacheError(f"{url!r} needs a filesystem package that is not installed: {exc}") from None


def read_manifest(fs, root: str) -> Manifest:
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        parts = posixpath.join(root, PARTS_DIR)
        names = [p for p in (fs.ls(parts, detail=False) if fs.exists(parts) else []) if re.fullmatch(r"rank-\d{3}\.json", posixpath.basename(p))]
        if names:  # a precompute that committed shards and did not finish
            shards = 0
            for name in names:
                try:
                    shards += len(json.loads(fs.cat_file(name).decode()).get("shards", []))
                except (ValueError, OSError, AttributeError):
                    pass
            raise CacheError(f"cache {root!r} is incomplete: it has no {MANIFEST} yet, and its parts list {shards} committed shard(s) of a "
                             "precompute that did not finish (interrupted, or still running); rerun that precompute with --resume")
        raise CacheError(f"{root!r} is not a geocache cache: it has no {MANIFEST} (was precompute run, or did it not finish?)")
    return Manifest.from_json(fs.cat_file(path).decode(), where=path)


class CacheReader(torch.utils.data.Dataset):
    """Rows of a cache: dicts of tensors with ``input_ids``, ``labels``, ``lse``, ``entropy``,
    ``topk_ids``, ``topk_logprobs`` (+ ``tail_ids``/``tail_logprobs`` when m > 0, ``router_logits``
    or ``router_topk_ids``/``router_topk_logprobs`` for MoE, ``position_ids`` when packed).

    Token arrays are ``[T]`` and per-position arrays ``[P, ...]`` where P is the number of
    labelled positions of the row (``labelled_positions`` order). Ids come back as int64;
    log-probs and router logits in their stored dtype.
    """

    def __init__(self, url: str, *, verify: bool = True, storage_options: Optional[dict] = None, decoded_cache_bytes: int = 1 << 30):
        self.url = url
        self.decoded_cache_bytes = decoded_cache_bytes
        self.fs, self.root = _fs(url, storage_options)
        self.manifest = read_manifest(self.fs, self.root)
        if not self.manifest.complete and not self.manifest.counts.get("sequences"):
            c = self.manifest.counts
            raise CacheError(f"cache {url!r} is empty: its precompute cached no sequence ({c.get('skipped_rows', 0)} malformed row(s) "
                             f"skipped, {c.get('unlabelled_rows', 0)} left without a label); fix the data (or --max-length) and rerun it")
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
        self._chunks = DecodedChunks(decoded_cache_bytes)  # Zarr only: decoded chunks, LRU, per process
        # One byte per shard, in shared memory: set once a shard's checksum has been checked by any
        # process holding this reader (the parent or a DataLoader worker, forked or spawned).
        self._verified = torch.zeros(len(self.manifest.shards), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker gets the reader pickled: open shards (memory-mapped arrays,
        # Zarr handles) and decoded chunks stay behind; the worker opens its own.
        state = dict(self.__dict__)
        state.update(_views={}, _chunks=DecodedChunks(self.decoded_cache_bytes))
        return state

    def _view(self, i: int) -> ShardView:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._views, self._pid, self._chunks = {}, os.getpid(), DecodedChunks(self.decoded_cache_bytes)
        view = self._views.get(i)
        if view is None:
            info = self.manifest.shards[i]
            path = posixpath.join(self.root, info.name)
            if not self.fs.exists(path):
                raise CacheError(f"shard {info.name} of cache {self.url!r} is missing")
            if self.verify and not self._verified[i]:
                if shard_checksum(self.fs, path)[0] != info.sha256:
                    raise CacheError(f"shard {info.name} of cache {self.url!r} fails its checksum: the cache is corrupt")
                self._verified[i] = 1
            try:
                view = self.backend.open(self.fs, path, chunks=self._chunks)
            except Exception as exc:  # any decoder error on a shard means corruption to the user
                raise CacheError(f"shard {info.name} of cache {self.url!r} cannot be read ({exc})") from None
            # The manifest is not checksummed itself: its row count for the shard is checked against
            # the shard (an edited count silently dropped rows, or failed later without a name).
            if len(view) != info.sequences or view.token_offsets[-1] != info.tokens or view.position_offsets[-1] != info.positions:
                raise CacheError(f"shard {info.name} of cache {self.url!r} holds {len(view)} sequences, {view.token_offsets[-1]} tokens and "
                                 f"{view.position_offsets[-1]} positions, but the manifest lists {info.sequences}, {info.tokens} and "
                                 f"{info.positions}: the cache is corrupt")
            self._views[i] = view
        return view

    def _row(self, idx: int) -> dict[str, np.ndarray]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"row {idx} out of range for a cache of {len(self)} rows")
        idx = int(idx) % len(self)
        shard = int(self._shard_of[idx])
        view = self._view(shard)  # raises CacheError itself
        try:
            return view.row(int(self._local[idx]))
        except Exception as exc:
            info = self.manifest.shards[shard]
            raise CacheError(f"shard {info.name} of cache {self.url!r} cannot be read ({exc})") from None

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        row = self._row(idx)
        return {k: torch.from_numpy(v.astype(np.int64) if k in LONG_KEYS else np.array(v)) for k, v in row.items()}

    def __getitems__(self, indices) -> "CacheRows":
        """The rows of one batch, for ``DataLoader``: a ``CacheRows`` (a sequence of row dicts of
        numpy arrays in their stored dtypes, ids not widened, read-only memory-mapped views for
        Arrow) to be handed to ``collate_cache_rows``, which copies them into the batch. Use
        ``cache[i]`` for a row of owned tensors."""
        return CacheRows(self, indices)

    def check_compatible(self, model=None, tokenizer=None, expected: Optional[dict] = None, data_config=None) -> None:
        """Refuse, in one sentence, a cache built for another model, revision, tokenizer or
        preprocessing. ``data_config`` (a ``geocache.data.DataConfig``): the preprocessing the
        caller expects (max length, packing, masking, chat template use, caps, split or slice);
        ``expected``: a whole manifest fingerprint (``Manifest.fingerprint()``) of the run that
        wants to read this cache. Any difference is named."""
        from geocache.data import tokenizer_fingerprint
        from geocache.models import model_fingerprint, output_size, same_weights

        base = self.manifest.base_model
        if model is not None and not isinstance(model, torch.nn.Module):  # e.g. (tokenizer, model), swapped
            raise TypeError(f"check_compatible takes the model first (a torch module), then the tokenizer; got a {type(model).__name__} "
                            "as the model")
        if model is not None:
            fp = model_fingerprint(model)
            if fp["config_sha256"] != base["config_sha256"] or not same_weights(fp, base):
                which = "config" if fp["config_sha256"] != base["config_sha256"] else "weights"
                dtypes = {str(base.get("dtype")), str(next(model.parameters()).dtype).removeprefix("torch.")}
                hint = (" (a float16 and a bfloat16 load of one model are two roundings of it: use one of them, or float32, for both)"
                        if which == "weights" and dtypes == {"float16", "bfloat16"} else "")
                revision = f" (revision {base['revision']})" if base.get("revision") else ""
                raise CacheError(
                    f"cache {self.url!r} was built for base model {base['id']!r}{revision}, "
                    f"and this model's {which} {'differs' if which == 'config' else 'differ'} from it{hint}"
                )
            if output_size(model) != base["output_size"]:
                raise CacheError(f"cache {self.url!r} covers {base['output_size']} output rows but the model has {output_size(model)}")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest.tokenizer_sha256:
            raise CacheError(f"cache {self.url!r} was built with another tokenizer than the one given")
        if data_config is not None:
            wanted = data_config.fingerprint_fields(tokenizer)
            if tokenizer is None and wanted["add_bos"] and not self.manifest.data["preprocessing"].get("add_bos"):
                wanted["add_bos"] = False  # asked, but whether the tokenizer adds anything is unknown without it
            diff = first_difference(self.manifest.data.get("preprocessing"), wanted, "preprocessing")
            if diff:
                raise CacheError(f"cache {self.url!r} was built with different preprocessing ({diff})")
        if expected is not None:
            diff = first_difference(self.manifest.fingerprint(), expected)
            if diff:
                raise CacheError(f"cache {self.url!r} was built with different settings ({diff})")


def open_cache(url: str, *, verify: bool = True, storage_options: Optional[dict] = None, decoded_cache_bytes: int = 1 << 30) -> CacheReader:
    """Open a cache directory or fsspec URL for reading (see ``CacheReader``). ``decoded_cache_bytes``
    bounds the decoded Zarr chunks kept per process (LRU; 0 keeps none; Arrow needs none)."""
    return CacheReader(url, verify=verify, storage_options=storage_options, decoded_cache_bytes=decoded_cache_bytes)


class CacheRows(Sequence):
    """The rows of one batch as ``CacheReader.__getitems__`` returns them: a sequence of row dicts
    (``rows[i]`` reads row i), which also holds each row located, (shard arrays, token start, token
    end, position start, position end), for ``collate_cache_rows`` to slice straight into the
    batch. Out-of-range indices, missing or corrupt shards fail here, as in ``cache[i]``."""

    def __init__(self, reader: CacheReader, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(reader)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"row {int(idx[bad][0])} out of range for a cache of {n} rows")
        idx = idx % max(n, 1)
        self.reader, self.indices, self.located = reader, idx, []
        for shard, i in zip(reader._shard_of[idx].tolist(), reader._local[idx].tolist()):
            view = reader._view(shard)
            to, po = view.token_offsets, view.position_offsets
            self.located.append((view.arrays, to[i], to[i + 1], po[i], po[i + 1]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.reader._row(int(j)) for j in self.indices[i]]
        return self.reader._row(int(self.indices[i]))


def collate_cache_rows(rows: list[dict], pad_token_id: int = 0, shared: Optional[bool] = None) -> dict:
    """Pad rows into a batch: ``input_ids``/``labels``/``attention_mask`` (and ``position_ids``)
    ``[B, T]`` (right padding, labels -100), ``base``: a ``BaseStats`` over the batch's labelled
    positions in ``labelled_positions`` order, and the router arrays concatenated ``[P, L, ...]``.

    Rows may hold tensors (``cache[i]``) or numpy arrays (``cache.__getitems__``, what
    ``DataLoader`` uses). Token arrays are int64; the statistics' ids (``topk_ids``, ``sample_ids``,
    ``router_topk_ids``) int32.

    Each array is filled by one numpy concatenation of the rows' slices (``CacheRows`` hands over
    where the rows are, not row dicts). In a ``DataLoader`` worker (or with ``shared=True``)
    every tensor of the batch is a view of one shared-memory buffer, so a batch crosses to the
    main process as one segment instead of one per tensor (what made workers slower than none;
    ``default_collate`` allocates per field, and pads nothing, hence this by hand).
    """
    if isinstance(rows, CacheRows):
        try:
            out, arrays = _collate_located(rows.located, pad_token_id, shared)
        except Exception as exc:
            for i in rows.indices.tolist():  # name the shard that cannot be read, as ``cache[i]`` does
                rows.reader._row(i)
            raise CacheError(f"cache {rows.reader.url!r} cannot be read ({exc})") from exc  # a read that failed once
    else:
        rows = [{k: v.numpy() for k, v in r.items()} if isinstance(r["lse"], torch.Tensor) else r for r in rows]
        out, arrays = _collate_located([(r, 0, len(r["input_ids"]), 0, len(r["lse"])) for r in rows], pad_token_id, shared)
    n_pos, n_labelled = len(arrays["lse"]), int(np.count_nonzero(arrays["labels"][:, 1:] != IGNORE_INDEX))
    if n_pos != n_labelled:
        raise CacheError(f"cache rows hold {n_pos} positions but their labels mark {n_labelled}: the cache is corrupt")
    base = BaseStats(
        lse=out["lse"],
        entropy=out["entropy"],
        topk_ids=out["topk_ids"],
        topk_logprobs=out["topk_logprobs"],
        sample_ids=out.get("tail_ids"),
        sample_logprobs=out.get("tail_logprobs"),
    )
    batch = {k: out[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in out}
    batch["base"] = base
    for k in ROUTER_KEYS:
        if k in out:
            batch[k] = out[k]
    return batch


def _collate_located(located: list[tuple], pad_token_id: int, shared: Optional[bool]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The batch's tensors, and numpy views of them, from rows located as ``(arrays, t0, t1, p0,
    p1)``: row b is ``arrays[name][t0:t1]`` (tokens) and ``arrays[name][p0:p1]`` (positions). Each
    array is one concatenation of the rows' slices (padded rows: one copy per row)."""
    B = len(located)
    lengths = [t1 - t0 for _, t0, t1, _, _ in located]
    width = max(lengths)
    n_pos = sum(p1 - p0 for _, _, _, p0, p1 in located)
    first = located[0][0]
    layout = {k: ((B, width), np.int64) for k in ("input_ids", "labels", "attention_mask", *(("position_ids",) if "position_ids" in first else ()))}
    parts = {k: [a[k][p0:p1] for a, _, _, p0, p1 in located] for k in first if k not in TOKEN_KEYS}
    for k, (part, *_) in parts.items():
        # Ids as int32, not int64: gather/scatter take them, and the batch (and its copy to an
        # accelerator, where ``BaseStats.to`` widens them) is up to 1.7x smaller at k = 256.
        layout[k] = ((n_pos, *part.shape[1:]), np.int32 if k in LONG_KEYS else part.dtype)
    out, arrays = _one_buffer(layout, torch.utils.data.get_worker_info() is not None if shared is None else shared)
    uniform = min(lengths) == width
    np.less(np.arange(width), np.array(lengths)[:, None], out=arrays["attention_mask"], casting="unsafe")
    for k, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("position_ids", 0)):
        if k not in arrays:
            continue
        if uniform:  # packed rows of max_length: one copy, nothing to pad
            np.concatenate([a[k][t0:t1] for a, t0, t1, _, _ in located], out=arrays[k].reshape(-1), casting="unsafe")
        else:
            dest = arrays[k]
            dest.fill(fill)
            for b, (a, t0, t1, _, _) in enumerate(located):
                dest[b, : t1 - t0] = a[k][t0:t1]
    for k, part in parts.items():
        np.concatenate(part, out=arrays[k], casting="unsafe")
    return out, arrays


def _one_buffer(layout: dict[str, tuple[tuple, np.dtype]], shared: bool) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Empty tensors of the given shapes and dtypes, and numpy views of them to fill. ``shared``:
    views of one shared-memory buffer (64-byte aligned each), so that a worker sends the batch as
    one segment and without a copy; else plain numpy allocations (a torch view per array costs
    more than the copy into it at these sizes)."""
    if not shared:
        arrays = {k: np.empty(shape, dtype) for k, (shape, dtype) in layout.items()}
        return {k: torch.from_numpy(a) for k, a in arrays.items()}, arrays
    # Byte offset of each array, rounded up to 64 bytes.
    offsets, total = {}, 0
    for k, (shape, dtype) in layout.items():
        offsets[k] = total
        total += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // 64) * 64
    storage = torch.UntypedStorage._new_shared(total)
    tensors, arrays = {}, {}
    for k, (shape, dtype) in layout.items():
        dt = torch.from_numpy(np.empty(0, dtype)).dtype
        t = torch.empty(0, dtype=dt).set_(storage, offsets[k] // dt.itemsize, shape)
        tensors[k], arrays[k] = t, t.numpy()
    return tensors, arrays

