"""generate_text never produces an id the tokenizer cannot decode (embeddings may have padding rows past it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ecellm.generate import generate, generate_text
from ecellm.models import from_pretrained
from ecellm.tokenizer import load_tokenizer

from .tiny_checkpoint import make_tiny_checkpoint


def test_padding_rows_of_the_embedding_are_never_generated(tmp_path):
    tokenizer = load_tokenizer(make_tiny_checkpoint(tmp_path / "probe"))  # the tokenizer's size, to pad past it
    n_ids = tokenizer.vocab_size
    path = make_tiny_checkpoint(tmp_path / "model", vocab_size=n_ids + 16)  # as Phi-2: 51,200 rows, 50,295 ids
    model = from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[:n_ids] = 0.0  # every real id scores 0, so some padding row (random) scores more
    ids = torch.tensor([tokenizer.encode("Is this a match?")])
    unlimited = generate(model, ids, max_new_tokens=4)[0]
    assert any(i >= n_ids for i in unlimited)  # the setup really prefers padding ids
    assert all(i < n_ids for i in generate(model, ids, max_new_tokens=4, vocab_limit=n_ids)[0])
    [text] = generate_text(model, tokenizer, ["Is this a match?"], max_new_tokens=4)  # decodes: no error
    assert isinstance(text, str)


def test_length_batches_sort_by_length_and_never_mix_groups():
    from ecellm.generate import length_batches

    lengths = [5, 1, 4, 2, 3, 9, 7]
    assert length_batches(lengths, 3) == [[1, 3, 4], [2, 0, 6], [5]]
    # groups (e.g. answer budgets): ordered by group, then length; a batch holds one group only
    assert length_batches(lengths, 3, groups=[8, 4, 8, 4, 8, 4, 4]) == [[1, 3, 6], [5], [4, 2, 0]]
    assert length_batches([], 4) == []


def test_generate_text_batches_by_length_and_answers_in_prompt_order(tmp_path):
    """Prompts of different lengths, batched by length with left padding, get the continuation each gets alone."""
    path = make_tiny_checkpoint(tmp_path / "model")
    model, tokenizer = from_pretrained(path), load_tokenizer(path)
    prompts = ["Is this a match? yes or no", "A", "Which item comes next in the list of purchases?", "Buy"]
    alone = [generate_text(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert generate_text(model, tokenizer, prompts, max_new_tokens=5, batch_size=3) == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_a_gpu_agrees_with_the_cpu(tmp_path):
    """A CUDA rank generates on its GPU in float32 (`examples/common.for_generation`): the same greedy answers as the
    CPU."""
    path = make_tiny_checkpoint(tmp_path / "model")
    tokenizer = load_tokenizer(path)
    prompts = [f"Is item {i} a match? yes or no" for i in range(16)]
    cpu = generate_text(from_pretrained(path), tokenizer, prompts, max_new_tokens=4, batch_size=8)
    gpu = generate_text(from_pretrained(path, device="cuda"), tokenizer, prompts, max_new_tokens=4, batch_size=8)
    assert sum(a == b for a, b in zip(cpu, gpu)) >= 15


class ScriptedDecoder(torch.nn.Module):
    """A decoder that writes `script` (token ids) whatever the prompt, every row alike, then repeats its last id."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = SimpleNamespace(eos_token_id=None, model_type="llama")
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def _logits(self, rows: int, step: int) -> torch.Tensor:
        logits = torch.zeros(rows, self.vocab_size)  # (B, V)
        logits[:, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits

    def start_decoding(self, input_ids, attention_mask, max_new_tokens):
        state = {"rows": input_ids.shape[0], "step": 0}
        return state, self._logits(state["rows"], 0)

    def decode_step(self, state, tokens):
        state["step"] += 1
        return self._logits(state["rows"], state["step"])


RAMBLING = " yes\n\n### Instruction:\nagain\n\n### Response: no, no, no and more words past the answer"


def test_a_row_stops_once_its_text_holds_a_stop_string(tmp_path):
    tokenizer = load_tokenizer(make_tiny_checkpoint(tmp_path / "model", tasks=["PM"]))
    model = ScriptedDecoder(tokenizer.encode(RAMBLING, bos=False, eos=False), tokenizer.vocab_size)
    [full] = generate_text(model, tokenizer, ["Is this a match?"], max_new_tokens=60)
    [cut] = generate_text(model, tokenizer, ["Is this a match?"], max_new_tokens=60, stop_strings=["### Response:"])
    assert full.startswith(RAMBLING)
    assert cut == RAMBLING[:RAMBLING.index("### Response:") + len("### Response:")]  # ends on the marker's last token
    [other] = generate_text(model, tokenizer, ["Is this a match?"], max_new_tokens=60, stop_strings=["nowhere"])
    assert other == full


def test_the_evaluator_stops_at_the_next_response_marker_with_the_same_predictions(tmp_path):
    """An answer that writes past itself ends at the template's next response marker: the same predictions and
    scores as running to the budget, in fewer tokens."""
    from ecellm.eval import evaluate
    from ecellm.synthetic import generate_records

    tokenizer = load_tokenizer(make_tiny_checkpoint(tmp_path / "model", tasks=["PM"]))
    model = ScriptedDecoder(tokenizer.encode(RAMBLING, bos=False, eos=False), tokenizer.vocab_size)
    records = generate_records("PM", 4, "test", seed=0)
    runs = {stop: evaluate(model, tokenizer, records, max_new_tokens=60, stop_at_marker=stop, progress=False)
            for stop in (True, False)}
    predictions = {stop: [g["prediction"] for g in run["generations"]] for stop, run in runs.items()}
    assert predictions[True] == predictions[False] == ["yes\n\n### Instruction:\nagain"] * 4
    assert runs[True]["results"] == runs[False]["results"]
    assert all(len(a["generation"]) < len(b["generation"])
               for a, b in zip(runs[True]["generations"], runs[False]["generations"]))
