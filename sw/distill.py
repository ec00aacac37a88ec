"""Training methods that add losses to the 1-bit detector, most of them distilling it from
the real-valued ``fp`` teacher (registered in :data:`bitdet.sw.train.METHODS`).

* ``lws`` — LWS-Det (Xu et al., "Layer-Wise Searching for 1-Bit Detectors", CVPR 2021):
  per binary layer an angular loss and an amplitude loss against the teacher's
  corresponding convolution, a differentiable binarization search (DBS) of the weights, a
  learned per-channel scale factor α, the weight loss ``‖w̃ − α∘w*‖²`` and the fine-grained
  feature imitation (FGFI, Wang et al. CVPR 2019) that the paper adds as ``L_Lim``.
* ``ida`` — IDa-Det (Xu et al., "IDa-Det: An Information Discrepancy-aware Distillation for
  1-bit Detectors", ECCV 2022): proposal pairs from teacher and student detections, the
  pairs with the largest (Mahalanobis) information discrepancy selected, an entropy
  (Gaussian negative log-likelihood) distillation loss on their features.
* ``bidet`` — BiDet (Wang et al., CVPR 2020): information bottleneck (sampled box outputs,
  L2 on the binary pre-activations) and a sparse object prior; no teacher.
* ``rbcn`` — RBCN (Liu et al., IJCAI 2019): kernel approximation through a learnable
  matrix and a discriminator matching the student's features to the teacher's.
* ``kr`` — KR (Liu et al., "Knowledge Representing", arXiv 1911.05329; only the abstract
  is readable here): a documented interpretation, the teacher's conv parameters
  aggregated per (filter, input channel) as a prior on the student's latent weights, whose
  gradient is sparsely recoded.

Every method has a residual student too (``Residual*Detector``, ``kr`` the plain
:class:`~bitdet.sw.models.ResidualBinaryDetector`) for ``--arch residual``.

The students (:class:`LWSDetector`, :class:`IDaDetector`, :class:`BiDetDetector`,
:class:`RBCNDetector`) are :class:`~bitdet.sw.models.BinaryDetector` subclasses whose extra
modules serve the losses only; in eval mode they compute exactly what their bundles compute
(same epilogue; for ``lws`` ``weight`` is the arg-max choice), so they export like
``plain``. docs/methods.md gives the equations and every choice made where a paper is
ambiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .detection import BOX_PRIOR, box_iou, decode, generalized_box_iou, head_boxes, nms
from .models import (
    PIXEL_MAX,
    BinaryDetector,
    RealDetector,
    ResidualBinaryBlock,
    ResidualBinaryDetector,
    ResidualRealBlock,
)

__all__ = [
    "BIDET_DEFAULTS",
    "IDA_DEFAULTS",
    "KR_DEFAULTS",
    "LWS_DEFAULTS",
    "RBCN_DEFAULTS",
    "BiDetDetector",
    "IDaDetector",
    "LWSDetector",
    "RBCNDetector",
    "ResidualBiDetDetector",
    "ResidualIDaDetector",
    "ResidualLWSDetector",
    "ResidualRBCNDetector",
    "SearchedBinaryConv2d",
    "bidet_losses",
    "fgfi_mask",
    "head_distillation",
    "ida_check_options",
    "ida_losses",
    "ida_selection",
    "kr_aggregate",
    "kr_check_options",
    "kr_losses",
    "lws_losses",
    "lws_prepare",
    "rbcn_losses",
]


class _SearchedSign(torch.autograd.Function):
    """``δ = β⁺ − β⁻`` → the arg-max weight (+1 on ties, as sign(0) = +1).

    Backward: the gradient of the relaxed weight ``p⁺·(+1) + p⁻·(−1) = tanh(δ/2)`` (the DARTS
    softmax mixture of the two candidates), i.e. a straight-through estimator whose forward
    is the discrete choice the device runs.
    """

    @staticmethod
    def forward(ctx, delta):
        ctx.save_for_backward(delta)
        return torch.where(delta >= 0, 1.0, -1.0).to(delta.dtype)

    @staticmethod
    def backward(ctx, grad):
        (delta,) = ctx.saved_tensors
        t = torch.tanh(delta / 2)
        return grad * 0.5 * (1 - t * t)


class SearchedBinaryConv2d(nn.Module):
    """Binary convolution whose ±1 weights come from a differentiable binarization search.

    Every weight has two architecture logits ``beta[0]`` (candidate −1) and ``beta[1]``
    (candidate +1), ``p = softmax(beta)`` over the pair; the weight used is the arg-max
    candidate (forward) with the gradient of the relaxed ``p⁺ − p⁻`` (backward). ``scale``
    is the learned per-output-channel factor α (not ``mean |W|``).

    Same interface as :class:`bitdet.sw.models.BinaryConv2d` (``weight``, ``alpha()``,
    ``dot(x)``, ``stride``, ``padding``, ``pad_value``), so :class:`BinaryBlock` and its
    export work unchanged: ``weight`` is ``β⁺ − β⁻``, whose sign is the arg-max choice.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
                 padding: int = 0, pad_value: int = -1):
        super().__init__()
        if pad_value not in (-1, 1):
            raise ValueError(f"pad_value must be -1 or +1, not {pad_value!r}")
        self.stride, self.padding, self.pad_value = stride, padding, pad_value
        # The paper's training algorithm: β and α drawn from N(0, 1). α is divided by K:
        # α·(â⊙w*) with |â⊙w*| ~ √K would otherwise start ~√K times larger than the
        # teacher's outputs and the amplitude loss (~10³) would swamp every other term.
        k = in_channels * kernel * kernel
        self.beta = nn.Parameter(torch.randn(2, out_channels, in_channels, kernel, kernel))
        self.scale = nn.Parameter(torch.randn(out_channels) / k)

    @property
    def weight(self) -> torch.Tensor:
        """``β⁺ − β⁻``: its sign (≥ 0 → +1) is the searched binary weight."""
        return self.beta[1] - self.beta[0]

    def probabilities(self) -> torch.Tensor:
        """``p`` of Eq. (6.73): ``(2, O, C, kh, kw)``, candidates (−1, +1)."""
        return torch.softmax(self.beta, dim=0)

    def binary_weight(self) -> torch.Tensor:
        """The searched ±1 weights ``w*`` (differentiable through the relaxation)."""
        return _SearchedSign.apply(self.weight)

    def alpha(self) -> torch.Tensor:
        return self.scale

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding,) * 4, value=float(self.pad_value))
        return F.conv2d(x, self.binary_weight(), stride=self.stride)


class LWSDetector(BinaryDetector):
    """:class:`BinaryDetector` with DBS binary convolutions (``lws`` method).

    ``imitation`` is FGFI's 1×1 adaptation layer from the last binary features to the
    teacher's; it is used only by the training loss and is not part of the bundle.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in self.blocks:
            old = block.conv
            o, c, k, _ = old.weight.shape
            block.conv = SearchedBinaryConv2d(c, o, k, stride=old.stride, padding=old.padding,
                                              pad_value=old.pad_value)
        width = self.blocks[-1].conv.beta.shape[1]
        self.imitation = nn.Conv2d(width, width, 1)


#: Default options of ``lws``: the loss weights (``L = L_GT + Σ_i (ang·L_Ang_i + amp·L_Amp_i
#: + w·L_W_i) + lim·L_Lim``), FGFI's mask factor ``psi`` and ``init_std``, the standard
#: deviation of the initial β (the paper's N(0, 1)); docs/methods.md explains the choices.
LWS_DEFAULTS = {"ang": 10.0, "amp": 0.1, "w": 1.0, "lim": 0.01, "psi": 0.5, "init_std": 1.0}


def lws_prepare(student: LWSDetector, options: dict) -> None:
    """Scale the freshly drawn N(0, 1) logits β to N(0, ``init_std``²) (no RNG use)."""
    std = float({**LWS_DEFAULTS, **options}["init_std"])
    if not std > 0:
        raise ValueError(f"init_std must be positive, not {std!r}")
    with torch.no_grad():
        for block in student.blocks:
            block.conv.beta.mul_(std)


def fgfi_mask(targets: list[dict[str, torch.Tensor]], grid: tuple[int, int], stride: int, *,
              prior: float = BOX_PRIOR, psi: float = 0.5) -> torch.Tensor:
    """FGFI's imitation region: ``N×S_h×S_w`` bool.

    Each cell has one prior box (``prior × prior`` px centred on the cell). For every ground
    truth box the cells whose prior's IoU with it exceeds ``psi ×`` that box's largest IoU
    over all cells are marked; the mask is the union over the image's boxes.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32),
                            torch.arange(gw, dtype=torch.float32), indexing="ij")
    cx, cy = (xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride
    priors = torch.stack([cx - prior / 2, cy - prior / 2, cx + prior / 2, cy + prior / 2], 1)
    mask = torch.zeros(len(targets), gh * gw, dtype=torch.bool)
    for i, target in enumerate(targets):
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        if len(boxes) == 0:
            continue
        iou = box_iou(priors, boxes)                       # cells × boxes
        best = iou.max(dim=0).values
        mask[i] = ((iou > psi * best) & (iou > 0)).any(dim=1)
    return mask.reshape(len(targets), gh, gw)


def _patch_norm(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """‖receptive-field patch of x‖₂ at every output position (zero padding): N×1×H×W."""
    ones = torch.ones(1, x.shape[1], kernel, kernel, dtype=x.dtype, device=x.device)
    return F.conv2d(x * x, ones, stride=stride, padding=padding).clamp(min=0).sqrt()


def _teacher_blocks(teacher: nn.Module, pixels: torch.Tensor):
    """Per teacher block (input, its 3×3 conv, conv output, block output): of a
    :class:`RealDetector` or a :class:`~bitdet.sw.models.ResidualRealDetector`."""
    x = teacher.stem(pixels / PIXEL_MAX)
    records = []
    for blk in teacher.blocks:
        if isinstance(blk, ResidualRealBlock):
            conv = blk.conv
            conv_out = conv(x)
            out = blk.finish(conv_out, x)
        else:
            conv = blk[0]
            conv_out = conv(x)
            out = conv_out
            for layer in list(blk)[1:]:
                out = layer(out)
        records.append((x, conv, conv_out, out))
        x = out
    return records


def _student_layers(student: nn.Module, pixels: torch.Tensor):
    """Per binary block of an LWS student: ``(block, accumulator, norm)``, the norm being
    ``‖â_patch‖·‖w*‖`` of the angular loss; finally the last block's output. A chain's
    input is ±1 (norm ``K``); a residual block's is its input's values ``a·s + z`` padded
    with ``pad_level``'s value (norm ``‖patch‖·√K``, without gradient like ``K``)."""
    x = shortcut = student.stem(pixels)
    for block in student.blocks:
        k = float(block.conv.weight[0].numel())
        if isinstance(block, ResidualBinaryBlock):
            y, acc = block.forward_with_accumulator(x, shortcut)
            with torch.no_grad():        # a constant, as K is (√ has no gradient at 0)
                norm = _patch_norm(block.padded_input(x), block.conv.weight.shape[-1],
                                   block.stride, 0) * math.sqrt(k)
            x, shortcut = y if block.residual_quant is not None else (y, y)
        else:
            x, acc = block.forward_with_accumulator(x)
            norm = k
        yield block, acc, norm
    yield x


def lws_losses(student: LWSDetector, teacher: RealDetector, pixels: torch.Tensor,
               targets: list[dict[str, torch.Tensor]], options: dict,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student head map and the weighted LWS-Det loss terms for one batch.

    Per binary layer ``i`` with teacher input ``a``, teacher weights ``w̃`` (its 3×3 conv),
    student ±1 input ``â`` and searched weights ``w*`` (``K = C·k·k`` elements per patch):

    * ``L_Ang = mean((a⊗w̃ / (‖a_patch‖‖w̃‖) − â⊙w* / (‖â_patch‖‖w*‖))²)``, the second norm
      product being ``K`` exactly (±1 patches, padding bits included);
    * ``L_Amp = mean((a⊗w̃ − α∘(â⊙w*))²)``;
    * ``L_W = mean((w̃ − α∘w*)²)``;

    and ``L_Lim`` = FGFI: ``Σ mask·‖adapt(f_s) − f_t‖² / (2·N_p)`` on the last block's
    features. Returns ``(head, {"ang": …, "amp": …, "w": …, "lim": …})`` already weighted.
    A residual student (:class:`ResidualLWSDetector`, teacher
    :class:`~bitdet.sw.models.ResidualRealDetector`) has the same terms with ``â`` its
    block's n-bit input values (``‖â_patch‖`` then computed, padding included) and its
    teacher's conv inside the residual block; the shortcut is outside both convs.
    """
    weights = {**LWS_DEFAULTS, **options}
    with torch.no_grad():
        records = _teacher_blocks(teacher, pixels)
    layers = _student_layers(student, pixels)
    ang = amp = wl = pixels.new_zeros(())
    # records first: zip stops at their end without taking the last block's output
    for (a, t_conv, t_out, _), (block, acc, norm_s) in zip(records, layers, strict=False):
        conv = block.conv
        w_t = t_conv.weight.detach()
        with torch.no_grad():
            norm_t = (_patch_norm(a, w_t.shape[-1], t_conv.stride, t_conv.padding)
                      * w_t.flatten(1).norm(dim=1).reshape(1, -1, 1, 1))
            cos_t = t_out / norm_t.clamp(min=1e-6)
        alpha = conv.alpha()
        cos_s = acc / (norm_s if isinstance(norm_s, float) else norm_s.clamp(min=1e-6))
        ang = ang + ((cos_t - cos_s) ** 2).mean()
        amp = amp + ((t_out - alpha.reshape(1, -1, 1, 1) * acc) ** 2).mean()
        wl = wl + ((w_t - alpha.reshape(-1, 1, 1, 1) * conv.binary_weight()) ** 2).mean()
    x = next(layers)
    head = student.head(student._head_input(x) if isinstance(student, ResidualBinaryDetector)
                        else x)
    t_feat = records[-1][3]
    grid = tuple(t_feat.shape[2:])
    mask = fgfi_mask(targets, grid, student.stride, psi=weights["psi"]).to(pixels.device)
    diff = ((student.imitation(x) - t_feat) ** 2).sum(dim=1)        # N×S×S
    lim = (diff * mask).sum() / (2 * mask.sum().clamp(min=1))
    return head, {"ang": weights["ang"] * ang, "amp": weights["amp"] * amp,
                  "w": weights["w"] * wl, "lim": weights["lim"] * lim}


class ResidualLWSDetector(ResidualBinaryDetector):
    """:class:`~bitdet.sw.models.ResidualBinaryDetector` with DBS binary convolutions
    (:class:`SearchedBinaryConv2d`) and FGFI's ``imitation`` layer: the ``lws`` method of
    the residual architecture (:func:`lws_losses`). Exported like ``plain``; ``imitation``
    is not in the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in self.blocks:
            old = block.conv
            o, c, k, _ = old.weight.shape
            block.conv = SearchedBinaryConv2d(c, o, k, stride=old.stride, padding=old.padding,
                                              pad_value=old.pad_value)
        width = self.blocks[-1].out_channels
        self.imitation = nn.Conv2d(width, width, 1)


# --------------------------------------------------------------------------------- IDa-Det


class IDaDetector(BinaryDetector):
    """:class:`BinaryDetector` (XNOR-Net binary convs, as ``plain``) with IDa-Det's training
    parts: ``adapt`` (3×3 conv from the last binary features to the teacher's, the neck
    adaptation of the authors' code) and ``log_var`` (log σ²_c of the per-channel Gaussian
    of the entropy loss). Neither is part of the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        width = self.blocks[-1].conv.weight.shape[0]
        self.adapt = nn.Conv2d(width, width, 3, padding=1)
        self.log_var = nn.Parameter(torch.zeros(width))


class ResidualIDaDetector(ResidualBinaryDetector):
    """:class:`~bitdet.sw.models.ResidualBinaryDetector` (as ``plain --arch residual``)
    with IDa-Det's training parts ``adapt`` and ``log_var`` (as :class:`IDaDetector`): the
    ``ida`` method of the residual architecture. :func:`ida_losses` distils the last
    residual block's output values (``a·s + z`` of its levels; ±1 for one bit) towards the
    last block of a :class:`~bitdet.sw.models.ResidualRealDetector` teacher. Neither part
    is in the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        width = self.blocks[-1].out_channels
        self.adapt = nn.Conv2d(width, width, 3, padding=1)
        self.log_var = nn.Parameter(torch.zeros(width))


#: Default options of ``ida``: ``L = L_GT + p·L_P + r·L_R + kd·L_KD``; ``gamma`` the fraction
#: of proposal pairs distilled, ``score`` the detection score a proposal needs, ``top`` the
#: most proposals per model and image; ``kd`` (0: off, the paper's method) weighs the
#: head-output distillation :func:`head_distillation` at temperature ``kd_t``.
#: docs/methods.md explains the choices.
IDA_DEFAULTS = {"p": 1.0, "r": 1e-4, "gamma": 0.4, "score": 0.5, "top": 20.0, "kd": 0.0,
                "kd_t": 1.0}


def _proposal_cells(boxes: torch.Tensor, grid: tuple[int, int], stride: int) -> list[tuple]:
    """Grid cells (row and column slices) that each xyxy pixel box overlaps (≥ 1 cell)."""
    gh, gw = grid
    cells = []
    for x1, y1, x2, y2 in boxes.tolist():
        c0 = min(max(int(x1 // stride), 0), gw - 1)
        r0 = min(max(int(y1 // stride), 0), gh - 1)
        c1 = min(max(-int(-x2 // stride), c0 + 1), gw)
        r1 = min(max(-int(-y2 // stride), r0 + 1), gh)
        cells.append((slice(r0, r1), slice(c0, c1)))
    return cells


def ida_selection(teacher_head: torch.Tensor, student_head: torch.Tensor,
                  teacher_feat: torch.Tensor, student_feat: torch.Tensor,
                  log_var: torch.Tensor, stride: int, options: dict,
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inner level of IDa-Det: the distillation mask (``N×S_h×S_w`` bool) and, per image,
    the discrepancy ``ε_n`` of every proposal pair (for inspection and tests).

    Proposals are each model's detections (score ≥ ``score``, NMS 0.3, at most ``top``),
    pooled and de-duplicated by class-agnostic NMS at IoU 0.6; each one cuts a region (the
    cells it overlaps) out of both feature maps, which is the pair ``(R_t, R_s)``. Its
    discrepancy is the Mahalanobis distance under the per-channel Gaussian
    ``Σ = diag(σ²_c)``: ``ε_n = Σ_c Σ_cells (R_t − R_s)² / σ²_c`` over the region's cell
    count. The ``ceil(gamma · n)`` pairs with the largest ``ε_n`` are selected
    (``m_n = 1``) by sorting, and the mask is the union of their regions.
    """
    gamma, score, top = options["gamma"], options["score"], int(options["top"])
    grid = tuple(teacher_feat.shape[2:])
    size = (grid[0] * stride, grid[1] * stride)
    settings = {"stride": stride, "score_threshold": score, "iou_threshold": 0.3,
                "max_detections": top, "image_size": size}
    teacher_dets = decode(teacher_head, **settings)
    student_dets = decode(student_head, **settings)
    inv_var = torch.exp(-log_var.detach()).reshape(-1, 1, 1)
    mask = torch.zeros(teacher_feat.shape[0], *grid, dtype=torch.bool)
    discrepancies = []
    for i, (t, s) in enumerate(zip(teacher_dets, student_dets, strict=True)):
        boxes = torch.cat([t["boxes"], s["boxes"]])
        scores = torch.cat([t["scores"], s["scores"]])
        boxes = boxes[nms(boxes, scores, None, 0.6)]
        if len(boxes) == 0:
            discrepancies.append(torch.zeros(0))
            continue
        diff2 = ((teacher_feat[i] - student_feat[i]) ** 2 * inv_var).detach().cpu()
        cells = _proposal_cells(boxes, grid, stride)
        eps = torch.stack([diff2[:, rows, cols].sum() / ((rows.stop - rows.start)
                                                         * (cols.stop - cols.start))
                           for rows, cols in cells])
        discrepancies.append(eps)
        keep = torch.sort(-eps, stable=True).indices[:max(1, math.ceil(gamma * len(eps)))]
        for k in keep.tolist():
            rows, cols = cells[k]
            mask[i, rows, cols] = True
    return mask, discrepancies


def ida_check_options(options: dict) -> None:
    """``ValueError`` for ``ida`` options that cannot work (checked before training)."""
    if options.get("kd", 0.0) < 0:
        raise ValueError(f"ida option kd (the head distillation weight) must be >= 0, not "
                         f"{options['kd']!r}")
    if options.get("kd_t", 1.0) <= 0:
        raise ValueError(f"ida option kd_t (the distillation temperature) must be > 0, not "
                         f"{options['kd_t']!r}")


def head_distillation(student_head: torch.Tensor, teacher_head: torch.Tensor, stride: int,
                      num_objects: int, *, temperature: float = 1.0,
                      prior: float = BOX_PRIOR) -> torch.Tensor:
    """Distillation of the teacher's head map into the student's (not part of IDa-Det).

    The detection loss's three terms with the teacher's outputs as soft targets, on every
    cell: objectness ``KL(Bernoulli(σ(o_t)) ‖ Bernoulli(σ(o_s)))``; for the classes
    ``q_t · T² · KL(softmax(c_t/T) ‖ softmax(c_s/T))`` and for the box ``q_t · (1 − GIoU)``
    between the two decoded boxes, each weighted by the teacher's objectness ``q_t = σ(o_t)``
    (the cells the teacher calls objects). Summed over cells and divided by
    ``num_objects`` (≥ 1), as the detection loss divides by its responsible cells. The
    teacher's map is a constant (no gradient reaches the teacher).
    """
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, not {temperature!r}")
    t = teacher_head.detach()
    q_t = torch.sigmoid(t[:, 0])
    obj = (F.binary_cross_entropy_with_logits(student_head[:, 0], q_t, reduction="none")
           - F.binary_cross_entropy_with_logits(t[:, 0], q_t, reduction="none"))
    log_p_s = F.log_softmax(student_head[:, 5:] / temperature, dim=1)
    log_p_t = F.log_softmax(t[:, 5:] / temperature, dim=1)
    cls = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature ** 2
    box = 1 - generalized_box_iou(head_boxes(student_head, stride, prior=prior),
                                  head_boxes(t, stride, prior=prior))
    return (obj + q_t * (cls + box)).sum() / max(num_objects, 1)


def ida_losses(student: IDaDetector, teacher: RealDetector, pixels: torch.Tensor,
               targets: list[dict[str, torch.Tensor]], options: dict,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student head map and the weighted IDa-Det terms ``{"p": λ·L_P, "r": μ·L_R}``, and
    ``"kd": kd·L_KD`` (:func:`head_distillation`) when the ``kd`` option is not 0.

    ``L_P`` (entropy distillation) is the Gaussian negative log-likelihood of the teacher's
    features given the adapted student's on the selected cells, per channel ``c`` with the
    learned variance σ²_c: ``mean over selected (n, c, cell) of (f_t − adapt(f_s))² / σ²_c
    + log σ²_c`` (0 when nothing is selected). ``L_R = Σ_i mean (W_i − α_i ∘ sign W_i)²``
    over the binary layers' latent weights (XNOR-Net's weight reconstruction).
    """
    weights = {**IDA_DEFAULTS, **options}
    with torch.no_grad():
        t_maps = teacher.intermediates(pixels)
    s_maps = student.intermediates(pixels)
    head, adapted, t_feat = s_maps[-1], student.adapt(s_maps[-2]), t_maps[-2]
    mask, _ = ida_selection(t_maps[-1], head.detach(), t_feat, adapted.detach(),
                            student.log_var, student.stride, weights)
    mask = mask.to(pixels.device)
    log_var = student.log_var.reshape(1, -1, 1, 1)
    nll = (t_feat - adapted) ** 2 * torch.exp(-log_var) + log_var        # N×C×S×S
    selected = mask[:, None].expand_as(nll)
    loss_p = nll[selected].mean() if bool(selected.any()) else nll.sum() * 0
    loss_r = pixels.new_zeros(())
    for block in student.blocks:
        w = block.conv.weight
        alpha = block.conv.alpha().reshape(-1, 1, 1, 1)
        loss_r = loss_r + ((w - alpha * torch.where(w >= 0, 1.0, -1.0)) ** 2).mean()
    terms = {"p": weights["p"] * loss_p, "r": weights["r"] * loss_r}
    if weights["kd"]:
        objects = sum(len(target["boxes"]) for target in targets)
        terms["kd"] = weights["kd"] * head_distillation(
            head, t_maps[-1], student.stride, objects, temperature=weights["kd_t"])
    return head, terms


# ----------------------------------------------------------------------------------- BiDet


class BiDetDetector(BinaryDetector):
    """:class:`BinaryDetector` (as ``plain``) with BiDet's training-only ``log_var``: a 1×1
    conv from the last binary features to the log-variances of the four box outputs, from
    which training samples the box (information bottleneck). Not part of the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        width = self.blocks[-1].conv.weight.shape[0]
        self.log_var = nn.Conv2d(width, 4, 1)


class ResidualBiDetDetector(ResidualBinaryDetector):
    """:class:`~bitdet.sw.models.ResidualBinaryDetector` (as ``plain --arch residual``) with
    BiDet's training-only ``log_var`` (as :class:`BiDetDetector`) on the last block's values:
    the ``bidet`` method of the residual architecture. :func:`bidet_losses` takes ``L_IB`` on
    every block's quantizer input ``BN(α·conv) + β_r·shortcut − b``. Not in the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_var = nn.Conv2d(self.blocks[-1].out_channels, 4, 1)


#: Default options of ``bidet``: ``L = L_GT + reg·L_IB + prior·L_SP``; ``sigma`` scales the
#: sampled box noise, ``score`` is the NMS confidence threshold of the sparse-prior term
#: (values of the authors' SSD code; docs/methods.md).
BIDET_DEFAULTS = {"reg": 0.1, "prior": 0.2, "sigma": 0.001, "score": 0.03}


def _class_detections(head: torch.Tensor, stride: int, score: float) -> list[tuple]:
    """Per image, the cells that :func:`decode` keeps (score ``≥ score``, boxes clipped to
    the image, class-aware NMS at IoU 0.5) with their differentiable scores:
    ``[(labels, scores)]``."""
    n, _, gh, gw = head.shape
    probs = torch.softmax(head[:, 5:], dim=1)
    scores = (torch.sigmoid(head[:, 0]) * probs.amax(dim=1)).reshape(n, -1)
    labels = probs.argmax(dim=1).reshape(n, -1)
    limits = torch.tensor([gw * stride, gh * stride] * 2, dtype=head.dtype, device=head.device)
    boxes = torch.minimum(head_boxes(head.detach(), stride).reshape(n, -1, 4).clamp(min=0),
                          limits)
    out = []
    for i in range(n):
        sel = torch.nonzero(scores[i].detach() >= score).reshape(-1)
        keep = sel[nms(boxes[i][sel], scores[i][sel].detach(), labels[i][sel], 0.5)]
        out.append((labels[i][keep], scores[i][keep]))
    return out


def bidet_losses(student: BiDetDetector, teacher, pixels: torch.Tensor,
                 targets: list[dict[str, torch.Tensor]], options: dict,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student head map (box outputs sampled) and the weighted BiDet terms.

    * Information bottleneck: the box outputs ``t = (tx, ty, tw, th)`` are sampled,
      ``t = μ + sigma · exp(log σ²/2) · ε`` with ``ε ~ N(0, 1)`` (drawn from a generator
      seeded by the batch, so runs and resumes are reproducible), and ``L_IB`` is the mean
      square of every binary block's pre-activation (BN output minus sign bias), averaged
      over the blocks — the authors' L2 "regularization loss on feature maps".
    * Sparse object prior: for every image and every class in its ground truth with more
      kept detections (NMS at ``score``) than objects, the scores are normalised by their
      (constant) sum, ``p_k = s_k / Σ s``, and ``L_SP`` is the mean over those (image, class)
      pairs of ``−Σ_k p_k log p_k / (objects of that class)``.

    ``teacher`` is unused (BiDet needs none).
    """
    del teacher
    weights = {**BIDET_DEFAULTS, **options}
    pre = []
    if isinstance(student, ResidualBinaryDetector):     # the quantizer's input: BN + shortcut − b
        hooks = [block.quant.register_forward_hook(
            lambda mod, inp, out: pre.append(inp[0])) for block in student.blocks]
    else:
        hooks = [block.bn.register_forward_hook(
            lambda mod, inp, out, block=block: pre.append(
                out - block.sign_bias.reshape(1, -1, 1, 1)))
            for block in student.blocks]
    try:
        maps = student.intermediates(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    head, feat = maps[-1], maps[-2]
    seed = int(pixels.detach().double().sum().item()) % (2 ** 62)
    gen = torch.Generator(device=pixels.device).manual_seed(seed)
    noise = torch.randn(head[:, 1:5].shape, generator=gen, device=pixels.device)
    sampled = head[:, 1:5] + weights["sigma"] * torch.exp(student.log_var(feat) / 2) * noise
    head = torch.cat([head[:, :1], sampled, head[:, 5:]], dim=1)
    loss_ib = sum((p ** 2).mean() for p in pre) / max(len(pre), 1)
    terms, count = pixels.new_zeros(()), 0
    for (labels, scores), target in zip(_class_detections(head, student.stride,
                                                          weights["score"]), targets,
                                        strict=True):
        gt = torch.as_tensor(target["labels"]).reshape(-1).to(labels.device)
        for cls in torch.unique(gt).tolist():
            mine = scores[labels == cls]
            objects = int((gt == cls).sum())
            if len(mine) <= objects:
                continue
            p = mine / mine.detach().sum()
            terms = terms - (p * torch.log(p.clamp(min=1e-12))).sum() / objects
            count += 1
    loss_sp = terms / max(count, 1)
    return head, {"reg": weights["reg"] * loss_ib, "prior": weights["prior"] * loss_sp}


# ------------------------------------------------------------------------------------ RBCN


class RBCNDetector(BinaryDetector):
    """:class:`BinaryDetector` (as ``plain``) with RBCN's training parts: ``modulation``, one
    learnable matrix ``C^l`` per binary layer (the shape of one filter, shared by the
    layer's filters), ``adapt`` (1×1 conv from the last binary features to the teacher's
    width) and ``discriminator`` (linear + LeakyReLU blocks on per-cell feature vectors).
    None of them is part of the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.modulation = nn.ParameterList(
            nn.Parameter(block.conv.weight.detach().abs().mean(dim=0).clone())
            for block in self.blocks)
        width = self.blocks[-1].conv.weight.shape[0]
        self.adapt = nn.Conv2d(width, width, 1)
        self.discriminator = nn.Sequential(
            nn.Linear(width, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2),
            nn.Linear(64, 1))


class ResidualRBCNDetector(ResidualBinaryDetector):
    """:class:`~bitdet.sw.models.ResidualBinaryDetector` (as ``plain --arch residual``) with
    RBCN's training parts (as :class:`RBCNDetector`): one ``modulation`` matrix per residual
    block's conv, ``adapt`` and ``discriminator`` on the last block's values against the last
    block of a :class:`~bitdet.sw.models.ResidualRealDetector` teacher (:func:`rbcn_losses`
    unchanged). None of them is in the bundle."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.modulation = nn.ParameterList(
            nn.Parameter(block.conv.weight.detach().abs().mean(dim=0).clone())
            for block in self.blocks)
        width = self.blocks[-1].out_channels
        self.adapt = nn.Conv2d(width, width, 1)
        self.discriminator = nn.Sequential(
            nn.Linear(width, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2),
            nn.Linear(64, 1))


#: Default options of ``rbcn``: ``L = L_GT + kernel·L_Kernel + adv·(L_D + L_G)``
#: (docs/methods.md).
RBCN_DEFAULTS = {"kernel": 1e-4, "adv": 0.1}


def rbcn_losses(student: RBCNDetector, teacher: RealDetector, pixels: torch.Tensor,
                targets: list[dict[str, torch.Tensor]], options: dict,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student head map and the weighted RBCN terms ``{"kernel", "disc", "gen"}``.

    * ``L_Kernel = ½ Σ_l ‖W_l − C_l ∘ sign(W_l)‖²`` (mean over the elements of each layer):
      the latent weights against the modulated binary weights.
    * Adversarial (``min_{W, C} max_Y log D(R) + log(1 − D(T))``): the discriminator ``D``
      (logits) sees per-cell feature vectors of the teacher's last block (``R``, "real")
      and of the adapted student's (``T = adapt(f_s)``, "fake"). ``disc`` is D's binary
      cross-entropy on both (student features detached: it only trains D), ``gen`` the
      generator's non-saturating ``−log D(T)`` through a copy of D whose parameters are
      detached (it only trains the student and ``adapt``), so one optimizer step performs
      both sides of the min-max.
    """
    weights = {**RBCN_DEFAULTS, **options}
    with torch.no_grad():
        real = teacher.intermediates(pixels)[-2]
    maps = student.intermediates(pixels)
    head = maps[-1]
    fake = student.adapt(maps[-2])
    kernel = pixels.new_zeros(())
    for block, c in zip(student.blocks, student.modulation, strict=True):
        w = block.conv.weight
        kernel = kernel + 0.5 * ((w - c[None] * torch.where(w >= 0, 1.0, -1.0)) ** 2).mean()

    def cells(x):                                        # N×C×H×W → (N·H·W)×C
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    disc = student.discriminator
    logit_real, logit_fake = disc(cells(real)), disc(cells(fake.detach()))
    loss_d = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
              + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    logit_gen = torch.func.functional_call(disc, frozen, (cells(fake),))
    loss_g = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
    return head, {"kernel": weights["kernel"] * kernel, "disc": weights["adv"] * loss_d,
                  "gen": weights["adv"] * loss_g}


# -------------------------------------------------------------------------------------- KR


#: Default options of ``kr``: ``L = L_GT + ka·L_KA``; ``rho`` is the fraction of each
#: layer's ``L_KA`` gradient entries that the sparse recoding keeps (docs/methods.md).
KR_DEFAULTS = {"ka": 1.0, "rho": 0.1}


class _SparseRecode(torch.autograd.Function):
    """Identity forward; backward keeps the ``ceil(rho · numel)`` entries of largest
    magnitude of the incoming gradient and zeroes the rest (KR's sparse recoding of the
    prior's gradient on the student's weights; ties broken by ``torch.topk``'s order)."""

    @staticmethod
    def forward(ctx, x, rho):
        ctx.rho = rho
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1)
        keep = max(1, math.ceil(ctx.rho * flat.numel()))
        if keep >= flat.numel():
            return grad, None
        index = torch.topk(flat.abs(), keep, sorted=False).indices
        sparse = torch.zeros_like(flat)
        sparse[index] = flat[index]
        return sparse.reshape(grad.shape), None


def kr_aggregate(weight: torch.Tensor) -> torch.Tensor:
    """KR's knowledge aggregation of one conv's parameters (``O×C×k×k`` → ``O×C``): the
    weights standardised over the layer (``w / std(w)``, so a real-valued teacher's and a
    binary student's latent weights compare by shape, not scale), then averaged over each
    ``k×k`` kernel: one number per (filter, input channel), the kernel's mean polarity."""
    return (weight / weight.std().clamp(min=1e-12)).mean(dim=(2, 3))


def kr_check_options(options: dict) -> None:
    """``ValueError`` for ``kr`` options that cannot work (checked before training)."""
    if options.get("ka", 1.0) < 0:
        raise ValueError(f"kr option ka (the aggregation loss weight) must be >= 0, not "
                         f"{options['ka']!r}")
    rho = options.get("rho", 0.1)
    if not 0 < rho <= 1:
        raise ValueError(f"kr option rho (the fraction of gradient entries kept) must be in "
                         f"(0, 1], not {rho!r}")


def _teacher_convs(teacher: nn.Module) -> list[nn.Conv2d]:
    return [blk.conv if isinstance(blk, ResidualRealBlock) else blk[0]
            for blk in teacher.blocks]


def kr_losses(student: nn.Module, teacher: nn.Module, pixels: torch.Tensor,
              targets: list[dict[str, torch.Tensor]], options: dict,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student head map and the weighted KR term ``{"ka": ka·L_KA}`` (a documented
    interpretation of Knowledge Representing, arXiv 1911.05329; docs/methods.md).

    ``L_KA = Σ_i mean (kr_aggregate(W_i) − kr_aggregate(w̃_i))²`` over the binary blocks,
    ``W_i`` the student's latent weights (the tensor whose sign is deployed), ``w̃_i`` the
    teacher's corresponding 3×3 conv: the student matches the teacher's aggregated
    parameter distribution, not its activations. The gradient ``L_KA`` sends to each
    ``W_i`` is sparsely recoded (:class:`_SparseRecode`, the ``rho`` fraction of largest
    magnitude kept), so the prior moves few weights per step. The teacher's data path is
    not run (``pixels`` and ``targets`` reach only the student). Works for the chain
    (:class:`~bitdet.sw.models.BinaryDetector`, teacher :class:`RealDetector`) and the
    residual family (:class:`~bitdet.sw.models.ResidualBinaryDetector`, teacher
    :class:`~bitdet.sw.models.ResidualRealDetector`).
    """
    del targets
    weights = {**KR_DEFAULTS, **options}
    head = student(pixels)
    loss = pixels.new_zeros(())
    for block, t_conv in zip(student.blocks, _teacher_convs(teacher), strict=True):
        w = block.conv.weight
        w_t = t_conv.weight.detach()
        if w.shape != w_t.shape:
            raise ValueError(f"kr: the teacher's conv {tuple(w_t.shape)} does not fit the "
                             f"student's {tuple(w.shape)}")
        recoded = _SparseRecode.apply(w, float(weights["rho"]))
        loss = loss + ((kr_aggregate(recoded) - kr_aggregate(w_t)) ** 2).mean()
    return head, {"ka": weights["ka"] * loss}
