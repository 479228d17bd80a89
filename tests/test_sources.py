"""ecellm.sources: raw public sources -> ECInstruct records.

The real-data tests read `../shared/realdata` beside the clone (never copied into the repository); without it they
skip, unless ECELLM_REQUIRE_REALDATA=1 (CI), where its absence fails. pandas and scikit-learn are test-only oracles:
PM is rebuilt here exactly as `data_processing/PM.ipynb` builds it and must equal ecellm's records.
"""

import json
import os
import random
from pathlib import Path

import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from ecellm.data import SETTINGS, load_records
from ecellm.sources import build_report, write
from ecellm.sources.amazon_google import pandas_column
from ecellm.sources.common import permutation, split_80_10_10, split_off

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
FIELDS = ["task", "setting", "split", "instruction", "input", "options", "output", "few_shot_example"]


def realdata(name: str) -> Path:
    """The folder `../shared/realdata/<name>`, or skip (fail under ECELLM_REQUIRE_REALDATA=1) when it is absent."""
    path = REALDATA / name
    if not path.is_dir():
        message = f"{path} is absent (the real data lives in shared/realdata beside the clone)"
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
