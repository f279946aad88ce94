"""V2-gated training: the policy's every branch, each action's effect inside a real training run
(through an injected V2 signal), and one short run with the real measurement."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from geocache.config import GeometryConfig
from geocache.data import DataConfig
from geocache.gate import V2Gate
from geocache.precompute import PrecomputeConfig, precompute
from geocache.train import TrainConfig, train


def R(bi, brand, pass_bi=None, pass_brand=None):
    """A V2 result as the signal returns it (pass defaults to value < 0)."""
    return {"delta_bi": {"value": bi, "ci_low": bi - 0.01, "ci_high": bi + 0.01, "pass": bi < 0 if pass_bi is None else pass_bi},
            "delta_brand": {"value": brand, "ci_low": brand - 0.01, "ci_high": brand + 0.01, "pass": brand < 0 if pass_brand is None else pass_brand}}


def test_the_gate_watches_what_the_base_passed_and_reaches_every_decision():
    g = V2Gate(patience=2, action="halve_lr")
    assert g.start(R(0.01, -0.02)) == ("delta_brand",)  # Qwen-like base: only C2 is watched
    assert g.decide(R(0.05, -0.01)) == "save"  # C2 still passes (C1 is not watched)
    assert g.decide(R(0.05, 0.02)) == "wait"  # fails, worse than before: first bad check
    assert g.decide(R(0.05, 0.01)) == "continue"  # fails but improving: the count resets
    assert g.decide(R(0.05, 0.03)) == "wait"
    assert g.decide(R(0.05, 0.04)) == "halve_lr"  # second bad check in a row: the action
    assert g.state.bad_checks == 0
    assert V2Gate().start(R(-0.01, -0.02)) == ("delta_bi", "delta_brand")
    assert V2Gate().start(R(0.01, 0.02)) == ("delta_bi", "delta_brand")  # nothing passed: watch both
    both = V2Gate(patience=1, action="rollback")
    both.start(R(-0.01, -0.01))
    assert both.decide(R(-0.02, 0.01)) == "rollback" and both.decide(R(-0.02, -0.02)) == "save"
    with pytest.raises(ValueError, match="v2_action"):
        V2Gate(action="panic")


class Scripted:
    """An injected V2 signal: returns the next scripted result at every call."""

    def __init__(self, results):
        self.results, self.calls = list(results), 0

    def __call__(self, model):
        self.calls += 1
        return self.results.pop(0)


class Recorder(TrainerCallback):
    """Records, after the gate acted at each step, the adapter, optimizer lr and λ's."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.steps[state.global_step] = {"adapter": {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()},
                                         "lr": optimizer.param_groups[0]["lr"],
                                         "exp_avg": [optimizer.state[p]["exp_avg"].clone() for g in optimizer.param_groups for p in g["params"]
                                                     if p in optimizer.state][:3]}


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_model_dir):
    import inspect
    import textwrap

    root = tmp_path_factory.mktemp("gate")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in inspect.getsource(textwrap).split("\n\n")[:40] if c.strip()))
    model = tiny_model_dir("qwen3_moe")
    precompute(PrecomputeConfig(model=str(model), data=[str(data)], out=str(root / "cache"), progress=False, data_config=DataConfig(max_length=48)))
    return model, root / "cache", data


def _run(moe_run, out, action, script, steps=8, **geometry):
    model, cache, data = moe_run
    rec = Recorder()
    cfg = TrainConfig(model=str(model), cache=str(cache), out=str(out), max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant",
                      per_device_train_batch_size=4, logging_steps=2, seed=0, progress=False, use_cpu=True, lora_r=4, lora_alpha=8,
                      v2_every=2, v2_data=[str(data)], v2_patience=1, v2_action=action, geometry=GeometryConfig(**geometry))
    signal = Scripted(script)
    trainer = train(cfg, callbacks=[rec], v2_signal=signal)
    checks = [json.loads(line) for line in (out / "v2_checks.jsonl").read_text().splitlines()]
    return trainer, rec, checks, signal


def test_checkpoints_only_when_v2_passes_and_rollback_restores_adapter_and_optimizer(tmp_path, moe_run):
    # start (both pass) → step 2 pass (save) → 4 fail, worse (rollback, patience 1) → 6 fail: better than step 4 but worse than
    # step 2, the state rolled back to, so not improving (rollback again) → 8 pass (save)
    script = [R(-0.02, -0.02), R(-0.03, -0.03), R(0.01, 0.02), R(0.005, 0.01), R(-0.01, -0.02)]
    trainer, rec, checks, signal = _run(moe_run, tmp_path / "run", "rollback", script)
    assert signal.calls == 5 and [c["decision"] for c in checks] == ["start", "save", "rollback", "rollback", "save"]
    assert checks[3]["rolled_back_to_step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]
    assert checks[2]["rolled_back_to_step"] == 2 and checks[2]["delta_brand_value"] == 0.02 and checks[2]["watch"] == ["delta_bi", "delta_brand"]
    # After the rollback at step 4 the adapter is step 2's, the one saved in checkpoint-2.
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    after = rec.steps[4]["adapter"]
    assert set(saved) == set(after)
    for k in saved:
        torch.testing.assert_close(after[k], saved[k])
    assert any(not torch.equal(rec.steps[3]["adapter"][k], after[k]) for k in after)  # it did move back
    # ... and so is the optimizer state (Adam's first moments), also as saved there.
    for a, b in zip(rec.steps[4]["exp_avg"], rec.steps[2]["exp_avg"]):
        torch.testing.assert_close(a, b)
    logged = [r for r in trainer.state.log_history if "v2_decision" in r]
    assert [r["v2_decision"] for r in logged] == ["start", "save", "rollback", "rollback", "save"]
    # the checks every 2 steps leave the training log of those (logging) steps in place
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [2, 4, 6, 8]


def test_a_rollback_at_the_last_check_saves_the_rolled_back_adapter_and_says_so(tmp_path, moe_run):
    from geocache_cli.main import train_summary

    script = [R(-0.02, -0.02), R(-0.03, -0.03), R(0.01, 0.02)]  # start → step 2 pass (save) → step 4, the last, fails: rollback
    trainer, _, checks, _ = _run(moe_run, tmp_path / "run", "rollback", script, steps=4)
    assert [c["decision"] for c in checks] == ["start", "save", "rollback"]
    final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert set(final) == set(saved) and all(torch.equal(final[k], saved[k]) for k in saved)
    line = train_summary(trainer.state, str(tmp_path / "run"))
    assert line.startswith("trained 4 steps;") and "the V2 gate's last check (step 4) rolled the adapter back to step 2" in line
    trainer.state.log_history = [r for r in trainer.state.log_history if r.get("v2_decision") != "rollback"]
    assert "rolled" not in train_summary(trainer.state, str(tmp_path / "run"))
    # A rollback followed by more steps (checks every 2, 5 steps): the saved adapter is step 5's, not said otherwise.
    trainer, _, checks, _ = _run(moe_run, tmp_path / "later", "rollback", [R(-0.02, -0.02), R(-0.03, -0.03), R(0.01, 0.02)], steps=5)
    assert [c["decision"] for c in checks] == ["start", "save", "rollback"]
    assert "rolled" not in train_summary(trainer.state, str(tmp_path / "later"))
    trainer.state.global_step = 1
    assert train_summary(trainer.state, str(tmp_path / "later")).startswith("trained 1 step;")


def test_a_base_that_passes_neither_condition_is_warned_about(tmp_path, moe_run, caplog):
    with caplog.at_level("WARNING", logger="geocache.gate"):
        _, _, checks, _ = _run(moe_run, tmp_path / "weak", "rollback", [R(0.01, 0.02), R(0.005, 0.01)], steps=2)
    assert [c["decision"] for c in checks] == ["start", "continue"]
    assert not list((tmp_path / "weak").glob("checkpoint-*"))
    warned = [r.getMessage() for r in caplog.records if r.name == "geocache.gate" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "passes neither V2 condition (C1 Δ_bi 0.0100, C2 Δ_brand 0.0200)" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="geocache.gate"):
        _run(moe_run, tmp_path / "fine", "rollback", [R(-0.01, 0.02), R(-0.02, 0.01)], steps=2)
    assert not [r for r in caplog.records if r.name == "geocache.gate" and r.levelname == "WARNING"]


def test_halve_lr_and_double_lambdas_act_on_the_running_training(tmp_path, moe_run):
    script = [R(-0.02, -0.02), R(0.01, 0.01), R(-0.03, -0.03), R(0.02, 0.02), R(-0.05, -0.05)]
    _, rec, checks, _ = _run(moe_run, tmp_path / "a", "halve_lr", script)
    assert [c["decision"] for c in checks] == ["start", "halve_lr", "save", "halve_lr", "save"]
    assert rec.steps[1]["lr"] == pytest.approx(1e-2) and rec.steps[2]["lr"] == pytest.approx(5e-3)
    assert rec.steps[5]["lr"] == pytest.approx(5e-3) and rec.steps[6]["lr"] == pytest.approx(2.5e-3) and checks[3]["lr"] == pytest.approx(2.5e-3)

    trainer, _, checks, _ = _run(moe_run, tmp_path / "b", "double_lambdas", list(script), lambda_kl=0.1, lambda_cal=0.2, lambda_entropy=0.05,
                                 lambda_router=0.3)
    assert [c["decision"] for c in checks] == ["start", "double_lambdas", "save", "double_lambdas", "save"]
    assert checks[1]["lambdas"] == pytest.approx({"lambda_kl": 0.2, "lambda_cal": 0.4, "lambda_entropy": 0.1, "lambda_router": 0.6})
    for cfg in (trainer.geometry_config, trainer.geometry_loss.config):
        assert (cfg.lambda_kl, cfg.lambda_cal, cfg.lambda_entropy, cfg.lambda_router) == pytest.approx((0.4, 0.8, 0.2, 1.2))


def test_a_short_real_v2_gated_run_and_dense_models_are_refused(tmp_path, moe_run, tiny_model_dir):
    model, cache, data = moe_run
    cfg = TrainConfig(model=str(model), cache=str(cache), out=str(tmp_path / "real"), max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4,
                      seed=0, progress=False, use_cpu=True, lora_r=4, lora_alpha=8, v2_every=2, v2_data=[f"code={data}"], v2_max_sequences=8)
    train(cfg)
    checks = [json.loads(line) for line in (tmp_path / "real" / "v2_checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 2, 4] and checks[0]["decision"] == "start"
    assert all(c["decision"] in ("save", "continue", "wait", "rollback") for c in checks[1:])
    for c in checks:
        assert c["delta_bi_ci_low"] <= c["delta_bi_value"] <= c["delta_bi_ci_high"]
    dense = tiny_model_dir("qwen3")
    precompute(PrecomputeConfig(model=str(dense), data=[str(data)], out=str(tmp_path / "dc"), progress=False, data_config=DataConfig(max_length=48)))
    with pytest.raises(ValueError, match="needs a MoE model"):
        train(TrainConfig(model=str(dense), cache=str(tmp_path / "dc"), out=str(tmp_path / "d"), max_steps=2, use_cpu=True, progress=False,
                          v2_every=2, v2_data=[str(data)]))
    with pytest.raises(ValueError, match="no v2_data"):
        TrainConfig(model="m", cache="c", out="o", v2_every=2)


def test_a_resumed_gated_run_continues_as_the_uninterrupted_one(tmp_path, moe_run):
    """The gate's state (watched conditions, score, doubled λ's) is saved with each checkpoint it
    writes and restored on --resume; the interrupted run's later checks leave the log."""
    model, cache, data = moe_run
    script = [R(-0.02, -0.02), R(-0.03, -0.03), R(0.01, 0.01), R(-0.04, -0.04), R(0.02, 0.02)]

    def cfg(out, steps, **kw):
        return TrainConfig(model=str(model), cache=str(cache), out=str(out), max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant",
                           per_device_train_batch_size=4, logging_steps=2, seed=0, progress=False, use_cpu=True, lora_r=4, lora_alpha=8,
                           v2_every=2, v2_data=[str(data)], v2_patience=1, v2_action="double_lambdas", geometry=GeometryConfig(lambda_kl=0.1), **kw)

    whole = train(cfg(tmp_path / "a", 8), v2_signal=Scripted(script))
    train(cfg(tmp_path / "b", 6), v2_signal=Scripted(script[:4]))  # start, 2: save, 4: double, 6: save (checkpoint-6, λ's doubled)
    with (tmp_path / "b" / "v2_checks.jsonl").open("a") as f:  # a check the interrupted run made after its last checkpoint
        f.write(json.dumps({"step": 7, "decision": "wait"}) + "\n")
    resumed = train(cfg(tmp_path / "b", 8, resume=True), v2_signal=Scripted(script[4:]))  # no new start: step 8 only
    rows = {run: [json.loads(line) for line in (tmp_path / run / "v2_checks.jsonl").read_text().splitlines()] for run in ("a", "b")}
    assert [r["decision"] for r in rows["b"]] == [r["decision"] for r in rows["a"]] == ["start", "save", "double_lambdas", "save", "double_lambdas"]
    assert [r["step"] for r in rows["b"]] == [r["step"] for r in rows["a"]]
    assert resumed.geometry_config.lambda_kl == whole.geometry_config.lambda_kl == pytest.approx(0.4)
    assert resumed.geometry_loss.config.lambda_kl == pytest.approx(0.4)


def test_a_missing_v2_data_file_is_refused_before_the_run_starts_and_resume_keeps_the_gate_settings(tmp_path, moe_run):
    model, cache, data = moe_run
    common = dict(model=str(model), cache=str(cache), max_steps=2, per_device_train_batch_size=4, progress=False, use_cpu=True, lora_r=2,
                  lora_alpha=4, v2_every=2, v2_patience=1, v2_action="halve_lr")
    with pytest.raises(FileNotFoundError, match=r"v2_data of domain 'nope', '.*nope.jsonl', does not exist"):
        train(TrainConfig(out=str(tmp_path / "a"), v2_data=[str(tmp_path / "nope.jsonl")], **common))
    assert not (tmp_path / "a").exists()  # nothing written: the corrected command needs no --overwrite
    train(TrainConfig(out=str(tmp_path / "b"), v2_data=[str(data)], **common), v2_signal=Scripted([R(-0.02, -0.02), R(-0.03, -0.03)]))
    with pytest.raises(ValueError, match="with v2_action='rollback', but it was started with v2_action='halve_lr'"):
        train(TrainConfig(out=str(tmp_path / "b"), v2_data=[str(data)], resume=True, **{**common, "v2_action": "rollback", "max_steps": 4}))


def test_every_process_takes_the_main_processs_v2_decision(tmp_path, moe_run):
    """Each process measured V2 and decided alone: measurements that differ across processes (another
    device's arithmetic near a threshold; here made to differ) gave a save or a rollback on some only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, cache, data = moe_run
    script = tmp_path / "v2_per_rank.py"
    script.write_text(f"""
import os
from geocache.gate import V2Gate
from geocache.train import TrainConfig, train

def R(v):
    return {{k: {{"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01, "pass": v < 0}} for k in ("delta_bi", "delta_brand")}}

rank = int(os.environ["RANK"])
def signal(model):  # the base passes; then process 0 sees V2 keep passing, process 1 sees it fail
    signal.calls = getattr(signal, "calls", 0) + 1
    return R(-0.02) if signal.calls == 1 or rank == 0 else R(0.05)
real = V2Gate.decide
def decide(self, result):
    d = real(self, result)
    print(f"rank {{rank}} decides {{d}}\\n", end="", flush=True)  # one write per line
    return d
V2Gate.decide = decide
train(TrainConfig(model={str(model)!r}, cache={str(cache)!r}, out={str(tmp_path / "run")!r}, max_steps=4, per_device_train_batch_size=2,
                  lora_r=2, progress=False, v2_every=2, v2_data=[{str(data)!r}], v2_patience=1, v2_action="rollback"), v2_signal=signal)
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583", str(script)],
                          env=env, capture_output=True, text=True, timeout=240)  # (without the shared decision: a hang)
    assert done.returncode == 0, done.stderr[-3000:]
    # (two processes' lines may interleave: "rank 1 decides saverank 0 decides save")
    decisions = sorted(re.findall(r"rank \d decides (?:save|wait|continue|rollback)", done.stdout))
    assert decisions == ["rank 0 decides save", "rank 0 decides save", "rank 1 decides save", "rank 1 decides save"], done.stdout[-2000:]
