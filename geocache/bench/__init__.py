"""Benchmarks that ship with the package (``geocache bench ...``); ``benchmarks/`` has the rest."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional


def provenance() -> dict:
    """The command, machine and versions a result came from."""
    import peft
    import torch
    import transformers

    import geocache

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": shlex.join([sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "geocache": geocache.__version__,
        },
    }


def provenance_markdown(prov: dict) -> str:
    m, v = prov["machine"], prov["versions"]
    return (
        f"**Command:** `{prov['command']}` (cwd `{prov['cwd']}`), {prov['date_utc']}\n\n"
        + (f"**Note:** {prov['note']}\n\n" if prov.get("note") else "")
        + f"**Machine:** {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, {m['platform']}\n\n"
        f"**Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items())
    )


@contextlib.contextmanager
def workspace(cfg, prefix: str, log=print):
    """``(recipe, model_dir, work)`` for a benchmark config with ``recipe``/``arch``/``cache_dir``/
    ``work_dir``: the reference model built (or reused), and a work directory, temporary (and
    removed afterwards) unless ``cfg.work_dir`` names one."""
    from geocache.reference import build_reference_model, recipe_for

    recipe = cfg.recipe or recipe_for(cfg.arch)
    model_dir = build_reference_model(recipe, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, log=log)
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix=f"geocache-{prefix}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield recipe, model_dir, work
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def sft(model_dir, cache, out, *, steps: int, learning_rate: float, batch_size: int, seed: int, device=None, base: str = "cache",
        geometry=None, scheduler: str = "constant_with_warmup", logging_steps: Optional[int] = None, **extra):
    """A DoRA SFT run of a benchmark (``geocache.train``), saved once at the end; returns the trainer."""
    from geocache.config import GeometryConfig
    from geocache.train import TrainConfig, train

    return train(TrainConfig(model=str(model_dir), cache=str(cache), out=str(out), base=base, overwrite=True, max_steps=steps,
                             learning_rate=learning_rate, lr_scheduler_type=scheduler,
                             warmup_steps=max(1, steps // 20) if scheduler.endswith("warmup") else 0,
                             per_device_train_batch_size=batch_size, logging_steps=logging_steps or max(1, steps // 10), save_steps=steps,
                             seed=seed, progress=False, use_cpu=device == "cpu", geometry=geometry or GeometryConfig(), **extra))


def cache_of(model_dir, data, out, *, max_length: int, max_sequences: int, device=None, seed: int = 0, **options) -> Path:
    """``geocache precompute`` of one benchmark data file (defaults for k and m unless given)."""
    from geocache.data import DataConfig
    from geocache.precompute import PrecomputeConfig, precompute

    precompute(PrecomputeConfig(model=str(model_dir), data=[str(data)], out=str(out), overwrite=True, progress=False, device=device, seed=seed,
                                data_config=DataConfig(max_length=max_length, max_sequences=max_sequences), **options))
    return Path(out)


def writable_dir(path) -> Path:
    """Create an output directory up front, so that a bad ``--out`` fails before the work, not after."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as exc:
        raise ValueError(f"output directory {str(path)!r} cannot be written ({exc.strerror or exc})") from None
    return out


def rewrite_reports(out: str | Path, name: str, markdown, plot) -> None:
    """Rewrite ``name``.md and .png in ``out`` from its ``name``.json alone (no measurement)."""
    import json

    path = Path(out) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --replot rewrites the reports of an earlier run in --out")
    try:
        result = json.loads(path.read_text())
        text = markdown(result)  # before anything is written: a result of another shape changes nothing
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path} is not a {name} benchmark's result ({type(exc).__name__}: {exc})") from None
    (Path(out) / f"{name}.md").write_text(text)
    plot(result, Path(out) / f"{name}.png")


def write_reports(out: Path, name: str, result: dict, markdown, plot) -> None:
    """``name``.json, .md (``markdown(result)``) and .png (``plot(result, path)``) in ``out``."""
    import json

    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    plot(result, out / f"{name}.png")
