"""ecellm.sources.amazon_sequences: SR records from real purchase histories (SR.ipynb's layout), on the real files
in ../shared/realdata/amazon-sequences (skipped without them) and on tiny hand-made folders."""

import ast
import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ecellm.data import load_records
from ecellm.sources import SourceError, build_report, write_splits
from ecellm.sources.amazon_sequences import COLUMNS, FILES, cut_title, ordinal

from .test_sources import FIELDS, check_layout, counts, realdata

LETTERS = [chr(ord("A") + i) for i in range(20)]


def parse(record: dict) -> tuple[list[str], list[str], str]:
    """(history titles, option titles, target title) of an SR record."""
    history = [h.split(": ", 1)[1] for h in ast.literal_eval(record["input"])]
    options = [o.split(": ", 1)[1] for o in ast.literal_eval(record["options"])]
    assert [o.split(": ", 1)[0] for o in ast.literal_eval(record["options"])] == LETTERS
    return history, options, options[LETTERS.index(record["output"])]


# --- the real files --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sr_built():
    return build_report("amazon-sequences", realdata("amazon-sequences"))


def pandas_sequences(folder: Path, category: str) -> set[tuple[str, ...]]:
    """Each user's whole sequence of cut titles, rebuilt with pandas: the first row's history, then every row's item
    (valid before test, file order), first 50 kept."""
    rows = pd.concat([pd.read_csv(folder / f"{category}.{part}.csv") for part in ("valid", "test")])
    out = set()
    for _, group in rows.groupby("user_id", sort=False):
        titles = ast.literal_eval(group["history_item_title"].iloc[0]) + group["item_title"].tolist()
        out.add(tuple(cut_title(t) for t in titles[:50]))
    return out


def test_sr_sizes_settings_and_layout(sr_built):
    check_layout(sr_built.splits)
    assert counts(sr_built.splits["train"]) == {("SR", "IND_Diverse_Instruction"): 2584}
    assert counts(sr_built.splits["validation"]) == {("SR", "IND_Diverse_Instruction"): 323}
    tests = counts(sr_built.splits["test"])
    assert tests[("SR", "IND_Diverse_Instruction")] == tests[("SR", "IND_Unseen_Instruction")] == 324
    assert tests[("SR", "OOD_Diverse_Instruction")] == tests[("SR", "OOD_Diverse_Instruction_1-shot")] == 1000
    assert sr_built.skipped == {}  # the published files are 5-core: every user has >= 5 purchases
    letters = Counter(r["output"] for r in sr_built.splits["train"])
    assert set(letters) == set(LETTERS) and max(letters.values()) < 2 * min(letters.values())


def test_sr_targets_are_the_notebooks_positions_of_real_sequences(sr_built):
    folder = realdata("amazon-sequences")
    office, industrial = (pandas_sequences(folder, c) for c in ("Office_Products", "Industrial_and_Scientific"))
    place = {"train": 3, "validation": 2, "test": 1}  # the target's place from the end of the user's sequence
    last_three = {}  # (the sequence up to the target, place) -> the last three purchases of each user it fits
    for s in office:
        for p in place.values():
            last_three.setdefault((s[:len(s) - p + 1], p), []).append(set(s[-3:]))
    for name, records in sr_built.splits.items():
        for r in records:
            history, options, target = parse(r)
            assert len(set(options)) == 20
            key = (tuple(history) + (target,), place[name])
            if r["setting"].startswith("OOD"):
                assert key[0] in industrial
            else:
                assert key in last_three, (name, r["input"])
                if len(last_three[key]) == 1:  # one user: none of its last three purchases is a distractor
                    assert not set(options) - {target} & last_three[key][0]


def test_sr_no_user_in_two_splits(sr_built):
    def history(r):
        return tuple(parse(r)[0])

    train = {history(r) for r in sr_built.splits["train"]}
    later = [r for name in ("validation", "test") for r in sr_built.splits[name] if r["setting"].startswith("IND_Div")]
    # a validation or test user whose earlier purchases were a training record would start with a training history
    leaked = [r for r in later if any(history(r)[:n] in train for n in range(4, len(history(r)) + 1))]
    assert leaked == []


def test_sr_files_read_unchanged_by_load_records(sr_built, tmp_path):
    paths = write_splits(sr_built.splits, tmp_path / "sr")
    for path, name in zip(paths, ("train", "validation", "test")):
        assert [{k: r[k] for k in FIELDS} for r in load_records(path)] == sr_built.splits[name]


# --- tiny folders --------------------------------------------------------------------------------------------
def write_sequences(folder: Path, sequences: dict[str, dict[str, list[str]]], window: int = 10) -> Path:
    """Write `category -> user -> titles` as the published files do: one row per purchase after the first, with up to
    `window` earlier purchases; the last two purchases of each user in `test`, the others in `valid`."""
    folder.mkdir(parents=True, exist_ok=True)
    ids: dict[str, int] = {}
    for category, users in sequences.items():
        rows = {"valid": [], "test": []}
        for user, titles in users.items():
            item_ids = [ids.setdefault(t, len(ids)) for t in titles]
            for k in range(1, len(titles)):
                start = max(0, k - window)
                part = "test" if k >= len(titles) - 2 else "valid"
                rows[part].append([user, str(titles[start:k]), titles[k], str(item_ids[start:k]), item_ids[k],
                                   "[]", "<a_0>"])
        for part, part_rows in rows.items():
            with open(folder / f"{category}.{part}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow([*COLUMNS, "history_item_sid", "item_sid"])
                writer.writerows(part_rows)
    return folder


def tiny_sequences(users: int, length: int, short: int = 0) -> dict[str, dict[str, list[str]]]:
    """Two categories (`users` users in domain, 20 held out: OOD test records need as many training records as
    1-shot demonstrations), each user buying `length` items of its own (titles name user and place), plus `short`
    users with 3 purchases in each category."""
    out = {}
    for category, n in (("Office_Products", users), ("Industrial_and_Scientific", 20)):
        out[category] = {f"{category[0]}{u}": [f"{category[0]} user {u} item {k}" for k in range(length)]
                         for u in range(n)}
        out[category] |= {f"short{u}": [f"short {u} item {k}" for k in range(3)] for u in range(short)}
    return out


def test_sr_tiny_folder_splits_users_and_counts_short_histories(tmp_path):
    built = build_report("amazon-sequences", write_sequences(tmp_path, tiny_sequences(30, 14, short=2), window=10))
    assert built.skipped == {"Office_Products: user with fewer than 5 purchases": 2,
                             "Industrial_and_Scientific: user with fewer than 5 purchases": 2}
    users = {}
    for name, position in (("train", 11), ("validation", 12), ("test", 13)):
        records = [r for r in built.splits[name] if r["setting"] == "IND_Diverse_Instruction"]
        users[name] = set()
        for r in records:
            history, options, target = parse(r)
            user = history[0].rsplit(" item ", 1)[0]
            users[name].add(user)
            # 14 purchases, rows in a sliding window of 10: the chained sequence is whole
            assert history == [f"{user} item {k}" for k in range(position)] and target == f"{user} item {position}"
            last_three = {f"{user} item {k}" for k in (11, 12, 13)}
            assert set(options) & last_three == {target}  # the user's last three left out of the draw
            assert json.loads(json.dumps(r["input"])).startswith("['1st: ")
    assert [len(u) for u in users.values()] == [24, 3, 3]
    assert not (users["train"] & users["validation"] or users["train"] & users["test"]
                or users["validation"] & users["test"])
    ood = [parse(r) for r in built.splits["test"] if r["setting"] == "OOD_Diverse_Instruction"]
    assert len(ood) == 20 and all(h[0].startswith("I user") and t.endswith("item 13") for h, _, t in ood)


def test_sr_titles_cut_and_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 30)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "30th"]
    long = " ".join(f"w{i}" for i in range(30)) + "."
    assert cut_title(long) == " ".join(f"w{i}" for i in range(25)) + "..."
    assert cut_title("Short title.") == "Short title."


def test_sr_bad_raw_input_names_file_row_and_column(tmp_path):
    with pytest.raises(SourceError, match=r"Office_Products\.valid\.csv: no such file"):
        build_report("amazon-sequences", tmp_path)
    folder = write_sequences(tmp_path / "a", tiny_sequences(30, 6))
    path = folder / FILES[1]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace("item_title", "title", 1), *lines[1:]]) + "\n")
    with pytest.raises(SourceError, match=r"Office_Products\.test\.csv: no column 'history_item_title'"):
        build_report("amazon-sequences", folder)
    folder = write_sequences(tmp_path / "b", tiny_sequences(30, 6))
    rows = list(csv.reader(open(folder / FILES[0], newline="")))
    rows[2][1] = "['unclosed"
    with open(folder / FILES[0], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(SourceError, match=r"Office_Products\.valid\.csv row 2: column 'history_item_title' is not "
                                          r"a Python list literal"):
        build_report("amazon-sequences", folder)
    rows[2][1], rows[2][3] = "['a', 'b']", "[1]"
    with open(folder / FILES[0], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(SourceError, match=r"row 2: 'history_item_id' has 1 items and 'history_item_title' 2"):
        build_report("amazon-sequences", folder)
    folder = write_sequences(tmp_path / "c", tiny_sequences(30, 6))
    rows = list(csv.reader(open(folder / FILES[0], newline="")))
    rows[1], rows[2] = rows[2], rows[1]  # a user's rows out of order
    with open(folder / FILES[0], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(SourceError, match=r"valid\.csv row 2: the history of user 'O0' does not continue"):
        build_report("amazon-sequences", folder)
    few = write_sequences(tmp_path / "d", tiny_sequences(3, 6))  # 18 distinct titles: too few for 20 options
    with pytest.raises(SourceError, match=r"18 distinct item titles in Office_Products's histories"):
        build_report("amazon-sequences", few)
