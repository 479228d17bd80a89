"""Builders that never lose or invent data (issue 34, items 7-9): one build per output folder, nothing removed that
the build did not create, truncated or garbled raw files and values of the wrong type refused in one line naming
file, row and column; the command's usage errors exit 2."""

import json
import shutil
import threading

import pytest

from ecellm import sources
from ecellm.cli import run
from ecellm.sources import SourceError, build, build_report, subjqa
from ecellm.sources.amazon_google import AMAZON, GOOGLE, MAPPING
from ecellm.sources.clothing_reviews import PARQUET

from .test_sources import SUBJQA_ROWS, realdata, write_reviews, write_subjqa


# --- one build per folder; nothing of anyone else's removed -----------------------------------------------------
def test_a_second_build_into_the_same_out_is_refused_and_the_first_completes(tmp_path, monkeypatch, capsys):
    raw, out = write_subjqa(tmp_path / "raw", SUBJQA_ROWS), tmp_path / "out"
    real_build, building, release = subjqa.build, threading.Event(), threading.Event()

    def slow_build(folder):  # the first build stays inside its build step until the second one has tried
        building.set()
        release.wait(30)
        return real_build(folder)

    monkeypatch.setattr(subjqa, "build", slow_build)
    first = threading.Thread(target=run, args=(["data", "build", "subjqa", "--raw", str(raw), "--out", str(out)],))
    first.start()
    assert building.wait(30)
    monkeypatch.setattr(subjqa, "build", real_build)
    with pytest.raises(SystemExit) as second:
        run(["data", "build", "subjqa", "--raw", str(raw), "--out", str(out)])
    release.set()
    first.join(30)
    assert second.value.code == 1
    assert "is in use by another data build" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json", "validation.json"]
    assert len(json.loads((out / "train.json").read_text())) == 3


def test_a_file_that_appears_during_a_build_is_never_written_over(tmp_path, monkeypatch):
    raw, out = write_subjqa(tmp_path / "raw", SUBJQA_ROWS), tmp_path / "out"
    real_build = subjqa.build

    def build_while_someone_writes(folder):
        (out / "train.json").write_text("mine")
        (out / "notes.txt").write_text("mine too")
        return real_build(folder)

    monkeypatch.setattr(subjqa, "build", build_while_someone_writes)
    with pytest.raises(SourceError, match=r"out/train\.json: appeared while this build ran"):
        sources.write("subjqa", raw, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.json"]
    assert (out / "train.json").read_text() == "mine"


def test_a_failed_build_removes_only_the_folder_it_created(tmp_path):
    with pytest.raises(SourceError):
        sources.write("subjqa", tmp_path / "missing", tmp_path / "new" / "out")
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "users").mkdir()
    with pytest.raises(SourceError):
        sources.write("subjqa", tmp_path / "missing", tmp_path / "users")
    assert (tmp_path / "users").is_dir()


# --- truncated and garbled files ----------------------------------------------------------------------------------
def tiny_pm(folder, n=12):
    """n Amazon and n Google products, product i matching product i."""
    folder.mkdir(parents=True, exist_ok=True)
    products = [f'{i},"Acme widget {i}","A widget, model {i}.",acme,{i}.99' for i in range(n)]
    (folder / AMAZON).write_text("id,title,description,manufacturer,price\n" + "\n".join(products) + "\n")
    (folder / GOOGLE).write_text("id,name,description,manufacturer,price\n"
                                 + "\n".join("g" + p for p in products) + "\n")
    (folder / MAPPING).write_text("idAmazon,idGoogleBase\n" + "\n".join(f"{i},g{i}" for i in range(n)) + "\n")
    return folder


def test_csv_cut_inside_a_row_or_with_a_wrong_field_count_is_refused(tmp_path):
    folder = write_subjqa(tmp_path / "cut", SUBJQA_ROWS)
    path = folder / "electronics/dev.csv"
    path.write_text(path.read_text()[:-40])  # the last row cut after its question
    with pytest.raises(SourceError, match=r"electronics/dev\.csv row 3: 2 fields where the header has 3"):
        build("subjqa", folder)
    folder = tiny_pm(tmp_path / "pm")
    text = (folder / AMAZON).read_text()
    (folder / AMAZON).write_text(text[:text.rindex(",acme")])  # Amazon.csv cut mid-row
    with pytest.raises(SourceError, match=r"Amazon\.csv row 12: 3 fields where the header has 5"):
        build("amazon-google", folder)


def test_an_unterminated_quote_or_a_huge_field_is_refused(tmp_path):
    folder = tiny_pm(tmp_path / "pm")
    lines = (folder / MAPPING).read_text().splitlines()
    lines[3] = '"' + lines[3]  # the quote swallows the rows after it: a pair would silently go
    (folder / MAPPING).write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"perfectMapping\.csv line \d+: not readable as CSV \(unexpected end of "
                                          r"data; a quote left open\?\)"):
        build("amazon-google", folder)
    folder = write_subjqa(tmp_path / "huge", [("Is it loud?", "loud " * 30_000, "loud")])
    with pytest.raises(SourceError, match=r"electronics/train\.csv line 2: not readable as CSV \(field larger than"):
        build("subjqa", folder)


# --- values of the wrong type, encodings, empty results ---------------------------------------------------------
def test_oa_mine_values_of_the_wrong_type_are_named(tmp_path):
    folder = tmp_path / "ave"
    folder.mkdir()
    good = {"input": "Acme green tea 20 bags", "category": "tea", "target_scores": {"Tea variety": {"green": 1}}}
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n")
    for bad, message in (({**good, "target_scores": ["green"]}, r"'target_scores' is \['green'\], expected a dict "
                                                                  r"of dicts"),
                         ({**good, "target_scores": {"Tea variety": "green"}}, ".* expected a dict of dicts"),
                         ({**good, "input": None}, r"'input' is None, expected non-empty text")):
        (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(SourceError, match=r"train\.jsonl line 2: " + message):
            build("oa-mine", folder)


def test_reviews_of_the_wrong_type_are_named_and_ratings_as_text_read_as_numbers(tmp_path):
    text = "one two three four five six seven eight nine ten"
    reviews = {"Review Text": [text] * 40, "Rating": [5, 4, 3, 2, 1] * 8,
               "Department Name": ["Tops"] * 30 + ["Bottoms"] * 10}
    as_numbers = build("clothing-reviews", write_reviews(tmp_path / "ints" / PARQUET, reviews))
    as_text = build("clothing-reviews", write_reviews(tmp_path / "text" / PARQUET,
                                                      {**reviews, "Rating": [str(r) for r in reviews["Rating"]]}))
    assert as_text == as_numbers
    folder = write_reviews(tmp_path / "words" / PARQUET, {**reviews, "Rating": ["five"] * 40})
    with pytest.raises(SourceError, match=r"parquet\.brotli row 1: 'Rating' is 'five', expected a number 1-5"):
        build("clothing-reviews", folder)
    folder = write_reviews(tmp_path / "int-text" / PARQUET, {**reviews, "Review Text": list(range(40))})
    with pytest.raises(SourceError, match=r"parquet\.brotli row 1: 'Review Text' is 0, expected text"):
        build("clothing-reviews", folder)


def test_a_byte_order_mark_is_read(tmp_path):
    plain = build("subjqa", write_subjqa(tmp_path / "plain", SUBJQA_ROWS))
    assert build("subjqa", write_subjqa(tmp_path / "bom", SUBJQA_ROWS, "utf-8-sig")) == plain


def test_utf8_amazon_google_files_give_the_same_records(tmp_path):
    original = realdata("amazon-google")
    copy = tmp_path / "utf8"
    copy.mkdir()
    for name in (AMAZON, GOOGLE, MAPPING):
        (copy / name).write_text((original / name).read_text(encoding="latin-1"), encoding="utf-8")
    assert (copy / AMAZON).read_bytes() != (original / AMAZON).read_bytes()
    assert build("amazon-google", copy) == build("amazon-google", original)


def test_a_split_that_comes_out_empty_is_named(tmp_path):
    rows = [(q, r, "ANSWERNOTFOUND") for q, r, _ in SUBJQA_ROWS]  # nothing answerable: AG has no records
    folder = write_subjqa(tmp_path / "raw", rows)
    with pytest.raises(SourceError, match=r"raw: AG's train split comes out empty \(0 examples in all\)"):
        build("subjqa", folder)
    shutil.rmtree(folder / "grocery")
    with pytest.raises(SourceError, match=r"grocery/test\.csv: no such file"):
        build_report("subjqa", folder)


# --- the command's usage -----------------------------------------------------------------------------------------
def test_data_usage_errors_exit_2_and_help_works(capsys):
    for argv in (["data", "build", "nosuch"], ["data"], ["data", "build"], ["data", "convert"]):
        with pytest.raises(SystemExit) as usage:
            run(argv)
        assert usage.value.code == 2, argv
        assert capsys.readouterr().err.startswith("usage: ecellm data build {amazon-google,amazon-sequences,")
    assert run(["data", "build", "--help"]) == []
    assert "  amazon-sequences   Office_Products.valid.csv" in capsys.readouterr().out
    with pytest.raises(SystemExit) as shown:
        run(["data", "build", "subjqa", "--help"])
    assert shown.value.code == 0 and "--negatives {random,hard}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        run(["data", "build", "subjqa", "--negatives", "hard", "--out", "x"])
    assert usage.value.code == 2 and "--negatives applies to amazon-google only" in capsys.readouterr().err


# --- PM's hard negatives (issue 31 part 4) --------------------------------------------------------------------------
def test_pm_hard_negatives_are_the_closest_non_matching_titles(tmp_path):
    folder = tiny_pm(tmp_path / "pm", n=20)  # "Acme widget i" matches "Acme widget i"; i's closest other shares "i"
    built = build_report("amazon-google", folder, negatives="hard")
    random_negatives = build("amazon-google", folder)
    def pairs(records):
        return [(r["setting"], r["input"], r["output"]) for r in records]

    assert pairs(built.splits["test"]) == pairs(random_negatives["test"])  # the ECInstruct-style test's pairs stay
    for name in ("train", "validation", "test_hard"):
        read = [(json.loads(r["input"]), r["output"]) for r in built.splits[name]
                if r["setting"] == "IND_Diverse_Instruction"]
        hard = [(p["product 1"]["title"], p["product 2"]["title"]) for p, out in read if out == "no"
                and p["product 1"]["title"].split()[-1] != p["product 2"]["title"].split()[-1]]
        assert all(a != g and a.rsplit(" ", 1)[0] == g.rsplit(" ", 1)[0] for a, g in hard)
    test_hard = [r["output"] for r in built.splits["test_hard"] if r["setting"] == "IND_Diverse_Instruction"]
    assert test_hard.count("yes") == test_hard.count("no") > 0
    train_inputs = {r["input"] for r in built.splits["train"] + built.splits["validation"]}
    assert not train_inputs & {r["input"] for r in built.splits["test_hard"]}


def test_pm_hard_negatives_on_the_real_files(pm_hard):
    assert [len(pm_hard.splits[s]) for s in ("train", "validation")] == [3029, 381]
    tests = [r for r in pm_hard.splits["test_hard"] if r["setting"] == "IND_Diverse_Instruction"]
    assert len(tests) == 219 and sum(r["output"] == "no" for r in tests) >= 90
    assert pm_hard.skipped["matched product without a look-alike"] == 21
    learned = {r["input"] for r in pm_hard.splits["train"] + pm_hard.splits["validation"]}
    assert not learned & {r["input"] for r in tests}


@pytest.fixture(scope="module")
def pm_hard():
    return build_report("amazon-google", realdata("amazon-google"), negatives="hard")
