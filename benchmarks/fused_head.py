"""precompute's fused output projection against the model's own logits, side by side in one process.

    python benchmarks/fused_head.py [--layers 2 28] [--reps 3] [--out-dir benchmarks/results]

A random Qwen3-0.6B-shaped model (hidden 1024, 151,936 output rows, tied), cut to each of
``--layers``, and one padded batch of ``--batch`` × ``--length`` tokens with every position but the
last of each row labelled (what precompute sees for truncated text). Per repetition, alternating:

- **model logits** (``fused_head=False``): ``model(input_ids).logits`` (the model projects every
  position into fresh ``[B, T, V]`` memory), then ``compute_base_stats(logits, k, m, rows=...)`` per
  sequence, which copies each chunk of rows out of the logits;
- **fused head** (the default): the model under ``_hidden_only`` (a hook hands the projection an
  empty slice and keeps the last hidden states), then precompute's own ``_Run._project`` (the
  labelled rows of the batch in one product, into a buffer reused across batches) and
  ``compute_base_stats`` per sequence on the buffer in place.

Both take the same time per batch up to the model call and after the statistics, so the sum of
*model call* + *projection and statistics* is the comparison. The minimum over repetitions is
kept; the first call of each path is a warm-up and not counted. Writes ``fused_head.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import torch

from geocache.bench import provenance, provenance_markdown, writable_dir, write_reports
from geocache.precompute import _hidden_only, _Run
from geocache.signals import compute_base_stats


def model_of(layers: int, vocab: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("qwen3", vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def model_logits(model, ids, rows, k, m) -> tuple[float, float]:
    t0 = time.perf_counter()
    logits = model(ids, use_cache=False).logits
    t1 = time.perf_counter()
    flat = logits.reshape(-1, logits.shape[-1])
    for i, r in enumerate(rows):
        compute_base_stats(flat, k, m, rows=r, generator=torch.Generator().manual_seed(i))
    del logits, flat
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def fused(model, ids, rows, k, m, run) -> tuple[float, float]:
    t0 = time.perf_counter()
    with _hidden_only(run.head) as kept:
        model(ids, use_cache=False)
    t1 = time.perf_counter()
    hidden = kept[0].reshape(-1, kept[0].shape[-1])
    i = 0
    for group, _, sizes in _Run._project(run, hidden, rows):
        for logits in group.split(sizes):  # per sequence, as precompute does on the CPU
            compute_base_stats(logits, k, m, generator=torch.Generator().manual_seed(i))
            i += 1
    return t1 - t0, time.perf_counter() - t1


def measure(args) -> dict:
    shapes = []
    for layers in args.layers:
        model = model_of(layers, args.vocab, args.seed)
        ids = torch.randint(0, 4096, (args.batch, args.length), generator=torch.Generator().manual_seed(args.seed))
        rows = [torch.arange(b * args.length, (b + 1) * args.length - 1) for b in range(args.batch)]
        run = types.SimpleNamespace(head=model.get_output_embeddings(), _proj_buf=None)  # what _Run._project reads
        paths = {"model logits": lambda: model_logits(model, ids, rows, args.k, args.m),
                 "fused head": lambda: fused(model, ids, rows, args.k, args.m, run)}
        times = {name: [] for name in paths}
        for rep in range(args.reps + 1):
            for name, f in paths.items():
                t = f()
                if rep:  # rep 0 warms both paths up
                    times[name].append(t)
                print(f"[{layers} layers] {name} rep {rep}: model call {t[0]:.3f} s, projection + statistics {t[1]:.3f} s", flush=True)
        best = {name: min(ts, key=sum) for name, ts in times.items()}
        shapes.append({
            "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "times": times,
            "best": {name: {"model_call_s": a, "statistics_s": b, "total_s": a + b} for name, (a, b) in best.items()},
            "ratio_fused_to_model_logits": sum(best["fused head"]) / sum(best["model logits"]),
        })
        del model
    return {"provenance": provenance(), "config": vars(args), "shapes": shapes}


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Fused output projection vs the model's own logits (precompute)",
        "",
        __doc__.split("\n\n", 2)[2].split("Writes")[0].strip().replace("\n", " "),
        "",
        f"Batch {c['batch']} × {c['length']} tokens, V = {c['vocab']:,}, k = {c['k']}, m = {c['m']}, {c['reps']} repetitions.",
        "",
        provenance_markdown(r["provenance"]),
        "",
        "| layers | parameters | path | model call (s) | projection + statistics (s) | **total (s)** | all repetitions (total, s) |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for s in r["shapes"]:
        for name, b in s["best"].items():
            reps = ", ".join(f"{sum(t):.2f}" for t in s["times"][name])
            lines.append(f"| {s['layers']} | {s['parameters'] / 1e6:.0f}M | {name} | {b['model_call_s']:.3f} | {b['statistics_s']:.3f} | "
                         f"**{b['total_s']:.3f}** | {reps} |")
    lines += ["", *(f"- **{s['layers']} layers**: fused / model logits = **{s['ratio_fused_to_model_logits']:.3f}x** per batch."
                    for s in r["shapes"]), ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, calls, stats = [], [], []
    for s in r["shapes"]:
        for name, b in s["best"].items():
            labels.append(f"{s['layers']}L\n{name}")
            calls.append(b["model_call_s"])
            stats.append(b["statistics_s"])
    ax.bar(labels, calls, label="model call")
    ax.bar(labels, stats, bottom=calls, label="projection + statistics")
    ax.set_ylabel("seconds per batch")
    ax.set_title("precompute: fused head vs model logits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 28], help="decoder layers of the Qwen3-0.6B-shaped model")
    p.add_argument("--vocab", type=int, default=151_936, help="output rows")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--k", type=int, default=32, help="top-k")
    p.add_argument("--m", type=int, default=16, help="tail samples")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    out = writable_dir(args.out_dir)
    result = measure(args)
    write_reports(out, "fused_head", result, markdown, plot)
    print(markdown(result))


if __name__ == "__main__":
    main()
