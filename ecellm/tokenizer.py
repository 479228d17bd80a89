"""Tokenizers without Hugging Face: sentencepiece (`tokenizer.model`, `spiece.model`) and `tokenizers` JSON.

`load_tokenizer(path)` reads a checkpoint directory (or a tokenizer file) and returns a `Tokenizer` whose
`encode(text)` follows the model family's BOS/EOS rule as its users know it:

    family  models                     encode(text) default
    llama   Llama-2, Mistral (spm BPE)  BOS + text
    t5      T5, Flan-T5 (spiece)        text + EOS
    gpt2    GPT-2, Phi-2 (byte BPE)     text

The family is `model_type` in `config.json` (llama/mistral -> llama, t5 -> t5, phi/gpt2 -> gpt2), else the file
(`tokenizer.model` -> llama, `spiece.model` -> t5, `tokenizer.json` -> gpt2). The default BOS/EOS rule is, in order:
`add_bos_token` / `add_eos_token` in `tokenizer_config.json`; for a `tokenizer.json`, what its post-processor adds
(a `TemplateProcessing` with special tokens, else nothing: SmolLM2's byte-level BPE adds neither); for a
sentencepiece file, the family's rule. `load_tokenizer(path, family="llama" | "t5" | "gpt2")` forces a family and
its rule when the directory does not say (for example a bare `tokenizer.json` of a Llama model that wants a BOS).

Special tokens come from `tokenizer_config.json`, then `special_tokens_map.json`, then the ids in `config.json`,
then the sentencepiece model's own ids, then the family's usual token strings (`<s>`/`</s>`, `</s>`/`<pad>`,
`<|endoftext|>`). A model without a pad token gets `pad_id == 0`, as the eCeLLM paper does.

Control tokens and text: a special token's string in text (`</s>`, `<|im_end|>`) can mean the control token (what a
template's own markup writes) or just those characters (what a record, a review or a user wrote). `encode(text)`
turns the special-token strings of a `tokenizer.json` into their ids, as `tokenizers` does;
`encode(text, control_tokens=False)` keeps them as text. `encode_parts(parts)` does both in one tokenization:
`parts` alternate markup and data, special-token strings in the markup become control ids and those in the data stay
text. The ids are those of encoding `"".join(parts)` whenever the data holds no special-token string (`tokenizers`
too splits the text at each special token and tokenizes the pieces between them on their own). A sentencepiece
model never turns text into a control id; in its markup parts only the BOS and EOS strings (`<s>`, `</s>`) do.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer as _HFTokenizersJSON  # the `tokenizers` Rust library, not `transformers`

from .errors import EcellmError
from .files import read_json

# family -> (add BOS, add EOS) by default
FAMILY_RULES = {"llama": (True, False), "t5": (False, True), "gpt2": (False, False)}
MODEL_TYPE_FAMILY = {"llama": "llama", "mistral": "llama", "t5": "t5", "mt5": "t5", "phi": "gpt2", "gpt2": "gpt2"}
# usual token strings per family when no config names them
FAMILY_TOKENS = {
    "llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
    "t5": {"eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
}
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


class TokenizerError(EcellmError, ValueError):
    """Tokenizer files that cannot be used (unreadable, inconsistent, or not fitting the model), naming the file."""


class Tokenizer:
    """A tokenizer with the special-token rules of one model family.

    Args:
        backend: a `sentencepiece.SentencePieceProcessor` or a `tokenizers.Tokenizer`.
        family: "llama", "t5" or "gpt2"; gives the default BOS/EOS rule of `encode`.
        special_ids: {"bos", "eos", "pad", "unk"} -> id or None for the tokens the model declares.
        add_bos, add_eos: the default of `encode` (None: the family's rule).
        path: where it was loaded from, for error messages.
        chat_template: the checkpoint's Jinja chat template (tokenizer_config.json `chat_template`), or None;
            `ecellm.chat` renders it.
    """

    def __init__(self, backend, family: str, special_ids: dict, add_bos: bool | None = None,
                 add_eos: bool | None = None, path: str = "<memory>", chat_template: str | None = None):
        if family not in FAMILY_RULES:
            raise TokenizerError(f"{path}: unknown tokenizer family {family!r}; expected one of {sorted(FAMILY_RULES)}")
        self.backend = backend
        self.family = family
        self.path = path
        self.chat_template = chat_template
        self._spm = isinstance(backend, spm.SentencePieceProcessor)
        self._ids = {name: special_ids.get(name) for name in SPECIAL_NAMES}
        fam_bos, fam_eos = FAMILY_RULES[family]
        self.add_bos = fam_bos if add_bos is None else add_bos
        self.add_eos = fam_eos if add_eos is None else add_eos
        for name, needed in (("bos", self.add_bos), ("eos", self.add_eos)):
            if needed and self._ids[name] is None:
                raise TokenizerError(f"{path}: family {family!r} adds a {name.upper()} token but none is declared")
        # ids that decode(skip_special_tokens=True) drops: declared special tokens (not the pad-0 fallback)
        self._skip = {i for i in self._ids.values() if i is not None}
        if self._spm:
            self._skip |= {i for i in range(backend.get_piece_size()) if backend.is_control(i)}
        # special-token string -> id (sentencepiece: BOS and EOS, for markup such as a chat template's "<s>"), and a
        # pattern finding them leftmost-longest (as `tokenizers` splits text)
        self._control = {backend.id_to_piece(i): i for i in (self._ids["bos"], self._ids["eos"]) if i is not None} \
            if self._spm else {token.content: i for i, token in backend.get_added_tokens_decoder().items()
                               if token.special}
        by_length = sorted(self._control, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    # --- special tokens -------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None when the model has none (T5)."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token (the one appended to training answers)."""
        if self._ids["eos"] is None:
            raise TokenizerError(f"{self.path}: the tokenizer declares no EOS token")
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        """Id used for padding: the declared pad token, else 0 (the eCeLLM paper's choice)."""
        return 0 if self._ids["pad"] is None else self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        if self._spm:
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        """The token string of an id (a sentencepiece piece such as "<s>", or a BPE token)."""
        return self.backend.id_to_piece(token_id) if self._spm else self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (a sentencepiece piece such as "▁Hello", or a BPE token), None if unknown."""
        if self._spm:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    # --- encode / decode ------------------------------------------------------------------------------------
    def _specials(self, ids: list[int], bos: bool | None, eos: bool | None) -> list[int]:
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: bos=True but the tokenizer declares no BOS token")
            ids = [self.bos_id] + ids
        if self.add_eos if eos is None else eos:
            ids = ids + [self.eos_id]
        return ids

    def _encode_texts(self, texts: list[str], control_tokens: bool) -> list[list[int]]:
        """The backend's ids of each text, no BOS/EOS; `control_tokens=False` encodes special-token strings as text."""
        if self._spm:
            return self.backend.encode(list(texts))
        self.backend.encode_special_tokens = not control_tokens
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            self.backend.encode_special_tokens = False

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None, *,
               control_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the string to encode.
            bos, eos: prepend BOS / append EOS; None uses the family's rule (see the module docstring).
            control_tokens: True: special-token strings in a `tokenizer.json`'s added tokens (such as `<|im_end|>`)
                map to their ids; False: they are encoded as the text they are (for text from data or users).
                Sentencepiece never turns text such as "</s>" into a control id, either way.
        Returns:
            list of ids, length L.
        """
        return self._specials(self._encode_texts([text], control_tokens)[0], bos, eos)

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool | None = None, *,
                     control_tokens: bool = True) -> list[list[int]]:
        """`encode` over a list of N texts, using the backend's multi-threaded batch path. Returns N id lists."""
        return [self._specials(ids, bos, eos) for ids in self._encode_texts(texts, control_tokens)]

    def _split_markup(self, parts: Sequence[str]) -> list[str | int]:
        """`"".join(parts)` as text pieces and control ids: the special-token strings of the markup parts
        (`parts[0::2]`) become ids; the data parts (`parts[1::2]`) join the text around them."""
        pieces: list[str | int] = []
        text = ""
        for i, part in enumerate(parts):
            if i % 2 or self._control_pattern is None:
                text += part
                continue
            start = 0
            for match in self._control_pattern.finditer(part):
                pieces += [text + part[start:match.start()], self._control[match[0]]]
                text, start = "", match.end()
            text += part[start:]
        return pieces + [text]

    def encode_parts_batch(self, batch: list[Sequence[str]], bos: bool | None = None,
                           eos: bool | None = None) -> list[list[int]]:
        """`encode_parts` over N part lists, tokenizing every text piece in one batch. Returns N id lists."""
        split = [self._split_markup(parts) for parts in batch]
        texts = [piece for pieces in split for piece in pieces if isinstance(piece, str)]
        encoded = iter(self._encode_texts(texts, control_tokens=False))
        batch_ids = []
        for pieces in split:
            ids: list[int] = []
            for piece in pieces:
                ids += [piece] if isinstance(piece, int) else next(encoded)
            batch_ids.append(self._specials(ids, bos, eos))
        return batch_ids

    def encode_parts(self, parts: Sequence[str], bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of `"".join(parts)`, where `parts` alternate the template's own markup (`parts[0]`, `parts[2]`,
        ...: special-token strings there become control ids) and data (`parts[1]`, `parts[3]`, ...: always text).

        Args:
            parts: markup, data, markup, ... (any may be ""); see the module docstring for the ids this gives.
            bos, eos: as `encode`.
        Returns:
            list of ids, length L.
        """
        return self.encode_parts_batch([parts], bos, eos)[0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor / array).

        Args:
            ids: token ids, length L.
            skip_special_tokens: drop BOS/EOS/PAD/UNK and other control or special tokens. The pad-0 fallback
                of a model without a pad token is not dropped (id 0 is a real token there).
        Raises:
            ValueError: an id outside [0, vocab_size), naming it.
        """
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{self.path}: decode: id {bad} is out of range (the tokenizer has ids 0 to "
                             f"{self.vocab_size - 1})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip]
        if self._spm:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_fits(self, vocab_size: int, model: str) -> None:
        """Refuse to pair this tokenizer with a model whose embedding has fewer rows than the tokenizer has ids
        (an id past the embedding would fail deep inside the model). A larger embedding (padded) is fine.

        Args:
            vocab_size: the model's embedding rows (`model.config.vocab_size`).
            model: where the model came from, for the message.
        """
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"the tokenizer {self.path} has {self.vocab_size} ids but the model {model} embeds "
                                 f"only {vocab_size} (its config.json vocab_size): ids past {vocab_size - 1} would "
                                 "fail inside the model; use the tokenizer that belongs to this model")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, family={self.family!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self._ids['eos']}, pad_id={self.pad_id})")


# --- loading ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    """The JSON of an optional tokenizer file; {} when it is absent."""
    return read_json(path, TokenizerError) if path.is_file() else {}


def _token_string(value) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_rule(post_processor: dict | None) -> tuple[bool, bool] | None:
    """(add BOS, add EOS) from a tokenizer.json TemplateProcessing post-processor, None if it has none."""
    if not post_processor:
        return None
    if post_processor.get("type") == "Sequence":
        rules = [_template_rule(p) for p in post_processor.get("processors", [])]
        return next((r for r in rules if r is not None), None)
    if post_processor.get("type") != "TemplateProcessing":
        return None
    single = post_processor.get("single", [])
    return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]


def _tokenizer_file(path: Path) -> tuple[Path, Path]:
    """(directory, tokenizer file) of a checkpoint directory or a tokenizer file; tokenizer.json comes first."""
    if path.is_file():
        return path.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = [path / n for n in ("tokenizer.json", "tokenizer.model", "spiece.model") if (path / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or spiece.model in this directory")
    return path, files[0]


def _backend(file: Path, is_json: bool):
    """(backend, lookup): the `tokenizers` or sentencepiece tokenizer, and token string -> id (None if absent)."""
    if is_json:
        try:
            backend = _HFTokenizersJSON.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for a schema it cannot read
            raise TokenizerError(f"{file}: not a `tokenizers` tokenizer.json ({e})") from None
        return backend, backend.token_to_id
    try:
        backend = spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{file}: not a sentencepiece model ({e})") from None

    def lookup(token: str) -> int | None:
        i = backend.piece_to_id(token)
        return None if i == backend.unk_id() and token != backend.id_to_piece(i) else i

    return backend, lookup


def _special_ids(directory: Path, configs: tuple[dict, dict, dict], backend, lookup, is_json: bool,
                 family: str) -> dict[str, int | None]:
    """bos/eos/pad/unk ids: the tokenizer config's token strings, else config.json's ids, else the sentencepiece
    model's own, else the family's usual tokens."""
    tok_config, special_map, model_config = configs
    special_ids = {}
    for name in SPECIAL_NAMES:
        token = _token_string(tok_config.get(f"{name}_token")) or _token_string(special_map.get(f"{name}_token"))
        if token is not None:
            token_id = lookup(token)
            if token_id is None:
                raise TokenizerError(f"{directory}: {name}_token {token!r} from the tokenizer config is not in the "
                                     "vocabulary")
            special_ids[name] = token_id
            continue
        config_id = model_config.get(f"{name}_token_id")
        if isinstance(config_id, list):  # several EOS ids (e.g. chat models): the first is the one to append
            config_id = config_id[0] if config_id else None
        if config_id is None and not is_json:
            config_id = getattr(backend, f"{name}_id")()
            config_id = None if config_id < 0 else config_id
        if config_id is None and name in FAMILY_TOKENS[family]:
            config_id = lookup(FAMILY_TOKENS[family][name])
        special_ids[name] = config_id
    return special_ids


def load_tokenizer(path: str | Path, family: str | None = None) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory.

    Args:
        path: a directory holding `tokenizer.json`, `tokenizer.model` or `spiece.model` (with optional
            `tokenizer_config.json`, `special_tokens_map.json`, `config.json`), or one of those files itself.
            When a directory has both, `tokenizer.json` is used (it carries the added tokens). A known model's
            name (`ecellm.models.default.MODELS`, e.g. "smollm2") stands for its checkpoint directory.
        family: "llama", "t5" or "gpt2" to force that family's BOS/EOS rule; None infers it (module docstring).
    Returns:
        a `Tokenizer`.
    Raises:
        UnknownModelError: `path` is neither a file, a folder nor a known model's name.
    """
    if not Path(path).exists():  # a model's name: imported here, as only a name needs the models' fetching code
        from .models.default import resolve_model

        path = resolve_model(path)
    path = Path(path)
    directory, file = _tokenizer_file(path)
    tok_config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    model_config = _read_json(directory / "config.json")

    # the family and its BOS/EOS defaults
    tokenizer_json = _read_json(file) if file.suffix == ".json" else None
    if tokenizer_json is not None and not isinstance(tokenizer_json, dict):
        raise TokenizerError(f"{file}: expected a JSON object (a `tokenizers` tokenizer.json), got "
                         f"{type(tokenizer_json).__name__}")
    template = _template_rule(tokenizer_json.get("post_processor")) if tokenizer_json else None
    add_bos = add_eos = None  # None: the family's rule
    if family is None:
        family = MODEL_TYPE_FAMILY.get(model_config.get("model_type"))
        if family is None:
            family = {"tokenizer.model": "llama", "spiece.model": "t5"}.get(file.name, "gpt2")
        # a tokenizer.json adds exactly what its post-processor adds (as `tokenizers` does), unless the config says
        if tokenizer_json is not None:
            add_bos, add_eos = template if template is not None else (False, False)
        add_bos = tok_config.get("add_bos_token", add_bos)
        add_eos = tok_config.get("add_eos_token", add_eos)
    if family not in FAMILY_RULES:
        raise TokenizerError(f"{path}: unknown tokenizer family {family!r}; expected one of {sorted(FAMILY_RULES)}")

    is_json = tokenizer_json is not None
    backend, lookup = _backend(file, is_json)
    special_ids = _special_ids(directory, (tok_config, special_map, model_config), backend, lookup, is_json, family)
    chat_template = tok_config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        chat_template = next((t.get("template") for t in chat_template
                              if isinstance(t, dict) and t.get("name") == "default"), None)
    return Tokenizer(backend, family, special_ids, add_bos=add_bos, add_eos=add_eos, path=str(path),
                     chat_template=chat_template if isinstance(chat_template, str) else None)
