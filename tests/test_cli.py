"""The installed ``geocache`` entry point answers --help and --version."""

import re
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
    inspect = runner.invoke(main, ["cache", "inspect", str(tmp_path / "c")])
    assert inspect.exit_code == 0 and "(max_length 1024, truncated)" in inspect.output and "d.jsonl" in inspect.output  # where they came from
    assert re.search(r"lm bytes/token: \d+\.\d+", inspect.output) and re.search(r"k / m: 8 / \d+\n", inspect.output), inspect.output
    # --json: typed fields, numbers as numbers, as a script reads them.
    summary = json.loads(runner.invoke(main, ["cache", "inspect", str(tmp_path / "c"), "--json"]).output)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (summary["sequences"], summary["tokens"], summary["labelled_positions"]) == tuple(manifest["counts"][k] for k in ("sequences", "tokens", "positions"))
    assert (summary["k"], summary["m"], summary["bytes"]) == (8, manifest["statistics"]["m"], sum(s["bytes"] for s in manifest["shards"]))
    assert summary["lm_bytes_per_token"] > 0 and summary["router_bytes_per_token"] > 0 and summary["data"]["max_length"] == 1024
    assert summary["moe"]["num_experts"] == manifest["moe"]["num_experts"] and summary["moe"]["layers"] == len(manifest["moe"]["layers"])
    assert summary["data"]["source"] == manifest["data"]["source"]["files"] and summary["data"]["packing"] is False
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
        if "/logs/" in path:  # (the log's own full disk: tests/test_precompute.py)
            return real(fs, path, text)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(geocache.precompute, "atomic_write_text", full)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.startswith("error: No space left on device (") and "Traceback" not in result.output
    last = json.loads((out / "logs" / "precompute-rank-000.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "stopped" and "No space left on device" in last["error"]
    monkeypatch.setattr(geocache.precompute, "atomic_write_text", real)
    assert CliRunner().invoke(main, [*args, "--resume"]).exit_code == 0  # the shards written before were kept
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["compression"] = "zstd"  # a field this version does not know
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert result.exit_code != 0 and "does not have the cache manifest's fields" in result.output and "Traceback" not in result.output


def test_yaml_options_are_checked_against_their_types_before_any_work(tmp_path, tiny_model_dir):
    """A quoted "false" in a bool option was true: it turned on trust_remote_code (the model's own
    Python ran) and overwrite (an existing cache was replaced). Wrong types were tracebacks."""
    from geocache.precompute import PrecomputeConfig
    from geocache.train import TrainConfig

    model = tiny_model_dir("llama")
    data = _write_rows(tmp_path / "d.jsonl")
    runner = CliRunner()
    base = f"model: {model}\ndata: [{data}]\nmax_length: 16\nk: 4\n"
    done = runner.invoke(main, ["precompute", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "4",
                                "--max-length", "16", "--no-progress"])
    assert done.exit_code == 0, done.output
    manifest = (tmp_path / "c" / "manifest.json").read_text()
    for extra, message in (("overwrite: 'no'", "overwrite='no' must be true or false"),
                           ("trust_remote_code: yes please", "trust_remote_code='yes please' must be true or false"),
                           ("k: [8]", "k=[8] must be an integer"),
                           ("split: 5", "split=5 must be text"),
                           ("data: 5", "data=5 must be a list"),
                           ("seed: 1.5", "seed=1.5 must be an integer")):
        cfg = tmp_path / "p.yaml"
        cfg.write_text(base + extra + "\n")
        result = runner.invoke(main, ["precompute", "--config", str(cfg), "--out", str(tmp_path / "c"), "--no-progress"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}") and "\n" not in result.output.strip(), (extra, result.output)
        assert (tmp_path / "c" / "manifest.json").read_text() == manifest  # nothing replaced
    # Python values of the right kind pass: numpy scalars, sets and tensors for lists, a device index
    import numpy as np

    ok = TrainConfig(model="m", cache="c", out="o", layer_weights=torch.ones(2), target_modules={"q_proj"}, bf16=np.bool_(True), lora_r=np.int64(4))
    assert ok.layer_weights == [1.0, 1.0] and ok.target_modules == ["q_proj"] and ok.bf16 is True and ok.lora_r == 4
    assert PrecomputeConfig(model="m", data=tmp_path, out="o", device=0).data == [str(tmp_path)]
    with pytest.raises(ValueError, match=r"^max_steps must be given a value \(it cannot be null\)"):  # YAML `max_steps:` was a TypeError
        TrainConfig(model="m", cache="c", out="o", max_steps=None)
    # the text "false" / "true" is read as the bool it names; a quoted number as the number
    cfg = PrecomputeConfig(model="m", data="d", out="o", overwrite="false", dry_run="True", k="8")
    assert cfg.overwrite is False and cfg.dry_run is True and cfg.k == 8 and cfg.data == ["d"]
    with pytest.raises(ValueError, match=r"^model=\['llama'\] must be text"):
        TrainConfig(model=["llama"], cache="c", out="o")
    with pytest.raises(ValueError, match=r"^geometry=5 must be a mapping of GeometryConfig options"):
        TrainConfig(model="m", cache="c", out="o", geometry=5)
    (tmp_path / "g.yaml").write_text("geometry: 5\n")
    result = runner.invoke(main, ["train", "--config", str(tmp_path / "g.yaml"), "--model", "m", "--cache", "c", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "must be a mapping of geometry options" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option,value,message", [
    ("--learning-rate", "-1", "learning_rate=-1.0 must be a finite number >= 0"),
    ("--per-device-train-batch-size", "0", "per_device_train_batch_size=0 must be >= 1"),
    ("--gradient-accumulation-steps", "0", "gradient_accumulation_steps=0 must be >= 1"),
    ("--max-steps", "0", "max_steps=0 must be > 0"),
    ("--num-train-epochs", "0", "num_train_epochs=0.0 must be > 0"),
    ("--train-sampling-strategy", "banana", "train_sampling_strategy='banana' must be random"),
])
def test_train_numbers_are_checked_before_the_run_directory_is_touched(tmp_path, option, value, message):
    result = CliRunner().invoke(main, ["train", "--model", "m", "--cache", "c", "--out", str(tmp_path / "r"), option, value])
    assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
    assert not (tmp_path / "r").exists()


def test_bad_devices_and_missing_filesystem_packages_are_one_sentence(tmp_path, tiny_model_dir, monkeypatch):
    import fsspec

    model = tiny_model_dir("llama")
    data = _write_rows(tmp_path / "d.jsonl")
    runner = CliRunner()
    for device, message in (("banana", "device='banana' is not a device torch knows"),
                            *((("cuda:0", "device='cuda:0' is not available on this machine"),) if not torch.cuda.is_available() else ())):
        result = runner.invoke(main, ["precompute", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "c"), "--device", device])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}") and "Traceback" not in result.output, result.output

    def missing(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    result = runner.invoke(main, ["cache", "inspect", "s3://bucket/cache"])
    assert result.exit_code == 2 and "'s3://bucket/cache' needs a filesystem package that is not installed: Install s3fs" in result.output


def test_a_ctrl_c_while_the_command_line_loads_is_one_line_not_a_traceback(tmp_path):
    """torch and transformers take seconds to import, before click or the command's handler runs."""
    import signal
    import subprocess
    import sys
    import time

    script = Path(sys.executable).with_name("geocache")  # the installed console script
    assert script.exists(), script
    proc = subprocess.Popen([str(script), "train", "--model", "m", "--cache", "c", "--out", str(tmp_path / "r")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # (importing torch alone takes longer)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] in ("interrupted while starting: nothing was done", "interrupted: what was committed is kept; rerun it "
                                            "with --resume to continue from the last checkpoint (before the first one, the same command starts the run again)")


def test_an_interrupted_command_says_what_is_kept_and_exits_130(tmp_path, tiny_model_dir, monkeypatch):
    import geocache.precompute

    def interrupted(cfg, timings=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(geocache.precompute, "precompute", interrupted)
    result = CliRunner().invoke(main, ["precompute", "--model", "m", "--data", "d", "--out", str(tmp_path / "c")])
    assert result.exit_code == 130 and "interrupted: what was committed is kept; rerun it with --resume to continue after the last" in result.output
    import geocache.profile

    monkeypatch.setattr(geocache.profile, "run_profile", lambda cfg, log=print: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(main, ["profile", "--model", "m", "--data", "d", "--out", str(tmp_path / "p")])
    assert result.exit_code == 130 and "--resume" not in result.output and "rerun the command" in result.output  # profile has no --resume


def test_an_empty_precompute_leaves_no_complete_cache(tmp_path, tiny_model_dir):
    data = _write_rows(tmp_path / "d.jsonl")
    result = CliRunner().invoke(main, ["precompute", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--out", str(tmp_path / "c"),
                                       "--split", "train[:0]", "--no-progress"])
    assert result.exit_code == 2, result.output
    verify = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "c")])
    assert verify.exit_code != 0, verify.output  # it said "ok" to an empty cache marked complete


@pytest.mark.parametrize("bench", ["fidelity", "parity", "calibration"])
def test_bench_replot_of_a_result_of_another_shape_is_one_sentence(tmp_path, bench):
    (tmp_path / f"{bench}.json").write_text('{"something": "else"}')
    result = CliRunner().invoke(main, ["bench", bench, "--replot", "--out", str(tmp_path)])
    assert result.exit_code == 2 and f"{bench}.json is not a {bench} benchmark's result" in result.output, result.output
    assert not (tmp_path / f"{bench}.md").exists()
    missing = CliRunner().invoke(main, ["bench", bench, "--replot", "--out", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "does not exist: --replot rewrites" in missing.output


def test_benchmark_and_reference_options_are_refused_before_minutes_of_pretraining(tmp_path):
    from geocache.bench.calibration import CalibrationConfig
    from geocache.bench.parity import ParityConfig
    from geocache.reference import ReferenceRecipe, build_reference_model

    for cls in (ParityConfig, CalibrationConfig):
        with pytest.raises(ValueError, match=r"learning_rate=nan must be a finite number > 0"):
            cls(learning_rate=float("nan"))
        with pytest.raises(ValueError, match=r"learning_rate=-1.0 must be a finite number > 0"):
            cls(learning_rate=-1.0)
        with pytest.raises(ValueError, match=r"device='banana' is not a device torch knows"):
            cls(device="banana")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"cache directory .* cannot be written"):  # was found after the pretraining
        build_reference_model(ReferenceRecipe(steps=1), cache_dir=tmp_path / "file")


def test_data_that_is_not_utf8_names_its_file(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    runner = CliRunner()
    result = runner.invoke(main, ["precompute", "--model", str(model), "--data", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "a"),
                                  "--no-progress"])
    assert result.exit_code == 2 and "row 0: line 1 of" in result.output and "latin1.jsonl is not UTF-8 text" in result.output
    skipped = runner.invoke(main, ["precompute", "--model", str(model), "--data", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "b"),
                                   "--skip-bad-rows", "--no-progress"])
    assert skipped.exit_code == 0 and "skipped 1 malformed row(s)" in skipped.output  # a bad line is a bad row, skippable
    result = runner.invoke(main, ["precompute", "--model", str(model), "--data", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "c"),
                                  "--no-progress"])
    assert result.exit_code == 2 and "latin1.txt is not UTF-8 text" in result.output and "Traceback" not in result.output


def test_demo_reference_and_bench_take_a_yaml_config_with_cli_overrides(tmp_path, monkeypatch):
    import geocache.demo

    seen = []
    monkeypatch.setattr(geocache.demo, "run_demo", lambda out, steps, pretrain_steps, **kw: seen.append((out, steps, pretrain_steps)) or {})
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"out: {tmp_path / 'd'}\nsteps: 7\npretrain_steps: 9\n")
    result = CliRunner().invoke(main, ["demo", "--config", str(cfg), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert seen == [(str(tmp_path / "d"), 5, 9)]  # steps from the command line, the rest from the file
    cfg.write_text("step: 7\n")
    bad = CliRunner().invoke(main, ["demo", "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown demo option(s) ['step'] (did you mean: step → steps?)" in bad.output
    import geocache.bench.fidelity

    got = []
    monkeypatch.setattr(geocache.bench.fidelity, "run_fidelity", lambda cfg, log=print: got.append(cfg))
    (tmp_path / "f.yaml").write_text("ks: [8, 16]\nms: 0,4\n")  # a YAML list or the CLI's comma form
    result = CliRunner().invoke(main, ["bench", "fidelity", "--config", str(tmp_path / "f.yaml"), "--out", str(tmp_path / "fo")])
    assert result.exit_code == 0, result.output
    assert list(got[0].ks) == [8, 16] and list(got[0].ms) == [0, 4]
    for command in (["reference"], ["bench", "fidelity"], ["bench", "parity"], ["bench", "calibration"]):
        result = CliRunner().invoke(main, [*command, "--config", str(tmp_path / "none.yaml")])
        assert result.exit_code == 2 and "does not exist" in result.output, (command, result.output)


def test_text_sample_by_is_refused_where_no_text_file_is_read(tmp_path, tiny_model_dir):
    # It splits .txt files only; given with JSONL it was ignored without a word (rows stayed one per line).
    data = _write_rows(tmp_path / "d.jsonl")
    result = CliRunner().invoke(main, ["precompute", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--out", str(tmp_path / "c"),
                                       "--text-sample-by", "document", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "text_sample_by='document' splits .txt files only, but data" in result.output and "holds json files" in result.output
    assert not (tmp_path / "c" / "manifest.json").exists()
    # So are a hub dataset's options for local data, before the model loads (no model is named here).
    for option, value in (("--subset", "en"), ("--data-revision", "abc123")):
        result = CliRunner().invoke(main, ["precompute", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "c"),
                                           option, value, "--no-progress"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {option[2:].replace('-', '_')}={value!r} selects a hub "
                                                                  "dataset's configuration or commit, but data"), result.output
        assert "is local: drop the option" in result.output
    (tmp_path / "d.txt").write_text("one line\nanother line\n")
    ok = CliRunner().invoke(main, ["precompute", "--model", str(tiny_model_dir("llama")), "--data", str(tmp_path / "d.txt"),
                                   "--out", str(tmp_path / "t"), "--text-sample-by", "document", "--no-progress"])
    assert ok.exit_code == 0, ok.output


def test_compile_stats_reaches_precompute_from_the_command_line_and_yaml(tmp_path, tiny_model_dir, monkeypatch):
    """--compile-stats / --no-compile-stats / neither (None: the device's default), and the same
    key in a --config file, arrive in the PrecomputeConfig that precompute runs."""
    import geocache.precompute as pre

    seen = []
    real = pre.config_from_options
    monkeypatch.setattr(pre, "config_from_options", lambda options: seen.append(real(options)) or seen[-1])
    model, data = str(tiny_model_dir("qwen3")), str(_write_rows(tmp_path / "d.jsonl"))
    (tmp_path / "c.yaml").write_text("compile_stats: true\n")
    runner = CliRunner()
    for extra in (["--compile-stats"], ["--no-compile-stats"], [], ["--config", str(tmp_path / "c.yaml")]):
        result = runner.invoke(main, ["precompute", "--model", model, "--data", data, "--dry-run", *extra])
        assert result.exit_code == 0, result.output
    assert [cfg.compile_stats for cfg in seen] == [True, False, None, True]
