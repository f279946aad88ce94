"""Benchmarks that ship with the package (``geocache bench ...``); ``benchmarks/`` has the rest."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys


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
        f"**Machine:** {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, {m['platform']}\n\n"
        f"**Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items())
    )
