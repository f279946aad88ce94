"""``geocache profile``: V2 set-boundary redundancy per MoE layer, a calibration profile per domain,
the design note's classification and strategy, and a recommended training config.

Reads top to bottom: load the model (and an adapter or tuned model for drift) → per domain, stream
batches once: a pre-hook on every MoE block captures its input, and each block's own router and
experts give the margins and κ's of the attended tokens (``geocache.moe.v2_tokens``), kept in a
bounded per-layer reservoir; the logits give entropy, NLL and top-1 confidence of every labelled
position (running sums and 15 ECE bins, plus an entropy reservoir for quantiles) → C1/C2 with
bootstrap intervals per layer and aggregated → classify → write ``profile.json``, ``profile.md``,
``profile.png`` and ``recommended.yaml``. The format is in ``docs/profile-format.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from geocache.config import check_option_types, one_line
from geocache.v2 import StrataConfig, TokenReservoir, v2_statistics

PROFILE_VERSION = 1
ECE_BINS = 15

# The design note's table ("Training strategy by base type"), keyed by classification.
CLASSES = {
    (True, True): ("both-pass", "Both C1 and C2 hold: routing is locally redundant and distinct; tune normally and monitor both."),
    (True, False): ("deepseek-like", "Strong C1, weak C2: protect C1 aggressively; consider a C2 auxiliary loss."),
    (False, True): ("qwen-like", "Weak C1, strong C2: C2 is naturally stable; monitor C1 erosion."),
    (False, False): ("both-weak", "Both weak: consider continued pretraining before SFT."),
}


@dataclass
class ProfileConfig:
    model: str = field(metadata={"help": "Model: local directory or hub id."})
    data: list[str] = field(metadata={"help": "Data per domain: PATH or NAME=PATH."})
    out: str = field(metadata={"help": "Output directory."})
    adapter: Optional[str] = field(default=None, metadata={"help": "A trained adapter: also report drift against the base."})
    tuned: Optional[str] = field(default=None, metadata={"help": "A tuned full model: also report drift against the base."})
    max_length: int = field(default=512, metadata={"help": "Tokens per sequence."})
    max_sequences: int = field(default=256, metadata={"help": "Sequences per domain."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward."})
    boundary_q: float = field(default=0.10, metadata={"help": "Boundary tokens: routing margin below this quantile."})
    interior_q: float = field(default=0.50, metadata={"help": "Interior tokens: routing margin above this quantile."})
    boundary_abs: Optional[float] = field(default=None, metadata={"help": "Boundary: absolute margin threshold (overrides the quantile)."})
    interior_abs: Optional[float] = field(default=None, metadata={"help": "Interior: absolute margin threshold (overrides the quantile)."})
    reservoir_tokens: int = field(default=200_000, metadata={"help": "Tokens kept per layer and domain (uniform sample) for the statistics."})
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples (percentile intervals)."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    device: Optional[str] = field(default=None, metadata={"help": "Device (default: cuda when available)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random expert picks and the bootstrap."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar per domain (sequences, tokens/s, ETA)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a profile already in --out (once the new one is written; until then it stays)."})

    def __post_init__(self) -> None:
        check_option_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("profile needs at least one --data domain")
        if self.adapter and self.tuned:
            raise ValueError("--adapter and --tuned both name the tuned model: give one")
        for name in ("max_length", "max_sequences", "batch_size", "reservoir_tokens", "n_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        self.strata = StrataConfig(self.boundary_q, self.interior_q, self.boundary_abs, self.interior_abs)
        self.domains()  # names checked up front

    def domains(self) -> dict[str, str]:
        out = {}
        for spec in self.data:
            named = "=" in spec and not Path(spec).exists()
            name, path = spec.split("=", 1) if named else (Path(spec).stem, spec)
            if name in out:
                raise ValueError(f"domain name {name!r} is given twice: " + ("give each domain its own NAME" if named else
                                 f"two files are named {Path(spec).stem!r}: name them with NAME=PATH"))
            out[name] = path
        return out


class _Calibration:
    """Running calibration statistics of labelled positions: means, 15 equal-width top-1 ECE bins
    (hand-written: torchmetrics' calibration error keeps every sample, and this streams), and a
    reservoir of entropies for quantiles."""

    def __init__(self, seed: int, capacity: int):
        self.n = 0
        self.sums = {"entropy": 0.0, "nll": 0.0, "cal_gap": 0.0, "correct": 0.0}
        self.bins = np.zeros((ECE_BINS, 3))  # count, Σ confidence, Σ correct
        self.entropy = TokenReservoir(capacity, 1, seed)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """``logits [N, V]`` (or ``[M, V]`` with ``rows [N]`` picking the labelled ones) and targets ``[N]``.
        One fused pass (``compute_base_stats`` with k = 1) gives logsumexp, entropy and the top-1."""
        from geocache.signals import compute_base_stats

        if len(targets) == 0:
            return
        st = compute_base_stats(logits, 1, 0, rows=rows)
        rows = torch.arange(len(targets), device=logits.device) if rows is None else rows
        ent = st.entropy
        nll = st.lse - logits[rows, targets].float()
        conf, correct = st.topk_logprobs[:, 0].exp(), (st.topk_ids[:, 0] == targets).float()
        self.n += len(targets)
        for key, v in (("entropy", ent), ("nll", nll), ("cal_gap", nll - ent), ("correct", correct)):
            self.sums[key] += v.double().sum().item()
        b = (conf * ECE_BINS).ceil().clamp(1, ECE_BINS).long() - 1  # bins (lo, hi], as torchmetrics
        for j, vals in enumerate((torch.ones_like(conf), conf, correct)):
            self.bins[:, j] += torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, b.cpu(), vals.double().cpu()).numpy()
        self.entropy.add(ent.cpu().numpy(), np.zeros(len(ent), dtype=np.int64))

    def result(self) -> dict:
        nan = float("nan")
        count, conf, acc = self.bins.T
        ent = self.entropy.arrays()[0][:, 0]
        q = np.quantile(ent, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist() if len(ent) else [nan] * 5
        means = {k: (v / self.n if self.n else nan) for k, v in self.sums.items()}
        return {
            "positions": self.n,
            "entropy_mean": means["entropy"],
            "entropy_quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"), q)),
            "nll_mean": means["nll"],
            "calibration_gap_mean": means["cal_gap"],
            "top1_accuracy": means["correct"],
            "ece_top1": float(np.sum(np.abs(acc - conf)) / self.n) if self.n else nan,  # Σ_b n_b/N · |acc_b − conf_b|
            "ece_bins": {"count": count.astype(int).tolist(), "confidence": (conf / np.maximum(count, 1)).tolist(),
                         "accuracy": (acc / np.maximum(count, 1)).tolist()},
        }


def _batches(tokenizer, path: str, cfg: ProfileConfig):
    from geocache.data import DataConfig, iter_sequences, load_examples

    dcfg = DataConfig(max_length=cfg.max_length, max_sequences=cfg.max_sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = []
    for seq in iter_sequences(load_examples(path), tokenizer, dcfg):
        batch.append(seq)
        if len(batch) == cfg.batch_size:
            yield _pad(batch, pad)
            batch = []
    if batch:
        yield _pad(batch, pad)


def _pad(seqs, pad: int) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], labels[b, : len(s)], mask[b, : len(s)] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _V2Hooks:
    """Forward pre-hooks on a model's MoE blocks that measure V2 on each block's input as the
    forward passes through it (so the routing and experts measured are the ones in force then:
    a PEFT adapter's, or with it disabled, the base's), keeping only the attended tokens."""

    def __init__(self, blocks, generator: torch.Generator):
        from geocache.moe import v2_tokens

        self.attended: Optional[torch.Tensor] = None
        self.results: dict[int, dict] = {}

        def hook(module, args, kwargs, i):
            x = args[0] if args else kwargs["hidden_states"]
            self.results[i] = v2_tokens(module, x.reshape(-1, x.shape[-1])[self.attended], generator=generator)

        self.handles = [block.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True) for i, block in blocks]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_matrix(results: dict[int, dict], layers: list[int], key: str) -> np.ndarray:
    return torch.stack([results[i][key].float().cpu() for i in layers], 1).numpy()


@torch.no_grad()
def measure_domain(model, tokenizer, path: str, cfg: ProfileConfig, tuned=None, calibration: bool = True, progress: bool = False,
                   name: str = "") -> dict:
    """One pass over a domain's data: V2 of every MoE layer (a token reservoir shared by the layers)
    and the calibration profile of ``model`` (a model, or ``_AdapterOff`` of a PEFT model). With
    ``tuned`` (a second model, or the same PEFT model, adapter on), the same for the tuned model and,
    per layer, its top-k Jaccard against the base beside the base's routing margin."""
    from geocache.losses import router_jaccard
    from geocache.moe import moe_blocks
    from geocache.signals import labelled_positions

    def unwrap(fwd):
        return getattr(fwd, "wrapped", fwd)

    runs = [("base", model)] + ([("tuned", tuned)] if tuned is not None else [])
    blocks = {name: moe_blocks(unwrap(fwd)) for name, fwd in runs}
    layers = [i for i, _ in blocks["base"]]
    if tuned is not None and [i for i, _ in blocks["tuned"]] != layers:
        raise ValueError(f"the tuned model's MoE layers {[i for i, _ in blocks['tuned']]} differ from the base's {layers}")
    device = next(unwrap(model).parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    hooks = {"base": _V2Hooks(blocks["base"], gen)} if layers else {}
    if layers and tuned is not None and unwrap(tuned) is not unwrap(model):  # one PEFT model: its hooks serve both runs
        hooks["tuned"] = _V2Hooks(blocks["tuned"], gen)
    width = 3 * len(layers)
    v2 = {name: TokenReservoir(cfg.reservoir_tokens, max(width, 1), cfg.seed) for name, _ in runs}
    drift = TokenReservoir(cfg.reservoir_tokens, max(2 * len(layers), 1), cfg.seed) if tuned is not None else None
    calib = {name: _Calibration(cfg.seed, cfg.reservoir_tokens) for name, _ in runs} if calibration else {}
    tokens = n_seq = 0
    from tqdm.auto import tqdm

    # total: the cap (a domain with fewer rows ends early); ETA from it, tokens/s beside
    bar = tqdm(total=cfg.max_sequences, unit="seq", desc=f"profile {name}".strip(), disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for batch in _batches(tokenizer, path, cfg):
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            attended = batch["attention_mask"].bool().flatten().to(device)
            seq = (n_seq + torch.arange(batch["input_ids"].shape[0])).repeat_interleave(batch["input_ids"].shape[1])[attended.cpu()].numpy()
            rows, targets = labelled_positions(batch["labels"].to(device))
            per_run = {}
            for name, fwd in runs:
                h = hooks.get(name, hooks.get("base"))
                if h is not None:
                    h.attended, h.results = attended, {}
                # The random comparison experts of C2, drawn alike for the base and the tuned run of
                # a batch: a tuned model equal to its base measures exactly what the base does.
                gen.manual_seed(cfg.seed * 1_000_003 + n_seq)
                out = fwd(**inputs, use_cache=False)
                if calibration:
                    calib[name].add(out.logits.reshape(-1, out.logits.shape[-1]), targets, rows)
                if layers:
                    per_run[name] = dict(h.results)
                    cols = [_layer_matrix(per_run[name], layers, k) for k in ("margin", "kappa_next", "kappa_rand")]
                    v2[name].add(np.concatenate(cols, 1), seq)
            if drift is not None and layers:
                jac = [router_jaccard(per_run["base"][i]["selected"], per_run["tuned"][i]["selected"]).float().cpu() for i in layers]
                drift.add(np.concatenate([_layer_matrix(per_run["base"], layers, "margin"), torch.stack(jac, 1).numpy()], 1), seq)
            tokens += int(attended.sum())
            n_seq += batch["input_ids"].shape[0]
            bar.update(batch["input_ids"].shape[0])
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
    finally:
        bar.close()
        for h in hooks.values():
            h.remove()
    if tokens == 0:
        raise ValueError(f"data {path!r} gave no tokens to profile (empty, or every row filtered out)")
    return {"tokens": tokens, "sequences": n_seq, "blocks": layers, "v2": v2, "drift": drift,
            "calibration": {name: c.result() for name, c in calib.items()}}


def v2_summary(layer_ids: list[int], reservoir: TokenReservoir, cfg: ProfileConfig) -> dict:
    """Per layer C1/C2 and the aggregates (plain mean and mid-band weighted) of one model on one domain."""
    from geocache.losses import midband_layer_weights

    data, seq = reservoir.arrays()
    n_layers = len(layer_ids)
    mid = midband_layer_weights(n_layers).numpy()
    out = v2_statistics(data[:, :n_layers], data[:, n_layers : 2 * n_layers], data[:, 2 * n_layers :], cfg.strata, sequence=seq,
                        weights={"mean": np.full(n_layers, 1.0 / n_layers), "midband": mid}, n_resamples=cfg.n_resamples, seed=cfg.seed)
    for i, layer in zip(layer_ids, out["layers"]):
        layer["layer"] = i
        layer["tokens"]["seen"] = reservoir.seen
    out["midband_weights"] = mid.tolist()
    return out


def drift_summary(layer_ids: list[int], drift: TokenReservoir, cfg: ProfileConfig) -> list[dict]:
    """Per layer: base-vs-tuned top-k Jaccard overall and by the base's routing margin stratum."""
    data, _ = drift.arrays()
    n_layers = len(layer_ids)
    out = []
    for col, i in enumerate(layer_ids):
        margin, jac = data[:, col], data[:, n_layers + col]
        b, it, _ = cfg.strata.masks(margin)
        out.append({
            "layer": i,
            "jaccard_mean": float(jac.mean()),
            "jaccard_boundary": float(jac[b].mean()) if b.any() else float("nan"),
            "jaccard_interior": float(jac[it].mean()) if it.any() else float("nan"),
            "flip_rate_boundary": float((jac[b] < 1).mean()) if b.any() else float("nan"),
            "flip_rate_interior": float((jac[it] < 1).mean()) if it.any() else float("nan"),
            "tokens": {"boundary": int(b.sum()), "interior": int(it.sum()), "all": int(len(jac))},
        })
    return out


def classify(aggregate_v2: Optional[dict], calibration: dict) -> dict:
    """The design note's classification of a MoE base from its mid-band V2 aggregate; dense models
    (no V2) are classed by calibration alone."""
    gap, ece = calibration.get("calibration_gap_mean", float("nan")), calibration.get("ece_top1", float("nan"))
    calibrated = bool(abs(gap) <= 0.1 and ece <= 0.05)
    if aggregate_v2 is None:
        name = "well-calibrated" if calibrated else "poorly-calibrated"
        return {"classification": name, "strategy": "Use the note's well-calibrated settings." if calibrated else
                "Use the note's poorly-calibrated settings (lower KL threshold, higher λ's).",
                "c1_pass": None, "c2_pass": None, "well_calibrated": calibrated}
    c1, c2 = aggregate_v2["delta_bi"]["pass"], aggregate_v2["delta_brand"]["pass"]
    name, strategy = CLASSES[(c1, c2)]
    return {"classification": name, "strategy": strategy, "c1_pass": c1, "c2_pass": c2, "well_calibrated": calibrated}


def recommended(profile: dict) -> list[tuple[str, object, str]]:
    """(key, value, reason) of the recommended training config, per the design note's tables."""
    cls = profile["classification"]
    name = cls["classification"]
    moe = profile["moe"]
    # Well-calibrated (Qwen3-like) bases: KL threshold 0.15, λ's 0.1-0.2; poorly calibrated
    # (DeepSeek-like) ones: 0.08 and 0.3-0.5 (the note's "Recommended Hyperparameters").
    gentle = name in ("qwen-like", "both-pass", "well-calibrated")
    why = f"{name}: " + ("the note's well-calibrated settings" if gentle else "the note's poorly-calibrated settings")
    lam = 0.15 if gentle else 0.4
    kl = 0.15 if gentle else 0.08
    rows = [
        # (a local path made absolute, so that the file works as --config from any directory)
        ("model", str(Path(profile["model"]).resolve()) if Path(profile["model"]).exists() else profile["model"], "the profiled base"),
        ("cache", "cache", "replace with your precomputed cache (or pass --cache)"),
        ("out", "run", "replace with your run directory (or pass --out)"),
        ("geometry.kl_threshold", kl, why),
        ("geometry.final_kl_threshold", kl, why + " (no tightening: the profile already chose the level)"),
        ("geometry.lambda_kl", lam, why),
        ("geometry.lambda_cal", lam if cls["well_calibrated"] else max(lam, 0.5),
         "calibration gap {:.3f}, ECE {:.3f}".format(profile["calibration"]["calibration_gap_mean"], profile["calibration"]["ece_top1"])
         + ("" if cls["well_calibrated"] else ": poorly calibrated, so calibration is weighted up (note: 0.2-1.0)")),
        ("geometry.lambda_entropy", 0.1 if gentle else 0.3, why + " (note: 0.1-0.3)"),
        ("geometry.dh_threshold", 0.1, "the note's table"),
        ("geometry.cal_threshold", 0.05, "the note's table"),
    ]
    if moe:
        lam_router = {"deepseek-like": 0.5, "both-weak": 0.5, "qwen-like": 0.1, "both-pass": 0.1}[name]
        rows.append(("geometry.lambda_router", lam_router,
                     {"deepseek-like": "strong C1, weak C2: protect C1 aggressively (no adjacency fallback when routing drifts)",
                      "both-weak": "both weak: routing has no redundancy to fall back on",
                      "qwen-like": "weak C1, strong C2: adjacent experts are a fallback; monitor rather than constrain",
                      "both-pass": "both hold: light router constraint"}[name]))
    return rows


def write_recommended(path: Path, profile: dict) -> None:
    lines = [f"# geocache train config recommended by geocache profile for {profile['model']}",
             f"# classification: {profile['classification']['classification']} — {profile['classification']['strategy']}"]
    geometry = []
    for key, value, reason in recommended(profile):
        text = json.dumps(value)
        if key.startswith("geometry."):
            geometry.append(f"  {key.split('.', 1)[1]}: {text}  # {reason}")
        else:
            lines.append(f"{key}: {text}  # {reason}")
    lines += ["geometry:"] + geometry
    path.write_text("\n".join(lines) + "\n")


def run_profile(cfg: ProfileConfig, log=print) -> dict:
    from geocache.bench import writable_dir

    started = time.perf_counter()
    target = Path(cfg.out)
    if target.is_file():
        raise ValueError(f"--out {cfg.out!r} is a file: give a directory for profile.json, profile.md, profile.png and recommended.yaml")
    if (target / "profile.json").exists() and not cfg.overwrite:
        # A profile of a large base takes an hour; a second run into the same --out replaced it without a word.
        raise FileExistsError(f"{cfg.out} already holds a profile (profile.json): pass --overwrite to replace it, or choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / "profile.json").exists():
        # (its recommended.yaml, say, would have been replaced without a word)
        raise FileExistsError(f"{cfg.out} is not empty and holds no profile: choose another --out (--overwrite replaces only a profile)")
    created = not target.exists()
    out = writable_dir(cfg.out)
    try:
        return _profile(cfg, out, started, log)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a refused run leaves no empty --out behind
            out.rmdir()
        raise


def _profile(cfg: ProfileConfig, out: Path, started: float, log) -> dict:
    from geocache.bench import provenance
    from geocache.models import load_model_and_tokenizer, quiet_peft_wrap
    from geocache.moe import moe_blocks

    if cfg.adapter:
        _check_adapter(cfg.adapter, cfg.model)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                                                progress=cfg.progress)
    base, tuned = model, None
    if cfg.adapter:  # one PEFT model: the base is the adapter switched off
        from peft import PeftModel

        try:
            with quiet_peft_wrap():
                model = PeftModel.from_pretrained(model, cfg.adapter).eval()
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # another base's adapter: peft's words, on one line
            raise ValueError(f"adapter {cfg.adapter!r} does not load onto model {cfg.model!r} (was it trained on another base?): "
                             f"{one_line(exc, 240)}") from None
        base, tuned = _AdapterOff(model), model
    elif cfg.tuned:
        tuned, _ = load_model_and_tokenizer(cfg.tuned, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                                            progress=cfg.progress)
    layers = [i for i, _ in moe_blocks(model)]
    profile = {"format_version": PROFILE_VERSION, "model": cfg.model, "adapter": cfg.adapter, "tuned": cfg.tuned, "moe": bool(layers),
               "moe_layers": layers, "config": asdict(cfg), "domains": {}}
    for name, path in cfg.domains().items():
        t0 = time.perf_counter()
        m = measure_domain(base, tokenizer, path, cfg, tuned=tuned, progress=cfg.progress, name=name)
        d = {"tokens": m["tokens"], "sequences": m["sequences"], "calibration": m["calibration"]["base"]}
        if layers:
            d["v2"] = v2_summary(layers, m["v2"]["base"], cfg)
        if tuned is not None:
            d["tuned"] = {"calibration": m["calibration"]["tuned"]}
            if layers:
                d["tuned"]["v2"] = v2_summary(layers, m["v2"]["tuned"], cfg)
                d["tuned"]["drift"] = drift_summary(layers, m["drift"], cfg)
        d["seconds"] = time.perf_counter() - t0
        profile["domains"][name] = d
        log(f"profiled {name}: {m['tokens']} tokens in {d['seconds']:.1f}s")
    primary = next(iter(profile["domains"].values()))
    profile["primary_domain"] = next(iter(profile["domains"]))
    profile["calibration"] = primary["calibration"]
    profile["classification"] = classify(primary["v2"]["aggregate"]["midband"] if layers else None, primary["calibration"])
    profile["provenance"] = provenance()
    profile["seconds"] = time.perf_counter() - started
    write_outputs(profile, out)
    log(f"{profile['classification']['classification']}: {profile['classification']['strategy']} Wrote {out / 'profile.json'}, profile.md, "
        "profile.png, recommended.yaml")
    return profile


def _check_adapter(adapter: str, model: str) -> None:
    """A local --adapter must be an adapter's directory (a run directory was taken for one and
    reported as "trained on another base"); one saved from another base is warned about: it may
    load (same module names and shapes) and measure nothing the user meant."""
    import warnings

    path = Path(adapter)
    if not path.exists():
        if "/" in adapter and not adapter.startswith((".", "/")):  # a hub id: peft fetches and checks it
            return
        raise FileNotFoundError(f"adapter {adapter!r} does not exist")
    config = path / "adapter_config.json"
    if not config.is_file():
        inside = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = f" (it holds {', '.join(inside)}: give one of those, e.g. {path / inside[-1]})" if inside else ""
        raise FileNotFoundError(f"adapter {adapter!r} has no adapter_config.json: give the adapter's own directory{hint}")
    try:
        saved_on = json.loads(config.read_text()).get("base_model_name_or_path")
    except ValueError:
        return  # peft says what is wrong with it
    same = saved_on is None or saved_on == model or (Path(saved_on).exists() and Path(model).exists()
                                                      and Path(saved_on).resolve() == Path(model).resolve())
    if not same:
        warnings.warn(f"adapter {adapter!r} was saved on base {saved_on!r}, not --model {model!r}: if that is another model, the "
                      "profile measures the adapter on a base it was not trained on", stacklevel=2)


class _AdapterOff:
    """Runs a PEFT model with its adapter disabled: the base. ``wrapped`` is the model (for its modules)."""

    def __init__(self, model):
        self.wrapped = model

    def __call__(self, **kw):
        with self.wrapped.disable_adapter():
            return self.wrapped(**kw)


def write_outputs(profile: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(_jsonable(profile), indent=1))
    (out / "profile.md").write_text(markdown(profile))
    plot(profile, out / "profile.png")
    write_recommended(out / "recommended.yaml", profile)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def _v(d: dict) -> str:
    if d["value"] is None or (isinstance(d["value"], float) and math.isnan(d["value"])):
        return "—"
    return f"{d['value']:+.5f} [{d['ci_low']:+.5f}, {d['ci_high']:+.5f}] {'PASS' if d['pass'] else 'fail'}"


def _calibration_line(c: dict) -> str:
    return (f"entropy mean {c['entropy_mean']:.3f} nats (p10 {c['entropy_quantiles']['p10']:.2f}, p50 {c['entropy_quantiles']['p50']:.2f}, "
            f"p90 {c['entropy_quantiles']['p90']:.2f}), NLL {c['nll_mean']:.3f}, calibration gap {c['calibration_gap_mean']:+.3f}, "
            f"top-1 ECE {c['ece_top1']:.4f} ({ECE_BINS} bins), top-1 accuracy {c['top1_accuracy']:.3f}.")


def markdown(profile: dict) -> str:
    cls = profile["classification"]
    lines = [f"# geocache profile of `{profile['model']}`", "",
             f"**Classification:** {cls['classification']}. **Strategy:** {cls['strategy']}", "",
             f"Primary domain: `{profile['primary_domain']}`. Signs follow SPEC: negative ΔBI / ΔBrand with the 95% interval below 0 pass.", ""]
    for name, d in profile["domains"].items():
        c = d["calibration"]
        lines += [f"## Domain `{name}` ({d['tokens']:,} tokens)", "", f"Calibration{' of the base' if 'tuned' in d else ''}: {_calibration_line(c)}", ""]
        if "tuned" in d:  # the adapter's (or tuned model's) calibration beside the base's
            t = d["tuned"]["calibration"]
            lines += [f"Calibration of the tuned model: {_calibration_line(t)} Against the base: entropy "
                      f"{t['entropy_mean'] - c['entropy_mean']:+.3f} nats, NLL {t['nll_mean'] - c['nll_mean']:+.3f}, calibration gap "
                      f"{t['calibration_gap_mean'] - c['calibration_gap_mean']:+.3f}, ECE {t['ece_top1'] - c['ece_top1']:+.4f}.", ""]
        if "v2" in d:
            lines += ["| layer | ΔBI (C1) | ΔBrand (C2) | tokens boundary / interior / kept / seen |", "|---:|---|---|---|"]
            for lay in d["v2"]["layers"]:
                t = lay["tokens"]
                lines.append(f"| {lay['layer']} | {_v(lay['delta_bi'])} | {_v(lay['delta_brand'])} | {t['boundary']} / {t['interior']} / {t['all']} / {t['seen']} |")
            for agg in ("mean", "midband"):
                a = d["v2"]["aggregate"][agg]
                lines.append(f"| **{agg}** | {_v(a['delta_bi'])} | {_v(a['delta_brand'])} | |")
            lines.append("")
        if "tuned" in d and "drift" in d["tuned"]:
            lines += ["Drift against the base (top-k Jaccard by the base's routing margin; flips at low margin are where V2 redundancy "
                      "should make drift harmless, flips at high margin are real drift):", "",
                      "| layer | Jaccard all | boundary | interior | flip rate boundary / interior | tuned ΔBI | tuned ΔBrand |", "|---:|---:|---:|---:|---|---|---|"]
            for dr, tl in zip(d["tuned"]["drift"], d["tuned"]["v2"]["layers"]):
                lines.append(f"| {dr['layer']} | {dr['jaccard_mean']:.4f} | {dr['jaccard_boundary']:.4f} | {dr['jaccard_interior']:.4f} | "
                             f"{dr['flip_rate_boundary']:.3f} / {dr['flip_rate_interior']:.3f} | {_v(tl['delta_bi'])} | {_v(tl['delta_brand'])} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [(n, d) for n, d in profile["domains"].items() if "v2" in d]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if not domains:
        for ax in axes:
            ax.text(0.5, 0.5, "dense model: no MoE layers (calibration profile only)", ha="center", va="center")
            ax.set_axis_off()
    for j, (name, d) in enumerate(domains):
        layers = d["v2"]["layers"]
        xs = np.array([lay["layer"] for lay in layers], dtype=float) + 0.1 * j
        for ax, key, title in ((axes[0], "delta_bi", "C1 ΔBI per layer"), (axes[1], "delta_brand", "C2 ΔBrand per layer")):
            vals = np.array([np.nan if lay[key]["value"] is None else lay[key]["value"] for lay in layers], dtype=float)
            lo = np.array([np.nan if lay[key]["ci_low"] is None else lay[key]["ci_low"] for lay in layers], dtype=float)
            hi = np.array([np.nan if lay[key]["ci_high"] is None else lay[key]["ci_high"] for lay in layers], dtype=float)
            ax.errorbar(xs, vals, yerr=[vals - lo, hi - vals], fmt="o", capsize=3, label=name)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title(title + " (95% bootstrap interval; < 0 passes)")
            ax.set_xlabel("decoder layer")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
