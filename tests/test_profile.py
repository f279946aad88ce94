"""geocache profile: the file it writes, the calibration profile, classification, drift, and the
recommended config being a config that geocache train accepts."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from geocache.profile import CLASSES, ProfileConfig, _Calibration, classify, recommended
from geocache_cli.main import main


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    import inspect
    import json as js
    import textwrap

    root = tmp_path_factory.mktemp("profile-data")
    code = [c for c in inspect.getsource(textwrap).split("\n\n") if c.strip()][:20]
    prose = [c for c in (textwrap.__doc__ or "").split("\n") if c.strip()] + [f"Plain words number {i} for the second domain." for i in range(20)]
    for name, rows in (("code", code), ("prose", prose)):
        (root / f"{name}.jsonl").write_text("".join(js.dumps({"text": r}) + "\n" for r in rows))
    return root


def _check_verdict(v):
    assert set(v) >= {"value", "ci_low", "ci_high", "pass", "tokens"}
    if v["value"] is not None:
        assert v["ci_low"] <= v["ci_high"] and v["pass"] == (v["value"] < 0 and v["ci_high"] < 0)


def test_profile_of_a_moe_model_writes_the_documented_schema_and_a_usable_config(tmp_path, tiny_model_dir, texts):
    from geocache.data import DataConfig
    from geocache.precompute import PrecomputeConfig, precompute

    model = tiny_model_dir("qwen3_moe")
    out = tmp_path / "p"
    r = CliRunner().invoke(main, ["profile", "--model", str(model), "--data", f"code={texts / 'code.jsonl'}", "--data", str(texts / "prose.jsonl"),
                                  "--out", str(out), "--max-length", "48", "--n-resamples", "300", "--reservoir-tokens", "300"])
    assert r.exit_code == 0, r.output
    p = json.loads((out / "profile.json").read_text())
    assert p["format_version"] == 1 and p["moe"] and p["moe_layers"] == [0, 1, 2] and p["primary_domain"] == "code"
    assert list(p["domains"]) == ["code", "prose"]
    for d in p["domains"].values():
        assert d["tokens"] > 300  # more tokens than the reservoir keeps: bounded memory
        for layer in d["v2"]["layers"]:
            _check_verdict(layer["delta_bi"]), _check_verdict(layer["delta_brand"])
            t = layer["tokens"]
            assert t["all"] == 300 and t["seen"] == d["tokens"] and 0 < t["boundary"] < t["interior"] < t["all"]
        for agg in ("mean", "midband"):
            _check_verdict(d["v2"]["aggregate"][agg]["delta_bi"]), _check_verdict(d["v2"]["aggregate"][agg]["delta_brand"])
        means = np.mean([lay["delta_bi"]["value"] for lay in d["v2"]["layers"]])
        assert d["v2"]["aggregate"]["mean"]["delta_bi"]["value"] == pytest.approx(means)
        c = d["calibration"]
        assert 0 <= c["ece_top1"] <= 1 and c["positions"] > 0 and sum(c["ece_bins"]["count"]) == c["positions"]
    cls = p["classification"]
    assert cls["classification"] in {name for name, _ in CLASSES.values()} and isinstance(cls["strategy"], str)
    for f in ("profile.md", "profile.png", "recommended.yaml"):
        assert (out / f).stat().st_size > 0
    # recommended.yaml: every value commented, and accepted by geocache train as its --config.
    text = (out / "recommended.yaml").read_text()
    assert all("#" in line for line in text.splitlines() if ":" in line and not line.strip().endswith("geometry:"))
    conf = yaml.safe_load(text)
    assert conf["model"] == str(model) and conf["geometry"]["kl_threshold"] in (0.08, 0.15)
    # A model named relative to where profile ran is written absolute: the file works from anywhere.
    from geocache.profile import recommended

    here = os.getcwd()
    os.chdir(Path(model).parent)
    try:
        rows = {key: value for key, value, _ in recommended({**p, "model": Path(model).name})}
    finally:
        os.chdir(here)
    assert rows["model"] == str(Path(model).resolve())
    precompute(PrecomputeConfig(model=str(model), data=[str(texts / "code.jsonl")], out=str(tmp_path / "c"), progress=False,
                                data_config=DataConfig(max_length=48)))
    r = CliRunner().invoke(main, ["train", "--config", str(out / "recommended.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"),
                                  "--max-steps", "1", "--use-cpu"])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "run" / "geocache_run.yaml").read_text())
    assert saved["geometry"]["lambda_router"] == conf["geometry"]["lambda_router"]


def test_profile_of_a_dense_model_is_calibration_only(tmp_path, tiny_model_dir, texts):
    out = tmp_path / "p"
    r = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3")), "--data", str(texts / "code.jsonl"), "--out", str(out),
                                  "--max-length", "48"])
    assert r.exit_code == 0, r.output
    p = json.loads((out / "profile.json").read_text())
    assert not p["moe"] and "v2" not in p["domains"]["code"]
    assert p["classification"]["classification"] in ("well-calibrated", "poorly-calibrated") and p["classification"]["c1_pass"] is None
    assert "lambda_router" not in yaml.safe_load((out / "recommended.yaml").read_text())["geometry"]
    # A second profile into the same --out is refused and the first one kept, unless --overwrite.
    first = (out / "profile.json").read_bytes()
    again = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3")), "--data", str(texts / "code.jsonl"), "--out", str(out),
                                      "--max-length", "32"])
    assert again.exit_code == 2 and "already holds a profile (profile.json): pass --overwrite" in again.output, again.output
    assert (out / "profile.json").read_bytes() == first
    again = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3")), "--data", str(texts / "code.jsonl"), "--out", str(out),
                                      "--max-length", "32", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "profile.json").read_text())["config"]["max_length"] == 32
    # A directory of the user's is never written into (its recommended.yaml was replaced), nor is a
    # file taken for one; a refused run leaves no empty --out behind.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recommended.yaml").write_text("mine: true\n")
    args = ["--model", str(tiny_model_dir("qwen3")), "--data", str(texts / "code.jsonl"), "--max-length", "32"]
    for extra in ([], ["--overwrite"]):
        r = CliRunner().invoke(main, ["profile", *args, "--out", str(mine), *extra])
        assert r.exit_code == 2 and "is not empty and holds no profile: choose another --out" in r.output, r.output
        assert (mine / "recommended.yaml").read_text() == "mine: true\n" and len(list(mine.iterdir())) == 1
    r = CliRunner().invoke(main, ["profile", *args, "--out", str(mine / "recommended.yaml")])
    assert r.exit_code == 2 and "is a file: give a directory" in r.output, r.output
    r = CliRunner().invoke(main, ["profile", "--model", str(tmp_path / "no-model"), "--data", str(texts / "code.jsonl"), "--out", str(tmp_path / "new")])
    assert r.exit_code == 2 and not (tmp_path / "new").exists(), r.output


def test_an_identity_adapter_shows_no_drift_and_the_same_v2(tmp_path, tiny_model_dir, texts):
    from geocache.trainer import add_dora_adapter

    model_dir = tiny_model_dir("qwen3_moe")
    torch.manual_seed(0)
    peft_model = add_dora_adapter(AutoModelForCausalLM.from_pretrained(model_dir), r=4, alpha=8)  # B = 0: the identity
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "p"
    args = ["profile", "--model", str(model_dir), "--data", str(texts / "code.jsonl"), "--out", str(out), "--max-length", "48", "--n-resamples", "200"]
    assert CliRunner().invoke(main, args + ["--adapter", str(tmp_path / "adapter")]).exit_code == 0
    d = json.loads((out / "profile.json").read_text())["domains"]["code"]
    for dr in d["tuned"]["drift"]:
        assert dr["jaccard_mean"] == 1.0 and dr["flip_rate_boundary"] == 0.0 and dr["tokens"]["boundary"] > 0
    for a, b in zip(d["v2"]["layers"], d["tuned"]["v2"]["layers"]):
        assert a["delta_bi"]["value"] == pytest.approx(b["delta_bi"]["value"], abs=1e-6)
        assert a["delta_brand"]["value"] == pytest.approx(b["delta_brand"]["value"], abs=1e-6)  # the same random experts too
    # A perturbed adapter moves routing: some top-k sets change, more at low margins than at high ones.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter2")
    assert CliRunner().invoke(main, args + ["--adapter", str(tmp_path / "adapter2"), "--out", str(tmp_path / "p2")]).exit_code == 0
    drift = json.loads((tmp_path / "p2" / "profile.json").read_text())["domains"]["code"]["tuned"]["drift"]
    assert min(dr["jaccard_mean"] for dr in drift) < 1.0
    assert np.mean([dr["flip_rate_boundary"] for dr in drift]) > np.mean([dr["flip_rate_interior"] for dr in drift])
    md = (tmp_path / "p2" / "profile.md").read_text()
    assert "Drift against the base" in md and "Calibration of the tuned model: entropy mean" in md  # (it showed the base's only)
    assert "Calibration of the tuned model" in (out / "profile.md").read_text() and "Against the base: entropy +0.000 nats, NLL +0.000" in (out / "profile.md").read_text()


def test_calibration_profile_matches_torchmetrics_and_direct_sums():
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(0)
    cal, ref = _Calibration(seed=0, capacity=10_000), MulticlassCalibrationError(num_classes=50, n_bins=15, norm="l1")
    all_logits, all_targets = [], []
    for _ in range(4):
        logits, targets = torch.randn(300, 50, generator=g) * 3, torch.randint(0, 50, (300,), generator=g)
        cal.add(logits, targets)
        ref.update(torch.softmax(logits, -1), targets)
        all_logits.append(logits), all_targets.append(targets)
    res = cal.result()
    assert res["ece_top1"] == pytest.approx(ref.compute().item(), abs=1e-6)
    lp = torch.log_softmax(torch.cat(all_logits), -1)
    ent = -(lp.exp() * lp).sum(-1)
    nll = -lp.gather(-1, torch.cat(all_targets)[:, None]).squeeze(-1)
    assert res["entropy_mean"] == pytest.approx(ent.mean().item(), rel=1e-5)
    assert res["calibration_gap_mean"] == pytest.approx((nll - ent).mean().item(), rel=1e-5)
    assert res["entropy_quantiles"]["p50"] == pytest.approx(ent.median().item(), abs=0.02)


@pytest.mark.parametrize("c1,c2,name", [(True, True, "both-pass"), (True, False, "deepseek-like"), (False, True, "qwen-like"), (False, False, "both-weak")])
def test_classification_and_recommendation_follow_the_note(c1, c2, name):
    agg = {"delta_bi": {"pass": c1}, "delta_brand": {"pass": c2}}
    calib = {"calibration_gap_mean": 0.02, "ece_top1": 0.01}
    cls = classify(agg, calib)
    assert cls["classification"] == name and cls["well_calibrated"]
    rec = {k: v for k, v, _ in recommended({"model": "m", "moe": True, "classification": cls, "calibration": calib})}
    gentle = name in ("qwen-like", "both-pass")
    assert rec["geometry.kl_threshold"] == (0.15 if gentle else 0.08) and rec["geometry.lambda_kl"] == (0.15 if gentle else 0.4)
    assert rec["geometry.lambda_router"] == (0.1 if gentle else 0.5)
    assert classify(None, {"calibration_gap_mean": 0.6, "ece_top1": 0.09})["classification"] == "poorly-calibrated"


def test_profile_bad_input_is_one_sentence(tmp_path, tiny_model_dir, texts):
    with pytest.raises(ValueError, match="give one"):
        ProfileConfig(model="m", data=["x"], out="o", adapter="a", tuned="t")
    with pytest.raises(ValueError, match="domain name 'a' is given twice: give each domain its own NAME$"):  # (it said "name them with NAME=PATH")
        ProfileConfig(model="m", data=["a=x.jsonl", "a=y.jsonl"], out="o").domains()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    same = [str(tmp_path / d / "code.jsonl") for d in ("one", "two")]
    for path in same:
        Path(path).write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="two files are named 'code': name them with NAME=PATH"):
        ProfileConfig(model="m", data=same, out="o").domains()
    r = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "do not exist" in r.output
    r = CliRunner().invoke(main, ["profile", "--data", str(texts / "code.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--model is required" in r.output


def test_drift_against_a_separate_tuned_model(tmp_path, tiny_model_dir, texts):
    model_dir = tiny_model_dir("qwen3_moe")
    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # move the attention a little: routing inputs change, routers do not
        for name, p in tuned.named_parameters():
            if "self_attn.o_proj" in name:
                p.add_(torch.randn_like(p) * 0.5)
    tuned.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned").joinpath("tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tuned").joinpath("tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    out = tmp_path / "p"
    r = CliRunner().invoke(main, ["profile", "--model", str(model_dir), "--tuned", str(tmp_path / "tuned"), "--data", str(texts / "code.jsonl"),
                                  "--out", str(out), "--max-length", "48", "--n-resamples", "200"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "profile.json").read_text())["domains"]["code"]
    assert len(d["tuned"]["drift"]) == 3 and min(dr["jaccard_mean"] for dr in d["tuned"]["drift"]) < 1.0
    assert d["tuned"]["calibration"]["nll_mean"] != d["calibration"]["nll_mean"]


def test_v2_profile_benchmark_worker_smoke(tiny_model_dir, texts):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import v2_profile

    for variant in v2_profile.VARIANTS:
        r = v2_profile.worker({"variant": variant, "model": str(tiny_model_dir("qwen3_moe")), "data": str(texts / "code.jsonl"), "sequences": 4,
                               "max_length": 32, "batch_size": 2, "reps": 1, "n_resamples": 50})
        assert r["tokens"] > 0 and r["s"] > 0 and len(r["times_s"]) == 1


def test_more_bad_input_is_one_sentence(tmp_path, tiny_model_dir, texts):
    from geocache.bench.parity import ParityConfig
    from geocache.reference import ReferenceRecipe
    from geocache.train import TrainConfig

    for opt in ("--batch-size", "--n-resamples", "--reservoir-tokens"):
        r = CliRunner().invoke(main, ["profile", "--model", "m", "--data", str(texts / "code.jsonl"), "--out", str(tmp_path / "o"), opt, "0"])
        assert r.exit_code == 2 and "must be >= 1" in r.output, r.output
    (tmp_path / "file").write_text("")
    r = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(texts / "code.jsonl"),
                                  "--out", str(tmp_path / "file" / "sub")])
    assert r.exit_code == 2 and "cannot be written" in r.output
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    r = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(tmp_path / "blank.jsonl"), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "row 0" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["reference", "--steps", "0", "--cache-dir", str(tmp_path / "ref")])
    assert r.exit_code == 2 and "steps=0 must be >= 1" in r.output
    with pytest.raises(ValueError, match="steps=0"):
        ParityConfig(steps=0)
    assert ParityConfig(steps=4).logging_steps == 4
    assert TrainConfig(model="m", cache="c", out="o", v2_every=2, v2_data="held.jsonl").v2_data == ["held.jsonl"]
    with pytest.raises(ValueError, match="split_fractions"):
        ReferenceRecipe(split_fractions=(0.5, 0.5, 0.5))


def test_an_adapter_of_another_base_is_one_sentence(tmp_path, tiny_model_dir, texts):
    from geocache.trainer import add_dora_adapter

    add_dora_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), r=2, alpha=4).save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match=rf"was saved on base {re.escape(repr(str(tiny_model_dir('llama'))))}, not --model"):  # first warned
        result = CliRunner().invoke(main, ["profile", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(texts / "code.jsonl"),
                                           "--out", str(tmp_path / "p"), "--adapter", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "does not load onto model" in result.output and "\n" not in result.output.strip(), result.output
    # A run directory (or any directory without adapter_config.json) is not "another base's" adapter.
    (tmp_path / "run").mkdir()
    (tmp_path / "adapter").rename(tmp_path / "run" / "adapter")
    for given, message in ((tmp_path / "run", rf"adapter '.*run' has no adapter_config.json: give the adapter's own directory \(it holds "
                                                rf"adapter: give one of those, e.g. .*run/adapter\)"), (tmp_path / "nope", r"adapter '.*nope' does not exist")):
        result = CliRunner().invoke(main, ["profile", "--model", str(tmp_path / "no-model"), "--data", str(texts / "code.jsonl"),
                                           "--out", str(tmp_path / "p"), "--adapter", str(given)])
        assert result.exit_code == 2 and re.search(message, result.output) and "\n" not in result.output.strip(), result.output
    assert not (tmp_path / "p").exists()


def test_profile_takes_a_yaml_config_with_cli_overrides_and_shows_progress(tmp_path, tiny_model_dir, texts):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"model: {tiny_model_dir('qwen3_moe')}\ndata: [code={texts / 'code.jsonl'}]\nmax_length: 32\nmax_sequences: 4\n"
                   "n_resamples: 50\n")
    result = CliRunner().invoke(main, ["profile", "--config", str(cfg), "--out", str(tmp_path / "p"), "--max-sequences", "3"])
    assert result.exit_code == 0, result.output
    p = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert p["config"]["max_length"] == 32 and p["config"]["max_sequences"] == 3 and p["domains"]["code"]["sequences"] == 3
    assert "profile code" in result.output and "tok_s" in result.output  # the bar (stderr, mixed into the runner's output)
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    bad = CliRunner().invoke(main, ["profile", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "unknown profile option(s) ['modle']" in bad.output
    (tmp_path / "broken.yaml").write_text("model: [x\n")
    broken = CliRunner().invoke(main, ["profile", "--config", str(tmp_path / "broken.yaml")])
    assert broken.exit_code == 2 and "is not valid YAML" in broken.output and "\n" not in broken.output.strip()
