"""Small reference models pretrained locally on an offline corpus, for the demo and benchmarks.

Random-weight models have flat next-token distributions, so KL, entropy and calibration numbers on
them mean nothing. A reference model here is a small transformers model (Qwen3-MoE-style by
default) trained from scratch, with its own byte-level BPE tokenizer, on two domains that ship
with Python itself: ``code`` (the standard library's source) and ``prose`` (``pydoc_data``'s help
topics). The recipe is a dataclass; the built model is cached under the user's cache directory,
keyed by a hash of the recipe, so a second call reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch


def default_cache_dir() -> Path:
    root = os.environ.get("GEOCACHE_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "geocache")
    return Path(root)


def corpus(domain: str) -> list[str]:
    """Documents of one domain, in a fixed order: ``code`` (stdlib ``*.py`` files) or ``prose``."""
    if domain == "code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    if domain == "prose":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise ValueError(f"domain {domain!r} must be 'code' or 'prose'")


@dataclass
class ReferenceRecipe:
    """How a reference model is built; every field goes into the cache key."""

    model_type: str = field(default="qwen3_moe", metadata={"help": "transformers model type."})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary of the trained tokenizer."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer (MoE types only)."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Top-k routing."})
    moe_intermediate_size: int = field(default=128, metadata={"help": "Expert MLP width."})
    intermediate_size: int = field(default=256, metadata={"help": "Dense MLP width."})
    domains: tuple = field(default=("code", "prose"), metadata={"help": "Training domains."})
    seq_len: int = field(default=128, metadata={"help": "Training sequence length."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    steps: int = field(default=400, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    max_chars_per_domain: int = field(default=1_500_000, metadata={"help": "Corpus cap per domain."})
    seed: int = field(default=0, metadata={"help": "Seed of everything."})

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _texts(recipe: ReferenceRecipe) -> dict[str, list[str]]:
    out = {}
    for domain in recipe.domains:
        docs, total = [], 0
        for d in corpus(domain):
            if total >= recipe.max_chars_per_domain:
                break
            docs.append(d)
            total += len(d)
        out[domain] = docs
    return out


def build_reference_model(recipe: Optional[ReferenceRecipe] = None, cache_dir: Optional[Path] = None, log=print) -> Path:
    """Pretrain (or reuse) the reference model of ``recipe``; returns its directory, loadable with
    ``AutoModelForCausalLM.from_pretrained``. Writes ``reference.json`` beside it with the recipe,
    the held-out loss and the base entropy per domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from geocache.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_config

    recipe = recipe or ReferenceRecipe()
    out = Path(cache_dir or default_cache_dir()) / "reference" / f"{recipe.model_type}-{recipe.key()}"
    if (out / "reference.json").exists():
        return out
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    texts = _texts(recipe)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([t for docs in texts.values() for t in docs], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    # Token streams per domain; the last 5% of each held out.
    train_ids, heldout = [], {}
    for domain, docs in texts.items():
        ids = [i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
        cut = int(len(ids) * 0.95)
        train_ids.append(torch.tensor(ids[:cut]))
        heldout[domain] = torch.tensor(ids[cut:])

    moe = {"num_experts": recipe.num_experts, "num_experts_per_tok": recipe.num_experts_per_tok, "moe_intermediate_size": recipe.moe_intermediate_size}
    config = tiny_config(
        recipe.model_type,
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads,
        head_dim=recipe.hidden_size // recipe.num_attention_heads,
        max_position_embeddings=max(256, recipe.seq_len),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **(moe if "moe" in recipe.model_type else {}),
    )
    model = AutoModelForCausalLM.from_config(config)
    optim = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))
    )
    started = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        batch = []
        for _ in range(recipe.batch_size):
            stream = train_ids[rng.randrange(len(train_ids))]
            start = rng.randrange(0, len(stream) - recipe.seq_len - 1)
            batch.append(stream[start : start + recipe.seq_len])
        x = torch.stack(batch)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"reference model: step {step + 1}/{recipe.steps}, loss {loss.item():.3f}, {time.perf_counter() - started:.0f}s")

    model.eval()
    report = {"recipe": asdict(recipe), "train_seconds": time.perf_counter() - started, "vocab_size": len(tokenizer), "domains": {}}
    with torch.no_grad():
        for domain, ids in heldout.items():
            n = (len(ids) - 1) // recipe.seq_len
            x = ids[: n * recipe.seq_len].view(n, recipe.seq_len)[:32]
            logits = model(input_ids=x).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1)
            ent = -(lp.exp() * lp).sum(-1).flatten()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            q = torch.quantile(ent, torch.tensor([0.1, 0.5, 0.9]))
            report["domains"][domain] = {
                "heldout_loss": nll.item(),
                "entropy_mean": ent.mean().item(),
                "entropy_p10_p50_p90": q.tolist(),
                "log_vocab": math.log(len(tokenizer)),
            }
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "reference.json").write_text(json.dumps(report, indent=2))
    tmp.rename(out) if not out.exists() else None
    return out
