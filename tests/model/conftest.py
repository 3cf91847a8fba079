"""Shared real-model fixtures: the built-in model and its tokenizer are read once per test session."""

from __future__ import annotations

import pytest
import torch

from shunter.model import loader
from shunter.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def hf_model():
    """The built-in SmolLM2 as a float32 Hugging Face model: the reference (~15 s to load)."""
    return loader.load_hf_model(loader.resolve_source(None), torch.float32)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(loader.load_hf_tokenizer(loader.resolve_source(None)))


@pytest.fixture(scope="session")
def model_fp32(hf_model):
    return loader.model_from_hf(hf_model, torch.float32, torch.device("cpu"))
