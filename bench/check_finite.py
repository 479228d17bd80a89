"""Cost of the NaN/Inf check on load (`from_pretrained(check_finite=True)`, the default).

Loads SmolLM2-135M-Instruct (fp32 and bf16) with and without the check, and times the check alone on its weights and
on one large synthetic tensor, against the exact element-wise test `torch.isfinite(t).all()` it avoids.

    python bench/check_finite.py [--repeats 5] [--gib 1] [--threads N]

On a CPU shared with other work, `--threads 1` avoids the stalls of torch's thread pool waiting for a busy core,
which otherwise dominate every reduction's time.
"""

import argparse
import statistics
import time

import torch

from bench.common import smollm2_dir
from ecellm.models import from_pretrained
from ecellm.models.loading import check_finite_tensor


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_synthetic(gib: float, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median seconds of the load check and of `torch.isfinite(t).all()` on one random tensor of `gib` GiB.

    The tensor is local, so it is freed on return, before the next dtype's is made.
    """
    n = int(gib * 2**30 / dtype.itemsize)
    big = torch.randn(n // 4096, 4096, dtype=dtype)  # (n / 4096, 4096)
    check = median_seconds(lambda: check_finite_tensor(big, "big", "memory"), repeats)
    exact = median_seconds(lambda: bool(torch.isfinite(big).all()), repeats)
    return check, exact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gib", type=float, default=1.0, help="size of the synthetic tensor")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = smollm2_dir()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| weights | load, check on | load, check off | check alone | isfinite().all() alone |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        loads = {True: [], False: []}
        for _ in range(args.repeats):  # alternate, so both see the same page cache and the same neighbours
            for check in (False, True):
                loads[check].append(median_seconds(lambda: from_pretrained(path, dtype=dtype, check_finite=check), 1))
        on, off = statistics.median(loads[True]), statistics.median(loads[False])
        weights = dict(from_pretrained(path, dtype=dtype, check_finite=False).named_parameters())
        check = median_seconds(lambda: [check_finite_tensor(t, k, path) for k, t in weights.items()], args.repeats)
        exact = median_seconds(lambda: [bool(torch.isfinite(t).all()) for t in weights.values()], args.repeats)
        print(f"| SmolLM2-135M {str(dtype)[6:]} | {on:.2f} s | {off:.2f} s | {check * 1e3:.0f} ms | "
              f"{exact * 1e3:.0f} ms |")
    for dtype in (torch.float32, torch.bfloat16):
        check, exact = time_synthetic(args.gib, dtype, args.repeats)
        print(f"| synthetic {args.gib:g} GiB {str(dtype)[6:]} | | | {check * 1e3:.0f} ms | {exact * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
