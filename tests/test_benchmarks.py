"""The committed benchmark reports are what their scripts render from the committed JSON.

Each benchmark writes ``NAME.json`` and renders ``NAME.md`` (and a PNG) from it; ``--replot``
renders again from the JSON alone. A report edited by hand, or a renderer broken by a change to the
results' schema, fails here without rerunning any measurement.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (script, results directory, name, output-directory flag)
REPORTS = [
    ("storage.py", RESULTS, "storage", "--out-dir"),
    ("storage.py", RESULTS / "storage_packed", "storage", "--out-dir"),
    ("storage.py", RESULTS / "storage_default", "storage", "--out-dir"),
    ("loss_memory.py", RESULTS, "loss_memory", "--out-dir"),
    ("precompute.py", RESULTS, "precompute", "--out-dir"),
    ("train_step.py", RESULTS, "train_step", "--out"),
]


@pytest.mark.parametrize("script,results,name,flag", REPORTS, ids=[f"{r[1].name}/{r[2]}" for r in REPORTS])
def test_committed_report_renders_from_its_json(tmp_path, script, results, name, flag):
    shutil.copy(results / f"{name}.json", tmp_path / f"{name}.json")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--replot", flag, str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / f"{name}.md").read_text() == (results / f"{name}.md").read_text()
