"""Fixtures shared by the test modules: the real tokenizers kept in tests/assets/tokenizers (see PROVENANCE there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecellm.tokenizer import load_tokenizer

TOKENIZERS = Path(__file__).parent / "assets" / "tokenizers"


@pytest.fixture(scope="session")
def llama():
    return load_tokenizer(TOKENIZERS / "llama2-spm")


@pytest.fixture(scope="session")
def gpt2():
    return load_tokenizer(TOKENIZERS / "gpt2-bpe")


@pytest.fixture(scope="session")
def mistral():
    return load_tokenizer(TOKENIZERS / "mistral-v1")


@pytest.fixture(scope="session")
def t5():
    return load_tokenizer(TOKENIZERS / "t5-style-spm")
