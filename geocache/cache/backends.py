"""Two storage backends behind one small interface: write a shard's arrays, open a shard for reading.

A shard's arrays, in memory and on disk, are sequence-major and flat (``docs/cache-format.md``):

- per sequence ``[S]``: ``sequence_index``; offsets ``token_offsets``/``position_offsets`` ``[S+1]``
- per token ``[T]``: ``input_ids``, ``labels``, (``position_ids`` when packed)
- per labelled position ``[P, ...]``: ``lse``, ``entropy``, ``topk_ids``, ``topk_logprobs``,
  (``tail_ids``, ``tail_logprobs``), (``router_logits`` or ``router_topk_ids``/``router_topk_logprobs``)

Zarr v3: a group per shard, one array per name, chunked along the first axis, zstd-compressed with
a crc32c checksum per chunk, inside one sharding-codec file per array. Arrow IPC: one file per
shard, one row per sequence with list columns (token and position arrays as ``list<...>``, the
trailing dimensions as fixed-size lists), uncompressed so that it memory-maps with zero copies.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

TOKEN_KEYS = ("input_ids", "labels", "position_ids")
POSITION_KEYS = (
    "lse",
    "entropy",
    "topk_ids",
    "topk_logprobs",
    "tail_ids",
    "tail_logprobs",
    "router_logits",
    "router_topk_ids",
    "router_topk_logprobs",
    "router_topk_logits",  # caches written before router_topk_logprobs
)
# The MoE router arrays a shard may hold (the last only in caches written before the log-probs).
ROUTER_KEYS = ("router_logits", "router_topk_ids", "router_topk_logprobs", "router_topk_logits")
BACKENDS = ("zarr", "arrow")


class ShardView:
    """Read access to one shard: offsets in memory, arrays sliced on demand."""

    def __init__(self, sequence_index: np.ndarray, token_offsets: np.ndarray, position_offsets: np.ndarray, arrays: dict):
        self.sequence_index = sequence_index
        # Offsets as Python lists and (name, array, per-token?) triples: a row is read per batch
        # element, and numpy scalar indexing costs more than the slices themselves.
        self.token_offsets = token_offsets.tolist()
        self.position_offsets = position_offsets.tolist()
        self.arrays = arrays  # name → object supporting [a:b] slicing into numpy
        self._columns = [(name, arr, name in TOKEN_KEYS, isinstance(arr, np.ndarray)) for name, arr in arrays.items()]

    def __len__(self) -> int:
        return len(self.sequence_index)

    def row(self, i: int) -> dict[str, np.ndarray]:
        t0, t1 = self.token_offsets[i], self.token_offsets[i + 1]
        p0, p1 = self.position_offsets[i], self.position_offsets[i + 1]
        out = {}
        for name, arr, per_token, is_numpy in self._columns:
            part = arr[t0:t1] if per_token else arr[p0:p1]
            out[name] = part if is_numpy else np.asarray(part)
        return out


# ----------------------------------------------------------------------------------------------
# Zarr v3
# ----------------------------------------------------------------------------------------------


def _zarr_store(fs, path: str, read_only: bool):
    import zarr.storage

    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return zarr.storage.LocalStore(path, read_only=read_only)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    afs = fs if getattr(fs, "async_impl", False) else AsyncFileSystemWrapper(fs, asynchronous=True)
    return zarr.storage.FsspecStore(afs, path=path, read_only=read_only)


class DecodedChunks:
    """A bounded LRU of decoded Zarr chunks, shared by every array of every shard a reader opens.

    Zarr decodes (zstd + crc32c) a whole chunk for any slice of it and keeps nothing, so shuffled
    row reads decoded one 2,048-row chunk per array per row (~1.2 ms each). Written by hand: zarr
    3.1 has no decoded-chunk cache to turn on. ``max_bytes=0`` turns it off."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.bytes = 0
        self._lru: "OrderedDict[tuple, np.ndarray]" = OrderedDict()

    def get(self, key: tuple, load) -> np.ndarray:
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit
        value = load()
        value.flags.writeable = False  # rows handed out are views of it
        if value.nbytes <= self.max_bytes:
            self._lru[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._lru.popitem(last=False)
                self.bytes -= old.nbytes
        return value


class _CachedZarrArray:
    """``arr[a:b]`` of a Zarr array, assembled from whole decoded chunks held in ``DecodedChunks``."""

    def __init__(self, arr, key: tuple, chunks: DecodedChunks):
        self.arr, self.key, self.chunks = arr, key, chunks
        self.rows = arr.chunks[0]
        self.n = arr.shape[0]

    def _chunk(self, c: int) -> np.ndarray:
        return self.chunks.get((*self.key, c), lambda: np.asarray(self.arr[c * self.rows : min((c + 1) * self.rows, self.n)]))

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b = s.start, s.stop
        if b <= a:
            return np.asarray(self.arr[a:b])
        c0, c1 = a // self.rows, (b - 1) // self.rows
        parts = [self._chunk(c)[max(a - c * self.rows, 0) : b - c * self.rows] for c in range(c0, c1 + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class ZarrBackend:
    name = "zarr"
    suffix = ".zarr"

    def __init__(self, rows_per_chunk: int = 2048, zstd_level: int = 3):
        self.rows_per_chunk = rows_per_chunk
        self.zstd_level = zstd_level

    def write(self, fs, path: str, arrays: dict[str, np.ndarray]) -> None:
        import zarr
        from zarr.codecs import Crc32cCodec, ZstdCodec

        group = zarr.open_group(store=_zarr_store(fs, path, read_only=False), mode="w")
        for name, data in arrays.items():
            chunk = (max(1, min(self.rows_per_chunk, data.shape[0])),) + data.shape[1:]
            shard = (max(chunk[0], -(-data.shape[0] // chunk[0]) * chunk[0]),) + data.shape[1:]
            arr = group.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunk,
                shards=shard,
                compressors=[ZstdCodec(level=self.zstd_level), Crc32cCodec()],
                fill_value=0,
            )
            if data.size:
                arr[...] = data

    def open(self, fs, path: str, chunks: Optional[DecodedChunks] = None) -> ShardView:
        import zarr

        group = zarr.open_group(store=_zarr_store(fs, path, read_only=True), mode="r")
        names = set(group.array_keys())
        arrays = {n: group[n] for n in (*TOKEN_KEYS, *POSITION_KEYS) if n in names}
        if chunks is not None and chunks.max_bytes > 0:
            arrays = {n: _CachedZarrArray(a, (path, n), chunks) for n, a in arrays.items()}
        return ShardView(group["sequence_index"][:], group["token_offsets"][:], group["position_offsets"][:], arrays)


# ----------------------------------------------------------------------------------------------
# Arrow IPC
# ----------------------------------------------------------------------------------------------


def _nested_list(values: np.ndarray, offsets: np.ndarray):
    """``list<fixed_size_list<...>>`` over ``values [P, ...]`` split by ``offsets [S+1]``."""
    import pyarrow as pa

    flat = pa.array(values.reshape(-1))
    for dim in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)


def _flatten(column) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [S+1], values [P, ...]) of a ``list<fixed_size_list<...>>`` column, zero-copy."""
    import pyarrow as pa

    offsets = column.offsets.to_numpy()
    values, shape = column.values, []
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.values
    flat = values.to_numpy(zero_copy_only=True)
    return offsets, flat.reshape((-1, *shape))


class ArrowBackend:
    name = "arrow"
    suffix = ".arrow"

    def write(self, fs, path: str, arrays: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        columns = {"sequence_index": pa.array(arrays["sequence_index"])}
        for name, data in arrays.items():
            if name in TOKEN_KEYS:
                columns[name] = _nested_list(data, arrays["token_offsets"])
            elif name in POSITION_KEYS:
                columns[name] = _nested_list(data, arrays["position_offsets"])
        batch = pa.RecordBatch.from_pydict(columns)
        with fs.open(path, "wb") as f, pa.ipc.new_file(f, batch.schema) as writer:
            writer.write_batch(batch)

    def open(self, fs, path: str, chunks: Optional[DecodedChunks] = None) -> ShardView:
        """Memory-mapped, zero-copy; ``chunks`` is accepted for a common signature and unused."""
        import pyarrow as pa

        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            source = pa.memory_map(path, "r")
        else:
            source = pa.BufferReader(fs.cat_file(path))
        batch = pa.ipc.open_file(source).get_batch(0)
        arrays: dict[str, np.ndarray] = {}
        token_offsets: Optional[np.ndarray] = None
        position_offsets: Optional[np.ndarray] = None
        for name in batch.schema.names:
            if name == "sequence_index":
                continue
            offsets, values = _flatten(batch.column(name))
            arrays[name] = values
            if name in TOKEN_KEYS:
                token_offsets = offsets
            else:
                position_offsets = offsets
        seq_index = batch.column("sequence_index").to_numpy()
        return ShardView(seq_index, token_offsets, position_offsets, arrays)


def get_backend(name: str):
    if name == "zarr":
        return ZarrBackend()
    if name == "arrow":
        return ArrowBackend()
    raise ValueError(f"backend {name!r} must be one of {', '.join(BACKENDS)}")
