"""The real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K, Q8_0 blocks), fetched as
`ecellm.models.default` fetches it by name and converted by ecellm, against transformers' own GGUF loading of the same
file; and its answer to a plain question. The file is fetched once and converted once, here (not into the cache)."""

from __future__ import annotations

import pytest
import torch
import transformers

from ecellm.generate import generate
from ecellm.models import from_pretrained
from ecellm.models.default import fetch_gguf
from ecellm.models.gguf_convert import convert_gguf
from ecellm.tokenizer import load_tokenizer

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
PROMPTS = [
    "def fibonacci(n):\n    ",
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n",
    "Prix: 12,50 € — Größe 42; 東京 2026年\n\ttabs   and  spaces",
]


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    return fetch_gguf("qwen2.5-0.5b", tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def qwen_dir(qwen_gguf, tmp_path_factory):
    return convert_gguf(qwen_gguf, tmp_path_factory.mktemp("converted") / "Qwen2.5-Coder-0.5B-Instruct")


@pytest.mark.slow
def test_converted_qwen25_matches_transformers_gguf_loading(qwen_gguf, qwen_dir):
    reference = transformers.AutoModelForCausalLM.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name,
                                                                  dtype=torch.float32).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)
    tokenizer = load_tokenizer(qwen_dir)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert ids == [reference_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    with torch.no_grad():  # one model in memory at a time
        expected = [reference(torch.tensor([i])).logits for i in ids]
        del reference
        ours = from_pretrained(qwen_dir)
        for a, i in zip(expected, ids):
            assert (a - ours(torch.tensor([i]))).abs().max().item() <= 1e-5 * a.abs().max().item()
    assert sum(p.numel() for p in ours.parameters()) == 494_032_768 + 151936 * 896  # GGUF keeps lm_head apart


@pytest.mark.slow
def test_qwen25_answers_in_its_chat_template(qwen_dir):
    tokenizer = load_tokenizer(qwen_dir)
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = transformers.AutoTokenizer.from_pretrained(qwen_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)  # the template from the GGUF metadata
    assert prompt == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    new = generate(from_pretrained(qwen_dir), torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=20,
                   eos_token_id=tokenizer.eos_id)[0]
    assert new[-1] == tokenizer.eos_id
    assert tokenizer.decode(new) == "The capital of France is Paris."
