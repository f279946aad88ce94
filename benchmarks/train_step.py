#!/usr/bin/env python
"""Training-step time and peak memory of each base mode against plain DoRA SFT, side by side.

Variants, each one optimizer step of a DoRA-adapted MoE model (``add_dora_adapter``, r=16) on the
same batches read from a geocache cache (k=64, m=8, router logits), through the real code:
``Trainer.training_step`` (backward included) then ``optimizer.step()``:

  plain     ``transformers.Trainer`` with the model's own cross-entropy (task loss only)
  cache     ``GeometryTrainer`` + ``CacheBase``: base statistics from the batch, no base forward
  live      ``GeometryTrainer`` + ``LiveBase``: the same PEFT model, adapter disabled, one no-grad forward
  copy      ``GeometryTrainer`` + ``CopyBase``: a second frozen model, one forward
  periodic  ``GeometryTrainer`` + ``PeriodicBase(LiveBase, every=4)``

Each (shape, variant) runs in a fresh subprocess (``--worker``): model, cache reader, optimizer and
``--warmup`` steps first; then VmRSS is read, the high-water mark reset (``/proc/self/clear_refs``),
``--steps`` steps timed; peak = VmHWM − that baseline (what the steps add on top of the weights,
optimizer state and data). Then one more subprocess per shape holds every variant and lets them
take turns, ``--rounds`` rounds of one untimed step (caches warm as in a real run) and ``--block``
timed consecutive steps each (whole periods of ``periodic``), the order rotated every round: the time ratios come from it, since this machine's speed drifts between processes run minutes apart by
more than the 10% being measured. Step time = the median of the timed steps, except
``periodic``, whose mean is reported (its 1-in-4 base forwards are the point). Shapes: ``tiny`` (the test fixture's Qwen3-MoE) and ``small`` (Qwen3-MoE,
hidden 256, 4 layers, 8 experts top-2, vocab 32,768), sequences of ``--seq`` tokens.

Results: ``benchmarks/results/train_step.{json,md,png}`` with command, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from _common import add_measurement_args, loadavg, proc_status_kib, provenance, provenance_markdown, reset_peak_rss, spawn_measured  # noqa: E402

VARIANTS = ("plain", "cache", "live", "copy", "periodic")
SHAPES = {
    "tiny": dict(),
    "small": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=64, vocab_size=32768),
}
TARGETS = {"time_cache_over_plain": 1.10, "mem_cache_over_plain": 1.05, "time_live_over_cache": 1.2}


def build(shape: str, root: Path, seq: int, n_seq: int) -> tuple[Path, Path]:
    """A seeded random Qwen3-MoE of the shape, and a cache of stdlib text for it."""
    import inspect
    import json as _json

    from transformers import AutoModelForCausalLM

    from geocache.data import DataConfig
    from geocache.precompute import PrecomputeConfig, precompute
    from geocache.testing import build_tokenizer, tiny_config

    model_dir, cache_dir = root / f"model-{shape}", root / f"cache-{shape}"
    tok = build_tokenizer(model_dir)
    kw = {"vocab_size": len(tok), **SHAPES[shape]}
    torch.manual_seed(0)
    config = tiny_config("qwen3_moe", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=max(256, seq), **kw)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    import email
    import json as js

    text = inspect.getsource(email) + inspect.getsource(js) + "".join(inspect.getsource(m) for m in (inspect, argparse))
    rows = [{"text": text[i : i + 6 * seq]} for i in range(0, len(text) - 6 * seq, 6 * seq)][:n_seq]
    (root / "data.jsonl").write_text("\n".join(_json.dumps(r) for r in rows))
    precompute(PrecomputeConfig(model=str(model_dir), data=[str(root / "data.jsonl")], out=str(cache_dir), k=64, m=8, overwrite=True,
                                progress=False, data_config=DataConfig(max_length=seq)))
    return model_dir, cache_dir


def setup(p: dict, variant: str):
    """(step(i), batches) for one variant: its own DoRA model, trainer and optimizer."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from geocache.base import CacheBase, CopyBase, LiveBase, PeriodicBase
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.config import GeometryConfig
    from geocache.trainer import GeometryTrainer, add_dora_adapter

    torch.manual_seed(0)
    cache = open_cache(p["cache"])
    model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(p["model"]), r=16, alpha=32)
    args = TrainingArguments(output_dir=p["tmp"], report_to=[], use_cpu=True, remove_unused_columns=False, per_device_train_batch_size=p["batch"])
    if variant == "plain":
        trainer = Trainer(model=model, args=args, train_dataset=cache, data_collator=collate_cache_rows)
    else:
        base = {
            "cache": lambda: CacheBase(),
            "live": lambda: LiveBase(want_router=True),
            "copy": lambda: CopyBase(AutoModelForCausalLM.from_pretrained(p["model"]), want_router=True),
            "periodic": lambda: PeriodicBase(LiveBase(want_router=True), every=4),
        }[variant]()
        # every penalty active, so that no branch is skipped
        geometry = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0)
        trainer = GeometryTrainer(model=model, args=args, train_dataset=cache, geometry_config=geometry, base=base)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
    batches = [collate_cache_rows([cache[(i * p["batch"] + j) % len(cache)] for j in range(p["batch"])]) for i in range(p["warmup"] + p["steps"])]

    def step(i: int) -> None:
        trainer.state.global_step = i
        batch = batches[i]
        inputs = {k: v for k, v in batch.items() if variant != "plain" or k in ("input_ids", "attention_mask", "labels")}
        trainer.training_step(model, inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return step, batches


def _step_time(variant: str, times: list[float]) -> float:
    # the median: a few-millisecond tiny step is easily doubled by one stall of the machine;
    # periodic: the mean, its 1-in-4 base forwards are the point
    return sum(times) / len(times) if variant == "periodic" else sorted(times)[len(times) // 2]


def run_worker(p: dict) -> dict:
    torch.set_num_threads(p["threads"])
    if p["variant"] == "interleaved":
        return run_interleaved(p)
    variant = p["variant"]
    step, batches = setup(p, variant)
    for i in range(p["warmup"]):
        step(i)
    import gc

    gc.collect()
    baseline = proc_status_kib("VmRSS")
    exact = reset_peak_rss()
    times = []
    for i in range(p["warmup"], p["warmup"] + p["steps"]):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    peak = proc_status_kib("VmHWM") - baseline
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[p["warmup"] :])
    return {"variant": variant, "shape": p["shape"], "step_s": _step_time(variant, times), "times_s": times, "peak_kib": peak,
            "peak_exact": exact, "baseline_kib": baseline, "tokens_per_s": tokens / sum(times)}


def run_interleaved(p: dict) -> dict:
    """Every variant in this one process, taking turns: each round, each variant runs one untimed
    step (so its caches are warm as in a real run) and then ``block`` timed consecutive steps,
    the order rotated every round. The time ratios then compare steps taken seconds apart, not minutes apart
    in separate processes, on a machine whose speed drifts by more than the 10% being measured."""
    steps = {v: setup(p, v)[0] for v in VARIANTS}
    for v in VARIANTS:
        for i in range(p["warmup"]):
            steps[v](i)
    times = {v: [] for v in VARIANTS}
    i = p["warmup"]
    for r in range(p["rounds"]):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            steps[v](i)  # untimed, to warm the caches; the timed steps repeat its index, so that
            for j in range(p["block"]):  # they cover whole periods of `periodic` (block % 4 == 0)
                t = time.perf_counter()
                steps[v](i + j)
                times[v].append(time.perf_counter() - t)
        i += p["block"]
    return {"variant": "interleaved", "shape": p["shape"], "times_s": times, "block": p["block"],
            "step_s": {v: _step_time(v, ts) for v, ts in times.items()}}


def paired_ratios(record: dict, variant: str, reference: str = "plain") -> list[float]:
    """Per round, the median step of ``variant`` over the median step of ``reference`` in the
    same round (seconds apart): a ratio that the machine's drift between rounds cannot move."""
    b, t = record["block"], record["times_s"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [med(t[variant][i : i + b]) / med(t[reference][i : i + b]) for i in range(0, len(t[reference]), b)]


def spawn(params: dict, a: argparse.Namespace) -> dict:
    """One (shape, variant) in a fresh interpreter, after waiting for an idle machine; rerun when
    other processes took more than ``--max-other-share`` of the CPU while it ran."""
    r, _ = spawn_measured(Path(__file__).resolve(), params, a.worker_timeout, max_busy=a.max_busy, idle_timeout=a.idle_timeout,
                          max_other_share=a.max_other_share, retries=a.retries, label=f"{params['shape']}/{params['variant']}")
    if "error" in r:
        raise RuntimeError(f"worker {params['shape']}/{params['variant']} failed: {r['error']}\n{r.get('stderr_tail', '')}")
    return r


def ratios(results: list[dict], interleaved: list[dict]) -> list[dict]:
    """Time ratios from the interleaved run (steps side by side), memory from the separate ones."""
    rows = []
    for shape in sorted({r["shape"] for r in results}):
        by = {r["variant"]: r for r in results if r["shape"] == shape}
        t = next(r["step_s"] for r in interleaved if r["shape"] == shape)
        checks = [
            ("cache / plain step time", t["cache"] / t["plain"], "<=", TARGETS["time_cache_over_plain"]),
            ("cache / plain peak memory", by["cache"]["peak_kib"] / max(by["plain"]["peak_kib"], 1), "<=", TARGETS["mem_cache_over_plain"]),
            ("live / cache step time", t["live"] / t["cache"], ">=", TARGETS["time_live_over_cache"]),
            ("copy / cache step time", t["copy"] / t["cache"], None, None),
            ("periodic / cache step time", t["periodic"] / t["cache"], None, None),
            ("live / plain peak memory", by["live"]["peak_kib"] / max(by["plain"]["peak_kib"], 1), None, None),
            ("copy / plain peak memory", by["copy"]["peak_kib"] / max(by["plain"]["peak_kib"], 1), None, None),
        ]
        record = next(r for r in interleaved if r["shape"] == shape)
        if "block" in record:  # a diagnostic beside the verdict: the same ratio paired round by round
            pr = sorted(paired_ratios(record, "cache"))
            q = lambda f: pr[min(len(pr) - 1, int(f * len(pr)))]  # noqa: E731
            checks.append((f"cache / plain step time, per round (median; quartiles {q(0.25):.3f}-{q(0.75):.3f})", q(0.5), None, None))
        for name, value, op, target in checks:
            ok = None if op is None else (value <= target if op == "<=" else value >= target)
            rows.append({"shape": shape, "ratio": name, "value": value, "target": None if op is None else f"{op} {target}", "pass": ok})
    return rows


def write_outputs(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prov = data["provenance"]
    lines = [
        "# Training step: plain DoRA SFT vs the geometry-aware loss with each base mode",
        "",
        __doc__.split("Results:")[0].strip().replace("\n\n", "\n\n"),
        "",
        f"Before every worker the script waits until other processes use at most {data['config']['max_busy']:.0%} of "
        f"the machine, and reruns a worker (up to {data['config']['retries']} times) when they took more than "
        f"{data['config']['max_other_share']:.0%} of its CPU while it ran; the cleanest attempt is kept.",
        "",
        *provenance_markdown(prov, data["load_after"]),
        "",
        "Step times: **interleaved** = all variants in one process taking turns, a block of steps each (order rotated every round), "
        "the ratios below come from these; *separate* = the variant alone in its own process (where its peak memory is "
        "measured), minutes apart from the others.",
        "",
        "| shape | variant | step time, interleaved (s) | step time, separate (s) | tokens/s (separate) | peak memory over baseline (MiB) | other CPU (s) | attempts |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        t = next(x for x in data["interleaved"] if x["shape"] == r["shape"])
        lines.append(f"| {r['shape']} | {r['variant']} | **{t['step_s'][r['variant']]:.4f}** | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_kib'] / 1024:.1f} | {r['other_cpu_s']:.1f} | {r['attempts']} |")
    lines += ["", "| shape | ratio | value | target | verdict |", "|---|---|---:|---|---|"]
    for r in data["ratios"]:
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['shape']} | {r['ratio']} | {r['value']:.3f} | {r['target'] or ''} | {verdict} |")
    (out / "train_step.md").write_text("\n".join(lines) + "\n")

    shapes = sorted({r["shape"] for r in data["results"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(VARIANTS)
    for j, variant in enumerate(VARIANTS):
        rs = [next(r for r in data["results"] if r["shape"] == s and r["variant"] == variant) for s in shapes]
        plain = [next(r for r in data["results"] if r["shape"] == s and r["variant"] == "plain") for s in shapes]
        inter = [next(r["step_s"] for r in data["interleaved"] if r["shape"] == s) for s in shapes]
        xs = [i + j * width for i in range(len(shapes))]
        axes[0].bar(xs, [t[variant] / t["plain"] for t in inter], width, label=variant)
        axes[1].bar(xs, [r["peak_kib"] / max(p_["peak_kib"], 1) for r, p_ in zip(rs, plain)], width, label=variant)
    for ax, title in zip(axes, ("step time / plain (interleaved)", "peak memory over baseline / plain")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].axhline(TARGETS["time_cache_over_plain"], color="k", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(out / "train_step.png", dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--seq", type=int, default=256, help="Tokens per sequence.")
    ap.add_argument("--batch", type=int, default=4, help="Sequences per step.")
    ap.add_argument("--steps", type=int, default=16, help="Timed steps per variant.")
    ap.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    ap.add_argument("--rounds", type=int, default=16, help="Rounds of the interleaved run.")
    ap.add_argument("--block", type=int, default=4, help="Timed consecutive steps of one variant per round of the interleaved run, after one untimed (a multiple of 4, periodic's period).")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in each worker.")
    add_measurement_args(ap)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="Where results go.")
    ap.add_argument("--replot", action="store_true", help="Only re-render train_step.md and .png from train_step.json in --out.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.replot:
        write_outputs(json.loads((a.out / "train_step.json").read_text()), a.out)
        return
    if a.block % 4:
        ap.error("--block must be a multiple of 4, the period of the periodic variant")
    if a.worker:
        print(json.dumps(run_worker(json.loads(a.worker))))
        return
    prov = provenance()  # before the workers: it records the load average at the start
    load_before = prov["loadavg_at_start"]
    results, interleaved = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes:
            model_dir, cache_dir = build(shape, Path(tmp) / shape, a.seq, n_seq=(a.warmup + max(a.steps, a.rounds * a.block) + 1) * a.batch)
            for variant in VARIANTS:
                params = dict(shape=shape, variant=variant, model=str(model_dir), cache=str(cache_dir), tmp=str(Path(tmp) / "run"),
                              batch=a.batch, steps=a.steps, warmup=a.warmup, threads=a.threads)
                r = spawn(params, a)
                print(f"{shape:6s} {variant:9s} {r['step_s']:.3f} s/step  peak +{r['peak_kib'] / 1024:.0f} MiB", flush=True)
                results.append(r)
            params = dict(shape=shape, variant="interleaved", model=str(model_dir), cache=str(cache_dir), tmp=str(Path(tmp) / "run"),
                          batch=a.batch, steps=a.rounds * a.block, rounds=a.rounds, block=a.block, warmup=a.warmup, threads=a.threads)
            r = spawn(params, a)
            print(f"{shape:6s} interleaved " + "  ".join(f"{v} {t:.4f}" for v, t in r["step_s"].items()), flush=True)
            interleaved.append(r)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "worker"}
    data = {"config": config, "provenance": prov, "load_before": load_before, "load_after": loadavg(), "results": results,
            "interleaved": interleaved, "ratios": ratios(results, interleaved), "targets": TARGETS}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_step.json").write_text(json.dumps(data, indent=2))
    write_outputs(data, a.out)
    print((a.out / "train_step.md").read_text())


if __name__ == "__main__":
    main()
