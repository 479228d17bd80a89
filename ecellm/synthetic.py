"""Deterministic synthetic ECInstruct records for all 10 tasks, with structure a model can learn.

Every record has exactly the ECInstruct fields and serializations (`instruction` drawn from the task's diverse
pool, `input` / `options` / `output` formatted as `tasks.json` describes, `task`, `setting`, `split`,
`few_shot_example`) plus `"synthetic": true`. The answers follow from the inputs:

    AVE  the target attribute's value appears in one product field (the source); absent -> "None"
    PRP  same brand + same type = similar (C); same type, other brand = also viewed (B); base + accessory = A
    PM   same product (same brand, type, colour, a price within a few %) -> yes
    SA   the review's wording carries the star rating
    SR   the next item follows the history's last thread: "<Name> Vol. 3" after "<Name> Vol. 1", "<Name> Vol. 2";
         "<Brand> Lens" after "<Brand> Camera"; "<Brand> Ink" after "<Brand> Printer". It is never a copy of a
         history item; no other option shares a name with the history, and two distractors are the answer's
         kind under other names ("<Other> Lens"), so the type alone does not give it away.
    MPC  query "<colour> <type>": same type and colour = E, same type other colour = S, accessory = C, else I
    PSI  yes iff the product is the S case above
    QPR  2-4 products of distinct ESCI classes, ranked E > S > C > I (labels kept in the record's `esci_labels`)
    AP   yes iff a review snippet states the asked attribute
    AG   the answer restates the snippet that states the asked attribute

Names (brands, series) are common words such as "Falcon" or "Maple"; validation and test draw them from a
held-out 20% of them, so a model must
learn the rule rather than memorize names. Test records come from the same generator as training records.

    python -m ecellm.synthetic --out data/synthetic --n-per-task 1000 --n-eval-per-task 100 --seed 0
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .configs import task_name
from .data import SPLITS
from .flags import option, parse_flags, positive_int
from .tasks import TASK_BY_ABBR, TASKS, task_info

SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}
SETTING = "IND_Diverse_Instruction"
LETTERS = TASK_BY_ABBR["SR"].options  # A-T: SR's 20 options; QPR uses the first few

# base products: (type, accessories/refills, category level 1, category level 2); one word each keeps SR short
BASES = (
    ("Camera", ("Lens", "Tripod"), "Electronics", "Camera & Photo"),
    ("Phone", ("Case", "Charger"), "Electronics", "Cell Phones"),
    ("Printer", ("Ink", "Toner"), "Electronics", "Computers & Accessories"),
    ("Laptop", ("Sleeve", "Adapter"), "Electronics", "Computers & Accessories"),
    ("Console", ("Controller", "Headset"), "Electronics", "Video Games"),
    ("Brewer", ("Pods", "Carafe"), "Home & Kitchen", "Kitchen & Dining"),
    ("Pitcher", ("Filter",), "Home & Kitchen", "Kitchen & Dining"),
    ("Razor", ("Blades",), "Beauty", "Shaving"),
    ("Drill", ("Bits", "Battery"), "Tools & Home Improvement", "Power & Hand Tools"),
    ("Tent", ("Stakes", "Tarp"), "Sports & Outdoors", "Outdoor Recreation"),
)
# brand and series names: common one-token words, no real brands
NAMES = """Acorn Alder Amber Anchor Apex Arbor Arctic Arrow Aspen Atlas Aurora Badger Bamboo Basil Beacon Bear Birch
Bison Blaze Bloom Bolt Boulder Bramble Breeze Brook Buffalo Cactus Canyon Cardinal Cedar Cherry Cinder Clover Cobalt
Comet Condor Copper Coral Cougar Coyote Crane Crest Crow Crystal Cypress Dawn Delta Desert Dove Drake Dune Dusk Eagle
Echo Elm Ember Falcon Fern Finch Flint Fox Frost Galaxy Garnet Gecko Glacier Granite Grove Gull Harbor Hawk Hazel
Heron Hickory Holly Horizon Hornet Husky Iris Ivory Ivy Jade Jaguar Jasper Juniper Kestrel Koala Lagoon Lark Laurel
Lava Lemon Lily Linden Lion Lotus Lynx Magnet Mango Maple Marble Marlin Meadow Mesa Meteor Mint Mist Moose Moss
Nebula Nova Oak Oasis Ocean Olive Onyx Opal Orbit Orca Orchid Osprey Otter Owl Panda Panther Peak Pearl Pebble
Pelican Pepper Phoenix Pine Pixel Plum Polar Poppy Prairie Puma Quartz Quail Rain Raven Reef Ridge River Robin Rocket
Rose Ruby Saber Sage Sapphire Sequoia Shadow Shark Sierra Slate Snow Solar Sparrow Spruce Star Stone Storm Summit Sun
Swan Talon Thistle Thunder Tiger Timber Topaz Trail Tulip Tundra Valley Velvet Viper Walnut Wave Willow Wolf Wren Yak
Zebra Zenith Zephyr""".split()
COLORS = ("Black", "White", "Red", "Blue", "Green", "Silver", "Gray", "Navy", "Pink", "Orange")
MATERIALS = ("Aluminum", "Steel", "Plastic", "Leather", "Nylon", "Wood", "Glass", "Cotton")
SIZES = ("Small", "Medium", "Large", "Compact", "Mini")

PRP_OPTIONS = json.dumps(["A: Users who buy product 1 may also buy product 2.",
                          "B: Users who view product 1 may also view product 2.",
                          "C: The product 1 is similar with the product 2."])
SA_LABELS = ["A: very positive", "B: positive", "C: neutral", "D: negative", "E: very negative"]
SA_OPTIONS = json.dumps(SA_LABELS)
MPC_LABELS = [
    "A: The product is relevant to the query, and satisfies all the query specifications.",
    "B: The product is somewhat relevant. It fails to fulfill some aspects of the query but the product can be "
    "used as a functional substitute.",
    "C: The product does not fulfill the query, but could be used in combination with a product exactly matching "
    "the query.",
    "D: The product is irrelevant to the query.",
]
MPC_OPTIONS = json.dumps(MPC_LABELS)
SA_PHRASES = {  # stars -> phrases
    5: ("I absolutely love this {t}.", "Best {t} I have ever owned, perfect in every way.",
        "Outstanding quality, I would buy this {t} again without a doubt."),
    4: ("This {t} works well for the price.", "Good {t}, does the job with only minor issues.",
        "Pretty happy with this {t}, solid and reliable so far."),
    3: ("This {t} is okay, nothing special either way.", "An average {t}: some things good, some not.",
        "The {t} is fine, it does what it says but no more."),
    2: ("I am disappointed with this {t}.", "The {t} stopped working well after a few weeks.",
        "Not great, this {t} feels cheap and flimsy."),
    1: ("Terrible {t}, it broke on the first day.", "Complete waste of money, this {t} never worked.",
        "Awful {t}, I returned it immediately."),
}


def _names(seed: int, split: str) -> list[str]:
    """Brand / series names: train uses 80% of NAMES (chosen by seed), val and test the held-out 20%."""
    names = list(NAMES)
    random.Random(f"{seed}/names").shuffle(names)
    cut = len(names) * 4 // 5
    return names[:cut] if split == "train" else names[cut:]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- Sequential Recommendation ------------------------------------------------------------------------------
def _sr_item(title: str, category: tuple[str, str], brand: str, full: bool) -> str:
    return f"{title}. {category[0]}. {category[1]}. {brand}." if full else title


def _sr_thread(rng: random.Random, name: str, n_history: int) -> tuple[list[tuple], tuple]:
    """(history items, next item) of one thread; an item is (title, category, brand)."""
    if rng.random() < 1 / 3:
        start = rng.randint(1, 5)
        vols = [(f"{name} Vol. {start + k}", ("Books", "Literature & Fiction"), name)
                for k in range(min(2, n_history) + 1)]
        return vols[:-1], vols[-1]
    base, accessories, cat1, cat2 = rng.choice(BASES)
    return [(f"{name} {base}", (cat1, cat2), name)], (f"{name} {rng.choice(accessories)}", (cat1, cat2), name)


def _sr_record(rng: random.Random, names: list[str], position: int, history_len: int,
               full: bool, n_options: int) -> tuple[str, str, str]:
    """(input, options, output) of one SR record whose answer is at option `position` of `n_options`."""
    picked = rng.sample(names, 20 + history_len)
    anchor, noise, others = picked[0], picked[1:history_len + 1], picked[history_len + 1:]
    thread, answer = _sr_thread(rng, anchor, history_len)
    # earlier purchases of other names (which no option mentions), then the thread the answer follows
    history = [_sr_thread(rng, name, 1)[0][0] for name in noise[:history_len - len(thread)]] + thread
    # distractors: two of the answer's own kind under another name, the rest follow-ups of other threads
    options = [(answer[0].replace(anchor, name, 1), answer[1], name) for name in others[:2]]
    options += [_sr_thread(rng, name, rng.randint(1, 2))[1] for name in others[2:19]]
    rng.shuffle(options)
    options = options[:n_options - 1]  # fewer options: a random subset of the distractors (an easier record)
    options.insert(position, answer)
    return (str([f"{_ordinal(i + 1)}: {_sr_item(*x, full)}" for i, x in enumerate(history)]),
            str([f"{LETTERS[i]}: {_sr_item(*x, full)}" for i, x in enumerate(options)]), LETTERS[position])


# --- the other nine tasks: each returns (input, options or None, output), QPR also a dict of extra fields -------
def _product(rng: random.Random, names: list[str]) -> dict:
    base, accessories, cat1, cat2 = rng.choice(BASES)
    return {"brand": rng.choice(names), "type": base, "accessories": accessories, "color": rng.choice(COLORS),
            "material": rng.choice(MATERIALS), "size": rng.choice(SIZES), "price": round(rng.uniform(9, 400), 2)}


def _ave(rng, names):
    p = _product(rng, names)
    sources = {"title": f"{p['brand']} {p['type']}", "description": f"A dependable {p['type'].lower()} for every day.",
               "feature": "Easy to clean, Two year warranty"}
    attribute = rng.choice(("Color", "Material", "Size"))
    present = rng.random() < 0.85
    for attr in ("Color", "Material", "Size"):
        if attr == attribute and not present:
            continue
        where = rng.choice(("title", "description", "feature"))
        value = p[attr.lower()]
        sources[where] += {"title": f", {value}", "description": f" {attr}: {value}.",
                           "feature": f", {value} {attr.lower()}"}[where]
        if attr == attribute:
            output = [{"attribute": attr.lower(), "value": value.lower(), "source": f"product {where}"}]
    if not present:
        output = [{"attribute": attribute.lower(), "value": "None", "source": "None"}]
    fields = {f"product {k}": v for k, v in sources.items()}
    fields.update({"product price": f"${p['price']}", "product brand": p["brand"], "target attributes": attribute})
    return json.dumps(fields), None, json.dumps(output)


def _prp(rng, names):
    p, label = _product(rng, names), rng.choice("ABC")
    first = f"{p['brand']} {p['type']}, {p['color']}"
    if label == "A":  # bought together: the base product and an accessory for it
        second = f"{rng.choice(names)} {rng.choice(p['accessories'])} for {p['type']}"
    elif label == "B":  # viewed together: the same type from another brand
        second = f"{rng.choice([n for n in rng.sample(names, 2) if n != p['brand']])} {p['type']}, {p['color']}"
    else:  # similar: the same brand and type in another colour
        second = f"{p['brand']} {p['type']}, {rng.choice([c for c in COLORS if c != p['color']])}"
    one, two = sorted([first, second])
    return json.dumps({"Product 1:": one, "Product 2:": two}), PRP_OPTIONS, label


def _pm_side(p: dict, reorder: bool, price: float) -> dict:
    title = (f"{p['color']} {p['type']} by {p['brand']}" if reorder else f"{p['brand']} {p['type']} {p['color']}")
    return {"title": title.lower(), "description": f"{p['material']} {p['type']}, {p['size']} size".lower(),
            "manufacturer": p["brand"].lower(), "price": str(round(price, 2))}


def _pm(rng, names):
    p, same = _product(rng, names), rng.random() < 0.5
    q = dict(p)
    if not same:
        change = rng.choice(("brand", "type", "color"))
        q[change] = rng.choice({"brand": [n for n in rng.sample(names, 2) if n != p["brand"]],
                                "type": [b[0] for b in BASES if b[0] != p["type"]],
                                "color": [c for c in COLORS if c != p["color"]]}[change])
    second = _pm_side(q, True, p["price"] * rng.uniform(0.97, 1.03))
    return json.dumps({"product 1": _pm_side(p, False, p["price"]), "product 2": second}), None, "yes" if same else "no"


def _sa(rng, names):
    p, stars = _product(rng, names), rng.randint(1, 5)
    t = p["type"].lower()
    filler = f"I bought the {p['brand']} {t} in {p['color'].lower()} last month for my home."
    review = " ".join([rng.choice(SA_PHRASES[stars]).format(t=t), filler])
    return review, SA_OPTIONS, SA_LABELS[5 - stars]


def _esci_title(rng, names, p: dict, label: str) -> str:
    """A product title standing in ESCI relation `label` to the query '<colour> <type>' of product p."""
    if label == "E":
        return f"{rng.choice(names)} {p['type']}, {p['color']}, {p['material']}"
    if label == "S":
        return f"{rng.choice(names)} {p['type']}, {rng.choice([c for c in COLORS if c != p['color']])}"
    if label == "C":
        return f"{rng.choice(names)} {rng.choice(p['accessories'])} for {p['type']}"
    other = rng.choice([b for b in BASES if b[0] != p["type"]])
    return f"{rng.choice(names)} {other[0]}, {rng.choice(COLORS)}"


def _query(p: dict) -> str:
    return f"{p['color']} {p['type']}".lower()


def _mpc(rng, names):
    p, label = _product(rng, names), rng.choice("ESCI")
    return (json.dumps({"query": _query(p), "product title": _esci_title(rng, names, p, label)}), MPC_OPTIONS,
            MPC_LABELS["ESCI".index(label)])


def _psi(rng, names):
    p = _product(rng, names)
    label = "S" if rng.random() < 0.4 else rng.choice("ECI")
    return (json.dumps({"query": _query(p), "product": _esci_title(rng, names, p, label)}), None,
            "yes" if label == "S" else "no")


def _qpr(rng, names):
    p = _product(rng, names)
    labels = rng.sample("ESCI", rng.choice((2, 2, 3, 4)))
    products = [f"{LETTERS[i]}: {_esci_title(rng, names, p, lab)}" for i, lab in enumerate(labels)]
    order = sorted(range(len(labels)), key=lambda i: "ESCI".index(labels[i]))
    ranking = ",".join(LETTERS[i] for i in order)
    # each option's ESCI label, for NDCG (the real dataset keeps them in the reference repository's label.json)
    return json.dumps({"query": _query(p), "product list": products}), None, ranking, {"esci_labels": labels}


QA_FACTS = (  # (question, statement of the fact, answer) about a product p
    ("What color is this {t}?", "The color is {color}, a bit darker than in the photos.", "It is {color}."),
    ("What is the {t} made of?", "The body is {material} and feels sturdy.", "It is made of {material}."),
    ("How big is the {t}?", "It is the {size} size, fits easily in a drawer.", "It is the {size} size."),
)
QA_NOISE = ("Shipping was fast and the box was intact.", "Customer service answered within a day.",
            "I use it almost every day.", "The manual is short but clear.", "Good value for the money.")


def _qa(rng, names) -> tuple[str, str, str, bool]:
    """(question, document json, answer, answerable)."""
    p = _product(rng, names)
    values = {"t": p["type"].lower(), "color": p["color"].lower(), "material": p["material"].lower(),
              "size": p["size"].lower()}
    question, fact, answer = (s.format(**values) for s in rng.choice(QA_FACTS))
    document = rng.sample(QA_NOISE, rng.randint(2, 4))
    answerable = rng.random() < 0.5
    if answerable:
        document.insert(rng.randrange(len(document) + 1), fact)
    return json.dumps({"question": question, "document": document}), answer, answerable


def _ap(rng, names):
    text, _, answerable = _qa(rng, names)
    return text, None, "yes" if answerable else "no"


def _ag(rng, names):
    while True:
        text, answer, answerable = _qa(rng, names)
        if answerable:
            return text, None, answer


GENERATORS = {"AVE": _ave, "PRP": _prp, "PM": _pm, "SA": _sa, "MPC": _mpc, "PSI": _psi, "QPR": _qpr,
              "AP": _ap, "AG": _ag}


# --- records and files --------------------------------------------------------------------------------------
def generate_records(task: str, n: int, split: str = "train", seed: int = 0, *, sr_history_len: int = 2,
                     sr_full_items: bool = False, sr_options: int = 20, names_seed: int | None = None) -> list[dict]:
    """`n` synthetic records of one task, the same for the same arguments.

    Args:
        task: a task name or abbreviation.
        n: number of records.
        split: "train", "val" or "test"; val and test use held-out names.
        seed: the random seed.
        names_seed: the seed of the split of names into training and held-out ones (default: `seed`); sets drawn
            with other seeds but one `names_seed` never share a held-out name with each other's training records.
        sr_history_len: SR purchase-history length (>= 1); the prompt grows by one item per step.
        sr_full_items: SR items as the dataset writes them ("<title>. <cat 1>. <cat 2>. <brand>.") instead of
            "<title>" (short prompts: about 250 GPT-2 tokens for the alpaca prompt with 2 history items, +17 per
            extra item).
        sr_options: SR options per record, 2 to 20 (the dataset: 20); fewer keep a random subset of the distractors,
            for easier records (a curriculum). The same arguments with 20 give the same records as before the knob.
    Returns:
        a list of n record dicts in the ECInstruct schema with "synthetic": True. SR answers are spread exactly
        evenly over the `sr_options` letters (n // sr_options each, the rest on random letters).
    """
    info = task_info(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    names = _names(seed if names_seed is None else names_seed, split)
    if not 1 <= sr_history_len <= len(names) - 20:
        raise ValueError(f"sr_history_len must be in [1, {len(names) - 20}] (one name per history item and "
                         f"option), got {sr_history_len}")
    if not 2 <= sr_options <= len(LETTERS):
        raise ValueError(f"sr_options must be in [2, {len(LETTERS)}], got {sr_options}")
    rng = random.Random(f"{seed}/{info.abbr}/{split}")
    if info.abbr == "SR":
        k = sr_options
        positions = [i % k for i in range(n - n % k)] + rng.sample(range(k), n % k)
        rng.shuffle(positions)
    records = []
    for i in range(n):
        if info.abbr == "SR":
            text, options, output, *extra = _sr_record(rng, names, positions[i], sr_history_len, sr_full_items,
                                                     sr_options)
        else:
            text, options, output, *extra = GENERATORS[info.abbr](rng, names)
        records.append({"instruction": rng.choice(info.instructions), "input": text, "options": options,
                        "output": output, "task": info.name, "setting": SETTING, "split": split,
                        "few_shot_example": None, "synthetic": True, **(extra[0] if extra else {})})
    return records


def write_dataset(out_dir: str | Path, n_per_task: int, n_eval_per_task: int, seed: int = 0, *, tasks=None,
                  fmt: str = "json", **knobs) -> dict[str, Path]:
    """Write `train.json`, `validation.json` and `test.json` as the released dataset names them.

    Args:
        out_dir: the directory to write (created if needed).
        n_per_task: training records per task; n_eval_per_task: validation and test records per task each.
        seed: the random seed (same seed and arguments -> the same bytes).
        tasks: task names or abbreviations; None writes all 10.
        fmt: "json" (one JSON array, as released) or "jsonl" (JSON Lines).
        knobs: `sr_history_len`, `sr_full_items`, `sr_options`, `names_seed` for `generate_records`.
    Returns:
        split -> path written.
    """
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"fmt must be 'json' or 'jsonl', got {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    abbrs = [t.abbr for t in TASKS] if tasks is None else [task_info(t).abbr for t in tasks]
    paths = {}
    for split in SPLITS:
        n = n_per_task if split == "train" else n_eval_per_task
        records = [r for abbr in abbrs for r in generate_records(abbr, n, split, seed, **knobs)]
        path = out_dir / f"{SPLIT_FILES[split]}.{fmt}"
        with open(path, "w", encoding="utf-8") as f:
            if fmt == "json":
                json.dump(records, f)
            else:
                f.writelines(json.dumps(r) + "\n" for r in records)
        paths[split] = path
    return paths


@dataclass(kw_only=True)
class SyntheticConfig:
    """Write a synthetic ECInstruct dataset (train/validation/test); each field is a flag of
    `python -m ecellm.synthetic`."""

    out: str = option(help="output directory")
    n_per_task: int = option(1000, help="training records per task")
    n_eval_per_task: int = option(100, help="validation and test records per task")
    seed: int = option(0, help="random seed (the same seed and flags write the same bytes)")
    tasks: list[str] | None = option(None, type=task_name, split_commas=True, metavar="TASK",
                                     help="task names or abbreviations (SR PM, or SR,PM); default: all 10")
    format: str = option("json", choices=("json", "jsonl"), help="JSON array or JSON Lines files")
    sr_history_len: int = option(2, type=positive_int, help="SR purchase-history length")
    sr_full_items: bool = option(False, help="SR items as '<title>. <category 1>. <category 2>. <brand>.' (longer "
                                             "prompts)")
    sr_options: int = option(20, type=positive_int, help="SR options per record (2-20; the dataset: 20)")


def main(argv: list[str] | None = None) -> None:
    """`python -m ecellm.synthetic --out DIR ...`: write the dataset and print its files."""
    config = parse_flags(SyntheticConfig, argv, prog="python -m ecellm.synthetic",
                         description=SyntheticConfig.__doc__.split(";")[0])
    paths = write_dataset(config.out, config.n_per_task, config.n_eval_per_task, config.seed, tasks=config.tasks,
                          fmt=config.format, sr_history_len=config.sr_history_len, sr_full_items=config.sr_full_items,
                          sr_options=config.sr_options)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
