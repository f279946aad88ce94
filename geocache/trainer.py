"""``GeometryTrainer``: a thin ``transformers.Trainer`` whose ``compute_loss`` is the geometry-aware loss.

Users keep their ``TrainingArguments``, callbacks, ``report_to``, DDP/FSDP through accelerate and
checkpointing; everything geometry-specific is a component this class calls: a base source
(``geocache.base``), ``GeometryAwareLoss``, ``AdaptiveGeometryScheduler`` and, for MoE models,
``router_divergence_loss``. Batches come from a cache (``open_cache`` + ``collate_cache_rows``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from geocache.base import BaseBatch, CacheBase, model_inputs
from geocache.cache.backends import ROUTER_KEYS
from geocache.cache.reader import collate_cache_rows
from geocache.config import GeometryConfig, check_passed_options, one_line
from geocache.losses import AdaptiveGeometryScheduler, GeometryAwareLoss, resolve_layer_weights, router_divergence_loss
from geocache.models import model_fingerprint, model_kind, moe_layout, quiet_peft_wrap
from geocache.moe import recorded_router_logits, routing_choice
from geocache.signals import IGNORE_INDEX, BaseStats, labelled_positions

# Modules never adapted: the output head, MoE routers and the shared-expert gate (a scalar gate).
_NEVER_ADAPT = ("lm_head", "mlp.gate", "mlp.router", "shared_expert_gate")


def _peft_remapped_suffixes(model: nn.Module) -> tuple[str, ...]:
    """Target-name suffixes that peft (0.21) rewrites into fused-expert *parameters* for this
    architecture when converting v4-style MoE configs (e.g. any ``*.gate_proj`` of DeepSeek-V3,
    its dense first layers and shared experts included). Such targets would end as LoRA on the
    experts, which refuses DoRA, so they cannot be DoRA targets. Read from peft's private tables;
    empty if they move."""
    try:
        from peft.utils import transformers_weight_conversion as conv

        model_type = model.config.model_type
        if conv.get_checkpoint_conversion_mapping(model_type) is None:
            return ()
        return tuple(conv._MOE_TARGET_MODULE_MAPPING.get(conv._MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))
    except (ImportError, AttributeError):
        return ()


def default_target_modules(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` that DoRA can adapt: attention projections, dense MLPs and
    shared experts. Fused MoE experts (3-D parameters in transformers 5) and routers are not
    ``nn.Linear`` and are never listed, so ``use_dora=True`` never meets PEFT's ``ParamWrapper``.
    On architectures where peft remaps MLP names onto fused experts (DeepSeek-V3), the dense MLPs
    and shared experts are left out too, with a warning."""
    remapped = _peft_remapped_suffixes(model)
    names, dropped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name == n or name.endswith("." + n) for n in _NEVER_ADAPT):
            (dropped if any(name.endswith("." + s) for s in remapped) else names).append(name)
    if dropped:
        warnings.warn(
            f"{len(dropped)} dense-MLP/shared-expert projections of this {model.config.model_type} model are not adapted: "
            "peft remaps their names onto fused experts, where DoRA is impossible",
            stacklevel=2,
        )
    return names


def add_dora_adapter(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Optional[Sequence[str]] = None,
    adapt_experts: bool = False,
    **lora_args,
):
    """Wrap ``model`` with a DoRA adapter (``peft``, ``use_dora=True``) on ``target_modules``
    (default, or ``"all-linear"``: ``default_target_modules``, which is what peft's ``all-linear``
    means, minus what would break on fused-expert MoE models). MoE experts can only take plain LoRA
    through PEFT's ``target_parameters``, which refuses DoRA, so ``adapt_experts`` is refused here.
    ``lora_args``: any other ``LoraConfig`` field (``use_rslora``, ``init_lora_weights``,
    ``modules_to_save``, ``exclude_modules``, ...; see ``check_lora_args`` for what is refused)."""
    from peft import LoraConfig

    check_lora_args(lora_args)

    if adapt_experts:
        raise ValueError(
            "adapting MoE experts needs LoRA through peft's target_parameters, which does not support DoRA; "
            "geocache trains DoRA on attention, dense MLPs and shared experts only"
        )
    if isinstance(target_modules, str):  # one name, as YAML or a caller may write it
        target_modules = [target_modules]
    if target_modules and "all-linear" in target_modules and len(target_modules) > 1:
        raise ValueError(f"target_modules={list(target_modules)!r} mixes 'all-linear' with module names; give 'all-linear' alone or names only")
    all_linear = not target_modules or list(target_modules) == ["all-linear"]
    targets = default_target_modules(model) if all_linear else list(target_modules)
    if not targets:
        raise ValueError("no nn.Linear modules to adapt were found; pass target_modules explicitly")
    # target_parameters=[] explicitly: left None, peft 0.21 fills in per-architecture expert
    # parameters for some models (DeepSeek-V3), which DoRA cannot wrap.
    try:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, target_parameters=[], use_dora=True,
                            task_type="CAUSAL_LM", **lora_args)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"peft refuses these LoRA options ({one_line(exc, 240) or type(exc).__name__}); lora_args were {lora_args}") from None
    try:
        return with_adapter(model, config)
    except BaseRewritten:
        raise
    except (ValueError, TypeError) as exc:  # peft's own words may run over many lines (a module's repr)
        if lora_args:
            raise ValueError(f"peft cannot build this DoRA adapter of a {model_kind(model)} model with lora_args={lora_args} "
                             f"({one_line(exc, 240) or type(exc).__name__})") from None
        raise ValueError(f"peft cannot put DoRA on target_modules={targets} of this {model_kind(model)} model "
                         f"({one_line(exc, 240) or type(exc).__name__}); the default targets "
                         "(attention, dense MLPs and shared experts, without fused MoE experts) avoid that") from None


class BaseRewritten(ValueError):
    """An adapter initialisation that changed the base's own weights (``with_adapter``)."""


def with_adapter(model: nn.Module, config):
    """``get_peft_model(model, config)``, refused where the model with its adapter off would no
    longer be the base: an initialisation that moves part of each weight into the adapter (PiSSA,
    OLoRA, LoftQ, ...) leaves the live base another model, and the cache another model's. Checked
    on the weights' fingerprint, whatever the method's name (the default initialisation, which
    leaves the weights alone, is not checked)."""
    from peft import get_peft_model

    init = getattr(config, "init_lora_weights", True)
    before = model_fingerprint(model)["weights_sha256"] if init not in (True, False, "gaussian") else None
    with quiet_peft_wrap():
        wrapped = get_peft_model(model, config)
    if before is not None and model_fingerprint(wrapped)["weights_sha256"] != before:
        raise BaseRewritten(f"init_lora_weights={init!r} rewrites the base's own weights (part of each moves into the adapter), so the "
                         "model with its adapter off is no longer the base the geometry loss measures against: leave "
                         "init_lora_weights at its default")
    return wrapped


# LoraConfig fields geocache sets itself: from one of its own options (named), or fixed (None: a
# DoRA adapter on nn.Linear modules of a causal LM).
LORA_SET_BY_GEOCACHE = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "target_modules",
                        "target_parameters": "adapt_experts", "use_dora": None, "task_type": None, "peft_type": None,
                        "inference_mode": None, "base_model_name_or_path": None, "revision": "revision"}


def check_lora_args(extra) -> None:
    """``lora_args``: a mapping of peft ``LoraConfig`` fields that geocache does not set itself
    (their values are checked by ``LoraConfig``)."""
    if isinstance(extra, dict) and not extra:
        return
    from peft import LoraConfig

    check_passed_options("lora_args", extra, LoraConfig, LORA_SET_BY_GEOCACHE, "geocache trains a DoRA adapter of a causal LM")
    for key in ("layers_to_transform", "layers_pattern"):  # seen: every layer adapted, the config saying layer 0
        if key in extra:
            raise ValueError(f"lora_args {key!r} would be ignored: peft applies it only to targets matched by suffix, and geocache's "
                             "targets are full module names; name those layers' modules in --target-modules, or leave some out "
                             "with lora_args exclude_modules")


def checkpoint_complete(path: Path, processes: int) -> bool:
    """Whether ``checkpoint-N`` was written to its end: its ``trainer_state.json`` (the main
    process writes it last) and, for a full checkpoint (optimizer, RNG states), every process's RNG
    state. A write that failed part way (a full disk, a process that died in it) leaves one out, and
    a resume from it was not exact (a missing RNG file is skipped by transformers with an info log)."""
    if not (path / "trainer_state.json").is_file():
        return False
    if not ((path / "optimizer.pt").exists() or any(path.glob("rng_state*.pth"))):
        return True  # save_only_model: the weights and the state only
    rng = ["rng_state.pth"] if processes <= 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    return all((path / name).is_file() for name in rng)


def last_complete_checkpoint(run_dir: str | Path, processes: int) -> tuple[Optional[str], list[str]]:
    """The newest ``checkpoint-N`` of ``run_dir`` written to its end (``checkpoint_complete``), or
    None, and the newer ones that were not."""
    run_dir = Path(run_dir)
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()),
                   key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True) if run_dir.is_dir() else []
    incomplete = []
    for path in found:
        if checkpoint_complete(path, processes):
            return str(path), incomplete
        incomplete.append(str(path))
    return None, incomplete


def peer_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the run stopped
    (its own error says why): gloo's "Connection closed by peer", NCCL's errors, a timeout."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(exc)
    return any(k in text for k in ("closed by peer", "Connection reset", "gloo", "NCCL", "ProcessGroup", "Broken pipe", "timed out"))


def _logged_step(line: str) -> float:
    """The step of a JSONL log record; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps up to ``step`` in a JSONL log (``metrics.jsonl``,
    ``v2_checks.jsonl``): a resumed run logs the steps after its checkpoint again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in kept))


class JsonlLogger(TrainerCallback):
    """Appends every log record (train and eval) to a JSONL file, one object per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run logs again the steps after its checkpoint: the records of those steps
        # from the interrupted run go, so that every step appears once (as in log_history).
        if state.is_world_process_zero:
            drop_records_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")


def _checkpointing(model) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the property; the old name warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def first_rows(batch: dict, n: int) -> dict:
    """The first ``n`` rows of a collated batch: the ``[B, T]`` token arrays cut at n, and the
    statistics over labelled positions (``base``, router arrays ``[P, ...]``) cut at the positions
    those rows hold (they come first: ``labelled_positions`` order is row-major)."""
    rows = batch["labels"].shape[0]
    positions = int((batch["labels"][:n, 1:] != IGNORE_INDEX).sum())
    out = {}
    for key, value in batch.items():
        if isinstance(value, BaseStats):
            out[key] = value.select(slice(0, positions))
        elif key in ROUTER_KEYS:
            out[key] = value[:positions]
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            out[key] = value[:n]
        else:
            out[key] = value
    return out


def _refuse_rewritten_base(model) -> None:
    """A model given already adapted, whose adapter was initialised by moving part of the base's
    weights into it (PiSSA, OLoRA, CorDA, LoftQ: peft rewrites the base layers), is refused by name:
    its weights from before can no longer be compared (``with_adapter`` checks them when it wraps)."""
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
            raise BaseRewritten(f"adapter {name!r} was initialised with init_lora_weights={init!r}, which rewrites the base's own weights, "
                                "so the model with its adapter off is no longer the base the geometry loss measures against")


def _loaded_model(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``Trainer``'s arguments with a model given by name (a local path or hub id, as TRL's trainers
    take it) loaded, and its tokenizer as the ``processing_class`` unless one was given."""
    model = kwargs.get("model", args[0] if args else None)
    if not isinstance(model, (str, os.PathLike)):
        return args, kwargs
    from geocache.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(os.fspath(model))
    kwargs = {**kwargs, "processing_class": kwargs.get("processing_class") or tokenizer}
    return ((model, *args[1:]), kwargs) if "model" not in kwargs and args else (args, {**kwargs, "model": model})


def _moe_targets(model, peft_config):
    """On a model with fused MoE experts, a peft config whose targets peft cannot place gets
    ``default_target_modules``, as ``add_dora_adapter`` gives them: ``"all-linear"`` with DoRA (peft
    wraps the fused experts, which refuse DoRA: "lora.ParamWrapper does not work with
    use_dora=True"), or no targets where peft knows none for the architecture."""
    import dataclasses

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    targets = getattr(peft_config, "target_modules", None)
    if moe_layout(model) is None or getattr(peft_config, "target_parameters", None) or not dataclasses.is_dataclass(peft_config):
        return peft_config
    all_linear = targets == "all-linear" or (isinstance(targets, (list, set, tuple)) and set(targets) == {"all-linear"})
    unknown = targets is None and KNOWN.get(getattr(model.config, "model_type", None)) is None
    if (all_linear and getattr(peft_config, "use_dora", False)) or unknown:
        return dataclasses.replace(peft_config, target_modules=default_target_modules(model))
    return peft_config


def _wrapped_model(args: tuple, kwargs: dict, peft_config) -> tuple[tuple, dict]:
    """``Trainer``'s arguments with the model (given first or as ``model=``) wrapped with ``peft_config``."""
    model = kwargs.get("model", args[0] if args else None)
    if model is None:
        raise ValueError("peft_config was given without a model to put the adapter on")
    if hasattr(model, "peft_config"):
        raise ValueError("the model already carries a PEFT adapter: give peft_config or an adapted model, not both")
    model = with_adapter(model, _moe_targets(model, peft_config))
    return ((model, *args[1:]), kwargs) if "model" not in kwargs and args else (args, {**kwargs, "model": model})


def _trainer_arguments(trainer, args: tuple, kwargs: dict) -> dict:
    """``Trainer.__init__``'s arguments by name, however they were given (positionally or not)."""
    return inspect.signature(Trainer.__init__).bind_partial(trainer, *args, **kwargs).arguments


def _refuse_rows_without_statistics(name: str, dataset) -> None:
    """A dataset whose rows carry no cached base statistics (a tokenised ``datasets.Dataset``, say)
    ended in ``KeyError: 'lse'`` at the first step; said here, in one sentence."""
    from geocache.cache.reader import CacheReader

    for d in (dataset.values() if isinstance(dataset, dict) else [dataset]):
        if d is None or isinstance(d, CacheReader) or not hasattr(d, "__getitem__") or not hasattr(d, "__len__") or len(d) == 0:
            continue
        row = d[0]
        if isinstance(row, dict) and "lse" not in row:
            raise ValueError(f"{name} rows hold {sorted(row)[:6]} but no base statistics: GeometryTrainer trains on a geocache cache, "
                             "geocache.open_cache(path) of what geocache precompute wrote (its rows carry the tokens and the base's "
                             "statistics), or give a data_collator that supplies them")


class GeometryTrainer(Trainer):
    """``Trainer`` with the geometry-aware loss.

    Extra arguments: ``geometry_config`` (``GeometryConfig``), ``base`` (a base source from
    ``geocache.base``; default ``CacheBase()``), ``layer_weights`` for the router loss (default:
    mid-band), ``peft_config`` (a peft config the model is wrapped with, as TRL's trainers take it;
    or give a model that carries its adapter, e.g. from ``add_dora_adapter``). The model may be
    given by name (a local path or hub id). Train and eval datasets are caches (``open_cache``);
    the default collator pads them and carries their base statistics. Logged per step: task loss, every geometry metric, the
    thresholds in force, penalised fractions, router Jaccard/divergence (MoE), tokens/s, base mode.
    """

    def __init__(self, *args, geometry_config: Optional[GeometryConfig] = None, base=None, layer_weights=None, peft_config=None,
                 **kwargs):
        args, kwargs = _loaded_model(args, kwargs)
        if peft_config is not None:  # as TRL's trainers take it: the model is wrapped here
            # ... with the adapter's initial weights drawn after TrainingArguments' seed, as
            # Trainer seeds before anything else (the same script gave two runs otherwise).
            from transformers import set_seed

            set_seed(getattr(_trainer_arguments(self, args, kwargs).get("args"), "seed", 42))  # (42: TrainingArguments' default)
            args, kwargs = _wrapped_model(args, kwargs, peft_config)
        # Trainer's arguments by name, before its own setup, which changes the model's config
        # (use_cache off) and so its fingerprint.
        bound = _trainer_arguments(self, args, kwargs)
        _refuse_rewritten_base(bound.get("model"))
        if kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class")
            pad = getattr(tok, "pad_token_id", None) or 0
            kwargs["data_collator"] = partial(collate_cache_rows, pad_token_id=pad)
            for name in ("train_dataset", "eval_dataset"):  # the default collator reads base statistics from every row
                _refuse_rows_without_statistics(name, bound.get(name))
        self._check_caches(bound.get("model"), base or CacheBase(), bound.get("train_dataset"), bound.get("eval_dataset"),
                           bound.get("processing_class"))
        if bound.get("model") is not None:
            from geocache.models import no_hub_kernels_offline

            no_hub_kernels_offline(bound["model"])  # a model the user loaded: offline, model.train() must not fetch kernels
        if layer_weights is not None and bound.get("model") is not None:  # here, not inside the first step
            layout = moe_layout(bound["model"])
            if layout is not None:
                resolve_layer_weights(layer_weights, len(layout["layers"]))
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            # The loss replaces Trainer's, so its label smoother would be silently skipped; and the
            # calibration terms measure the model against the real next token, not a smoothed one.
            raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor}: the geometry-aware loss does not smooth labels "
                             "(its calibration-gap penalty is measured against the real next token); set it to 0")
        if self.args.remove_unused_columns:  # HF's default, also when no args were given
            # Trainer would drop every dataset column the model's forward does not name: the base
            # statistics (lse, top-k, ...) with them. What TRL's trainers do for their own columns.
            warnings.warn("remove_unused_columns=True would drop the cache's base statistics from every batch: "
                          "GeometryTrainer sets it to False", stacklevel=2)
            self.args.remove_unused_columns = False
        self.geometry_config = geometry_config or GeometryConfig()
        self.geometry_loss = GeometryAwareLoss(self.geometry_config)
        self.geometry_scheduler = AdaptiveGeometryScheduler.from_config(self.geometry_config)
        self.base_source = base or CacheBase()
        self.layout = moe_layout(self.accelerator.unwrap_model(self.model))
        # How the routers choose experts where it is not the top-k of the logits (DeepSeek-V3); its
        # bias buffers are not trained, so the base and the tuned model share them.
        self.routing_choice = routing_choice(self.accelerator.unwrap_model(self.model)) if self.layout is not None else None
        self.layer_weights = layer_weights
        if self.layout is None and layer_weights is not None:
            raise ValueError("router layer weights were given, but the model is dense (it has no MoE router)")
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        # tokens/s window: the clock starts at the first training forward (not at setup) and stands
        # still during evaluation.
        self._tokens, self._clock = 0, None
        self._warned_escaped = False

    @staticmethod
    def _check_caches(model, base, train_dataset, eval_dataset, processing_class) -> None:
        """Refuse, in one sentence, a training or eval cache built for another base model, tokenizer
        or output size (``CacheReader.check_compatible``). The base is the model itself (its
        adapter disabled: ``cache``, ``live``), or the separate frozen model of a ``copy`` base,
        whose statistics the cache then holds in the tuned model's tokens."""
        from geocache.cache.reader import CacheError, CacheReader
        from geocache.models import output_size

        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        caches = [d for d in (train_dataset, *evals) if isinstance(d, CacheReader)]
        if not caches or model is None:
            return
        tokenizer = processing_class if hasattr(processing_class, "get_vocab") else None
        source = getattr(base, "inner", base)  # periodic: what it queries
        copied = getattr(source, "base_model", None)
        if any(c.manifest.data.get("preprocessing", {}).get("packing") for c in caches):
            from geocache.base import check_packed_attention

            check_packed_attention(model)
            if copied is not None:
                check_packed_attention(copied, "the copy base")
        for cache in caches:
            if copied is None:
                cache.check_compatible(model, tokenizer)
                continue
            cache.check_compatible(copied, tokenizer)
            if output_size(model) != cache.manifest.base_model["output_size"]:
                raise CacheError(f"cache {cache.url!r} covers {cache.manifest.base_model['output_size']} output rows but the model "
                                 f"being tuned has {output_size(model)}")

    def train(self, *args, **kwargs):
        self._tokens, self._clock = 0, None
        self._sums["train"].clear()
        return super().train(*args, **kwargs)

    # --------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        count = True
        if not model.training and self.accelerator.num_processes > 1:
            inputs, count = self._without_repeated_rows(inputs)
        labels = inputs["labels"]
        lam_router = self.geometry_scheduler.lambda_router  # the scheduler's λ_router (the V2 gate may double it)
        unwrapped = self._unwrap(model)
        # Router logits through hooks, not output_router_logits=True (which adds transformers'
        # load-balancing loss to every forward); the call stays on the wrapped model (DDP).
        with recorded_router_logits(unwrapped, enabled=self.layout is not None) as router_logits:
            outputs = model(**model_inputs(inputs), use_cache=False)
        base: BaseBatch = self.base_source(unwrapped, inputs, step)
        lm = base.lm.to(outputs.logits.device) if base.lm is not None else None
        thresholds = self.geometry_scheduler.get_thresholds(step)
        rows, _ = labelled_positions(labels)
        n_local = rows.numel()
        denom = int(num_items_in_batch) if num_items_in_batch is not None else None
        loss, metrics = self.geometry_loss(outputs.logits, lm, labels, thresholds=thresholds, num_items_in_batch=denom)

        if self.layout is not None and base.router is not None:
            tuned_router = torch.stack([r.to(router_logits[0].device) for r in router_logits])  # [L, B*T, E]; the loss takes the labelled rows
            if (lam_router > 0 and model.training and outputs.logits.requires_grad and not tuned_router.requires_grad
                    and _checkpointing(unwrapped)):
                # The hooks record the router logits inside the checkpointed forward, which the
                # reentrant variant runs without autograd: the router term would be a constant.
                raise ValueError("the router loss gets no gradient under reentrant activation checkpointing (its router logits are "
                                 "recorded inside a forward run without autograd): pass activation_checkpointing_kwargs="
                                 "{'use_reentrant': False}, transformers' default, or set lambda_router to 0")
            if base.router_logprobs is None and not base.router.is_floating_point() and not self._warned_escaped:
                self._warned_escaped = True
                warnings.warn("this top-k router cache holds no router log-probs (it was built before geocache wrote them): the "
                               "router loss is the escaped mass 1 − Σ_{S_base} r_tuned, which is not 0 at the base; rebuild the "
                               "cache for the KL over the cached experts and the rest", stacklevel=2)
            r_loss, r_metrics = router_divergence_loss(
                tuned_router, base.router.to(tuned_router.device), self.layer_weights, self.layout["top_k"],
                rows=rows.to(tuned_router.device), scoring=self.layout["scoring"], choice=self.routing_choice,
                base_logprobs=base.router_logprobs.to(tuned_router.device) if base.router_logprobs is not None else None,
            )
            # a mean over this micro-batch's positions, re-weighted like the token terms
            scale = n_local / denom if denom else 1.0
            if lam_router > 0:  # measured either way; trained on only when weighted
                loss = loss + lam_router * scale * r_loss
            metrics.update(r_metrics)
        scaled = denom is not None and self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
        if scaled:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does for token-summed losses
        value = loss.item()
        elsewhere = False
        if self.accelerator.num_processes > 1:
            # Every process decides together: one that stopped alone left the others in the
            # gradient all-reduce (a broken-connection traceback on gloo, a wait on NCCL).
            flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.accelerator.device)
            elsewhere = self.accelerator.reduce(flag, reduction="sum").item() > 0 and math.isfinite(value)
        if not math.isfinite(value) or elsewhere:
            where = f"at step {step + 1} (after {step} completed steps)" if model.training else f"in evaluation after {step} completed steps"
            what = "not finite on another process" if elsewhere else value
            raise FloatingPointError(f"the loss is {what} {where}; training stopped, and {self._last_good_checkpoint()}")
        if not model.training:
            # Eval loss per labelled position, weighted like every metric: independent of the eval
            # batch size and of the number of processes (Trainer's own is a mean of batch means).
            # With a denominator the loss is Σ/denom (× processes): back to this batch's mean.
            mean = loss.detach()
            if denom is not None:
                mean = mean * (denom / max(n_local, 1) / (self.accelerator.num_processes if scaled else 1))
            metrics["loss"] = mean
        if count:
            self._accumulate("train" if model.training else "eval", metrics, n_local)
        if model.training:
            if self._clock is None:
                self._clock = time.perf_counter()
            self._tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        return (loss, outputs) if return_outputs else loss

    def _without_repeated_rows(self, inputs: dict) -> tuple[dict, bool]:
        """The eval batch without the rows accelerate repeats to even out the last batch across
        processes (``even_batches``), and whether anything is left to count. Its
        ``gather_for_metrics`` knows which rows those are; the metrics leave them out as it does."""
        n = inputs["input_ids"].shape[0]
        if not getattr(self.accelerator, "even_batches", True):
            return inputs, True  # uneven batches: nothing repeated
        rank = self.accelerator.process_index
        kept = self.accelerator.gather_for_metrics(torch.arange(n, device=self.accelerator.device) + rank * n)
        keep = int(((kept >= rank * n) & (kept < rank * n + n)).sum())  # a prefix of this process's rows
        if keep == n:
            return inputs, True
        # Every process still runs a forward (on one row if none is left), in step with the others.
        return first_rows(inputs, max(keep, 1)), keep > 0

    def _last_good_checkpoint(self) -> str:
        """Where the run can restart from, in words: the last checkpoint written to its end
        (``_save_checkpoint`` refuses to write non-finite weights)."""
        out = Path(self.args.output_dir)
        last, _ = last_complete_checkpoint(out, self.accelerator.num_processes)
        return f"the last good checkpoint is {last}" if last else f"there is no checkpoint in {out} yet"

    def check_weights_finite(self, writing: str) -> None:
        """Raise ``FloatingPointError`` if a trainable weight is NaN/inf, before ``writing`` is
        written: a poisoned checkpoint or adapter would be used later as if it were good."""
        bad = next((name for name, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
        if self.accelerator.num_processes > 1:
            # Every process decides together (under FSDP each holds a shard, and a process that
            # stopped alone would leave the others waiting in the checkpoint's collectives).
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and bad is None:
                bad = "on another process"
        if bad is not None:
            raise FloatingPointError(f"the trainable weight {bad} is not finite after step {self.state.global_step}, so {writing} "
                                     f"was not written; training stopped, and {self._last_good_checkpoint()}")

    def _save_checkpoint(self, model, trial, **kwargs) -> None:  # transformers 5: (model, trial)
        name = f"checkpoint-{self.state.global_step}"
        self.check_weights_finite(name)
        try:
            super()._save_checkpoint(model, trial, **kwargs)
        except RuntimeError as exc:
            if peer_stopped(exc):
                raise
            # torch.save reports a full disk as a RuntimeError ("iostream error", "unexpected pos"),
            # not an OSError; what was written of the checkpoint is skipped by a resume.
            raise OSError(f"writing {name} failed ({one_line(exc, 160)}; is the disk full?): training stopped, and "
                          f"{self._last_good_checkpoint()}") from None

    def _unwrap(self, model):
        # ``unwrap_model`` walks every module looking for compiled regions (0.2 ms a step at the
        # tiny shape, more with more modules); the answer changes only with the wrapper.
        cached = getattr(self, "_unwrapped", None)
        if cached is None or cached[0] is not model:
            cached = self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    def _accumulate(self, split: str, metrics: dict, weight: int) -> None:
        sums = self._sums[split]
        metrics = dict(metrics)
        # 0-d tensors as Python numbers, one transfer per device instead of one .item() each (with a
        # device_map the router's metrics may sit on another device than the loss's).
        by_device = defaultdict(list)
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
                by_device[value.device].append(key)
        with torch.no_grad():
            for keys in by_device.values():
                dtype = torch.float64 if any(metrics[key].dtype == torch.float64 for key in keys) else torch.float32
                metrics.update(zip(keys, torch.stack([metrics[key].to(dtype) for key in keys]).tolist()))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "num_positions":
                if isinstance(value, float) and math.isnan(value):
                    continue
                sums[key] += value * weight
                sums[f"__w_{key}"] += weight
            elif isinstance(value, torch.Tensor) and value.dim() == 1:  # per-layer router metrics
                # keyed by decoder layer, as the manifest's moe.layers and geocache profile number them
                layers = self.layout["layers"] if self.layout is not None and len(self.layout["layers"]) == len(value) else range(len(value))
                for i, v in zip(layers, value.tolist()):
                    sums[f"{key}/{i}"] += v * weight
                    sums[f"__w_{key}/{i}"] += weight

    def _flush(self, split: str, extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Position-weighted means of the metrics accumulated since the last flush, over every
        process (each holds sums over its own shard of the data); ``extra`` sums are summed across
        processes and returned under their own names. Every process calls this (``Trainer`` logs
        and evaluates on all of them)."""
        sums, out = dict(self._sums[split]), {}
        self._sums[split].clear()
        sums.update({f"__extra_{k}": v for k, v in (extra or {}).items()})
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, float] = defaultdict(float)
            for part in gather_object([sums]):  # keys may differ (a metric NaN on one process): merged by name
                for key, value in part.items():
                    merged[key] += value
            sums = merged
        for key, value in sums.items():
            if key.startswith("__extra_"):
                out[key[len("__extra_"):]] = value
            elif not key.startswith("__w_") and sums[f"__w_{key}"] > 0:
                out[key] = value / sums[f"__w_{key}"]
        return out

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # A training log, or Trainer's end-of-training summary ('train_loss', no 'loss') when steps
        # ran since the last training log: that last window's metrics go into the summary, not lost.
        # (Every process runs the same micro-batches, so they agree on whether there are sums.)
        if "loss" in logs or ("train_loss" in logs and self._sums["train"]):
            logs.update(self._flush("train", extra={"tokens": float(self._tokens)}))
            now = time.perf_counter()
            tokens = logs.pop("tokens")  # all processes' tokens
            if self._clock is not None:
                logs["tokens_per_s"] = tokens / max(now - self._clock, 1e-9)
            self._tokens, self._clock = 0, now
            logs["base_mode"] = self.base_source.mode
            logs["kl_direction"] = self.geometry_config.kl_direction
            cached = self.geometry_config.kl_estimator if self.geometry_config.kl_direction == "forward" else "coarse"
            logs["kl_estimator"] = {"cache": cached, "periodic": f"exact every {getattr(self.base_source, 'every', '?')} steps"}.get(
                self.base_source.mode, "exact")
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._sums["eval"].clear()
        start = time.perf_counter()
        output = super().evaluation_loop(*args, **kwargs)
        if self._clock is not None:  # evaluation is not training time: the tokens/s clock skips it
            self._clock += time.perf_counter() - start
        # (dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for key, value in self._flush("eval").items():
            output.metrics[f"{prefix}_{key}"] = value
        return output
