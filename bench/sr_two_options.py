"""Can LoRA learn real sequential recommendation when each record has only 2 options?

The main job learns its synthetic look-up through a curriculum whose first phase has 2 options per record
(docs/sr_recipe.md). This writes the same first phase from the real `amazon-sequences` SR records that
`examples/train_real.py` trains on: each record keeps its history and instruction, and its options become the
target and one other candidate of the same record, lettered A and B in a seeded random order (the answer is A for
about half). Then tune it and watch the loss (2-way chance for the letter and the end token: ln(2)/2 = 0.35):

    python bench/sr_two_options.py --out /tmp/sr2data
    torchrun --standalone --nproc_per_node=2 -m ecellm.train --model smollm2 --data /tmp/sr2data --out /tmp/sr2run \\
        --lr 2e-3 --global-batch 8 --micro-batch 4 --pack-tokens 4096 --max-len 1024 --dtype fp32 --epochs 1 \\
        --warmup-ratio 0.05 --eval-every 0 --max-val-examples 16 --no-reshard-after-forward

Measured in docs/real_data.md. Writes only under `--out`.
"""

import argparse
import ast
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_real import build_sources, default_raw  # noqa: E402 (examples/ is not a package)


def two_options(record: dict, rng: random.Random) -> dict:
    """The record with its options cut to the target and one other of its candidates, as "A: ..." and "B: ..."."""
    options = ast.literal_eval(record["options"])
    titles = {option.split(": ", 1)[0]: option.split(": ", 1)[1] for option in options}
    other = rng.choice([letter for letter in titles if letter != record["output"]])
    pair, answer = [titles[record["output"]], titles[other]], "A"
    if rng.random() >= 0.5:
        pair, answer = pair[::-1], "B"
    return {**record, "options": str([f"A: {pair[0]}", f"B: {pair[1]}"]), "output": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", default="", help="the folder of the sources' folders (default: train_real's)")
    parser.add_argument("--out", required=True, help="where train.json, validation.json and test.json go (new)")
    parser.add_argument("--n-train", type=int, default=400, help="training records (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the other option and the order (default: 0)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out} exists: choose a new folder")
    splits = build_sources(Path(args.raw) if args.raw else default_raw(), ("SR",))
    rng = random.Random(args.seed)
    out.mkdir(parents=True)
    for split, n in (("train", args.n_train), ("validation", 16), ("test", 100)):
        records = [two_options(r, rng) for r in splits[split] if r["setting"] == "IND_Diverse_Instruction"][:n]
        (out / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        print(f"{split}: {len(records)} records, answer A in {sum(r['output'] == 'A' for r in records)}")


if __name__ == "__main__":
    main()
