"""CUDA / bf16 checks and GPU step timings for geocache, run on a lent GPU machine (never in CI).

Sections (CHECK_ONLY=a,b to run some): precompute on CUDA (float32, bfloat16) against a direct forward and
against a CPU build; the loss on CUDA against CPU (float32, bf16/fp16 logits, inside autocast); the compiled
loss (compile_loss) against the eager one (values, gradients, time, memory); short
training runs on CUDA (bf16, fp16, live, copy offloaded, activation checkpointing, the packed probe); plain vs
cache (compiled and eager loss) vs live step time and peak CUDA memory, interleaved, at a small and a mid shape,
float32 and bfloat16 weights (CHECK_ROUNDS rounds, default 12; CHECK_SHAPES, CHECK_VARIANTS to run some); the
loss's time inside small-shape steps (loss_in_step_small); precompute against a bare forward at issue 4's
Qwen3-0.6B shape and 2-layer cut (precompute_gpu) and the statistics pass alone (stats_pass_gpu). Results:
benchmarks/results/cuda_check.json and .md. CHECK_DEVICE=cpu CHECK_QUICK=1 is a dry run of the script.
"""

import functools
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):  # the script runs its checks as it loads
    print(__doc__.strip() + "\n\nusage: OUT=DIR [CHECK_ONLY=a,b] [CHECK_QUICK=1] [CHECK_DEVICE=cpu] python benchmarks/cuda_check.py")
    sys.exit(0)

import torch  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("CHECK_DEVICE", "cuda")  # cpu: a dry run of this script off the GPU machine
QUICK = bool(os.environ.get("CHECK_QUICK"))
RES = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV}
ROOT = Path(tempfile.mkdtemp())
dev = torch.device(DEV)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def save():
    (OUT / "gpu_check.json").write_text(json.dumps(RES, indent=1, default=str))


ONLY = [x for x in os.environ.get("CHECK_ONLY", "").split(",") if x]
ROUNDS = int(os.environ.get("CHECK_ROUNDS", "12"))
SHAPES = os.environ.get("CHECK_SHAPES", "small,mid").split(",")
VARIANTS = os.environ.get("CHECK_VARIANTS", "plain,cache,cache_eager,live,plain_bf16,cache_bf16").split(",")


def section(name):
    def deco(fn):
        if ONLY and name not in ONLY:
            return fn
        t = time.perf_counter()
        try:
            RES[name] = fn()
        except Exception as exc:
            RES[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[:6000]}
        RES.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(RES[name], default=str)[:1500], flush=True)
        save()
        return fn
    return deco


import transformers, peft  # noqa: E402

RES["transformers"], RES["peft"] = transformers.__version__, peft.__version__
from transformers import AutoModelForCausalLM  # noqa: E402

from geocache.data import DataConfig  # noqa: E402
from geocache.precompute import PrecomputeConfig, precompute  # noqa: E402
from geocache.testing import build_tiny_model, build_tokenizer  # noqa: E402

tok_dir = ROOT / "tok"
build_tokenizer(tok_dir)
models = {k: build_tiny_model(ROOT / k, k, tokenizer_dir=tok_dir) for k in ("qwen3_moe", "qwen3", "deepseek_v3")}
text = Path(torch.__file__).read_text()[:200_000]
rows = [{"text": text[i: i + 600]} for i in range(0, 60 * 600, 600)]
data = ROOT / "data.jsonl"
data.write_text("\n".join(json.dumps(r) for r in rows))


@section("precompute_cuda")
def _():
    from geocache.cache import open_cache
    from geocache.signals import labelled_positions

    out = {}
    for kind in ("qwen3_moe", "deepseek_v3"):
        for dtype in ("float32", "bfloat16"):
            c = ROOT / f"c-{kind}-{dtype}"
            precompute(PrecomputeConfig(model=str(models[kind]), data=[str(data)], out=str(c), k=16, m=4, device=DEV, dtype=dtype,
                                        progress=False, data_config=DataConfig(max_length=128), router="topk" if kind == "deepseek_v3" else "auto"))
            cache = open_cache(str(c))
            model = AutoModelForCausalLM.from_pretrained(models[kind], dtype=getattr(torch, dtype)).to(dev).eval()
            worst = 0.0
            for i in range(0, len(cache), 7):
                row = cache[i]
                with torch.no_grad():
                    logits = model(row["input_ids"][None].to(dev)).logits[0].float()
                rows_, _ = labelled_positions(row["labels"][None])
                worst = max(worst, (logits[rows_.to(dev)].logsumexp(-1).cpu() - row["lse"]).abs().max().item())
            out[f"{kind}/{dtype}"] = {"rows": len(cache), "max_lse_diff_vs_direct_forward": worst}
    # a CPU build of the same cache: the arrays agree to float rounding
    c_cpu = ROOT / "c-cpu"
    precompute(PrecomputeConfig(model=str(models["qwen3_moe"]), data=[str(data)], out=str(c_cpu), k=16, m=4, device="cpu", progress=False,
                                data_config=DataConfig(max_length=128)))
    a, b = open_cache(str(c_cpu)), open_cache(str(ROOT / "c-qwen3_moe-float32"))
    out["cpu_vs_cuda_float32"] = {
        "lse": max((a[i]["lse"] - b[i]["lse"]).abs().max().item() for i in range(len(a))),
        "topk_ids_equal_frac": sum(int(torch.equal(a[i]["topk_ids"], b[i]["topk_ids"])) for i in range(len(a))) / len(a),
    }
    return out


@section("loss_cuda_vs_cpu")
def _():
    from geocache import BaseStats, GeometryAwareLoss

    g = torch.Generator().manual_seed(0)
    V, B, T = (4096, 2, 64) if QUICK else (32768, 4, 256)
    base = torch.randn(B, T, V, generator=g) * 3
    tuned = base + 0.3 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    out = {}
    for est in ("topk_cv", "topk_tail", "topk_hybrid"):
        stats = BaseStats.from_logits(base, labels, k=32, m=16, generator=torch.Generator().manual_seed(1))
        fn = GeometryAwareLoss(kl_estimator=est, kl_threshold=0.0, final_kl_threshold=0.0)
        x = tuned.clone().requires_grad_()
        l_cpu, m_cpu = fn(x, stats, labels)
        (g_cpu,) = torch.autograd.grad(l_cpu, x)
        xc = tuned.to(dev).requires_grad_()
        l_gpu, m_gpu = fn(xc, stats.to(dev), labels.to(dev))
        (g_gpu,) = torch.autograd.grad(l_gpu, xc)
        r = {"loss_cpu": l_cpu.item(), "loss_gpu": l_gpu.item(), "grad_max_abs_diff": (g_gpu.cpu() - g_cpu).abs().max().item(),
             "grad_max": g_cpu.abs().max().item(), "KL_mean": [m_cpu["KL_mean"].item(), m_gpu["KL_mean"].item()]}
        for dt in (torch.bfloat16, torch.float16):  # half-precision logits (what autocast gives), fp16 with a GradScaler-like scale
            xh = tuned.to(dev, dt).requires_grad_()
            lh, _ = fn(xh, stats.to(dev), labels.to(dev))
            (gh,) = torch.autograd.grad(lh * 1024.0, xh)
            r[str(dt)] = {"loss": lh.item(), "grad_rel_err": ((gh.float() / 1024.0).cpu() - g_cpu).norm().item() / g_cpu.norm().item(),
                          "finite": bool(torch.isfinite(gh).all())}
        with torch.autocast(DEV, dtype=torch.bfloat16):
            la, _ = fn(xc, stats.to(dev), labels.to(dev))
        r["inside_autocast_minus_outside"] = la.item() - l_gpu.item()
        out[est] = r
    return out


def _train(kind, cache, out, **kw):
    from geocache.train import TrainConfig, train

    tr = train(TrainConfig(model=str(models[kind]), cache=str(cache), out=str(out), max_steps=8, logging_steps=1, learning_rate=1e-2,
                           lora_r=4, progress=False, save_steps=100, **kw))
    return [r["loss"] for r in tr.state.log_history if "loss" in r], tr


@section("fused_loss_cuda")
def _():
    """compile_loss on CUDA against the eager pass: values, gradients, time and peak memory of the
    loss alone (forward + backward), float32 and bfloat16 logits, at a small and a large shape."""
    from geocache import BaseStats, GeometryAwareLoss

    out = {}
    shapes = {"V32768_N1024": (32768, 4, 256), "V151936_N8192": (151936, 8, 1024)}
    for name, (V, B, T) in shapes.items():
        if QUICK:
            V, B, T = 4096, 2, 64
        g = torch.Generator(device=dev).manual_seed(0)
        base = torch.randn(B, T, V, generator=g, device=dev) * 3
        tuned = base + 0.3 * torch.randn(B, T, V, generator=g, device=dev)
        labels = torch.randint(0, V, (B, T), generator=g, device=dev)
        labels[:, :T // 4] = -100  # a prompt: a quarter of the rows unlabelled
        stats = BaseStats.from_logits(base, labels, k=64, m=8, generator=g)
        del base
        res = {}
        for dt in (torch.float32, torch.bfloat16):
            x0 = tuned.to(dt)
            per = {}
            for compiled in (False, True):
                fn = GeometryAwareLoss(compile_loss=compiled, kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0)
                x = x0.clone().requires_grad_()
                t = time.perf_counter()
                loss, m = fn(x, stats, labels)
                (gr,) = torch.autograd.grad(loss, x)
                sync()
                first = time.perf_counter() - t
                times = []
                for _ in range(3 if QUICK else 10):
                    sync()
                    t = time.perf_counter()
                    loss, m = fn(x, stats, labels)
                    (gr,) = torch.autograd.grad(loss, x)
                    sync()
                    times.append(time.perf_counter() - t)
                peak = float("nan")
                if DEV == "cuda":
                    del gr
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()
                    loss, m = fn(x, stats, labels)
                    (gr,) = torch.autograd.grad(loss, x)
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - resident) / 2**20
                per[compiled] = {"loss": loss.item(), "KL_mean": m["KL_mean"].item(), "first_call_s": first,
                                 "median_ms": sorted(times)[len(times) // 2] * 1e3, "peak_MiB_over_inputs": peak, "grad": gr}
            ge, gc = per[False].pop("grad"), per[True].pop("grad")
            res[str(dt).replace("torch.", "")] = {
                "eager": per[False], "compiled": per[True], "speedup": per[False]["median_ms"] / per[True]["median_ms"],
                "loss_abs_diff": abs(per[False]["loss"] - per[True]["loss"]),
                "grad_max_abs_diff": (ge.float() - gc.float()).abs().max().item(), "grad_max_abs": ge.float().abs().max().item(),
                "grad_bitwise_equal": bool(torch.equal(ge, gc))}
            del ge, gc, x0
        out[name] = res
        del tuned, stats
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return out


@section("train_cuda")
def _():
    c = ROOT / "c-qwen3_moe-float32"
    if not c.exists():  # precompute_cuda was not run (CHECK_ONLY)
        precompute(PrecomputeConfig(model=str(models["qwen3_moe"]), data=[str(data)], out=str(c), k=16, m=4, device=DEV, progress=False,
                                    data_config=DataConfig(max_length=128)))
    out = {}
    fp32, tr = _train("qwen3_moe", c, ROOT / "r32")
    out["device"] = str(tr.args.device)
    out["fp32"] = fp32
    for name, kw in (("bf16", dict(bf16=True)), *((("fp16", dict(fp16=True)),) if DEV == "cuda" else ()), ("live_fp32", dict(base="live")),
                     ("copy_offload", dict(base="copy", offload_base=True)), ("grad_ckpt", dict(gradient_checkpointing=True))):
        losses, tr = _train("qwen3_moe", c, ROOT / f"r-{name}", **kw)
        out[name] = {"losses": losses, "max_rel_vs_fp32": max(abs(a - b) / abs(b) for a, b in zip(losses, fp32)),
                     "finite": all(math.isfinite(x) for x in losses)}
    # a packed cache on CUDA (sdpa): the probe passes and the tuned lse at init equals the cached one
    from geocache.base import check_packed_attention

    m = AutoModelForCausalLM.from_pretrained(models["qwen3_moe"]).to(dev)
    check_packed_attention(m)
    mb = AutoModelForCausalLM.from_pretrained(models["qwen3_moe"], dtype=torch.bfloat16).to(dev)
    check_packed_attention(mb)
    out["packed_probe"] = {"attn": m.config._attn_implementation, "float32_and_bf16_pass": True}
    return out


@section("step_timing_gpu")
def _():
    """plain DoRA SFT vs cache vs live, interleaved, on the GPU: step time and peak memory."""
    from transformers import Trainer, TrainingArguments

    from geocache.base import CacheBase, LiveBase
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.config import GeometryConfig
    from geocache.testing import tiny_config
    from geocache.trainer import GeometryTrainer, add_dora_adapter

    shapes = {
        "small": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=64, vocab_size=32768, seq=256, batch=4),
        "mid": dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=64, vocab_size=151936, num_experts=16, seq=1024, batch=8),
    }
    res = {}
    for shape, kw in shapes.items():
        if (QUICK and shape != "small") or shape not in SHAPES:
            continue
        seq, batch = kw.pop("seq"), kw.pop("batch")
        tokd = ROOT / f"tok-{shape}"
        tok = build_tokenizer(tokd, vocab_size=4096)
        torch.manual_seed(0)
        cfg = tiny_config("qwen3_moe", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=seq,
                          **{"num_experts": 8, "num_experts_per_tok": 2, **kw})
        md = ROOT / f"m-{shape}"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(md)
        tok.save_pretrained(md)
        d = ROOT / f"d-{shape}.jsonl"
        big = Path(torch.__file__).parent.joinpath("nn", "modules", "module.py").read_text() * 4
        d.write_text("\n".join(json.dumps({"text": big[i: i + 6 * seq]}) for i in range(0, 6 * seq * 64, 6 * seq)))
        c = ROOT / f"cache-{shape}"
        t0 = time.perf_counter()
        precompute(PrecomputeConfig(model=str(md), data=[str(d)], out=str(c), k=64, m=8, device=DEV, progress=False,
                                    data_config=DataConfig(max_length=seq)))
        res[f"{shape}_precompute_s"] = time.perf_counter() - t0
        cache = open_cache(str(c))
        batches = [{k: (v.to(dev) if hasattr(v, "to") else v) for k, v in collate_cache_rows([cache[(i * batch + j) % len(cache)] for j in range(batch)]).items()}
                   for i in range(6)]
        steps, warm = {}, {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            # *_bf16: the model's weights (and so its logits) in bfloat16, as a bf16 run holds them
            dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
            model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(md, dtype=dtype).to(dev), r=16, alpha=32)
            from geocache.models import no_hub_kernels_offline

            no_hub_kernels_offline(model)  # the same torch layers for every variant (plain Trainer has no guard)
            args = TrainingArguments(output_dir=str(ROOT / "t"), report_to=[], remove_unused_columns=False, per_device_train_batch_size=batch)
            if variant.startswith("plain"):
                trainer = Trainer(model=model, args=args, train_dataset=cache, data_collator=collate_cache_rows)
            else:
                # cache_eager: the loss's eager chunked pass (compile_loss=False); cache/live: the default (compiled on CUDA)
                geometry = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0,
                                          compile_loss=False if variant == "cache_eager" else None)
                trainer = GeometryTrainer(model=model, args=args, train_dataset=cache, geometry_config=geometry,
                                          base=LiveBase(want_router=True) if variant == "live" else CacheBase())
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
            trainer.current_gradient_accumulation_steps = 1
            model.train()

            def step(i, variant=variant, trainer=trainer, model=model, opt=opt):
                b = batches[i % len(batches)]
                inputs = {k: v for k, v in b.items() if not variant.startswith("plain") or k in ("input_ids", "attention_mask", "labels")}
                trainer.training_step(model, inputs)
                opt.step()
                opt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            for i in range(3):  # the first steps compile the loss's kernels (cache, live, cache_bf16)
                step(i)
            sync()
            warm[variant] = time.perf_counter() - t
            steps[variant] = (step, model)
        times = {v: [] for v in steps}
        nv = len(steps)
        for r in range(2 if QUICK else ROUNDS):
            for v in (list(steps)[r % nv:] + list(steps)[: r % nv]):
                step, _ = steps[v]
                step(0)
                sync()
                t = time.perf_counter()
                for i in range(1, 5):
                    step(i)
                sync()
                times[v].append((time.perf_counter() - t) / 4)
        med = {v: sorted(x)[len(x) // 2] for v, x in times.items()}
        peaks = {}
        for v, (step, _) in steps.items():
            sync()
            if DEV != "cuda":
                peaks[v] = float("nan")
                continue
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(1)
            sync()
            peaks[v] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        ratio = lambda a, b, d=med: d[a] / d[b] if a in d and b in d else None  # noqa: E731
        res[shape] = {"step_s_median": med, "cache_over_plain": ratio("cache", "plain"), "live_over_cache": ratio("live", "cache"),
                      "cache_eager_over_plain": ratio("cache_eager", "plain"), "cache_bf16_over_plain_bf16": ratio("cache_bf16", "plain_bf16"),
                      "paired_cache_over_plain": sorted(c / p for c, p in zip(times["cache"], times["plain"]))[len(times["plain"]) // 2]
                      if "cache" in times and "plain" in times else None,
                      "peak_MiB_over_resident": peaks, "mem_cache_over_plain": ratio("cache", "plain", peaks),
                      "mem_cache_bf16_over_plain_bf16": ratio("cache_bf16", "plain_bf16", peaks), "tokens_per_step": seq * batch,
                      "rounds": 2 if QUICK else ROUNDS, "warmup_s": warm}
        del steps
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return res


@section("loss_in_step_small")
def _():
    """Why the compiled loss made the small shape's step slower (launch-bound): the loss call's
    host time (no sync) and its time to completion (synced before and after), inside real
    training steps, compiled vs eager, alternating; and the whole step's median beside them."""
    from transformers import TrainingArguments

    from geocache.base import CacheBase
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.config import GeometryConfig
    from geocache.models import no_hub_kernels_offline
    from geocache.trainer import GeometryTrainer, add_dora_adapter

    md, c = ROOT / "m-small", ROOT / "cache-small"
    cache = open_cache(str(c))
    batches = [{k: (v.to(dev) if hasattr(v, "to") else v) for k, v in collate_cache_rows([cache[(i * 4 + j) % len(cache)] for j in range(4)]).items()}
               for i in range(6)]
    runs = {}
    for name, compiled in (("eager", False), ("compiled", None)):
        torch.manual_seed(0)
        model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(md).to(dev), r=16, alpha=32)
        no_hub_kernels_offline(model)
        geometry = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0, compile_loss=compiled)
        trainer = GeometryTrainer(model=model, args=TrainingArguments(output_dir=str(ROOT / f"b-{name}"), report_to=[], remove_unused_columns=False),
                                  train_dataset=cache, geometry_config=geometry, base=CacheBase())
        trainer.current_gradient_accumulation_steps = 1
        model.train()
        loss_fn = trainer.geometry_loss
        inner = loss_fn.forward
        rec = {"host_ms": [], "synced_ms": [], "mode": "host"}

        def timed(*a, inner=inner, rec=rec, **k):
            if rec["mode"] == "synced":
                sync()
            t = time.perf_counter()
            out = inner(*a, **k)
            if rec["mode"] == "synced":
                sync()
            rec[f"{rec['mode']}_ms"].append((time.perf_counter() - t) * 1e3)
            return out

        loss_fn.forward = timed
        for i in range(4):
            trainer.training_step(model, batches[i % 6])
        sync()
        rec["host_ms"].clear()
        runs[name] = (trainer, model, rec)
    steps = {n: [] for n in runs}
    for r in range(2 if QUICK else 10):
        for n, (trainer, model, rec) in runs.items():
            for mode in ("host", "synced"):
                rec["mode"] = mode
                sync()
                t = time.perf_counter()
                for i in range(3):
                    trainer.training_step(model, batches[i])
                sync()
                if mode == "host":
                    steps[n].append((time.perf_counter() - t) / 3 * 1e3)
    # the step in phases, each synced: compute_loss (forward, base, loss, router term), then backward
    phases = {n: {"compute_loss_ms": [], "backward_ms": []} for n in runs}
    for r in range(2 if QUICK else 20):
        for n, (trainer, model, rec) in runs.items():
            rec["mode"] = "host"
            b = batches[r % 6]
            sync()
            t = time.perf_counter()
            loss = trainer.compute_loss(model, b)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            phases[n]["compute_loss_ms"].append((t1 - t) * 1e3)
            phases[n]["backward_ms"].append((t2 - t1) * 1e3)
    med = lambda x: sorted(x)[len(x) // 2]  # noqa: E731
    return {n: {"step_ms": med(steps[n]), "loss_host_ms": med(rec["host_ms"]), "loss_synced_ms": med(rec["synced_ms"]),
                **{k: med(v) for k, v in phases[n].items()}} for n, (_, _, rec) in runs.items()}


@section("precompute_gpu")
def _():
    """Issue 4's precompute overhead on the GPU: precompute's forward + statistics time against a
    bare forward (no_grad, use_cache=False, synced at the end) over the same padded batches, read
    back from its cache, at the Qwen3-0.6B shape and its 2-layer cut (random weights), bfloat16.
    Each is run twice in this process and the second run kept (the first pays CUDA/cuBLAS set-up)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from precompute import QWEN3_06B  # noqa: E402  (benchmarks/precompute.py's shapes)
    from transformers import AutoConfig

    from geocache.cache import collate_cache_rows, open_cache
    from geocache.models import load_model_and_tokenizer

    seq, n_seq, batch = (128, 8, 4) if QUICK else (1024, 128, 8)
    tok = build_tokenizer(ROOT / "tok-pre", vocab_size=4096)
    big = Path(torch.__file__).parent.joinpath("nn", "modules", "module.py").read_text() * 8
    d = ROOT / "d-pre.jsonl"
    d.write_text("\n".join(json.dumps({"text": big[i: i + 6 * seq]}) for i in range(0, 6 * seq * n_seq, 6 * seq)))
    out = {"tokens_per_batch": seq * batch, "sequences": n_seq, "dtype": "bfloat16", "k": 64, "m": 8}
    for shape, layers in (("qwen3-0.6b", QWEN3_06B["num_hidden_layers"]), ("qwen3-0.6b-2l", 2)):
        kw = {**QWEN3_06B, "num_hidden_layers": 2 if QUICK else layers}
        if QUICK:
            kw.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=8192)
        cfg = AutoConfig.for_model("qwen3", **kw, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
        md = ROOT / f"m-{shape}"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(md)
        tok.save_pretrained(md)
        runs = {"compiled": [], "eager": []}  # compile_stats: its default on CUDA, and off; taking turns
        for rep in range(2):
            for variant, runs_of in runs.items():
                c = ROOT / f"c-{shape}-{variant}-{rep}"
                timings = {}
                precompute(PrecomputeConfig(model=str(md), data=[str(d)], out=str(c), k=64, m=8, device=DEV, dtype="bfloat16", batch_size=batch,
                                            progress=False, compile_stats=variant == "compiled", data_config=DataConfig(max_length=seq)),
                           timings=timings)
                runs_of.append(timings)
        model, tk = load_model_and_tokenizer(str(md), dtype="bfloat16", device=DEV)
        cache = open_cache(str(ROOT / f"c-{shape}-compiled-1"))
        batches = []
        for start in range(0, len(cache), batch):
            b = collate_cache_rows([cache[i] for i in range(start, min(start + batch, len(cache)))], pad_token_id=tk.pad_token_id)
            batches.append((b["input_ids"].to(dev), b["attention_mask"].to(dev)))
        bare = []
        for _ in range(2):
            sync()
            t = time.perf_counter()
            for ids, mask in batches:
                with torch.no_grad():
                    o = model(input_ids=ids, attention_mask=mask, use_cache=False)
                del o
            sync()
            bare.append(time.perf_counter() - t)
        out[shape] = {"bare_forward_s": bare, "batches": len(batches), "target": 1.05 if shape == "qwen3-0.6b" else 1.3}
        for variant, runs_of in runs.items():  # the second run of each (the first pays set-up and compiling)
            loop = runs_of[-1].get("forward_s", float("nan")) + runs_of[-1].get("statistics_s", float("nan"))
            out[shape][variant] = {"precompute_timings_runs": runs_of, "forward_plus_statistics_s": loop, "ratio_to_bare": loop / min(bare)}
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return out


@section("stats_pass_gpu")
def _():
    """Where precompute's statistics pass spends its time on the GPU: ``compute_base_stats`` on
    bfloat16 logits at V = 151,936, one sequence's rows (1,023) per call as precompute calls it
    (default chunks) and variants (one chunk, no tail samples, a whole batch's 8,184 rows in one
    call), synced; and a profile of 8 per-sequence calls (one batch), by CUDA and CPU time."""
    from geocache.signals import compute_base_stats, default_chunk_rows

    V, P = (8192, 255) if QUICK else (151936, 1023)
    g = torch.Generator(device=dev).manual_seed(0)
    batch = (torch.randn(8 * P, V, generator=g, device=dev) * 4).to(torch.bfloat16)
    seqs = batch.split(P)

    def timed(fn, reps=5):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e3

    gens = [torch.Generator(device=dev).manual_seed(i) for i in range(8)]
    res = {"default_chunk_rows": default_chunk_rows(V, dev, P), "rows_per_sequence": P, "vocab": V}
    eager = functools.partial(compute_base_stats, compiled=False)  # the eager pass, as measured before compile_stats
    res["per_sequence_default_ms_per_batch"] = timed(lambda: [eager(x, k=64, m=8, generator=gg) for x, gg in zip(seqs, gens)])
    res["per_sequence_one_chunk_ms_per_batch"] = timed(lambda: [eager(x, k=64, m=8, generator=gg, chunk_size=P) for x, gg in zip(seqs, gens)])
    res["per_sequence_m0_ms_per_batch"] = timed(lambda: [eager(x, k=64, m=0) for x in seqs])
    res["whole_batch_one_call_ms"] = timed(lambda: eager(batch, k=64, m=8, generator=gens[0], chunk_size=8 * P))
    res["whole_batch_m0_ms"] = timed(lambda: eager(batch, k=64, m=0, chunk_size=8 * P))
    res["whole_batch_default_chunks_ms"] = timed(lambda: eager(batch, k=64, m=8, generator=gens[0]))
    res["per_sequence_default_plus_cpu_copies_ms"] = timed(lambda: [
        eager(x, k=64, m=8, generator=gg).to("cpu") for x, gg in zip(seqs, gens)])
    # compile_stats (the default on CUDA): the dense work as one torch.compile'd reduction
    fused = functools.partial(compute_base_stats, compiled=True)
    res["compiled_per_sequence_ms_per_batch"] = timed(lambda: [fused(x, k=64, m=8, generator=gg) for x, gg in zip(seqs, gens)])
    res["compiled_whole_batch_ms"] = timed(lambda: fused(batch, k=64, m=8, generator=gens[0]))
    res["compiled_whole_batch_m0_ms"] = timed(lambda: fused(batch, k=64, m=0))
    a, b = eager(batch, k=64, m=8, generator=gens[0].manual_seed(0)), fused(batch, k=64, m=8, generator=gens[0].manual_seed(0))
    res["compiled_vs_eager"] = {"max_abs_lse": (a.lse - b.lse).abs().max().item(), "max_abs_entropy": (a.entropy - b.entropy).abs().max().item(),
                                "topk_ids_equal": bool(torch.equal(a.topk_ids, b.topk_ids)),
                                "sample_ids_equal_fraction": (a.sample_ids == b.sample_ids).float().mean().item()}
    z = batch.float()
    res["bare_logsumexp_float32_ms"] = timed(lambda: z.logsumexp(-1))
    res["bare_topk64_ms"] = timed(lambda: z.topk(64, dim=-1))
    del z
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    for name, fn in (("profile_stats_pass.txt", eager), ("profile_stats_pass_compiled.txt", fused)):
        with profile(activities=acts) as prof:
            for x, gg in zip(seqs, gens):
                fn(x, k=64, m=8, generator=gg)
            sync()
        ka = prof.key_averages()
        (OUT / name).write_text(ka.table(sort_by="self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total", row_limit=30)
                                + "\n\n" + ka.table(sort_by="self_cpu_time_total", row_limit=30))
    return res


@section("sync_sources")
def _():
    """Where one cache-mode training step makes the host wait for the GPU (torch's sync debug
    mode, one warning per synchronizing call, counted by the geocache or transformers line that
    made it), and the profiler's top host-side operations of that step."""
    import collections
    import warnings

    from transformers import TrainingArguments

    from geocache.base import CacheBase
    from geocache.cache import collate_cache_rows, open_cache
    from geocache.config import GeometryConfig
    from geocache.models import no_hub_kernels_offline
    from geocache.trainer import GeometryTrainer, add_dora_adapter

    md, c = ROOT / "m-small", ROOT / "cache-small"
    cache = open_cache(str(c))
    batch = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in collate_cache_rows([cache[j] for j in range(4)]).items()}
    model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(md).to(dev), r=16, alpha=32)
    no_hub_kernels_offline(model)
    geometry = GeometryConfig(kl_threshold=0.0, final_kl_threshold=0.0, dh_threshold=0.0, cal_threshold=0.0)
    trainer = GeometryTrainer(model=model, args=TrainingArguments(output_dir=str(ROOT / "s"), report_to=[], remove_unused_columns=False),
                              train_dataset=cache, geometry_config=geometry, base=CacheBase())
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    for _ in range(3):
        trainer.training_step(model, batch)
    sync()
    where = collections.Counter()
    if DEV == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.training_step(model, batch)
        sync()
    if DEV == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    import traceback as tb

    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            trainer.training_step(model, batch)
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (OUT / "profile_cache_step.txt").write_text(table + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total", row_limit=25))
    return {"sync_calls": sum(where.values()), "by_line": where.most_common(40)}


print("done", flush=True)
