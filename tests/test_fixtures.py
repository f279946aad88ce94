"""The tiny-model fixtures load back the way a user's model does, and MoE models expose routing."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from geocache.testing import DENSE_MODEL_TYPES, MOE_MODEL_TYPES

N_EXPERTS = 8
# MoE layers per tiny model: 3 layers, of which DeepSeek-V3 keeps the first dense.
N_MOE_LAYERS = {"deepseek_v3": 2}


def test_tokenizer_is_a_trained_bpe_with_a_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 512
    text = "def wrap(text, width=70):\n    return text"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges learned from the corpus
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


@pytest.mark.parametrize("model_type", MOE_MODEL_TYPES)
def test_moe_models_return_router_logits_per_moe_layer(tiny_model_dir, model_type):
    path = tiny_model_dir(model_type)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.model_type == model_type
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert out.logits.shape == (2, 7, 512)
    router = out.router_logits
    assert len(router) == N_MOE_LAYERS.get(model_type, 3)
    for layer in router:
        assert layer.shape == (2 * 7, N_EXPERTS) and torch.isfinite(layer).all()
    # the router logits are the model's own: top-2 of different tokens differ somewhere
    assert len({tuple(r) for r in router[0].topk(2).indices.sort().values.tolist()}) > 1


@pytest.mark.parametrize("model_type", DENSE_MODEL_TYPES)
def test_dense_models_load_and_have_no_router(tiny_model_dir, model_type):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(model_type)).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 512)
    assert getattr(out, "router_logits", None) is None


def test_fixture_weights_are_seeded(tmp_path, tokenizer_dir):
    from geocache.testing import build_tiny_model

    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", "qwen3_moe", tokenizer_dir=tokenizer_dir))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", "qwen3_moe", tokenizer_dir=tokenizer_dir))
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
