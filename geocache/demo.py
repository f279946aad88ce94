"""``geocache demo``: the whole pipeline on an embedded default, offline, in minutes on a laptop CPU.

Builds (or reuses) a small MoE reference model pretrained on the Python standard library (code and
prose), writes a small instruction-style SFT set from ``pydoc_data``'s help topics, precomputes a
training and a held-out cache, then fine-tunes two DoRA adapters from the cache: plain SFT (task
loss only) and the geometry-aware loss. It prints the held-out geometry before and after each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from geocache.config import GeometryConfig
from geocache.data import DataConfig
from geocache.precompute import PrecomputeConfig, precompute
from geocache.reference import ReferenceRecipe, build_reference_model, recipe_for
from geocache.train import TrainConfig, train

ROWS = [
    ("task loss", "eval_task_loss"),
    ("KL(base‖tuned)", "eval_KL_mean"),
    ("dH = H(tuned) − H(base)", "eval_dH_mean"),
    ("calibration gap", "eval_cal_gap_mean"),
    ("positions penalised: KL", "eval_positions_penalized_KL"),
    ("positions penalised: cal", "eval_positions_penalized_cal"),
    ("positions penalised: H", "eval_positions_penalized_H"),
    ("router Jaccard vs base", "eval_router_jaccard"),
]


def sft_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Prompt/completion pairs from the help topics: 'Explain <topic>' → its first paragraphs."""
    from pydoc_data.topics import topics

    rows = []
    for name in sorted(topics):
        text = " ".join(topics[name].split())[:600]
        rows.append({"prompt": f"Explain the Python topic '{name}'.\n", "completion": text})
    random.Random(seed).shuffle(rows)
    return rows[16:], rows[:16]


# The demo's reference model: the benchmarks' MoE recipe pretrained for a fifth of its steps, so
# that a first run on a 2-core CPU takes minutes (about 3 of pretraining), not a quarter of an
# hour. Its distributions are broader than the full model's but far from flat (README, "Run it").
DEMO_PRETRAIN_STEPS = 500
DEMO_MARKER = ".geocache-demo"


def _earlier_demo(out: Path) -> bool:
    """A demo's directory from before the marker existed: its results table (``demo.json``: each
    run's metrics before and after) beside the caches it built. A ``demo.json`` alone is anyone's."""
    try:
        results = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(results, dict) and bool(results) and (out / "cache-train" / "manifest.json").exists()
            and all(isinstance(r, dict) and {"before", "after"} <= set(r) for r in results.values()))


def run_demo(out: str | Path, steps: int = 40, recipe: ReferenceRecipe | None = None, log=print,
             pretrain_steps: int = DEMO_PRETRAIN_STEPS) -> dict:
    """The pipeline on ``recipe`` (default: the MoE reference recipe with ``pretrain_steps``; the
    benchmarks' own model is ``pretrain_steps=2500``, reused when it is already built)."""
    out = Path(out)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    # The demo writes data, caches and runs into ``out``, replacing its own earlier ones: any other
    # non-empty directory is refused (a user's own train.jsonl there was overwritten).
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not ((out / DEMO_MARKER).exists() or _earlier_demo(out)))):
        raise ValueError(f"--out {str(out)!r} is {'a file' if not out.is_dir() else 'a non-empty directory the demo did not write'}: "
                         "choose a new directory (or an earlier demo's)")
    recipe = recipe or recipe_for("moe", steps=pretrain_steps)  # (its options checked before anything is written)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by geocache demo; the demo replaces what it wrote here\n")
    model_dir = build_reference_model(recipe, log=log)
    log(f"reference model: {model_dir}")
    train_rows, eval_rows = sft_rows()
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (out / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        precompute(
            PrecomputeConfig(
                model=str(model_dir),
                data=[str(out / f"{name}.jsonl")],
                out=str(out / f"cache-{name}"),
                k=64,
                m=8,
                overwrite=True,
                progress=False,
                data_config=DataConfig(max_length=160),
            )
        )
    log(f"caches: {out / 'cache-train'}, {out / 'cache-eval'}")
    runs = {
        # Same threshold schedule in both runs, so that the penalised fractions compare.
        "plain DoRA SFT": GeometryConfig(lambda_kl=0.0, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0, kl_warmup_steps=steps),
        # λ_router only where there is a router (a dense recipe refuses one).
        "geometry-aware": GeometryConfig(lambda_kl=0.5, lambda_cal=0.5, lambda_entropy=0.3, lambda_router=0.5 if recipe.is_moe else 0.0,
                                         kl_warmup_steps=steps),
    }
    results = {}
    for label, geometry in runs.items():
        run_dir = out / ("run-plain" if label.startswith("plain") else "run-geometry")
        trainer = train(
            TrainConfig(
                model=str(model_dir),
                cache=str(out / "cache-train"),
                eval_cache=str(out / "cache-eval"),
                out=str(run_dir),
                overwrite=True,
                max_steps=steps,
                eval_steps=steps,
                eval_on_start=True,
                logging_steps=max(1, steps // 4),
                save_steps=steps,
                per_device_train_batch_size=8,
                learning_rate=1e-2,
                lr_scheduler_type="constant",
                lora_r=8,
                lora_alpha=16,
                geometry=geometry,
                progress=False,
            )
        )
        evals = [r for r in trainer.state.log_history if "eval_loss" in r]
        results[label] = {"before": evals[0], "after": evals[-1]}
    table = format_table(results)
    log(table)
    (out / "demo.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "demo.md").write_text(table + "\n")
    return results


def format_table(results: dict) -> str:
    labels = list(results)
    header = "| held-out metric | base (before) | " + " | ".join(f"after: {label}" for label in labels) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(labels)]
    before = results[labels[0]]["before"]
    for title, key in ROWS:
        cells = [f"{before.get(key, float('nan')):.4f}"] + [f"{results[label]['after'].get(key, float('nan')):.4f}" for label in labels]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
