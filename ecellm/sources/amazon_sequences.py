"""Sequential Recommendation (SR) from real Amazon purchase histories, following `data_processing/SR.ipynb`.

    CAT.valid.csv, CAT.test.csv    user_id, history_item_title, item_title, history_item_id, item_id
                                   (history_*: Python-literal lists, oldest first, of up to 10 earlier purchases)

The files are Amazon Review Data 2018 (the source SR.ipynb reads), 5-core, as AkaliKong/MiniOneRec publishes them:
each row is one purchase (`item_*`) with the purchases before it, and a user's rows, `valid` before `test`, each
continue the one before (growing prefixes, then a sliding window of 10). Chaining them rebuilds each user's
time-ordered sequence; a row that does not continue its user's sequence is refused, naming file and row. As the
notebook: the first 50 purchases are kept, and a user with fewer than 5 is skipped (5-core; none in the published
files).

Records as the notebook writes them (`process_entry`): the target is one purchase, the input the purchases before
it as `str(["1st: title", "2nd: title", ...])`, each title cut to 25 words ("..." appended); the options
`str(["A: title", ..., "T: title"])`, the target and 19 titles drawn from the category's pool (every title in its
sequences, sorted, minus the user's last three), shuffled; the output the target's letter. Items are titles only
(the notebook: "title. category 1. category 2. brand."). Draws use `random.Random(1)`, user after user.

Splits: no user in two of them. The users are split 80/10/10 with the notebooks' seeded split; a training user gives
the record whose target is third from the end, a validation user second from the end, a test user the last
(the notebook's positions; the notebook itself takes all three from every user, so its test users' earlier
purchases are training targets). Office_Products is in domain; Industrial_and_Scientific is held out: the OOD test
is its users' last purchases (the notebook held out Tools_and_Home_Improvement). Caps as the notebook: 10,000 /
1,000 / 1,000 / 1,000 OOD.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

from .common import SEED, Built, SourceError, assemble, example, read_csv, shuffled, split_80_10_10

IN_DOMAIN, HELD_OUT = "Office_Products", "Industrial_and_Scientific"
PARTS = ("valid", "test")  # a user's rows in `valid` come before those in `test`
FILES = tuple(f"{category}.{part}.csv" for category in (IN_DOMAIN, HELD_OUT) for part in PARTS)
PUBLISHED = ("github.com/AkaliKong/MiniOneRec at 81b4ba9, data/Amazon/{valid,test}/CAT_5_2016-10-2018-11.csv "
             "(Apache-2.0; Amazon Review Data 2018, the McAuley lab's, for research use)")
GET = ("mkdir -p raw/amazon-sequences && for c in Office_Products Industrial_and_Scientific; do for p in valid test; "
       "do curl -fsSLo raw/amazon-sequences/$c.$p.csv https://raw.githubusercontent.com/AkaliKong/MiniOneRec/"
       "81b4ba9811cfb152cf161f1c486fe516510d081e/data/Amazon/$p/${c}_5_2016-10-2018-11.csv; done; done")
COLUMNS = ("user_id", "history_item_title", "item_title", "history_item_id", "item_id")
MIN_ITEMS, MAX_ITEMS = 5, 50  # the notebook's 5-core filter and its first-50 cap (inter_threshold)
N_OPTIONS, TITLE_WORDS = 20, 25
SIZES = {"train": 10_000, "validation": 1_000, "test": 1_000}  # the notebook's caps, also for the OOD test
POSITION = {"train": -3, "validation": -2, "test": -1}  # which purchase is a split's target


def literal_list(text: str, path: Path, row: int, column: str) -> list:
    """A history cell (a Python-literal list) as a list, or a `SourceError` naming file, row and column."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise SourceError(f"{path} row {row}: column {column!r} is not a Python list literal ({e})") from e
    if not isinstance(value, list):
        raise SourceError(f"{path} row {row}: column {column!r} holds a {type(value).__name__}, expected a list")
    return value


def purchases(row: dict, path: Path, number: int) -> list[tuple[str, str]]:
    """One row as its (item id, title) purchases, oldest first: the history, then the row's item."""
    ids = literal_list(row["history_item_id"], path, number, "history_item_id")
    titles = literal_list(row["history_item_title"], path, number, "history_item_title")
    if len(ids) != len(titles) or not all(isinstance(t, str) for t in titles):
        raise SourceError(f"{path} row {number}: 'history_item_id' has {len(ids)} items and 'history_item_title' "
                          f"{len(titles)}; expected one title (text) per id")
    return [(str(i), t) for i, t in zip(ids, titles)] + [(row["item_id"], row["item_title"])]


def user_sequences(raw: Path, category: str) -> dict[str, list[str]]:
    """user id -> the titles of the user's purchases in time order, chained from the category's rows (see the
    module docstring)."""
    ids: dict[str, list[str]] = {}
    titles: dict[str, list[str]] = {}
    for part in PARTS:
        path = raw / f"{category}.{part}.csv"
        for number, row in enumerate(read_csv(path, COLUMNS), 1):
            user, window = row["user_id"], purchases(row, path, number)
            if user not in ids:
                ids[user], titles[user] = [i for i, _ in window], [t for _, t in window]
                continue
            history = [i for i, _ in window[:-1]]
            if ids[user][len(ids[user]) - len(history):] != history:
                raise SourceError(f"{path} row {number}: the history of user {user!r} does not continue the rows "
                                  "before it (rows out of order, or from another file?)")
            ids[user].append(window[-1][0])
            titles[user].append(window[-1][1])
    return titles


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 22 -> '22nd' (the notebook's `ordinal`)."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def cut_title(title: str) -> str:
    """The notebook's `cutitem`: over 25 space-separated words -> the first 25, dots stripped, "..." appended."""
    words = title.split(" ")
    return " ".join(words[:TITLE_WORDS]).strip(".") + "..." if len(words) > TITLE_WORDS else title


def recommendation(sequence: list[str], position: int, pool: list[str], rng: random.Random) -> dict:
    """The `example` whose target is `sequence[position]`, with the purchases before it as the history and the
    target among N_OPTIONS shuffled candidates (the others drawn from `pool`, the user's last three left out)."""
    target = sequence[position]
    last_three = set(sequence[-3:])
    candidates = rng.sample([title for title in pool if title not in last_three], k=N_OPTIONS - 1) + [target]
    rng.shuffle(candidates)
    history = [f"{ordinal(i + 1)}: {cut_title(t)}" for i, t in enumerate(sequence[:len(sequence) + position])]
    options = [f"{chr(ord('A') + i)}: {cut_title(c)}" for i, c in enumerate(candidates)]
    return example(str(history), chr(ord("A") + candidates.index(target)), str(options))


def category_sequences(raw: Path, category: str, skipped: Counter) -> tuple[list[list[str]], list[str]]:
    """The category's usable sequences (first MAX_ITEMS purchases; users under MIN_ITEMS skipped and counted) in
    order of first appearance, and its sorted pool of titles."""
    sequences = []
    for titles in user_sequences(raw, category).values():
        if len(titles) < MIN_ITEMS:
            skipped[f"{category}: user with fewer than {MIN_ITEMS} purchases"] += 1
        else:
            sequences.append(titles[:MAX_ITEMS])
    pool = sorted({title for titles in sequences for title in titles})
    if len(pool) < N_OPTIONS + 2:
        raise SourceError(f"{raw / f'{category}.test.csv'}: {len(pool)} distinct item titles in {category}'s "
                          f"histories; at least {N_OPTIONS + 2} are needed to draw {N_OPTIONS} candidates")
    return sequences, pool


def build(raw: Path) -> Built:
    """SR's train / validation / test records (IND Office_Products, OOD Industrial_and_Scientific) from the folder
    holding the four CSV files."""
    raw, skipped, rng = Path(raw), Counter(), random.Random(SEED)
    sequences, pool = category_sequences(raw, IN_DOMAIN, skipped)
    users = dict(zip(SIZES, split_80_10_10(sequences)))  # split name -> its users' sequences
    in_domain = [[recommendation(s, POSITION[name], pool, rng) for s in users[name][:SIZES[name]]]
                 for name in SIZES]
    held_out, held_out_pool = category_sequences(raw, HELD_OUT, skipped)
    ood = [recommendation(s, POSITION["test"], held_out_pool, rng) for s in shuffled(held_out)[:SIZES["test"]]]
    return Built(assemble("SR", *in_domain, ood, raw=raw), skipped)
