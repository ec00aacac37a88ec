"""Training curves of bitdet runs: one history value per epoch, read from checkpoints.

Every checkpoint that ``bitdet train`` writes (``last.pt``, ``best.pt``, ``epoch_NNN.pt``)
holds the run's per-epoch history (mean train losses and, with validation, mAP@0.5 and
mAP@[.5:.95] on the validation split). This script draws one of those values against the
epoch for several runs, prints each run's last and best value, and can mark other runs'
final value as dashed horizontal lines (a teacher next to its students, say):

    python bench/plot_history.py RUN [RUN ...] --out curves.png [--metric val_mAP50]
                                 [--label NAME ...] [--ref RUN ...] [--title TEXT]

``RUN`` is a checkpoint file or a training folder (its ``last.pt`` is read). ``--metric``
is a history key: ``val_mAP50`` (default), ``val_mAP``, ``train_loss``, ``train_obj``, …
(a run that lacks it is an error that lists the keys it has). ``--label`` names the runs
(default: the folder name); ``--ref`` runs are drawn as a line at their last value.
Without matplotlib (``pip install -e '.[bench]'``) the table is printed and no PNG written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _plotting import pyplot, save

from bitdet.sw.train import CheckpointError, _read_checkpoint


class HistoryError(ValueError):
    """A run that cannot be read or lacks the requested value (one line for the user)."""


def checkpoint_path(run: str | Path) -> Path:
    """``run`` itself, or ``run/last.pt`` for a training folder."""
    path = Path(run)
    return path / "last.pt" if path.is_dir() else path


def default_label(run: str | Path) -> str:
    """The training folder's name (``runs/ida_s0/best.pt`` and ``runs/ida_s0`` give
    ``ida_s0``)."""
    path = Path(run)
    return path.name if path.is_dir() else path.parent.name or path.stem


def read_series(run: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """The epochs and ``metric`` values of a run's history (epochs without it skipped)."""
    path = checkpoint_path(run)
    try:
        history = _read_checkpoint(path)["history"]
    except CheckpointError as e:
        raise HistoryError(str(e)) from None
    points = [(int(entry["epoch"]), float(entry[metric])) for entry in history
              if entry.get(metric) is not None]
    if not points:
        keys = sorted({key for entry in history for key in entry} - {"epoch"})
        raise HistoryError(f"{path}: no {metric!r} in its history "
                           f"(it has: {', '.join(keys) or 'no entries'})")
    return [p[0] for p in points], [p[1] for p in points]


def summary(label: str, epochs: list[int], values: list[float], lower_is_better: bool) -> str:
    """``label: N epochs, last V (epoch E), best V (epoch E)``; ties go to the later epoch."""
    sign = -1 if lower_is_better else 1
    best = max(range(len(values)), key=lambda i: (sign * values[i], i))
    return (f"{label}: {len(values)} epochs, last {values[-1]:.4f} (epoch {epochs[-1]}), "
            f"best {values[best]:.4f} (epoch {epochs[best]})")


def plot(curves: list[tuple[str, list[int], list[float]]], refs: list[tuple[str, float]],
         metric: str, path: Path, title: str = "") -> bool:
    """Write the PNG; ``False`` (and a hint on stderr) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, epochs, values in curves:
        ax.plot(epochs, values, marker="o", markersize=2.5, linewidth=1.3, label=label)
    for (label, value), color in zip(refs, ("0.25", "0.5", "0.65", "0.8"), strict=False):
        ax.axhline(value, linestyle="--", linewidth=1.0, color=color,
                   label=f"{label} (last {value:.4f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(plt, fig, ax, path, title)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="checkpoint file or training folder (its last.pt)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--metric", default="val_mAP50",
                        help="history key to draw (default val_mAP50)")
    parser.add_argument("--label", nargs="+", default=None, metavar="NAME",
                        help="one name per RUN (default: the folder names)")
    parser.add_argument("--ref", nargs="+", default=[], metavar="RUN",
                        help="runs drawn as a dashed line at their last value")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        parser.error(f"--label gives {len(args.label)} names for {len(args.runs)} runs")
    labels = args.label or [default_label(run) for run in args.runs]
    lower = args.metric.startswith("train_")  # the train_* keys are losses
    try:
        curves = [(label, *read_series(run, args.metric))
                  for label, run in zip(labels, args.runs, strict=True)]
        refs = []
        for run in args.ref:
            epochs, values = read_series(run, args.metric)
            refs.append((default_label(run), values[-1]))
            print(summary(default_label(run) + " (ref)", epochs, values, lower))
    except HistoryError as e:
        print(f"plot_history: error: {e}", file=sys.stderr)
        return 2
    for label, epochs, values in curves:
        print(summary(label, epochs, values, lower))
    if plot(curves, refs, args.metric, args.out, args.title):
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
