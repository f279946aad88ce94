"""Small reference models pretrained locally on an offline corpus, for the demo and benchmarks.

Random-weight models have flat next-token distributions, so KL, entropy and calibration numbers on
them mean nothing. A reference model here is a small transformers model (Qwen3-MoE-style or dense
Qwen3) trained from scratch, with its own byte-level BPE tokenizer, on two domains that ship with
Python itself: ``code`` (the standard library's source) and ``prose`` (``pydoc_data``'s help topics
and the standard library's docstrings).

Documents are split into ``pretrain`` (what the model is trained on), ``tune`` (held out from
pretraining, for fine-tuning experiments) and ``heldout`` (for evaluation) by *source*: a standard
library file's code and its docstrings always land in the same split, so neither domain's held-out
text has been seen, in the other domain's form, in pretraining. The ``tune`` and ``heldout``
documents are written beside the model as JSONL rows ``{"text": ...}`` of at most
``example_chars`` characters, ready for ``geocache precompute``.

The recipe is a dataclass; the built model is cached under the user's cache directory, keyed by a
hash of the recipe, so a second call reuses it. ``reference.json`` beside the weights holds the
recipe, the training time, and the held-out loss and base-entropy distribution per domain.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

SPLITS = ("pretrain", "tune", "heldout")


def default_cache_dir() -> Path:
    root = os.environ.get("GEOCACHE_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "geocache")
    return Path(root)


def _stdlib_sources() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _docstrings(source: str) -> str:
    """The module, class and function docstrings of one source file, blank-line separated."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)


def sources() -> dict[str, dict[str, str]]:
    """{source: {domain: document}} in a fixed order. A source is where documents come from: a
    standard-library file gives a ``code`` document (its text) and a ``prose`` one (its docstrings,
    when it has any); a ``pydoc_data`` help topic gives a ``prose`` document only. Splits are drawn
    per source, so a file's docstrings are never pretrained on while its code is held out."""
    from pydoc_data.topics import topics

    out = {f"topic:{k}": {"prose": topics[k]} for k in sorted(topics)}
    for p in _stdlib_sources():
        text = p.read_text(encoding="utf-8", errors="replace")
        out[f"file:{p.name}"] = {"code": text, **({"prose": d} if (d := _docstrings(text)) else {})}
    return out


def corpus(domain: str) -> list[str]:
    """Documents of one domain, in a fixed order: ``code`` (the standard library's top-level ``*.py``
    files) or ``prose`` (``pydoc_data`` help topics, then each of those files' docstrings)."""
    if domain not in ("code", "prose"):
        raise ValueError(f"domain {domain!r} must be 'code' or 'prose'")
    return [docs[domain] for docs in sources().values() if domain in docs]


def examples(document: str, max_chars: int) -> list[str]:
    """Cut a document at line boundaries into pieces of at most ``max_chars`` characters (a longer
    line is cut inside itself); blank pieces are dropped. Concatenated, the pieces are the document."""
    out, cur = [], ""
    for line in document.splitlines(keepends=True):
        for i in range(0, len(line), max_chars):
            piece = line[i : i + max_chars]
            if cur and len(cur) + len(piece) > max_chars:
                out.append(cur)
                cur = ""
            cur += piece
    if cur:
        out.append(cur)
    return [e for e in out if e.strip()]


@dataclass
class ReferenceRecipe:
    """How a reference model is built; every field goes into the cache key."""

    model_type: str = field(default="qwen3_moe", metadata={"help": "transformers model type (qwen3_moe or qwen3)."})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary of the trained tokenizer."})
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
    steps: int = field(default=2500, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    max_chars_per_domain: int = field(default=3_000_000, metadata={"help": "Corpus cap per domain."})
    split_fractions: tuple = field(default=(0.84, 0.08, 0.08), metadata={"help": "pretrain / tune / heldout share of each domain's documents."})
    example_chars: int = field(default=1200, metadata={"help": "Longest tune/heldout JSONL example, in characters."})
    eval_sequences: int = field(default=64, metadata={"help": "Held-out windows of seq_len tokens evaluated per domain."})
    seed: int = field(default=0, metadata={"help": "Seed of everything."})
    corpus_version: int = field(default=2, metadata={"help": "Bumped when the corpus or its split changes, so a model built from another is not reused (2: splits drawn per source file)."})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "seq_len", "batch_size", "steps",
                     "max_chars_per_domain", "example_chars", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"reference recipe: {name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"reference recipe: hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"reference recipe: split_fractions={self.split_fractions} must be three positive shares summing to 1")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def is_moe(self) -> bool:
        return "moe" in self.model_type


# The two reference models of the benchmarks. Sized so each pretrains in ~15 minutes on 2 CPU cores
# (README "Reference models" has the measured times, losses and entropies; reference.json beside each model).
RECIPES = {
    "moe": ReferenceRecipe(),
    "dense": ReferenceRecipe(model_type="qwen3", intermediate_size=512),
}


def _split_of(recipe: ReferenceRecipe, source: str) -> str:
    """The split of one source: a seeded hash of its name against ``split_fractions`` (heldout, tune,
    then pretrain), the same in every domain."""
    u = int(hashlib.sha256(f"{recipe.seed}:{source}".encode()).hexdigest()[:15], 16) / 16**15
    _, tune, held = recipe.split_fractions
    return "heldout" if u < held else "tune" if u < held + tune else "pretrain"


def _split_documents(recipe: ReferenceRecipe) -> dict[str, dict[str, list[str]]]:
    """{domain: {split: documents}}. Each source (a standard-library file, a help topic) is given one
    split for all its documents (:func:`_split_of`); each domain then takes its documents in a seeded
    order up to ``max_chars_per_domain``. Every split of every domain must get at least one document."""
    every = sources()
    order = list(every)
    random.Random(f"{recipe.seed}-sources").shuffle(order)
    out = {}
    for domain in recipe.domains:
        split, total = {s: [] for s in ("heldout", "tune", "pretrain")}, 0
        for name in order:
            if domain not in every[name]:
                continue
            if total >= recipe.max_chars_per_domain:
                break
            split[_split_of(recipe, name)].append(every[name][domain])
            total += len(every[name][domain])
        if not all(split.values()):
            counts = ", ".join(f"{s} {len(d)}" for s, d in split.items())
            raise ValueError(f"domain {domain!r} splits into {counts} documents under the cap: every split needs at least one")
        out[domain] = split
    return out


def reference_dir(recipe: ReferenceRecipe, cache_dir: Optional[Path] = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "reference" / f"{recipe.model_type}-{recipe.key()}"


def build_reference_model(recipe: Optional[ReferenceRecipe] = None, cache_dir: Optional[Path] = None, log=print) -> Path:
    """Pretrain (or reuse) the reference model of ``recipe``; returns its directory, loadable with
    ``AutoModelForCausalLM.from_pretrained``, holding ``reference.json`` and the ``tune-<domain>.jsonl``
    / ``heldout-<domain>.jsonl`` example files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from geocache.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_config

    recipe = recipe or ReferenceRecipe()
    out = reference_dir(recipe, cache_dir)
    if (out / "reference.json").exists():
        return out
    # Where the model will go must take it before minutes of pretraining, not after.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"the reference models' cache directory {str(out.parent)!r} cannot be written "
                         f"({exc.strerror or exc}): choose another with --cache-dir or GEOCACHE_HOME") from None
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    splits = _split_documents(recipe)
    threads = torch.get_num_threads()

    # Tokenizer: BPE on the pretraining documents only.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([d for s in splits.values() for d in s["pretrain"]], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    def stream(docs: list[str]) -> torch.Tensor:
        return torch.tensor([i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])

    train_ids = [stream(s["pretrain"]) for s in splits.values()]
    heldout = {domain: stream(s["heldout"]) for domain, s in splits.items()}

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
        max_position_embeddings=max(1024, recipe.seq_len),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **(moe if recipe.is_moe else {}),
    )
    model = AutoModelForCausalLM.from_config(config)
    optim = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    warmup = max(1, min(100, recipe.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))
    )
    # Each domain sampled in proportion to its tokens; windows start anywhere in a domain's stream.
    weights = [len(t) for t in train_ids]
    started = time.perf_counter()
    records = []  # pretrain_log.jsonl: the loss curve, every 10 steps
    model.train()
    for step in range(recipe.steps):
        batch = []
        for _ in range(recipe.batch_size):
            ids = rng.choices(train_ids, weights)[0]
            start = rng.randrange(0, len(ids) - recipe.seq_len - 1)
            batch.append(ids[start : start + recipe.seq_len])
        x = torch.stack(batch)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = sched.get_last_lr()[0]
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step == 0 or (step + 1) % 10 == 0 or step == recipe.steps - 1:
            records.append({"step": step + 1, "loss": loss.item(), "learning_rate": lr, "elapsed_s": round(time.perf_counter() - started, 3)})
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"reference {recipe.model_type}: step {step + 1}/{recipe.steps}, loss {loss.item():.3f}, {time.perf_counter() - started:.0f}s")
    train_seconds = time.perf_counter() - started

    model.eval()
    report = {
        "recipe": asdict(recipe),
        "train_seconds": train_seconds,
        "torch_threads": threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "log_vocab": math.log(len(tokenizer)),
        "tokens": {domain: {"pretrain": len(t), "heldout": len(heldout[domain])} for domain, t in zip(splits, train_ids)},
        "documents": {domain: {k: len(v) for k, v in s.items()} for domain, s in splits.items()},
        "domains": {domain: heldout_report(model, ids, recipe.seq_len, recipe.eval_sequences) for domain, ids in heldout.items()},
    }
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for domain, s in splits.items():
        for split in ("tune", "heldout"):
            rows = [{"text": e} for d in s[split] for e in examples(d, recipe.example_chars)]
            (tmp / f"{split}-{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "reference.json").write_text(json.dumps(report, indent=2))
    (tmp / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if out.exists():  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


@torch.no_grad()
def heldout_report(model, ids: torch.Tensor, seq_len: int, max_windows: int) -> dict:
    """Held-out next-token loss and the distribution of the model's entropy over ``max_windows``
    non-overlapping windows of ``ids``."""
    n = min((len(ids) - 1) // seq_len, max_windows)
    if n < 1:
        raise ValueError(f"held-out stream of {len(ids)} tokens is shorter than one window of {seq_len}")
    x = ids[: n * seq_len].view(n, seq_len)
    ents, nlls = [], []
    for chunk in x.split(8):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1)
        ents.append(-(lp.exp() * lp).sum(-1).flatten())
        nlls.append(-lp.gather(-1, chunk[:, 1:, None]).flatten())
    ent, nll = torch.cat(ents), torch.cat(nlls)
    vocab = logits.shape[-1]
    edges = torch.linspace(0, math.log(vocab), 11)
    hist = torch.histogram(ent.clamp(max=math.log(vocab)), bins=edges).hist
    return {
        "positions": ent.numel(),
        "heldout_loss": nll.mean().item(),
        "entropy_mean": ent.mean().item(),
        "entropy_p10_p50_p90": torch.quantile(ent, torch.tensor([0.1, 0.5, 0.9])).tolist(),
        "entropy_histogram": {"edges": edges.tolist(), "counts": hist.long().tolist()},
        "log_vocab": math.log(vocab),
    }


def recipe_for(name: str, **overrides) -> ReferenceRecipe:
    """A named recipe (``moe`` or ``dense``) with field overrides."""
    if name not in RECIPES:
        raise ValueError(f"reference model {name!r} must be one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **overrides)
