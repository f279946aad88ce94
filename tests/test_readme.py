"""The README's Python snippets run as printed, with the tiny model in place of the hub model and a
cache precomputed for it (so an import or an argument they leave out fails here)."""

import re
from pathlib import Path

import torch

from geocache.data import DataConfig
from geocache.precompute import PrecomputeConfig, precompute

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_snippets_run(tmp_path, tiny_model_dir, monkeypatch):
    import inspect
    import json
    import textwrap

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir("qwen3")
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps({"text": c}) + "\n" for c in inspect.getsource(textwrap).split("\n\n") if c.strip()))
    # The README's own precompute command's preprocessing (block 1 checks max_length 2048, not packed).
    precompute(PrecomputeConfig(model=str(model), data=[str(data_file)], out=str(tmp_path / "cache"), k=8, m=2, progress=False,
                                data_config=DataConfig(max_length=2048)))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) == 3
    spaces = []
    for code in blocks:
        code = code.replace('"Qwen/Qwen3-0.6B"', repr(str(model))).replace("max_steps=200", "max_steps=2")
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the project's own README
        spaces.append(namespace)
    batch = spaces[0]["batch"]
    assert {"input_ids", "labels", "attention_mask", "base"} <= set(batch) and batch["input_ids"].shape[0] == min(8, len(spaces[0]["cache"]))
    assert spaces[1]["trainer"].state.global_step == 2
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(tmp_path / "run" / "adapter"))
    assert any("lora_magnitude_vector" in n for n, _ in tuned.named_parameters())  # DoRA, loaded back
    loss, grad = spaces[2]["loss"], spaces[2]["tuned_logits"].grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
