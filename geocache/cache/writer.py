"""Write shards in a background thread, each committed atomically and recorded with its checksum.

Commit protocol (crash-safe at every step): write the shard under a temporary name
(``shards/.tmp-…``); rename it to its final name; checksum it; rewrite this rank's part manifest
(``parts/rank-NNN.json``, itself written to a temporary file and renamed). A shard is part of the
cache only once its rank's part lists it; anything else under ``shards/`` is debris from an
interrupted run and is removed by ``--resume``.
"""

from __future__ import annotations

import errno
import posixpath
import queue
import threading
import time
from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from geocache.cache.backends import POSITION_KEYS, TOKEN_KEYS
from geocache.cache.manifest import PARTS_DIR, SHARDS_DIR, Manifest, ShardInfo, shard_checksum


class CacheWriteError(RuntimeError):
    """A shard could not be written; nothing half-written was kept."""


def atomic_write_text(fs, path: str, text: str) -> None:
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{posixpath.basename(path)}")
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


def part_path(root: str, rank: int) -> str:
    return posixpath.join(root, PARTS_DIR, f"rank-{rank:03d}.json")


def shard_name(rank: int, index: int, suffix: str) -> str:
    return posixpath.join(SHARDS_DIR, f"rank{rank:03d}-{index:06d}{suffix}")


def pack_shard(records: list[dict]) -> dict[str, np.ndarray]:
    """Concatenate per-sequence records into a shard's flat arrays with offsets."""
    out: dict[str, np.ndarray] = {"sequence_index": np.array([r["sequence_index"] for r in records], dtype=np.int64)}
    t_len = [len(r["input_ids"]) for r in records]
    p_len = [len(r["lse"]) for r in records]
    out["token_offsets"] = np.concatenate([[0], np.cumsum(t_len)]).astype(np.int64)
    out["position_offsets"] = np.concatenate([[0], np.cumsum(p_len)]).astype(np.int64)
    for name in (*TOKEN_KEYS, *POSITION_KEYS):
        if name in records[0]:
            out[name] = np.concatenate([r[name] for r in records], axis=0)
    return out


class ShardWriter:
    """Accumulates per-sequence records and commits a shard every ``shard_sequences`` of them.

    ``put`` hands a record to the writer thread (it blocks only when ``max_pending`` records are
    queued, so the forward pass runs ahead of I/O); ``close`` flushes the last partial shard and
    re-raises any error from the thread.
    """

    def __init__(
        self,
        fs,
        root: str,
        backend,
        part: Manifest,
        rank: int,
        shard_sequences: int,
        stride: int = 1,
        max_pending: int = 64,
        on_commit: Optional[Callable[[ShardInfo], None]] = None,
    ) -> None:
        self.fs, self.root, self.backend, self.part, self.rank = fs, root, backend, part, rank
        self.shard_sequences = shard_sequences
        self.stride = stride
        self.on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._pending: list[dict] = []
        self.write_s = 0.0  # seconds spent packing, writing and committing shards
        self._next_index = max((s.index for s in part.shards if s.rank == rank), default=-1) + 1
        self._thread = threading.Thread(target=self._run, name="geocache-shard-writer", daemon=True)
        self._thread.start()

    def put(self, record: dict) -> None:
        self._raise_if_failed()
        self._queue.put(record)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if self._error is not None:  # drain after a failure so that put() never blocks forever
                if record is None:
                    return
                continue
            try:
                if record is None:
                    if self._pending:
                        started = time.perf_counter()
                        self._commit(self._pending)
                        self.write_s += time.perf_counter() - started
                    return
                self._pending.append(record)
                if len(self._pending) >= self.shard_sequences:
                    started = time.perf_counter()
                    self._commit(self._pending)
                    self.write_s += time.perf_counter() - started
                    self._pending = []
            except BaseException as exc:  # handed to the main thread by put()/close()
                self._error = exc
                if record is None:
                    return

    def _commit(self, records: list[dict]) -> None:
        index = self._next_index
        name = shard_name(self.rank, index, self.backend.suffix)
        final = posixpath.join(self.root, name)
        tmp = posixpath.join(self.root, SHARDS_DIR, f".tmp-{posixpath.basename(name)}")
        arrays = pack_shard(records)
        seq = arrays["sequence_index"]
        assert (np.diff(seq) == self.stride).all(), "a shard's sequences must follow its rank's stride"
        try:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
            self.backend.write(self.fs, tmp, arrays)
            self.fs.mv(tmp, final, recursive=True)
            digest, size = shard_checksum(self.fs, final)
            info = ShardInfo(
                name=name,
                rank=self.rank,
                index=index,
                first_sequence=int(seq[0]),
                stride=self.stride,
                sequences=len(records),
                tokens=int(arrays["token_offsets"][-1]),
                positions=int(arrays["position_offsets"][-1]),
                bytes=size,
                sha256=digest,
            )
            part = replace(self.part, shards=[*self.part.shards, info])
            part.recount()
            atomic_write_text(self.fs, part_path(self.root, self.rank), part.to_json())
        except OSError as exc:
            for leftover in (tmp, final):
                try:
                    if self.fs.exists(leftover):
                        self.fs.rm(leftover, recursive=True)
                except OSError:
                    pass
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise CacheWriteError(
                f"could not write shard {name} under {self.root}: {reason}; nothing half-written was kept, "
                "so free space and rerun with --resume"
            ) from exc
        self.part = part
        self._next_index += 1
        if self.on_commit:
            self.on_commit(info)
