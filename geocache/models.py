"""Loading a base model the way a user names it, and what identifies it: fingerprint, sizes, MoE layout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from typing import Optional

import torch

from geocache.config import one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Router scoring per architecture, where the config does not say (SPEC: "in the architecture's
# own scoring space"). DeepSeek-V3 scores experts with a sigmoid; the others with a softmax.
_SIGMOID_SCORING = {"deepseek_v3", "glm4_moe"}
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def load_model_and_tokenizer(
    model_id: str,
    *,
    revision: Optional[str] = None,
    dtype: str = "float32",
    device: Optional[str] = None,
    device_map: Optional[str | dict] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[str] = None,
    trust_remote_code: bool = False,
    weights: bool = True,
    progress: bool = True,
):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local path or hub id, in eval mode.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a mapping of module names to
    devices, ``"cpu"`` or ``"disk"``) spreads a base too large for one device through accelerate,
    within ``max_memory`` per device, offloading to ``offload_folder`` what fits nowhere;
    otherwise the model goes to ``device`` (default: CUDA when available, else CPU).
    ``weights=False``: the model's structure only, on the meta device (no weight is read or
    allocated), for what its config and modules tell: output size, MoE layout.
    ``progress=False``: without transformers' loading bars (a command's ``--no-progress``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if device is not None and weights:
        check_device(device)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        if not weights:
            config = AutoConfig.from_pretrained(model_id, **kwargs)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
            return model.eval(), tokenizer
        placement = {k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v is not None}
        with hf_progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=DTYPES[dtype], device_map=device_map, **placement, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"model {model_id!r} is neither a local model directory nor a reachable hub model ({exc})") from None
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):  # transformers asks for the flag by its name
            raise
        # transformers' three lines, as one sentence
        raise ValueError(f"model {model_id!r} comes with its own modeling code, which runs only with --trust-remote-code "
                         "(read that code first)") from None
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    no_hub_kernels_offline(model)
    return model, tokenizer


def no_hub_kernels_offline(model) -> None:
    """Turn transformers' hub kernels off for ``model`` when the hub is offline. transformers 5.25
    loads models with ``use_kernels=True`` and re-kernelizes on ``model.train()``, which on CUDA
    fetches kernels (``kernels-community/rotary``) from the hub: offline, every training run ended
    there at its first step (seen on an H200). Online, the user's choice stays."""
    from huggingface_hub import constants

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(constants, "HF_HUB_OFFLINE", False) and getattr(inner, "use_kernels", False):
        inner.use_kernels = False  # transformers' own switch (Trainer uses it for DataParallel): torch's layers


def model_kind(model) -> str:
    """How a model is named in messages: its config's ``model_type`` (``qwen3_moe``), else its class."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, refused in one sentence when torch does not know it or this
    machine does not have it (``cuda:0`` on a CPU-only build was an AssertionError from deep inside)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={str(device)!r} is not a device torch knows ({exc})") from None
    if d.type != "meta":
        try:
            torch.empty(0, device=d)
        except Exception as exc:  # AssertionError ("not compiled with CUDA"), RuntimeError (no such index), ...
            raise ValueError(f"device={str(device)!r} is not available on this machine ({one_line(exc) or type(exc).__name__})") from None
    return d


def output_size(model) -> int:
    """Rows of the model's output projection (may exceed the tokenizer's vocabulary)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def input_device(model) -> torch.device:
    """Where the model's input ids go: its embedding's device, or, when accelerate offloaded the
    embedding (a ``device_map`` with ``cpu`` or ``disk``: its weight is on ``meta`` between
    forwards), the device its hook runs it on."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if embed.weight.device.type == "meta" and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embed.weight.device


def _owner_offloaded(model, name: str):
    """The module holding state-dict entry ``name`` if accelerate offloaded its tensors, else None."""
    from accelerate.utils import has_offloaded_params

    module_name, _, _ = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module if has_offloaded_params(module) else None


def _base_weights(model) -> tuple[torch.nn.Module, dict[str, str]]:
    """The transformers model under a PEFT wrapper (or the model itself), and its state-dict names
    of base weights mapped to the names they have without the adapter: adapter weights (keyed by
    adapter name, ``lora_A.default.weight``) left out, wrapped layers' ``base_layer.`` and
    ``original_module.`` dropped. So a model with an adapter has its base's fingerprint."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Where PEFT keeps adapter weights: each tuner layer's (and modules_to_save wrapper's) own
    # containers, named by its ``adapter_layer_names`` (lora_A, lora_B, lora_magnitude_vector, ...).
    containers = tuple(f"{m_name}.{layer}." if m_name else f"{layer}." for m_name, module in inner.named_modules()
                       for layer in getattr(module, "adapter_layer_names", ()))
    names = {}
    for name in inner.state_dict():
        if name.startswith(containers):
            continue
        names[name] = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    return inner, names


def model_fingerprint(model) -> dict:
    """sha256 of the config, and of the weights sampled: per tensor (sorted by name) its name,
    shape and up to 4,096 evenly strided values rounded to bfloat16, so the same weights loaded
    in float32 or bfloat16 agree while any retrained or other model differs. A second weights
    hash rounds the values to float16 first: float16 weights, rounded from float32 once already,
    round to bfloat16 differently on some values (double rounding), so a float16 load matches a
    float32 one only there (``same_weights``). Weights accelerate offloaded (``meta`` here, held
    by its hooks) are read one module at a time, so a base spread by a ``device_map`` has the
    fingerprint it has loaded whole. A PEFT model has its base's fingerprint (adapters left out)."""
    from accelerate.utils import align_module_device

    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    h, h16 = hashlib.sha256(), hashlib.sha256()

    def update(name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
        for digest, values in ((h, sample), (h16, sample.to(torch.float16).to(torch.float32))):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())

    inner, names = _base_weights(model)
    state = inner.state_dict()
    for name in sorted(names, key=names.get):  # in the order of the names without the adapter
        param = state[name]
        if param.device.type != "meta":
            update(names[name], param)
            continue
        owner = _owner_offloaded(inner, name)
        if owner is None:  # a structure without weights (``weights=False``): nothing to hash
            continue
        with align_module_device(owner, torch.device("cpu")):
            update(names[name], getattr(owner, name.rpartition(".")[2]))
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
        "weights_sha256_via_float16": h16.hexdigest(),
    }


def same_weights(a: dict, b: dict) -> bool:
    """Whether two ``model_fingerprint``s (or manifests' ``base_model``) hash the same weights:
    equal bfloat16-rounded samples, or equal float16-then-bfloat16 ones (a float16 load against
    a float32 or float16 one). A float16 load against a bfloat16 one differs: each is its own
    rounding of the checkpoint, and neither determines the other."""
    if a.get("weights_sha256") == b.get("weights_sha256"):
        return True
    return a.get("weights_sha256_via_float16") is not None and a.get("weights_sha256_via_float16") == b.get("weights_sha256_via_float16")


def moe_layout(model) -> Optional[dict]:
    """MoE layers (indices into the decoder stack), experts, top-k and scoring; None for dense."""
    config = model.config
    n_experts = next((getattr(config, k) for k in _EXPERT_COUNT_KEYS if getattr(config, k, None)), None)
    if not n_experts:
        return None
    layers = sorted(
        {
            int(m.group(1))
            for name, module in model.named_modules()
            if (m := re.search(r"layers\.(\d+)\.mlp\.(gate|router)$", name)) and not isinstance(module, torch.nn.Linear)
        }
    )
    scoring = getattr(config, "scoring_func", None) or ("sigmoid" if config.model_type in _SIGMOID_SCORING else "softmax")
    return {
        "layers": layers,
        "num_experts": int(n_experts),
        "top_k": int(config.num_experts_per_tok),
        "scoring": scoring,
    }


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' (and the hub's) progress bars on or off for the duration; as they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_peft_wrap():
    """Around wrapping a model with peft: peft 0.21 reads ``model.is_gradient_checkpointing``,
    which transformers 5 deprecated, so every wrap printed a FutureWarning about a name the user
    never wrote (whether or not checkpointing is on). Only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
