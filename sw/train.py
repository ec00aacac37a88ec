"""Training on DigitScenes: a method registry, a seeded trainer with checkpoints and resume.

Methods (:data:`METHODS`):

* ``plain`` — :class:`bitdet.sw.models.BinaryDetector` as it is (XNOR-Net α, ApproxSign
  activations, RSign biases, int8 stem and head); exportable to a deployment bundle.
* ``fp`` — :class:`bitdet.sw.models.RealDetector`, the real-valued teacher with the same
  topology; not exportable.
* ``lws`` — LWS-Det (:mod:`bitdet.sw.distill`): a DBS-searched binary detector distilled
  from an ``fp`` checkpoint (``teacher=``); exportable like ``plain``.
* ``ida`` — IDa-Det (:mod:`bitdet.sw.distill`): the ``plain`` detector distilled from an
  ``fp`` checkpoint on the proposal pairs of largest information discrepancy.
* ``bidet`` — BiDet (:mod:`bitdet.sw.distill`): the ``plain`` detector with an information
  bottleneck and a sparse object prior; no teacher.
* ``rbcn`` — RBCN (:mod:`bitdet.sw.distill`): the ``plain`` detector with a learnable kernel
  approximation and a discriminator on its features against an ``fp`` teacher.

More methods plug in by adding a :class:`Method` to :data:`METHODS`. docs/training.md
describes the head, loss and commands, docs/methods.md the distillation methods.

Training is deterministic on the CPU for a given seed (same torch build and thread count):
the model is initialised under ``torch.manual_seed(seed)`` (the caller's RNG state is left
alone), the data set is generated from the seed, and each epoch's shuffle comes from a
generator seeded with ``(seed, epoch)``, so resuming from a checkpoint continues exactly as
an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .bundle import Bundle
from .data import DIGIT_CLASSES, make_digitscenes
from .detection import BOX_PRIOR, LossWeights, detection_loss, encode_targets
from .distill import (
    BIDET_DEFAULTS,
    IDA_DEFAULTS,
    LWS_DEFAULTS,
    RBCN_DEFAULTS,
    BiDetDetector,
    IDaDetector,
    LWSDetector,
    RBCNDetector,
    bidet_losses,
    ida_losses,
    lws_losses,
    lws_prepare,
    rbcn_losses,
)
from .models import BinaryDetector, RealDetector

__all__ = [
    "CHECKPOINT_FORMAT",
    "METHODS",
    "CheckpointError",
    "DistillLosses",
    "Method",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "build_model",
    "export_checkpoint",
    "load_checkpoint",
    "load_teacher",
    "train",
]

CHECKPOINT_FORMAT = "bitdet-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(ValueError):
    """A bad training request (unknown method, unavailable device, bad sizes)."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be read, resumed from or exported."""


#: ``losses(student, teacher, pixels, targets, options) -> (head map, {name: weighted
#: loss term})`` of a distillation method; the trainer adds the detection loss.
DistillLosses = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """A training method: how to build its model, whether it exports to a bundle, its extra
    losses (a distillation method's against an ``fp`` teacher) and their default options."""

    name: str
    description: str
    model_class: type[nn.Module]
    exportable: bool
    losses: DistillLosses | None = None
    defaults: dict = field(default_factory=dict)
    #: ``prepare(model, options)``: adjusts a freshly initialised model (new runs only)
    prepare: Callable[[nn.Module, dict], None] | None = None
    #: whether ``losses`` needs the ``fp`` teacher (``teacher=`` / ``--teacher``)
    needs_teacher: bool = False


#: Training methods by name. Add an entry to make a new method available to
#: :func:`train` and ``bitdet train --method``.
METHODS: dict[str, Method] = {
    "plain": Method("plain", "BinaryDetector as is: XNOR-Net α, ApproxSign, RSign biases",
                    BinaryDetector, exportable=True),
    "fp": Method("fp", "real-valued teacher (float conv + BN + ReLU), same topology",
                 RealDetector, exportable=False),
    "lws": Method("lws", "LWS-Det: DBS-searched weights, learned α, angular + amplitude "
                  "losses against an fp teacher (--teacher)", LWSDetector, exportable=True,
                  losses=lws_losses, defaults=LWS_DEFAULTS, prepare=lws_prepare,
                  needs_teacher=True),
    "ida": Method("ida", "IDa-Det: max-discrepancy proposal pairs, entropy distillation "
                  "from an fp teacher (--teacher)", IDaDetector, exportable=True,
                  losses=ida_losses, defaults=IDA_DEFAULTS, needs_teacher=True),
    "bidet": Method("bidet", "BiDet: information bottleneck (sampled boxes, L2 on the "
                    "pre-activations) + sparse object prior; no teacher", BiDetDetector,
                    exportable=True, losses=bidet_losses, defaults=BIDET_DEFAULTS),
    "rbcn": Method("rbcn", "RBCN: kernel approximation with a learnable matrix + adversarial "
                   "feature matching against an fp teacher (--teacher)", RBCNDetector,
                   exportable=True, losses=rbcn_losses, defaults=RBCN_DEFAULTS,
                   needs_teacher=True),
}


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in every checkpoint)."""

    method: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    image_size: int
    train_count: int
    val_count: int
    prior: float = BOX_PRIOR
    model: dict = field(default_factory=dict)
    #: the fp checkpoint a distillation method learns from (None for plain / fp)
    teacher: str | None = None
    #: the distillation method's options (its defaults, updated by ``options``)
    options: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (eval mode), the last checkpoint's
    path, the per-epoch history and the config."""

    model: nn.Module
    checkpoint: Path
    history: list[dict]
    config: TrainConfig


def _method(name: str) -> Method:
    if name not in METHODS:
        raise TrainingError(f"unknown method {name!r} (available: {', '.join(METHODS)})")
    return METHODS[name]


def build_model(method: str, model_kwargs: dict) -> nn.Module:
    """A fresh model of ``method`` from the stored constructor arguments."""
    kwargs = dict(model_kwargs)
    for key in ("widths", "pools", "class_names"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    return _method(method).model_class(**kwargs)


def _default_model_kwargs(image_size: int) -> dict:
    return {"num_classes": len(DIGIT_CLASSES), "in_channels": 1,
            "widths": [16, 32, 64, 128, 128], "pools": [True, True, False, False],
            "image_size": image_size, "class_names": list(DIGIT_CLASSES)}


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise TrainingError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch has no CUDA device here")
    return dev


def _cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps (per optimizer step)."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a bitdet training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not "
                              f"supported (this bitdet reads {CHECKPOINT_VERSION})")
    if ckpt.get("method") not in METHODS:
        raise CheckpointError(f"{path}: unknown method {ckpt.get('method')!r} "
                              f"(available: {', '.join(METHODS)})")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The model of a checkpoint (CPU, eval mode) and the checkpoint dict."""
    ckpt = _read_checkpoint(path)
    with torch.random.fork_rng(devices=[]):
        model = build_model(ckpt["method"], ckpt["config"]["model"])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['method']!r} model "
                              f"({str(e)[:200]})") from None
    model.eval()
    return model, ckpt


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold a binary checkpoint into a deployment bundle file; returns its path.

    The bundle's model metadata gains ``decode`` (box prior, score rule) and ``training``
    (method, epoch). Raises :class:`CheckpointError` for a non-exportable (``fp``) method.
    """
    ckpt = _read_checkpoint(path)
    method = METHODS[ckpt["method"]]
    if not method.exportable:
        raise CheckpointError(
            f"{path}: a {method.name!r} checkpoint ({method.description}) cannot be exported: "
            f"only binary methods ({', '.join(m.name for m in METHODS.values() if m.exportable)})"
            " fold into a bundle")
    model, ckpt = load_checkpoint(path)
    bundle: Bundle = model.export_bundle()
    bundle.model["decode"] = {
        "prior": float(ckpt["config"].get("prior", BOX_PRIOR)),
        "box": "centre (cell + sigmoid(tx, ty)) * grid_stride, size prior * exp(tw, th)",
        "score": "sigmoid(objectness) * max softmax(class logits)"}
    bundle.model["training"] = {"method": ckpt["method"], "epoch": int(ckpt["epoch"]),
                                "seed": int(ckpt["config"]["seed"])}
    return bundle.save(out)


def load_teacher(path: str | os.PathLike, model_kwargs: dict) -> RealDetector:
    """The frozen ``fp`` teacher of a distillation run (eval mode, no gradients).

    Raises :class:`CheckpointError` unless ``path`` is an ``fp`` checkpoint of the student's
    topology (widths, pools, image size, classes).
    """
    teacher, ckpt = load_checkpoint(path)
    if ckpt["method"] != "fp":
        raise CheckpointError(f"{path}: the teacher must be an 'fp' checkpoint, not "
                              f"{ckpt['method']!r}")
    theirs = ckpt["config"]["model"]
    for key in ("widths", "pools", "image_size", "num_classes", "in_channels"):
        if list(np.atleast_1d(theirs.get(key))) != list(np.atleast_1d(model_kwargs.get(key))):
            raise CheckpointError(f"{path}: the teacher's {key} {theirs.get(key)!r} does not "
                                  f"match the student's {model_kwargs.get(key)!r}")
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


#: Initial objectness probability of every cell (RetinaNet-style prior on the head bias), so
#: that the first steps are not spent pushing the ~60 empty cells per image down.
OBJECTNESS_PRIOR = 0.04


def _init_objectness(model: nn.Module) -> None:
    with torch.no_grad():
        model.head.bias[0] = -math.log((1 - OBJECTNESS_PRIOR) / OBJECTNESS_PRIOR)


def _pixels(dataset) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(dataset.images)).to(torch.float32)[:, None]


def _targets(dataset) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.from_numpy(a.boxes), "labels": torch.from_numpy(a.labels)}
            for a in dataset.annotations]


def train(method: str | None = None, epochs: int | None = None, batch_size: int = 32,
          lr: float = 2e-3, seed: int = 0, image_size: int = 64, train_count: int = 2048,
          val_count: int = 256, out_dir: str | os.PathLike = "runs/train",
          device: str | torch.device = "cpu", resume: str | os.PathLike | None = None, *,
          weight_decay: float = 1e-4, progress: bool | None = None,
          log: Callable[[str], None] | None = None, threads: int | None = None,
          teacher: str | os.PathLike | None = None, options: dict | None = None,
          ) -> TrainResult:
    """Train ``method`` on generated DigitScenes and write a checkpoint after every epoch.

    ``method`` defaults to ``"plain"`` (or the checkpoint's when resuming); ``epochs`` is
    the total number of epochs (default 10, or the checkpoint's). The data are
    ``make_digitscenes("train", count=train_count, seed=seed)`` and ``("val", val_count,
    seed)``; the optimizer is AdamW with a per-step cosine decay of ``lr`` to 0 over all
    epochs. After each epoch ``out_dir/epoch_NNN.pt`` and ``out_dir/last.pt`` hold the
    model, optimizer, epoch, step, history and config; the history entry has the mean train
    losses and, with ``val_count > 0``, the validation mAP@0.5 and mAP@[.5:.95].

    ``resume``: continue from a checkpoint; the data and optimizer settings come from it
    (the arguments for those are ignored), ``epochs`` may extend the run (the cosine
    schedule is then recomputed over the new total, so only a resume with the same total
    reproduces an uninterrupted run exactly).

    ``threads``: torch CPU threads for the run (restored afterwards); on a shared machine
    ``1`` is often much faster than oversubscribed cores. Bit-exact reproduction (e.g. of
    a resumed run) needs the same thread count.

    ``teacher``: the ``fp`` checkpoint a distillation method (``lws``, ``ida``, ``rbcn``)
    learns from (required for those, refused for the others; a resumed run reloads the
    stored path).
    ``options``: the method's options (loss weights, …), overriding its defaults
    (``Method.defaults``; unknown names raise :class:`TrainingError`).
    The history entries of a distillation run gain the mean weighted terms
    (``train_ang``, …) and ``train_loss`` is then the total.
    """
    if threads is not None:
        if threads < 1:
            raise TrainingError(f"threads must be positive, not {threads}")
        kwargs = {k: v for k, v in locals().items() if k != "threads"}
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train(**kwargs)
        finally:
            torch.set_num_threads(previous)
    dev = _device(device)
    out_dir = Path(out_dir)
    ckpt = None
    if resume is not None:
        ckpt = _read_checkpoint(resume)
        if method is not None and method != ckpt["method"]:
            raise CheckpointError(f"{resume}: is a {ckpt['method']!r} checkpoint, not "
                                  f"{method!r}")
        config = TrainConfig(**ckpt["config"])
        if epochs is not None:
            config.epochs = epochs
        if teacher is not None:          # the teacher file moved since the run started
            config.teacher = str(teacher)
    else:
        chosen = _method(method or "plain")
        if chosen.needs_teacher and teacher is None:
            raise TrainingError(f"method {chosen.name!r} distils from a real-valued teacher: "
                                "give teacher= (an 'fp' checkpoint)")
        if not chosen.needs_teacher and teacher is not None:
            raise TrainingError(f"method {chosen.name!r} takes no teacher")
        unknown = sorted(set(options or {}) - set(chosen.defaults))
        if unknown:
            raise TrainingError(f"unknown option(s) {', '.join(unknown)} for method "
                                f"{chosen.name!r} (has: {', '.join(chosen.defaults) or 'none'})")
        config = TrainConfig(
            method=chosen.name, epochs=10 if epochs is None else epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
            image_size=image_size, train_count=train_count, val_count=val_count,
            model=_default_model_kwargs(image_size),
            teacher=None if teacher is None else str(teacher),
            options={**chosen.defaults, **(options or {})})
    spec = _method(config.method)
    for name in ("epochs", "batch_size", "train_count", "image_size"):
        if getattr(config, name) < 1:
            raise TrainingError(f"{name} must be positive, not {getattr(config, name)}")
    if config.val_count < 0:
        raise TrainingError(f"val_count must be >= 0, not {config.val_count}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.method, config.model)
        _init_objectness(model)
        if spec.prepare is not None and ckpt is None:
            spec.prepare(model, config.options)
    model.to(dev)
    teacher_model = None
    if spec.needs_teacher:
        teacher_model = load_teacher(config.teacher, config.model).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    start_epoch, step, history = 0, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])

    train_set = make_digitscenes("train", count=config.train_count,
                                 image_size=config.image_size, seed=config.seed)
    val_set = (make_digitscenes("val", count=config.val_count, image_size=config.image_size,
                                seed=config.seed) if config.val_count else None)
    pixels, targets = _pixels(train_set), _targets(train_set)
    stride = model.stride
    grid = (config.image_size // stride, config.image_size // stride)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "last.pt"
    if ckpt is not None and start_epoch >= config.epochs:
        model.eval()
        return TrainResult(model.cpu(), Path(resume), history, config)

    from .evaluate import evaluate_predictions, predict_model

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_set),
                               generator=torch.Generator().manual_seed(config.seed * 100_003
                                                                       + epoch))
        sums = {"loss": 0.0, "obj": 0.0, "box": 0.0, "cls": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"{config.method} epoch {epoch + 1}/"
                   f"{config.epochs}", unit="batch", leave=False,
                   disable=None if progress is None else not progress)
        for b in bar:
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            encoded = encode_targets([targets[i] for i in idx.tolist()], grid, stride,
                                     prior=config.prior)
            lr_now = _cosine_lr(config.lr, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            optimizer.zero_grad(set_to_none=True)
            extra = {}
            if spec.losses is None:
                head = model(pixels[idx].to(dev))
            else:
                head, extra = spec.losses(model, teacher_model, pixels[idx].to(dev),
                                          [targets[i] for i in idx.tolist()], config.options)
            loss, parts = detection_loss(head, encoded, stride, prior=config.prior,
                                         weights=LossWeights())
            for name, term in extra.items():
                loss = loss + term
                parts[name] = float(term.detach())
            parts["loss"] = float(loss.detach())
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch + 1}, step {step}: loss is "
                                    f"{float(loss.detach())}; try a lower learning rate")
            loss.backward()
            optimizer.step()
            step += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr_now:.2e}")
        bar.close()
        entry = {"epoch": epoch + 1, "lr": _cosine_lr(config.lr, step, total_steps),
                 **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()}}
        if val_set is not None:
            scores = evaluate_predictions(predict_model(model, val_set, device=dev,
                                                        prior=config.prior), val_set)
            entry.update(val_mAP50=scores["mAP50"], val_mAP=scores["mAP"])
        entry["seconds"] = time.perf_counter() - started
        history.append(entry)
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                 "method": config.method, "config": asdict(config), "epoch": epoch + 1,
                 "step": step, "history": history,
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict()}
        _save(state, out_dir / f"epoch_{epoch + 1:03d}.pt")
        _save(state, last)
        if log is not None:
            text = (f"epoch {epoch + 1}/{config.epochs}: loss {entry['train_loss']:.4f} (obj "
                    f"{entry['train_obj']:.3f} box {entry['train_box']:.3f} cls "
                    f"{entry['train_cls']:.3f}"
                    + "".join(f" {k} {entry[f'train_{k}']:.3f}" for k in extra) + ")")
            if "val_mAP50" in entry:
                text += (f", val mAP@0.5 {entry['val_mAP50']:.4f} mAP@[.5:.95] "
                         f"{entry['val_mAP']:.4f}")
            log(text + f", {entry['seconds']:.1f} s")
    model.eval()
    return TrainResult(model.cpu(), last, history, config)
