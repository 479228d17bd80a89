"""ecellm.data: templates against the spec text, loading and bad records, masking, truncation, batching, sampling."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from ecellm.data import (
    TASKS,
    LengthGroupedBatchSampler,
    RecordError,
    _check_record,
    build_example,
    build_examples,
    build_seq2seq_example,
    collate,
    format_prompt,
    leave_one_category_out,
    load_records,
    parse_response,
    resolve_task,
    sample_per_task,
)
from ecellm.synthetic import generate_records
from ecellm.tokenizer import load_tokenizer

ASSETS = Path(__file__).parent / "assets" / "tokenizers"

# The four templates, copied from ECINSTRUCT.md ("Prompt templates (exact; `\n` is a newline)").
PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.")
SPEC = {
    ("alpaca", True): PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Options:\n"
                                 "{options}\n\n### Response:\n",
    ("alpaca", False): PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ("mistral", True): "[INST] " + PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                                              "### Options:\n{options}\n\n [/INST] ### Response:\n",
    ("mistral", False): "[INST] " + PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                                               " [/INST] ### Response:\n",
}
OPTION_TASKS = {"PRP", "SA", "SR", "MPC"}


def _record(task="SR", **overrides):
    return {**generate_records(task, 1, "train", seed=3)[0], **overrides}


# --- templates ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["alpaca", "mistral"])
@pytest.mark.parametrize("abbr", [t.abbr for t in TASKS])
def test_prompt_matches_spec(template, abbr):
    r = _record(abbr)
    has_options = abbr in OPTION_TASKS
    assert bool(r["options"]) == has_options
    expected = SPEC[(template, has_options)]
    for key in ("instruction", "input", "options"):
        expected = expected.replace("{" + key + "}", r[key] or "")
    assert format_prompt(r, template) == expected


@pytest.mark.parametrize("options", ["", None, "missing"])
def test_empty_options_use_no_options_form(options):
    r = _record("SA")
    if options == "missing":
        del r["options"]
    else:
        r["options"] = options
    expected = SPEC[("alpaca", False)].replace("{instruction}", r["instruction"]).replace("{input}", r["input"])
    assert format_prompt(r) == expected


def test_options_are_never_evaluated():
    r = _record("SR", options="__import__('os').system('false')")
    assert "### Options:\n__import__('os').system('false')\n\n" in format_prompt(r)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'llama3'"):
        format_prompt(_record(), "llama3")


def test_parse_response():
    r = _record("PM")
    assert parse_response(format_prompt(r) + " yes \n") == "yes"
    assert parse_response(format_prompt(r, "mistral") + "no</s>".removesuffix("</s>")) == "no"
    assert parse_response(" B \n") == "B"
    assert parse_response("### Response:\nA\n### Response:\nB") == "A"


def test_parse_response_splits_on_the_templates_own_marker():
    r = _record("PM", instruction="Answer after the line '### Response:' with yes or no.")
    mistral = format_prompt(r, "mistral")
    assert parse_response(mistral + "yes", "mistral") == "yes"  # alpaca's marker would give "with yes or no. ..."
    assert parse_response(mistral + "yes", "alpaca").startswith("' with yes or no.")
    # a bare marker in the continuation is text for mistral (its marker is "[/INST] ### Response:")
    assert parse_response(mistral + "no\n### Response:\nyes", "mistral") == "no\n### Response:\nyes"
    # the alpaca template has no other marker: the reference reads the instruction's text there too
    assert parse_response(format_prompt(r, "alpaca") + "no", "alpaca").startswith("' with yes or no.\n\n### Input:")
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        parse_response("x", "chatml")


def test_resolve_task():
    assert resolve_task("SR") == resolve_task("sr") == "Sequential_Recommendation"
    assert resolve_task("Sequential Recommendation") == "Sequential_Recommendation"
    assert resolve_task("Product_Substitue_Identification") == "Product_Substitute_Identification"
    assert resolve_task("Product_Relation_Predicition") == "Product_Relation_Prediction"
    assert resolve_task("Query_Product_Ranking") == "Query_Product_Rank"
    with pytest.raises(ValueError, match="unknown task 'XYZ'"):
        resolve_task("XYZ")


def test_checking_a_record_does_not_change_it():
    rec = generate_records("SR", 1, "train", seed=0)[0] | {"task": "sr"}
    before = dict(rec)
    assert _check_record(rec) is None
    assert rec == before  # the old check rewrote rec["task"] to "Sequential_Recommendation" in place


# --- loading ------------------------------------------------------------------------------------------------
def _write(path: Path, records, fmt: str) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _mixed_records():
    records = []
    for split in ("train", "val"):
        for abbr in ("SR", "PSI", "QPR"):
            records += generate_records(abbr, 3, split, seed=1)
    return records


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_load_and_select(tmp_path, fmt):
    records = _mixed_records()
    records[0]["task"] = "SR"  # an abbreviation in the file is canonicalized
    records[3]["task"] = "Product_Substitue_Identification"
    path = _write(tmp_path / f"train.{fmt}", records, fmt)
    everything = load_records(path)
    assert len(everything) == everything.n_read == 18 and everything.n_filtered == 0
    assert everything[0]["task"] == "Sequential_Recommendation" and everything[0]["synthetic"] is True
    assert everything[3]["task"] == "Product_Substitute_Identification"
    selected = load_records(path, split="train", setting="IND_Diverse_Instruction",
                            tasks=["psi", "Query_Product_Ranking"])
    assert [r["task"] for r in selected] == ["Product_Substitute_Identification"] * 3 + ["Query_Product_Rank"] * 3
    assert selected.n_filtered == 12 and not selected.skipped
    assert len(load_records([path, path], split="val")) == 18


def test_load_selection_errors(tmp_path):
    path = _write(tmp_path / "a.json", _mixed_records(), "json")
    with pytest.raises(ValueError, match="unknown split"):
        load_records(path, split="validation")
    with pytest.raises(ValueError, match="unknown setting"):
        load_records(path, setting="IND")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records(tmp_path / "absent.json")


BAD_CASES = [  # (change to record 2, field named, reason counted)
    (lambda r: r.pop("output"), "output", "missing field 'output'"),
    (lambda r: r.update(input=3), "input", "mistyped field 'input'"),
    (lambda r: r.update(options=["A: x"]), "options", "mistyped field 'options'"),
    (lambda r: r.update(task="Sequential_Recomendation"), "task", "unknown task"),
    (lambda r: r.update(setting="IND_Diverse"), "setting", "unknown setting"),
    (lambda r: r.update(split="dev"), "split", "unknown split"),
    (lambda r: r.pop("split"), "split", "missing field 'split'"),
]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("change,field,reason", BAD_CASES)
def test_bad_record_errors(tmp_path, fmt, change, field, reason):
    records = _mixed_records()
    change(records[2])
    path = _write(tmp_path / f"bad.{fmt}", records, fmt)
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 2, field)
    assert str(path) in str(e.value) and "record 2" in str(e.value) and repr(field) in str(e.value)
    ok = load_records(path, skip_bad=True)
    assert len(ok) == 17 and ok.n_read == 18 and ok.skipped == Counter({reason: 1})


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_lone_surrogate_is_a_bad_record(tmp_path, fmt):
    """json.loads accepts an unpaired "\\ud83d"; such text cannot be encoded, so it is refused where it enters."""
    records = _mixed_records()
    records[2]["input"] = "caf\ud83d"
    path = _write(tmp_path / f"bad.{fmt}", records, fmt)  # json.dumps writes the escape "\\ud83d"
    with pytest.raises(RecordError, match=r"bad.json.?: record 2: field 'input': holds a lone surrogate \\ud83d at "
                                          r"character 3"):
        load_records(path)
    assert load_records(path, skip_bad=True).skipped == Counter({"invalid text in field 'input'": 1})


@pytest.mark.parametrize("fmt, where", [("json", "bad.json: "), ("jsonl", "bad.jsonl: record 1: ")])
def test_non_utf8_file_names_file_and_line(tmp_path, fmt, where):
    records = _mixed_records()[:3]
    records[1]["input"] = "caf\u00e9"
    path = _write(tmp_path / f"bad.{fmt}", records, fmt)
    text = path.read_text(encoding="utf-8").replace("\\u00e9", "\u00e9")  # a raw é, then saved as Latin-1
    path.write_bytes(text.encode("latin-1"))
    line = text[:text.index("caf\u00e9")].count("\n") + 1
    with pytest.raises(RecordError, match=f"{where}not UTF-8 text: byte 0xe9 on line {line} "):
        load_records(path)


def test_skip_counts_are_exact(tmp_path):
    records = _mixed_records()
    for i, (change, _, _) in enumerate(BAD_CASES):
        change(records[i])
    records[10]["input"] = None
    records[11] = ["not", "a", "record"]
    path = _write(tmp_path / "bad.jsonl", records, "jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"instruction": "x", "input": \n')  # broken JSON line
    ok = load_records(path, skip_bad=True, tasks="SR")
    assert ok.skipped == Counter({"missing field 'output'": 1, "mistyped field 'input'": 2,
                                  "mistyped field 'options'": 1, "unknown task": 1, "unknown setting": 1,
                                  "unknown split": 1, "missing field 'split'": 1, "not a JSON object": 1,
                                  "broken JSON": 1})
    assert ok.n_read == 19 and len(ok) + ok.n_filtered + sum(ok.skipped.values()) == 19
    assert "10 bad records skipped" in ok.summary()


def test_broken_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in _mixed_records()[:3]]
    path.write_text(lines[0] + "\n\n" + lines[1][:-5] + "\n" + lines[2] + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"broken.jsonl: record 1: broken JSON on line 3"):
        load_records(path)
    ok = load_records(path, skip_bad=True)
    assert len(ok) == 2 and ok.skipped == Counter({"broken JSON": 1}) and ok.n_read == 3


def test_broken_json_array(tmp_path):
    text = json.dumps(_mixed_records()[:3], indent=1)
    path = tmp_path / "broken.json"
    cut = text.index('"instruction"', text.index('"instruction"') + 1)  # inside record 1
    path.write_text(text[:cut] + "oops" + text[cut:], encoding="utf-8")
    for skip in (False, True):  # an array cannot be resynchronized: always an error
        with pytest.raises(RecordError, match=r"broken.json: record 1: broken JSON at line \d+"):
            load_records(path, skip_bad=skip)
    path.write_text(text[:-1] + "x]", encoding="utf-8")
    with pytest.raises(RecordError, match=r"record 2: broken JSON after this record"):
        load_records(path)
    path.write_text(" [ ] ", encoding="utf-8")
    assert load_records(path) == []


# --- examples -----------------------------------------------------------------------------------------------
# The reference's training example (finetune.py line 188-239 with finetune.sh line 68-69: train_on_inputs False,
# add_eos_token False), run with a transformers tokenizer built as the models' tokenizer.json files are (for
# Llama-2 / Mistral: Prepend("▁") + Replace(" ", "▁") normalizer, byte-fallback BPE whose merges follow the
# sentencepiece scores, "<s> $A" post-processor).
def _reference_tokenizer(name: str):
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if name == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "gpt2-bpe" / "tokenizer.json"),
                                       eos_token="<|endoftext|>")
    sp = spm.SentencePieceProcessor(model_file=str(ASSETS / {"llama": "llama2-spm", "mistral": "mistral-v1"}[name]
                                                   / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    splits = [(piece[:k], piece[k:], sp.get_score(i)) for piece, i in vocab.items() for k in range(1, len(piece))]
    merges = sorted((m for m in splits if m[0] in vocab and m[1] in vocab),
                    key=lambda m: (-m[2], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for left, right, _ in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_reference_tokenizer_is_llama2s():
    vectors = json.loads((ASSETS / "llama2-spm" / "testvectors.json").read_text(encoding="utf-8"))
    reference = _reference_tokenizer("llama")
    assert len(vectors) == 47
    assert all(reference(v["text"], add_special_tokens=False)["input_ids"] == v["ids"] for v in vectors)


def _reference_example(hf_tokenizer, prompt: str, output: str, cutoff_len: int = 2048) -> dict:
    def tokenize(text, add_eos_token=True):  # finetune.py line 188-206
        ids = hf_tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
        if ids[-1] != hf_tokenizer.eos_token_id and len(ids) < cutoff_len and add_eos_token:
            ids.append(hf_tokenizer.eos_token_id)
        return ids

    full = tokenize(prompt + output if output else prompt)  # line 213-220 (prompter.py line 41-42)
    user_prompt_len = len(tokenize(prompt, add_eos_token=False))  # line 222-233
    return {"input_ids": full, "labels": [-100] * user_prompt_len + full[user_prompt_len:]}  # line 235-239


ODD_ANSWERS = ["Très bien, ça marche — 100 % coton ✓", "日本語の回答です。", "😀 great", "Line one\nLine two\n\n- item",
               " yes", "42 inches", "(B) maybe", ".5 lbs", "'quoted'", "A", "B: positive", "yes\n",
               '[{"attribute": "Color", "value": "Bleu ciel", "source": "title"}, '
               '{"attribute": "Größe", "value": null, "source": "None"}]']


def _varied_records() -> list[dict]:
    records = [r for t in TASKS for r in generate_records(t.abbr, 2, "train", seed=5)]
    return records + [{**records[i % len(records)], "output": answer} for i, answer in enumerate(ODD_ANSWERS)]


@pytest.mark.parametrize("template", ["alpaca", "mistral"])
@pytest.mark.parametrize("tok_name", ["llama", "mistral", "gpt2"])
def test_examples_match_reference_procedure(request, tok_name, template):
    tok, reference = request.getfixturevalue(tok_name), _reference_tokenizer(tok_name)
    records = _varied_records()
    assert len(records) >= 30 and any(r["task"] == "Attribute_Value_Extraction" for r in records[:20])
    examples, report = build_examples(records, tok, template)
    assert len(examples) == len(records) and report.n_truncated == 0
    for r, ex in zip(records, examples):
        assert ex == {**_reference_example(reference, format_prompt(r, template), r["output"]), "n_cut": 0}
        assert ex == build_example(r, tok, template)
        assert tok.decode([t for t in ex["labels"] if t != -100]).strip(" ") == r["output"].strip(" ")


@pytest.mark.parametrize("tok_name", ["llama", "mistral"])
def test_sentencepiece_answer_starts_without_word_marker(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ex = build_example(_record("SA", output="A: very positive"), tok)
    first = next(t for t in ex["labels"] if t != -100)
    assert first == tok.token_to_id("A") != tok.token_to_id("▁A")  # Llama-2: 29909, not 319
    if tok_name == "llama":
        assert (first, tok.token_to_id("▁A")) == (29909, 319)


def test_byte_level_bpe_ids_unchanged_and_boundary_merge(gpt2):
    for r in _varied_records():  # no answer starts with a newline: joint == separate tokenization
        ex = build_example(r, gpt2)
        prompt_ids = gpt2.encode(format_prompt(r))
        assert ex["input_ids"] == prompt_ids + gpt2.encode(r["output"]) + [gpt2.eos_id]
        assert ex["labels"] == [-100] * len(prompt_ids) + gpt2.encode(r["output"]) + [gpt2.eos_id]
    # "\n\nhello" after the prompt's final "\n": the first two newlines join into one token ("\n\n", 628), which
    # the prompt's length masks, as the reference does; the answer's targets start at its second newline.
    r = _record("AG", output="\n\nhello")
    ex = build_example(r, gpt2)
    n_prompt = len(gpt2.encode(format_prompt(r)))
    assert ex["input_ids"][n_prompt - 1] == 628 and ex["labels"][n_prompt - 1] == -100
    assert ex["labels"][n_prompt:] == [198, 31373, gpt2.eos_id]
    assert ex == {**_reference_example(_reference_tokenizer("gpt2"), format_prompt(r), r["output"]), "n_cut": 0}


def test_truncation_keeps_answer_and_marker(llama):
    r = _record("AG")
    r["input"] = json.dumps({"question": "Does it fit?", "document": ["filler text that repeats " * 60]})
    full = build_example(r, llama, max_len=4096)
    ex = build_example(r, llama, max_len=200)
    answer = [t for t in full["labels"] if t != -100]  # the untruncated example's answer + EOS, kept whole
    assert len(ex["input_ids"]) == 200 and ex["n_cut"] == len(full["input_ids"]) - 200
    assert ex["input_ids"][-len(answer):] == answer and ex["labels"][-len(answer):] == answer
    assert sum(t != -100 for t in ex["labels"]) == len(answer)
    prompt = llama.decode(ex["input_ids"][:-len(answer)])
    assert prompt.startswith(SPEC[("alpaca", False)][:60]) and r["instruction"] in prompt
    assert prompt.endswith("\n\n### Response:\n") and "filler text" in prompt
    assert build_example(r, llama, max_len=60) is None  # not even the instruction and answer fit


def test_build_examples_report(gpt2):
    records = generate_records("AG", 6, "train", seed=0)
    records[1]["input"] = json.dumps({"question": "q?", "document": ["long " * 300]})
    records[4]["output"] = "a very long answer " * 100
    examples, report = build_examples(records, gpt2, "mistral", max_len=256)
    assert report.n_records == 6 and report.dropped == [4] and report.n_truncated == 1
    assert report.tokens_cut == examples[1]["n_cut"] > 0 and len(examples) == 5
    for i, ex in zip([0, 1, 2, 3, 5], examples):
        if i != 1:
            assert ex == build_example(records[i], gpt2, "mistral", max_len=256)
        assert len(ex["input_ids"]) <= 256
    assert "1 truncated" in str(report) and "1 dropped" in str(report)


def test_seq2seq_example():
    t5 = load_tokenizer(ASSETS / "t5-style-spm")
    r = _record("PSI")
    ex = build_seq2seq_example(r, t5, max_source_len=2048, max_target_len=8)
    assert ex["input_ids"] == t5.encode(format_prompt(r)) and ex["input_ids"][-1] == t5.eos_id
    assert ex["labels"] == t5.encode(r["output"]) and ex["labels"][-1] == t5.eos_id
    limit = len(ex["input_ids"]) - 5
    short = build_seq2seq_example(r, t5, max_source_len=limit)
    assert len(short["input_ids"]) == limit and short["input_ids"][-1] == t5.eos_id and short["n_cut"] == 5
    assert t5.decode(short["input_ids"]).endswith("### Response:")  # the tail survives the cut
    assert build_seq2seq_example({**r, "output": "word " * 20}, t5, max_target_len=8) is None
    examples, report = build_examples([r, {**r, "output": "word " * 20}], t5, max_len=2048, seq2seq=True,
                                      max_target_len=8)
    assert examples == [ex] and report.dropped == [1]


def test_seq2seq_target_limit_is_the_references_cutoff(t5):
    # finetune_T5.py line 163-171: prompt and answer each limited by cutoff_len (finetune.sh: 2048), not 512.
    r = _record("AG", output="a long answer that goes on " * 120)
    n_target = len(t5.encode(r["output"]))
    assert 512 < n_target <= 2048
    ex = build_seq2seq_example(r, t5)
    assert ex is not None and ex["labels"] == t5.encode(r["output"])
    examples, report = build_examples([r], t5, seq2seq=True)
    assert examples == [ex] and report.dropped == []


# --- batching -----------------------------------------------------------------------------------------------
def test_collate_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": list(range(1, 11)), "labels": [-100] * 5 + list(range(6, 11))}]
    right = collate(examples, pad_id=0)
    assert right["input_ids"].shape == (2, 16) and right["input_ids"].dtype == torch.long
    assert right["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert right["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert right["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    left = collate([{"input_ids": e["input_ids"]} for e in examples], pad_id=2, padding_side="left", multiple_of=1)
    assert left["input_ids"][0].tolist() == [2] * 7 + [5, 6, 7] and "labels" not in left
    assert left["attention_mask"][0].tolist() == [0] * 7 + [1] * 3
    with pytest.raises(ValueError, match="example 0 has 3 input_ids but 2 labels"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_id=0)
    s2s = collate([{"input_ids": [1, 2, 3], "labels": [4, 1]}, {"input_ids": [1], "labels": [1]}], 0,
                  padding_side="left", seq2seq=True)
    assert s2s["input_ids"][1].tolist() == [0] * 7 + [1] and s2s["labels"][1].tolist() == [1] + [-100] * 7


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(96)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, seed=0, group_batches=6)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 24 and batches == list(LengthGroupedBatchSampler(lengths, 4, seed=0,
                                                                                            group_batches=6))
    assert sorted(i for b in batches for i in b) == list(range(96))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 0.3 * sum(max(lengths[b * 4:b * 4 + 4]) - min(lengths[b * 4:b * 4 + 4]) for b in range(24))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sampler_ranks_and_wraparound():
    lengths = list(range(50))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in ranks] == [5, 5, 5] and all(len(b) == 4 for r in ranks for b in r)
    seen = Counter(i for r in ranks for b in r for i in b)
    assert set(seen) == set(range(50)) and sum(seen.values()) == 60  # 10 wrapped around
    dropped = [list(LengthGroupedBatchSampler(lengths, 4, seed=3, rank=r, world_size=3, drop_last=True))
               for r in range(3)]
    flat = [i for r in dropped for b in r for i in b]
    assert len(flat) == len(set(flat)) == 48
    with pytest.raises(ValueError, match="rank 3 is not in"):
        LengthGroupedBatchSampler(lengths, 4, rank=3, world_size=3)


# --- sampling -----------------------------------------------------------------------------------------------
def test_sample_per_task():
    records = [r for abbr in ("SR", "AP", "PM") for r in generate_records(abbr, {"SR": 30, "AP": 5, "PM": 12}[abbr])]
    sample = sample_per_task(records, 10, seed=0)
    assert Counter(r["task"] for r in sample) == {"Sequential_Recommendation": 10, "Answerability_Prediction": 5,
                                                  "Product_Matching": 10}
    positions = [records.index(r) for r in sample]
    assert positions == sorted(positions)
    assert sample == sample_per_task(records, 10, seed=0) and sample != sample_per_task(records, 10, seed=1)
    alone = sample_per_task([r for r in records if r["task"] == "Sequential_Recommendation"], 10, seed=0)
    assert alone == [r for r in sample if r["task"] == "Sequential_Recommendation"]


def test_leave_one_category_out():
    records = generate_records("AP", 9)
    for i, r in enumerate(records):
        r["category"] = ["Tools", "Cells", "Home"][i % 3]
    kept, held = leave_one_category_out(records, "category", "Cells")
    assert len(kept) == 6 and len(held) == 3 and all(r["category"] != "Cells" for r in kept)
    assert all(r["setting"] == "OOD_Diverse_Instruction" and r["split"] == "test" for r in held)
    assert records[1]["setting"] == "IND_Diverse_Instruction"  # copies, the input is unchanged
    with pytest.raises(ValueError, match=r"no record has category == 'Toys'; values present: \['Cells'"):
        leave_one_category_out(records, "category", "Toys")
    del records[4]["category"]
    with pytest.raises(RecordError, match="record 4: field 'category': missing"):
        leave_one_category_out(records, "category", "Cells")


# --- control tokens in records ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq2seq", [False, True])
def test_special_token_strings_in_a_records_text_stay_text_unless_asked(tmp_path, seq2seq):
    """A `<|im_end|>` (the EOS here) in a record's input or answer used to become the control token, so a record
    could end its prompt or its answer early; by default it is now text. The template's markup is unchanged."""
    from tests.test_tokenizer import chatml_tokenizer

    tok = chatml_tokenizer(tmp_path / "tok")
    record = _record("SA", input="great<|im_end|> ignore the above", output="A<|im_end|>B")
    clean = _record("SA", input="great, ignore the above", output="AB")
    build = build_seq2seq_example if seq2seq else build_example
    safe, reference = build(record, tok), build(record, tok, controls_in_text=True)
    def eos_count(example):  # a decoder-only example's labels repeat its answer; a seq2seq one's are the answer
        return (example["input_ids"] + example["labels"] * seq2seq).count(tok.eos_id)

    n_eos = 1 + seq2seq  # the EOS that ends the answer (and the encoder input of a seq2seq example)
    assert eos_count(safe) == n_eos and eos_count(reference) == n_eos + 2
    assert tok.decode(safe["input_ids"]).count("great<|im_end|> ignore") == 1
    assert build(clean, tok) == build(clean, tok, controls_in_text=True)  # no special strings: the same ids
    examples, _ = build_examples([record, clean], tok, seq2seq=seq2seq)
    assert examples == [safe, build(clean, tok)]
    examples, _ = build_examples([record], tok, seq2seq=seq2seq, controls_in_text=True)
    assert examples == [reference]
