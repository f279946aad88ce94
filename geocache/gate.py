"""V2-gated training: the design note's checkpoint policy, as a ``transformers`` callback.

Every ``every`` steps a V2 signal is measured on held-out data (``V2Signal``: the same
measurement as ``geocache profile``, on the primary domain, with the adapter on). The gate
watches the conditions the base itself passed at step 0 (both C1 and C2 if it passed both or
neither; only C2 for a Qwen-like base, only C1 for a DeepSeek-like one), scored by the worst of
their mid-band Δ's (more negative is better):

- pass (every watched condition passes) → save a checkpoint, and remember it as the last passing one;
- fail but improving (the score fell since the last check) → continue, no checkpoint;
- fail and not improving for ``patience`` checks in a row → the configured action: ``halve_lr``,
  ``double_lambdas`` (every geometry λ), or ``rollback`` (adapter and optimizer state of the last
  passing check; at first, the start of training).

Every check and decision goes to ``v2_checks.jsonl`` in the run directory and to the trainer's log
with the numbers behind it. Each checkpoint the gate writes holds its state (``v2_gate_state.json``:
watched conditions, score, the λ's in force), so that ``--resume`` continues the gate as an
uninterrupted run would. Tests drive every branch through the same ``signal`` interface with an
injected signal.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

log = logging.getLogger("geocache.gate")
ACTIONS = ("halve_lr", "double_lambdas", "rollback")
LAMBDAS = ("lambda_kl", "lambda_cal", "lambda_entropy", "lambda_router")
GATE_STATE = "v2_gate_state.json"  # in each checkpoint the gate wrote


@dataclass
class GateState:
    watch: tuple = ("delta_bi", "delta_brand")
    last_score: Optional[float] = None
    bad_checks: int = 0
    last_pass_step: Optional[int] = None
    history: list = field(default_factory=list)


class V2Gate:
    """The policy alone: feed it V2 results, get decisions (no training state)."""

    def __init__(self, patience: int = 2, action: str = "rollback"):
        if action not in ACTIONS:
            raise ValueError(f"v2_action={action!r} must be one of {', '.join(ACTIONS)}")
        if patience < 1:
            raise ValueError(f"v2_patience={patience} must be >= 1")
        self.patience, self.action, self.state = patience, action, GateState()

    def start(self, base_result: dict) -> tuple:
        """Choose the watched conditions from the base's own V2 (step 0)."""
        passed = tuple(k for k in ("delta_bi", "delta_brand") if base_result[k]["pass"])
        self.state.watch = passed if len(passed) == 1 else ("delta_bi", "delta_brand")
        self.state.last_score = self.score(base_result)
        return self.state.watch

    def score(self, result: dict) -> float:
        return max(result[k]["value"] for k in self.state.watch)

    def decide(self, result: dict) -> str:
        """``save`` | ``continue`` | ``wait`` (not improving, patience left) | the action."""
        s = self.state
        score = self.score(result)
        improving = s.last_score is None or score < s.last_score
        if all(result[k]["pass"] for k in s.watch):
            decision, s.bad_checks = "save", 0
        elif improving:
            decision, s.bad_checks = "continue", 0
        else:
            s.bad_checks += 1
            decision = self.action if s.bad_checks >= self.patience else "wait"
            if decision == self.action:
                s.bad_checks = 0
        s.last_score = score
        return decision


class V2Signal:
    """The real signal: ``geocache profile``'s measurement of the current model on held-out data,
    returning the first (primary) domain's mid-band aggregate; the other domains are not measured."""

    def __init__(self, tokenizer, domains: dict[str, str], max_length: int = 256, max_sequences: int = 32, n_resamples: int = 1000,
                 seed: int = 0):
        from geocache.profile import ProfileConfig

        self.tokenizer, self.domains = tokenizer, domains
        self.cfg = ProfileConfig(model="", data=[f"{k}={v}" for k, v in domains.items()], out="", max_length=max_length,
                                 max_sequences=max_sequences, n_resamples=n_resamples, seed=seed)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from geocache.profile import measure_domain, v2_summary

        was_training = model.training
        model.eval()
        name, path = next(iter(self.domains.items()))  # the gate reads the first domain only: the others are not measured
        try:
            m = measure_domain(model, self.tokenizer, path, self.cfg, calibration=False)
            result = v2_summary(m["blocks"], m["v2"]["base"], self.cfg)["aggregate"]["midband"]
        finally:
            model.train(was_training)
        return {**result, "domain": name}


class V2GateCallback(TrainerCallback):
    """Runs the gate every ``every`` steps inside ``transformers.Trainer`` (``save_strategy`` is
    left to it: checkpoints are written only when V2 passes)."""

    def __init__(self, signal: Callable, every: int, gate: V2Gate, run_dir: str | Path):
        self.signal, self.every, self.gate = signal, every, gate
        self.path = Path(run_dir) / "v2_checks.jsonl"
        self.trainer = None
        self.snapshot = None  # adapter + optimizer state of the last passing check

    def _adapter_state(self, model):
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def _record(self, row: dict, state) -> None:
        if state.is_world_process_zero:  # every process measures and acts alike (same weights, same data); one writes
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("V2 check at step %s: %s", row["step"], row)
        if self.trainer is not None:
            # Trainer.log clears control.should_log: restored, or the step's own training log
            # (due at this step when it is a logging step) would be skipped.
            should_log = self.trainer.control.should_log
            self.trainer.log({f"v2_{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                             | {"v2_decision": row["decision"]})
            self.trainer.control.should_log = should_log

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / GATE_STATE
        if state.global_step and saved.exists():
            # A resume: the gate continues from the state saved with its checkpoint (the watched
            # conditions, the score, the λ's it doubled), as an uninterrupted run would; the checks
            # the interrupted run made after that checkpoint are dropped from the log.
            self._resume(json.loads(saved.read_text()), state)
            self.snapshot = (self._adapter_state(model), copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
                             state.global_step, self.gate.state.last_score)
            return
        # The watched conditions come from the base (adapter off).
        with (model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()):
            result = _as_rank0s(self.signal(model))
        watch = self.gate.start(result)
        if state.is_world_process_zero and not any(result[k]["pass"] for k in ("delta_bi", "delta_brand")):
            log.warning("the base passes neither V2 condition (C1 Δ_bi %.4f, C2 Δ_brand %.4f): the gate saves a checkpoint only when "
                        "both pass, which SFT may never reach, so this run may write none to resume from (the final adapter is "
                        "saved either way); the design note's advice for such a base is continued pretraining with both V2 "
                        "losses, or another base", result["delta_bi"]["value"], result["delta_brand"]["value"])
        self.snapshot = (self._adapter_state(model), copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None, state.global_step,
                         self.gate.state.last_score)
        self._record({"step": state.global_step, "decision": "start", "watch": list(watch), **_numbers(result)}, state)

    def _resume(self, saved: dict, state) -> None:
        gs = self.gate.state
        gs.watch, gs.last_score, gs.bad_checks, gs.last_pass_step = tuple(saved["watch"]), saved["last_score"], saved["bad_checks"], saved["last_pass_step"]
        if self.trainer is not None and saved.get("lambdas"):
            set_lambdas(self.trainer, saved["lambdas"])
        if state.is_world_process_zero:
            from geocache.trainer import drop_records_after

            drop_records_after(self.path, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        # Beside the checkpoint: what the gate needs to continue from it on a resume.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            gs = self.gate.state
            lambdas = {n: getattr(self.trainer.geometry_config, n) for n in LAMBDAS} if self.trainer is not None else None
            if lambdas is not None:
                lambdas["lambda_router"] = self.trainer.geometry_scheduler.lambda_router
            (folder / GATE_STATE).write_text(json.dumps({"watch": list(gs.watch), "last_score": gs.last_score, "bad_checks": gs.bad_checks,
                                                         "last_pass_step": gs.last_pass_step, "lambdas": lambdas}))
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0 or state.global_step % self.every:
            return control
        result = _as_rank0s(self.signal(model))
        decision = self.gate.decide(result)
        row = {"step": state.global_step, "decision": decision, "watch": list(self.gate.state.watch), "score": self.gate.score(result),
               "bad_checks": self.gate.state.bad_checks, **_numbers(result)}
        if decision == "save":
            control.should_save = True
            self.gate.state.last_pass_step = state.global_step
            self.snapshot = (self._adapter_state(model), copy.deepcopy(optimizer.state_dict()), state.global_step, self.gate.state.last_score)
        elif decision == "halve_lr":
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
            if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs = [lr * 0.5 for lr in lr_scheduler.base_lrs]
            row["lr"] = optimizer.param_groups[0]["lr"]
        elif decision == "double_lambdas":
            if self.trainer is None:
                raise RuntimeError("double_lambdas needs the trainer (V2GateCallback.trainer)")
            row["lambdas"] = double_lambdas(self.trainer)
        elif decision == "rollback":
            from peft import set_peft_model_state_dict

            adapter, opt_state, step, score = self.snapshot
            set_peft_model_state_dict(model, adapter)
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            self.gate.state.last_score = score  # the next check is compared with the state rolled back to
            row["rolled_back_to_step"] = step
        self._record(row, state)
        return control


def _as_rank0s(result: dict) -> dict:
    """Under several processes, the main process's V2 measurement on every process, so that all
    of them take the same decision (saves, rollbacks, learning rate, λ's): each measures the same
    adapter on the same held-out text, but another device's arithmetic near a threshold could
    decide otherwise, and the processes would part (a save that only some join)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    shared = [result]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def set_lambdas(trainer, lambdas: dict) -> None:
    """Set the geometry λ's of a running ``GeometryTrainer`` where the loss reads them (as ``double_lambdas``)."""
    for cfg in {id(c): c for c in (trainer.geometry_config, trainer.geometry_loss.config)}.values():
        for name in LAMBDAS:
            setattr(cfg, name, lambdas[name])
    trainer.geometry_scheduler.lambda_router = lambdas["lambda_router"]


def double_lambdas(trainer) -> dict:
    """Double every geometry λ of a running ``GeometryTrainer`` where the loss reads it: λ_KL, λ_cal
    and λ_H in the loss's config, λ_router in the scheduler; the trainer's own config follows (what
    is logged). Returns the new λ's."""
    configs = {id(c): c for c in (trainer.geometry_config, trainer.geometry_loss.config)}.values()
    for cfg in configs:
        for name in LAMBDAS:
            setattr(cfg, name, getattr(cfg, name) * 2)
    trainer.geometry_scheduler.lambda_router *= 2
    return {n: getattr(trainer.geometry_config, n) for n in LAMBDAS}


def _numbers(result: dict) -> dict:
    out = {}
    for key in ("delta_bi", "delta_brand"):
        for part in ("value", "ci_low", "ci_high", "pass"):
            out[f"{key}_{part}"] = result[key][part]
    return out
