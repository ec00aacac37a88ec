"""The gap between a binary detector and its real-valued counterparts, as a strip chart.

Reads test scores of several groups of runs (one row per checkpoint: a group name, the
run, and its mAP@0.5 / mAP@[.5:.95] from ``bitdet eval --json``), prints each group's
seeds, mean ± sample standard deviation and its gap to the binary group with the standard
error of that difference, and draws one row per group: a dot per seed, a bar at the mean,
and a dashed line ``--target`` points above the binary group's mean. A counterpart whose
mean lies left of that line is within the target of the binary detector:

    python bench/plot_gap.py docs/img/gap_32k.csv --student students --out gap.png
                             [--metric mAP50] [--target 2.0] [--title TEXT]

The CSV has a header with at least ``group``, ``run`` and the metric's column (``mAP50``
or ``mAP``, as fractions in [0, 1]); groups are drawn in the order they first appear.
Without matplotlib (``pip install -e '.[bench]'``) the table is printed and no PNG written.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from _plotting import pyplot, save

METRICS = {"mAP50": "mAP@0.5", "mAP": "mAP@[.5:.95]"}


class ScoresError(ValueError):
    """A scores file that cannot be used (one line for the user)."""


def read_scores(path: Path, metric: str) -> dict[str, list[tuple[str, float]]]:
    """``{group: [(run, value), ...]}`` in the file's order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ScoresError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScoresError(f"{path}: not a readable CSV ({e})") from None
    missing = {"group", "run", metric} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ScoresError(f"{path}: needs a header with group, run and {metric} and at least "
                          f"one row" + (f" (missing: {', '.join(sorted(missing))})"
                                        if rows else ""))
    groups: dict[str, list[tuple[str, float]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row[metric])
        except (TypeError, ValueError):
            raise ScoresError(f"{path}:{line}: {metric} {row[metric]!r} is not a number") \
                from None
        if not 0.0 <= value <= 1.0:
            raise ScoresError(f"{path}:{line}: {metric} {value} is outside [0, 1] "
                              "(give mAP as a fraction, as `bitdet eval --json` prints it)")
        groups.setdefault(row["group"], []).append((row["run"], value))
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def gap_table(groups: dict[str, list[tuple[str, float]]], student: str, label: str) -> list[str]:
    """One line per group: seeds, mean ± std, and the gap to ``student`` in points (± its
    standard error, from the two groups' sample variances; a group of one run counts as
    exact, as a single teacher does)."""
    s_mean, s_std = mean_std([v for _, v in groups[student]])
    s_n = len(groups[student])
    lines = []
    for name, runs in groups.items():
        values = [v for _, v in runs]
        m, sd = mean_std(values)
        if len(values) == 1:
            line = f"{name}: 1 run, {label} {m:.4f}"
        else:
            line = (f"{name}: {len(values)} runs ({', '.join(f'{v:.4f}' for v in values)}), "
                    f"{label} {m:.4f} ± {sd:.4f}")
        if name != student:
            var = (s_std ** 2 / s_n if s_n > 1 else 0.0) + \
                (sd ** 2 / len(values) if len(values) > 1 else 0.0)
            se = 100 * math.sqrt(var)
            line += f"; {100 * (m - s_mean):+.2f} points over {student} (standard error {se:.2f})"
        lines.append(line)
    return lines


def plot(groups: dict[str, list[tuple[str, float]]], student: str, target: float, label: str,
         path: Path, title: str = "") -> bool:
    """Write the PNG; ``False`` (and a hint on stderr) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(groups)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1.6), dpi=110)
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        values = [v for _, v in groups[name]]
        color = "C3" if name == student else "C0"
        ax.scatter(values, [y] * len(values), s=22, color=color, alpha=0.75, zorder=3)
        m, _ = mean_std(values)
        ax.plot([m, m], [y - 0.3, y + 0.3], color="black", linewidth=2, zorder=4)
        ax.annotate(f"{m:.4f}", (m, y + 0.32), ha="center", va="bottom", fontsize=7)
    s_mean, _ = mean_std([v for _, v in groups[student]])
    line = s_mean + target / 100
    ax.axvline(line, linestyle="--", color="0.35", linewidth=1.0,
               label=f"{student} mean + {target:g} points ({line:.4f})")
    ax.set_yticks(range(len(names)), list(reversed(names)), fontsize=8)
    ax.set_ylim(-0.7, len(names) - 0.2)
    ax.set_xlabel(f"test {label} (dots: runs, bars: means)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save(plt, fig, ax, path, title)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scores", type=Path, help="CSV: group, run, mAP50, mAP")
    parser.add_argument("--student", required=True, help="the binary detector's group")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--metric", choices=sorted(METRICS), default="mAP50")
    parser.add_argument("--target", type=float, default=2.0,
                        help="allowed gap in mAP points (default 2.0)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.target) and args.target >= 0):
        parser.error(f"--target must be a non-negative number of points, not {args.target}")
    label = METRICS[args.metric]
    try:
        groups = read_scores(args.scores, args.metric)
        if args.student not in groups:
            raise ScoresError(f"{args.scores}: no group {args.student!r} "
                              f"(groups: {', '.join(groups)})")
    except ScoresError as e:
        print(f"plot_gap: error: {e}", file=sys.stderr)
        return 2
    for line in gap_table(groups, args.student, label):
        print(line)
    if plot(groups, args.student, args.target, label, args.out, args.title):
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
