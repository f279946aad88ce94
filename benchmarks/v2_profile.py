"""What ``geocache profile`` costs: its pass over a domain vs a plain forward over the same tokens.

Each variant runs in a fresh subprocess (``--worker``) on the same batches of the same model:

- ``forward``: ``model(input_ids, attention_mask)`` under ``no_grad``, every batch;
- ``profile``: ``geocache.profile.measure_domain`` (the forward with the MoE-block pre-hooks, per
  layer the block's router and three single-expert evaluations per token for κ(e_k, e_k+1) and
  κ(e_k, e_r), the reservoirs, and the calibration statistics of every labelled position);
- ``profile + statistics``: the above plus the per-layer C1/C2 bootstrap and aggregates
  (``v2_summary``), the whole of what ``geocache profile`` computes for one domain.

Reported: wall time (min over ``--reps`` passes after one warm-up), ratio to the forward (target
≤ 2x), and peak RSS above the loaded model (``VmHWM`` after resetting it). Models: the ``moe``
reference model (``geocache reference``: 4 layers, hidden 128, 8 experts top-2, a forward so cheap
that the per-token V2 work shows most), and a wider random Qwen3-MoE (8 layers, hidden 512, 64
experts top-8, the reference's tokenizer; timing needs no training). Data: the reference's held-out
code split.

    python benchmarks/v2_profile.py [--sequences 64] [--max-length 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_measurement_args, loadavg, proc_status_kib, provenance, provenance_markdown, reset_peak_rss, spawn_measured  # noqa: E402

NAME = "v2_profile"
VARIANTS = ("forward", "profile", "profile + statistics")


def worker(p: dict) -> dict:
    import torch

    from geocache.models import load_model_and_tokenizer
    from geocache.profile import ProfileConfig, _batches, measure_domain, v2_summary

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(p["model"], device="cpu")
    cfg = ProfileConfig(model=p["model"], data=[p["data"]], out="", max_length=p["max_length"], max_sequences=p["sequences"],
                        batch_size=p["batch_size"], n_resamples=p["n_resamples"])
    batches = list(_batches(tok, p["data"], cfg))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    def profile(stats: bool):
        m = measure_domain(model, tok, p["data"], cfg)
        if stats:
            v2_summary(m["blocks"], m["v2"]["base"], cfg)

    fn = {"forward": forward, "profile": lambda: profile(False), "profile + statistics": lambda: profile(True)}[p["variant"]]
    fn()  # warm-up
    base_rss = proc_status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    times = []
    for _ in range(p["reps"]):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"variant": p["variant"], "times_s": times, "s": min(times), "tokens": tokens, "batches": len(batches),
            "peak_above_model_mib": (proc_status_kib("VmHWM") - base_rss) / 1024, "peak_reset": reset_ok,
            "threads": torch.get_num_threads()}


def wide_model(reference: str, out: Path) -> str:
    """A random Qwen3-MoE wider than the reference (same tokenizer), saved like a hub model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from geocache.testing import tiny_config

    tok = AutoTokenizer.from_pretrained(reference)
    cfg = tiny_config("qwen3_moe", vocab_size=len(tok), hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=64, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024,
                      max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples (geocache profile's default)")
    ap.add_argument("--model", default=None, help="model directory (default: the moe reference model)")
    ap.add_argument("--data", default=None, help="JSONL data (default: the reference's heldout-code.jsonl)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    add_measurement_args(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    import tempfile

    from geocache.reference import build_reference_model, recipe_for

    reference = str(build_reference_model(recipe_for("moe")))
    a.data = a.data or str(Path(reference) / "heldout-code.jsonl")
    work = Path(tempfile.mkdtemp(prefix="geocache-v2bench-"))
    shapes = {"reference": a.model or reference, "wide": wide_model(reference, work / "wide")} if a.model is None else {"given": a.model}
    prov, started = provenance(), time.perf_counter()
    rows = []
    for shape, model in shapes.items():
        fwd = None
        for variant in VARIANTS:
            params = {"variant": variant, "model": model, "data": a.data, "sequences": a.sequences, "max_length": a.max_length,
                      "batch_size": a.batch_size, "reps": a.reps, "n_resamples": a.n_resamples}
            r, _ = spawn_measured(Path(__file__).resolve(), params, a.worker_timeout, max_busy=a.max_busy, idle_timeout=a.idle_timeout,
                                  max_other_share=a.max_other_share, retries=a.retries, label=f"{shape}/{variant}")
            if "error" in r:
                raise SystemExit(f"{shape}/{variant}: {r['error']}\n{r.get('stderr_tail', '')}")
            fwd = fwd or r["s"]
            r.update(shape=shape, model=model, ratio_to_forward=r["s"] / fwd)
            rows.append(r)
            print(f"[{shape}/{variant}] {r['s']:.2f} s for {r['tokens']} tokens ({r['ratio_to_forward']:.2f}x), peak +{r['peak_above_model_mib']:.0f} MiB, "
                  f"other CPU {r['other_cpu_s']:.1f} s")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    data = {"provenance": prov, "args": {k: v for k, v in vars(a).items() if k not in ("worker", "out_dir")}, "rows": rows,
            "loadavg_at_end": loadavg(), "elapsed_s": time.perf_counter() - started, "target_ratio": 2.0}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str))
    lines = ["# V2 profiling cost", "", f"Generated by `benchmarks/v2_profile.py` in {data['elapsed_s']:.0f} s.", "", __doc__.split("\n\n", 1)[1].split("    python")[0].strip(), "",
             *provenance_markdown(prov, data["loadavg_at_end"]), "",
             f"Data `{a.data}`: {rows[0]['tokens']:,} tokens in {rows[0]['batches']} batches of ≤ {a.batch_size} × {a.max_length}; "
             f"{a.n_resamples} bootstrap resamples.", "",
             "| model | variant | time (s, min of reps) | all reps | ratio to forward | target | peak RSS above model (MiB) | other CPU (s) |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        target = "≤ 2x: " + ("PASS" if r["ratio_to_forward"] <= 2 else "FAIL") if r["variant"] != "forward" else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {r['s']:.3f} | {', '.join(f'{t:.3f}' for t in r['times_s'])} | {r['ratio_to_forward']:.2f}x | {target} | "
                     f"{r['peak_above_model_mib']:.0f} | {r['other_cpu_s']:.1f} |")
    (a.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    names = [f"{r['shape']}\n{r['variant']}" for r in rows]
    axes[0].bar(names, [r["ratio_to_forward"] for r in rows])
    axes[0].axhline(2.0, color="k", ls="--", lw=0.8)
    axes[0].set_ylabel("time / plain forward")
    axes[1].bar(names, [r["peak_above_model_mib"] for r in rows])
    axes[1].set_ylabel("peak RSS above the model (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(a.out_dir / f"{NAME}.png", dpi=110)
    print(f"wrote {a.out_dir}/{NAME}.{{json,md,png}}")


if __name__ == "__main__":
    main()
