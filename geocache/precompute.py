"""``geocache precompute``: stream a dataset through the frozen base once and cache its statistics.

Reads top to bottom: resolve the run (model, sizes, MoE layout, manifest template) → check the
output (fresh, resume or overwrite) → stream sequences, this rank's share only → forward each batch
under ``no_grad`` → ``compute_base_stats`` per sequence (per group of them on an accelerator) →
hand records to the background shard writer → merge the ranks' parts into ``manifest.json``.

The output projection is not run by the model: a hook keeps the last hidden states, and only the
labelled rows are projected, into one buffer reused from batch to batch (``fused_head``), which the
statistics pass reads in place: no fresh ``[batch, length, vocab]`` logits per batch, no copy of
the rows, no projection of prompt tokens. A probe at load time (8 tokens) checks that the model's
logits are exactly that projection; when they are not (soft-capping, a logit scale), the model's
own logits are used.

Under ``torchrun``/``accelerate launch`` rank r takes sequences r, r + W, r + 2W, ... of the one
deterministic stream, writes its own shards and part manifest; rank 0 merges them at the end.
Tail samples are drawn with a generator seeded from (seed, sequence index), so a resumed or
differently-split run caches exactly the same rows.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import numpy as np
import torch

import geocache
from geocache.cache.backends import BACKENDS, get_backend
from geocache.cache.manifest import FORMAT_VERSION, LOGS_DIR, MANIFEST, PARTS_DIR, SHARDS_DIR, Manifest, ShardInfo, first_difference
from geocache.cache.reader import CacheError, _fs
from geocache.cache.writer import CacheWriteError, ShardWriter, atomic_write_text, part_path
from geocache.config import check_option_types, unknown_options
from geocache.data import DataConfig, Sequence, check_hub_options, count_rows, data_fingerprint, iter_sequences, load_examples, slice_bounds, tokenizer_fingerprint
from geocache.losses import router_log_probs
from geocache.models import input_device, load_model_and_tokenizer, model_fingerprint, moe_layout, output_size
from geocache.moe import choice_scores, recorded_router_logits, routing_choice
from geocache.signals import BaseStats, compute_base_stats, labelled_positions, tail_uniforms

ROUTER_MODES = ("auto", "full", "topk", "none")
# Above this many router logits per token (MoE layers × experts), `auto` keeps only the top-(k+1)
# per layer: 2,048 float16 values are 4 KiB per token, already ~20x the LM statistics.
_FULL_ROUTER_LIMIT = 2048
# Most logits projected by one matrix product in the fused-head path (1,766 rows at V = 151,936).
_PROJECT_BYTES = 1 << 30
# On an accelerator, rows per statistics chunk: 512 MiB of float32 per chunk buffer (up to four of
# them), 883 rows at V = 151,936, whatever the call's rows. The default (a quarter of the call's
# rows, for a CPU's cache) made four chunks of each sequence: on an H200, eight 1,023-row sequences
# took 80.7 ms that way, 43.4 ms in one chunk each, 35.0 ms in one call of one chunk, 48.4 ms in one
# call of 256-row chunks (cuda_check.md, "stats_pass_gpu"): ~0.4 ms a chunk.
_ACCEL_CHUNK_ELEMENTS = 1 << 27


@dataclass
class PrecomputeConfig:
    model: str = field(metadata={"help": "Base model: a local directory or a hub id."})
    data: list[str] = field(metadata={"help": "Data files, directories of them, or a hub dataset id."})
    out: str = field(metadata={"help": "Cache directory or fsspec URL."})
    revision: Optional[str] = field(default=None, metadata={"help": "Model revision (hub)."})
    # Arrow by measurement (benchmarks/results/storage.md): shuffled random access 96-199x faster
    # than Zarr per row; Zarr stores 18-28% fewer bytes and suits object stores and archives.
    backend: str = field(default="arrow", metadata={"help": "Storage backend: arrow (default: fast random access) | zarr (compressed)."})
    # k and m by measurement (benchmarks/results/fidelity.md): with the sampled tail estimators,
    # k=32 and m=16 are the most faithful KL within 200 LM bytes/token (Arrow) on the reference model.
    k: int = field(default=32, metadata={"help": "Top-k token log-probs cached per position."})
    m: int = field(default=16, metadata={"help": "Tail samples (outside the top-k) cached per position."})
    router: str = field(default="auto", metadata={"help": "MoE router logits: auto | full | topk | none."})
    router_k: Optional[int] = field(default=None, metadata={"help": "Experts kept per layer with router=topk (default top_k + 1)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    dtype: str = field(default="float32", metadata={"help": "Base compute dtype: float32 | bfloat16 | float16."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    device_map: Optional[str | dict] = field(default=None, metadata={"help": "accelerate device_map for bases larger than one device: auto, balanced, sequential, or a JSON mapping of module names to devices, cpu or disk."})
    max_memory: Optional[str | dict] = field(default=None, metadata={"help": "With --device-map: memory per device, JSON, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'."})
    offload_folder: Optional[str] = field(default=None, metadata={"help": "With --device-map: where weights that fit on no device are offloaded."})
    seed: int = field(default=0, metadata={"help": "Seed of the tail samples."})
    shard_sequences: int = field(default=256, metadata={"help": "Sequences per shard."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run after its last committed shard."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a cache already at --out."})
    dry_run: bool = field(default=False, metadata={"help": "Only estimate size and token count; do not run the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless asked)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    fused_head: bool = field(default=True, metadata={"help": "Project only labelled positions, inside the statistics pass (the model's own logits are used when its output is not a plain projection of its last hidden state)."})
    compile_stats: Optional[bool] = field(default=None, metadata={"help": "Run the statistics pass's reduction over the logits as one torch.compile'd kernel (same statistics to float rounding); null: on CUDA with Triton, off elsewhere."})
    data_config: DataConfig = field(default_factory=DataConfig, metadata={"help": "How examples become sequences."})

    def __post_init__(self) -> None:
        check_option_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {', '.join(BACKENDS)}")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router={self.router!r} must be one of {', '.join(ROUTER_MODES)}")
        for name in ("k", "batch_size", "shard_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.m < 0:
            raise ValueError(f"m={self.m} must be >= 0")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        check_hub_options(self.data or [], self.data_config.subset, self.data_config.data_revision)  # before the model loads
        for name in ("device_map", "max_memory"):  # JSON from the command line, a mapping from YAML or Python
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}={value!r} is not a valid JSON mapping ({exc.msg})") from None
                setattr(self, name, value)
        if isinstance(self.max_memory, str):
            raise ValueError(f"max_memory={self.max_memory!r} must be a mapping of devices to sizes, e.g. '{{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}}'")
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            raise ValueError("max_memory and offload_folder place a base spread by device_map: give --device-map too")
        if self.device_map is not None and self.device is not None:
            raise ValueError("--device and --device-map contradict each other: a device_map places the model itself")


def _id_dtype(size: int) -> np.dtype:
    """Smallest unsigned integer type holding ids below ``size``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising a process group under torchrun when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class _Run:
    """Everything resolved about one precompute: model, sizes, layout, manifest template."""

    batch_statistics = False  # one statistics call per group of sequences on the CPU too (tests: the same arrays)

    def __init__(self, cfg: PrecomputeConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        device = cfg.device
        if device is None and torch.cuda.is_available() and cfg.device_map is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.model, self.tokenizer = load_model_and_tokenizer(
            cfg.model,
            revision=cfg.revision,
            dtype=cfg.dtype,
            device=device,
            device_map=cfg.device_map,
            max_memory=cfg.max_memory,
            offload_folder=cfg.offload_folder,
            trust_remote_code=cfg.trust_remote_code,
            weights=not cfg.dry_run,  # an estimate needs the structure (sizes, MoE layout), never the weights
            progress=cfg.progress,
        )
        self.out_size = output_size(self.model)
        if cfg.k > self.out_size:
            raise ValueError(f"k={cfg.k} exceeds the {self.out_size} output rows of model {cfg.model!r}")
        self.layout = moe_layout(self.model)
        # DeepSeek-V3 routes by biased sigmoid scores within expert groups: its top-(k+1) ids are
        # ranked by those, so the first k are the experts it routes to (their raw logits stored).
        self.choice = routing_choice(self.model) if self.layout is not None and not cfg.dry_run else None
        if self.layout is None and (cfg.router in ("full", "topk") or cfg.router_k is not None):
            asked = f"router={cfg.router}" if cfg.router in ("full", "topk") else f"router_k={cfg.router_k}"
            raise ValueError(f"router statistics were asked for ({asked}), but model {cfg.model!r} is dense")
        self.router_mode = self._router_mode()
        self.id_dtype = _id_dtype(self.out_size)
        self.template = self._template()
        self.timings = {"forward_s": 0.0, "statistics_s": 0.0}
        self.head = _plain_head(self.model) if cfg.fused_head and not cfg.dry_run else None
        self._proj_buf: Optional[torch.Tensor] = None

    def _router_mode(self) -> str:
        cfg, layout = self.cfg, self.layout
        if layout is None or cfg.router == "none":
            return "none"
        if cfg.router_k is not None and not layout["top_k"] <= cfg.router_k <= layout["num_experts"]:
            raise ValueError(f"router_k={cfg.router_k} must be between the model's top_k={layout['top_k']} and its {layout['num_experts']} experts")
        mode = cfg.router
        if cfg.router == "auto":
            mode = "full" if len(layout["layers"]) * layout["num_experts"] <= _FULL_ROUTER_LIMIT else "topk"
        if cfg.router_k is not None and mode != "topk":  # it was silently ignored
            why = "" if cfg.router == "full" else (f" (--router auto keeps full router logits for this model's {len(layout['layers'])} MoE "
                                                   f"layers × {layout['num_experts']} experts)")
            raise ValueError(f"router_k={cfg.router_k} applies only to top-k router statistics, and this run caches full ones{why}: "
                             "pass --router topk, or leave out --router-k")
        return mode

    def _template(self) -> Manifest:
        cfg = self.cfg
        moe = None
        if self.layout is not None:
            router_k = None
            if self.router_mode == "topk":
                router_k = cfg.router_k or min(self.layout["top_k"] + 1, self.layout["num_experts"])
            moe = {**self.layout, "router_mode": self.router_mode, "router_k": router_k}
            if self.router_mode == "topk":  # caches before it held raw logits: a resume must not mix the two
                moe["router_topk_values"] = "logprobs"
        return Manifest(
            format_version=FORMAT_VERSION,
            geocache_version=geocache.__version__,
            backend=cfg.backend,
            base_model={
                "id": cfg.model,
                "revision": cfg.revision,
                "model_type": self.model.config.model_type,
                **({} if cfg.dry_run else model_fingerprint(self.model)),
                "output_size": self.out_size,
                "tokenizer_size": len(self.tokenizer),
                "dtype": cfg.dtype,
            },
            tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            data={"source": data_fingerprint(cfg.data, cfg.data_config.data_revision),
                  "preprocessing": cfg.data_config.fingerprint_fields(self.tokenizer)},
            statistics={
                "k": cfg.k,
                "m": cfg.m,
                "temperature": 1.0,
                "seed": cfg.seed,
                "id_dtype": self.id_dtype.name,
                "logprob_dtype": "float16",
                "lse_dtype": "float32",
                "entropy_dtype": "float32",
                "router_dtype": "float16",
            },
            moe=moe,
            world_size=self.world,
        )

    # ------------------------------------------------------------------------------------------

    def sequences(self, bad_rows: list, unlabelled_rows: Optional[list] = None,
                  truncated_rows: Optional[list] = None, every_rank: bool = False) -> Iterator[tuple[int, Sequence]]:
        """This rank's sequences (every rank's with ``every_rank``), with their global index."""
        source, dc = self.template.data["source"], self.cfg.data_config
        # A hub dataset at the commit recorded in the manifest (its revision resolved once, here).
        rows = load_examples(self.cfg.data, split=dc.split, text_sample_by=dc.text_sample_by,
                             revision=source.get("commit") or dc.data_revision, subset=dc.subset)
        first_row = (slice_bounds(self.cfg.data, dc.split) or (0,))[0]  # row numbers in messages count from the data's start
        try:
            for i, seq in enumerate(iter_sequences(rows, self.tokenizer, self.cfg.data_config, bad_rows, unlabelled_rows, truncated_rows,
                                                   first_row=first_row)):
                if every_rank or i % self.world == self.rank:
                    yield i, seq
        except UnicodeDecodeError as exc:  # raised from inside datasets' readers, naming no file
            raise ValueError(f"data {', '.join(self.cfg.data)} is not UTF-8 text ({exc}); convert it, e.g. with iconv") from None

    @torch.no_grad()
    def records(self, batch: list[tuple[int, Sequence]]) -> list[dict]:
        """Forward a batch (each example segment on its own, right-padded) and build the records."""
        cfg, model = self.cfg, self.model
        segments = [(b, s, e) for b, (_, seq) in enumerate(batch) for s, e in seq.segments]
        width = max(e - s for _, s, e in segments)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(segments), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (b, s, e) in enumerate(segments):
            ids[j, : e - s] = torch.tensor(batch[b][1].input_ids[s:e])
            mask[j, : e - s] = 1
        device = input_device(model)
        want_router = self.router_mode != "none"
        started = time.perf_counter()
        # Router logits through hooks on the routers: output_router_logits=True would also compute
        # transformers' load-balancing loss, which precompute never reads.
        with _hidden_only(self.head) as kept, recorded_router_logits(model, enabled=want_router) as router_logits:
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        _sync(device)
        self.timings["forward_s"] += time.perf_counter() - started
        started = time.perf_counter()
        # [layers, segments*width, E]; with a device_map each layer's logits sit on its own device.
        router = torch.stack([r.to(router_logits[0].device) for r in router_logits]) if want_router else None

        # Flat row (segment row in the batch * width + offset in the segment) of every labelled position.
        seq_rows, seg_row = [], 0
        for _, seq in batch:
            positions, _ = labelled_positions(torch.tensor(seq.labels).unsqueeze(0))  # t whose label t+1 counts
            starts = torch.tensor([s for s, _ in seq.segments])
            seg_idx = torch.searchsorted(starts, positions, right=True) - 1
            seq_rows.append((seg_row + seg_idx) * width + (positions - starts[seg_idx]))
            seg_row += len(seq.segments)
        if self.head is None:
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            groups = [(logits, torch.cat(seq_rows).to(logits.device), [len(r) for r in seq_rows])]
        else:  # project the labelled rows only, then read each sequence's rows in place
            groups = self._project(kept[0].reshape(-1, kept[0].shape[-1]), seq_rows)
        indices = iter([i for i, _ in batch])
        stats = [st for source, rows, sizes in groups for st in self._statistics(source, rows, [next(indices) for _ in sizes], sizes)]

        records = []
        for (i, seq), rows, st in zip(batch, seq_rows, stats):
            rec = {
                "sequence_index": i,
                "input_ids": np.asarray(seq.input_ids, dtype=self.id_dtype),
                "labels": np.asarray(seq.labels, dtype=np.int32),
                "lse": st.lse.float().cpu().numpy(),
                "entropy": st.entropy.float().cpu().numpy(),
                "topk_ids": st.topk_ids.cpu().numpy().astype(self.id_dtype),
                "topk_logprobs": st.topk_logprobs.cpu().numpy().astype(np.float16),
            }
            if cfg.data_config.packing:
                rec["position_ids"] = np.asarray(seq.position_ids, dtype=np.int32)
            if cfg.m:
                rec["tail_ids"] = st.sample_ids.cpu().numpy().astype(self.id_dtype)
                rec["tail_logprobs"] = st.sample_logprobs.cpu().numpy().astype(np.float16)
            if router is not None:
                r = router[:, rows.to(router.device)].transpose(0, 1).float()  # [P, layers, E]
                if self.router_mode == "full":
                    rec["router_logits"] = r.cpu().numpy().astype(np.float16)
                else:
                    ids = choice_scores(r.transpose(0, 1), self.choice).topk(self.template.moe["router_k"], dim=-1).indices.transpose(0, 1)
                    rec["router_topk_ids"] = ids.cpu().numpy().astype(_id_dtype(self.layout["num_experts"]))
                    # log r in the router's scoring space at those experts: with them the router loss is
                    # the KL over S ∪ {rest} (0 at the base), not the escaped mass (not 0 there)
                    rec["router_topk_logprobs"] = router_log_probs(r, self.layout["scoring"]).gather(-1, ids).cpu().numpy().astype(np.float16)
            records.append(rec)
        self.timings["statistics_s"] += time.perf_counter() - started
        return records

    def _statistics(self, source: torch.Tensor, rows: Optional[torch.Tensor], indices: list[int], sizes: list[int]) -> list:
        """``BaseStats`` of consecutive sequences (``indices``, ``sizes`` labelled rows each) whose
        logits are ``source`` (its ``rows`` when given, else all of its rows, in order).

        Each sequence's tail samples come from its own seeded generator's uniforms, so one call
        over all of them gives what one call per sequence gives, whatever the batch: on an
        accelerator it is one call (fewer launches and host waits: 35 against 43 ms a batch on
        an H200, cuda_check.md), on the CPU one per sequence (the chunking its cache was tuned
        for). A non-finite logit is named by its sequence."""
        cfg = self.cfg
        chunk = _stats_chunk_rows(source.shape[-1], source.device)

        def uniforms(i: int, n: int) -> Optional[torch.Tensor]:
            if not cfg.m:
                return None
            return tail_uniforms(n, cfg.m, torch.Generator(device=source.device).manual_seed((cfg.seed * 1_000_003 + i) % (2**63)), source.device)

        def one(i: int, start: int, n: int):
            part, part_rows = (source, rows[start : start + n]) if rows is not None else (source[start : start + n], None)
            try:
                return compute_base_stats(part, k=cfg.k, m=cfg.m, rows=part_rows, uniforms=uniforms(i, n), chunk_size=chunk, compiled=cfg.compile_stats)
            except ValueError as exc:
                raise ValueError(f"sequence {i}: {exc}") from None

        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        if len(sizes) == 1 or (source.device.type == "cpu" and not self.batch_statistics):
            return [one(i, start, n) for i, start, n in zip(indices, starts, sizes)]
        u = torch.cat([uniforms(i, n) for i, n in zip(indices, sizes)]) if cfg.m else None
        try:
            st = compute_base_stats(source, k=cfg.k, m=cfg.m, rows=rows, uniforms=u, chunk_size=chunk, compiled=cfg.compile_stats)
        except ValueError:  # name the sequence: find it one by one (rare)
            return [one(i, start, n) for i, start, n in zip(indices, starts, sizes)]
        # To the host in one copy per array for the group, not one per array and sequence (each a
        # host wait), already in the stored dtypes (half the bytes; float16 rounds to nearest even
        # on either side, so the records hold what they held when rounded on the host).
        ids = torch.int32 if source.shape[-1] <= 2**31 else torch.int64
        st = BaseStats(st.lse, st.entropy, st.topk_ids.to(ids), st.topk_logprobs.half(), st.sample_ids.to(ids), st.sample_logprobs.half()).to("cpu")
        return [st.select(slice(start, start + n)) for start, n in zip(starts, sizes)]

    def _project(self, hidden: torch.Tensor, seq_rows: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, None, list[int]]]:
        """Logits of the sequences' labelled rows, a group of consecutive sequences at a time:
        ``[Σ P_i, V]`` views of one reused buffer, with the group's row counts, yielded in order;
        a view is valid until the next group is projected (the caller reads it first).

        Sequences are projected together, one matrix product per group of up to ``_PROJECT_BYTES``
        of logits (a product of a few hundred rows ran ~20% slower than the model's own one over the
        batch at V = 151,936: the weight is re-read per product). The buffer is kept across
        batches: fresh memory for the logits of every batch costs a page fault per 4 KiB on CPU."""
        head = self.head
        vocab, device = head.weight.shape[0], head.weight.device
        limit = max(1, _PROJECT_BYTES // (vocab * head.weight.element_size()))
        group, n = [], 0
        for rows in [*seq_rows, None]:
            if group and (rows is None or n + len(rows) > limit):
                total = sum(len(r) for r in group)
                if self._proj_buf is None or self._proj_buf.shape[0] < total:
                    self._proj_buf = torch.empty(max(total, min(limit, 2 * total)), vocab, dtype=head.weight.dtype, device=device)
                h = hidden.index_select(0, torch.cat(group).to(hidden.device)).to(device)
                logits = self._proj_buf[:total]
                if head.bias is None:
                    torch.matmul(h, head.weight.t(), out=logits)
                else:
                    torch.addmm(head.bias, h, head.weight.t(), out=logits)
                yield logits, None, [len(r) for r in group]
                group, n = [], 0
            if rows is not None:
                group.append(rows)
                n += len(rows)


def _stats_chunk_rows(vocab: int, device: torch.device) -> Optional[int]:
    """Rows per ``compute_base_stats`` chunk: its default on the CPU (None), by memory alone on an
    accelerator (see ``_ACCEL_CHUNK_ELEMENTS``)."""
    return None if torch.device(device).type == "cpu" else max(1, _ACCEL_CHUNK_ELEMENTS // vocab)


def _plain_head(model) -> Optional[torch.nn.Linear]:
    """The model's output projection when its logits are exactly ``head(last hidden state)``, else None.

    Checked on a probe rather than trusted: the projection's input is rescaled so its logits spread
    like a trained model's (std 10), and the model's returned logits must equal the projection of
    that input. Anything applied after the head (Gemma's soft-capping, Cohere's logit scale, a cast)
    fails the check, and precompute then reads the model's own logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or any(p.device.type == "meta" for p in head.parameters()):
        return None  # not a linear layer, or offloaded by a device_map: its weights exist only inside its forward
    seen = {}

    def probe(module, args):
        h = args[0].to(head.weight.device)
        z = torch.nn.functional.linear(h, head.weight, head.bias).float()
        seen["h"] = h * (10.0 / z.std().clamp_min(1e-6)).to(h.dtype)
        return (seen["h"], *args[1:])

    device = input_device(model)
    ids = (torch.arange(8, device=device) % head.weight.shape[0]).unsqueeze(0)
    handle = head.register_forward_pre_hook(probe)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            want = torch.nn.functional.linear(seen["h"], head.weight, head.bias)
    finally:
        handle.remove()
    ok = logits.shape == want.shape and torch.allclose(logits.float().to(want.device), want.float(), rtol=1e-3, atol=1e-2)
    return head if ok else None


class _hidden_only:
    """Within the block, the model's output projection sees an empty slice of its input (so the
    model returns ``[..., 0, V]`` logits); the input itself, the last hidden states, is kept in the
    list the block receives. Without a head it does nothing."""

    def __init__(self, head: Optional[torch.nn.Module]):
        self.head, self.kept, self.handle = head, [], None

    def __enter__(self) -> list:
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._keep)
        return self.kept

    def _keep(self, module, args):
        self.kept.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def _estimate(run: _Run, bad_rows: list) -> dict:
    """Sequences, tokens, labelled positions and bytes a run would store, without the model forward."""
    n_seq = n_tok = n_pos = 0
    unlabelled: list[int] = []
    truncated: list[int] = []
    for _, seq in run.sequences(bad_rows, unlabelled, truncated, every_rank=True):  # the whole run's, on every rank
        n_seq, n_tok = n_seq + 1, n_tok + len(seq)
        n_pos += labelled_positions(torch.tensor(seq.labels).unsqueeze(0))[0].numel()
    cfg, idb = run.cfg, run.id_dtype.itemsize
    per_pos = 4 + 4 + cfg.k * (idb + 2) + cfg.m * (idb + 2)
    router_per_pos = 0
    if run.template.moe:
        n_layers = len(run.template.moe["layers"])
        width = run.template.moe["num_experts"] if run.router_mode == "full" else run.template.moe["router_k"]
        router_per_pos = n_layers * width * (2 if run.router_mode == "full" else 3)
    per_tok = idb + 4 + (4 if cfg.data_config.packing else 0)
    return {
        "sequences": n_seq,
        "tokens": n_tok,
        "positions": n_pos,
        "lm_bytes": n_pos * per_pos + n_tok * per_tok,
        "router_bytes": n_pos * router_per_pos,
        "bytes_per_token_lm_uncompressed": (n_pos * per_pos) / max(n_tok, 1),
        "bytes_per_token_router_uncompressed": (n_pos * router_per_pos) / max(n_tok, 1),
        "skipped_rows": len(bad_rows),
        "unlabelled_rows": len(unlabelled),
        "truncated_rows": len(truncated),
    }


def _prepare_output(fs, root: str, run: _Run) -> Manifest:
    """Check the output location and return this rank's part manifest to continue from."""
    cfg = run.cfg
    parts_dir = posixpath.join(root, PARTS_DIR)
    # A run that cached no sequence left a manifest marked incomplete and no shard: nothing to keep
    # or resume, so the next run (the data or --max-length fixed) needs no --overwrite.
    empty = _empty_cache(fs, root)
    has_cache = not empty and (fs.exists(posixpath.join(root, MANIFEST)) or (fs.exists(parts_dir) and bool(fs.ls(parts_dir, detail=False))))
    if has_cache and not (cfg.resume or cfg.overwrite):
        raise CacheError(f"output {cfg.out!r} already holds a geocache cache; pass --overwrite to replace it or --resume to continue it")
    # Empty parts/ and shards/ directories are what a run leaves that stopped before committing
    # anything (a bad row, a missing chat template): an empty output, not a cache to protect.
    # The logs such a run wrote are its own too.
    others = [p for p in (fs.ls(root, detail=False) if fs.exists(root) else [])
              if posixpath.basename(p.rstrip("/")) not in (LOGS_DIR, *((MANIFEST, PARTS_DIR) if empty else ()))
              and (posixpath.basename(p.rstrip("/")) not in (PARTS_DIR, SHARDS_DIR) or fs.ls(p, detail=False))]
    if not has_cache and others:
        raise CacheError(f"output {cfg.out!r} exists and is not an empty directory or a geocache cache; choose another path")
    _barrier(run.world)  # every rank has looked before any rank changes the output
    if cfg.overwrite and has_cache and run.rank == 0:
        fs.rm(root, recursive=True)
    elif not has_cache and run.rank == 0:
        for debris in (LOGS_DIR, *((MANIFEST, PARTS_DIR) if empty else ())):  # a fresh run's logs start empty
            if fs.exists(posixpath.join(root, debris)):
                fs.rm(posixpath.join(root, debris), recursive=True)
    _barrier(run.world)
    fs.makedirs(posixpath.join(root, SHARDS_DIR), exist_ok=True)
    fs.makedirs(posixpath.join(root, PARTS_DIR), exist_ok=True)
    part = replace(run.template)
    ppath = part_path(root, run.rank)
    if cfg.resume:
        # Every rank's part is checked, not only this rank's: a run killed before rank 0 wrote its
        # part still names its settings (the number of processes among them) in the others'.
        for other in sorted(fs.ls(posixpath.join(root, PARTS_DIR), detail=False)):
            if not re.fullmatch(r"rank-\d{3}\.json", posixpath.basename(other)):
                continue  # a .tmp- part a kill left half-written is not a part
            previous = Manifest.from_json(fs.cat_file(other).decode(), where=other)
            diff = first_difference(previous.fingerprint(), run.template.fingerprint())
            if diff:
                raise CacheError(f"cannot resume cache {cfg.out!r}: it was built with different settings ({diff})")
            if posixpath.basename(other) == posixpath.basename(ppath):
                part = previous
    # Remove this rank's shards that its part does not list: debris of an interrupted commit.
    listed = {posixpath.basename(s.name) for s in part.shards}
    prefix = f"rank{run.rank:03d}-"
    for path in fs.ls(posixpath.join(root, SHARDS_DIR), detail=False):
        base = posixpath.basename(path.rstrip("/"))
        if (base.startswith(prefix) or base.startswith(f".tmp-{prefix}")) and base not in listed:
            fs.rm(path, recursive=True)
    return part


def _nothing_cached(counts: dict, bad_rows: list, max_length: int) -> str:
    """Why a run cached no sequence, and what to change, in one clause."""
    skipped, unlabelled = counts["skipped_rows"], counts["unlabelled_rows"]
    why = f"{skipped} malformed row(s) skipped{f' (first: {bad_rows[0]})' if bad_rows else ''} and {unlabelled} left without a label"
    if unlabelled:  # every label lay past max_length: the prompts fill it
        return f"{why} within max_length={max_length} (their prompts fill it); raise --max-length or fix the data, and rerun"
    return f"{why}; fix the data and rerun"


def _empty_cache(fs, root: str) -> bool:
    """Whether ``root`` holds what a run that cached no sequence leaves: a manifest marked
    incomplete that lists no shard."""
    path = posixpath.join(root, MANIFEST)
    try:
        manifest = Manifest.from_json(fs.cat_file(path).decode(), where=path) if fs.exists(path) else None
    except Exception:  # not a manifest this version reads: not ours to remove
        return False
    return manifest is not None and not manifest.complete and not manifest.shards


class _RunLog:
    """This rank's JSON Lines log of the precompute, ``logs/precompute-rank-NNN.jsonl`` in the
    cache: a ``start`` record (the settings that matter and where a resume starts), one ``shard``
    record per committed shard (what the progress bar shows: sequences and tokens so far,
    tokens/s, and the seconds spent in the forward, the statistics and the writer thread), and an
    ``end`` record with the rows left out and the whole cache's totals, or a ``stopped`` record
    naming the error. A resume keeps the earlier records and adds its own.

    The file is rewritten whole (atomically) at each record rather than appended to: object
    stores, which fsspec URLs may name, cannot append, and a log holds one line per shard."""

    def __init__(self, fs, root: str, run: _Run):
        self.fs, self.run = fs, run
        self.path = posixpath.join(root, LOGS_DIR, f"precompute-rank-{run.rank:03d}.jsonl")
        self.lines = fs.cat_file(self.path).decode().splitlines() if run.cfg.resume and fs.exists(self.path) else []
        fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.started = time.perf_counter()
        self.tokens = 0  # committed by this process (not before a resume): its tokens/s
        self.writer: Optional[ShardWriter] = None

    def record(self, event: str, **fields) -> None:
        from datetime import datetime, timezone

        rec = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "rank": self.run.rank,
               "elapsed_s": round(time.perf_counter() - self.started, 3), **fields}
        self.lines.append(json.dumps(rec))
        try:
            atomic_write_text(self.fs, self.path, "\n".join(self.lines) + "\n")
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            raise CacheWriteError(f"could not write the precompute log {self.path}: {'the disk is full' if full else exc.strerror or exc}; "
                                  f"the shards committed so far are kept, so {'free space' if full else 'fix that'} and rerun with --resume") from exc

    def start(self, committed: Manifest) -> None:
        cfg = self.run.cfg
        self.record("start", resume=cfg.resume, world_size=self.run.world, model=cfg.model, data=cfg.data, backend=cfg.backend,
                    k=cfg.k, m=cfg.m, router=self.run.router_mode, batch_size=cfg.batch_size, max_length=cfg.data_config.max_length,
                    packing=cfg.data_config.packing, sequences_committed=committed.counts["sequences"])

    def shard(self, info: ShardInfo) -> None:
        """Called by the writer thread once the shard is committed."""
        self.tokens += info.tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        counts = self.writer.part.counts if self.writer is not None else {}
        self.record("shard", shard=info.name, shard_sequences=info.sequences, shard_tokens=info.tokens, shard_bytes=info.bytes,
                    sequences=counts.get("sequences"), tokens=counts.get("tokens"), positions=counts.get("positions"),
                    tokens_per_s=round(self.tokens / elapsed, 1), forward_s=round(self.run.timings["forward_s"], 3),
                    statistics_s=round(self.run.timings["statistics_s"], 3),
                    write_s=round(self.writer.write_s, 3) if self.writer is not None else None)

    def stopped(self, exc: BaseException) -> None:
        """Best effort: the error itself is what the user sees, whatever becomes of this record."""
        try:
            self.record("stopped", error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except (OSError, CacheWriteError):
            pass


def _merge(fs, root: str, run: _Run) -> Manifest:
    parts = []
    for r in range(run.world):
        p = part_path(root, r)
        parts.append(Manifest.from_json(fs.cat_file(p).decode(), where=p))
    merged = replace(run.template, shards=[s for p in parts for s in p.shards], complete=all(p.complete for p in parts))
    merged.recount()
    if merged.counts["sequences"] == 0:  # refused below: never a complete (empty) cache that verify passes
        merged.complete = False
    # Every rank reads (and counts) every row, then keeps its own sequences.
    for key in ("skipped_rows", "unlabelled_rows", "truncated_rows"):
        merged.counts[key] = max(p.counts.get(key, 0) for p in parts)
    atomic_write_text(fs, posixpath.join(root, MANIFEST), merged.to_json())
    return merged


def precompute(cfg: PrecomputeConfig, timings: Optional[dict] = None) -> Manifest | dict:
    """Run a precompute; returns the merged manifest (or, with ``dry_run``, the estimate).

    ``timings``, if given, is filled with this rank's seconds spent in the base forward, the
    statistics pass (with the copies to host), the writer thread, and the whole run.
    """
    wall = time.perf_counter()
    rank, world = _distributed()
    run = _Run(cfg, rank, world)
    bad_rows: list[str] = []
    unlabelled: list[int] = []  # rows with no label left after truncation: never cached, counted
    truncated: list[int] = []  # cached rows that lost their end to max_length: counted
    if cfg.dry_run:
        estimate = _estimate(run, bad_rows)
        if not estimate["sequences"] and rank == 0:
            print(f"warning: this run would cache no sequence from data {cfg.data}: "
                  f"{_nothing_cached(estimate, bad_rows, cfg.data_config.max_length)}", file=sys.stderr)
        return estimate
    fs, root = _fs(cfg.out)
    # The data is opened and read up to this rank's first sequence before the output is touched: a
    # wrong path or a bad row must not cost the cache that --overwrite was to replace.
    stream = run.sequences(bad_rows, unlabelled, truncated)
    first = next(stream, None)
    if first is None and world == 1:  # nothing to cache: said before anything is written or removed
        counts = {"skipped_rows": len(bad_rows), "unlabelled_rows": len(unlabelled)}
        raise ValueError(f"no sequence was cached from data {cfg.data}: {_nothing_cached(counts, bad_rows, cfg.data_config.max_length)}")
    part = _prepare_output(fs, root, run)
    done = sum(s.sequences for s in part.shards)
    log = _RunLog(fs, root, run)
    log.start(part)
    writer = log.writer = ShardWriter(fs, root, get_backend(cfg.backend), part, rank, cfg.shard_sequences, stride=world, on_commit=log.shard)
    from tqdm.auto import tqdm

    # The bar counts sequences when their number is capped, else input rows (every rank reads every
    # row and keeps its share), whose total local files give cheaply: both give an ETA.
    cap = cfg.data_config.max_sequences
    by_rows = cap is None
    total = count_rows(cfg.data, cfg.data_config) if by_rows and cfg.progress else None if by_rows else -(-max(cap - rank, 0) // world)
    bar = tqdm(total=total, unit="row" if by_rows else "seq", desc=f"precompute[{rank}]" if world > 1 else "precompute",
               disable=not cfg.progress, file=sys.stderr)
    if not by_rows:
        bar.update(done)
    tokens, started = 0, time.perf_counter()
    batch: list[tuple[int, Sequence]] = []
    # A resume restarts at the batch the interruption cut (shards need not hold whole batches) and
    # recomputes it whole: each batch is padded to its longest row and the forward's rounding
    # depends on that width, so a batch of other rows would not give the uninterrupted arrays.
    start = done - done % cfg.batch_size
    try:  # a bad row, a full disk, Ctrl-C, a failed merge: the log says where it stopped
        try:
            for n, (i, seq) in enumerate(itertools.chain([first] if first is not None else [], stream)):
                if n < start:
                    continue  # committed before an interruption
                batch.append((i, seq))
                if len(batch) == cfg.batch_size:
                    tokens += _flush(run, batch, writer, bar, by_rows, n + 1, tokens, started, drop=max(done - (n + 1 - len(batch)), 0))
                    batch = []
            if batch:
                tokens += _flush(run, batch, writer, bar, by_rows, n + 1, tokens, started, drop=max(done - (n + 1 - len(batch)), 0))
        finally:
            bar.close()
            writer.close()  # what was queued is committed, or the writer's own error is raised
        part = writer.part
        part.complete = True
        part.counts["skipped_rows"] = len(bad_rows)
        part.counts["unlabelled_rows"] = len(unlabelled)
        part.counts["truncated_rows"] = len(truncated)
        atomic_write_text(fs, part_path(root, rank), part.to_json())
        _barrier(world)
        merged = _merge(fs, root, run) if rank == 0 else None
        _barrier(world)
        if merged is None:
            fs_manifest = fs.cat_file(posixpath.join(root, MANIFEST)).decode()
            merged = Manifest.from_json(fs_manifest)
        if timings is not None:
            timings.update(run.timings, write_s=writer.write_s, wall_s=time.perf_counter() - wall)
        whole, stored = merged.counts, sum(s.bytes for s in merged.shards)
        log.record("end", sequences=part.counts["sequences"], tokens=part.counts["tokens"], positions=part.counts["positions"],
                   skipped_rows=len(bad_rows), unlabelled_rows=len(unlabelled), truncated_rows=len(truncated),
                   forward_s=round(run.timings["forward_s"], 3), statistics_s=round(run.timings["statistics_s"], 3), write_s=round(writer.write_s, 3),
                   wall_s=round(time.perf_counter() - wall, 3),
                   cache={"complete": merged.complete, "sequences": whole["sequences"], "tokens": whole["tokens"], "positions": whole["positions"],
                          "shards": len(merged.shards), "bytes": stored, "bytes_per_token": round(stored / max(whole["tokens"], 1), 2)})
    except BaseException as exc:
        log.stopped(exc)
        raise
    if merged.counts["sequences"] == 0:
        c = merged.counts
        raise ValueError(f"no sequence was cached from data {cfg.data}: {_nothing_cached(c, bad_rows, cfg.data_config.max_length)}")
    if bad_rows and rank == 0:  # every rank reads (and counts) every row
        print(f"skipped {len(bad_rows)} malformed row(s); first: {bad_rows[0]}", file=sys.stderr)
    if unlabelled and rank == 0:
        print(f"left out {len(unlabelled)} row(s) with no label within max_length={cfg.data_config.max_length} "
              f"(a prompt that long leaves nothing to learn); first: row {unlabelled[0]}", file=sys.stderr)
    if truncated and rank == 0:
        print(f"truncated {len(truncated)} row(s) longer than max_length={cfg.data_config.max_length} tokens "
              f"(their ends are not cached); first: row {truncated[0]}", file=sys.stderr)
    return merged


def _flush(run: _Run, batch, writer: ShardWriter, bar, by_rows: bool, sequences: int, tokens: int, started: float, drop: int = 0) -> int:
    """Write a batch's records, but its first ``drop`` (committed before a resume); move the bar (in
    input rows, or in sequences) on, ``sequences`` being this rank's so far, those committed before
    a resume included."""
    for rec in run.records(batch)[drop:]:
        writer.put(rec)
    n_tok = sum(len(seq) for _, seq in batch[drop:])
    bar.update(batch[-1][1].rows_read - bar.n if by_rows else len(batch) - drop)
    postfix = {"seq": sequences} if by_rows else {}
    bar.set_postfix(**postfix, tokens_per_s=f"{(tokens + n_tok) / max(time.perf_counter() - started, 1e-9):,.0f}")
    return n_tok


def config_from_options(options: dict) -> PrecomputeConfig:
    """Build a config from a flat mapping (YAML + CLI overrides); DataConfig fields go into ``data_config``."""
    data_fields = set(DataConfig.__dataclass_fields__)
    run_fields = set(PrecomputeConfig.__dataclass_fields__) - {"data_config"}
    options = dict(options)
    for option, name in (("top_k", "k"), ("tail_samples", "m")):  # the command line's names (--top-k, --tail-samples)
        if option in options:
            if name in options:
                raise ValueError(f"{option} and {name} name the same setting: give one")
            options[name] = options.pop(option)
    unknown = sorted(set(options) - data_fields - run_fields)
    if unknown:
        raise ValueError(unknown_options("precompute", unknown, data_fields | run_fields | {"top_k", "tail_samples"}))
    data_cfg = DataConfig(**{k: v for k, v in options.items() if k in data_fields})
    return PrecomputeConfig(**{k: v for k, v in options.items() if k in run_fields}, data_config=data_cfg)


__all__ = ["PrecomputeConfig", "config_from_options", "precompute"]
