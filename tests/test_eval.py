"""ecellm.eval: prompts of every setting, references, and the entry point end to end on a tiny random model."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import ecellm.eval as ev
from ecellm.data import TASK_BY_NAME, TASKS, format_prompt, load_records
from ecellm.eval import (
    build_prompt,
    derive_setting,
    load_qpr_labels,
    main,
    markdown_table,
    one_shot_instruction,
    references,
)
from ecellm.lora import inject, save_adapter
from ecellm.models import encoders, from_config
from ecellm.synthetic import write_dataset

LLAMA_SPM = Path(__file__).parent / "assets" / "tokenizers" / "llama2-spm" / "tokenizer.model"
TINY = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


class StandInMiniLM:
    """all-MiniLM-L6-v2's stand-in (no download in fast tests): one fixed random vector per lower-cased word."""

    name = "stand-in-minilm/L6"
    special_ids = frozenset()

    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        vectors = []
        for text in texts:
            words = text.lower().split() or [""]
            seeds = [zlib.crc32(w.encode()) for w in words]
            vectors.append(torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds]))
        return vectors


@pytest.fixture(autouse=True)
def stand_in_minilm(monkeypatch):
    """Every evaluation here scores AG with `StandInMiniLM` where it would fetch the real encoder; returns the
    (device, batch_size) of each call."""
    calls = []

    def minilm_encoder(layer=6, device="cpu", batch_size=64):
        calls.append((str(device), batch_size))
        return StandInMiniLM()

    monkeypatch.setattr(encoders, "minilm_encoder", minilm_encoder)
    return calls


# a tokenizer stand-in for batching by length: one token per character
CHARACTERS = SimpleNamespace(encode=list, encode_parts_batch=lambda batch: [list("".join(p)) for p in batch])


def record(task="Product_Matching", setting="IND_Diverse_Instruction", **kw):
    return {"instruction": "Say yes or no.", "input": "{\"a\": 1}", "options": None, "output": "yes",
            "task": task, "setting": setting, "split": "test", "few_shot_example": None, **kw}


# --- prompts and settings ---------------------------------------------------------------------------------------
def test_one_shot_prompt_places_the_demonstration_after_the_instruction():
    demo = json.dumps({"input": "{\"a\": 2}", "options": "[\"A: x\", \"B: y\"]", "output": "B"})
    rec = record(setting="IND_Diverse_Instruction_1-shot", few_shot_example=demo)
    assert one_shot_instruction(rec) == ("Say yes or no.\n\n### Example Input:\n{\"a\": 2}\n\n### Example Options:\n"
                                         "[\"A: x\", \"B: y\"]\n\n### Example Response:\nB")
    prompt = build_prompt(rec, "alpaca")
    assert prompt == format_prompt({**rec, "instruction": one_shot_instruction(rec)}, "alpaca")
    assert prompt.count("### Response:") == 1 and prompt.endswith("### Response:\n")
    verbatim = record(setting="OOD_Diverse_Instruction_1-shot", few_shot_example="Q: a? A: b")
    assert one_shot_instruction(verbatim) == "Say yes or no.\n\n### Example:\nQ: a? A: b"
    assert build_prompt(record(), "mistral") == format_prompt(record(), "mistral")  # other settings: unchanged
    with pytest.raises(ValueError, match="no few_shot_example"):
        build_prompt(record(setting="IND_Diverse_Instruction_1-shot"), "alpaca")


def test_derive_single_unseen_and_one_shot_settings():
    pm = TASK_BY_NAME["Product_Matching"]
    base = [record(input="t0"), record(input="t1"), record(task="Answer_Generation", input="g0", output="ans"),
            record(setting="OOD_Diverse_Instruction", task="Answer_Generation", input="o0")]
    single = derive_setting(base, "IND_Single_Instruction")
    assert [r["instruction"] for r in single] == [pm.seed_instruction] * 2 + [
        TASK_BY_NAME["Answer_Generation"].seed_instruction]
    assert {r["setting"] for r in single} == {"IND_Single_Instruction"}
    unseen = derive_setting(base, "OOD_Unseen_Instruction")
    assert [(r["input"], r["instruction"]) for r in unseen] == [("o0", TASK_BY_NAME["Answer_Generation"]
                                                                  .unseen_instruction)]
    train = [record(split="train", input=f"train{i}", output="no") for i in range(3)]
    train += [record(task="Answer_Generation", split="train", input="gtrain0", output="a0")]
    train += [record(split="val", input="val0")]  # not a training record: never a demonstration
    shot = derive_setting(base, "IND_Diverse_Instruction_1-shot", train)
    assert [json.loads(r["few_shot_example"]) for r in shot] == [
        {"input": "train0", "output": "no"}, {"input": "train1", "output": "no"}, {"input": "gtrain0", "output": "a0"}]
    assert [r["instruction"] for r in shot] == ["Say yes or no."] * 3
    ood_shot = derive_setting(base, "OOD_Diverse_Instruction_1-shot", train)  # OOD takes IND training records
    assert json.loads(ood_shot[0]["few_shot_example"]) == {"input": "gtrain0", "output": "a0"}
    with pytest.raises(ValueError, match="test record 1 needs training record 1 .* hold 1"):
        derive_setting(base + [record(task="Answer_Generation", input="g1")] * 2, "IND_Diverse_Instruction_1-shot",
                       train)
    with pytest.raises(ValueError, match="no OOD_Diverse_Instruction records"):
        derive_setting(base[:3], "OOD_Single_Instruction")


def test_references_for_qpr():
    recs = [record(task="Query_Product_Rank", output="B,A"), record(task="QPR", output="A,B", esci_labels=["E", "I"])]
    assert references("QPR", recs, [["S", "E"], ["E", "S"]]) == [
        {"ranking": "B,A", "labels": ["S", "E"]}, {"ranking": "A,B", "labels": ["E", "I"]}]
    with pytest.raises(ValueError, match="QPR record 0 .* --qpr-labels"):
        references("QPR", recs)
    assert references("PM", [record()]) == ["yes"]


def test_load_qpr_labels(tmp_path):
    (tmp_path / "label.json").write_text('[["E", "S"], ["C", "S", "E"]]')
    assert load_qpr_labels(tmp_path / "label.json") == [["E", "S"], ["C", "S", "E"]]
    (tmp_path / "bad.json").write_text('[["E", "X"]]')
    with pytest.raises(ValueError, match=r"bad.json: entry 0 is \['E', 'X'\]"):
        load_qpr_labels(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="empty.json: not valid JSON"):
        load_qpr_labels(tmp_path / "empty.json")


def test_markdown_table():
    rows = [{"task": "SR", "setting": "IND_Diverse_Instruction", "metric": "hr@1", "hr@1": 0.25, "n": 4,
             "n_failed": 1},
            {"task": "QPR", "setting": "IND_Diverse_Instruction", "metric": "ndcg", "ndcg": 0.5,
             "n_invalid_items": 3, "n": 2, "n_failed": 0}]
    assert markdown_table(rows) == (
        "| task | setting | metric | value | secondary | n | n_failed |\n|---|---|---|---|---|---|---|\n"
        "| SR | IND_Diverse_Instruction | hr@1 | 0.250 |  | 4 | 1 |\n"
        "| QPR | IND_Diverse_Instruction | ndcg | 0.500 | n_invalid_items 3 | 2 | 0 |\n")


# --- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama checkpoint with the Llama-2 sentencepiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = from_config(TINY, device="cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(TINY))
    shutil.copy(LLAMA_SPM, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic ECInstruct files (2 test records per task) and QPR option labels consistent with the gold order."""
    path = tmp_path_factory.mktemp("data")
    write_dataset(path, n_per_task=3, n_eval_per_task=2, seed=0)
    qpr = load_records(path / "test.json", tasks="QPR")
    labels = [["ESCI"[r["output"].split(",").index(letter)] for letter in sorted(r["output"].split(","))]
              for r in qpr]
    (path / "label.json").write_text(json.dumps(labels))
    return path


def test_entry_point_end_to_end(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    settings = ["IND_Diverse_Instruction", "IND_Unseen_Instruction", "IND_Diverse_Instruction_1-shot"]
    evaluation = main(["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--setting", *settings,
                       "--demos", str(data_dir / "train.json"), "--qpr-labels", str(data_dir / "label.json"),
                       "--out", str(out), "--max-new-tokens", "6", "--batch-size", "16"])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["n_records"] == 60 and results["config"]["template"] == "alpaca"
    rows = results["results"]
    assert {(r["task"], r["setting"]) for r in rows} == {(t.abbr, s) for t in TASKS for s in settings}
    assert rows == evaluation["results"]
    for r in rows:
        assert r["n"] == 2 and 0 <= r["n_failed"] <= 2 and 0.0 <= r[r["metric"]] <= 1.0
    table = (out / "results.md").read_text()
    assert len(table.splitlines()) == 2 + 30 and "| AG | IND_Unseen_Instruction | f_bert |" in table
    assert table in capsys.readouterr().out
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 60
    unseen = [g for g in gens if g["setting"] == "IND_Unseen_Instruction"]
    assert all(TASK_BY_NAME[g["task"]].unseen_instruction in g["prompt"] for g in unseen)
    assert all("### Example Input:" in g["prompt"] for g in gens if g["setting"].endswith("1-shot"))
    assert all(g["prediction"] == g["generation"].split("### Response:")[0].strip() for g in gens)


@pytest.mark.parametrize("choice", ["minilm", "model", "checkpoint"])
def test_ag_is_scored_by_the_encoder_bertscore_model_names(tiny_dir, data_dir, tmp_path, stand_in_minilm, choice):
    """--bertscore-model: MiniLM by default (fetched only when AG is evaluated), the evaluated model's own states
    with "model", another checkpoint's by its folder; results.json names the encoder."""
    flags = [] if choice == "minilm" else ["--bertscore-model", str(tiny_dir) if choice == "checkpoint" else "model"]
    main(["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--tasks", "AG", "PM",
          "--out", str(tmp_path / "out"), "--max-new-tokens", "3", *flags])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    name = {"minilm": "stand-in-minilm/L6", "model": "evaluated-model", "checkpoint": str(tiny_dir)}[choice]
    assert results["config"]["bertscore_encoder"] == name
    [ag] = [r for r in results["results"] if r["task"] == "AG"]
    assert ag["encoder"] == name and -1.0 <= ag["f_bert"] <= 1.0
    assert stand_in_minilm == ([("cpu", 8)] if choice == "minilm" else [])
    main(["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--tasks", "PM",
          "--out", str(tmp_path / "pm"), "--max-new-tokens", "3", *flags])
    assert json.loads((tmp_path / "pm" / "results.json").read_text())["config"]["bertscore_encoder"] is None
    assert len(stand_in_minilm) <= 1  # no AG: no encoder fetched


def test_control_token_strings_in_a_record_stay_text_in_eval_prompts(tmp_path, monkeypatch):
    """As in training (`ecellm.data`): the template's markup may hold control tokens, a record's text never does. A
    review quoting `</s>` gets no EOS id inside its prompt; a record without such strings encodes as its prompt."""
    from ecellm.models import load_pretrained

    from .tiny_checkpoint import make_tiny_checkpoint

    model, tokenizer = load_pretrained(make_tiny_checkpoint(tmp_path / "model", tasks=["PM"]))  # `</s>`: EOS
    quoting, plain = record(input="great </s> cable"), record(input="great cable")
    seen = []
    monkeypatch.setattr(ev, "generate_text", lambda m, t, prompts, prompt_ids, **kw: seen.extend(prompt_ids) or [""]
                        * len(prompts))
    ev.evaluate(model, tokenizer, [quoting, plain], batch_size=1, max_new_tokens=2, progress=False)
    ids = dict(zip(["plain", "quoting"], seen))  # shorter prompt first
    assert tokenizer.eos_id in tokenizer.encode(build_prompt(quoting, "alpaca"))  # the whole string: an EOS inside
    assert tokenizer.eos_id not in ids["quoting"]
    assert ids["plain"] == tokenizer.encode(build_prompt(plain, "alpaca"))


def test_entry_point_with_adapter_and_sampling(tiny_dir, data_dir, tmp_path):
    args = ["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--tasks", "PM", "AG",
            "--max-new-tokens", "5"]
    base = main(args + ["--out", str(tmp_path / "base")])
    model = from_config(TINY, device="cpu")
    inject(model, r=2, alpha=4, targets=["q_proj", "v_proj", "lm_head"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1.0)
    save_adapter(model, tmp_path / "adapter")
    tuned = main(args + ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "tuned")])
    assert [g["generation"] for g in tuned["generations"]] != [g["generation"] for g in base["generations"]]
    decoding = {name: json.loads((tmp_path / name / "results.json").read_text())["config"]
                for name in ("base", "tuned")}
    assert (decoding["base"]["temperature"], decoding["base"]["top_p"]) == (0.0, 1.0)  # no adapter: greedy
    assert (decoding["tuned"]["temperature"], decoding["tuned"]["top_p"], decoding["tuned"]["seed"]) == (
        0.15, 0.95, 0)  # an adapter run samples as inference.py, seeded
    main(args + ["--adapter", str(tmp_path / "adapter"), "--greedy", "--out", str(tmp_path / "greedy")])
    assert json.loads((tmp_path / "greedy" / "results.json").read_text())["config"]["temperature"] == 0.0
    with pytest.raises(SystemExit):
        main(args + ["--greedy", "--sample", "--out", str(tmp_path / "both")])
    sampled = main(args + ["--sample", "--seed", "3", "--out", str(tmp_path / "sampled")])
    config = json.loads((tmp_path / "sampled" / "results.json").read_text())["config"]
    assert (config["temperature"], config["top_p"]) == (0.15, 0.95)
    again = main(args + ["--sample", "--seed", "3", "--out", str(tmp_path / "again")])
    assert [g["generation"] for g in again["generations"]] == [g["generation"] for g in sampled["generations"]]


def test_gold_answers_score_perfectly(tiny_dir, data_dir, monkeypatch):
    """With generation replaced by the gold answers, every task's primary metric is 1 and nothing fails."""
    from ecellm.models import from_pretrained
    from ecellm.tokenizer import load_tokenizer

    records = load_records(data_dir / "test.json", split="test")
    gold = {build_prompt(r, "alpaca"): r["output"] for r in records}
    monkeypatch.setattr(ev, "generate_text", lambda model, tok, prompts, **kw: [gold[p] for p in prompts])
    labels = json.loads((data_dir / "label.json").read_text())
    result = ev.evaluate(from_pretrained(tiny_dir), load_tokenizer(tiny_dir), records, qpr_labels=labels,
                         progress=False)
    assert len(result["results"]) == 10
    for r in result["results"]:
        assert r[r["metric"]] == pytest.approx(1.0) and r["n_failed"] == 0, r


@pytest.mark.parametrize("paper_compat", [False, True])
def test_ave_of_a_t5_model_uses_evaluate_t5_parser(data_dir, monkeypatch, paper_compat):
    """Flan-T5 writes AVE lists without braces: parsed as evaluate_T5.py does for a T5 model, in both modes."""
    from types import SimpleNamespace

    records = load_records(data_dir / "test.json", split="test", tasks="AVE")
    two = [{"attribute": "color", "value": "red", "source": "title"}, {"attribute": "size", "value": "XL",
                                                                        "source": "description"}]
    records.append({**records[0], "input": "another product", "output": json.dumps(two)})
    brace_less = {build_prompt(r, "alpaca"): r["output"].replace("{", "").replace("}", "") for r in records}
    monkeypatch.setattr(ev, "generate_text", lambda model, tok, prompts, **kw: [brace_less[p] for p in prompts])
    results = {}
    for model_type in ("t5", "llama"):
        model = SimpleNamespace(config=SimpleNamespace(model_type=model_type), eval=lambda: None)
        [results[model_type]] = ev.evaluate(model, CHARACTERS, records, paper_compat=paper_compat,
                                            progress=False)["results"]
    assert results["t5"]["n_failed"] == 0 and results["t5"]["precision"] == 1.0
    n_gold = sum(len(json.loads(r["output"])) for r in records)
    assert n_gold > len(records)  # an output holds several items: paper_compat keeps the last of each only
    assert results["t5"]["recall"] == pytest.approx(len(records) / n_gold if paper_compat else 1.0)
    assert results["llama"]["n_failed"] == len(records) and results["llama"]["f1"] == 0.0


def test_predictions_follow_the_reference_per_family(monkeypatch):
    """Decoders: the text after the template's own marker in prompt + continuation; T5: the raw continuation."""
    from types import SimpleNamespace

    records = [record(instruction="Reply after '### Response:' with yes or no.")]
    monkeypatch.setattr(ev, "generate_text", lambda model, tok, prompts, **kw: [" no\n### Response: yes"])
    predictions = {}
    for model_type, template in (("mistral", "mistral"), ("llama", "alpaca"), ("t5", "alpaca")):
        model = SimpleNamespace(config=SimpleNamespace(model_type=model_type), eval=lambda: None)
        [gen] = ev.evaluate(model, CHARACTERS, records, template=template, progress=False)["generations"]
        predictions[model_type] = gen["prediction"]
    assert predictions == {"mistral": "no\n### Response: yes", "llama": "' with yes or no.\n\n### Input:\n{\"a\": 1}",
                           "t5": " no\n### Response: yes"}


# --- command-line errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "argument --limit: 0 is not a positive integer"),
    (["--limit", "-3"], "argument --limit: -3 is not a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["--tasks", "PM", "XX"], "argument --tasks: unknown task 'XX'; expected one of"),
])
def test_bad_command_line_values_are_argparse_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--data", str(tmp_path / "test.json"), "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"python -m ecellm.eval: error: {message}")


def test_select_records_refuses_a_limit_of_zero():
    with pytest.raises(ValueError, match="limit=0; expected a positive number"):
        ev.select_records([record()], None, limit=0)


def test_tokenizer_larger_than_the_model_embedding_is_refused(data_dir, tmp_path, capsys):
    config = TINY | {"vocab_size": 1000}
    save_file(from_config(config, device="cpu").state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(LLAMA_SPM, tmp_path / "tokenizer.model")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--data", str(data_dir / "test.json"), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    assert re.fullmatch(r"python -m ecellm.eval: error: the tokenizer .* has 32000 ids but the model .* embeds only "
                        r"1000 \(its config.json vocab_size\).*\n", capsys.readouterr().err)


# --- the output folder: written as it goes, resumable, one evaluation per folder --------------------------------
ROOT = Path(__file__).resolve().parent.parent


def results_of(out: Path) -> dict:
    """results.json without its timing."""
    results = json.loads((out / "results.json").read_text())
    del results["config"]["seconds"]
    return results


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stopped_evaluation_resumes_to_the_uninterrupted_results(tiny_dir, tmp_path, sig, capsys):
    """Each batch's generations are on disk as soon as they are made; an evaluation stopped halfway and resumed ends
    with the results.json and generations.jsonl of one that ran through (sampling included: each batch is seeded by
    its position). SIGTERM and SIGINT stop it cleanly within seconds (exit took 11 s on a loaded 2-core machine; the
    unit test below times the stop itself): exit 1, one line saying how far it got and that --resume continues, the
    lock released. A SIGKILLed run's lock is stale and is taken over, naming it."""
    write_dataset(tmp_path / "data", n_per_task=1, n_eval_per_task=20, seed=0, tasks=["PM", "SR"])
    args = ["--model", str(tiny_dir), "--data", str(tmp_path / "data" / "test.json"), "--batch-size", "2",
            "--max-new-tokens", "6", "--sample", "--seed", "3"]
    main(args + ["--out", str(tmp_path / "whole")])
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "ecellm.eval", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "generations.jsonl").is_file() and (out / "generations.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    signalled = time.time()
    _, stderr = proc.communicate(timeout=60)
    made = (out / "generations.jsonl").read_text().count("\n")
    assert 2 <= made < 40 and not (out / "results.json").exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -sig
    else:
        assert proc.returncode == 1 and time.time() - signalled < 30 and "Traceback" not in stderr
        assert stderr.splitlines()[-1] == (
            f"python -m ecellm.eval: error: stopped by {sig.name}: {made} of 40 generations are in "
            f"{out / 'generations.jsonl'}; run the same command with --resume to continue")
        assert not (out / "ecellm.lock").exists()
    with pytest.raises(SystemExit) as e:  # the folder holds an evaluation: not started over by accident
        main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "already holds an evaluation" in err
    stale = f"taking over the stale lock {out / 'ecellm.lock'} of pid {proc.pid} on host"
    assert (stale in err) == (sig == signal.SIGKILL)
    main(args + ["--out", str(out), "--resume"])
    assert f"--resume: {made} of 40 generations already in" in capsys.readouterr().err
    assert results_of(out) == results_of(tmp_path / "whole")
    assert (out / "generations.jsonl").read_text() == (tmp_path / "whole" / "generations.jsonl").read_text()
    assert not (out / "ecellm.lock").exists()


def test_a_stop_signal_ends_generation_between_two_decoding_steps():
    """Under `stop_on_signals` a SIGTERM raises at once, in the middle of a batch: not when the batch (or the whole
    evaluation) ends."""
    from ecellm.generate import generate

    class Decoder(torch.nn.Module):  # one decoding step per call; a signal arrives during the third
        config = SimpleNamespace(eos_token_id=None)
        steps = 0

        def start_decoding(self, input_ids, attention_mask, max_new_tokens):
            return None, torch.zeros(input_ids.shape[0], 8)

        def decode_step(self, state, tokens):
            Decoder.steps += 1
            if Decoder.steps == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return torch.zeros(tokens.shape[0], 8)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ev.EvaluationStopped, match="SIGTERM"), ev.stop_on_signals():
        generate(Decoder(), torch.ones(2, 4, dtype=torch.long), max_new_tokens=1000)
    assert Decoder.steps == 3 and signal.getsignal(signal.SIGTERM) is previous


def test_a_folder_holding_an_evaluation_needs_resume_or_overwrite(tiny_dir, data_dir, tmp_path, capsys):
    args = ["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--tasks", "PM", "--max-new-tokens", "3",
            "--out", str(tmp_path / "out")]
    first = main(args)
    with pytest.raises(SystemExit) as e:
        main(args + ["--seed", "5"])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ecellm.eval: error: {tmp_path / 'out'} already holds an evaluation (evaluation.json, "
        "generations.jsonl, results.json, results.md): pass --resume to continue it, --overwrite to delete it and "
        "start over, or choose another --out")
    with pytest.raises(SystemExit):  # a resume under other decoding settings would mix two evaluations
        main(args + ["--resume", "--max-new-tokens", "4"])
    assert "differing: max_new_tokens: 3 -> 4" in capsys.readouterr().err
    assert main(args + ["--resume"])["generations"] == first["generations"]  # all done: scored again
    main(args + ["--overwrite", "--max-new-tokens", "4"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["max_new_tokens"] == 4
    with pytest.raises(SystemExit):
        main(args[:-1] + [str(tmp_path / "typo"), "--resume"])
    assert "typo does not exist, so there is no evaluation to continue" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("task, bad", [("SR", "Z"), ("PM", "maybe")])
def test_an_invalid_reference_is_refused_before_generating(tiny_dir, tmp_path, monkeypatch, capsys, task, bad):
    write_dataset(tmp_path / "data", n_per_task=1, n_eval_per_task=3, seed=0, tasks=["PM", "SR"])
    test_file = tmp_path / "data" / "test.json"
    records = json.loads(test_file.read_text())
    index = [i for i, r in enumerate(records) if r["task"] == TASK_BY_NAME[ev.resolve_task(task)].name][2]
    records[index]["output"] = bad
    test_file.write_text(json.dumps(records))
    monkeypatch.setattr(ev, "generate_text", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--data", str(test_file), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith(
        f"python -m ecellm.eval: error: {test_file}: record {index}: the reference answer {bad!r} is not a valid "
        f"{task} answer")
    assert not (tmp_path / "out").exists()


def test_an_unusable_out_is_refused_before_loading(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "out"
    monkeypatch.setattr(ev, "_load_model", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--out", str(out)])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"python -m ecellm.eval: error: [Errno 20] Not a directory: '{out}'\n"


def test_a_torchrun_launch_of_the_command_is_refused_before_loading(tiny_dir, data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each of its processes
    monkeypatch.setattr(ev, "_load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--data", str(data_dir / "test.json"), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    assert "runs in one process, and this is one of 2 (torchrun's WORLD_SIZE)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- one evaluator: answer budgets per task, record order, the ranks of a torchrun launch -------------------------
def test_each_task_gets_its_answer_budget_in_batches_of_its_own(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, **kw):
        calls.append((max_new_tokens, {TASKS_BY_PROMPT[p] for p in prompts}))
        return ["yes"] * len(prompts)

    records = [record(input=str(i)) for i in range(3)] + [
        record(task="Sequential_Recommendation", output="A", options="['A: x', 'B: y']", input=f"s{i}")
        for i in range(3)] + [record(task="Answer_Generation", output="an answer", input="q")]
    TASKS_BY_PROMPT = {build_prompt(r, "alpaca"): r["task"] for r in records}
    monkeypatch.setattr(ev, "generate_text", fake_generate)
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama"), eval=lambda: None)
    encoder = lambda texts: [torch.ones(1, 4) for _ in texts]  # noqa: E731 (AG's BERTScore: not under test here)
    ev.evaluate(model, CHARACTERS, records, batch_size=2, max_new_tokens={"PM": 3, "Sequential_Recommendation": 5},
                encoder=encoder, progress=False)
    assert sorted((n, tuple(tasks)) for n, tasks in calls) == [
        (3, ("Product_Matching",)), (3, ("Product_Matching",)), (5, ("Sequential_Recommendation",)),
        (5, ("Sequential_Recommendation",)), (100, ("Answer_Generation",))]  # AG left out: the paper's 100
    assert ev.answer_budgets(["SR", "Answer_Generation"], 7) == {"Sequential_Recommendation": 7,
                                                                 "Answer_Generation": 7}


def test_answers_come_back_in_record_order_whatever_the_prompt_lengths(tmp_path):
    """Generating in order of prompt length (little padding) must hand back each record's own answer: the same as
    generating every prompt alone."""
    from ecellm.generate import generate_text
    from ecellm.models import from_pretrained
    from ecellm.synthetic import generate_records
    from ecellm.tokenizer import load_tokenizer

    from .tiny_checkpoint import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "model", tasks=["SR", "PM"])
    model, tokenizer = from_pretrained(model_dir), load_tokenizer(model_dir)
    records = generate_records("SR", 3, "test", seed=1) + generate_records("PM", 4, "test", seed=1)
    records = [records[i] for i in (3, 0, 6, 1, 4, 2, 5)]  # long and short prompts interleaved
    prompts = [build_prompt(r, "alpaca") for r in records]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    assert lengths != sorted(lengths) and len(set(lengths)) > 2
    evaluation = ev.evaluate(model, tokenizer, records, batch_size=3, max_new_tokens=6, progress=False)
    alone = [generate_text(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert [g["generation"] for g in evaluation["generations"]] == alone
    assert [g["prediction"] for g in evaluation["generations"]] == [
        ev.read_answer(p, a, "alpaca", "llama") for p, a in zip(prompts, alone)]


TORCHRUN_EVALUATION = """
import json, os, sys
import torch.distributed as dist
import ecellm.eval as ev
from ecellm.models import from_pretrained
from ecellm.tokenizer import load_tokenizer

model_dir, data, out = sys.argv[1:]
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
generated, seen = [], []
real_generate = ev.generate_text
def counting_generate(model, tokenizer, prompts, **kw):
    generated.extend(prompts)
    return real_generate(model, tokenizer, prompts, **kw)
ev.generate_text = counting_generate
evaluation = ev.evaluate(from_pretrained(model_dir), load_tokenizer(model_dir), json.load(open(data)), batch_size=2,
                         max_new_tokens={"PM": 3, "SR": 5}, progress=False,
                         on_batch=lambda batch: seen.extend(g["index"] for g in batch))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"generated": len(generated), "seen": seen, "evaluation": evaluation}, f)
if dist.is_initialized():
    dist.destroy_process_group()  # else gloo may abort the exit ("terminate called without an active exception")
"""


def test_torchrun_ranks_share_the_generation_and_agree_with_one_process(tmp_path):
    """`torchrun --nproc_per_node=2` (gloo): each rank generates about half the batches, every rank ends with every
    generation in record order, every batch reaches `on_batch` on every rank, and the evaluation equals one
    process's."""
    from ecellm.synthetic import generate_records

    from .tiny_checkpoint import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "model", tasks=["SR", "PM"])
    records = generate_records("SR", 5, "test", seed=2) + generate_records("PM", 6, "test", seed=2)
    (tmp_path / "test.json").write_text(json.dumps(records))
    (tmp_path / "evaluate.py").write_text(TORCHRUN_EVALUATION)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        (tmp_path / name).mkdir()
        proc = subprocess.run([sys.executable, *launcher, str(tmp_path / "evaluate.py"), str(model_dir),
                               str(tmp_path / "test.json"), str(tmp_path / name)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    [one] = [json.loads((tmp_path / "one" / "rank0.json").read_text())]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert one["generated"] == 11 and [r["generated"] for r in ranks] == [6, 5]  # 6 batches: 2, 2, 2 | 2, 2, 1
    assert one["seen"] == ranks[0]["seen"] == ranks[1]["seen"] and sorted(one["seen"]) == list(range(11))
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"] == one["evaluation"]
    assert [g["index"] for g in one["evaluation"]["generations"]] == list(range(11))
