"""Shared fixtures: offline, tiny models saved like hub repos and loaded back the user's way."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from geocache.testing import build_tiny_model, build_tokenizer  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on two cores


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """``tiny_model_dir(model_type)`` → a directory holding a saved tiny model and tokenizer."""
    built = {}

    def make(model_type: str):
        if model_type not in built:
            built[model_type] = build_tiny_model(tmp_path_factory.mktemp(model_type), model_type, tokenizer_dir=tokenizer_dir)
        return built[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """(recipe, cache_dir, model_dir) of a tiny reference model, pretrained once per session."""
    from geocache.reference import build_reference_model
    from geocache.testing import tiny_reference_recipe

    recipe, cache_dir = tiny_reference_recipe(), tmp_path_factory.mktemp("reference")
    return recipe, cache_dir, build_reference_model(recipe, cache_dir=cache_dir, log=lambda *_: None)


@pytest.fixture
def no_cxx_compiler(monkeypatch):
    """torch.compile as on a machine without a C++ compiler (or Triton): every compiled function
    raises Inductor's error at its first call, as real compiled code does; no kernels compiled yet."""
    import torch
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    from geocache import compiled

    def no_compiler(fn, **kwargs):
        def broken(*args):
            raise InductorError(InvalidCxxCompiler(), None)
        return broken

    monkeypatch.setattr(compiled, "_KERNELS", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
