"""The installed ``geocache`` entry point answers --help and --version."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import geocache
from geocache_cli.main import main


def test_help_and_version_through_click():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "geometry-aware" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"geocache, version {geocache.__version__}"


def test_installed_console_script_runs():
    exe = shutil.which("geocache", path=str(Path(sys.executable).parent)) or shutil.which("geocache")
    assert exe, "the geocache console script is not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"geocache, version {geocache.__version__}"
    bad = subprocess.run([exe, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "No such command" in bad.stderr


def test_cli_is_not_installed_as_a_bare_top_level_module():
    import importlib.util

    assert importlib.util.find_spec("geocache_cli") is not None
    spec = importlib.util.find_spec("cli")
    assert spec is None or "site-packages" not in str(spec.origin or "")


def _write_rows(path, n=12):
    import json

    path.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}"}) for i in range(n)))
    return path


def test_precompute_inspect_and_verify_from_the_command_line(tmp_path, tiny_model_dir, monkeypatch):
    import json

    runner = CliRunner()
    data = _write_rows(tmp_path / "d.jsonl")
    model = str(tiny_model_dir("qwen3_moe"))
    dry = runner.invoke(main, ["precompute", "--model", model, "--data", str(data), "--dry-run", "--top-k", "8", "--no-progress"])
    assert dry.exit_code == 0, dry.output
    estimate = json.loads(dry.output)
    assert estimate["sequences"] == 12 and estimate["tokens"] > 12 and estimate["router_bytes"] > 0
    assert not (tmp_path / "c").exists()
    out = runner.invoke(main, ["precompute", "--model", model, "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "8", "--no-progress"])
    assert out.exit_code == 0 and "cached 12 sequences" in out.output
    assert estimate["tokens"] == json.loads((tmp_path / "c" / "manifest.json").read_text())["counts"]["tokens"]
    inspect = runner.invoke(main, ["cache", "inspect", str(tmp_path / "c"), "--json"])
    summary = json.loads(inspect.output)
    assert summary["sequences"] == 12 and summary["lm bytes/token"] > 0 and summary["router bytes/token"] > 0
    assert summary["data"].endswith("(max_length 1024, truncated)") and "d.jsonl" in summary["data"]  # where the sequences came from
    assert runner.invoke(main, ["cache", "verify", str(tmp_path / "c")]).exit_code == 0
    victim = next(p for p in (tmp_path / "c" / "shards").rglob("*") if p.is_file() and p.name != "zarr.json")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    bad = runner.invoke(main, ["cache", "verify", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "fails its checksum" in bad.output
    # The model's own logits instead of the fused projection (never probed for): the same rows, up to float rounding.
    import geocache.precompute

    probe = geocache.precompute._plain_head
    monkeypatch.setattr(geocache.precompute, "_plain_head", lambda model: pytest.fail("--no-fused-head still probed the head"))
    plain = runner.invoke(main, ["precompute", "--model", model, "--data", str(data), "--out", str(tmp_path / "p"), "--top-k", "8",
                                 "--no-fused-head", "--no-progress"])
    assert plain.exit_code == 0, plain.output
    monkeypatch.setattr(geocache.precompute, "_plain_head", probe)
    ref = runner.invoke(main, ["precompute", "--model", model, "--data", str(data), "--out", str(tmp_path / "f"), "--top-k", "8", "--no-progress"])
    assert ref.exit_code == 0, ref.output
    from geocache.cache import open_cache

    a, b = open_cache(str(tmp_path / "p")), open_cache(str(tmp_path / "f"))
    assert all(torch.allclose(a[i]["lse"], b[i]["lse"], atol=1e-5) and torch.equal(a[i]["topk_ids"], b[i]["topk_ids"]) for i in range(len(a)))


def test_bad_command_line_input_is_one_sentence_and_exit_2(tmp_path, tiny_model_dir):
    runner = CliRunner()
    data = _write_rows(tmp_path / "d.jsonl")
    missing = runner.invoke(main, ["precompute", "--data", str(data), "--out", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "--model is required" in missing.output
    nodata = runner.invoke(main, ["precompute", "--model", str(tiny_model_dir("llama")), "--data", str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "c")])
    assert nodata.exit_code == 2 and "do not exist" in nodata.output and "Traceback" not in nodata.output
    nomodel = runner.invoke(main, ["precompute", "--model", str(tmp_path / "nomodel"), "--data", str(data), "--out", str(tmp_path / "c")])
    assert nomodel.exit_code == 2 and "neither a local model directory nor a reachable hub model" in nomodel.output
    notcache = runner.invoke(main, ["cache", "inspect", str(tmp_path)])
    assert notcache.exit_code == 2 and "is not a geocache cache" in notcache.output


def test_yaml_config_with_cli_overrides(tmp_path, tiny_model_dir):
    import json

    data = _write_rows(tmp_path / "d.jsonl")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"model: {tiny_model_dir('llama')}\ndata: [{data}]\nk: 4\nmax_length: 16\nbackend: arrow\n")
    result = CliRunner().invoke(main, ["precompute", "--config", str(cfg), "--out", str(tmp_path / "c"), "--top-k", "6", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["statistics"]["k"] == 6 and manifest["backend"] == "arrow"
    assert manifest["data"]["preprocessing"]["max_length"] == 16
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    bad = CliRunner().invoke(main, ["precompute", "--config", str(tmp_path / "bad.yaml"), "--model", "m", "--data", "d", "--out", "o"])
    assert bad.exit_code == 2 and "unknown precompute option(s) ['modle']" in bad.output


def test_a_full_disk_and_an_unreadable_manifest_are_one_sentence_each(tmp_path, tiny_model_dir, monkeypatch):
    import errno
    import json

    import geocache.precompute

    model, data, out = str(tiny_model_dir("llama")), _write_rows(tmp_path / "d.jsonl"), tmp_path / "c"
    args = ["precompute", "--model", model, "--data", str(data), "--out", str(out), "--top-k", "4", "--max-length", "48", "--no-progress"]
    real = geocache.precompute.atomic_write_text

    def full(fs, path, text):  # the rank's part file or the merged manifest: the last writes of a run
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(geocache.precompute, "atomic_write_text", full)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.startswith("error: No space left on device (") and "Traceback" not in result.output
    monkeypatch.setattr(geocache.precompute, "atomic_write_text", real)
    assert CliRunner().invoke(main, [*args, "--resume"]).exit_code == 0  # the shards written before were kept
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["compression"] = "zstd"  # a field this version does not know
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert result.exit_code != 0 and "does not have the cache manifest's fields" in result.output and "Traceback" not in result.output
