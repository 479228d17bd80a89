"""The optional curve.png of the example scripts: the training loss and the task's metric against minutes of training.

A script in this folder imports it as `from curve import ...` (run as a script, its own folder is `sys.path[0]`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def training_losses(run_dirs: Sequence[str | Path]) -> list[tuple[float, float]]:
    """(minutes of training, loss) of every step of one or more runs trained one after the other (`log.jsonl`)."""
    points, offset = [], 0.0
    for run in run_dirs:
        steps = [r for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]
        points += [(offset + r["elapsed_s"] / 60, r["loss"]) for r in steps]
        offset = points[-1][0] if points else offset
    return points


def write_curve(path: Path, losses: Sequence[tuple[float, float]], scores: Sequence[tuple[float, float]],
                metric: str) -> bool:
    """Plot the training loss and `metric` against minutes of training into the PNG `path`, where matplotlib is
    installed (the `plot` extra: `pip install -e '.[plot]'`).

    Args:
        path: the image to write.
        losses: (minutes, training loss) per step, from `training_losses`.
        scores: (minutes, metric) where it was measured (0: before tuning).
        metric: the metric's name, for the axis.
    Returns:
        whether the image was written (False without matplotlib).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(*zip(*losses), color="tab:blue", linewidth=1)
    loss_axis.set(xlabel="minutes of training", ylabel="training loss", yscale="log")
    metric_axis = loss_axis.twinx()
    metric_axis.plot(*zip(*scores), "o", color="tab:red")  # measured points only: no line implies values between
    metric_axis.set(ylabel=metric, ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
