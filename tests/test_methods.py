"""Distillation methods (bitdet.sw.distill): DBS weights, LWS-Det losses, smoke training,
bit-exact export, user errors; the trainer's model options (AQD levels / LSQ host bits,
QuantNet, DupNet, IFQ) and option handling on resume."""

import pytest
import torch
import torch.nn.functional as F

from bitdet.core.bundle import load
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import generalized_box_iou, head_boxes, perfect_head_map
from bitdet.sw.distill import (
    BiDetDetector,
    IDaDetector,
    LWSDetector,
    RBCNDetector,
    SearchedBinaryConv2d,
    bidet_losses,
    fgfi_mask,
    head_distillation,
    ida_losses,
    ida_selection,
    lws_losses,
    lws_prepare,
    rbcn_losses,
)
from bitdet.sw.evaluate import predict_bundle, run_bundle
from bitdet.sw.models import RealDetector
from bitdet.sw.train import (
    METHODS,
    CheckpointError,
    TrainingError,
    export_checkpoint,
    load_checkpoint,
    multilevel_loss,
    predict_bundle_fixed_point,
    predict_levels,
    run_bundle_fixed_point,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = {"batch_size": 16, "train_count": 32, "val_count": 0, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return train("fp", epochs=1, seed=1, out_dir=root, **TINY).checkpoint


@pytest.fixture(scope="module")
def lws_runs(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("lws")
    straight = train("lws", epochs=2, seed=3, teacher=teacher, out_dir=root / "straight", **TINY)
    resumed = train(resume=root / "straight" / "epoch_001.pt", out_dir=root / "resumed", **TINY)
    return straight, resumed


def test_searched_weights_are_the_argmax_with_the_relaxed_gradient():
    torch.manual_seed(0)
    conv = SearchedBinaryConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.beta[:, 0, 0, 0, 0] = 0.25               # a tie: sign(0) = +1
    p = conv.probabilities()
    expected = torch.where(p[1] >= p[0], 1.0, -1.0)
    assert torch.equal(conv.binary_weight(), expected)
    assert conv.binary_weight()[0, 0, 0, 0] == 1.0
    assert torch.equal(torch.where(conv.weight >= 0, 1.0, -1.0), expected)

    x = torch.where(torch.rand(2, 3, 5, 5) < 0.5, -1.0, 1.0)
    g = torch.randn(2, 4, 5, 5)
    (conv.dot(x) * g).sum().backward()
    grad_ste = conv.beta.grad.clone()
    conv.beta.grad = None
    relaxed = conv.probabilities()[1] - conv.probabilities()[0]   # DARTS mixture of ±1
    xp = F.pad(x, (1,) * 4, value=-1.0)
    (F.conv2d(xp, relaxed) * g).sum().backward()
    assert torch.allclose(grad_ste, conv.beta.grad, atol=1e-5)
    # the forward is the discrete choice: integer dot products
    out = conv.dot(x)
    assert torch.equal(out, torch.round(out))


def test_fgfi_mask_marks_the_cells_near_each_object():
    boxes = torch.tensor([[12.0, 12.0, 28.0, 28.0]])          # = the prior of cell (2, 2)
    mask = fgfi_mask([{"boxes": boxes}, {"boxes": torch.zeros(0, 4)}], (8, 8), 8)
    assert mask.shape == (2, 8, 8) and mask[0, 2, 2]
    assert not mask[1].any()
    # IoU with the neighbours (1/3 for a one-cell shift) is below 0.5·1; far cells are out
    assert mask[0].sum() == 1
    loose = fgfi_mask([{"boxes": boxes}], (8, 8), 8, psi=0.3)
    assert loose[0, 2, 1] and loose[0, 1, 2] and not loose[0, 6, 6]


def _angular_reference(a, w_t, x_s, w_s, pad_value):
    """Eq. (6.75) with unfolded patches: cos of (patch, filter) in teacher and student."""
    pa = F.unfold(a, 3, padding=1)                                  # N × K × L
    ps = F.unfold(F.pad(x_s, (1,) * 4, value=pad_value), 3)
    wt, ws = w_t.flatten(1), w_s.flatten(1)                         # O × K
    cos_t = (wt @ pa) / (pa.norm(dim=1, keepdim=True) * wt.norm(dim=1)[:, None]).clamp(min=1e-6)
    cos_s = (ws @ ps) / (ps.norm(dim=1, keepdim=True) * ws.norm(dim=1)[:, None])
    return ((cos_t - cos_s) ** 2).mean()


def test_lws_losses_follow_the_equations():
    torch.manual_seed(2)
    kwargs = {"widths": (4, 6, 8), "pools": (True, False), "image_size": 32}
    student, teacher = LWSDetector(**kwargs), RealDetector(**kwargs).eval()
    pixels = torch.rand(2, 1, 32, 32) * 255
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    only = {"ang": 1.0, "amp": 1.0, "w": 1.0, "lim": 1.0}
    head, terms = lws_losses(student, teacher, pixels, targets, only)
    assert torch.equal(head, student(pixels))
    # independent recomputation, layer by layer
    with torch.no_grad():
        a, x = teacher.stem(pixels / 255), student.stem(pixels)
        ang = amp = wl = 0.0
        for blk, t_blk in zip(student.blocks, teacher.blocks, strict=True):
            conv, w_t = blk.conv, t_blk[0].weight
            w_s = torch.where(conv.beta[1] >= conv.beta[0], 1.0, -1.0)
            ang += _angular_reference(a, w_t, x, w_s, conv.pad_value)
            dot = F.conv2d(F.pad(x, (1,) * 4, value=float(conv.pad_value)), w_s)
            amp += ((t_blk[0](a) - conv.scale.reshape(1, -1, 1, 1) * dot) ** 2).mean()
            wl += ((w_t - conv.scale.reshape(-1, 1, 1, 1) * w_s) ** 2).mean()
            a, x = t_blk(a), blk(x)
    assert torch.allclose(terms["ang"], torch.as_tensor(ang), rtol=1e-4)
    assert torch.allclose(terms["amp"], torch.as_tensor(amp), rtol=1e-4)
    assert torch.allclose(terms["w"], torch.as_tensor(wl), rtol=1e-4)
    assert terms["lim"] > 0
    # only the masked cells of the first image count in L_Lim
    halved = lws_losses(student, teacher, pixels, targets, {**only, "lim": 0.5})[1]["lim"]
    assert torch.allclose(halved, terms["lim"] / 2)
    nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}] * 2
    assert lws_losses(student, teacher, pixels, nothing, only)[1]["lim"] == 0
    # every term reaches the searched logits β and the scale α
    sum(terms.values()).backward()
    for blk in student.blocks:
        assert blk.conv.beta.grad.abs().sum() > 0 and blk.conv.scale.grad.abs().sum() > 0


def test_lws_trains_resumes_and_exports_bit_exactly(lws_runs, tmp_path):
    straight, resumed = lws_runs
    assert isinstance(straight.model, LWSDetector)
    entry = straight.history[-1]
    assert {"train_ang", "train_amp", "train_w", "train_lim"} <= set(entry)
    parts = entry["train_obj"] + 2 * entry["train_box"] + entry["train_cls"]
    extra = sum(entry[f"train_{k}"] for k in ("ang", "amp", "w", "lim"))
    assert entry["train_loss"] == pytest.approx(parts + extra, rel=1e-4)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    path = export_checkpoint(straight.checkpoint, tmp_path / "lws.bitdet")
    bundle = load(path)
    assert bundle.model["training"]["method"] == "lws"
    model, ckpt = load_checkpoint(straight.checkpoint)
    assert ckpt["config"]["teacher"] and ckpt["config"]["options"]["ang"] == 10.0
    images = make_digitscenes("test", count=6, seed=0)
    pixels = torch.from_numpy(images.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))
    # the searched signs (not a latent weight) are what the bundle holds
    for block, layer in zip(model.blocks, bundle.binary_layers, strict=True):
        signs = torch.where(block.conv.beta[1] >= block.conv.beta[0], 1.0, -1.0)
        held = torch.as_tensor(layer.weights, dtype=torch.float32)
        assert torch.equal(held.abs(), torch.ones_like(held))
        same = (held == signs).flatten(1).all(1)
        flipped = (held == -signs).flatten(1).all(1)     # negative-slope channels
        assert bool((same | flipped).all())


def test_lws_user_errors(teacher, tmp_path):
    assert METHODS["lws"].exportable and METHODS["lws"].needs_teacher
    with pytest.raises(TrainingError, match="teacher"):
        train("lws", epochs=1, out_dir=tmp_path, **TINY)
    with pytest.raises(TrainingError, match="takes no teacher"):
        train("plain", epochs=1, teacher=teacher, out_dir=tmp_path, **TINY)
    with pytest.raises(TrainingError, match="unknown option"):
        train("lws", epochs=1, teacher=teacher, options={"gamma": 1.0}, out_dir=tmp_path, **TINY)
    plain = train("plain", epochs=1, out_dir=tmp_path / "plain", **TINY).checkpoint
    with pytest.raises(CheckpointError, match="must be an 'fp' checkpoint"):
        train("lws", epochs=1, teacher=plain, out_dir=tmp_path, **TINY)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train("lws", epochs=1, teacher=tmp_path / "missing.pt", out_dir=tmp_path, **TINY)


def test_lws_init_std_scales_the_initial_logits(teacher, tmp_path):
    torch.manual_seed(7)
    student = LWSDetector()
    before = [b.conv.beta.detach().clone() for b in student.blocks]
    lws_prepare(student, {"init_std": 0.1})
    for b, beta in zip(student.blocks, before, strict=True):
        assert torch.allclose(b.conv.beta, beta * 0.1)
    with pytest.raises(ValueError, match="init_std"):
        lws_prepare(student, {"init_std": 0.0})
    # through train() / --loss-weight: stored with the run's options
    small = train("lws", epochs=1, seed=3, teacher=teacher, options={"init_std": 0.1},
                  out_dir=tmp_path, **TINY)
    assert small.history and load_checkpoint(small.checkpoint)[1]["config"]["options"][
        "init_std"] == 0.1


def test_lws_teacher_topology_must_match(tmp_path):
    small = train("fp", epochs=1, image_size=32, out_dir=tmp_path / "fp32", **TINY).checkpoint
    with pytest.raises(CheckpointError, match="image_size"):
        train("lws", epochs=1, teacher=small, out_dir=tmp_path, **TINY)


def test_cli_lws(capsys, teacher, tmp_path):
    status = main(["train", "--method", "lws", "--epochs", "1", "--train-images", "8",
                   "--val-images", "0", "--batch-size", "8", "--threads", "1",
                   "--teacher", str(teacher), "--loss-weight", "ang=2", "--out",
                   str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert " ang " in out and " lim " in out
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["config"]["options"]["ang"] == 2.0
    for argv, fragment in ((["--method", "lws"], "teacher"),
                           (["--method", "lws", "--teacher", str(teacher), "--loss-weight",
                             "ang"], "NAME=NUMBER"),
                           (["--method", "lws", "--teacher", str(teacher), "--loss-weight",
                             "beta=1"], "unknown option")):
        status = main(["train", "--epochs", "1", "--out", str(tmp_path / "x"), *argv])
        out, err = capsys.readouterr()
        assert status == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bitdet: error: ") and fragment in err


# --------------------------------------------------------------------------------- IDa-Det

IDA = {"p": 1.0, "r": 1.0, "gamma": 0.5, "score": 0.5, "top": 20}


def test_ida_selects_the_most_discrepant_proposal_pairs():
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [36.0, 36.0, 52.0, 52.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
    teacher_head = perfect_head_map(targets, (8, 8), 8, 10)
    student_head = torch.full_like(teacher_head, -20.0)          # detects nothing
    t_feat = torch.zeros(1, 4, 8, 8)
    s_feat = torch.zeros(1, 4, 8, 8)
    s_feat[0, :, 0:3, 0:3] = 0.5                                 # around the first box
    s_feat[0, :, 4:7, 4:7] = 2.0                                 # around the second: larger
    mask, eps = ida_selection(teacher_head, student_head, t_feat, s_feat, torch.zeros(4), 8,
                              IDA)
    assert len(eps[0]) == 2
    assert mask[0, 4:7, 4:7].all() and not mask[0, 0:3, 0:3].any()
    assert mask[0].sum() == 9                  # the cells the 16-px box overlaps: 3×3
    # all pairs when gamma = 1; a larger σ² for the channels scales ε but not the order
    everything, _ = ida_selection(teacher_head, student_head, t_feat, s_feat,
                                  torch.zeros(4), 8, {**IDA, "gamma": 1.0})
    assert everything[0, 0:3, 0:3].all() and everything[0].sum() == 18
    _, scaled = ida_selection(teacher_head, student_head, t_feat, s_feat,
                              torch.full((4,), 2.0), 8, IDA)
    assert torch.allclose(scaled[0] * torch.e ** 2, eps[0])
    # proposals come from the student too; no proposals at all: empty mask
    swapped, _ = ida_selection(student_head, teacher_head, t_feat, s_feat, torch.zeros(4), 8,
                               IDA)
    assert torch.equal(swapped, mask)
    none, eps = ida_selection(student_head, student_head, t_feat, s_feat, torch.zeros(4), 8,
                              IDA)
    assert not none.any() and len(eps[0]) == 0


def test_ida_losses_follow_the_equations():
    torch.manual_seed(4)
    kwargs = {"widths": (4, 6, 8), "pools": (True, False), "image_size": 32}
    student, teacher = IDaDetector(**kwargs), RealDetector(**kwargs).eval()
    with torch.no_grad():
        student.log_var.copy_(torch.randn(8) * 0.3)
        teacher.head.bias[0] = 20.0             # the teacher proposes every cell
    pixels = torch.rand(2, 1, 32, 32) * 255
    head, terms = ida_losses(student, teacher, pixels, [], IDA)
    assert torch.equal(head, student(pixels))
    with torch.no_grad():
        t_maps = teacher.intermediates(pixels)
        feat = student.adapt(student.intermediates(pixels)[-2])
        mask, _ = ida_selection(t_maps[-1], head, t_maps[-2], feat, student.log_var, 4, IDA)
        assert mask.any() and not mask.all()
        var = student.log_var.exp()
        values = []
        for n, c, y, x in torch.nonzero(mask[:, None].expand(-1, 8, -1, -1)).tolist():
            d2 = (t_maps[-2][n, c, y, x] - feat[n, c, y, x]) ** 2
            values.append(d2 / var[c] + torch.log(var[c]))
        assert torch.allclose(terms["p"], torch.stack(values).mean(), rtol=1e-5)
        r = sum(((b.conv.weight - b.conv.alpha().reshape(-1, 1, 1, 1)
                  * torch.sign(b.conv.weight)) ** 2).mean() for b in student.blocks)
        assert torch.allclose(terms["r"], r)
    sum(terms.values()).backward()
    assert student.log_var.grad.abs().sum() > 0 and student.adapt.weight.grad.abs().sum() > 0


def test_head_distillation_is_the_soft_detection_loss():
    torch.manual_seed(8)
    teacher_head = torch.randn(2, 15, 4, 4) * 2
    assert float(head_distillation(teacher_head.clone(), teacher_head, 8, 3)) == \
        pytest.approx(0.0, abs=1e-5)
    student_head = torch.randn(2, 15, 4, 4, requires_grad=True)
    loss = head_distillation(student_head, teacher_head, 8, 3, temperature=2.0)
    value = float(loss.detach())
    # the same terms, one cell at a time
    expected = 0.0
    boxes_s = head_boxes(student_head.detach(), 8)
    boxes_t = head_boxes(teacher_head, 8)
    for n in range(2):
        for y in range(4):
            for x in range(4):
                s, t = student_head.detach()[n, :, y, x], teacher_head[n, :, y, x]
                q = torch.sigmoid(t[0])
                p_s = torch.sigmoid(s[0])
                obj = q * torch.log(q / p_s) + (1 - q) * torch.log((1 - q) / (1 - p_s))
                pt, ps = torch.softmax(t[5:] / 2, 0), torch.softmax(s[5:] / 2, 0)
                cls = 4 * (pt * torch.log(pt / ps)).sum()
                giou = generalized_box_iou(boxes_s[n, y, x], boxes_t[n, y, x])
                expected += obj + q * (cls + 1 - giou)
    assert value == pytest.approx(float(expected) / 3, rel=1e-4)
    assert value > 0
    loss.backward()
    assert student_head.grad.abs().sum() > 0
    # no objects in the batch: divided by 1, not 0
    unnormalised = head_distillation(student_head.detach(), teacher_head, 8, 0, temperature=2.0)
    assert float(unnormalised) == pytest.approx(value * 3, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        head_distillation(student_head, teacher_head, 8, 3, temperature=0.0)


def test_ida_kd_option_adds_the_head_distillation_term(capsys, teacher, tmp_path):
    torch.manual_seed(4)
    kwargs = {"widths": (4, 6, 8), "pools": (True, False), "image_size": 32}
    student, real = IDaDetector(**kwargs), RealDetector(**kwargs).eval()
    pixels = torch.rand(2, 1, 32, 32) * 255
    boxes = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [1.0, 2.0, 9.0, 9.0]])},
             {"boxes": torch.tensor([[0.0, 0.0, 12.0, 12.0]])}]
    _, off = ida_losses(student, real, pixels, boxes, IDA)
    assert "kd" not in off                          # the paper's method: no such term
    head, on = ida_losses(student, real, pixels, boxes, {**IDA, "kd": 0.5, "kd_t": 2.0})
    with torch.no_grad():
        expected = 0.5 * head_distillation(head, real(pixels), student.stride, 3,
                                           temperature=2.0)
    assert torch.allclose(on["kd"], expected)
    assert torch.allclose(on["p"], off["p"]) and torch.allclose(on["r"], off["r"])
    for bad, fragment in (({"kd": -1.0}, "kd .* must be >= 0"), ({"kd_t": 0.0}, "kd_t")):
        with pytest.raises(TrainingError, match=fragment):
            train("ida", epochs=1, teacher=teacher, options=bad, out_dir=tmp_path, **TINY)
    status = main(["train", "--method", "ida", "--teacher", str(teacher), "--method-option",
                   "kd_t=0", "--out", str(tmp_path / "x")])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.strip() == (
        "bitdet: error: ida option kd_t (the distillation temperature) must be > 0, not 0.0")
    result = train("ida", epochs=1, seed=2, teacher=teacher, out_dir=tmp_path / "kd",
                   options={"kd": 1.0}, **TINY)
    assert result.config.options["kd"] == 1.0 and "train_kd" in result.history[-1]


@pytest.mark.parametrize("raw_last", [False, True])
def test_ida_trains_and_exports_bit_exactly(raw_last, teacher, tmp_path):
    result = train("ida", epochs=1, seed=2, teacher=teacher, out_dir=tmp_path,
                   model_options={"raw_last": raw_last}, **TINY)
    assert isinstance(result.model, IDaDetector)
    assert result.model.raw_last == raw_last
    assert {"train_p", "train_r"} <= set(result.history[-1])
    bundle = load(export_checkpoint(result.checkpoint, tmp_path / "ida.bitdet"))
    assert bundle.model["training"]["method"] == "ida"
    model, _ = load_checkpoint(result.checkpoint)
    images = make_digitscenes("test", count=6, seed=0)
    pixels = torch.from_numpy(images.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))


# ----------------------------------------------------------------------------------- BiDet


def test_bidet_terms_follow_the_equations():
    torch.manual_seed(5)
    kwargs = {"widths": (4, 6, 8), "pools": (True, False), "image_size": 32}
    student = BiDetDetector(**kwargs)
    with torch.no_grad():
        student.head.bias[0] = 20.0             # every cell is a confident detection
    pixels = torch.rand(2, 1, 32, 32) * 255
    one = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}
    targets = [{**one, "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    options = {"reg": 1.0, "prior": 1.0, "sigma": 0.0, "score": 0.03}
    head, terms = bidet_losses(student, None, pixels, targets, options)
    plain_head = student(pixels)
    assert torch.equal(head, plain_head)                # sigma 0: no sampling
    # L_IB: the mean square of each block's pre-activation, averaged over the blocks
    with torch.no_grad():
        x, pre = student.stem(pixels), []
        for block in student.blocks:
            acc = block.conv.dot(x)
            y = block.bn(acc * block.conv.alpha().reshape(1, -1, 1, 1))
            pre.append(((y - block.sign_bias.reshape(1, -1, 1, 1)) ** 2).mean())
            x = block(x)
    assert torch.allclose(terms["reg"], torch.stack(pre).mean(), rtol=1e-5)
    # L_SP: entropy of the normalised scores of class 3 in image 0 (one object)
    from bitdet.sw.detection import decode
    kept = decode(plain_head.detach(), stride=4, score_threshold=0.03,
                  max_detections=64)[0]
    s = kept["scores"][kept["labels"] == 3]
    assert len(s) > 1                       # more detections of class 3 than objects
    p = s / s.sum()
    assert torch.allclose(terms["prior"], -(p * p.log()).sum(), rtol=1e-4)
    # sampling: reproducible for a batch, different noise scale → different head
    noisy = bidet_losses(student, None, pixels, targets, {**options, "sigma": 1.0})[0]
    again = bidet_losses(student, None, pixels, targets, {**options, "sigma": 1.0})[0]
    assert torch.equal(noisy, again) and not torch.equal(noisy, head)
    assert torch.equal(noisy[:, [0, *range(5, noisy.shape[1])]],
                       head[:, [0, *range(5, head.shape[1])]])
    sum(terms.values()).backward()
    assert student.blocks[0].conv.weight.grad.abs().sum() > 0


def test_bidet_trains_without_teacher_and_exports_bit_exactly(teacher, tmp_path):
    with pytest.raises(TrainingError, match="takes no teacher"):
        train("bidet", epochs=1, teacher=teacher, out_dir=tmp_path, **TINY)
    result = train("bidet", epochs=1, seed=2, out_dir=tmp_path, **TINY)
    assert isinstance(result.model, BiDetDetector)
    assert {"train_reg", "train_prior"} <= set(result.history[-1])
    bundle = load(export_checkpoint(result.checkpoint, tmp_path / "bidet.bitdet"))
    assert bundle.model["training"]["method"] == "bidet"
    model, _ = load_checkpoint(result.checkpoint)
    images = make_digitscenes("test", count=6, seed=0)
    pixels = torch.from_numpy(images.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))


# ------------------------------------------------------------------------------------ RBCN


def test_rbcn_terms_and_the_two_sides_of_the_min_max():
    torch.manual_seed(6)
    kwargs = {"widths": (4, 6, 8), "pools": (True, False), "image_size": 32}
    student, teacher = RBCNDetector(**kwargs), RealDetector(**kwargs).eval()
    pixels = torch.rand(2, 1, 32, 32) * 255
    head, terms = rbcn_losses(student, teacher, pixels, [], {"kernel": 1.0, "adv": 1.0})
    assert torch.equal(head, student(pixels))
    with torch.no_grad():
        kernel = sum(0.5 * ((b.conv.weight - c * torch.sign(b.conv.weight)) ** 2).mean()
                     for b, c in zip(student.blocks, student.modulation, strict=True))
    assert torch.allclose(terms["kernel"], kernel)
    # the discriminator term trains only D; the generator term only the student side
    terms["disc"].backward(retain_graph=True)
    assert student.discriminator[0].weight.grad.abs().sum() > 0
    assert student.adapt.weight.grad is None and student.blocks[0].conv.weight.grad is None
    student.zero_grad(set_to_none=True)
    terms["gen"].backward(retain_graph=True)
    assert student.discriminator[0].weight.grad is None
    assert student.adapt.weight.grad.abs().sum() > 0
    assert student.blocks[-1].conv.weight.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)
    terms["kernel"].backward()
    assert all(c.grad.abs().sum() > 0 for c in student.modulation)


def test_rbcn_trains_and_exports_bit_exactly(teacher, tmp_path):
    with pytest.raises(TrainingError, match="teacher"):
        train("rbcn", epochs=1, out_dir=tmp_path, **TINY)
    result = train("rbcn", epochs=1, seed=2, teacher=teacher, out_dir=tmp_path, **TINY)
    assert isinstance(result.model, RBCNDetector)
    assert {"train_kernel", "train_disc", "train_gen"} <= set(result.history[-1])
    bundle = load(export_checkpoint(result.checkpoint, tmp_path / "rbcn.bitdet"))
    assert bundle.model["training"]["method"] == "rbcn"
    model, _ = load_checkpoint(result.checkpoint)
    images = make_digitscenes("test", count=6, seed=0)
    pixels = torch.from_numpy(images.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))


# ---------------------------------------------------------- trainer options (model options)


def _test_pixels(count=6):
    images = make_digitscenes("test", count=count, seed=0)
    return images, torch.from_numpy(images.images).to(torch.float32)[:, None]


@pytest.mark.parametrize("options", [{"binarizer": "quantnet"}, {"dup": 2, "dup_input": 2},
                                     {"host_bits": 4, "ifq": True}, {"raw_last": True}])
def test_model_options_train_and_export_bit_exactly(options, tmp_path):
    result = train("plain", epochs=1, seed=4, model_options=options, out_dir=tmp_path, **TINY)
    model, ckpt = load_checkpoint(result.checkpoint)
    assert {k: ckpt["config"]["model"][k] for k in options} == options
    bundle = load(export_checkpoint(result.checkpoint, tmp_path / "m.bitdet"))
    _, pixels = _test_pixels()
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))
    if "binarizer" in options:
        assert result.history[-1]["train_quant"] > 0
        assert ckpt["config"]["options"] == {"quant": 0.01}
        assert all(float(b.conv.progress) == 1.0 for b in model.blocks)   # annealed to the end


def test_quantnet_run_resumes_exactly(tmp_path):
    kwargs = {"seed": 6, "model_options": {"binarizer": "quantnet"}, **TINY}
    straight = train("plain", epochs=2, out_dir=tmp_path / "a", **kwargs)
    resumed = train(resume=tmp_path / "a" / "epoch_001.pt", out_dir=tmp_path / "b", **TINY)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_multilevel_loss_assigns_boxes_to_levels_by_size():
    torch.manual_seed(0)
    maps = [torch.randn(1, 15, 8, 8, requires_grad=True),
            torch.randn(1, 15, 4, 4, requires_grad=True)]
    for box, level in (([20.0, 20.0, 32.0, 32.0], 0), ([10.0, 10.0, 38.0, 38.0], 1)):
        target = [{"boxes": torch.tensor([box]), "labels": torch.tensor([3])}]
        loss, parts = multilevel_loss(maps, target, [8, 16])
        assert torch.isfinite(loss) and loss > 0
        assert parts["loss"] == pytest.approx(float(loss.detach()))
        grads = torch.autograd.grad(loss, maps)
        # box and class terms only on the level that the box's size selects
        assert grads[level][:, 1:].abs().sum() > 0
        assert grads[1 - level][:, 1:].abs().sum() == 0


def test_levels_train_validate_and_evaluate_but_do_not_export(capsys, tmp_path):
    result = train("plain", epochs=1, seed=2, model_options={"levels": 2}, out_dir=tmp_path,
                   **{**TINY, "val_count": 8})
    assert "val_mAP50" in result.history[-1]
    model, _ = load_checkpoint(result.checkpoint)
    images, _ = _test_pixels(4)
    predictions = predict_levels(model, images)
    assert len(predictions) == 4
    for p in predictions:
        assert len(p["boxes"]) <= 100 and bool((p["scores"][:-1] >= p["scores"][1:]).all())
    with pytest.raises(CheckpointError, match="cannot be exported"):
        export_checkpoint(result.checkpoint, tmp_path / "x.bitdet")
    status = main(["eval", "--checkpoint", str(result.checkpoint), "--images", "4", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "mAP50" in out


def test_ifq_bundle_runs_in_integers_exactly(tmp_path):
    ifq = train("plain", epochs=1, seed=3, model_options={"ifq": True}, out_dir=tmp_path / "i",
                **TINY)
    bundle = load(export_checkpoint(ifq.checkpoint, tmp_path / "ifq.bitdet"))
    images, pixels = _test_pixels()
    acc, frac = run_bundle_fixed_point(bundle, pixels)
    assert acc.dtype == torch.int64 and frac.dtype == torch.int64
    float_map = run_bundle(bundle, pixels)
    assert torch.equal(torch.ldexp(acc.double(), -frac.reshape(1, -1, 1, 1)).float(), float_map)
    fixed, reference = predict_bundle_fixed_point(bundle, images), predict_bundle(bundle, images)
    for a, b in zip(fixed, reference, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    plain = train("plain", epochs=1, seed=3, out_dir=tmp_path / "p", **TINY)
    with pytest.raises(ValueError, match="powers of two"):
        run_bundle_fixed_point(load(export_checkpoint(plain.checkpoint, tmp_path / "p.bitdet")),
                               pixels)


def test_model_option_user_errors(teacher, tmp_path):
    with pytest.raises(TrainingError, match="available for method"):
        train("lws", epochs=1, teacher=teacher, model_options={"dup": 2}, out_dir=tmp_path,
              **TINY)
    with pytest.raises(TrainingError, match="raw_last is available for method"):
        train("lws", epochs=1, teacher=teacher, model_options={"raw_last": True},
              out_dir=tmp_path, **TINY)
    for bad, fragment in (({"raw_last": True, "host_bits": 4}, "does not combine"),
                          ({"raw_last": 1}, "true or false"),
                          ({"dup": 0}, "positive"), ({"levels": 4}, "1, 2 or 3"),
                          ({"binarizer": "xnor"}, "binarizer"), ({"host_bits": 9}, "2 to 8"),
                          ({"colour": 1}, "unknown model option")):
        with pytest.raises(TrainingError, match=fragment):
            train("plain", epochs=1, model_options=bad, out_dir=tmp_path, **TINY)
    with pytest.raises(TrainingError, match="unknown option"):      # quant needs quantnet
        train("plain", epochs=1, options={"quant": 1.0}, out_dir=tmp_path, **TINY)


def test_resume_refuses_changed_options(capsys, teacher, tmp_path):
    run = train("plain", epochs=1, seed=1, model_options={"binarizer": "quantnet"},
                out_dir=tmp_path / "q", **TINY).checkpoint
    with pytest.raises(TrainingError, match="keeps the checkpoint's options"):
        train(resume=run, epochs=2, options={"quant": 0.5}, out_dir=tmp_path / "r", **TINY)
    with pytest.raises(TrainingError, match="keeps the checkpoint's model"):
        train(resume=run, epochs=2, model_options={"dup": 2}, out_dir=tmp_path / "r", **TINY)
    same = train(resume=run, epochs=2, options={"quant": 0.01},
                 model_options={"binarizer": "quantnet"}, out_dir=tmp_path / "r", **TINY)
    assert len(same.history) == 2
    # the CLI: --method-option (new name) and --loss-weight (old spelling) on a resume
    for flag in ("--method-option", "--loss-weight"):
        status = main(["train", "--resume", str(run), "--epochs", "2", "--out",
                       str(tmp_path / "c"), flag, "quant=2"])
        out, err = capsys.readouterr()
        assert status == 2 and "keeps the checkpoint's options" in err
    status = main(["train", "--method", "plain", "--epochs", "1", "--train-images", "8",
                   "--val-images", "0", "--batch-size", "8", "--threads", "1", "--binarizer",
                   "quantnet", "--method-option", "quant=0.5", "--dup", "2", "--out",
                   str(tmp_path / "cli")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert " quant " in out
    ckpt = torch.load(tmp_path / "cli" / "last.pt", weights_only=True)
    assert ckpt["config"]["options"] == {"quant": 0.5}
    assert ckpt["config"]["model"]["dup"] == 2 and ckpt["config"]["model"]["binarizer"] == \
        "quantnet"
