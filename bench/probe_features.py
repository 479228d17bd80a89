"""Is a task's answer already in the frozen model, and can a read-out learn it in the demo's budget?

For each task: `--n-train` training and `--n-test` test synthetic records (the test's names held out, as in the
examples), the frozen model's hidden state at the last prompt token (where the answer's first token is predicted)
after every third decoder layer and after the final norm (what `lm_head` reads), and three linear read-outs of the
answer's class from it, scored on the test records:

    fit       logistic regression fitted to convergence (L-BFGS, standardized features, a little L2): what is
              linearly present
    adam raw  AdamW at the demos' settings (batch 8, `--steps` steps, lr 2e-3, from zero), on the features as they
              are: what a linear read-out such as a LoRA on `lm_head` learns in that budget
    adam centred  the same on features minus their training mean

Tasks are the synthetic ones (`ecellm.synthetic`) by abbreviation, plus two probe-only variants: `SR-2` (2 options,
the main job's first curriculum phase, which LoRA learns in about 45 steps) and `PM-easy` (product matching whose
non-matching pairs differ in brand, type and colour at once, instead of in one of them).

    python bench/probe_features.py --tasks SR-2 PM-easy PM MPC --threads 1

About 5 minutes a task on one core (400 forward passes of 150-250 tokens, then 33 read-outs). Prints a markdown
table; nothing is written.
`--write-data DIR` instead writes the tasks' records as ECInstruct files (`train.json` with `--n-train` records a task,
`validation.json` and `test.json` with `--n-test`), for tuning the same variants with `ecellm train`.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from ecellm import synthetic  # noqa: E402
from ecellm.data import format_prompt  # noqa: E402
from ecellm.models import from_pretrained  # noqa: E402
from ecellm.tokenizer import load_tokenizer  # noqa: E402

from common import machine, smollm2_dir  # noqa: E402


def pm_all_fields_differ(rng: random.Random, names: list[str]):
    """PM whose non-matching pairs differ in brand, type and colour at once (the generator changes one of them)."""
    p, same = synthetic._product(rng, names), rng.random() < 0.5
    q = dict(p)
    if not same:
        q["brand"] = rng.choice([n for n in names if n != p["brand"]])
        q["type"] = rng.choice([b[0] for b in synthetic.BASES if b[0] != p["type"]])
        q["color"] = rng.choice([c for c in synthetic.COLORS if c != p["color"]])
    second = synthetic._pm_side(q, True, p["price"] * rng.uniform(0.97, 1.03))
    text = json.dumps({"product 1": synthetic._pm_side(p, False, p["price"]), "product 2": second})
    return text, None, "yes" if same else "no"


def records(task: str, n: int, split: str, seed: int) -> list[dict]:
    """`n` records of a synthetic task or of one of the two probe variants (see the module docstring)."""
    if task == "SR-2":
        return synthetic.generate_records("SR", n, split, seed, sr_options=2)
    if task == "PM-easy":
        original = synthetic.GENERATORS["PM"]
        synthetic.GENERATORS["PM"] = pm_all_fields_differ
        try:
            return synthetic.generate_records("PM", n, split, seed)
        finally:
            synthetic.GENERATORS["PM"] = original
    return synthetic.generate_records(task, n, split, seed)


@torch.no_grad()
def last_token_states(model, tok, recs: list[dict], layers: list[int]) -> torch.Tensor:
    """(N, len(layers) + 1, d): the hidden state at the last prompt token after each chosen layer and the final norm."""
    stack = model.model
    modules = [stack.layers[i] for i in layers] + [getattr(stack, stack.final_norm_name)]
    caught: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, out: caught.append(out[0, -1].clone())) for m in modules]
    rows = []
    try:
        for r in recs:
            caught.clear()
            model(torch.tensor([tok.encode(format_prompt(r))]))
            rows.append(torch.stack(caught))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(rows)


def fit_accuracy(x_train, y_train, x_test, y_test, k: int) -> float:
    """Logistic regression to convergence on standardized features (train statistics)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-4
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ w + b, y_train) + 1e-2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


def adam_accuracy(x_train, y_train, x_test, y_test, k: int, steps: int, batch: int = 8, lr: float = 2e-3) -> float:
    """A linear read-out from zero, AdamW on random batches of `batch` for `steps` steps."""
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(x_train.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        loss = F.cross_entropy(x_train[idx] @ w + b, y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["SR-2", "PM-easy", "PM", "MPC"])
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=60, help="AdamW steps of the read-outs (the demos' probes: 60)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-data", metavar="DIR", help="write the records as ECInstruct files to DIR and stop")
    args = ap.parse_args()
    if args.write_data:
        out = Path(args.write_data)
        out.mkdir(parents=True, exist_ok=True)
        for split, file in synthetic.SPLIT_FILES.items():
            n = args.n_train if split == "train" else args.n_test
            recs = [r for task in args.tasks for r in records(task, n, split, args.seed)]
            (out / f"{file}.json").write_text(json.dumps(recs), encoding="utf-8")
            print(f"{split}: {out / file}.json ({len(recs)} records)")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = from_pretrained(smollm2_dir()), load_tokenizer(smollm2_dir())
    n_layers = len(model.model.layers)
    layers = list(range(2, n_layers, 3))  # after layers 3, 6, ..., 30 (1-based)
    names = [f"layer {i + 1}" for i in layers] + ["final norm"]
    print(f"# {machine()}; SmolLM2-135M-Instruct, fp32; {args.n_train} training / {args.n_test} test records a task")
    print("| task | read-out | " + " | ".join(names) + " | majority |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for task in args.tasks:
        start = time.perf_counter()
        train, test = records(task, args.n_train, "train", args.seed), records(task, args.n_test, "test", args.seed)
        classes = sorted({r["output"] for r in train + test})
        y_train = torch.tensor([classes.index(r["output"]) for r in train])
        y_test = torch.tensor([classes.index(r["output"]) for r in test])
        x_train, x_test = last_token_states(model, tok, train, layers), last_token_states(model, tok, test, layers)
        majority = torch.bincount(y_test).max().item() / len(y_test)
        k = len(classes)
        fit = [fit_accuracy(x_train[:, j], y_train, x_test[:, j], y_test, k) for j in range(len(names))]
        raw = [adam_accuracy(x_train[:, j], y_train, x_test[:, j], y_test, k, args.steps) for j in range(len(names))]
        mean = x_train.mean(0)
        centred = [adam_accuracy(x_train[:, j] - mean[j], y_train, x_test[:, j] - mean[j], y_test, k, args.steps)
                   for j in range(len(names))]
        for label, accs in (("fit", fit), (f"adam raw, {args.steps} steps", raw),
                            (f"adam centred, {args.steps} steps", centred)):
            print(f"| {task} | {label} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {majority:.2f} |")
        print(f"# {task}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
