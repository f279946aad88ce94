"""``geocache train``: DoRA SFT with the geometry-aware loss, reading batches and base statistics from a cache.

Reads top to bottom: check the run directory → load the model and the cache, refuse a cache built
for another model/tokenizer/preprocessing → add the DoRA adapter → pick the base source → build
``TrainingArguments`` → ``GeometryTrainer.train`` → save the adapter and the resolved config.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import yaml

from geocache.base import BASE_MODES, CacheBase, CopyBase, LiveBase, PeriodicBase
from geocache.cache.manifest import first_difference
from geocache.cache.reader import CacheError, open_cache
from geocache.config import GeometryConfig, check_option_types, check_passed_options, one_line, unknown_options
from geocache.data import token_shaping
from geocache.models import load_model_and_tokenizer, moe_layout

RUN_CONFIG = "geocache_run.yaml"


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "Base model: local directory or hub id (the one the cache was built for)."})
    cache: str = field(metadata={"help": "Training cache (from geocache precompute)."})
    out: str = field(metadata={"help": "Run directory: checkpoints, adapter, logs, resolved config."})
    base: str = field(default="cache", metadata={"help": "Base source: cache | live | copy | periodic."})
    base_model: Optional[str] = field(default=None, metadata={"help": "Base for `copy` (default: --model)."})
    periodic_inner: str = field(default="live", metadata={"help": "What `periodic` queries: live | copy."})
    periodic_every: int = field(default=10, metadata={"help": "`periodic`: query the base every N steps."})
    offload_base: bool = field(default=False, metadata={"help": "`copy`: keep the base's weights on CPU (accelerate)."})
    eval_cache: Optional[str] = field(default=None, metadata={"help": "Eval cache; its base statistics are used in `cache` mode."})
    revision: Optional[str] = field(default=None, metadata={"help": "Model revision (hub)."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16."})
    lora_r: int = field(default=16, metadata={"help": "DoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "DoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "DoRA dropout."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Modules to adapt (default: per architecture)."})
    adapt_experts: bool = field(default=False, metadata={"help": "Adapt fused MoE experts (refused: not possible with DoRA)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warmup steps."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps (-1: from epochs)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast."})
    fp16: bool = field(default=False, metadata={"help": "float16 autocast."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    train_sampling_strategy: str = field(default="random", metadata={"help": "random | sequential (transformers' option)."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (needs eval_cache; without it, an eval cache is evaluated once, at the end)."})
    eval_on_start: bool = field(default=False, metadata={"help": "Also evaluate before the first step (the base itself)."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    layer_weights: Optional[list[float]] = field(default=None, metadata={"help": "Router-loss weight per MoE layer (default: mid-band)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the run directory's last checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run already in the run directory."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    progress: bool = field(default=True, metadata={"help": "Show transformers' progress bar and log printing."})
    v2_every: int = field(default=0, metadata={"help": "MoE: check V2 on held-out data every N steps; checkpoints only when it passes (0: off)."})
    v2_data: Optional[list[str]] = field(default=None, metadata={"help": "Held-out V2 data per domain, PATH or NAME=PATH; the first is the primary."})
    v2_patience: int = field(default=2, metadata={"help": "Checks without improvement before the V2 action."})
    v2_action: str = field(default="rollback", metadata={"help": "When V2 keeps degrading: halve_lr | double_lambdas | rollback."})
    v2_max_sequences: int = field(default=32, metadata={"help": "Held-out sequences per domain per V2 check."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow model code from the hub (off unless asked), for the model and a copy base."})
    lora_args: dict = field(default_factory=dict, metadata={
        "help": "Any other peft LoraConfig field, KEY=VALUE (VALUE read as YAML), e.g. use_rslora=true, "
                "exclude_modules=[model.layers.0.mlp.down_proj], rank_pattern={q_proj: 8}, modules_to_save=[lm_head]; in a config "
                "file, a `lora_args:` mapping."})
    training_args: dict = field(default_factory=dict, metadata={
        "help": "Any other transformers TrainingArguments field, KEY=VALUE (VALUE read as YAML), e.g. weight_decay=0.01, "
                "max_grad_norm=0.5, optim=adamw_torch, report_to=wandb, dataloader_num_workers=2; in a config file, a "
                "`training_args:` mapping."})
    geometry: GeometryConfig = field(default_factory=GeometryConfig, metadata={"help": "λ's and thresholds."})

    def __post_init__(self) -> None:
        check_option_types(self)
        # Which geometry options the user gave (YAML/CLI keys; of a GeometryConfig object, the fields
        # off their defaults): a dense model refuses an asked-for router loss but skips the default one.
        if isinstance(self.geometry, dict):
            self.geometry_given = frozenset(self.geometry)
            self.geometry = GeometryConfig.from_dict(self.geometry)
        else:
            defaults = asdict(GeometryConfig())
            self.geometry_given = frozenset(k for k, v in asdict(self.geometry).items() if v != defaults[k])
        if self.base not in BASE_MODES:
            raise ValueError(f"base={self.base!r} must be one of {', '.join(BASE_MODES)}")
        if self.periodic_inner not in ("live", "copy"):
            raise ValueError(f"periodic_inner={self.periodic_inner!r} must be live or copy")
        # Options of another base mode would do nothing, and base_model in the run's record would
        # read as if that model were the base.
        separate = self.base == "copy" or (self.base == "periodic" and self.periodic_inner == "copy")
        for name, given in (("base_model", self.base_model is not None), ("offload_base", self.offload_base)):
            if given and not separate:
                raise ValueError(f"{name} is for a separate base model (base copy, or periodic with periodic_inner=copy); with "
                                 f"base={self.base!r} it would do nothing")
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("periodic_every", "periodic_inner"):
            if self.base != "periodic" and getattr(self, name) != defaults[name]:
                raise ValueError(f"{name} is for base periodic; with base={self.base!r} it would do nothing")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        if self.eval_steps is not None and not self.eval_cache:
            raise ValueError("eval_steps was given but no eval_cache to evaluate on")
        if self.eval_on_start and not self.eval_cache:  # (transformers refused it after the run's record was written)
            raise ValueError("eval_on_start was given but no eval_cache to evaluate on")
        if isinstance(self.v2_data, str):  # one domain written as a plain string (YAML)
            self.v2_data = [self.v2_data]
        if isinstance(self.target_modules, str):  # one module, or "all-linear", written as a plain string (YAML)
            self.target_modules = [self.target_modules]
        if self.v2_every < 0:
            raise ValueError(f"v2_every={self.v2_every} must be >= 0")
        if self.v2_every and not self.v2_data:
            raise ValueError("v2_every was given but no v2_data (held-out text per domain) to check V2 on")
        from geocache.gate import ACTIONS

        if self.v2_action not in ACTIONS:
            raise ValueError(f"v2_action={self.v2_action!r} must be one of {', '.join(ACTIONS)}")
        # Numbers transformers would take and fail on later (or silently: a zero-step run saved an
        # untrained adapter), checked before the run directory is touched.
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be a finite number >= 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps", "periodic_every",
                     "lora_r", "v2_max_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (or left unset)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps} must be > 0 (or -1: train num_train_epochs)")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs={self.num_train_epochs} must be > 0 (or give max_steps)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.train_sampling_strategy not in ("random", "sequential", "group_by_length"):
            raise ValueError(f"train_sampling_strategy={self.train_sampling_strategy!r} must be random, sequential or group_by_length")
        from transformers import TrainingArguments

        check_passed_options("training_args", self.training_args, TrainingArguments, _SET_BY_GEOCACHE,
                             "geocache's trainer needs its own value")
        from geocache.trainer import check_lora_args

        check_lora_args(self.lora_args)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # A run's geocache_run.yaml is a config too; its num_processes and caches' identities are records, not options.
        values = {k: v for k, v in values.items() if k not in ("num_processes", "cache_identity", "eval_cache_identity")}
        unknown = sorted(set(values) - known)
        if unknown:
            geometry = sorted(set(unknown) & {f.name for f in fields(GeometryConfig)})
            hint = f" ({', '.join(geometry)}: geometry options, which a config file holds under `geometry:`)" if geometry else ""
            passed = sorted(set(unknown) & (_training_arguments_fields() - set(_SET_BY_GEOCACHE)))
            if passed and not geometry:
                hint = f" ({', '.join(passed)}: transformers TrainingArguments, which a config file holds under `training_args:`)"
            lora = sorted(set(unknown) & _lora_config_fields())
            if lora and not geometry and not passed:
                hint = f" ({', '.join(lora)}: peft LoraConfig options, which a config file holds under `lora_args:`)"
            raise ValueError(f"{unknown_options('train', unknown, known)}{hint}")
        return cls(**values)


# TrainingArguments that geocache sets itself: from one of its own options (named), or fixed (None).
_SET_BY_GEOCACHE = {
    "output_dir": "out", "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler_type", "warmup_steps": "warmup_steps",
    "num_train_epochs": "num_train_epochs", "max_steps": "max_steps", "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "bf16": "bf16", "fp16": "fp16",
    "gradient_checkpointing": "gradient_checkpointing", "activation_checkpointing": "gradient_checkpointing", "seed": "seed",
    "data_seed": "seed", "train_sampling_strategy": "train_sampling_strategy", "eval_strategy": "eval_steps", "eval_steps": "eval_steps",
    "eval_on_start": "eval_on_start", "save_strategy": "save_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "logging_steps": "logging_steps", "use_cpu": "use_cpu", "disable_tqdm": "progress", "resume_from_checkpoint": "resume",
    "remove_unused_columns": None, "prediction_loss_only": None,
}


def _training_arguments_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in fields(TrainingArguments) if f.init}


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    from geocache.trainer import LORA_SET_BY_GEOCACHE

    return {f.name for f in fields(LoraConfig) if f.init} - set(LORA_SET_BY_GEOCACHE)


def _check_run_dir(cfg: TrainConfig) -> Optional[str]:
    """Refuse a directory holding another run unless resuming or overwriting; return the checkpoint to resume.
    ``--overwrite`` replaces only a geocache run: any other non-empty directory is refused, never deleted.
    The old run is deleted by ``train`` once the new one is accepted (``_replace_run``), not here:
    a refusal on the way (a cache that does not fit, an option that does not apply) keeps it."""
    out = Path(cfg.out)
    holds_run = (out / RUN_CONFIG).exists() or any(out.glob("checkpoint-*"))
    if holds_run and not cfg.resume and _failed_start(out):  # replaced once the new run is accepted, as with --overwrite
        return None
    running = _running_process(out) if holds_run else None
    if running:
        raise ValueError(f"run directory {cfg.out!r} is in use: a training process ({running}) is still running in it")
    if holds_run and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"run directory {cfg.out!r} holds another run; pass --resume to continue it or --overwrite to replace it")
    if not holds_run and out.exists() and any(out.iterdir()):
        raise ValueError(f"run directory {cfg.out!r} is not empty and holds no geocache run (no {RUN_CONFIG}, no checkpoint-*); "
                         "choose another (--overwrite replaces only a geocache run)")
    if cfg.resume:
        from geocache.trainer import last_complete_checkpoint

        last, incomplete = last_complete_checkpoint(out, int(os.environ.get("WORLD_SIZE", "1")))
        names = ", ".join(Path(p).name for p in incomplete)
        if last is None and not incomplete:
            why = " (the run stopped before its first; start it again without --resume)" if _failed_start(out) else ""
            raise ValueError(f"--resume was given but run directory {cfg.out!r} has no checkpoint{why}")
        _check_resumed_config(cfg, out / RUN_CONFIG)  # (another number of processes makes every checkpoint look incomplete)
        if last is None:
            raise ValueError(f"--resume was given but run directory {cfg.out!r} has no checkpoint written to its end ({names} not: "
                             "start the run again with --overwrite)")
        done = _trained_steps(last)
        if done is not None and cfg.max_steps > 0 and done >= cfg.max_steps:  # transformers would train one step more
            raise ValueError(f"--resume: run {cfg.out!r} already trained {done} steps, and max_steps={cfg.max_steps}; "
                             "raise --max-steps to train on")
        return last
    return None


def _drop_incomplete_checkpoints(out: Path, resume_from: str) -> None:
    """Remove the checkpoints after ``resume_from`` that a failed write left half-written (their
    steps come again, and their checkpoints with them), once the resumed run is accepted."""
    from geocache.trainer import last_complete_checkpoint

    _, incomplete = last_complete_checkpoint(out, int(os.environ.get("WORLD_SIZE", "1")))
    if incomplete:
        names = ", ".join(Path(p).name for p in incomplete)
        warnings.warn(f"{names} in {str(out)!r} was not written to its end (a failed write): removed; resuming from {Path(resume_from).name}",
                      stacklevel=3)
        for path in incomplete:
            shutil.rmtree(path)


def _replace_run(out: Path) -> None:
    """Delete the geocache run in ``out`` (``--overwrite``, or a failed start; ``_check_run_dir``
    refused anything else)."""
    if (out / RUN_CONFIG).exists() or any(out.glob("checkpoint-*")):
        shutil.rmtree(out)


# What a run writes into its directory before its first checkpoint (``runs``: TensorBoard's).
_RUN_FILES = {RUN_CONFIG, "metrics.jsonl", "v2_checks.jsonl", "runs"}
RUNNING = ".geocache-running"  # while rank 0 trains: its pid, host and start time (JSON)


def _failed_start(out: Path) -> bool:
    """A run directory whose run stopped before it saved anything (refused inside its first step,
    interrupted, a NaN at step 1): a record, maybe logs, no checkpoint, no adapter, nothing but
    what a run writes, and no process still training in it."""
    if not (out / RUN_CONFIG).exists() or any(out.glob("checkpoint-*")) or (out / "adapter").exists():
        return False
    if any(p.name not in _RUN_FILES | {RUNNING} for p in out.iterdir()):
        return False  # a file of the user's (a copied record used as a template, notes): never deleted
    return not _running_process(out)


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field), or None
    where /proc cannot tell: a pid and its start time name one process, a pid alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name (which may hold spaces)


def _lock_record() -> str:
    import socket

    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}) + "\n"


def _running_process(out: Path) -> Optional[str]:
    """The training process the run directory's lock names, described (``pid 123``, ``pid 123 on
    host h``), if it may still be running; None if it is gone (or is this process).

    A lock written on another host (a shared filesystem) cannot be checked from here: it counts as
    running, and the description says how to release it. On this host the pid must exist and, where
    /proc tells, have the start time recorded: a process that reused the pid of a killed run (a
    restarted container numbers its processes from 1 again) is not that run."""
    import socket

    try:
        text = (out / RUNNING).read_text().strip()
        record = json.loads(text) if text.startswith("{") else {"pid": int(text)}  # (a bare pid: locks before the host was recorded)
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    host = record.get("host")
    if host and host != socket.gethostname():
        return f"pid {pid} on host {host}; if it is gone, delete {out / RUNNING}"
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # a process of that pid exists (on this machine)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    start = record.get("start")
    if start is not None and _process_start(pid) not in (None, start):
        return None  # the pid was reused by another process
    return f"pid {pid}"


def _warn_of_pruned_state(checkpoint: Path) -> None:
    """A full checkpoint (its RNG states are there) whose optimizer or scheduler state was deleted
    (to save space, say) resumes with that state fresh, which transformers does without a word:
    the moments restart, or the learning-rate schedule starts again from its warmup."""
    if not any(checkpoint.glob("rng_state*.pth")):
        return  # save_only_model: nothing more was ever written
    lost = [what for what, pattern in (("optimizer state (optimizer.pt): Adam's moments restart", "optimizer*"),
                                       ("scheduler state (scheduler.pt): the learning-rate schedule restarts", "scheduler*"))
            if not any(checkpoint.glob(pattern))]
    if lost:
        warnings.warn(f"{checkpoint.name} has no {' and no '.join(lost)}; the resumed run will not have the losses of an "
                      "uninterrupted one", stacklevel=2)


def _trained_steps(checkpoint: str) -> Optional[int]:
    state = Path(checkpoint) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Settings that change what a run computes: a resumed run must keep them. The others (max_steps
# or epochs extended, save/eval/logging intervals, progress, the run directory) may change.
RESUME_MUST_MATCH = (
    "model", "revision", "base_model", "cache", "eval_cache", "base", "periodic_inner", "periodic_every", "dtype",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_args", "layer_weights", "seed", "train_sampling_strategy",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "geometry", "v2_every", "v2_data", "v2_patience", "v2_action", "training_args",
)
_PATH_FIELDS = ("model", "base_model", "cache", "eval_cache")


def _check_v2_data(cfg: TrainConfig) -> None:
    from geocache.profile import ProfileConfig

    for name, path in ProfileConfig(model="", data=list(cfg.v2_data), out="").domains().items():
        hub_like = "/" in path and not path.startswith((".", "/"))
        if not Path(path).exists() and not hub_like:
            raise FileNotFoundError(f"v2_data of domain {name!r}, {path!r}, does not exist")


# What a run was told to do to its directory or its terminal, not what it computes: left out of
# geocache_run.yaml, so that the file reloads as --config without deleting or resuming anything.
_NOT_RECORDED = ("resume", "overwrite", "progress")


def _run_record(cfg: TrainConfig) -> dict:
    """What ``geocache_run.yaml`` holds: the config (local paths made absolute, so that it reloads
    from anywhere), and the number of processes (with the per-device batch and accumulation, it
    makes the global batch a resume must keep)."""
    record = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED}
    for name in (*_PATH_FIELDS, "out"):
        if record.get(name) and Path(record[name]).exists():
            record[name] = os.path.abspath(record[name])
    for name in ("cache", "eval_cache"):  # what the caches hold, which a resume must keep wherever they lie
        record[f"{name}_identity"] = _cache_identity(record[name]) if record.get(name) else None
    if record.get("v2_data"):  # PATH or NAME=PATH
        def absolute(entry: str) -> str:
            name, sep, path = entry.rpartition("=") if "=" in entry and not Path(entry).exists() else ("", "", entry)
            return f"{name}{sep}{os.path.abspath(path)}" if Path(path).exists() else entry

        record["v2_data"] = [absolute(e) for e in record["v2_data"]]
    return {**record, "num_processes": int(os.environ.get("WORLD_SIZE", "1"))}


def _cache_identity(url: str) -> Optional[str]:
    """``Manifest.identity()`` of a cache, or None where it cannot be read (opening it says why)."""
    from geocache.cache.reader import _fs, read_manifest

    try:
        return read_manifest(*_fs(url)).identity()
    except Exception:  # a missing or damaged cache: refused in its own words when it is opened
        return None


def _check_resumed_config(cfg: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume a run with settings that differ from the ones it was started with (its
    ``geocache_run.yaml``), naming the first differing one."""
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = _run_record(cfg)
    pairs = [(name, saved[name], now[name]) for name in (*RESUME_MUST_MATCH, "num_processes") if name != "geometry" and name in saved]
    pairs += [(f"geometry.{k}", v, now["geometry"][k]) for k, v in (saved.get("geometry") or {}).items() if k in now["geometry"]]
    for name, before, after in pairs:
        identity = f"{name}_identity"
        if name in ("cache", "eval_cache") and saved.get(identity) and now[identity]:
            # By content: a moved or copied cache resumes; another precompute at the same path does not.
            if saved[identity] != now[identity]:
                raise ValueError(f"--resume would continue run {cfg.out!r} with {name} {after!r}, which holds other rows than the "
                                 f"{name} it was started with ({before!r} then): another precompute's data, model or settings; "
                                 "resume with that cache or start a new run")
            continue
        if name in _PATH_FIELDS and before and after:  # `cache/`, `cache` and its absolute path are the same cache
            before, after = os.path.abspath(before), os.path.abspath(after)
        if before != after:
            raise ValueError(f"--resume would continue run {cfg.out!r} with {name}={after!r}, but it was started with {name}={before!r}; "
                             f"resume with the run's own settings (see {saved_path}) or start a new run")


def _base_source(cfg: TrainConfig, want_router: bool, device):
    def copy():
        # Offloaded: loaded on the CPU (never whole on the accelerator), run layer by layer on ``device``.
        base_model, _ = load_model_and_tokenizer(cfg.base_model or cfg.model, revision=cfg.revision, dtype=cfg.dtype,
                                                 trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
                                                 device="cpu" if cfg.offload_base else device)
        return CopyBase(base_model, want_router=want_router, offload=cfg.offload_base, device=device)

    if cfg.base == "cache":
        return CacheBase()
    if cfg.base == "live":
        return LiveBase(want_router)
    if cfg.base == "copy":
        return copy()
    inner = LiveBase(want_router) if cfg.periodic_inner == "live" else copy()
    return PeriodicBase(inner, cfg.periodic_every)


def _training_arguments(cfg: TrainConfig, out: Path, report_to: list[str], resume_from: Optional[str]):
    """The run's TrainingArguments: geocache's options, then ``cfg.training_args`` (report_to among them)."""
    from transformers import TrainingArguments

    # No accelerator: the CPU it is, said to transformers, which otherwise refused --bf16 ("Your setup
    # doesn't support bf16/gpu") and, under torchrun, had each process train alone instead of over gloo.
    use_cpu = cfg.use_cpu or not torch.accelerator.is_available()
    managed = dict(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        # transformers renamed it (the old name warns on every run where the new one exists)
        **{"activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing":
           cfg.gradient_checkpointing},
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy=cfg.train_sampling_strategy,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=cfg.eval_on_start and resume_from is None,  # a resume evaluated its start already
        save_strategy="no" if cfg.v2_every else "steps",  # with the V2 gate, checkpoints only when V2 passes
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        remove_unused_columns=False,  # batches carry base statistics beside the model inputs
        # Every adapter weight takes part in every step (attention, dense MLPs, shared experts): DDP
        # need not walk the graph for unused ones (transformers' default for a PEFT model, which
        # printed torch's "did not find any unused parameters" on every rank). Overridable.
        ddp_find_unused_parameters=False,
        prediction_loss_only=True,
        use_cpu=use_cpu,
        disable_tqdm=not cfg.progress,
        report_to=report_to,
        # (pinned memory on a CPU run only warns, once per worker, that there is nothing to pin)
        dataloader_pin_memory=not use_cpu and torch.cuda.is_available(),
    )
    # The user's own last: over the defaults above that are not geocache options (the eval batch
    # size, report_to, pinning); the fields geocache sets from its options were refused in them.
    return TrainingArguments(**{**managed, **cfg.training_args})


def train(cfg: TrainConfig, callbacks: Optional[list] = None, v2_signal=None):
    """Run a training; returns the ``GeometryTrainer`` (its ``state`` has the log history).
    ``v2_signal`` replaces the V2 measurement of ``v2_every`` (tests inject one)."""
    from transformers import set_seed

    from geocache.trainer import GeometryTrainer, JsonlLogger, add_dora_adapter

    if cfg.v2_every:  # before the run directory is touched: a typo must not leave a run to --overwrite
        _check_v2_data(cfg)
    # Under torchrun only rank 0 checks and prepares the run directory (the others would find
    # rank 0's files and refuse); a refusal there stops every rank.
    if int(os.environ.get("RANK", "0")) == 0:
        resume_from = _check_run_dir(cfg)
    else:  # the checkpoint rank 0 chose (incomplete ones are skipped, whether or not rank 0 removed them yet)
        from geocache.trainer import last_complete_checkpoint

        resume_from = last_complete_checkpoint(cfg.out, int(os.environ.get("WORLD_SIZE", "1")))[0] if cfg.resume else None
    out = Path(cfg.out)
    if resume_from is not None and int(os.environ.get("RANK", "0")) == 0:
        _warn_of_pruned_state(Path(resume_from))
    report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    try:
        args = _training_arguments(cfg, out, report_to, resume_from)
    except (TypeError, ValueError) as exc:  # a value TrainingArguments refuses, in its words, on one line
        if not cfg.training_args:
            raise
        raise ValueError(f"transformers refuses these TrainingArguments ({one_line(exc, 300)}); training_args were "
                         f"{cfg.training_args}") from None
    from transformers.integrations import get_available_reporting_integrations

    missing = sorted(set(args.report_to) - set(get_available_reporting_integrations()))
    if missing:  # else a RuntimeError traceback from the Trainer's callbacks, after the model loaded
        raise ValueError(f"report_to={missing} names a logger that is not installed here: install it (pip install {missing[0]}) "
                         "or leave it out")
    if cfg.fp16 and args.device.type == "cpu":  # accelerate runs float32 there and says nothing
        raise ValueError("--fp16 has no effect on a CPU run (accelerate runs it in float32): use --bf16 for autocast on CPU")
    # The caches first: a mistyped path costs no model load.
    cache = open_cache(cfg.cache)
    eval_cache = open_cache(cfg.eval_cache) if cfg.eval_cache else None
    # (Both are checked against the base, the model or --base-model's, by GeometryTrainer below,
    # before the run directory is written.)
    if eval_cache is not None:  # the tokens' shape must agree; the data, its slice and caps may not
        diff = first_difference(*(token_shaping(c.manifest.data["preprocessing"]) for c in (cache, eval_cache)), "preprocessing")
        if diff:
            raise CacheError(f"the eval cache was preprocessed differently from the training cache ({diff}, training != eval)")
    # Every model on the device the Trainer gives this process (the local rank's GPU under
    # torchrun, the CPU with --use-cpu), not on the first GPU it finds.
    model, tokenizer = load_model_and_tokenizer(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=args.device,
                                                trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)
    layout = moe_layout(model)
    if layout is None and cfg.layer_weights is not None:
        raise ValueError(f"router layer weights were given, but model {cfg.model!r} is dense (it has no MoE router)")
    if cfg.v2_every and layout is None:
        raise ValueError(f"--v2-every needs a MoE model (V2 is measured on MoE layers), and {cfg.model!r} is dense")
    # Asked for = given and off the default: a run's own geocache_run.yaml (every field, the default
    # λ_router among them) must still resume a dense run.
    asked = "lambda_router" in cfg.geometry_given and cfg.geometry.lambda_router not in (0, GeometryConfig().lambda_router)
    if layout is None and asked:
        raise ValueError(f"lambda_router={cfg.geometry.lambda_router} asks for a router loss, but model {cfg.model!r} is dense "
                         "(it has no MoE router); leave lambda_router unset or 0")
    if cfg.base == "cache" and layout is not None and cfg.geometry.lambda_router > 0:
        for name, c in (("cache", cache), ("eval cache", eval_cache)):
            # (a dense model's cache, moe null, is another model's: GeometryTrainer refuses it below)
            if c is not None and c.manifest.moe is not None and c.manifest.moe.get("router_mode") == "none":
                raise CacheError(f"the {name} {c.url!r} holds no router statistics (precompute --router none), so base mode 'cache' "
                                 f"cannot train or evaluate the router loss with lambda_router={cfg.geometry.lambda_router}; "
                                 "rebuild it with --router auto, or set lambda_router 0")

    set_seed(cfg.seed)  # the adapter's random init must not depend on what ran before in this process
    model = add_dora_adapter(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.adapt_experts, **cfg.lora_args)
    want_router = layout is not None  # router drift is always measured on MoE; trained on when λ_router > 0
    gate_cb = None
    if cfg.v2_every:  # ahead of the user's callbacks, so that they see what the gate did at a step
        from geocache.gate import V2Gate, V2GateCallback, V2Signal
        from geocache.profile import ProfileConfig

        domains = ProfileConfig(model="", data=list(cfg.v2_data), out="").domains()
        signal = v2_signal or V2Signal(tokenizer, domains, max_sequences=cfg.v2_max_sequences, seed=cfg.seed)
        gate_cb = V2GateCallback(signal, cfg.v2_every, V2Gate(cfg.v2_patience, cfg.v2_action), out)
    trainer = GeometryTrainer(
        model=model,
        args=args,
        train_dataset=cache,
        eval_dataset=eval_cache,
        processing_class=tokenizer,
        geometry_config=cfg.geometry,
        base=_base_source(cfg, want_router, args.device),
        layer_weights=cfg.layer_weights,
        callbacks=[JsonlLogger(out / "metrics.jsonl"), *([gate_cb] if gate_cb else []), *(callbacks or [])],
    )
    if int(os.environ.get("RANK", "0")) == 0 and (cfg.overwrite or (not cfg.resume and out.exists() and _failed_start(out))):
        _replace_run(out)  # the run is accepted (the caches fit the base)
    if int(os.environ.get("RANK", "0")) == 0 and resume_from is not None:
        _drop_incomplete_checkpoints(out, resume_from)
    out.mkdir(parents=True, exist_ok=True)  # its record first
    if int(os.environ.get("RANK", "0")) == 0:
        (out / RUN_CONFIG).write_text(yaml.safe_dump(_run_record(cfg), sort_keys=False))
    if gate_cb is not None:
        gate_cb.trainer = trainer
    if not cfg.progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    lock = out / RUNNING if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.write_text(_lock_record())
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        if eval_cache is not None and not cfg.eval_steps:  # an eval cache and no schedule: evaluated once, at the end (logged as any evaluation)
            trainer.evaluate()
        trainer.check_weights_finite(str(out / "adapter"))
        trainer.save_model(str(out / "adapter"))  # the adapter (PEFT) and tokenizer, from the main process only
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    return trainer
