"""Chat prompts in a checkpoint's own format: the messages `[{"role": "user", "content": ...}, ...]` laid out as
the chat template of its tokenizer files says (`tokenizer_config.json` `chat_template`, which GGUF conversions carry).

ecellm runs no Jinja: it recognises the three forms instruct models use and writes them itself, and refuses a
template it does not recognise (rather than guess):

    ChatML      <|im_start|>{role}\\n{content}<|im_end|>\\n ...  <|im_start|>assistant\\n    SmolLM2, Qwen2 / 2.5
                (a default system message the template writes when the first message is not one is kept)
    Llama-2     <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] ...
    Mistral     <s>[INST] {user} [/INST]{assistant}</s>[INST] ...                          Mistral-7B v0.1 / v0.2

`encode_chat` tokenizes the markup as markup (its control tokens) and the messages' content as text
(`Tokenizer.encode_parts`): a message holding "<|im_end|>" cannot close its turn early.
"""

from __future__ import annotations

import re

from .errors import EcellmError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# the pieces each form's template writes, as Jinja source (a quote, optional spaces, + between the pieces)
_CHATML = re.compile(r"""'<\|im_start\|>'\s*\+\s*message(\['role'\]|\.role)\s*\+\s*'(\n|\\n)'\s*\+\s*"""
                     r"""message(\['content'\]|\.content)\s*\+\s*'<\|im_end\|>""")
_CHATML_SYSTEM = re.compile(r"""'<\|im_start\|>system(?:\n|\\n)([^'{}]*)<\|im_end\|>(?:\n|\\n)'""")
_LLAMA2 = "bos_token + '[INST] ' + content.strip() + ' [/INST]'"
_MISTRAL = "'[INST] ' + message['content'] + ' [/INST]'"


class ChatTemplateError(EcellmError, ValueError):
    """A tokenizer without a chat template, a template of a form ecellm does not render, or messages the form
    cannot hold (an unknown role, roles that do not alternate)."""


def _check_messages(messages: list[dict], alternate: bool, system: bool, where: str) -> list[dict]:
    """`messages` checked: dicts with a known role and string content; for the [INST] forms, an optional leading
    system message (if `system`) then user and assistant in turn, starting with user."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"{where}: message {i} is {m!r}; expected {{'role': one of {list(ROLES)}, "
                                    "'content': a string}")
    if alternate:
        turns = messages[1:] if system and messages and messages[0]["role"] == "system" else messages
        for i, m in enumerate(turns):
            if m["role"] != ("user", "assistant")[i % 2]:
                raise ChatTemplateError(f"{where}: the template takes {'an optional system message, then ' * system}"
                                        f"user and assistant messages in turn, starting with user; got {m['role']!r}")
    return messages


Piece = tuple[str, bool]  # (text, whether it is message content rather than the template's markup)


def _alternate(pieces: list[Piece]) -> list[str]:
    """Pieces as `Tokenizer.encode_parts` takes them: markup, content, markup, ... (markup may be "")."""
    parts = [""]
    for text, is_content in pieces:
        if is_content:
            parts += [text, ""]
        else:
            parts[-1] += text
    return parts


def _rstrip(pieces: list[Piece]) -> list[Piece]:
    """`pieces` with the whitespace at the end of their joined text removed (Jinja's `.strip()` on a string that
    starts with markup)."""
    pieces = list(pieces)
    for i in reversed(range(len(pieces))):
        pieces[i] = (pieces[i][0].rstrip(), pieces[i][1])
        if pieces[i][0]:
            break
    return pieces


def _chatml(template: str, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    default_system = _CHATML_SYSTEM.search(template)
    if default_system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system[1].replace("\\n", "\n")}] + messages
    pieces: list[Piece] = []
    for m in messages:
        pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"], True), ("<|im_end|>\n", False)]
    return pieces + [("<|im_start|>assistant\n", False)] * add_generation_prompt


def _llama2(messages: list[dict], bos: str, eos: str) -> list[Piece]:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    pieces: list[Piece] = []
    for i, m in enumerate(messages[system is not None:]):
        if m["role"] == "assistant":
            pieces += [(" ", False), (m["content"].strip(), True), (" " + eos, False)]
            continue
        if i == 0 and system is not None:
            body = _rstrip([("<<SYS>>\n", False), (system, True), ("\n<</SYS>>\n\n", False), (m["content"], True)])
        else:
            body = [(m["content"].strip(), True)]
        pieces += [(bos + "[INST] ", False), *body, (" [/INST]", False)]
    return pieces


def _mistral(messages: list[dict], bos: str, eos: str) -> list[Piece]:
    pieces: list[Piece] = [(bos, False)]
    for m in messages:
        if m["role"] == "user":
            pieces += [("[INST] ", False), (m["content"], True), (" [/INST]", False)]
        else:
            pieces += [(m["content"], True), (eos, False)]
    return pieces


def chat_parts(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[str]:
    """The chat prompt of `messages` in `tokenizer.chat_template`'s form, as markup and message content in turn
    (`"".join` gives the text; `Tokenizer.encode_parts` the ids).

    Args:
        tokenizer: a `Tokenizer` loaded from a checkpoint whose tokenizer_config.json has a `chat_template`.
        messages: `[{"role": "system" | "user" | "assistant", "content": str}, ...]`.
        add_generation_prompt: end with the assistant's turn opened (ChatML; the [INST] forms end there anyway).
    Raises:
        ChatTemplateError: no template, a form ecellm does not render, or messages the form cannot hold.
    """
    template, where = tokenizer.chat_template, tokenizer.path
    if template is None:
        raise ChatTemplateError(f"{where}: no chat_template in its tokenizer_config.json; write the prompt yourself")
    if _CHATML.search(template):
        return _alternate(_chatml(template, _check_messages(messages, False, True, where), add_generation_prompt))
    bos, eos = (tokenizer.id_to_token(i) if i is not None else "" for i in (tokenizer.bos_id, tokenizer.eos_id))
    if _LLAMA2 in template:
        return _alternate(_llama2(_check_messages(messages, True, True, where), bos, eos))
    if _MISTRAL in template:
        return _alternate(_mistral(_check_messages(messages, True, False, where), bos, eos))
    raise ChatTemplateError(f"{where}: its chat_template is none of the forms ecellm renders (ChatML, Llama-2 "
                            "[INST], Mistral [INST]); write the prompt yourself")


def format_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat prompt of `messages` as text, as the checkpoint's template writes it (see `chat_parts`)."""
    return "".join(chat_parts(tokenizer, messages, add_generation_prompt))


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The ids of the chat prompt of `messages` (see `chat_parts`): the template's markup gives control tokens (and
    its own BOS), the messages' content is encoded as text. Returns a list of L ids, ready for `generate`."""
    return tokenizer.encode_parts(chat_parts(tokenizer, messages, add_generation_prompt), bos=False, eos=False)
