"""``geocache`` command line: parses options and calls the library; no logic of its own."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click
import yaml

import geocache


class GeocacheGroup(click.Group):
    """Turns library errors on bad input into one sentence and a non-zero exit, not a traceback."""

    def invoke(self, ctx):
        from geocache.cache import CacheError, CacheWriteError
        from geocache.data import BadRowError

        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, CacheError, CacheWriteError, BadRowError, FloatingPointError) as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # a full disk, a permission, a vanished mount, wherever it happens
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(2)
        except RuntimeError as exc:
            from geocache.trainer import peer_stopped

            if not peer_stopped(exc):
                raise
            # The process that failed said why; this one was waiting for it in a collective.
            rank = os.environ.get("RANK", "?")
            click.echo(f"error: process {rank} stops because another process of this run stopped (its error says why)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:  # what was committed (cache shards, checkpoints) stays
            how = {"precompute": "rerun it with --resume to continue after the last committed shard",
                   "train": "rerun it with --resume to continue from the last checkpoint (before the first one, the same command "
                            "starts the run again)"}.get(ctx.invoked_subcommand, "rerun the command")
            click.echo(f"interrupted: what was committed is kept; {how}", err=True)
            ctx.exit(130)
        finally:
            _end_process_group()


def _main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _end_process_group() -> None:
    """Under torchrun a command leaves a process group behind (precompute's, or accelerate's for
    train); exiting with it alive let gloo's threads be torn down at interpreter exit, which
    aborted a rank now and then ("terminate called without an active exception", exit -6)."""
    if "torch" not in sys.modules:  # nothing ran that could have started one (--help, errors)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@click.group(cls=GeocacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(geocache.__version__, "--version", "-V", prog_name="geocache")
def main() -> None:
    """geocache: cache a base model's next-token statistics once, then fine-tune against them.

    geometry-aware DoRA fine-tuning that keeps the tuned model close to its base where it matters:
    per-position KL to the base, entropy drop, calibration gap and MoE router drift.
    """


def _load_yaml(path: str | None) -> dict:
    from geocache.config import one_line, read_yaml

    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        data = read_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path!r} is not valid YAML: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of options")
    return data


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML file of options; CLI options override it.")
@click.option("--model", help="Base model: local directory or hub id.")
@click.option("--revision", help="Model revision (hub).")
@click.option("--data", multiple=True, help="Data file, directory or hub dataset id (repeatable).")
@click.option("--out", help="Cache directory or fsspec URL.")
@click.option("--backend", type=click.Choice(["zarr", "arrow"]), help="Storage backend: arrow (default, fastest random access) or zarr (compressed, object-store friendly).")
@click.option("--top-k", "k", type=int, help="k: top-k log-probs cached per position (default 32).")
@click.option("--tail-samples", "m", type=int, help="m: tail samples cached per position (default 16).")
@click.option("--router", type=click.Choice(["auto", "full", "topk", "none"]), help="MoE router logits to cache.")
@click.option("--router-k", type=int, help="Experts kept per layer with --router topk.")
@click.option("--format", "format_", type=click.Choice(["auto", "text", "prompt_completion", "messages"]), help="Example shape.")
@click.option("--text-field", help="Field holding plain text.")
@click.option("--prompt-field", help="Field holding the prompt (no loss).")
@click.option("--completion-field", help="Field holding the completion (loss).")
@click.option("--messages-field", help="Field holding chat messages [{role, content}].")
@click.option("--add-eos/--no-add-eos", default=None, help="Append the EOS token to text and completions (default on).")
@click.option("--add-bos/--no-add-bos", default=None,
              help="Start text and prompts with the tokenizer's own leading special tokens, e.g. BOS (default on).")
@click.option("--max-length", type=int, help="Tokens per sequence (default 1024).")
@click.option("--packing/--truncate", default=None, help="Pack whole examples into rows, or truncate each (default).")
@click.option("--max-sequences", type=int, help="Stop after this many sequences.")
@click.option("--max-tokens", type=int, help="Stop once this many tokens are cached.")
@click.option("--split", help="Dataset split, or a slice of it: 'train[:1000]', 'train[10%:20%]' (local files form one split, train).")
@click.option("--subset", help="Hub dataset configuration (subset), e.g. 'en' for allenai/c4.")
@click.option("--data-revision", help="Hub dataset revision (default: the commit the hub resolves now, recorded and pinned).")
@click.option("--text-sample-by", type=click.Choice(["line", "paragraph", "document"]),
              help="Examples of .txt files: one per line (default; blank lines skipped), paragraph or file.")
@click.option("--batch-size", type=int, help="Sequences per forward (default 8).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Base compute dtype.")
@click.option("--device", help="Device, e.g. cpu or cuda:0.")
@click.option("--device-map", help="accelerate device_map for bases larger than one device: auto, balanced, sequential, or a JSON mapping of module names to devices, cpu or disk.")
@click.option("--max-memory", help="With --device-map: memory per device, JSON, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'.")
@click.option("--offload-folder", help="With --device-map: where weights that fit on no device are offloaded.")
@click.option("--seed", type=int, help="Seed of the tail samples.")
@click.option("--shard-sequences", type=int, help="Sequences per shard (default 256).")
@click.option("--resume", is_flag=True, default=None, help="Continue an interrupted run.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a cache already at --out.")
@click.option("--dry-run", is_flag=True, default=None, help="Print the estimated size and token count only.")
@click.option("--skip-bad-rows", is_flag=True, default=None, help="Count and skip malformed rows instead of failing.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow model code from the hub.")
@click.option("--fused-head/--no-fused-head", default=None,
              help="Project only labelled rows inside the statistics pass (default), or use the model's own logits.")
@click.option("--compile-stats/--no-compile-stats", default=None,
              help="The statistics pass's reduction as one torch.compile'd kernel (default: on CUDA with Triton, off elsewhere).")
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bar.")
def precompute(config_path, no_progress, format_, **options):
    """Stream a dataset through the base model once and cache its statistics."""
    from geocache.precompute import config_from_options, precompute as run

    merged = _load_yaml(config_path)
    options["format"] = format_
    options["data"] = list(options["data"]) or None
    merged.update({k: v for k, v in options.items() if v is not None})
    if no_progress:
        merged["progress"] = False
    for required in ("model", "data", "out"):
        if not merged.get(required) and not (required == "out" and merged.get("dry_run")):
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    merged.setdefault("out", "")
    result = run(config_from_options(merged))
    if not _main_process():
        return  # under torchrun, one summary (every rank has the whole run's)
    if isinstance(result, dict):
        click.echo(json.dumps(result, indent=2))
    else:
        c = result.counts
        click.echo(f"cached {c['sequences']} sequences, {c['tokens']} tokens, {c['positions']} positions in {len(result.shards)} shards at {merged['out']}")


def _dataclass_options(cls, skip=()):
    """Click options generated from a config dataclass: one ``--field-name`` per field, its help
    from the field's metadata, so the CLI and the Python API never drift apart."""
    import dataclasses
    import typing

    def decorate(func):
        hints = typing.get_type_hints(cls)
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            hint = hints[f.name]
            args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) else ()
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            opt = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            # what an option left out means, unless the help says it ("(default: ...)", "default 32")
            if default not in (None, "", [], ()) and not re.search(r"\(default[ :]|default \d", help_text):
                shown = ("on" if default else "off") if isinstance(default, bool) else default
                help_text = f"{help_text} [default: {shown}]"
            if base is bool:  # --x/--no-x: either overrides the YAML and the default; neither leaves them
                func = click.option(f"{opt}/--no-{opt[2:]}", f.name, default=None, help=help_text)(func)
            elif typing.get_origin(base) is list:
                func = click.option(opt, f.name, multiple=True, help=help_text + " (repeatable)")(func)
            elif base is dict or typing.get_origin(base) is dict:  # KEY=VALUE pairs, merged over the YAML's mapping
                func = click.option(opt, f.name, multiple=True, metavar="KEY=VALUE", help=help_text + " (repeatable)")(func)
            else:
                func = click.option(opt, f.name, type=base if base in (int, float) else str, default=None, help=help_text)(func)
        return func

    return decorate


def _train_options(func):
    from geocache.config import GeometryConfig
    from geocache.train import TrainConfig

    func = _dataclass_options(GeometryConfig)(func)
    return _dataclass_options(TrainConfig, skip=("geometry",))(func)


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML file of options (a `geometry:` section for λ's and thresholds); CLI options override it.")
@_train_options
def train(config_path, **options):
    """Fine-tune a DoRA adapter with the geometry-aware loss, base from the cache (or live/copy/periodic)."""
    import dataclasses

    from geocache.config import GeometryConfig
    from geocache.train import TrainConfig, train as run

    merged = _load_yaml(config_path)
    geometry = merged.pop("geometry", None) or {}
    if not isinstance(geometry, dict):
        raise ValueError(f"geometry={geometry!r} in {config_path} must be a mapping of geometry options (lambda_kl: ..., kl_threshold: ...)")
    geometry = dict(geometry)
    geo_fields = {f.name for f in dataclasses.fields(GeometryConfig)}
    for name in ("training_args", "lora_args"):  # KEY=VALUE pairs, over the config file's mapping key by key
        pairs = options.pop(name, ())
        if pairs:
            given = merged.get(name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{name}={given!r} in {config_path} must be a mapping of names to values")
            merged[name] = {**given, **_key_values("--" + name.replace("_", "-"), pairs)}
    for key, value in options.items():
        if value is None or value == ():
            continue
        value = list(value) if isinstance(value, tuple) else value
        (geometry if key in geo_fields else merged)[key] = value
    for required in ("model", "cache", "out"):
        if not merged.get(required):
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    if isinstance(merged.get("layer_weights"), list):
        merged["layer_weights"] = [float(w) for w in merged["layer_weights"]]
    trainer = run(TrainConfig.from_dict({**merged, "geometry": geometry}))
    if _main_process():
        click.echo(train_summary(trainer.state, merged["out"], best=(trainer.args.load_best_model_at_end, trainer.args.metric_for_best_model)))


def _key_values(option: str, pairs) -> dict:
    """``KEY=VALUE`` texts as a mapping, each VALUE read as YAML (``0.01`` a number, ``true`` a bool,
    ``[a, b]`` a list, anything else text)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {pair!r} must be KEY=VALUE (e.g. weight_decay=0.01)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def train_summary(state, out: str, best: tuple = (False, None)) -> str:
    """The line ``geocache train`` ends with: steps, where the adapter is, the last task loss, and
    which adapter was saved when it is not the last step's: the best checkpoint's
    (``best``: ``load_best_model_at_end`` and ``metric_for_best_model``), or the step the V2 gate's
    last check rolled back to."""
    history = state.log_history
    last = next((r for r in reversed(history) if "task_loss" in r), {})  # a window's log or the final summary
    line = f"trained {state.global_step} step{'' if state.global_step == 1 else 's'}; adapter saved in {os.path.join(out, 'adapter')}; last task loss {last.get('task_loss', float('nan')):.4f}"
    load_best, metric = best
    if load_best and state.best_model_checkpoint:
        line += (f"; the adapter saved is the best checkpoint's, {os.path.basename(state.best_model_checkpoint)} "
                 f"({metric or 'loss'} {state.best_metric:.6g}), as load_best_model_at_end asks")
    check = next((r for r in reversed(history) if "v2_decision" in r), None)
    if check is not None and check["v2_decision"] == "rollback" and check.get("v2_step") == state.global_step:  # steps after it moved on
        line += (f"; the V2 gate's last check (step {check['v2_step']}) rolled the adapter back to step "
                 f"{check['v2_rolled_back_to_step']}, which is the one saved")
    return line


def _yaml_defaults(ctx, param, value):
    """``--config FILE`` for commands whose options are plain click options: the YAML's keys (the
    options' names, ``steps`` or ``pretrain_steps``) become their defaults, so that the command
    line still overrides them (click's ``default_map``)."""
    if not value:
        return value
    data = _load_yaml(value)
    names = {p.name for p in ctx.command.params if p.name != param.name}
    unknown = sorted(set(data) - names)
    if unknown:
        from geocache.config import unknown_options

        raise click.UsageError(f"{unknown_options(ctx.command.name, unknown, names)} in {value}", ctx)
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def _config_option(func):
    return click.option("--config", "config_path", type=click.Path(), is_eager=True, expose_value=False, callback=_yaml_defaults,
                        help="YAML file of this command's options (its keys: the options' names); CLI options override it.")(func)


@main.command()
@_config_option
@click.option("--out", default="geocache-demo", show_default=True, help="Directory for the data, caches and runs (new, or an earlier demo's).")
@click.option("--steps", default=40, show_default=True, help="Training steps per run.")
@click.option("--pretrain-steps", default=500, show_default=True,
              help="Pretraining steps of the reference model (built once, then reused; 2500 is the benchmarks' model).")
def demo(out, steps, pretrain_steps):
    """Run the whole pipeline offline on an embedded default (a small MoE model pretrained locally)."""
    from geocache.demo import run_demo

    run_demo(out, steps=steps, pretrain_steps=pretrain_steps, log=click.echo)


@main.command()
@_config_option
@click.option("--arch", type=click.Choice(["moe", "dense"]), default="moe", show_default=True, help="Which reference model.")
@click.option("--steps", type=int, default=None, help="Override the recipe's pretraining steps (changes the cache key).")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed (changes the cache key).")
@click.option("--cache-dir", default=None, help="Where reference models live (default: $GEOCACHE_HOME or ~/.cache/geocache).")
def reference(arch, steps, seed, cache_dir):
    """Pretrain (or reuse) a small reference model on the standard library (code + prose); print its report."""
    from geocache.reference import build_reference_model, recipe_for

    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    path = build_reference_model(recipe_for(arch, **overrides), cache_dir=Path(cache_dir) if cache_dir else None, log=click.echo)
    report = json.loads((path / "reference.json").read_text())
    click.echo(f"{arch} reference model: {path} ({report['parameters']:,} parameters, vocabulary {report['vocab_size']:,}, "
               f"log V = {report['log_vocab']:.2f} nats, pretrained in {report['train_seconds']:.0f} s)")
    for domain, d in report["domains"].items():
        p10, p50, p90 = d["entropy_p10_p50_p90"]
        click.echo(f"  {domain:>6}: held-out loss {d['heldout_loss']:.3f}, entropy mean {d['entropy_mean']:.3f} (p10 {p10:.2f}, p50 {p50:.2f}, p90 {p90:.2f})")


def _int_list(ctx, param, value):
    if isinstance(value, (list, tuple)):  # from a --config YAML list
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise click.BadParameter(f"{value!r} is not a list of integers") from None
    if value is None:
        return None
    try:
        # "8,16", or a --config YAML list as click hands it over as text ("[8, 16]")
        return tuple(int(x) for x in str(value).strip().strip("[]()").split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _profile_options(func):
    from geocache.profile import ProfileConfig

    return _dataclass_options(ProfileConfig)(func)


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML file of options; CLI options override it.")
@_profile_options
def profile(config_path, **options):
    """V2 redundancy per MoE layer (C1/C2 with bootstrap intervals), calibration per domain, the base's
    classification and strategy, and a recommended train config (--adapter/--tuned: drift vs the base)."""
    import dataclasses

    from geocache.config import unknown_options
    from geocache.profile import ProfileConfig, run_profile

    merged = _load_yaml(config_path)
    known = {f.name for f in dataclasses.fields(ProfileConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"{unknown_options('profile', unknown, known)} in {config_path}")
    merged.update({k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v is not None and v != ()})
    for required in ("model", "data", "out"):
        if not merged.get(required):
            raise ValueError(f"--{required} is required")
    run_profile(ProfileConfig(**merged), log=click.echo)


@main.group()
def bench() -> None:
    """Benchmarks that ship with geocache (more under benchmarks/ in the repository)."""


def _bench_deps() -> None:
    import importlib.util

    missing = [m for m in ("matplotlib", "scipy", "torchmetrics") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"geocache bench needs {', '.join(missing)}: pip install 'geocache[bench]'")


@bench.command()
@_config_option
@click.option("--arch", type=click.Choice(["moe", "dense"]), default="moe", show_default=True, help="Reference model.")
@click.option("--out", default="benchmarks/results", show_default=True, help="Where fidelity.json/.md/.png go.")
@click.option("--work-dir", default=None, help="Keep caches and adapters here (default: a temporary directory, removed).")
@click.option("--tune-domain", type=click.Choice(["code", "prose"]), default="prose", show_default=True, help="Domain of the tuning SFT.")
@click.option("--steps", callback=_int_list, default="20,200", show_default=True, help="SFT steps of the tuned models.")
@click.option("--ks", callback=_int_list, default="8,16,32,64,128,256", show_default=True, help="Top-k values.")
@click.option("--ms", callback=_int_list, default="0,4,16", show_default=True, help="Tail-sample counts.")
@click.option("--eval-sequences", type=int, default=48, show_default=True, help="Held-out sequences per domain.")
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
@click.option("--cache-dir", default=None, help="Reference models' cache directory.")
@click.option("--replot", is_flag=True, help="Only rewrite fidelity.md/.png from fidelity.json in --out.")
def fidelity(arch, out, work_dir, tune_domain, steps, ks, ms, eval_sequences, device, cache_dir, replot):
    """Cached KL estimators vs the exact KL on a tuned reference model: bias, errors, masks, gradients, bytes."""
    _bench_deps()
    from geocache.bench.fidelity import FidelityConfig, replot as rewrite, run_fidelity

    if replot:
        rewrite(out)
        return

    run_fidelity(FidelityConfig(out=out, work_dir=work_dir, arch=arch, tune_domain=tune_domain, steps=steps, ks=ks, ms=ms,
                                eval_sequences=eval_sequences, device=device, cache_dir=cache_dir), log=click.echo)


@bench.command()
@_config_option
@click.option("--arch", type=click.Choice(["moe", "dense"]), default="moe", show_default=True, help="Reference model.")
@click.option("--out", default="benchmarks/results", show_default=True, help="Where parity.json/.md/.png go.")
@click.option("--work-dir", default=None, help="Keep caches and runs here (default: a temporary directory, removed).")
@click.option("--tune-domain", type=click.Choice(["code", "prose"]), default="prose", show_default=True, help="Domain of the SFT.")
@click.option("--steps", type=int, default=200, show_default=True, help="Training steps per run.")
@click.option("--learning-rate", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
@click.option("--cache-dir", default=None, help="Reference models' cache directory.")
@click.option("--kl-estimator", type=click.Choice(["topk_hybrid", "topk_tail", "topk_sampled", "topk_cv", "topk_renorm"]), default=None,
              help="Cached KL estimator of the cache run (default: the library's).")
@click.option("--replot", is_flag=True, help="Only rewrite parity.md/.png from parity.json in --out.")
def parity(arch, out, work_dir, tune_domain, steps, learning_rate, device, cache_dir, kl_estimator, replot):
    """Train with --base cache and --base live from the same start; compare held-out exact KL, dH, gap, loss."""
    _bench_deps()
    from geocache.bench.parity import ParityConfig, replot as rewrite, run_parity

    if replot:
        rewrite(out)
        return

    run_parity(ParityConfig(out=out, work_dir=work_dir, arch=arch, tune_domain=tune_domain, steps=steps, learning_rate=learning_rate,
                            device=device, cache_dir=cache_dir, kl_estimator=kl_estimator), log=click.echo)


@bench.command()
@_config_option
@click.option("--arch", type=click.Choice(["moe", "dense"]), default="moe", show_default=True, help="Reference model.")
@click.option("--out", default="benchmarks/results", show_default=True, help="Where calibration.json/.md/.png go.")
@click.option("--work-dir", default=None, help="Keep caches and runs here (default: a temporary directory, removed).")
@click.option("--steps", type=int, default=200, show_default=True, help="Training steps per run.")
@click.option("--learning-rate", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
@click.option("--cache-dir", default=None, help="Reference models' cache directory.")
@click.option("--replot", is_flag=True, help="Only rewrite calibration.md/.png from calibration.json in --out.")
def calibration(arch, out, work_dir, steps, learning_rate, device, cache_dir, replot):
    """SFT with plain DoRA, constant KL penalties and the geometry-aware loss; held-out calibration and drift."""
    _bench_deps()
    from geocache.bench.calibration import CalibrationConfig, replot as rewrite, run_calibration

    if replot:
        rewrite(out)
        return

    run_calibration(CalibrationConfig(out=out, work_dir=work_dir, arch=arch, steps=steps, learning_rate=learning_rate, device=device,
                                      cache_dir=cache_dir), log=click.echo)


@main.group()
def cache() -> None:
    """Inspect and verify caches."""


@cache.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON, typed fields (numbers as numbers).")
def inspect(path, as_json):
    """What a cache holds: model, data, statistics, sizes and bytes per token."""
    from geocache.cache.inspect import describe, summarize

    if as_json:  # typed fields, for scripts
        click.echo(json.dumps(describe(path), indent=2))
        return
    for key, value in summarize(path).items():
        click.echo(f"{key:>28}: {value}")


@cache.command()
@click.argument("path")
def verify(path):
    """Recompute every shard's checksum and check its schema; exit 1 naming the first bad shard."""
    from geocache.cache.inspect import verify as run

    bad = run(path)
    if bad:
        click.echo(f"error: {bad}", err=True)
        sys.exit(1)
    click.echo(f"ok: every shard of {path} matches its checksum and schema")


if __name__ == "__main__":  # pragma: no cover
    main()
