"""``GeometryConfig``: every λ and threshold of the geometry-aware loss, with the note's defaults.

One dataclass, each field with ``metadata={"help": ...}`` (the PEFT convention), validated in
``__post_init__`` so a bad value fails where it is set, in one sentence naming it.
Loadable from a YAML mapping (``GeometryConfig.from_yaml``); unknown keys are errors.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import yaml

from geocache.signals import KL_DIRECTIONS, KL_ESTIMATORS


@dataclass
class GeometryConfig:
    """Weights, thresholds and options of ``GeometryAwareLoss`` and ``AdaptiveGeometryScheduler``.

    Defaults: λ's at the low end of the design note's "Recommended Hyperparameters" table ("start
    low, increase if KL explodes"); thresholds exactly as the note (KL 0.15 → 0.08 over 1000 steps,
    dH 0.1, calibration 0.05).
    """

    lambda_kl: float = field(default=0.1, metadata={"help": "λ_KL, weight of the KL hinge penalty (note: 0.1-0.5)."})
    lambda_cal: float = field(default=0.2, metadata={"help": "λ_cal, weight of the calibration-gap hinge (note: 0.2-1.0)."})
    lambda_entropy: float = field(default=0.1, metadata={"help": "λ_H, weight of the entropy-drop hinge (note: 0.1-0.3)."})
    lambda_router: float = field(
        default=0.1, metadata={"help": "λ_router, weight of the router divergence loss on MoE models (a dense model accepts only the default or 0, unused)."}
    )
    kl_threshold: float = field(
        default=0.15, metadata={"help": "KL hinge threshold in nats; with a schedule, its starting value (note: 0.08-0.15)."}
    )
    final_kl_threshold: Optional[float] = field(
        default=0.08,
        metadata={"help": "KL threshold reached after `kl_warmup_steps` (linear), then held; null keeps `kl_threshold`."},
    )
    kl_warmup_steps: int = field(default=1000, metadata={"help": "Steps over which the KL threshold tightens linearly."})
    dh_threshold: float = field(
        default=0.1, metadata={"help": "Entropy-drop threshold δ in nats: positions with dH < −δ are penalised."}
    )
    cal_threshold: float = field(
        default=0.05, metadata={"help": "Calibration-gap threshold in nats: positions with NLL − H(q) above it are penalised."}
    )
    kl_direction: str = field(
        default="forward", metadata={"help": "`forward` = KL(p‖q) (the note's code), `reverse` = KL(q‖p) (the note's text)."}
    )
    # topk_cv by measurement: topk_sampled's unbiased gradient, whose 200 cached steps match live
    # training within 0.2% (parity.md; topk_hybrid's biased one drifts 2.2-2.3% further), and a value
    # with 3x less per-position error, so the penalty masks agree with the exact KL's on 95.3% of
    # positions instead of 87.3% at k=32, m=16, worst case (benchmarks/results/fidelity.md).
    kl_estimator: str = field(
        default="topk_cv",
        metadata={
            "help": "Estimator of forward KL from cached statistics: topk_cv (needs tail samples; topk_sampled's "
            "expectation and gradient, a lower-variance value) | topk_sampled | topk_hybrid | topk_tail | topk_renorm."
        },
    )
    chunk_size: Optional[int] = field(
        default=None,
        metadata={"help": "Positions per chunk of [positions × vocab] float32 temporaries; null picks by device and vocab."},
    )
    # On by default on CUDA: on an H200 the loss alone ran 3.9x (float32) and 4.5x (bfloat16 logits)
    # faster at vocab 151,936 and the mid-shape step went 1.117x → 1.005x plain
    # (benchmarks/results/cuda_check.md); off on the CPU, where the tests compile it on purpose.
    compile_loss: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Run the loss's [positions × vocab] passes as torch.compile'd fused kernels (float32, float64 or bfloat16 "
            "logits; estimators that skip the tuned tail: topk_cv, topk_sampled, topk_renorm); null: on CUDA with Triton, off elsewhere."
        },
    )

    def __post_init__(self) -> None:
        check_option_types(self)
        for name in ("lambda_kl", "lambda_cal", "lambda_entropy", "lambda_router"):
            _check_nonnegative(name, getattr(self, name))
        for name in ("kl_threshold", "dh_threshold", "cal_threshold"):
            _check_nonnegative(name, getattr(self, name))
        if self.final_kl_threshold is not None:
            _check_nonnegative("final_kl_threshold", self.final_kl_threshold)
            if self.final_kl_threshold > self.kl_threshold:
                raise ValueError(
                    f"final_kl_threshold={self.final_kl_threshold} is above kl_threshold={self.kl_threshold}: "
                    "the schedule tightens, so the final KL threshold must be at most the initial one"
                )
        if isinstance(self.kl_warmup_steps, bool) or not isinstance(self.kl_warmup_steps, int) or self.kl_warmup_steps <= 0:
            raise ValueError(f"kl_warmup_steps={self.kl_warmup_steps!r} must be a positive integer")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction={self.kl_direction!r} must be one of {', '.join(KL_DIRECTIONS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size <= 0):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer or null")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GeometryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown_options('geometry', unknown, known)}; valid keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, section: Optional[str] = "geometry") -> "GeometryConfig":
        """Read a YAML file: its ``section`` mapping if present, else the whole top-level mapping."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {one_line(exc)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
        if section and isinstance(data.get(section), dict):
            data = data[section]
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help text, for CLIs and docs."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls) if f.default is not MISSING}


def read_yaml(text: str) -> Any:
    """Parse a config file's text (data only: ``yaml.safe_load``). PyYAML reads ``1e-4`` (no dot)
    as text; the configs turn text in a numeric option into its number (``check_option_types``),
    and a revision such as ``12e4567`` stays the text it is."""
    return yaml.safe_load(text)


def one_line(text, limit: Optional[int] = None) -> str:
    """``text`` (an exception's message, say) on one line, cut at ``limit`` characters with an
    ellipsis: the CLI's errors are one sentence, and YAML's or peft's own messages span lines."""
    words = " ".join(str(text).split())
    return words if limit is None or len(words) <= limit else words[:limit] + "…"


def unknown_options(kind: str, unknown: list[str], known) -> str:
    """The sentence for options a config does not have, with the nearest known name of each
    (``top_k`` → ``k``, ``lr`` → ``learning_rate`` where the spelling is close)."""
    aliases = {"top_k": "k", "tail_samples": "m", "lr": "learning_rate", "batch_size": "per_device_train_batch_size",
               "epochs": "num_train_epochs", "steps": "max_steps"}
    hints = []
    for name in unknown:
        near = aliases.get(name) if aliases.get(name) in known else None
        near = near or next(iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)), None)
        if near:
            hints.append(f"{name} → {near}?")
    return f"unknown {kind} option(s) {unknown}" + (f" (did you mean: {', '.join(hints)})" if hints else "")


def check_passed_options(name: str, extra, library_class, own: dict, fixed: str) -> None:
    """``extra`` (``training_args``, ``lora_args``): a mapping of another library's option names
    (the init fields of the dataclass ``library_class``) to values, passed through as they are and
    checked there; refused here are a name the class does not have (with the nearest), and one
    geocache sets itself: ``own`` maps it to the geocache option that does, or to None where
    geocache fixes it, for the reason ``fixed``."""
    kind = library_class.__name__
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"{name}={extra!r} must be a mapping of {kind} names to values")
    known = {f.name for f in fields(library_class) if f.init}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(unknown_options(kind, unknown, known - set(own)))
    for key in extra:
        if key in own:
            how = f"set it with geocache's own --{own[key].replace('_', '-')}" if own[key] else fixed
            raise ValueError(f"{name} {key!r} is set by geocache: {how}")


def check_option_types(cfg) -> None:
    """Check a dataclass config's options against their declared types, in one sentence each,
    before any work (YAML hands over whatever it parsed; a quoted ``"false"`` in a bool option was
    true, and turned on ``trust_remote_code`` or ``overwrite``). Numbers given as text (``1e-4``
    from YAML, a quoted ``'3'``) become numbers and an integer option's whole float (``2.0``) an int;
    bool options take true/false (the text ``"true"``/``"false"`` too); text options refuse numbers,
    lists and mappings (quote a revision such as ``0123`` in YAML); list options take a list (one
    text item alone becomes a one-item list)."""
    names = {f.name for f in fields(cfg)}
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name, None)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if value is None:
            if not (union and type(None) in typing.get_args(hint)) and name in names:
                raise ValueError(f"{name} must be given a value (it cannot be null)")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        kind = typing.get_origin(args[0]) or args[0]
        if len(args) > 1:  # a union such as str | dict: each kind checks itself where used
            continue
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                setattr(cfg, name, value.strip().lower() == "true")
            elif isinstance(value, np.bool_) or (isinstance(value, numbers.Integral) and value in (0, 1)):  # numpy's, 0/1
                setattr(cfg, name, bool(value))
            elif not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be true or false")
        elif kind in (int, float):
            setattr(cfg, name, _number(name, value, kind))
        elif kind is str:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and name == "device":
                continue  # a CUDA device index, as torch takes it
            if isinstance(value, (bool, numbers.Number, list, tuple, dict)):
                raise ValueError(f"{name}={value!r} must be text (in YAML, quote it)")
        elif kind is list:
            item = (typing.get_args(args[0]) or (object,))[0]
            if isinstance(value, (str, os.PathLike)) and item is str:
                value = [value]
            elif not isinstance(value, (str, bytes, dict)) and hasattr(value, "__iter__"):
                value = list(value.tolist() if hasattr(value, "tolist") else value)  # tuples, sets, arrays, tensors
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name}={value!r} must be a list")
            if item is str:
                value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
            if item is str and any(isinstance(v, (bool, int, float, list, tuple, dict)) for v in value):
                raise ValueError(f"{name}={list(value)!r} must be a list of text")
            if item in (int, float):
                value = [_number(name, v, item) for v in value]
            setattr(cfg, name, list(value))
        elif isinstance(kind, type) and is_dataclass(kind) and not isinstance(value, (dict, kind)):
            raise ValueError(f"{name}={value!r} must be a mapping of {kind.__name__} options")


def _number(name: str, value, kind):
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}")
    if isinstance(value, numbers.Integral):  # numpy's too
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, float):
        value = float(value)
    number = value if isinstance(value, float) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or (kind is int and not number.is_integer()):
        raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}")
    return int(number) if kind is int else number


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
