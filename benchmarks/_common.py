"""Helpers shared by the scripts under ``benchmarks/``.

Provenance (command, machine, versions, load average), process memory from ``/proc/self/status``
(current and peak RSS, and resetting the peak), CPU accounting from ``/proc/stat`` (how much
CPU *other* processes used while we measured), waiting for an idle machine, subprocess workers
that answer one line of JSON, and the offline corpus: the source files of a few standard-library
packages written as JSONL ``{"text": ...}`` rows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 1 << 30
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------
# Machine state
# ----------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (they lag: they include our own recent work)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's waited-for descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all cores busy over ``seconds`` while this process sleeps: other processes' load."""
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_idle(max_busy: float, timeout: float, log=print) -> dict:
    """Sleep until other processes use at most ``max_busy`` of the machine (sampled over 2 s), or
    ``timeout`` seconds have passed. Returns what was seen, for the results file."""
    started = time.perf_counter()
    samples = []
    while True:
        busy = machine_busy_fraction(2.0)
        samples.append(round(busy, 3))
        waited = time.perf_counter() - started
        if busy <= max_busy or waited >= timeout:
            if busy > max_busy:
                log(f"  [idle] machine still {busy:.0%} busy from other processes after {waited:.0f} s; measuring anyway")
            elif len(samples) > 1:
                log(f"  [idle] waited {waited:.0f} s for the machine to go idle")
            return {"busy_samples": samples, "waited_s": round(waited, 1), "idle": busy <= max_busy, "loadavg": loadavg()}
        time.sleep(10.0)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_digest() -> str:
    """sha256 over geocache's sources (package and cache subpackage), to tie results to the code."""
    import geocache

    h = hashlib.sha256()
    pkg = Path(geocache.__file__).resolve().parent
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def provenance() -> dict:
    import pyarrow
    import torch
    import transformers
    import zarr

    import geocache

    return {
        "command": shlex.join([sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": loadavg(),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "zarr": zarr.__version__,
            "pyarrow": pyarrow.__version__,
            "numpy": __import__("numpy").__version__,
            "geocache": geocache.__version__,
            "geocache_source_sha256_16": source_digest(),
        },
    }


def provenance_markdown(prov: dict, loadavg_at_end) -> list[str]:
    m, v = prov["machine"], prov["versions"]
    return [
        f"**Command:** `{prov['command']}` (cwd `{prov['cwd']}`)",
        "",
        f"**Machine:** {m['cpu_model']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, "
        f"{m['mem_total_gib']} GiB RAM, {m['platform']}",
        "",
        f"**Versions:** python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, zarr {v['zarr']}, "
        f"pyarrow {v['pyarrow']}, numpy {v['numpy']}, geocache {v['geocache']} (sources sha256 {v['geocache_source_sha256_16']})",
        "",
        f"**Load average** (1/5/15 min) at start {prov['loadavg_at_start']}, at end {loadavg_at_end}. The load average lags "
        "and counts this script's own work; the per-measurement \"other CPU\" columns (CPU time used by processes other "
        "than this benchmark's during the measurement, from `/proc/stat`) are the direct check.",
    ]


# ----------------------------------------------------------------------------------------------
# Process memory
# ----------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, VmSize, ...)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); True if the reset took effect."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    # After a reset VmHWM equals VmRSS (allow a little slack for pages touched in between).
    return proc_status_kib("VmHWM") <= proc_status_kib("VmRSS") + 1024


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def spawn_worker(script: Path, params: dict, timeout: float) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter; parse the last stdout line as JSON.

    Adds ``worker_wall_s``, ``worker_cpu_s`` (the worker and its waited-for children) and
    ``other_cpu_s``: machine-wide busy CPU seconds during the worker minus the worker's own, i.e.
    what other processes took from the cores while it ran (small = the measurement ran alone)."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(params)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    b0, t0 = cpu_jiffies()
    c0, w0 = children_cpu_s(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"params": params, "error": f"worker timed out after {timeout} s"}
    wall, cpu = time.perf_counter() - w0, children_cpu_s() - c0
    b1, t1 = cpu_jiffies()
    busy_s = (b1 - b0) / CLK_TCK
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"params": params, "error": f"worker exited with {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    out = json.loads(lines[-1])
    out.update(worker_wall_s=wall, worker_cpu_s=cpu, other_cpu_s=max(busy_s - cpu, 0.0), other_cpu_share=max(busy_s - cpu, 0.0) / max(wall * (os.cpu_count() or 1), 1e-9))
    return out


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

CORPUS_PACKAGES = ("json", "email", "asyncio")


def corpus_files(packages=CORPUS_PACKAGES) -> list[Path]:
    """Every ``.py`` file of the given standard-library packages, in sorted order."""
    import importlib

    files: list[Path] = []
    for name in packages:
        files += sorted(Path(importlib.import_module(name).__file__).parent.rglob("*.py"))
    return files


def write_corpus_jsonl(path: Path, lines_per_example: int, packages=CORPUS_PACKAGES) -> dict:
    """Split every file into examples of ``lines_per_example`` lines; write ``{"text": ...}`` rows."""
    rows = 0
    chars = 0
    with open(path, "w") as fh:
        for f in corpus_files(packages):
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            for i in range(0, len(lines), lines_per_example):
                text = "\n".join(lines[i : i + lines_per_example]).strip()
                if text:
                    fh.write(json.dumps({"text": text}) + "\n")
                    rows += 1
                    chars += len(text)
    return {"path": str(path), "packages": list(packages), "lines_per_example": lines_per_example, "rows": rows, "chars": chars}


def dir_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, number of files) of every file under ``path``."""
    total = n = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
            n += 1
    return total, n


def fmt(x, spec: str = ",.0f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def spawn_measured(script: Path, params: dict, timeout: float, *, max_busy: float, idle_timeout: float,
                   max_other_share: float, retries: int, label: str, log=print) -> tuple[dict, list[dict]]:
    """``spawn_worker`` after waiting for an idle machine; rerun (up to ``retries`` times) when other
    processes took more than ``max_other_share`` of the machine's CPU while it ran. Returns the
    result kept (the cleanest attempt) and every attempt's idle check and contamination."""
    attempts, best = [], None
    for attempt in range(retries + 1):
        idle = wait_for_idle(max_busy, idle_timeout, log=log)
        r = spawn_worker(script, params, timeout)
        share = r.get("other_cpu_share", 0.0)
        attempts.append({"label": label, "attempt": attempt, "idle_check": idle, "other_cpu_s": r.get("other_cpu_s"),
                         "other_cpu_share": share, "error": r.get("error")})
        if "error" in r:
            return r, attempts
        if best is None or share < best.get("other_cpu_share", 1.0):
            best = r
        if share <= max_other_share:
            break
        log(f"  [rerun] {label}: other processes used {r['other_cpu_s']:.1f} CPU-s ({share:.0%} of the machine) during "
            f"the measurement; {'rerunning' if attempt < retries else 'keeping the cleanest attempt'}")
    best["attempts"] = len(attempts)
    return best, attempts


def add_measurement_args(ap) -> None:
    """The options of ``spawn_measured``: idle wait, contamination check and reruns, worker timeout."""
    ap.add_argument("--max-busy", type=float, default=0.15, help="wait until other processes use at most this fraction of the machine")
    ap.add_argument("--idle-timeout", type=float, default=120.0, help="longest wait for an idle machine per measurement (s)")
    ap.add_argument("--max-other-share", type=float, default=0.05,
                    help="rerun a measurement when other processes used more than this fraction of the machine's CPU during it")
    ap.add_argument("--retries", type=int, default=2, help="reruns allowed per measurement for --max-other-share")
    ap.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned")
