#!/usr/bin/env python
"""Peak memory and time of the geometry-aware loss against plain cross-entropy, and of the
base-statistics pass against a bare logsumexp, side by side in one run.

A) Loss forward + backward on float32 logits ``[B, T, V]`` (default B=4, T=1025, so B·(T−1) = 4,096
   labelled positions after the causal shift), random labels, ``requires_grad=True``:

   plain_ce        ``F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))``
   geometry_cache  ``GeometryAwareLoss()(logits, stats, labels)``; ``stats`` = ``BaseStats.from_logits``
                   (k=64, m=8, seeded), computed before measuring: it is the cached input. Its KL
                   threshold is ``--cache-kl-threshold`` (0): random base logits are near-uniform, so
                   the top-k coarse-grained KL is ~0.03-0.07 nats and the default 0.15 would leave
                   the KL hinge off (the work done is the same either way; this keeps it honest)
   geometry_live   ``GeometryAwareLoss()(logits, base_logits, labels)``, full base logits (no grad)
   note_sketch     the design note's sketch in plain autograd (``note_sketch_loss`` below), with the
                   same thresholds and λ's as ``GeometryConfig()``

   Each (variant, vocab) runs in a fresh subprocess (this script with the hidden ``--worker`` flag,
   parameters as JSON on the command line, result as JSON on stdout). The worker caps its address
   space with ``RLIMIT_AS`` (default 20 GiB) so a variant that needs more fails with an allocation
   error instead of waking the OOM killer; that is recorded as ``exceeds_limit``. The worker builds
   every input, runs ``gc.collect()``, reads VmRSS (the baseline), resets the high-water mark by
   writing "5" to ``/proc/self/clear_refs`` (checked; falls back to ``ru_maxrss``, which cannot be
   reset, so the number would then be an upper bound), runs forward + backward once and reports
   peak = VmHWM − baseline VmRSS. Then, in the same worker, 1 warm-up and ``--reps`` timed
   repetitions; time = the minimum wall time of forward + backward (``.grad`` reset between runs).

B) Base statistics on float32 logits ``[R, V]`` (default R=512): ``geocache.compute_base_stats``
   (k=64, m=8, default chunk size) against a bare ``torch.logsumexp(x, -1)`` and against a
   straightforward chunked version (``straightforward_base_stats`` below: 128 rows per chunk,
   logsumexp, softmax, entropy, topk, multinomial on the tail). Time = min of ``--stats-reps``
   after one warm-up, in the main process.

Results go to ``benchmarks/results/loss_memory.{json,md,png}`` with the command line, machine and
versions that produced them (``--replot`` re-renders the Markdown and PNG from the JSON).
Run ``python benchmarks/loss_memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # `import geocache` from a source checkout; `_common` beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from geocache import BaseStats, GeometryAwareLoss, GeometryConfig, compute_base_stats  # noqa: E402

from _common import loadavg, proc_status_kib, provenance, reset_peak_rss, spawn_worker  # noqa: E402

VARIANTS = ("plain_ce", "geometry_cache", "geometry_live", "note_sketch")
GEOMETRY_VARIANTS = ("geometry_cache", "geometry_live")
GIB = 1 << 30
TARGETS = {
    "mem_geometry_over_plain": 1.5,
    "mem_geometry_over_sketch": 0.5,
    "time_geometry_over_plain": 2.0,
    "time_stats_over_logsumexp": 2.0,
}


# ----------------------------------------------------------------------------------------------
# Allocation failures
# ----------------------------------------------------------------------------------------------


def is_allocation_failure(exc: BaseException) -> bool:
    """MemoryError, or torch's CPU allocator failing under RLIMIT_AS (a RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg or "bad_alloc" in msg)


# ----------------------------------------------------------------------------------------------
# The loss variants
# ----------------------------------------------------------------------------------------------


def hinge(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x > threshold, x - threshold, 0.0)


def note_sketch_loss(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor, cfg: GeometryConfig) -> torch.Tensor:
    """The design note's sketch, plain autograd, masked correctly (shift, then drop -100 rows)."""
    vocab = logits.shape[-1]
    y_all = labels[:, 1:].reshape(-1)
    keep = y_all != -100
    q = logits[:, :-1].reshape(-1, vocab)[keep]
    p = base_logits[:, :-1].reshape(-1, vocab)[keep]
    y = y_all[keep]
    task = F.cross_entropy(q, y, reduction="none")
    h_q = -(F.softmax(q, -1) * F.log_softmax(q, -1)).sum(-1)
    h_p = -(F.softmax(p, -1) * F.log_softmax(p, -1)).sum(-1)
    kl = F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="none").sum(-1)
    d_h = h_q - h_p
    gap = task - h_q
    kl_pen = hinge(kl, cfg.kl_threshold)
    cal_pen = hinge(gap, cfg.cal_threshold)
    h_pen = hinge(-d_h, cfg.dh_threshold)
    return task.mean() + cfg.lambda_kl * kl_pen.mean() + cfg.lambda_cal * cal_pen.mean() + cfg.lambda_entropy * h_pen.mean()


def make_loss_inputs(variant: str, batch: int, seq: int, vocab: int, k: int, m: int, seed: int) -> dict:
    """Everything the measured step reads, built before measuring. Only what the variant needs is
    kept alive: plain_ce gets no base logits, geometry_cache keeps the statistics, not the logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    inputs = {"logits": logits.requires_grad_(True), "labels": labels}
    if variant == "plain_ce":
        return inputs
    base_logits = torch.randn(batch, seq, vocab, generator=gen)
    if variant == "geometry_cache":
        inputs["stats"] = BaseStats.from_logits(base_logits, labels, k=k, m=m, generator=torch.Generator().manual_seed(0))
        del base_logits
    else:
        inputs["base_logits"] = base_logits
    return inputs


def loss_step(variant: str, inputs: dict, loss_fn: GeometryAwareLoss, cache_kl_threshold: float) -> tuple[float, dict]:
    """One measured forward + backward. Returns the loss value and (geometry) metrics."""
    logits, labels = inputs["logits"], inputs["labels"]
    metrics = {}
    if variant == "plain_ce":
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    elif variant == "geometry_cache":
        loss, metrics = loss_fn(logits, inputs["stats"], labels, thresholds={"kl_threshold": cache_kl_threshold})
    elif variant == "geometry_live":
        loss, metrics = loss_fn(logits, inputs["base_logits"], labels)
    elif variant == "note_sketch":
        loss = note_sketch_loss(logits, inputs["base_logits"], labels, loss_fn.config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    return float(loss.detach()), metrics


def summarise_metrics(metrics: dict) -> dict:
    keep = ("KL_mean", "dH_mean", "cal_gap_mean", "positions_penalized_KL", "positions_penalized_cal", "positions_penalized_H")
    return {key: float(metrics[key]) for key in keep if key in metrics}


# ----------------------------------------------------------------------------------------------
# Worker: one (variant, vocab) in a fresh process
# ----------------------------------------------------------------------------------------------


def run_worker(params: dict) -> dict:
    limit = int(params["mem_limit_gib"] * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(params["seed"])
    result = {
        "variant": params["variant"],
        "vocab": params["vocab"],
        "torch_threads": torch.get_num_threads(),
        "mem_limit_bytes": limit,
        "exceeds_limit": False,
    }
    loss_fn = GeometryAwareLoss()
    try:
        inputs = make_loss_inputs(params["variant"], params["batch"], params["seq"], params["vocab"], params["k"], params["m"], params["seed"])
    except BaseException as exc:  # noqa: BLE001 - reported, not hidden
        if not is_allocation_failure(exc):
            raise
        result.update(exceeds_limit=True, failed_in="input creation", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return result

    gc.collect()
    baseline_rss = proc_status_kib("VmRSS") * 1024
    result["baseline_rss_bytes"] = baseline_rss
    result["baseline_vmsize_bytes"] = proc_status_kib("VmSize") * 1024
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if reset_peak_rss():
        result["peak_method"] = "VmHWM after clear_refs=5"
    else:
        result["peak_method"] = "ru_maxrss (not resettable: an upper bound if input creation peaked higher)"

    start = time.perf_counter()
    try:
        loss_value, metrics = loss_step(params["variant"], inputs, loss_fn, params["cache_kl_threshold"])
    except BaseException as exc:  # noqa: BLE001
        if not is_allocation_failure(exc):
            raise
        inputs["logits"].grad = None
        peak = proc_status_kib("VmHWM") * 1024 if result["peak_method"].startswith("VmHWM") else maxrss_before
        result.update(
            exceeds_limit=True,
            failed_in="forward+backward",
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
            rss_increase_at_failure_bytes=peak - baseline_rss,
            # The limit is on the whole address space: the step needed more than this above baseline.
            needed_more_than_bytes=limit - result["baseline_vmsize_bytes"],
        )
        return result
    first_run_s = time.perf_counter() - start
    if result["peak_method"].startswith("VmHWM"):
        peak = proc_status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(
        peak_rss_bytes=peak,
        peak_increase_bytes=peak - baseline_rss,
        first_run_s=first_run_s,
        loss=loss_value,
        metrics=summarise_metrics(metrics),
    )

    times, cpu_times = [], []
    for i in range(params["warmup"] + params["reps"]):
        inputs["logits"].grad = None
        gc.collect()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_step(params["variant"], inputs, loss_fn, params["cache_kl_threshold"])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if i >= params["warmup"]:
            times.append(elapsed)
            cpu_times.append(cpu)
    # CPU time (all threads) is reported beside wall time: on a shared machine it is the steadier one.
    result.update(times_s=times, time_s=min(times), cpu_times_s=cpu_times, loadavg_after=loadavg())
    return result


# ----------------------------------------------------------------------------------------------
# B) base statistics
# ----------------------------------------------------------------------------------------------


def straightforward_base_stats(x: torch.Tensor, k: int, m: int, generator: torch.Generator, chunk: int = 128) -> dict:
    """The obvious chunked implementation: logsumexp, softmax, entropy, topk, tail multinomial."""
    n = x.shape[0]
    lse_all, ent_all = torch.empty(n), torch.empty(n)
    ids_all = torch.empty(n, k, dtype=torch.long)
    samples_all = torch.empty(n, m, dtype=torch.long)
    for start in range(0, n, chunk):
        z = x[start : start + chunk]
        lse = torch.logsumexp(z, -1)
        p = torch.exp(z - lse[:, None])
        ent = -(p * (z - lse[:, None])).sum(-1)
        _, ids = torch.topk(z, k)
        p_tail = p.scatter(1, ids, 0.0)
        samples = torch.multinomial(p_tail, m, replacement=True, generator=generator)
        stop = start + z.shape[0]
        lse_all[start:stop], ent_all[start:stop], ids_all[start:stop], samples_all[start:stop] = lse, ent, ids, samples
    return {"lse": lse_all, "entropy": ent_all, "topk_ids": ids_all, "sample_ids": samples_all}


def min_time(fn, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def measure_base_stats(rows: int, vocab: int, k: int, m: int, reps: int, seed: int) -> dict:
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    t_lse, all_lse = min_time(lambda: torch.logsumexp(x, -1), reps)
    t_fused, all_fused = min_time(lambda: compute_base_stats(x, k=k, m=m, generator=torch.Generator().manual_seed(0)), reps)
    t_plain, all_plain = min_time(lambda: straightforward_base_stats(x, k, m, torch.Generator().manual_seed(0)), reps)
    # Sanity: both implementations agree on what they both compute exactly.
    fused = compute_base_stats(x, k=k, m=m, generator=torch.Generator().manual_seed(0))
    plain = straightforward_base_stats(x, k, m, torch.Generator().manual_seed(0))
    agree = {
        "lse_max_abs_diff": float((fused.lse - plain["lse"]).abs().max()),
        "entropy_max_abs_diff": float((fused.entropy - plain["entropy"]).abs().max()),
        "topk_ids_equal_fraction": float((fused.topk_ids.sort(-1).values == plain["topk_ids"].sort(-1).values).float().mean()),
    }
    return {
        "rows": rows,
        "vocab": vocab,
        "logsumexp_s": t_lse,
        "compute_base_stats_s": t_fused,
        "straightforward_s": t_plain,
        "logsumexp_times_s": all_lse,
        "compute_base_stats_times_s": all_fused,
        "straightforward_times_s": all_plain,
        "ratio_compute_base_stats_over_logsumexp": t_fused / t_lse,
        "ratio_straightforward_over_logsumexp": t_plain / t_lse,
        "agreement": agree,
    }


# ----------------------------------------------------------------------------------------------
# Ratios, provenance, reports
# ----------------------------------------------------------------------------------------------


def loss_ratios(loss_results: list[dict], vocabs: list[int]) -> list[dict]:
    """Every targeted ratio, with its value, whether it is a bound, and PASS/FAIL."""
    by = {(r["variant"], r["vocab"]): r for r in loss_results}
    out = []
    for vocab in vocabs:
        plain, sketch = by.get(("plain_ce", vocab), {}), by.get(("note_sketch", vocab), {})
        for variant in GEOMETRY_VARIANTS:
            geo = by.get((variant, vocab), {})
            geo_mem = geo.get("peak_increase_bytes")
            specs = [
                ("mem_geometry_over_plain", "peak memory", "plain_ce", geo_mem, plain),
                ("mem_geometry_over_sketch", "peak memory", "note_sketch", geo_mem, sketch),
                ("time_geometry_over_plain", "time", "plain_ce", geo.get("time_s"), plain),
            ]
            for key, what, ref_name, num, ref in specs:
                bound = ""
                den = ref.get("peak_increase_bytes") if what == "peak memory" else ref.get("time_s")
                if what == "peak memory" and ref.get("exceeds_limit") and ref.get("needed_more_than_bytes"):
                    den, bound = ref["needed_more_than_bytes"], "<"  # reference did not fit: ratio is an upper bound
                value = num / den if (num is not None and den) else None
                verdict = None if value is None else ("PASS" if value <= TARGETS[key] else "FAIL")
                out.append(
                    {
                        "vocab": vocab,
                        "ratio": f"{variant} / {ref_name} {what}",
                        "key": key,
                        "variant": variant,
                        "value": value,
                        "bound": bound,
                        "target": TARGETS[key],
                        "verdict": verdict,
                    }
                )
    return out


def gib(x: float | None) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def fmt_ratio(r: dict) -> str:
    return "—" if r["value"] is None else f"{r['bound']}{r['value']:.2f}"


def write_markdown(path: Path, data: dict) -> None:
    cfg, prov = data["config"], data["provenance"]
    limit = cfg["mem_limit_gib"]
    lines = [
        "# Loss memory and time: geometry-aware loss vs plain cross-entropy",
        "",
        f"Generated by `benchmarks/loss_memory.py` on {prov['date_utc']} in {data['total_runtime_s']:.0f} s.",
        "",
        "**What and how.** (A) One forward + backward of each loss on float32 logits "
        f"`[{cfg['batch']}, {cfg['seq']}, V]` with `requires_grad=True` and random labels "
        f"({cfg['batch'] * (cfg['seq'] - 1)} labelled positions after the causal shift); random base logits. "
        "`plain_ce` = `F.cross_entropy` on the shifted rows; `geometry_cache` = `GeometryAwareLoss()` on `BaseStats` "
        f"(k={cfg['k']}, m={cfg['m']}, computed before measuring; KL threshold {cfg['cache_kl_threshold']:g} so that its KL hinge is "
        "active: with random base logits the top-k coarse-grained KL is only a few hundredths of a nat); `geometry_live` = `GeometryAwareLoss()` on full base "
        "logits; `note_sketch` = the design note's sketch in plain autograd with the same thresholds and λ's. "
        "Each (variant, vocab) runs in a fresh subprocess: inputs built, `gc.collect()`, baseline VmRSS read, VmHWM reset "
        "(`/proc/self/clear_refs` = 5), one forward + backward, **peak = VmHWM − baseline VmRSS** (inputs excluded; "
        f"the logits' gradient included). Workers run under `RLIMIT_AS` = {limit:g} GiB. Time = min of {cfg['reps']} "
        f"after {cfg['warmup']} warm-up, same worker. (B) `compute_base_stats` (k={cfg['k']}, m={cfg['m']}, default chunk) "
        f"vs bare `torch.logsumexp(x, -1)` vs a straightforward 128-row chunked version, on `[{cfg['stats_rows']}, V]` "
        f"float32, min of {cfg['stats_reps']} after 1 warm-up, in the main process.",
        "",
        f"**Command:** `{prov['command']}` (cwd `{prov['cwd']}`)",
        "",
        f"**Machine:** {prov['machine']['cpu_model']}, {prov['machine']['cpu_count']} cores, "
        f"torch threads {prov['machine']['torch_threads']}, {prov['machine']['mem_total_gib']} GiB RAM, {prov['machine']['platform']}",
        "",
        f"**Load average** (1/5/15 min) at start {prov['loadavg_at_start']}, at end {data['loadavg_at_end']}: "
        "other work on this machine during the run lengthens wall times; per-repetition CPU times are in the JSON.",
        "",
        f"**Versions:** python {prov['versions']['python']}, torch {prov['versions']['torch']}, "
        f"geocache {prov['versions']['geocache']} (sources sha256 {prov['versions']['geocache_source_sha256_16']})",
        "",
        "## A) Loss forward + backward: absolute numbers",
        "",
        "| variant | vocab | baseline RSS (GiB) | peak increase (GiB) | time (s, min) | times (s) | CPU time (s, min) | first run (s) | loss |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    footnote = False
    for r in data["loss"]:
        if r.get("exceeds_limit"):
            footnote = True
            peak = f"> {limit:g} GiB (did not fit)†"
        elif "error" in r:
            peak = f"error: {r['error']}"
        else:
            peak = gib(r["peak_increase_bytes"])
        times = ", ".join(f"{t:.2f}" for t in r.get("times_s", [])) or "—"
        first = f"{r['first_run_s']:.2f}" if "first_run_s" in r else "—"
        t = f"{r['time_s']:.2f}" if "time_s" in r else "—"
        cpu = f"{min(r['cpu_times_s']):.2f}" if r.get("cpu_times_s") else "—"
        loss = f"{r['loss']:.4f}" if "loss" in r else "—"
        lines.append(f"| {r['variant']} | {r['vocab']:,} | {gib(r.get('baseline_rss_bytes'))} | {peak} | {t} | {times} | {cpu} | {first} | {loss} |")
    if footnote:
        lines += ["", f"† `RLIMIT_AS` caps the worker's whole address space at {limit:g} GiB, inputs and libraries included."]
        for r in data["loss"]:
            if r.get("exceeds_limit") and r.get("needed_more_than_bytes"):
                lines.append(
                    f"  {r['variant']} at V={r['vocab']:,}: the address space was already {gib(r['baseline_vmsize_bytes'])} GiB "
                    f"before the step, so the step needed **more than {gib(r['needed_more_than_bytes'])} GiB** above its inputs; "
                    f"RSS had grown by {gib(r.get('rss_increase_at_failure_bytes'))} GiB when the allocation failed. "
                    "Ratios against it use the lower bound, so they are upper bounds (`<`)."
                )
    by = {(r["variant"], r["vocab"]): r for r in data["loss"]}
    agree = [
        f"V={v:,}: geometry_live {by[('geometry_live', v)]['loss']:.6f} vs note_sketch {by[('note_sketch', v)]['loss']:.6f}"
        for v in cfg["vocabs"]
        if "loss" in by.get(("geometry_live", v), {}) and "loss" in by.get(("note_sketch", v), {})
    ]
    if agree:
        lines += ["", "Same loss, two implementations (exact forward KL both): " + "; ".join(agree) + "."]
    metric_rows = [r for r in data["loss"] if r.get("metrics")]
    if metric_rows:
        lines += [
            "",
            "Penalties active (fraction of positions penalised, from the geometry loss's metrics): "
            + "; ".join(
                f"{r['variant']} V={r['vocab']:,}: KL {r['metrics']['positions_penalized_KL']:.2f}, "
                f"cal {r['metrics']['positions_penalized_cal']:.2f}, H {r['metrics']['positions_penalized_H']:.2f} "
                f"(KL mean {r['metrics']['KL_mean']:.3f})"
                for r in metric_rows
            )
            + ".",
        ]
    lines += [
        "",
        "## A) Ratios and targets",
        "",
        "| vocab | ratio | value | target | verdict |",
        "|---:|---|---:|---:|---|",
    ]
    for r in data["ratios"]:
        lines.append(f"| {r['vocab']:,} | {r['ratio']} | {fmt_ratio(r)} | ≤ {r['target']:g} | {r['verdict'] or '—'} |")
    lines += [
        "",
        "## B) Base-statistics pass",
        "",
        "| shape | logsumexp (ms) | compute_base_stats (ms) | straightforward (ms) | fused / logsumexp | target | verdict | straightforward / logsumexp |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s in data["base_stats"]:
        ratio = s["ratio_compute_base_stats_over_logsumexp"]
        verdict = "PASS" if ratio <= TARGETS["time_stats_over_logsumexp"] else "FAIL"
        lines.append(
            f"| [{s['rows']}, {s['vocab']:,}] | {s['logsumexp_s'] * 1e3:.1f} | {s['compute_base_stats_s'] * 1e3:.1f} | "
            f"{s['straightforward_s'] * 1e3:.1f} | {ratio:.2f} | ≤ {TARGETS['time_stats_over_logsumexp']:g} | {verdict} | "
            f"{s['ratio_straightforward_over_logsumexp']:.2f} |"
        )
    if data["base_stats"]:
        lines += [
            "",
            "Agreement of compute_base_stats with the straightforward version: "
            + "; ".join(
                f"V={s['vocab']:,}: max |Δlse| {s['agreement']['lse_max_abs_diff']:.1e}, "
                f"max |ΔH| {s['agreement']['entropy_max_abs_diff']:.1e}, top-k ids equal {s['agreement']['topk_ids_equal_fraction']:.4f}"
                for s in data["base_stats"]
            )
            + ".",
        ]
    lines += ["", "Raw numbers: `loss_memory.json`; plot: `loss_memory.png`.", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = data["config"]
    vocabs, limit = cfg["vocabs"], cfg["mem_limit_gib"]
    by = {(r["variant"], r["vocab"]): r for r in data["loss"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = dict(zip(VARIANTS, ("#4c72b0", "#55a868", "#8172b2", "#c44e52")))

    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        for j, vocab in enumerate(vocabs):
            r, x = by.get((variant, vocab), {}), j + (i - (len(VARIANTS) - 1) / 2) * width
            label = variant if j == 0 else None
            if r.get("exceeds_limit"):
                left.bar(x, limit, width, color="none", edgecolor=colors[variant], hatch="//", label=label)
                left.text(x, limit, f"did not fit\n(> {limit:g} GiB\nlimit)", ha="center", va="bottom", fontsize=7)
            elif "peak_increase_bytes" in r:
                value = r["peak_increase_bytes"] / GIB
                left.bar(x, value, width, color=colors[variant], label=label)
                left.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(vocabs)), [f"V = {v:,}" for v in vocabs])
    left.set_ylabel("peak RSS increase over inputs (GiB)")
    left.set_title(f"Loss forward+backward, {cfg['batch'] * (cfg['seq'] - 1):,} positions, float32")
    left.set_ylim(0, limit * 1.25)
    left.legend(fontsize=8, loc="upper left")

    stats = {s["vocab"]: s for s in data["base_stats"]}
    series = [
        ("geometry_cache / plain_ce", lambda v: by.get(("geometry_cache", v), {}).get("time_s"), lambda v: by.get(("plain_ce", v), {}).get("time_s")),
        ("geometry_live / plain_ce", lambda v: by.get(("geometry_live", v), {}).get("time_s"), lambda v: by.get(("plain_ce", v), {}).get("time_s")),
        ("note_sketch / plain_ce", lambda v: by.get(("note_sketch", v), {}).get("time_s"), lambda v: by.get(("plain_ce", v), {}).get("time_s")),
        ("compute_base_stats / logsumexp", lambda v: stats.get(v, {}).get("compute_base_stats_s"), lambda v: stats.get(v, {}).get("logsumexp_s")),
        ("straightforward stats / logsumexp", lambda v: stats.get(v, {}).get("straightforward_s"), lambda v: stats.get(v, {}).get("logsumexp_s")),
    ]
    width, top = 0.8 / len(series), 2.0
    palette = ("#55a868", "#8172b2", "#c44e52", "#dd8452", "#937860")
    for i, (name, num, den) in enumerate(series):
        for j, vocab in enumerate(vocabs):
            a, b = num(vocab), den(vocab)
            x = j + (i - (len(series) - 1) / 2) * width
            if a is None or not b:
                right.text(x, 0.05, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            right.bar(x, a / b, width, color=palette[i], label=name if j == 0 else None)
            top = max(top, a / b)
            right.text(x, a / b, f"{a / b:.2f}", ha="center", va="bottom", fontsize=7)
    right.axhline(TARGETS["time_geometry_over_plain"], color="k", ls="--", lw=1, label="target ≤ 2 (both time targets)")
    right.set_xticks(range(len(vocabs)), [f"V = {v:,}" for v in vocabs])
    right.set_ylabel("time ratio (min wall time)")
    right.set_title(f"Time ratios (loss: {cfg['batch'] * (cfg['seq'] - 1):,} pos.; stats: [{cfg['stats_rows']}, V])")
    right.set_ylim(0, top * 1.45)  # head room for the legend
    right.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Peak memory and time of GeometryAwareLoss vs plain cross-entropy and the note's sketch, "
        "and of compute_base_stats vs logsumexp. Writes loss_memory.{json,md,png}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 151936], help="vocabulary sizes")
    ap.add_argument("--batch", type=int, default=4, help="B of the [B, T, V] logits")
    ap.add_argument("--seq", type=int, default=1025, help="T of the [B, T, V] logits (B·(T−1) labelled positions)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="loss variants to run")
    ap.add_argument("--k", type=int, default=64, help="cached top-k")
    ap.add_argument("--m", type=int, default=8, help="cached tail samples")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of the loss (min is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up runs of the loss before timing")
    ap.add_argument("--mem-limit-gib", type=float, default=20.0, help="RLIMIT_AS of each loss worker, in GiB")
    ap.add_argument("--worker-timeout", type=float, default=1200.0, help="seconds before a loss worker is abandoned")
    ap.add_argument("--stats-rows", type=int, default=512, help="rows of the base-statistics logits")
    ap.add_argument("--stats-reps", type=int, default=5, help="timed repetitions of the base-statistics pass")
    ap.add_argument("--skip-stats", action="store_true", help="skip part B (base statistics)")
    ap.add_argument(
        "--cache-kl-threshold",
        type=float,
        default=0.0,
        help="KL threshold for geometry_cache only. Random base logits are near-uniform, so the top-k coarse-grained "
        "KL (a lower bound) is a few hundredths of a nat, under the default 0.15: this keeps its KL hinge active",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random logits and labels")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="where loss_memory.{json,md,png} go")
    ap.add_argument(
        "--replot", action="store_true", help="only re-render loss_memory.md and .png from the loss_memory.json in --out-dir"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    if args.replot:
        out = Path(args.out_dir)
        data = json.loads((out / "loss_memory.json").read_text())
        write_markdown(out / "loss_memory.md", data)
        write_plot(out / "loss_memory.png", data)
        print(f"re-rendered {out / 'loss_memory.md'} and {out / 'loss_memory.png'} from {out / 'loss_memory.json'}")
        return

    started = time.perf_counter()
    config = {key: (str(val) if isinstance(val, Path) else val) for key, val in vars(args).items() if key != "worker"}
    geo_cfg = GeometryConfig()
    config["geometry_config"] = geo_cfg.to_dict()
    prov = provenance()

    loss_results = []
    for vocab in args.vocabs:
        for variant in args.variants:
            params = {
                "variant": variant,
                "vocab": vocab,
                "batch": args.batch,
                "seq": args.seq,
                "k": args.k,
                "m": args.m,
                "reps": args.reps,
                "warmup": args.warmup,
                "seed": args.seed,
                "mem_limit_gib": args.mem_limit_gib,
                "cache_kl_threshold": args.cache_kl_threshold,
            }
            t0 = time.perf_counter()
            r = {"variant": variant, "vocab": vocab, **spawn_worker(Path(__file__).resolve(), params, args.worker_timeout)}
            r["worker_wall_s"] = time.perf_counter() - t0
            loss_results.append(r)
            if r.get("exceeds_limit"):
                summary = f"did not fit in {args.mem_limit_gib:g} GiB ({r.get('failed_in')})"
            elif "error" in r:
                summary = f"ERROR {r['error']}"
            else:
                summary = f"peak +{r['peak_increase_bytes'] / GIB:.2f} GiB, time {r['time_s']:.2f} s"
            print(f"[loss] {variant:>15} V={vocab:>7}: {summary}  ({r['worker_wall_s']:.0f} s)", flush=True)

    stats_results = []
    if not args.skip_stats:
        for vocab in args.vocabs:
            s = measure_base_stats(args.stats_rows, vocab, args.k, args.m, args.stats_reps, args.seed)
            stats_results.append(s)
            print(
                f"[stats] V={vocab:>7}: logsumexp {s['logsumexp_s'] * 1e3:.1f} ms, compute_base_stats "
                f"{s['compute_base_stats_s'] * 1e3:.1f} ms ({s['ratio_compute_base_stats_over_logsumexp']:.2f}x), "
                f"straightforward {s['straightforward_s'] * 1e3:.1f} ms",
                flush=True,
            )

    data = {
        "provenance": prov,
        "config": config,
        "targets": TARGETS,
        "loss": loss_results,
        "ratios": loss_ratios(loss_results, args.vocabs),
        "base_stats": stats_results,
    }
    data["total_runtime_s"] = time.perf_counter() - started
    data["loadavg_at_end"] = loadavg()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_memory.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(out / "loss_memory.md", data)
    write_plot(out / "loss_memory.png", data)
    for r in data["ratios"]:
        print(f"[ratio] V={r['vocab']:>7} {r['ratio']:<45} {fmt_ratio(r):>7} (target ≤ {r['target']:g}) {r['verdict'] or '—'}")
    print(f"wrote {out / 'loss_memory.json'}, {out / 'loss_memory.md'}, {out / 'loss_memory.png'} in {data['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
