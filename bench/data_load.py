"""Load time and peak memory of `ecellm.data.load_records` on a train file the size of ECInstruct's (~330 MB).

Writes a synthetic file of 92,022 records (the real train count; inputs padded with text to the real average
size, ~3.6 KB a record) as a JSON array and as JSON Lines, then loads each in a fresh process and reports wall
time and peak resident memory (ru_maxrss) against the file size.

    python bench/data_load.py [--dir /tmp/ecellm-bench] [--mb 330] [--keep]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ecellm.data import TASKS
from ecellm.synthetic import generate_records

N_TRAIN = 92_022


def write_file(path: Path, target_mb: float, fmt: str) -> None:
    base = [r for t in TASKS for r in generate_records(t.abbr, 100, "train", seed=0)]
    mean = sum(len(json.dumps(r)) for r in base) / len(base)
    pad = max(0, int(target_mb * 1e6 / N_TRAIN - mean))
    filler = ("The product arrived on time and works as described, " * (pad // 50 + 1))[:pad]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[" if fmt == "json" else "")
        for i in range(N_TRAIN):
            r = dict(base[i % len(base)])
            r["input"] = r["input"] + " " + filler
            line = json.dumps(r)
            f.write((", " if i else "") + line if fmt == "json" else line + "\n")
        f.write("]" if fmt == "json" else "")


def measure(path: Path) -> dict:
    """Run in a child process: load the file, report seconds, peak RSS and the record count."""
    code = ("import json, resource, time, sys\nfrom ecellm.data import load_records\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nt = time.perf_counter()\n"
            f"rs = load_records({str(path)!r}, split='train', setting='IND_Diverse_Instruction')\n"
            "dt = time.perf_counter() - t\n"
            "print(json.dumps({'seconds': dt, 'records': len(rs), 'rss_before_mb': before / 1024, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/ecellm-bench-data", help="where to write the files")
    parser.add_argument("--mb", type=float, default=330, help="target file size in MB")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for fmt in ("json", "jsonl"):
            path = out / f"train.{fmt}"
            write_file(path, args.mb, fmt)
            size = path.stat().st_size / 2**20
            m = measure(path)
            print(f"{fmt:5s}: {size:.0f} MiB, {m['records']} records, load {m['seconds']:.1f} s, peak RSS "
                  f"{m['peak_rss_mb']:.0f} MiB ({m['rss_before_mb']:.0f} MiB before loading; "
                  f"{(m['peak_rss_mb'] - m['rss_before_mb']) / size:.2f}x the file for loading)")
    finally:
        if not args.keep:
            shutil.rmtree(out)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, max RSS here "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
