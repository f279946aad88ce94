"""Tiny models and a tokenizer for tests, built offline.

Everything here is saved with ``save_pretrained`` into a directory laid out like a hub repo, so
tests load it back through ``AutoModelForCausalLM.from_pretrained(path)`` — the same path a
user's ``--model org/name`` takes. Random weights: fine for plumbing and math, meaningless for
fidelity numbers (benchmarks use locally pretrained reference models instead).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import torch

DENSE_MODEL_TYPES = ("llama", "qwen3")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")
MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

# ChatML, as Qwen models ship it; the assistant turns are what label masking keeps.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shared by every tiny config: small enough for a CPU test, big enough to have structure.
_COMMON: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# Per architecture: 8 experts, top-2 routing, and what makes the architecture itself.
_ARCH: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen3": dict(head_dim=8),
    "qwen3_moe": dict(head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    # Qwen2-MoE: a shared expert beside the routed ones.
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32, decoder_sparse_step=1
    ),
    # DeepSeek-V3: sigmoid scoring with grouped routing, a shared expert, MLA attention; the first
    # layer dense, as in the real model.
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def tokenizer_corpus() -> list[str]:
    """A deterministic offline corpus: the source of a few standard-library modules."""
    return [inspect.getsource(m) for m in (textwrap, json.decoder, json.encoder, inspect)]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer offline and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A transformers config for a tiny model of ``model_type`` (see ``MODEL_TYPES``)."""
    from transformers import AutoConfig

    if model_type not in _ARCH:
        raise ValueError(f"no tiny config for model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    kwargs = {**_COMMON, **_ARCH[model_type], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(out_dir: str | Path, model_type: str, tokenizer_dir: str | Path | None = None, seed: int = 0, **overrides) -> Path:
    """Save a random tiny ``model_type`` model and its tokenizer into ``out_dir``; return the path.

    The tokenizer is trained (or copied from ``tokenizer_dir``), the config's vocabulary and
    special-token ids are set from it, and the weights are seeded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else build_tokenizer(out_dir)
    if tokenizer_dir:
        tok.save_pretrained(str(out_dir))
    config = tiny_config(
        model_type,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    return out_dir


def tiny_reference_recipe():
    """A reference-model recipe small enough for tests (seconds to pretrain on one core)."""
    from geocache.reference import ReferenceRecipe

    return ReferenceRecipe(vocab_size=768, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, moe_intermediate_size=32,
                           intermediate_size=64, steps=30, batch_size=8, seq_len=64, max_chars_per_domain=200_000, eval_sequences=8,
                           split_fractions=(0.6, 0.2, 0.2))
