"""Greedy answers in bfloat16 against float32 on real test records: the share of records whose parsed answer is the
same, and the time each dtype took (issue 31: >= 98% agreement before evaluating in bfloat16).

On a CPU without native bfloat16 (no AVX512-BF16 or AMX) bfloat16 is several times slower than float32; the point
here is agreement, which an evaluation in bfloat16 (on a GPU, or a CPU with native bfloat16) would rely on. Measured
2026-12-07 with a tuned SmolLM2 (examples/train_real.py's adapter): PM 48 of 48, SA 41 of 48, so the examples
generate in float32.

    python bench/bf16_agreement.py --data RUN/data/test.json --adapter RUN/run/adapter --tasks PM,SA --n 100 --out DIR

Writes DIR/bf16_agreement.json (per task: records, agreeing records, share, seconds per dtype, the records that
differ) and prints one line per task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an ECInstruct test file (e.g. train_real's RUN/data/test.json)")
    parser.add_argument("--adapter", default="", help="LoRA adapter folder merged into the model (default: none)")
    parser.add_argument("--model", default="", help="checkpoint folder or known name (default: the embedded model)")
    parser.add_argument("--tasks", default="PM,SA", help="task abbreviations (default: %(default)s)")
    parser.add_argument("--setting", default="IND_Diverse_Instruction", help="setting scored (default: %(default)s)")
    parser.add_argument("--n", type=int, default=100, help="records per task, the first ones (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer budget (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for bf16_agreement.json (made if missing)")
    args = parser.parse_args()

    from ecellm.data import load_records
    from ecellm.eval import evaluate
    from ecellm.lora import load_adapter, merge
    from ecellm.models import load_pretrained, template_for
    from ecellm.models.default import resolve_model
    from ecellm.tasks import task_abbr

    model_dir = resolve_model(args.model)
    model, tokenizer = load_pretrained(model_dir)
    if args.adapter:
        model = merge(load_adapter(model, args.adapter))
    template = template_for(model.config.model_type)
    wanted = [t.strip().upper() for t in args.tasks.split(",")]
    records = [r for r in load_records(args.data, split="test") if r["setting"] == args.setting]
    report = {"machine": common.machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "tasks": {}}
    for abbr in wanted:
        group = [r for r in records if task_abbr(r["task"]) == abbr][: args.n]
        if not group:
            raise SystemExit(f"{args.data}: no {abbr} records in setting {args.setting}")
        answers, seconds = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            clock = time.perf_counter()
            result = evaluate(model.to(dtype).eval(), tokenizer, group, template=template, batch_size=8,
                              max_new_tokens=args.max_new_tokens, desc=f"{abbr} {dtype}")
            seconds[str(dtype)] = time.perf_counter() - clock
            answers[dtype] = [g["prediction"] for g in result["generations"]]
        differ = [{"index": i, "fp32": a, "bf16": b} for i, (a, b) in
                  enumerate(zip(answers[torch.float32], answers[torch.bfloat16])) if a != b]
        same = len(group) - len(differ)
        report["tasks"][abbr] = {"records": len(group), "agree": same, "share": same / len(group),
                                 "seconds": seconds, "differ": differ}
        print(f"{abbr}: {same} of {len(group)} answers agree ({same / len(group):.1%}); seconds {seconds}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_agreement.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
