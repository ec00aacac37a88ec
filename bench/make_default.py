"""Build the shipped default detector and its record (``sw/assets/default.{bitdet,json}``).

The default detector is a ``plain`` model trained by one seeded ``bitdet train`` command.
This script runs that command (timing it), exports ``last.pt`` to the bundle, scores the
checkpoint and the bundle on the DigitScenes test split (1000 images, scene seed 0) and on
its first 100 images (the subset the fast test tier re-evaluates), checks the fit on the
iCEBreaker preset and writes the record that ``tests/test_train.py`` checks::

    python bench/make_default.py --run /tmp/runs/default_plain --assets sw/assets
    python bench/make_default.py --run DIR --wall-seconds 612.3 --note "..."   # trained already

With ``--wall-seconds`` the training is not run: ``DIR/last.pt`` is taken as trained by the
recorded command and the given wall time (measured around that command) is recorded.
Writing into ``sw/assets`` replaces the shipped detector; the docs that quote its scores
(README.md, docs/training.md, docs/results.md) then need the new numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RECIPE = {"method": "plain", "epochs": 16, "train_images": 16384, "val_images": 256,
          "batch_size": 32, "lr": 0.002, "weight_decay": 0.0001, "threads": 2,
          "image_size": 64}
TEST = {"split": "test", "images": 1000, "seed": 0}
SUBSET_IMAGES = 100
CONFIG = "icebreaker"


def train_command(run: Path, seed: int) -> list[str]:
    r = RECIPE
    return ["bitdet", "train", "--method", r["method"], "--epochs", str(r["epochs"]),
            "--train-images", str(r["train_images"]), "--val-images", str(r["val_images"]),
            "--seed", str(seed), "--threads", str(r["threads"]), "--out", str(run)]


def _scores(model_or_bundle, dataset, *, prior=None) -> dict:
    from bitdet.core.bundle import Bundle
    from bitdet.sw.evaluate import evaluate_predictions, predict_bundle, predict_model
    if isinstance(model_or_bundle, Bundle):
        predictions = predict_bundle(model_or_bundle, dataset)
    else:
        predictions = predict_model(model_or_bundle, dataset, **({"prior": prior} if prior else {}))
    scores = evaluate_predictions(predictions, dataset)
    return {k: scores[k] for k in ("mAP50", "mAP", "detections")}


def _versions() -> dict:
    from importlib.metadata import version

    import numpy
    import pycocotools
    import torch
    return {"torch": torch.__version__, "numpy": numpy.__version__,
            "pycocotools": getattr(pycocotools, "__version__", None) or version("pycocotools"),
            "bitdet": version("bitdet"), "python": platform.python_version()}


def build_record(run: Path, assets: Path, seed: int, wall_seconds: float, note: str) -> dict:
    import torch

    from bitdet.core.bundle import load
    from bitdet.core.config import load_config
    from bitdet.sw.data import make_digitscenes
    from bitdet.sw.device import device_layer_count
    from bitdet.sw.train import export_checkpoint, load_checkpoint

    torch.set_num_threads(1)
    model, ckpt = load_checkpoint(run / "last.pt")
    if ckpt["method"] != RECIPE["method"] or ckpt["epoch"] != RECIPE["epochs"]:
        raise SystemExit(f"make_default: error: {run / 'last.pt'} is a {ckpt['method']} "
                         f"checkpoint of epoch "
                         f"{ckpt['epoch']}, not the recipe's {RECIPE['method']} epoch "
                         f"{RECIPE['epochs']}")
    bundle_path = export_checkpoint(run / "last.pt", assets / "default.bitdet")
    bundle = load(bundle_path)
    prior = ckpt["config"].get("prior")
    test = make_digitscenes(TEST["split"], count=TEST["images"], seed=TEST["seed"])
    subset = make_digitscenes(TEST["split"], count=SUBSET_IMAGES, seed=TEST["seed"])
    problems = load_config(CONFIG).fit_problems(bundle.requirements())
    if problems:
        raise SystemExit(f"make_default: error: {bundle_path} does not fit the {CONFIG} "
                         f"preset: {'; '.join(problems)}")
    data = bundle_path.read_bytes()
    history = ckpt["history"]
    rel = Path("sw/assets/default.bitdet")
    return {
        "description": "Shipped default detector: BinaryDetector (plain method) trained on "
                       "generated DigitScenes; bundle folded by `bitdet export`; record "
                       "written by bench/make_default.py.",
        "bundle": "default.bitdet",
        "bundle_bytes": len(data),
        "bundle_sha256": hashlib.sha256(data).hexdigest(),
        "method": RECIPE["method"],
        "seed": seed,
        "recipe": {k: v for k, v in RECIPE.items() if k != "method"}
                  | {"optimizer": "AdamW, per-step cosine decay to 0"},
        "commands": [
            shlex.join(train_command(Path("/tmp/runs/default_plain"), seed)),
            f"bitdet export /tmp/runs/default_plain/last.pt --out {rel}",
            f"bitdet eval --checkpoint /tmp/runs/default_plain/last.pt --split test "
            f"--images {TEST['images']} --seed {TEST['seed']} --json",
            f"bitdet eval --bundle {rel} --split test --images {TEST['images']} "
            f"--seed {TEST['seed']} --json",
            f"bitdet hw info --config {CONFIG} --bundle {rel}",
            f"python bench/make_default.py --run /tmp/runs/default_plain --assets sw/assets "
            f"--wall-seconds {wall_seconds:.1f}",
        ],
        "train_wall_seconds": round(wall_seconds, 1),
        "train_wall_note": note,
        "epoch_seconds": [round(h["seconds"], 1) for h in history],
        "val_history": [{"epoch": h["epoch"], "mAP50": round(h["val_mAP50"], 4),
                         "mAP": round(h["val_mAP"], 4)} for h in history],
        "test": {**TEST, "checkpoint": _scores(model, test, prior=prior),
                 "bundle": _scores(bundle, test)},
        "test_subset": {**TEST, "images": SUBSET_IMAGES,
                        "checkpoint": _scores(model, subset, prior=prior),
                        "bundle": _scores(bundle, subset)},
        "fits": {"config": CONFIG, "command": f"bitdet hw info --config {CONFIG} --bundle {rel}",
                 "result": "fits, every layer resident on chip"
                           + ("" if device_layer_count(bundle) == len(bundle.binary_layers)
                              else "; its raw last layer runs on the host")},
        "machine": f"{platform.machine()} {_cpu_name()}",
        "versions": _versions(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training folder")
    parser.add_argument("--assets", type=Path, default=Path("sw/assets"),
                        help="where default.bitdet and default.json are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wall-seconds", type=float, default=None,
                        help="the run is trained already; record this wall time")
    parser.add_argument("--note", default="wall clock of the whole `bitdet train` command "
                        "(data generation, training, per-epoch validation)",
                        help="how the wall time was measured")
    args = parser.parse_args(argv)
    if args.wall_seconds is None:
        command = train_command(args.run, args.seed)
        print("+", shlex.join(command), flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode:
            return 1
        wall = time.perf_counter() - start
    else:
        if not (args.run / "last.pt").exists():
            print(f"make_default: error: no {args.run / 'last.pt'}", file=sys.stderr)
            return 2
        wall = args.wall_seconds
    from bitdet.sw.train import CheckpointError, TrainingError
    try:
        args.assets.mkdir(parents=True, exist_ok=True)
        record = build_record(args.run, args.assets, args.seed, wall, args.note)
    except (CheckpointError, TrainingError, OSError) as e:
        print(f"make_default: error: {e}", file=sys.stderr)
        return 2
    (args.assets / "default.json").write_text(json.dumps(record, indent=1) + "\n")
    t, s = record["test"], record["test_subset"]
    print(f"{args.assets / 'default.bitdet'}: {record['bundle_bytes']} bytes; test "
          f"{t['images']} images mAP@0.5 {t['bundle']['mAP50']:.4f} mAP@[.5:.95] "
          f"{t['bundle']['mAP']:.4f} (checkpoint {t['checkpoint']['mAP50']:.4f} / "
          f"{t['checkpoint']['mAP']:.4f}); first {s['images']}: {s['bundle']['mAP50']:.4f}; "
          f"trained in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
