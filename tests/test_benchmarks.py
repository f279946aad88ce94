"""The committed benchmark reports are what their scripts render from the committed JSON.

Each benchmark writes ``NAME.json`` and renders ``NAME.md`` (and a PNG) from it; ``--replot``
renders again from the JSON alone. A report edited by hand, or a renderer broken by a change to the
results' schema, fails here without rerunning any measurement.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (script, results directory, name, output-directory flag[, the report's own name when the script
# writes it under `name`: a committed variant, e.g. parity run with another estimator])
REPORTS = [
    ("storage.py", RESULTS, "storage", "--out-dir"),
    ("storage.py", RESULTS / "storage_packed", "storage", "--out-dir"),
    ("storage.py", RESULTS / "storage_default", "storage", "--out-dir"),
    ("loss_memory.py", RESULTS, "loss_memory", "--out-dir"),
    ("precompute.py", RESULTS, "precompute", "--out-dir"),
    ("train_step.py", RESULTS, "train_step", "--out"),
    ("reference.py", RESULTS, "reference", "--out-dir"),
    ("fidelity.py", RESULTS, "fidelity", "--out"),
    ("parity.py", RESULTS, "parity", "--out"),
    ("parity.py", RESULTS, "parity", "--out", "parity_topk_sampled"),
    ("parity.py", RESULTS, "parity", "--out", "parity_topk_hybrid"),
    ("calibration.py", RESULTS, "calibration", "--out"),
    ("tail_embedding.py", RESULTS, "tail_embedding", "--out"),
]


@pytest.mark.parametrize("script,results,name,flag,committed", [(*r[:4], r[4] if len(r) > 4 else r[2]) for r in REPORTS],
                         ids=[f"{r[1].name}/{r[4] if len(r) > 4 else r[2]}" for r in REPORTS])
def test_committed_report_renders_from_its_json(tmp_path, script, results, name, flag, committed):
    shutil.copy(results / f"{committed}.json", tmp_path / f"{name}.json")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--replot", flag, str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / f"{name}.md").read_text() == (results / f"{committed}.md").read_text()


def test_reference_benchmark_smoke_builds_both_architectures_from_scratch(tmp_path):
    import json

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "--tiny", "--steps", "3", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads((tmp_path / "reference.json").read_text())
    assert [m["arch"] for m in data["models"]] == ["moe", "dense"]
    assert [m["report"]["recipe"]["model_type"] for m in data["models"]] == ["qwen3_moe", "qwen3"]
    for m in data["models"]:
        assert m["build_wall_s"] >= m["report"]["train_seconds"] > 0 and set(m["report"]["domains"]) == {"code", "prose"}
    md = (tmp_path / "reference.md").read_text()
    assert "| moe (qwen3_moe) |" in md and "| dense (qwen3) |" in md and (tmp_path / "reference.png").stat().st_size > 0


def test_tail_embedding_benchmark_smoke_the_identity_is_exact(tmp_path, tiny_reference):
    """The tail's part of the forward KL from the base tail's mean output embedding: exact up to
    float16 rounding (a wrong identity would be off by the tail's whole share), and its PCA
    approximations cost fewer bytes the fewer coefficients they keep."""
    _, ref_dir, _ = tiny_reference
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tail_embedding.py"), "--tiny", "--cache-dir", str(ref_dir), "--steps", "6",
                          "--k", "8", "--m", "4", "--ranks", "4,8", "--eval-sequences", "4", "--max-length", "64", "--tune-sequences", "32",
                          "--learning-rate", "0.05", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "tail_embedding.json").read_text())
    rows = {(r["domain"], r["family"], r["bytes_per_position_beyond_topk"]): r for r in result["rows"]}
    d = result["hidden_size"]
    for domain in ("code", "prose"):
        exact = rows[(domain, "tail embedding", 2 * d)]
        assert exact["exact_mean"] > 1e-3 and abs(exact["agg_bias"]) < 2e-3 and exact["relerr_p50"] < 1e-2, exact
        assert rows[(domain, "library default", None)]["bytes_per_token"] > 0
        small, large = rows[(domain, "tail embedding, PCA", 2 * 4 + 4)], rows[(domain, "tail embedding, PCA", 2 * 8 + 4)]  # (+ one float32)
        assert small["bytes_per_token"] < large["bytes_per_token"] < exact["bytes_per_token"]
    assert "| estimator | bytes/token | mask agreement |" in (tmp_path / "tail_embedding.md").read_text()
    assert (tmp_path / "tail_embedding.png").stat().st_size > 0


def test_the_cuda_check_runs_off_the_gpu_as_a_dry_run(tmp_path):
    """benchmarks/cuda_check.py is run on a lent GPU machine; here its CPU dry run (one section,
    small shapes) must run through and write its JSON with no section in error."""
    env = {**os.environ, "CHECK_DEVICE": "cpu", "CHECK_QUICK": "1", "CHECK_ONLY": "loss_cuda_vs_cpu", "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_check.py")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checked = result["loss_cuda_vs_cpu"]
    assert "error" not in checked and set(checked) == {"topk_cv", "topk_tail", "topk_hybrid"}
    assert all(v["loss_cpu"] == v["loss_gpu"] and v["inside_autocast_minus_outside"] == 0.0 for v in checked.values())


def test_every_benchmark_script_takes_help_without_running(tmp_path):
    """README: "each script takes --help". cuda_check.py ran its checks as it loaded, so its
    --help asked a CPU-only torch for a CUDA device (and on a GPU machine would have run them all)."""
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name.startswith("_"):
            continue
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
        assert run.returncode == 0 and "usage" in run.stdout.lower(), (script.name, run.stderr[-1000:])
        assert not any(tmp_path.iterdir()), script.name  # nothing written


def test_precompute_benchmark_smoke_measures_the_tiny_shape(tmp_path):
    """The benchmark's instrumentation wraps precompute's own methods: a change to their
    signatures broke every measurement once while the script still exited 0 with a report of
    "missing measurements". It now measures, and would exit non-zero without a measurement."""
    args = ["--shapes", "tiny", "--tiny-sequences", "16", "--tiny-batch", "4", "--reps", "1", "--bare-passes", "1",
            "--max-busy", "1", "--idle-timeout", "1", "--max-other-share", "1", "--retries", "0", "--out-dir", str(tmp_path)]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precompute.py"), *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (summary,) = json.loads((tmp_path / "precompute.json").read_text())["summary"]
    assert "error" not in summary and summary["shape"] == "tiny" and summary["ratio"] > 0
