"""What an exact KL tail would cost: top-k plus the base tail's mean output embedding.

The fidelity benchmark (``geocache bench fidelity``) finds no (estimator, k, m) that meets the
mask-agreement target (>= 99.5% of positions on the same side of the KL threshold) within 200
bytes/token: the KL inside the tail, estimated from m samples, is too noisy near the threshold.
This benchmark measures the one way around it that this code base found, and what it costs.

With the output head frozen (geocache's DoRA adapts attention and MLP projections, never
``lm_head``) every tuned logit is ``z_j = w_j · h`` (``h`` the tuned model's last hidden state), so

    Σ_{j∈T} p_j log q_j = p_T · (w̄_T · h − logsumexp(z)),    w̄_T = Σ_{j∈T} p_j w_j / p_T

and the forward KL is exact from the top-k part, the entropy (both already cached) and ``w̄_T``:
d numbers per position instead of m samples. Its size is the catch: 2·d bytes in float16, 256 for
the reference model (d = 128), 2 KiB for Qwen3-0.6B. The benchmark also measures ``w̄_T`` kept in a
rank-r PCA basis (r float16 coefficients per position, the basis once per cache, and one float32
that makes it exact at the base's own hidden state), whose error is then linear in how far ``h``
moved from the base's, and the library's default estimator, on the same positions.

Not measured here: the gradient (the loss would need ``h`` and the head, not logits alone; with
``w̄_T`` exact, the gradient with respect to ``h`` is exact too) and training with it.

    python benchmarks/tail_embedding.py [--steps 20,200] [--k 32] [--m 16] [--ranks 8,16,32,64]
    python benchmarks/tail_embedding.py --replot [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

THRESHOLDS = (0.08, 0.15)
TARGETS = {"mask_agree": 0.995, "bytes": 200.0}


def _positions(model, cache_path: Path, head):
    """Tuned and base (adapter off) logits and last hidden states at the labelled positions, and
    the cache's statistics in the same order."""
    import torch

    from geocache.base import model_inputs
    from geocache.bench.fidelity import _cat_stats
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.signals import shift_and_select

    seen = {}
    hook = head.register_forward_hook(lambda mod, args, out: seen.__setitem__("h", args[0]))
    cache = open_cache(str(cache_path))
    out = {k: [] for k in ("zq", "hq", "zp", "hp")}
    stats = []
    try:
        with torch.no_grad():
            for s in range(0, len(cache), 8):
                batch = collate_cache_rows([cache[i] for i in range(s, min(s + 8, len(cache)))])
                inputs = model_inputs(batch)
                zq = model(**inputs).logits.float()
                hq = seen["h"].float()
                with model.disable_adapter():
                    zp = model(**inputs).logits.float()
                    hp = seen["h"].float()
                for name, t in (("zq", zq), ("hq", hq), ("zp", zp), ("hp", hp)):
                    out[name].append(shift_and_select(t, batch["labels"])[0])
                stats.append(batch["base"])
    finally:
        hook.remove()
    return {k: torch.cat(v).double() for k, v in out.items()}, _cat_stats(stats)


def compare(pos: dict, stats, W, k: int, m: int, ranks, seed: int = 0) -> list[dict]:
    """Each estimator's KL against the exact one, on the second half of the positions (the first
    half fits the PCA basis)."""
    import torch

    from geocache.signals import cached_kl

    lp = torch.log_softmax(pos["zp"], -1)
    lq = torch.log_softmax(pos["zq"], -1)
    exact = (lp.exp() * (lp - lq)).sum(-1)
    ids = stats.topk_ids.long()
    # The cached top-k part, as the loss reads it (float16 log-probs, float32 lse and entropy).
    lp_s = stats.topk_logprobs.double()
    p_s = lp_s.exp()
    p_t = (1 - p_s.sum(-1)).clamp_min(0)
    head = (p_s * (lp_s - lq.gather(-1, ids))).sum(-1)
    tail_neg_entropy = -stats.entropy.double() - (p_s * lp_s).sum(-1)  # Σ_T p log p
    # What precompute would store: w̄_T from the full base distribution, in float16.
    p = lp.exp().scatter(-1, ids, 0.0)
    wbar = (p @ W) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    lse_q = torch.logsumexp(pos["zq"], -1)

    def embedding_estimate(w):
        return head + tail_neg_entropy - p_t * ((w * pos["hq"]).sum(-1) - lse_q)

    n = exact.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, ev = order[: n // 2], order[n // 2:]
    mean = wbar[fit].mean(0)
    _, _, basis = torch.linalg.svd(wbar[fit] - mean, full_matrices=False)
    d = W.shape[1]
    from geocache.signals import BaseStats

    wide = BaseStats(stats.lse, stats.entropy, ids, stats.topk_logprobs, stats.sample_ids.long(), stats.sample_logprobs)
    with torch.no_grad():
        default = cached_kl(pos["zq"].float(), wide, "topk_hybrid").double()
    estimates = {("library default", f"topk_hybrid k={k} m={m}", None): default}
    estimates[("tail embedding", f"k={k} + w̄_T float16 (d={d})", 2 * d)] = embedding_estimate(wbar.half().double())
    for r in sorted(set(ranks)):
        if 0 < r < d:
            B = basis[:r]
            w = mean + ((wbar - mean) @ B.T).half().double() @ B
            # Plus one float32 stored beside them, what the cut-off part of w̄_T gives at the base's
            # own h: exact at the base, the error is then (w̄_T − ŵ)·(h − h_base), linear in the drift.
            correction = ((wbar - w) * pos["hp"]).sum(-1).float().double()
            estimates[("tail embedding, PCA", f"k={k} + {r} coefficients + 1 float32", 2 * r + 4)] = embedding_estimate(w) - p_t * correction
    rows = []
    e = exact[ev]
    keep = e >= 1e-3
    for (family, name, extra_bytes), est in estimates.items():
        v = est[ev]
        rel = ((v - e).abs() / e)[keep]
        row = {"family": family, "name": name, "bytes_per_position_beyond_topk": extra_bytes, "positions": int(ev.numel()), "exact_mean": e.mean().item(),
               "agg_bias": (v.sum() / e.sum() - 1).item(), "relerr_p50": rel.median().item(), "relerr_p95": torch.quantile(rel, 0.95).item()}
        for tau in THRESHOLDS:
            row[f"mask_agree@{tau}"] = ((v > tau) == (e > tau)).double().mean().item()
        rows.append(row)
    return rows


def run(args) -> dict:
    import torch

    from _common import provenance
    from geocache.bench import cache_of, workspace
    from geocache.bench.evaluate import load_tuned
    from geocache.bench.fidelity import FidelityConfig, _tune, lm_bytes_per_token

    recipe = None
    if args.tiny:
        from geocache.testing import tiny_reference_recipe

        recipe = tiny_reference_recipe()
    cfg = FidelityConfig(out=args.out, work_dir=args.work_dir, steps=tuple(args.steps), ks=(args.k,), ms=(args.m,), backends=("arrow",),
                         cache_dir=args.cache_dir, recipe=recipe, eval_sequences=args.eval_sequences, max_length=args.max_length,
                         tune_sequences=args.tune_sequences, learning_rate=args.learning_rate, device="cpu")
    started = time.perf_counter()
    rows = []
    with workspace(cfg, "tail-embedding", print) as (recipe, model_dir, work):
        domains = list(recipe.domains)
        caches = {d: cache_of(model_dir, model_dir / f"heldout-{d}.jsonl", work / f"eval-{d}", max_length=cfg.max_length,
                              max_sequences=cfg.eval_sequences, k=args.k, m=args.m, backend="arrow", device="cpu") for d in domains}
        top_bytes = {d: lm_bytes_per_token(c, 0) for d, c in caches.items()}
        default_bytes = {d: lm_bytes_per_token(c, args.m) for d, c in caches.items()}
        for steps in cfg.steps:
            adapter = work / f"tuned-{steps}" / "adapter"
            if not (args.work_dir and adapter.exists()):  # (a --work-dir keeps the tuned adapters for a rerun)
                adapter = _tune(model_dir, work, cfg, steps, print)
            model, _ = load_tuned(model_dir, adapter, device="cpu")
            head = model.get_output_embeddings()
            if not isinstance(head, torch.nn.Linear) or head.bias is not None:
                raise ValueError(f"the reference model's output head is {head!r}: the identity needs a plain, bias-free linear head")
            W = head.weight.detach().double()
            for d in domains:
                pos, stats = _positions(model, caches[d], head)
                assert torch.allclose(pos["hq"] @ W.T, pos["zq"], atol=1e-4), "logits are not the head's projection of h"
                tokens_per_position = json.loads((caches[d] / "manifest.json").read_text())["counts"]
                per_pos = tokens_per_position["positions"] / tokens_per_position["tokens"]  # bytes/token = bytes/position · this
                for row in compare(pos, stats, W, args.k, args.m, args.ranks):
                    extra = row["bytes_per_position_beyond_topk"]
                    row["bytes_per_token"] = default_bytes[d] if extra is None else top_bytes[d] + extra * per_pos
                    rows.append({"steps": steps, "domain": d, **row})
                print(f"{steps} steps, {d}: {len(rows)} rows", flush=True)
            del model
        d_model = int(W.shape[1])
    from _common import loadavg

    return {"provenance": provenance(), "loadavg_at_end": loadavg(), "config": {"steps": list(cfg.steps), "k": args.k, "m": args.m, "ranks": list(args.ranks),
                                                   "eval_sequences": cfg.eval_sequences, "max_length": cfg.max_length, "tiny": args.tiny},
            "hidden_size": d_model, "rows": rows, "elapsed_s": time.perf_counter() - started}


def _worst(rows: list[dict]) -> dict:
    """Per estimator, the worst case over tuned models and domains."""
    out = {}
    for r in rows:
        w = out.setdefault(r["name"], {"family": r["family"], "bytes_per_token": 0.0, "mask_agree": 1.0, "agg_bias": 0.0, "relerr_p50": 0.0})
        w["bytes_per_token"] = max(w["bytes_per_token"], r["bytes_per_token"])
        w["mask_agree"] = min(w["mask_agree"], *(r[f"mask_agree@{t}"] for t in THRESHOLDS))
        w["agg_bias"] = max(w["agg_bias"], abs(r["agg_bias"]))
        w["relerr_p50"] = max(w["relerr_p50"], r["relerr_p50"])
    return out


def markdown(result: dict) -> str:
    from _common import provenance_markdown

    cfg, d = result["config"], result["hidden_size"]
    lines = ["# Cached KL with the tail's mean output embedding", "",
             f"Generated by `benchmarks/tail_embedding.py` in {result['elapsed_s']:.0f} s. See the script's docstring for the identity "
             "(the output head is frozen, so the tail's part of the forward KL is p_T·(w̄_T·h − lse)).", "",
             *provenance_markdown(result["provenance"], result["loadavg_at_end"]), "",
             f"Tuned models: the reference after {', '.join(map(str, cfg['steps']))} plain DoRA SFT steps on prose (as in `fidelity.md`); "
             f"held-out text of each domain; hidden size d = {d}. Evaluated on half the labelled positions (the other half fits the PCA "
             "basis). Bytes/token: the cache's stored LM statistics (arrow) for the library default; for the others its top-k part "
             "plus, per labelled position, 2 bytes per float16 number and 4 per float32.", "",
             "| steps | domain | estimator | bytes/token | exact mean | agg bias | rel err p50 | p95 | mask agree @0.08 | @0.15 |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['domain']} | {r['name']} | {r['bytes_per_token']:.1f} | {r['exact_mean']:.4f} | {r['agg_bias']:+.4f} | "
                     f"{r['relerr_p50']:.4f} | {r['relerr_p95']:.4f} | {r['mask_agree@0.08']:.4f} | {r['mask_agree@0.15']:.4f} |")
    lines += ["", "## Worst case over tuned models and domains", "",
              f"Targets (`fidelity`): mask agreement ≥ {TARGETS['mask_agree']}, ≤ {TARGETS['bytes']:.0f} bytes/token for the LM statistics.", "",
              "| estimator | bytes/token | mask agreement | \\|agg bias\\| | rel err p50 | meets both |", "|---|---:|---:|---:|---:|---|"]
    for name, w in _worst(result["rows"]).items():
        meets = w["mask_agree"] >= TARGETS["mask_agree"] and w["bytes_per_token"] <= TARGETS["bytes"]
        lines.append(f"| {name} | {w['bytes_per_token']:.1f} | {w['mask_agree']:.4f} | {w['agg_bias']:.4f} | {w['relerr_p50']:.4f} | "
                     f"{'yes' if meets else 'no'} |")
    lines += ["", "Raw numbers: `tail_embedding.json`; plot: `tail_embedding.png`.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = _worst(result["rows"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("library default", "o"), ("tail embedding", "s"), ("tail embedding, PCA", "^")):
        pts = sorted((w["bytes_per_token"], max(1 - w["mask_agree"], 1e-5), name) for name, w in worst.items() if w["family"] == family)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=family)
    ax.axhline(1 - TARGETS["mask_agree"], color="k", ls="--", lw=0.8)
    ax.axvline(TARGETS["bytes"], color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LM statistics, bytes/token")
    ax.set_ylabel("1 − mask agreement (worst case, τ = 0.08, 0.15)")
    ax.set_title(f"Tail's mean output embedding vs sampled tail (d = {result['hidden_size']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="Where tail_embedding.json/.md/.png go.")
    parser.add_argument("--replot", action="store_true", help="Rewrite the .md and .png from the .json in --out (no measurement).")
    parser.add_argument("--steps", type=ints, default=[20, 200], help="DoRA SFT steps of the tuned models (comma-separated).")
    parser.add_argument("--k", type=int, default=32, help="Top-k (the library default's).")
    parser.add_argument("--m", type=int, default=16, help="Tail samples of the library default.")
    parser.add_argument("--ranks", type=ints, default=[8, 16, 32, 64], help="PCA ranks of w̄_T (comma-separated).")
    parser.add_argument("--eval-sequences", type=int, default=48, help="Held-out sequences per domain.")
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per held-out sequence.")
    parser.add_argument("--tune-sequences", type=int, default=512, help="Sequences of the SFT cache.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="SFT learning rate.")
    parser.add_argument("--work-dir", default=None, help="Caches and adapters (default: a temporary directory); tuned adapters found there are reused.")
    parser.add_argument("--cache-dir", default=None, help="Reference models' cache directory.")
    parser.add_argument("--tiny", action="store_true", help="The tests' tiny reference recipe (a smoke run).")
    args = parser.parse_args(argv)
    from geocache.bench import rewrite_reports, write_reports, writable_dir

    if args.replot:
        rewrite_reports(args.out, "tail_embedding", markdown, plot)
        return
    result = run(args)
    write_reports(writable_dir(args.out), "tail_embedding", result, markdown, plot)
    print(f"wrote {args.out}/tail_embedding.{{json,md,png}}")


if __name__ == "__main__":
    main()
