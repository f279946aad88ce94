"""``geocache bench parity``: training from the cache vs training against the live base.

Same reference model, data, seed and geometry-aware loss (its defaults), ``--base cache`` (the
cache's default k, m and estimator) and ``--base live`` (exact base logits, one no-grad forward per
step with the adapter disabled). Both adapters are then evaluated exactly against the live base on
held-out text of every domain: task loss, KL(base‖tuned), dH and calibration gap. Target: cached
and live agree within 2% on each.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from geocache.config import check_option_types
from geocache.models import check_device

MODES = ("cache", "live")
METRICS = ("task_loss", "kl_forward", "dH", "cal_gap")
TARGET_REL = 0.02


@dataclass
class ParityConfig:
    out: str = field(default="benchmarks/results", metadata={"help": "Where parity.json/.md/.png go."})
    work_dir: Optional[str] = field(default=None, metadata={"help": "Caches and runs (default: a temporary directory)."})
    arch: str = field(default="moe", metadata={"help": "Reference model: moe | dense."})
    tune_domain: str = field(default="prose", metadata={"help": "Domain of the SFT."})
    steps: int = field(default=200, metadata={"help": "Training steps per run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate (constant after warmup)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    max_length: int = field(default=256, metadata={"help": "Tokens per sequence."})
    tune_sequences: int = field(default=1024, metadata={"help": "Sequences of the training cache."})
    eval_sequences: int = field(default=48, metadata={"help": "Held-out sequences per domain."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    kl_estimator: Optional[str] = field(default=None, metadata={"help": "Cached KL estimator of the cache run (default: GeometryConfig's)."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda when available)."})
    seed: int = field(default=0, metadata={"help": "Seed of both runs."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Reference models' cache directory."})
    recipe: Optional[object] = field(default=None, metadata={"help": "A ReferenceRecipe (overrides arch; for tests)."})

    def __post_init__(self) -> None:
        check_option_types(self)
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be a finite number > 0")
        if self.device is not None:
            check_device(self.device)
        for name in ("steps", "batch_size", "max_length", "tune_sequences", "eval_sequences", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        self.logging_steps = min(self.logging_steps, self.steps)  # at least one logged step to compare


def rel_diff(a: float, b: float) -> float:
    """|a − b| relative to the larger magnitude (symmetric in the two runs)."""
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def run_parity(cfg: ParityConfig, log=print) -> dict:
    from geocache.bench import cache_of, provenance, sft, workspace, writable_dir, write_reports
    from geocache.bench.evaluate import exact_heldout, load_tuned
    from geocache.config import GeometryConfig
    from geocache.precompute import PrecomputeConfig

    out = writable_dir(cfg.out)
    started = time.perf_counter()
    prov = provenance()
    with workspace(cfg, "parity", log) as (recipe, model_dir, work):
        defaults = PrecomputeConfig(model="", data=[], out="")
        sources = [("train", f"tune-{cfg.tune_domain}", cfg.tune_sequences)] + [(f"heldout-{d}", f"heldout-{d}", cfg.eval_sequences) for d in recipe.domains]
        caches = {name: cache_of(model_dir, model_dir / f"{data}.jsonl", work / f"cache-{name}", max_length=cfg.max_length, max_sequences=n,
                                 device=cfg.device, seed=cfg.seed) for name, data, n in sources}
        geometry = GeometryConfig(**({"kl_estimator": cfg.kl_estimator} if cfg.kl_estimator else {}))
        runs = {}
        for mode in MODES:
            t0 = time.perf_counter()
            trainer = sft(model_dir, caches["train"], work / f"run-{mode}", base=mode, steps=cfg.steps, learning_rate=cfg.learning_rate,
                          batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, logging_steps=cfg.logging_steps, geometry=geometry)
            train_s = time.perf_counter() - t0
            model, _ = load_tuned(model_dir, work / f"run-{mode}" / "adapter", device=cfg.device)
            heldout = {d: exact_heldout(model, caches[f"heldout-{d}"]) for d in recipe.domains}
            del model
            logs = [r for r in trainer.state.log_history if "task_loss" in r]
            runs[mode] = {"train_seconds": train_s, "heldout": heldout, "log": logs}
            log(f"{mode}: {cfg.steps} steps in {train_s:.0f}s; held-out " + ", ".join(
                f"{d}: loss {h['task_loss']:.4f} KL {h['kl_forward']:.4f}" for d, h in heldout.items()))
        comparison = {
            d: {m: {"cache": runs["cache"]["heldout"][d][m], "live": runs["live"]["heldout"][d][m],
                    "rel_diff": rel_diff(runs["cache"]["heldout"][d][m], runs["live"]["heldout"][d][m])} for m in METRICS}
            for d in recipe.domains
        }
        last = {mode: runs[mode]["log"][-1]["task_loss"] for mode in MODES}
        comparison["final_train_task_loss"] = {"cache": last["cache"], "live": last["live"], "rel_diff": rel_diff(last["cache"], last["live"])}
        result = {
            "provenance": prov,
            "config": {k: v for k, v in asdict(cfg).items() if k != "recipe"},
            "cache_defaults": {"k": defaults.k, "m": defaults.m, "kl_estimator": geometry.kl_estimator},
            "reference": str(model_dir),
            "runs": runs,
            "comparison": comparison,
            "all_within_target": all(v["rel_diff"] <= TARGET_REL for d, ms in comparison.items() if d != "final_train_task_loss" for v in ms.values())
            and comparison["final_train_task_loss"]["rel_diff"] <= TARGET_REL,
            "elapsed_s": time.perf_counter() - started,
        }
    write_reports(out, "parity", result, markdown, plot)
    log(f"cached vs live within {TARGET_REL:.0%} everywhere: {result['all_within_target']}; wrote {out}/parity.{{json,md,png}}")
    return result


def replot(out: str | Path) -> None:
    """Rewrite parity.md and parity.png from parity.json in ``out``."""
    from geocache.bench import rewrite_reports

    rewrite_reports(out, "parity", markdown, plot)


def markdown(result: dict) -> str:
    from geocache.bench import provenance_markdown

    cfg, comp = result["config"], result["comparison"]
    d = result["cache_defaults"]
    lines = [
        "# Training from the cache vs against the live base",
        "",
        f"Generated by `geocache bench parity` in {result['elapsed_s']:.0f} s.",
        "",
        provenance_markdown(result["provenance"]),
        "",
        f"**Setup:** reference model `{result['reference']}`; {cfg['steps']} DoRA steps on its `{cfg['tune_domain']}` tune split "
        f"(batch {cfg['batch_size']}, ≤ {cfg['max_length']} tokens, lr {cfg['learning_rate']} constant after warmup, seed {cfg['seed']}), "
        f"geometry-aware loss at its defaults; `--base cache` with the cache defaults (k = {d['k']}, m = {d['m']}, `{d['kl_estimator']}`) "
        "and `--base live`. Held-out: exact signals against the live base (adapter disabled) on every domain's held-out split. "
        f"Target: agreement within {TARGET_REL:.0%} (|cache − live| / max(|cache|, |live|)).",
        "",
        "| domain | metric | cache | live | relative difference | within 2% |",
        "|---|---|---:|---:|---:|---|",
    ]
    for dom, ms in comp.items():
        items = [("task loss (last logged train step)", ms)] if dom == "final_train_task_loss" else list(ms.items())
        for metric, v in items:
            lines.append(f"| {'train' if dom == 'final_train_task_loss' else dom} | {metric} | {v['cache']:.5f} | {v['live']:.5f} | {v['rel_diff']:.4f} | "
                         f"{'yes' if v['rel_diff'] <= TARGET_REL else '**no**'} |")
    lines += ["", "Training time: " + ", ".join(f"{m} {r['train_seconds']:.0f} s" for m, r in result["runs"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("task_loss", "task loss"), ("KL_mean", "KL(base‖tuned), as trained on"), ("dH_mean", "dH"), ("cal_gap_mean", "calibration gap")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (key, title) in zip(axes, keys):
        for mode, style in zip(MODES, ("-", "--")):
            logs = [r for r in result["runs"][mode]["log"] if key in r and not math.isnan(r[key])]
            ax.plot([r["step"] for r in logs], [r[key] for r in logs], style, label=f"--base {mode}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
