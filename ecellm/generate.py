"""KV-cache decoding for every model family: greedy or sampled (temperature, top-p, seeded), batched prompts of
different lengths with left padding, each row stopping at its EOS or after `max_new_tokens`.

The model provides two calls (see CONTRIBUTING.md): `start_decoding` runs the prompt once and fills its caches,
`decode_step` feeds one token per row. This file knows nothing else about the model, so decoder-only and
encoder-decoder families share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .data import collate


class IncrementalDecoder(Protocol):
    """What `generate` needs of a model: its config (for `eos_token_id`) and two decoding calls."""

    config: Any

    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[Any, torch.Tensor]:
        """Run the prompts once and allocate the caches.

        Args:
            input_ids: (B, T) prompt ids, padded as the family expects (left for decoder-only models).
            attention_mask: (B, T) 1 for real tokens; None means no padding.
            max_new_tokens: room to reserve in the caches.
        Returns:
            the model's decoding state and the logits (B, V) of each row's first new token.
        """

    def decode_step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (B,), the tokens just chosen, advance `state` in place, return the next logits (B, V)."""


def _choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits: argmax when temperature is 0, else top-p sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: IncrementalDecoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 100,
    eos_token_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    vocab_limit: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Generate continuations of a batch of prompts.

    Args:
        model: any ecellm model (an `IncrementalDecoder`).
        input_ids: (B, T) prompt ids, left padded (decoder-only) or padded either side (encoder-decoder).
        attention_mask: (B, T) 1 for real tokens, 0 for padding; None means no padding.
        max_new_tokens: most tokens generated per row.
        eos_token_id: one id or several; a row stops after producing one. Default: the model config's.
        temperature: 0 for greedy decoding, otherwise the softmax temperature of sampling.
        top_p: nucleus-sampling mass (1.0 keeps the whole distribution).
        seed: seeds a private generator, so sampled outputs repeat without touching global RNG state.
        vocab_limit: never produce ids at or past this one (the padding rows of an embedding larger than the
            tokenizer, e.g. Phi-2's 51,200 rows for 50,295 ids); None: every id the model has.
        stop: called after each step with each running row's new tokens; True ends that row there (as its EOS
            would, but the tokens are kept). None: rows end at EOS or the budget only.
    Returns:
        for each row, its new tokens only, ending with the EOS token when one was produced.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = torch.tensor(_id_list(eos_token_id), dtype=torch.long, device=input_ids.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    B = input_ids.shape[0]
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    if max_new_tokens <= 0:
        return outputs
    state, logits = model.start_decoding(input_ids, attention_mask, max_new_tokens)
    for step in range(max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")  # (B, V): ids the tokenizer cannot decode are never chosen
        tokens = _choose(logits, temperature, top_p, generator)  # (B,)
        for row, (token, finished) in enumerate(zip(tokens.tolist(), done.tolist())):  # one sync per step
            if not finished:
                outputs[row].append(token)
        done |= torch.isin(tokens, eos)
        if stop is not None:
            stopped = [not finished and stop(outputs[row]) for row, finished in enumerate(done.tolist())]
            done |= torch.tensor(stopped, dtype=torch.bool, device=done.device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode_step(state, tokens)
    return outputs


def _id_list(*ids: int | Sequence[int] | None) -> list[int]:
    """The distinct token ids among single ids, lists of ids and Nones (config files write EOS either way), sorted."""
    flat = set()
    for value in ids:
        flat.update([] if value is None else [value] if isinstance(value, int) else value)
    return sorted(flat)


def _contains_any(tokenizer, strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A `generate` stop check: whether the decoded tokens contain one of `strings` (None for no strings). Cheap: a
    marker is looked for only once the newest token could have completed it (its last character is in that token's
    text), and only in the text of the last `window` tokens (a token is at least one character, so the window
    holds a marker the newest token completed). Exact: the window's text is a piece of the row's text, so a marker
    found there is in the row; one missed (a window of zero-width tokens) only delays the stop or forgoes it."""
    if not strings:
        return None
    last_chars = {s[-1] for s in strings}
    window = max(len(s) for s in strings)

    def contains(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-1:])
        if tail and not last_chars & set(tail):
            return False
        text = tokenizer.decode(tokens[-window:])
        return any(s in text for s in strings)

    return contains


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `input_ids` and `attention_mask`, both (B, T_max), with the data module's
    `collate` (no rounding of the length)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    batch = collate([{"input_ids": list(s)} for s in sequences], pad_id, padding_side="left", multiple_of=1)
    return batch["input_ids"], batch["attention_mask"]


def length_batches(lengths: Sequence[int], batch_size: int, groups: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of items (prompts) in batches of at most `batch_size`, in order of length, so that a batch pads little.

    Args:
        lengths: each item's length in tokens.
        batch_size: most items per batch.
        groups: an orderable key per item (e.g. its answer budget) that a batch never mixes: the items are ordered
            by (key, length) and each key's items are cut into batches of their own. None: one group.
    Returns:
        the batches, each a list of item indices; batch b starts at position sum(len(b') for b' before b) of the
        order, which is what seeds its sampling (a batch generates the same text whatever ran before it).
    """
    keys = [0] * len(lengths) if groups is None else list(groups)
    order = sorted(range(len(lengths)), key=lambda i: (keys[i], lengths[i]))
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or keys[batches[-1][0]] != keys[i]:
            batches.append([])
        batches[-1].append(i)
    return batches


def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Generate text for each prompt: encode (the tokenizer's family BOS/EOS rules), batch with left padding,
    decode the new tokens without special tokens. Only ids the tokenizer has are generated (an embedding may have
    padding rows past them).

    Args:
        model: an ecellm model.
        tokenizer: an `ecellm.tokenizer` tokenizer (`encode`, `decode`, `pad_id`, `eos_id`).
        prompts: the prompt strings.
        batch_size: prompts per batch; prompts are grouped by length to waste little padding (`length_batches`).
        seed: seeds sampling; the batch starting at position p of the length order is seeded with seed + p.
        progress: show a tqdm bar.
        prompt_ids: the prompts' token ids where the caller encoded them (`ecellm.eval.encode_prompts`: a record's
            text as text), one list per prompt. Default: `tokenizer.encode` of each prompt.
        stop_strings: a row ends as soon as its decoded continuation contains one of these (checked after every
            token by decoding the row's new tokens; `ecellm.eval` passes the template's response marker, past which
            `parse_response` reads nothing). The text returned still holds the string.
    Returns:
        one completion per prompt, in the order given.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    encoded = [list(ids) for ids in prompt_ids] if prompt_ids is not None else [tokenizer.encode(p) for p in prompts]
    if len(encoded) != len(prompts):
        raise ValueError(f"generate_text: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
    eos = _id_list(tokenizer.eos_id, getattr(model.config, "eos_token_id", None))
    results: list[str] = [""] * len(prompts)
    batches = length_batches([len(e) for e in encoded], batch_size)
    for b, rows in enumerate(tqdm(batches, desc="generate", disable=not progress, unit="batch")):
        ids, mask = left_pad([encoded[i] for i in rows], tokenizer.pad_id)
        new = generate(
            model,
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            temperature=temperature,
            top_p=top_p,
            seed=None if seed is None else seed + b * batch_size,
            vocab_limit=tokenizer.vocab_size,
            stop=_contains_any(tokenizer, stop_strings),
        )
        for row, tokens in zip(rows, new):
            results[row] = tokenizer.decode(tokens)
    return results
