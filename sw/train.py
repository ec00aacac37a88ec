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
* ``kr`` — KR (:mod:`bitdet.sw.distill`, a documented interpretation): the ``plain``
  detector whose latent weights learn the ``fp`` teacher's aggregated parameter
  distribution through a sparsely recoded gradient.

``plain`` also takes model options (:data:`MODEL_OPTIONS`, ``train(model_options=...)``):
AQD's multi-level BN on a shared multi-level head (``levels``, trained with
:func:`multilevel_loss`, evaluated with :func:`predict_levels`; not exportable) and its
learned-step n-bit host weights (``host_bits``), QuantNet's meta-quantizer (``binarizer``),
DupNet's duplicated weight channels / input maps (``dup``, ``dup_input``) and IFQ-Net's
fixed-point host layers (``ifq``, integer path :func:`run_bundle_fixed_point`).

Architectures (:data:`ARCHS`, ``train(arch=...)``, ``bitdet train --arch``): ``chain`` (the
models above) and ``residual``, the contract-v2 residual detector
(:class:`bitdet.sw.models.ResidualBinaryDetector`: n-bit activations, shortcuts; a
format-2 bundle) for every method (``fp``: :class:`bitdet.sw.models.ResidualRealDetector`)
and the model options but ``levels`` and ``raw_last`` (:data:`RESIDUAL_MODEL_OPTIONS`),
through the same loop and checkpoints.
:func:`train_residual_detector` is that run without checkpoint files and
:func:`tiny_residual_detector` its small seeded run with the exported version-2 bundle.

More methods plug in by adding a :class:`Method` to :data:`METHODS`. docs/training.md
describes the head, loss and commands, docs/methods.md the distillation methods.

Training is deterministic on the CPU for a given seed (same torch build and thread count):
the model is initialised under ``torch.manual_seed(seed)`` (the caller's RNG state is left
alone), the data set is generated from the seed, and each epoch's shuffle comes from a
generator seeded with ``(seed, epoch)``, so resuming from a checkpoint continues exactly as
an uninterrupted run would.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bitdet.core.bundle import MANIFEST, Bundle

from . import distributed
from .data import DIGIT_CLASSES, make_digitscenes
from .detection import BOX_PRIOR, LossWeights, decode, detection_loss, encode_targets, nms
from .distill import (
    BIDET_DEFAULTS,
    IDA_DEFAULTS,
    KR_DEFAULTS,
    LWS_DEFAULTS,
    RBCN_DEFAULTS,
    BiDetDetector,
    IDaDetector,
    LWSDetector,
    RBCNDetector,
    ResidualBiDetDetector,
    ResidualIDaDetector,
    ResidualLWSDetector,
    ResidualRBCNDetector,
    bidet_losses,
    ida_check_options,
    ida_losses,
    kr_check_options,
    kr_losses,
    lws_losses,
    lws_prepare,
    rbcn_losses,
)
from .models import (
    BINARIZERS,
    BinaryConv2d,
    BinaryDetector,
    RealDetector,
    ResidualBinaryDetector,
    ResidualRealDetector,
)

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "METHODS",
    "MODEL_OPTIONS",
    "MODEL_OPTION_METHODS",
    "QUANTNET_DEFAULTS",
    "RESIDUAL_MODEL_OPTIONS",
    "RESIDUAL_OPTIONS",
    "CheckpointError",
    "DistillLosses",
    "Method",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "best_epoch",
    "build_model",
    "export_checkpoint",
    "load_checkpoint",
    "load_teacher",
    "multilevel_loss",
    "predict_bundle_fixed_point",
    "predict_levels",
    "run_bundle_fixed_point",
    "tiny_residual_detector",
    "train",
    "train_residual_detector",
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
    #: ``check(options)``: raises ``ValueError`` for option values that cannot work
    check: Callable[[dict], None] | None = None
    #: the model class of the residual architecture (``arch="residual"``; None: the method
    #: refuses it)
    residual_class: type[nn.Module] | None = None


#: Training methods by name. Add an entry to make a new method available to
#: :func:`train` and ``bitdet train --method``.
METHODS: dict[str, Method] = {
    "plain": Method("plain", "BinaryDetector as is: XNOR-Net α, ApproxSign, RSign biases",
                    BinaryDetector, exportable=True, residual_class=ResidualBinaryDetector),
    "fp": Method("fp", "real-valued teacher (float conv + BN + ReLU), same topology",
                 RealDetector, exportable=False, residual_class=ResidualRealDetector),
    "lws": Method("lws", "LWS-Det: DBS-searched weights, learned α, angular + amplitude "
                  "losses against an fp teacher (--teacher)", LWSDetector, exportable=True,
                  losses=lws_losses, defaults=LWS_DEFAULTS, prepare=lws_prepare,
                  needs_teacher=True, residual_class=ResidualLWSDetector),
    "ida": Method("ida", "IDa-Det: max-discrepancy proposal pairs, entropy distillation "
                  "from an fp teacher (--teacher)", IDaDetector, exportable=True,
                  losses=ida_losses, defaults=IDA_DEFAULTS, needs_teacher=True,
                  check=ida_check_options, residual_class=ResidualIDaDetector),
    "bidet": Method("bidet", "BiDet: information bottleneck (sampled boxes, L2 on the "
                    "pre-activations) + sparse object prior; no teacher", BiDetDetector,
                    exportable=True, losses=bidet_losses, defaults=BIDET_DEFAULTS,
                    residual_class=ResidualBiDetDetector),
    "rbcn": Method("rbcn", "RBCN: kernel approximation with a learnable matrix + adversarial "
                   "feature matching against an fp teacher (--teacher)", RBCNDetector,
                   exportable=True, losses=rbcn_losses, defaults=RBCN_DEFAULTS,
                   needs_teacher=True, residual_class=ResidualRBCNDetector),
    "kr": Method("kr", "KR (interpretation): the fp teacher's conv parameters aggregated as a "
                 "prior on the latent weights, sparsely recoded gradient (--teacher)",
                 BinaryDetector, exportable=True, losses=kr_losses, defaults=KR_DEFAULTS,
                 needs_teacher=True, check=kr_check_options,
                 residual_class=ResidualBinaryDetector),
}


#: Model options of the binary detector (``train(model_options=...)``; ``bitdet train
#: --levels --dup --dup-input --binarizer --host-bits --ifq``) and their defaults, which are the
#: ``plain`` model (docs/methods.md, "Trainer options"). Stored in ``config.model`` only when
#: they differ from the default, so a default run's checkpoint is unchanged.
MODEL_OPTIONS = {"levels": 1, "dup": 1, "dup_input": 1, "binarizer": "ste", "host_bits": None,
                 "ifq": False, "raw_last": False}
#: Methods whose model takes :data:`MODEL_OPTIONS` (the distillation methods' losses read
#: the plain layer layout).
MODEL_OPTION_METHODS = ("plain",)
#: Methods that also take ``raw_last`` (IDa-Det's losses read the last block's features,
#: which a raw last block gives as ``bn(P)``).
RAW_LAST_METHODS = ("plain", "ida")
#: Loss weights a model option brings (in ``config.options``, set with ``--method-option``):
#: ``quant`` weighs QuantNet's discretization term (``--binarizer quantnet`` only).
QUANTNET_DEFAULTS = {"quant": 0.01}


def _check_model_options(method: str, model_options: dict | None) -> dict:
    """The non-default model options, validated (:class:`TrainingError` otherwise)."""
    chosen = {}
    for name, value in (model_options or {}).items():
        if name not in MODEL_OPTIONS:
            raise TrainingError(f"unknown model option {name!r} (has: "
                                f"{', '.join(MODEL_OPTIONS)})")
        if value is not None and value != MODEL_OPTIONS[name]:
            chosen[name] = value
    if "raw_last" in chosen and method not in RAW_LAST_METHODS:
        raise TrainingError(f"raw_last is available for method(s) "
                            f"{', '.join(RAW_LAST_METHODS)}, not {method!r}")
    others = [name for name in chosen if name != "raw_last"]
    if others and method not in MODEL_OPTION_METHODS:
        raise TrainingError(f"model options ({', '.join(others)}) are available for method(s) "
                            f"{', '.join(MODEL_OPTION_METHODS)}, not {method!r}")
    if not isinstance(chosen.get("raw_last", False), bool):
        raise TrainingError(f"raw_last must be true or false, not {chosen['raw_last']!r}")
    if chosen.get("raw_last") and (chosen.get("levels", 1) > 1
                                   or chosen.get("host_bits") is not None):
        raise TrainingError("raw_last does not combine with levels > 1 or host_bits (the "
                            "raw head folds its BatchNorm into int8 weights)")
    for name in ("levels", "dup", "dup_input"):
        value = chosen.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainingError(f"{name} must be a positive integer, not {value!r}")
    if chosen.get("levels", 1) > 3:
        raise TrainingError(f"levels must be 1, 2 or 3, not {chosen['levels']!r}")
    if chosen.get("binarizer", "ste") not in BINARIZERS:
        raise TrainingError(f"binarizer must be one of {', '.join(BINARIZERS)}, not "
                            f"{chosen['binarizer']!r}")
    if not isinstance(chosen.get("ifq", False), bool):
        raise TrainingError(f"ifq must be true or false, not {chosen['ifq']!r}")
    bits = chosen.get("host_bits")
    if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 8):
        raise TrainingError(f"host_bits must be an integer from 2 to 8, not {bits!r}")
    return chosen


def _without_residual_options(model_options: dict | None) -> dict:
    """A chain run's model options without the residual ones, which must be unset (None,
    as the command line passes them)."""
    options = dict(model_options or {})
    for name in set(RESIDUAL_OPTIONS) - set(MODEL_OPTIONS):
        if options.pop(name, None) is not None:
            raise TrainingError(f"model option {name} is for arch 'residual', not 'chain'")
    return options


def _option_defaults(method: Method, model: dict) -> dict:
    """Options a run accepts: the method's, plus those its model options bring."""
    defaults = dict(method.defaults)
    if model.get("binarizer") == "quantnet":
        defaults.update(QUANTNET_DEFAULTS)
    return defaults


#: Architectures of :func:`train` (``bitdet train --arch``): ``chain``, the plain chain of
#: W1A1 binary blocks (:class:`~bitdet.sw.models.BinaryDetector` and the methods' variants;
#: exported to a format-1 bundle), and ``residual``, the contract-v2 residual detector
#: (:class:`~bitdet.sw.models.ResidualBinaryDetector`: n-bit activation maps, shortcuts;
#: exported to a format-2 graph bundle) for the methods with a ``Method.residual_class``.
ARCHS = ("chain", "residual")
#: Model options of the residual architecture and their defaults (all stored in
#: ``config.model``): the stem's and the blocks' activation bits, the residual stream's
#: bits (None: 2 when ``act_bits`` is 1 — W1A1 with 2-bit shortcuts —, else 0: each
#: block's shortcut is the map it reads) and each block's stride.
RESIDUAL_OPTIONS = {"stem_bits": 2, "act_bits": 2, "residual_bits": None,
                    "strides": (1, 2, 2, 1)}
#: The chain's model options (:data:`MODEL_OPTIONS`) that the residual architecture takes
#: too (``plain`` only, as on the chain; stored in ``config.model`` only when not default):
#: DupNet's ``dup`` / ``dup_input``, QuantNet's ``binarizer``, AQD's ``host_bits``, IFQ-Net's
#: ``ifq``. ``levels`` (AQD's multi-level head) and ``raw_last`` are refused: a format-2
#: bundle has one host head reading the last node (docs/methods.md).
RESIDUAL_MODEL_OPTIONS = ("dup", "dup_input", "binarizer", "host_bits", "ifq")
#: Bits of the residual stream that a W1A1 residual detector gets by default.
RESIDUAL_STREAM_BITS = 2


def residual_methods() -> list[str]:
    """The methods that train the residual architecture."""
    return [m.name for m in METHODS.values() if m.residual_class is not None]


def _check_bits(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4:
        raise TrainingError(f"{name} must be an integer from {low} to 4, not {value!r}")
    return value


def _check_strides(strides) -> list[int]:
    try:
        values = list(strides)
    except TypeError:
        raise TrainingError(f"strides must be a sequence of 1s and 2s, not {strides!r}") from None
    if not values or any(isinstance(v, bool) or v not in (1, 2) for v in values):
        raise TrainingError(f"strides must be a non-empty sequence of 1s and 2s, not {values!r}")
    return values


def _residual_model_kwargs(method: Method, image_size: int, model_options: dict | None,
                           widths) -> dict:
    """The constructor arguments of a new residual run, validated (:class:`TrainingError`
    otherwise)."""
    if method.residual_class is None:
        raise TrainingError(f"method {method.name!r} does not support arch 'residual' (it "
                            f"does: {', '.join(residual_methods())})")
    given = {k: v for k, v in (model_options or {}).items() if v is not None}
    chain = [k for k in given if k in MODEL_OPTIONS and k not in RESIDUAL_MODEL_OPTIONS
             and given[k] != MODEL_OPTIONS[k]]
    if chain:
        raise TrainingError(f"model option(s) {', '.join(chain)} are for arch 'chain', not "
                            "'residual' (a format-2 bundle has one host head on the last "
                            "node's levels: docs/methods.md)")
    seeds = _check_model_options(method.name, {k: given[k] for k in RESIDUAL_MODEL_OPTIONS
                                               if k in given})
    unknown = sorted(set(given) - set(RESIDUAL_OPTIONS) - set(MODEL_OPTIONS))
    if unknown:
        raise TrainingError(f"bad residual detector options: unknown model option(s) "
                            f"{', '.join(unknown)} (has: {', '.join(RESIDUAL_OPTIONS)})")
    chosen = {**RESIDUAL_OPTIONS, **{k: v for k, v in given.items() if k in RESIDUAL_OPTIONS}}
    _check_bits("stem_bits", chosen["stem_bits"], 1)
    _check_bits("act_bits", chosen["act_bits"], 1)
    if chosen["residual_bits"] is None:
        chosen["residual_bits"] = RESIDUAL_STREAM_BITS if chosen["act_bits"] == 1 else 0
    _check_bits("residual_bits", chosen["residual_bits"], 0)
    strides = _check_strides(chosen["strides"])
    values = list(DEFAULT_WIDTHS if widths is None else widths)
    if len(values) != len(strides) + 1:
        raise TrainingError(f"widths needs {len(strides) + 1} values (the stem, then "
                            f"{len(strides)} residual blocks), not {len(values)}: {values}")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WIDTH:
            raise TrainingError(f"every width must be an integer from 1 to {MAX_WIDTH}, "
                                f"not {value!r}")
    for i, (cin, cout) in enumerate(itertools.pairwise(values)):
        if cout % cin:
            raise TrainingError(f"residual block {i + 1}'s width {cout} must be a multiple of "
                                f"the width before it, {cin} (its shortcut repeats channels): "
                                f"{values}")
    step = 2 ** (1 + sum(s == 2 for s in strides))
    if image_size % step:
        raise TrainingError(f"the residual detector with strides {strides} needs an image size "
                            f"divisible by {step}, not {image_size}")
    dup = seeds.get("dup", 1)
    if any(width % dup for width in values[1:]):
        raise TrainingError(f"dup {dup} must divide every residual block's width "
                            f"{values[1:]} (each block tiles its filters dup times)")
    dup_input = seeds.get("dup_input", 1)
    if values[1] % (dup_input * values[0]):
        raise TrainingError(f"dup_input {dup_input}: the first block's width {values[1]} must "
                            f"be a multiple of dup_input × the stem's width "
                            f"{dup_input * values[0]} (its shortcut repeats the repeated map)")
    return {"num_classes": len(DIGIT_CLASSES), "in_channels": 1, "widths": values,
            "strides": strides, "image_size": image_size, "class_names": list(DIGIT_CLASSES),
            "stem_bits": chosen["stem_bits"], "act_bits": chosen["act_bits"],
            "residual_bits": chosen["residual_bits"], **seeds}


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
    #: the ``fp`` checkpoint the binary convolutions' latent weights were initialised from
    #: (``init_from``; None: random initialisation)
    init_from: str | None = None
    #: the architecture (:data:`ARCHS`); checkpoints written before it existed are ``chain``
    arch: str = "chain"


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


def build_model(method: str, model_kwargs: dict, arch: str = "chain") -> nn.Module:
    """A fresh model of ``method`` and ``arch`` from the stored constructor arguments."""
    spec = _method(method)
    if arch not in ARCHS:
        raise TrainingError(f"unknown arch {arch!r} (available: {', '.join(ARCHS)})")
    cls = spec.model_class if arch == "chain" else spec.residual_class
    if cls is None:
        raise TrainingError(f"method {method!r} does not support arch {arch!r} (it does: "
                            f"{', '.join(residual_methods())})")
    kwargs = dict(model_kwargs)
    for key in ("widths", "pools", "strides", "class_names"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)


#: Channel widths of the default detector (stem, then four binary blocks): the model that
#: fits the iCEBreaker preset. ``train(widths=...)`` / ``bitdet train --widths`` change them.
DEFAULT_WIDTHS = (16, 32, 64, 128, 128)
#: Largest width ``--widths`` accepts (the widest layer any preset runs is 512 channels).
MAX_WIDTH = 1024


def _check_widths(widths) -> tuple[int, ...]:
    """``widths`` validated: as many positive integers as :data:`DEFAULT_WIDTHS`."""
    try:
        values = tuple(widths)
    except TypeError:
        raise TrainingError(f"widths must be a sequence of integers, not {widths!r}") from None
    if len(values) != len(DEFAULT_WIDTHS):
        raise TrainingError(f"widths needs {len(DEFAULT_WIDTHS)} values (the stem, then "
                            f"{len(DEFAULT_WIDTHS) - 1} binary blocks), not {len(values)}: "
                            f"{list(values)}")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WIDTH:
            raise TrainingError(f"every width must be an integer from 1 to {MAX_WIDTH}, "
                                f"not {value!r}")
    return values


def _default_model_kwargs(image_size: int) -> dict:
    return {"num_classes": len(DIGIT_CLASSES), "in_channels": 1,
            "widths": list(DEFAULT_WIDTHS), "pools": [True, True, False, False],
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


def best_epoch(history: Sequence[dict]) -> int | None:
    """The epoch of ``history`` with the highest validation mAP@0.5 (``val_mAP50``), ties
    to the later epoch; None when no entry has one (a run with ``val_count=0``). The epoch
    that :func:`train` saves as ``best.pt``."""
    best, score = None, None
    for entry in history:
        value = entry.get("val_mAP50")
        if value is not None and (score is None or value >= score):
            best, score = int(entry["epoch"]), value
    return best


def _save(obj: dict, path: Path) -> None:
    from .files import atomic_path
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _is_bundle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return MANIFEST in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _load_failure(e: Exception) -> str:
    """The cause of a failed ``torch.load``, without torch's advice to load unsafely.

    When a file is not a tensors-only pickle, torch adds that ``weights_only=False`` "will
    likely succeed"; for a corrupt or foreign file that is wrong and unsafe, so only the
    unpickler's own finding is kept (else the first line of the message).
    """
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split("\n", 1)[0].strip()
        return f"not a tensors-only torch file: {detail}"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt / foreign files
        if _is_bundle(path):
            raise CheckpointError(f"{path}: a deployment bundle, not a training checkpoint "
                                  "(give the .pt that `bitdet train` wrote; a bundle is "
                                  "read with --bundle)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"({_load_failure(e)})") from None
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
        model = build_model(ckpt["method"], ckpt["config"]["model"],
                            ckpt["config"].get("arch", "chain"))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['method']!r} model "
                              f"({str(e)[:200]})") from None
    model.eval()
    return model, ckpt


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *,
                      force: bool = False) -> Path:
    """Fold a binary checkpoint into a deployment bundle file; returns its path.

    The bundle's model metadata gains ``decode`` (box prior, score rule) and ``training``
    (method, epoch). Raises :class:`CheckpointError` for a non-exportable (``fp``) method,
    and :class:`~bitdet.sw.files.OutputExists` when ``out`` is the checkpoint itself, or
    exists and ``force`` is not given. The bundle is written atomically.
    """
    from .files import atomic_path, check_new_file
    check_new_file(out, force=force, inputs=[path])
    ckpt = _read_checkpoint(path)
    method = METHODS[ckpt["method"]]
    if not method.exportable:
        raise CheckpointError(
            f"{path}: a {method.name!r} checkpoint ({method.description}) cannot be exported: "
            f"only binary methods ({', '.join(m.name for m in METHODS.values() if m.exportable)})"
            " fold into a bundle")
    model, ckpt = load_checkpoint(path)
    if getattr(model, "levels", 1) > 1:
        raise CheckpointError(f"{path}: a {model.levels}-level head (--levels) cannot be "
                              "exported: a bundle holds one head")
    bundle: Bundle = model.export_bundle()
    bundle.model["decode"] = {
        "prior": float(ckpt["config"].get("prior", BOX_PRIOR)),
        "box": "centre (cell + sigmoid(tx, ty)) * grid_stride, size prior * exp(tw, th)",
        "score": "sigmoid(objectness) * max softmax(class logits)"}
    bundle.model["training"] = {"method": ckpt["method"], "epoch": int(ckpt["epoch"]),
                                "seed": int(ckpt["config"]["seed"])}
    with atomic_path(out) as tmp:
        bundle.save(tmp)
    return Path(out)


def load_teacher(path: str | os.PathLike, model_kwargs: dict, *,
                 role: str = "teacher", arch: str = "chain") -> nn.Module:
    """The frozen ``fp`` teacher of a distillation run (eval mode, no gradients).

    Raises :class:`CheckpointError` unless ``path`` is an ``fp`` checkpoint of the student's
    architecture ``arch`` and topology (widths, pools or strides, image size, classes);
    ``role`` names the checkpoint in the message (``"teacher"``, or the ``--init-from``
    checkpoint).
    """
    teacher, ckpt = load_checkpoint(path)
    if ckpt["method"] != "fp":
        raise CheckpointError(f"{path}: the {role} must be an 'fp' checkpoint, not "
                              f"{ckpt['method']!r}")
    their_arch = ckpt["config"].get("arch", "chain")
    if their_arch != arch:
        raise CheckpointError(f"{path}: the {role} is an 'fp' checkpoint of arch "
                              f"{their_arch!r}, the student's arch is {arch!r}")
    theirs = ckpt["config"]["model"]
    for key in ("widths", "pools", "strides", "image_size", "num_classes", "in_channels"):
        if list(np.atleast_1d(theirs.get(key))) != list(np.atleast_1d(model_kwargs.get(key))):
            raise CheckpointError(f"{path}: the {role}'s {key} {theirs.get(key)!r} does not "
                                  f"match the student's {model_kwargs.get(key)!r}")
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


#: Standard deviation of the binary convolutions' random latent weights
#: (:class:`~bitdet.sw.models.BinaryConv2d`); :func:`init_from_teacher` rescales copied
#: weights to it, so the optimizer moves them as far relative to their size as in a random start.
LATENT_STD = 0.1


def init_from_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """Initialise a binary detector's latent convolution weights from an ``fp`` model of
    the same topology (the usual start of a binary network from its real-valued
    counterpart; :class:`~bitdet.sw.models.RealDetector` for a chain,
    :class:`~bitdet.sw.models.ResidualRealDetector` for a residual model): the stem's
    weights and every binary block's latent weights become the teacher's conv weights,
    each tensor rescaled to standard deviation :data:`LATENT_STD`; BN, sign biases,
    shortcut gains, quantizer steps and the head keep their initialisation (the teacher's
    act on ReLU features, the student's on ±1 or n-bit ones). Raises :class:`TrainingError` for a
    model whose convolutions do not hold plain latent weights of the teacher's shapes."""
    pairs = [(model.stem.weight, teacher.stem[0].weight)]
    for i, (block, t_block) in enumerate(zip(model.blocks, teacher.blocks, strict=True)):
        conv = block.conv
        if not isinstance(conv, BinaryConv2d) or conv.binarizer != "ste" or conv.dup != 1:
            raise TrainingError(
                "init_from copies teacher weights into sign-of-latent-weight convolutions; "
                f"binary block {i + 1} is a {type(conv).__name__}"
                + (f" (binarizer {conv.binarizer!r}, dup {conv.dup})"
                   if isinstance(conv, BinaryConv2d) else ""))
        t_conv = t_block.conv if hasattr(t_block, "conv") else t_block[0]
        pairs.append((conv.weight, t_conv.weight))
    with torch.no_grad():
        for mine, theirs in pairs:
            if mine.shape != theirs.shape:
                raise TrainingError(f"init_from: teacher weights {tuple(theirs.shape)} do not "
                                    f"fit the student's {tuple(mine.shape)}")
            mine.copy_(theirs / theirs.std().clamp(min=1e-12) * LATENT_STD)


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


def _discretization_error(model: nn.Module) -> torch.Tensor:
    """QuantNet's discretization term, averaged over the binary convolutions."""
    convs = [m for m in model.modules()
             if isinstance(m, BinaryConv2d) and m.binarizer == "quantnet"]
    return sum(c.discretization_error() for c in convs) / len(convs)


def _box_level(box, prior: float, levels: int) -> int:
    """Pyramid level of a box: the level whose prior ``prior · 2**l`` is nearest to the
    box's size ``sqrt(w·h)`` on a log scale (boundaries at ``prior · 2**(l + ½)``)."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    size = max(w * h, 1e-12) ** 0.5
    return min(max(math.floor(math.log2(size / prior) + 0.5), 0), levels - 1)


def multilevel_loss(maps: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                    strides: list[int], *, prior: float = BOX_PRIOR,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Detection loss of a multi-level head (``levels ≥ 2``).

    Each ground-truth box is assigned to one level by size (:func:`_box_level`); level
    ``l`` is encoded and scored like a single-level head with stride ``strides[l]`` and box
    prior ``prior · 2**l`` (:func:`detection_loss`, normalised by its ``n_l`` responsible
    cells) and the levels are summed with weights ``max(n_l, 1) / max(Σ n, 1)``, so every
    term is normalised by the batch's total number of responsible cells (FCOS-style).
    """
    levels = len(maps)
    split = [[] for _ in range(levels)]
    for target in targets:
        boxes = torch.as_tensor(target["boxes"]).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).reshape(-1)
        chosen = torch.tensor([_box_level(b, prior, levels) for b in boxes.tolist()],
                              dtype=torch.int64)
        for level in range(levels):
            keep = chosen == level
            split[level].append({"boxes": boxes[keep], "labels": labels[keep]})
    encoded = [encode_targets(split[level], tuple(maps[level].shape[2:]), strides[level],
                              prior=prior * 2 ** level) for level in range(levels)]
    counts = [int(e.positive.sum()) for e in encoded]
    total = max(sum(counts), 1)
    loss, parts = maps[0].new_zeros(()), {"obj": 0.0, "box": 0.0, "cls": 0.0}
    for level, (head, enc) in enumerate(zip(maps, encoded, strict=True)):
        part_loss, part = detection_loss(head, enc, strides[level], prior=prior * 2 ** level,
                                         weights=LossWeights())
        weight = max(counts[level], 1) / total
        loss = loss + weight * part_loss
        for key in parts:
            parts[key] += weight * part[key]
    parts["loss"] = float(loss.detach())
    return loss, parts


@torch.no_grad()
def predict_levels(model: nn.Module, dataset, *, batch_size: int = 64,
                   device: str | torch.device = "cpu", prior: float = BOX_PRIOR,
                   max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
    """Detections of a multi-level model (eval mode): every level decoded with its stride
    and prior as :func:`bitdet.sw.evaluate.predict_model` decodes one map, the levels'
    detections pooled and passed through class-aware NMS (IoU 0.5) again, at most
    ``max_detections`` per image, highest score first."""
    from .evaluate import EVAL_IOU_THRESHOLD, decode_settings
    model.eval()
    images = np.asarray(dataset.images)
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        pixels = pixels.to(torch.float32)[:, None]
        maps = model(pixels.to(device))
        per_level = [decode(head.cpu(), image_size=tuple(pixels.shape[2:]),
                            **decode_settings(stride, prior * 2 ** level))
                     for level, (head, stride) in enumerate(zip(maps, model.level_strides,
                                                                strict=True))]
        for i in range(len(pixels)):
            boxes = torch.cat([dets[i]["boxes"] for dets in per_level])
            scores = torch.cat([dets[i]["scores"] for dets in per_level])
            labels = torch.cat([dets[i]["labels"] for dets in per_level])
            keep = nms(boxes, scores, labels, EVAL_IOU_THRESHOLD)[:max_detections]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def run_bundle_fixed_point(bundle: Bundle, pixels: torch.Tensor,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """IFQ-Net's integer evaluation path of a bundle whose head scales are powers of two
    (``--ifq``): the stem's integer conv and thresholds, the golden binary layers and the
    head's integer conv plus integer bias, in int64 only. Returns ``(acc, frac_bits)``:
    the head map is ``acc · 2^−frac_bits`` (per channel), which equals
    :func:`bitdet.sw.evaluate.run_bundle` exactly. Raises :class:`ValueError` for a head
    whose scales are not powers of two.

    A format-2 (residual) bundle runs its stem's levels through the golden graph; the head
    reads the last node's levels (0 … 2ⁿ − 1, or ±1 for one bit), as :meth:`Bundle.head`.
    """
    from bitdet.core.golden import fixed_point_conv2d

    head = bundle.host_layer("head")
    scale = torch.from_numpy(head.arrays["scale"]).to(torch.float64)
    frac = -torch.log2(scale)
    if not bool(((frac == torch.round(frac)) & (scale > 0)).all()):
        raise ValueError("the bundle's head scales are not powers of two: it was not trained "
                         "with --ifq (fixed point)")
    stem = bundle.stem(pixels)
    if bundle.uses_v2():
        bits = bundle.run_binary(stem.to(torch.int32))[-1].to(torch.int64)
        if bundle.output_bits() == 1:
            bits = bits * 2 - 1
    else:
        bits = bundle.run_binary(stem.to(torch.float32) * 2 - 1)[-1].to(torch.int64) * 2 - 1
    weight = torch.from_numpy(head.arrays["weight"].astype(np.int64))
    acc = fixed_point_conv2d(bits, weight, stride=head.stride, padding=head.padding,
                             pad_value=0)
    acc = acc + torch.from_numpy(head.arrays["bias"].astype(np.int64)).reshape(1, -1, 1, 1)
    return acc, frac.to(torch.int64)


def predict_bundle_fixed_point(bundle: Bundle, dataset, *, batch_size: int = 64,
                               ) -> list[dict[str, torch.Tensor]]:
    """Detections of an ``--ifq`` bundle through :func:`run_bundle_fixed_point` (the head
    map rebuilt as ``acc · 2^−f`` only for decoding), decoded like
    :func:`bitdet.sw.evaluate.predict_bundle`."""
    from .evaluate import bundle_decode_settings
    settings = bundle_decode_settings(bundle)
    images = np.asarray(dataset.images)
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        pixels = pixels.to(torch.float32)[:, None]
        acc, frac = run_bundle_fixed_point(bundle, pixels)
        head = torch.ldexp(acc.to(torch.float64), -frac.reshape(1, -1, 1, 1)).to(torch.float32)
        out += decode(head, image_size=tuple(pixels.shape[2:]), **settings)
    return out


#: The settings of a new run that ``train`` fills in when not given; on resume each given
#: one must equal the checkpoint's (``TrainConfig`` field, default, the CLI's option).
RUN_DEFAULTS = {"batch_size": (32, "--batch-size"), "lr": (2e-3, "--lr"),
                "seed": (0, "--seed"), "train_count": (2048, "--train-images"),
                "val_count": (256, "--val-images"), "image_size": (64, "image_size"),
                "weight_decay": (1e-4, "weight_decay")}
DEFAULT_OUT = "runs/train"


def _check_run_folder(out_dir: Path, *, force: bool, resume_epoch: int | None = None) -> None:
    """Refuse to mix runs: a new run's folder must be missing or empty; a resumed run in
    its own folder must not overwrite checkpoints of epochs after the one it resumes from
    (unless ``force``)."""
    from .files import OutputExists, check_new_folder
    if resume_epoch is None:
        check_new_folder(out_dir, force=force, what="run")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(f"{out_dir}: is a file, not a folder")
    later = sorted(p.name for p in out_dir.glob("epoch_*.pt")
                   if p.stem[6:].isdigit() and int(p.stem[6:]) > resume_epoch)
    if later and not force:
        raise OutputExists(f"{out_dir}: resuming from epoch {resume_epoch} would overwrite "
                           f"{', '.join(later)} (pass --force, or --out a new folder)")


def _check_world(world: distributed.World | None, config: TrainConfig) -> tuple[int, int]:
    """``(processes, batch per process)``; a multi-process run splits ``batch_size``."""
    if world is None:
        return 1, config.batch_size
    if config.batch_size % world.size:
        raise TrainingError(f"batch_size {config.batch_size} (the effective batch) must be "
                            f"a multiple of the {world.size} processes")
    if config.train_count < world.size:
        raise TrainingError(f"train_count {config.train_count} is less than the "
                            f"{world.size} processes")
    if config.seed < 0:
        raise TrainingError(f"seed must be >= 0 for multi-process training, not {config.seed}")
    return world.size, config.batch_size // world.size


def _step_loss(teacher: nn.Module | None, spec: Method, config: TrainConfig, quantnet: bool,
               model: nn.Module, pixels: torch.Tensor, targets: list[dict[str, torch.Tensor]],
               encoded) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """One batch's loss (detection loss plus the method's extra terms), its parts as floats
    and the extra terms; a multi-process run calls it inside DistributedDataParallel."""
    extra = {}
    if spec.losses is None:
        head = model(pixels)
    else:
        head, extra = spec.losses(model, teacher, pixels, targets, config.options)
    if isinstance(head, list):
        loss, parts = multilevel_loss(head, targets, model.level_strides, prior=config.prior)
    else:
        loss, parts = detection_loss(head, encoded, model.stride, prior=config.prior,
                                     weights=LossWeights())
    if quantnet:
        extra["quant"] = config.options["quant"] * _discretization_error(model)
    for name, term in extra.items():
        loss = loss + term
        parts[name] = float(term.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts, extra


def train(method: str | None = None, epochs: int | None = None,  # noqa: C901
          batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
          image_size: int | None = None, train_count: int | None = None,
          val_count: int | None = None, out_dir: str | os.PathLike | None = None,
          device: str | torch.device = "cpu", resume: str | os.PathLike | None = None, *,
          weight_decay: float | None = None, progress: bool | None = None,
          log: Callable[[str], None] | None = None, threads: int | None = None,
          teacher: str | os.PathLike | None = None, options: dict | None = None,
          model_options: dict | None = None,
          widths: Sequence[int] | None = None,
          init_from: str | os.PathLike | None = None, force: bool = False,
          arch: str | None = None) -> TrainResult:
    """Train ``method`` on generated DigitScenes and write a checkpoint after every epoch.

    ``method`` defaults to ``"plain"`` (or the checkpoint's when resuming); ``epochs`` is
    the total number of epochs (default 10, or the checkpoint's). The data are
    ``make_digitscenes("train", count=train_count, seed=seed)`` and ``("val", val_count,
    seed)``; the optimizer is AdamW with a per-step cosine decay of ``lr`` to 0 over all
    epochs. After each epoch ``out_dir/epoch_NNN.pt`` and ``out_dir/last.pt`` hold the
    model, optimizer, epoch, step, history and config; the history entry has the mean train
    losses and, with ``val_count > 0``, the validation mAP@0.5 and mAP@[.5:.95]. With
    validation, ``out_dir/best.pt`` is also written whenever the epoch's mAP@0.5 is at least
    every earlier entry's (:func:`best_epoch`: ties go to the later epoch); a resumed run
    writes it only when one of its new epochs is the history's best.

    ``batch_size``, ``lr``, ``seed``, ``image_size``, ``train_count``, ``val_count`` and
    ``weight_decay`` default to :data:`RUN_DEFAULTS` for a new run.

    ``out_dir``: the run's folder (default ``runs/train``; with ``resume``, the checkpoint's
    own folder). A new run refuses a folder that already holds files, and a resumed run
    refuses to overwrite checkpoints of later epochs than the one it resumes from
    (:class:`~bitdet.sw.files.OutputExists`), unless ``force``.

    ``resume``: continue from a checkpoint; the data and optimizer settings come from it
    (giving a different value for one of them raises :class:`TrainingError` naming it;
    equal ones are accepted), ``epochs`` may extend the run (the cosine
    schedule is then recomputed over the new total, so only a resume with the same total
    reproduces an uninterrupted run exactly).

    ``threads``: torch CPU threads for the run (restored afterwards); on a shared machine
    ``1`` is often much faster than oversubscribed cores. Bit-exact reproduction (e.g. of
    a resumed run) needs the same thread count.

    ``teacher``: the ``fp`` checkpoint a distillation method (``lws``, ``ida``, ``rbcn``, ``kr``)
    learns from (required for those, refused for the others; a resumed run reloads the
    stored path).
    ``options``: the method's options (loss weights, …), overriding its defaults
    (``Method.defaults``, plus :data:`QUANTNET_DEFAULTS` with the QuantNet binarizer;
    unknown names raise :class:`TrainingError`).
    ``model_options``: :data:`MODEL_OPTIONS` (``levels``, ``dup``, ``dup_input``,
    ``binarizer``, ``host_bits``, ``ifq``) for the ``plain`` model, and ``raw_last`` for
    ``plain`` and ``ida``; docs/methods.md.
    ``widths``: the detector's channel widths, the stem's first, then each of the four
    binary blocks' (default :data:`DEFAULT_WIDTHS`, the model sized for the iCEBreaker
    preset); for every method, the ``fp`` teacher included (a distillation run's teacher
    must have the student's widths).
    ``init_from``: an ``fp`` checkpoint of the student's topology (typically the teacher)
    whose conv weights initialise the binary model (:func:`init_from_teacher`; new runs of
    the ``plain``, ``ida``, ``bidet`` and ``rbcn`` methods; not with ``dup`` or the QuantNet
    binarizer). For an ``fp`` run it is a warm start: the new run begins with all of that
    checkpoint's weights and BN statistics (its optimizer state and schedule start afresh).
    On ``resume`` the run's ``options``, model options and widths are the checkpoint's:
    giving different values raises :class:`TrainingError` (equal ones are accepted).
    The history entries of a distillation run gain the mean weighted terms
    (``train_ang``, …) and ``train_loss`` is then the total.

    ``arch``: :data:`ARCHS`, ``"chain"`` by default (or the checkpoint's when resuming).
    ``"residual"`` trains the contract-v2 residual detector
    (:class:`~bitdet.sw.models.ResidualBinaryDetector`, exported to a format-2 bundle; its
    ``fp`` counterpart :class:`~bitdet.sw.models.ResidualRealDetector`) with the methods
    that have a ``Method.residual_class`` (every method) through this same loop; its
    ``model_options`` are :data:`RESIDUAL_OPTIONS` (``act_bits``, ``residual_bits``,
    ``stem_bits``, ``strides``) and, for ``plain``, :data:`RESIDUAL_MODEL_OPTIONS`
    (``dup``, ``dup_input``, ``binarizer``, ``host_bits``, ``ifq``), and ``widths`` has one
    value per block after the stem's (each a multiple of the one before; default
    :data:`DEFAULT_WIDTHS`).
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
    world = distributed.from_env()
    if world is not None and not torch.distributed.is_initialized():
        kwargs = {k: v for k, v in locals().items() if k not in ("world", "threads")}
        with distributed.process_group(world, _device(device)):
            return train(**kwargs)
    dev = _device(device) if world is None else world.device(_device(device))
    ckpt = None
    given = {"batch_size": batch_size, "lr": lr, "seed": seed, "train_count": train_count,
             "val_count": val_count, "image_size": image_size, "weight_decay": weight_decay}
    if resume is not None:
        ckpt = _read_checkpoint(resume)
        if method is not None and method != ckpt["method"]:
            raise CheckpointError(f"{resume}: is a {ckpt['method']!r} checkpoint, not "
                                  f"{method!r}")
        config = TrainConfig(**ckpt["config"])
        for name, value in given.items():
            if value is not None and value != getattr(config, name):
                option = RUN_DEFAULTS[name][1]
                raise TrainingError(f"{resume}: a resumed run keeps the checkpoint's {option} "
                                    f"{getattr(config, name)!r}; cannot change it to {value!r} "
                                    "(start a new run instead)")
        out_dir = Path(resume).parent if out_dir is None else Path(out_dir)
        same = out_dir.resolve() == Path(resume).resolve().parent
        resume_epoch = int(ckpt["epoch"]) if same else None
        for name, value in (options or {}).items():
            if config.options.get(name) != value:
                raise TrainingError(
                    f"{resume}: a resumed run keeps the checkpoint's options "
                    f"({', '.join(f'{k}={v}' for k, v in config.options.items()) or 'none'}); "
                    f"cannot change {name} to {value} (start a new run instead)")
        for name, value in (model_options or {}).items():
            if value is not None and config.model.get(name, MODEL_OPTIONS.get(name)) != value:
                raise TrainingError(f"{resume}: a resumed run keeps the checkpoint's model; "
                                    f"cannot change {name} to {value!r}")
        if widths is not None and list(widths) != list(config.model["widths"]):
            raise TrainingError(f"{resume}: a resumed run keeps the checkpoint's widths "
                                f"{list(config.model['widths'])}; cannot change them to "
                                f"{list(widths)}")
        if init_from is not None:
            raise TrainingError(f"{resume}: init_from applies to a new run only (a resumed "
                                "run continues from the checkpoint's weights)")
        if arch is not None and arch != config.arch:
            raise TrainingError(f"{resume}: a resumed run keeps the checkpoint's arch "
                                f"{config.arch!r}; cannot change it to {arch!r}")
        if epochs is not None:
            config.epochs = epochs
        if teacher is not None:          # the teacher file moved since the run started
            config.teacher = str(teacher)
    else:
        given = {k: RUN_DEFAULTS[k][0] if v is None else v for k, v in given.items()}
        batch_size, lr, seed = given["batch_size"], given["lr"], given["seed"]
        train_count, val_count = given["train_count"], given["val_count"]
        image_size, weight_decay = given["image_size"], given["weight_decay"]
        out_dir = Path(DEFAULT_OUT if out_dir is None else out_dir)
        resume_epoch = None
        chosen = _method(method or "plain")
        if chosen.needs_teacher and teacher is None:
            raise TrainingError(f"method {chosen.name!r} distils from a real-valued teacher: "
                                "give teacher= (an 'fp' checkpoint)")
        if not chosen.needs_teacher and teacher is not None:
            raise TrainingError(f"method {chosen.name!r} takes no teacher")
        arch = "chain" if arch is None else arch
        if arch not in ARCHS:
            raise TrainingError(f"unknown arch {arch!r} (available: {', '.join(ARCHS)})")
        if arch == "residual":
            model_kwargs = _residual_model_kwargs(chosen, image_size, model_options, widths)
        else:
            model_kwargs = {**_default_model_kwargs(image_size),
                            **_check_model_options(chosen.name,
                                                   _without_residual_options(model_options))}
            if widths is not None:
                model_kwargs["widths"] = list(_check_widths(widths))
        defaults = _option_defaults(chosen, model_kwargs)
        unknown = sorted(set(options or {}) - set(defaults))
        if unknown:
            raise TrainingError(f"unknown option(s) {', '.join(unknown)} for method "
                                f"{chosen.name!r} (has: {', '.join(defaults) or 'none'})")
        config = TrainConfig(
            method=chosen.name, epochs=10 if epochs is None else epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
            image_size=image_size, train_count=train_count, val_count=val_count,
            model=model_kwargs,
            teacher=None if teacher is None else str(teacher),
            options={**defaults, **(options or {})},
            init_from=None if init_from is None else str(init_from), arch=arch)
    spec = _method(config.method)
    if spec.check is not None:
        try:
            spec.check(config.options)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    for name in ("epochs", "batch_size", "train_count", "image_size"):
        if getattr(config, name) < 1:
            raise TrainingError(f"{name} must be positive, not {getattr(config, name)}")
    if config.val_count < 0:
        raise TrainingError(f"val_count must be >= 0, not {config.val_count}")
    per_rank = _check_world(world, config)
    if world is not None and not world.main:
        log, progress = None, False

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.method, config.model, config.arch)
        _init_objectness(model)
        if spec.prepare is not None and ckpt is None:
            spec.prepare(model, config.options)
    if ckpt is None and config.init_from is not None:
        source = load_teacher(config.init_from, config.model, role="--init-from checkpoint",
                              arch=config.arch)
        if spec.exportable:
            init_from_teacher(model, source)
        else:       # fp: a warm start, every weight and BN statistic of the checkpoint
            model.load_state_dict(source.state_dict())
    model.to(dev)
    teacher_model = None
    if spec.needs_teacher:
        teacher_model = load_teacher(config.teacher, config.model, arch=config.arch).to(dev)
    if world is None:
        _check_run_folder(out_dir, force=force, resume_epoch=resume_epoch)
    else:       # rank 0 checks, every rank raises its refusal
        distributed.agree(world, lambda: _check_run_folder(out_dir, force=force,
                                                           resume_epoch=resume_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    start_epoch, step, history = 0, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])

    if world is None:
        train_set = make_digitscenes("train", count=config.train_count,
                                     image_size=config.image_size, seed=config.seed)
        pixels, targets = _pixels(train_set), _targets(train_set)
    else:       # this rank's disjoint share of the scenes (sw/distributed.py)
        pixels, targets = distributed.scene_shard(config.train_count, config.image_size,
                                                  config.seed, world)
    val_set = (make_digitscenes("val", count=config.val_count, image_size=config.image_size,
                                seed=config.seed)
               if config.val_count and (world is None or world.main) else None)
    stride = model.stride
    quantnet = config.model.get("binarizer") == "quantnet"
    grid = (config.image_size // stride, config.image_size // stride)
    local = math.ceil(config.train_count / per_rank[0])      # the largest shard
    steps_per_epoch = math.ceil(local / per_rank[1])
    total_steps = steps_per_epoch * config.epochs
    if world is None or world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "last.pt"
    if ckpt is not None and start_epoch >= config.epochs:
        model.eval()
        return TrainResult(model.cpu(), Path(resume), history, config)
    step_loss = functools.partial(_step_loss, teacher_model, spec, config, quantnet)
    # a distillation method's losses (proposals, detections) or raw_last's unused sign bias
    # may leave parameters without a gradient; plain / fp use every parameter in every step
    step_loss = (functools.partial(step_loss, model) if world is None
                 else distributed.wrap(model, step_loss, dev, find_unused=spec.losses is not None
                                       or bool(config.model.get("raw_last"))))
    if world is not None and log is not None:
        log(f"{world.size} processes ({torch.distributed.get_backend()}), "
            f"{len(targets)} training images on rank 0 (of {config.train_count}); batch "
            f"{per_rank[1]} per process, effective batch {config.batch_size}; lr "
            f"{config.lr:g} (not scaled); {steps_per_epoch} steps per epoch")

    from .evaluate import evaluate_predictions, predict_model

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(targets),
                               generator=torch.Generator().manual_seed(config.seed * 100_003
                                                                       + epoch))
        sums = {"loss": 0.0, "obj": 0.0, "box": 0.0, "cls": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"{config.method} epoch {epoch + 1}/"
                   f"{config.epochs}", unit="batch", leave=False,
                   disable=None if progress is None else not progress)
        for b in bar:
            if world is None:
                idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            else:       # a short shard wraps around (every rank takes the same steps)
                idx = order[torch.arange(b * per_rank[1], (b + 1) * per_rank[1]) % len(order)]
            encoded = encode_targets([targets[i] for i in idx.tolist()], grid, stride,
                                     prior=config.prior)
            lr_now = _cosine_lr(config.lr, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            optimizer.zero_grad(set_to_none=True)
            if quantnet:
                model.set_progress(step / max(total_steps - 1, 1))
            loss, parts, extra = step_loss(pixels[idx].to(dev),
                                           [targets[i] for i in idx.tolist()], encoded)
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
        if world is not None:       # the mean over every rank's batches
            sums = distributed.all_mean(sums, world)
        entry = {"epoch": epoch + 1, "lr": _cosine_lr(config.lr, step, total_steps),
                 **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()}}
        if world is not None and not world.main:    # rank 0 validates and writes
            history.append(distributed.broadcast(None))
            continue
        if val_set is not None:
            predict = predict_levels if getattr(model, "levels", 1) > 1 else predict_model
            scores = evaluate_predictions(predict(model, val_set, device=dev,
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
        is_best = "val_mAP50" in entry and best_epoch(history) == epoch + 1
        if is_best:
            _save(state, out_dir / "best.pt")
        if world is not None:
            distributed.broadcast(entry)
        if log is not None:
            text = (f"epoch {epoch + 1}/{config.epochs}: loss {entry['train_loss']:.4f} (obj "
                    f"{entry['train_obj']:.3f} box {entry['train_box']:.3f} cls "
                    f"{entry['train_cls']:.3f}"
                    + "".join(f" {k} {entry[f'train_{k}']:.3f}" for k in extra) + ")")
            if "val_mAP50" in entry:
                text += (f", val mAP@0.5 {entry['val_mAP50']:.4f} mAP@[.5:.95] "
                         f"{entry['val_mAP']:.4f}")
            log(text + f", {entry['seconds']:.1f} s" + (" (best.pt)" if is_best else ""))
    model.eval()
    return TrainResult(model.cpu(), last, history, config)


# -- the residual multi-bit detector (contract v2) --------------------------------------------

#: Settings of :func:`tiny_residual_detector`: a few hundred images, a few epochs, the
#: default residual body (widths 16/16/32/32/32, W1A2); a few seconds on one CPU thread.
TINY_RESIDUAL = {"epochs": 6, "train_count": 384, "batch_size": 32, "lr": 4e-3,
                 "image_size": 64, "model_options": {"widths": (16, 16, 32, 32, 32)}}


def train_residual_detector(*, epochs: int = 10, batch_size: int = 32, lr: float = 2e-3,
                            seed: int = 0, image_size: int = 64, train_count: int = 2048,
                            val_count: int = 0, weight_decay: float = 1e-4,
                            model_options: dict | None = None, method: str = "plain",
                            threads: int | None = None,
                            log: Callable[[str], None] | None = None,
                            ) -> tuple[ResidualBinaryDetector, list[dict]]:
    """:func:`train` of the residual architecture (``arch="residual"``, ``method``
    ``plain`` by default) without keeping its checkpoints: they go to a temporary folder.

    ``model_options``: the detector's ``widths`` and :data:`RESIDUAL_OPTIONS`
    (``strides``, ``stem_bits``, ``act_bits``, ``residual_bits``); classes and image size
    are DigitScenes'. ``val_count`` is 0 by default (no validation). Returns the model
    (eval mode) and the per-epoch history.
    """
    import tempfile
    options = dict(model_options or {})
    widths = options.pop("widths", None)
    with tempfile.TemporaryDirectory(prefix="bitdet-residual-") as out_dir:
        result = train(method, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       image_size=image_size, train_count=train_count, val_count=val_count,
                       out_dir=out_dir, weight_decay=weight_decay, progress=False, log=log,
                       threads=threads, model_options=options,
                       widths=None if widths is None else list(widths), arch="residual")
    return result.model, result.history


def tiny_residual_detector(seed: int = 0, *, threads: int | None = 1,
                           ) -> tuple[ResidualBinaryDetector, Bundle]:
    """A briefly trained residual W1A2 detector (:data:`TINY_RESIDUAL`, seeded; ``threads``
    torch threads, 1 by default: reproducible and fastest on a busy machine) and its
    exported version-2 bundle (with the decoding metadata :func:`export_checkpoint` adds):
    the small real model that tests run on the golden model, the emulator or a device."""
    model, history = train_residual_detector(seed=seed, threads=threads, **TINY_RESIDUAL)
    bundle = model.export_bundle()
    bundle.model["decode"] = {
        "prior": BOX_PRIOR,
        "box": "centre (cell + sigmoid(tx, ty)) * grid_stride, size prior * exp(tw, th)",
        "score": "sigmoid(objectness) * max softmax(class logits)"}
    bundle.model["training"] = {"method": "residual", "epoch": len(history), "seed": seed}
    return model, bundle
