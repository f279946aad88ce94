"""``geocache bench calibration``: does the geometry-aware loss keep a tuned model calibrated?

The reference MoE model is fine-tuned (DoRA, from the cache) on two datasets: its ``code`` tune
split (standard-library files held out from pretraining), and an instruction-style set built from
the same files (prompt: a function's ``def`` line, completion: its docstring; loss on the
completion only). Each dataset with:

- ``plain``: task loss only;
- ``kl-β``: a constant forward KL-to-base penalty β·KL(base‖tuned) on every position (the
  TRL-style baseline; here the geometry loss with only λ_KL = β and the KL threshold at 0, so the
  hinge is the KL itself);
- ``geometry-well`` / ``geometry-poor``: the geometry-aware loss at the design note's settings for
  well-calibrated (KL threshold 0.15, λ's 0.15) and poorly-calibrated bases (KL threshold 0.08,
  λ's 0.4).

Every adapter is evaluated exactly against the live base on the held-out text of both domains and
on instructions built from the held-out code files: task loss, KL(base‖tuned), dH, calibration gap, top-1 ECE (torchmetrics,
15 equal-width bins), Brier score, router Jaccard vs the base, and the out-of-domain loss increase
beside the in-domain forward KL (Shenfeld et al. 2025 report that the latter predicts forgetting).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from geocache.config import check_option_types
from geocache.models import check_device

# name → GeometryConfig overrides (the schedule: KL threshold fixed unless a method sets both)
METHODS = {
    "plain": dict(lambda_kl=0.0, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0),
    "kl-0.05": dict(lambda_kl=0.05, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0, kl_threshold=0.0, final_kl_threshold=0.0),
    "kl-0.2": dict(lambda_kl=0.2, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0, kl_threshold=0.0, final_kl_threshold=0.0),
    "kl-1.0": dict(lambda_kl=1.0, lambda_cal=0.0, lambda_entropy=0.0, lambda_router=0.0, kl_threshold=0.0, final_kl_threshold=0.0),
    "geometry-well": dict(lambda_kl=0.15, lambda_cal=0.15, lambda_entropy=0.15, lambda_router=0.15, kl_threshold=0.15, final_kl_threshold=0.15),
    "geometry-poor": dict(lambda_kl=0.4, lambda_cal=0.4, lambda_entropy=0.4, lambda_router=0.4, kl_threshold=0.08, final_kl_threshold=0.08),
}
DATASETS = ("code", "instruct")
EVALS = ("code", "prose", "instruct")
IN_DOMAIN = {"code": "code", "instruct": "instruct"}
OUT_OF_DOMAIN = "prose"


@dataclass
class CalibrationConfig:
    out: str = field(default="benchmarks/results", metadata={"help": "Where calibration.json/.md/.png go."})
    work_dir: Optional[str] = field(default=None, metadata={"help": "Caches and runs (default: a temporary directory)."})
    arch: str = field(default="moe", metadata={"help": "Reference model: moe | dense."})
    methods: tuple = field(default=tuple(METHODS), metadata={"help": "Which methods to run."})
    datasets: tuple = field(default=DATASETS, metadata={"help": "Which SFT datasets."})
    steps: int = field(default=200, metadata={"help": "Training steps per run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate (constant after warmup)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    max_length: int = field(default=256, metadata={"help": "Tokens per sequence."})
    tune_sequences: int = field(default=1024, metadata={"help": "Sequences of each training cache."})
    eval_sequences: int = field(default=48, metadata={"help": "Held-out sequences per evaluation set."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda when available)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Reference models' cache directory."})
    recipe: Optional[object] = field(default=None, metadata={"help": "A ReferenceRecipe (overrides arch; for tests)."})

    def __post_init__(self) -> None:
        check_option_types(self)
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be a finite number > 0")
        if self.device is not None:
            check_device(self.device)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
        if [d for d in self.datasets if d not in DATASETS]:
            raise ValueError(f"datasets={list(self.datasets)} must be among {', '.join(DATASETS)}")
        for name in ("steps", "batch_size", "max_length", "tune_sequences", "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def docstring_tasks(documents: list[str], max_chars: int = 800) -> list[dict]:
    """Prompt/completion rows from Python sources: a function's ``def`` line → its docstring."""
    import ast

    rows = []
    for doc in documents:
        try:
            tree = ast.parse(doc)
        except SyntaxError:
            continue
        lines = doc.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (text := ast.get_docstring(node)):
                rows.append({"prompt": f"Write the docstring of this Python function:\n{lines[node.lineno - 1].strip()}\n", "completion": text[:max_chars]})
    return rows


def run_calibration(cfg: CalibrationConfig, log=print) -> dict:
    from geocache.bench import cache_of, provenance, sft, workspace, writable_dir, write_reports
    from geocache.bench.evaluate import exact_heldout, load_tuned
    from geocache.config import GeometryConfig
    from geocache.reference import _split_documents

    out = writable_dir(cfg.out)
    started = time.perf_counter()
    prov = provenance()
    with workspace(cfg, "calibration", log) as (recipe, model_dir, work):
        # Instructions from the reference's own splits: tune files for training, held-out files for eval.
        code = _split_documents(recipe)["code"]
        for name, split in (("instruct-train", "tune"), ("instruct-eval", "heldout")):
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docstring_tasks(code[split])))
        sources = {
            "train-code": (model_dir / "tune-code.jsonl", cfg.tune_sequences),
            "train-instruct": (work / "instruct-train.jsonl", cfg.tune_sequences),
            "eval-code": (model_dir / "heldout-code.jsonl", cfg.eval_sequences),
            "eval-prose": (model_dir / "heldout-prose.jsonl", cfg.eval_sequences),
            "eval-instruct": (work / "instruct-eval.jsonl", cfg.eval_sequences),
        }
        caches = {name: cache_of(model_dir, data, work / f"cache-{name}", max_length=cfg.max_length, max_sequences=n, device=cfg.device, seed=cfg.seed)
                  for name, (data, n) in sources.items()}
        runs = []
        for dataset in cfg.datasets:
            for method in cfg.methods:
                run_dir = work / f"run-{dataset}-{method}"
                t0 = time.perf_counter()
                trainer = sft(model_dir, caches[f"train-{dataset}"], run_dir, steps=cfg.steps, learning_rate=cfg.learning_rate,
                              batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                              # a dense reference has no router: geocache.train refuses a λ_router asked of it
                              geometry=GeometryConfig(**{**METHODS[method], **({} if recipe.is_moe else {"lambda_router": 0.0})}))
                train_s = time.perf_counter() - t0
                model, _ = load_tuned(model_dir, run_dir / "adapter", device=cfg.device)
                evals = {e: exact_heldout(model, caches[f"eval-{e}"], calibration=True) for e in EVALS}
                del model
                logs = [r for r in trainer.state.log_history if "task_loss" in r]
                runs.append({"dataset": dataset, "method": method, "train_seconds": train_s, "eval": evals, "log": logs})
                ind, ood = evals[IN_DOMAIN[dataset]], evals[OUT_OF_DOMAIN]
                log(f"{dataset}/{method}: {train_s:.0f}s; in-domain loss {ind['task_loss']:.4f} KL {ind['kl_forward']:.4f} ECE {ind['ece']:.4f}; "
                    f"{OUT_OF_DOMAIN} loss +{ood['task_loss'] - ood['base_task_loss']:.4f} KL {ood['kl_forward']:.4f} ECE {ood['ece']:.4f}")
        result = {
            "provenance": prov,
            "config": {k: v for k, v in asdict(cfg).items() if k != "recipe"},
            "methods": {m: METHODS[m] for m in cfg.methods},
            "reference": str(model_dir),
            "runs": runs,
            "razor": razor(runs),
            "elapsed_s": time.perf_counter() - started,
        }
    write_reports(out, "calibration", result, markdown, plot)
    log(f"wrote {out}/calibration.{{json,md,png}}")
    return result


def razor(runs: list[dict]) -> dict:
    """Across runs: Spearman and Pearson correlation of the in-domain forward KL with the
    out-of-domain loss increase (RL's Razor: the former predicts forgetting)."""
    from scipy.stats import pearsonr, spearmanr

    kl = [r["eval"][IN_DOMAIN[r["dataset"]]]["kl_forward"] for r in runs]
    forget = [r["eval"][OUT_OF_DOMAIN]["task_loss"] - r["eval"][OUT_OF_DOMAIN]["base_task_loss"] for r in runs]
    if len(runs) < 3:
        return {"runs": len(runs), "spearman": float("nan"), "pearson": float("nan")}
    return {"runs": len(runs), "spearman": float(spearmanr(kl, forget).statistic), "pearson": float(pearsonr(kl, forget).statistic)}


def replot(out: str | Path) -> None:
    """Rewrite calibration.md and calibration.png from calibration.json in ``out``."""
    from geocache.bench import rewrite_reports

    rewrite_reports(out, "calibration", markdown, plot)


def markdown(result: dict) -> str:
    from geocache.bench import provenance_markdown

    cfg = result["config"]
    lines = [
        "# Calibration: plain DoRA vs a constant KL penalty vs the geometry-aware loss",
        "",
        f"Generated by `geocache bench calibration` in {result['elapsed_s']:.0f} s.",
        "",
        provenance_markdown(result["provenance"]),
        "",
        f"**Setup:** reference model `{result['reference']}`; {cfg['steps']} DoRA steps per run from the cache (batch {cfg['batch_size']}, "
        f"≤ {cfg['max_length']} tokens, lr {cfg['learning_rate']} constant after warmup, seed {cfg['seed']}). Datasets: `code` (the "
        "reference's code tune split, held out from pretraining) and `instruct` (a function's `def` line → its docstring, from the same "
        "files; evaluated on the held-out files). "
        "Methods (GeometryConfig overrides): " + "; ".join(f"`{m}` {o}" for m, o in result["methods"].items()) + ". "
        "Evaluation: exact signals against the live base on held-out code, prose and instructions; ECE top-1 with 15 equal-width "
        "bins (torchmetrics `MulticlassCalibrationError`, L1); Brier = Σ_v (q_v − 1[v=y])².",
        "",
    ]
    for dataset in cfg["datasets"]:
        ind = IN_DOMAIN[dataset]
        lines += [
            f"## SFT on `{dataset}`",
            "",
            "| method | eval set | task loss (base) | KL(base‖tuned) | dH | cal gap | ECE (base) | Brier (base) | router Jaccard |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in result["runs"] if r["dataset"] == dataset):
            for e, v in r["eval"].items():
                tag = " (in-domain)" if e == ind else ""
                lines.append(
                    f"| {r['method']} | {e}{tag} | {v['task_loss']:.4f} ({v['base_task_loss']:.4f}) | {v['kl_forward']:.4f} | {v['dH']:+.4f} | "
                    f"{v['cal_gap']:+.4f} | {v['ece']:.4f} ({v['base_ece']:.4f}) | {v['brier']:.4f} ({v['base_brier']:.4f}) | "
                    f"{v.get('router_jaccard', float('nan')):.4f} |"
                )
        lines.append("")
    rz = result["razor"]
    lines += [
        "## Forward KL on the new domain vs forgetting",
        "",
        f"In-domain KL(base‖tuned) against the `{OUT_OF_DOMAIN}` loss increase over {rz['runs']} runs: Spearman {rz['spearman']:.3f}, "
        f"Pearson {rz['pearson']:.3f}.",
        "",
        "| dataset | method | in-domain KL | out-of-domain loss increase |",
        "|---|---|---:|---:|",
    ]
    for r in result["runs"]:
        ood = r["eval"][OUT_OF_DOMAIN]
        lines.append(f"| {r['dataset']} | {r['method']} | {r['eval'][IN_DOMAIN[r['dataset']]]['kl_forward']:.4f} | {ood['task_loss'] - ood['base_task_loss']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = result["config"]["datasets"]
    fig, axes = plt.subplots(len(datasets), 3, figsize=(17, 4.8 * len(datasets)), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for row, dataset in zip(axes, datasets):
        runs = [r for r in result["runs"] if r["dataset"] == dataset]
        ind = IN_DOMAIN[dataset]
        panels = [
            (lambda r: r["eval"][OUT_OF_DOMAIN]["kl_forward"], f"{OUT_OF_DOMAIN} KL(base‖tuned)"),
            (lambda r: r["eval"][OUT_OF_DOMAIN]["ece"], f"{OUT_OF_DOMAIN} ECE"),
            (lambda r: r["eval"][ind]["ece"], f"{ind} ECE"),
        ]
        for ax, (fy, ylabel) in zip(row, panels):
            for r in runs:
                ax.scatter(r["eval"][ind]["task_loss"], fy(r), color=colors[r["method"]], label=r["method"], s=40)
            base = runs[0]["eval"]
            if "ECE" in ylabel:
                ax.axhline(base[OUT_OF_DOMAIN if OUT_OF_DOMAIN in ylabel else ind]["base_ece"], color="gray", ls=":", label="base")
            ax.set_xlabel(f"in-domain ({ind}) task loss")
            ax.set_ylabel(ylabel)
            ax.set_title(f"SFT on {dataset}: {ylabel} vs in-domain loss")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
