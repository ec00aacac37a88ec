"""`bitdet train --arch residual`: the contract-v2 residual detector through the same
training loop, checkpoints and CLI as the plain chain — plain (W1A2 and W1A1 with a 2-bit
residual stream), its real-valued counterpart fp, the distillation methods ida and lws —
then `bitdet export` to a format-2 bundle whose evaluation equals the checkpoint's, `bitdet
eval --bundle`, `bitdet detect --bundle` on the contract-2 emulator, resume, and the
refusals of what the residual architecture does not support. Seconds-long runs, one thread.
"""

import json

import pytest
import torch

from bitdet.core.bundle import load
from bitdet.core.golden import BinaryConvLayer
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes
from bitdet.sw.evaluate import run_bundle
from bitdet.sw.models import ResidualBinaryDetector, ResidualRealDetector
from bitdet.sw.train import TrainingError, load_checkpoint, residual_methods, train

SAMPLE = "sw/assets/sample.png"
#: tiny residual runs: widths 8,8,16,16,16 (strides 1,2,2,1), 64 images, one epoch
TINY = ["--widths", "8,8,16,16,16", "--train-images", "64", "--val-images", "16",
        "--batch-size", "16", "--threads", "1", "--seed", "3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()                 # what earlier commands (and fixtures) printed
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _train(capsys, out, *argv) -> None:
    status, _out, err = _cli(capsys, "train", "--arch", "residual", *argv, "--out", out)
    assert status == 0, err


def _eval(capsys, *argv) -> dict:
    status, out, err = _cli(capsys, "eval", *argv, "--split", "test", "--images", "48",
                            "--seed", "0", "--json")
    assert status == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("residual_runs")


@pytest.fixture(scope="module")
def teacher(root):
    """The fp counterpart (one epoch) that ida and lws learn from."""
    path = root / "fp"
    assert main(["train", "--arch", "residual", "--method", "fp", "--epochs", "1", *TINY,
                 "--out", str(path)]) == 0
    return path / "last.pt"


@pytest.fixture(scope="module")
def plain_run(root):
    """A plain W1A2 run long enough to detect digits (4 epochs × 384 images), with its
    epoch-2 checkpoint for the resume test."""
    path = root / "plain"
    assert main(["train", "--arch", "residual", "--method", "plain", "--epochs", "4",
                 "--widths", "16,16,32,32,32", "--train-images", "384", "--val-images", "0",
                 "--lr", "0.004", "--threads", "1", "--out", str(path)]) == 0
    return path


def _assert_bundle_equals_checkpoint(capsys, checkpoint, bundle_path) -> dict:
    """The bundle's head maps equal the eval-mode model's bit for bit, and `bitdet eval`
    gives the same scores for both."""
    model, _ = load_checkpoint(checkpoint)
    bundle = load(bundle_path)
    assert bundle.format_version == 2 and bundle.uses_v2()
    data = make_digitscenes("test", count=8, seed=1)
    pixels = torch.from_numpy(data.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(run_bundle(bundle, pixels.to(torch.int64)), model(pixels))
    from_bundle = _eval(capsys, "--bundle", bundle_path)
    from_checkpoint = _eval(capsys, "--checkpoint", checkpoint)
    for key in ("mAP50", "mAP", "detections"):
        assert from_bundle[key] == from_checkpoint[key], key
    return from_checkpoint


def test_plain_w1a2_trains_exports_and_evaluates_exactly(capsys, plain_run, tmp_path):
    ckpt = torch.load(plain_run / "last.pt", weights_only=True)
    assert ckpt["config"]["arch"] == "residual" and ckpt["method"] == "plain"
    assert ckpt["config"]["model"]["act_bits"] == 2
    assert ckpt["config"]["model"]["residual_bits"] == 0
    assert sorted(p.name for p in plain_run.iterdir()) == [
        "epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "epoch_004.pt", "last.pt"]
    model, _ = load_checkpoint(plain_run / "last.pt")
    assert isinstance(model, ResidualBinaryDetector)
    status, out, err = _cli(capsys, "export", plain_run / "last.pt", "--out",
                            tmp_path / "plain.bitdet")
    assert status == 0, err
    assert "format-2 graph bundle" in out and "res1, res2, res3, res4" in out
    scores = _assert_bundle_equals_checkpoint(capsys, plain_run / "last.pt",
                                              tmp_path / "plain.bitdet")
    assert scores["mAP50"] > 0 and scores["detections"] > 0     # not a vacuous equality
    bundle = load(tmp_path / "plain.bitdet")
    assert bundle.model["training"] == {"method": "plain", "epoch": 4, "seed": 0}
    assert bundle.input_bits == 2 and bundle.output_bits() == 2


def test_detect_runs_the_exported_bundle_on_the_contract2_emulator(capsys, plain_run,
                                                                    tmp_path):
    bundle = tmp_path / "plain.bitdet"
    assert main(["export", str(plain_run / "last.pt"), "--out", str(bundle)]) == 0
    capsys.readouterr()
    status, out, err = _cli(capsys, "detect", SAMPLE, "--bundle", bundle, "--out",
                            tmp_path / "det", "--score-threshold", "0.05", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["config"] == "contract2" and report["backend"] == "emu"


def test_resume_continues_exactly(capsys, plain_run, tmp_path):
    """Resumed from epoch 2 of the 4-epoch run (the same total), the run ends with the same
    weights and history as the uninterrupted one."""
    status, _out, err = _cli(capsys, "train", "--resume", plain_run / "epoch_002.pt",
                             "--threads", "1", "--out", tmp_path / "resumed")
    assert status == 0, err
    straight = torch.load(plain_run / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 4 and resumed["config"]["arch"] == "residual"
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in straight["history"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"}
                     for e in resumed["history"]]


def test_fp_counterpart_trains_and_refuses_export(capsys, teacher, plain_run, tmp_path):
    model, ckpt = load_checkpoint(teacher)
    assert isinstance(model, ResidualRealDetector) and ckpt["config"]["arch"] == "residual"
    assert [b.conv.stride for b in model.blocks] == [(1, 1), (2, 2), (2, 2), (1, 1)]
    assert model.stride == 8
    _eval(capsys, "--checkpoint", teacher)
    status, _out, err = _cli(capsys, "export", teacher, "--out", tmp_path / "fp.bitdet")
    assert status == 2 and "cannot be exported" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method", ["ida", "lws"])
def test_distillation_on_the_residual_blocks(method, capsys, teacher, root, tmp_path):
    out = root / method
    _train(capsys, out, "--method", method, "--teacher", teacher, "--epochs", "1", *TINY)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    history = ckpt["history"][-1]
    terms = {"ida": ("train_p", "train_r"), "lws": ("train_ang", "train_amp", "train_w",
                                                      "train_lim")}[method]
    for term in terms:
        assert term in history and history[term] == history[term], term    # finite
    assert _cli(capsys, "export", out / "last.pt", "--out", tmp_path / "m.bitdet")[0] == 0
    _assert_bundle_equals_checkpoint(capsys, out / "last.pt", tmp_path / "m.bitdet")


def test_w1a1_with_a_two_bit_residual_stream(capsys, teacher, root, tmp_path):
    """--act-bits 1: 1-bit activations, the shortcuts on a 2-bit residual stream (node
    res{i}.res), initialised from the fp counterpart and distilled by ida."""
    out = root / "w1a1"
    _train(capsys, out, "--method", "ida", "--act-bits", "1", "--teacher", teacher,
           "--init-from", teacher, "--epochs", "1", *TINY)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["model"]["act_bits"] == 1
    assert ckpt["config"]["model"]["residual_bits"] == 2
    assert main(["export", str(out / "last.pt"), "--out", str(tmp_path / "w1a1.bitdet")]) == 0
    bundle = load(tmp_path / "w1a1.bitdet")
    convs = {n.name: n for n in bundle.nodes() if isinstance(n.op, BinaryConvLayer)}
    assert list(convs) == ["res1", "res1.res", "res2", "res2.res", "res3", "res3.res", "res4"]
    assert convs["res4"].op.output_bits == 1 and convs["res3.res"].op.output_bits == 2
    assert convs["res2"].op.in_bits == 1 and convs["res2"].op.shortcut_bits == 2
    assert [convs[f"res{i}"].shortcut for i in (1, 2, 3, 4)] == [
        "input", "res2.repeat", "res3.pool", "res3.res"]
    inputs = {n.name: n.input for n in bundle.nodes()}
    assert inputs["res2.pool"] == "res1.res" and inputs["res3.pool"] == "res2.res"
    _assert_bundle_equals_checkpoint(capsys, out / "last.pt", tmp_path / "w1a1.bitdet")


def test_residual_methods_are_the_registry():
    assert residual_methods() == ["plain", "fp", "lws", "ida", "bidet", "rbcn", "kr"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "plain", "--levels", "2"], "model option(s) levels are for arch 'chain'"),
    (["--method", "plain", "--raw-last"], "model option(s) raw_last are for arch 'chain'"),
    (["--method", "plain", "--widths", "16,24,48,96,96"],
     "residual block 1's width 24 must be a multiple of the width before it, 16"),
    (["--method", "plain", "--widths", "16,32,64"], "widths needs 5 values"),
])
def test_unsupported_combinations_are_one_line_errors(argv, message, capsys, tmp_path):
    status, _out, err = _cli(capsys, "train", "--arch", "residual", *argv, "--epochs", "1",
                             "--out", tmp_path / "x")
    assert status == 2 and message in err and len(err.splitlines()) == 1, err


def test_chain_refuses_residual_options(capsys, tmp_path):
    status, _out, err = _cli(capsys, "train", "--method", "plain", "--act-bits", "1",
                             "--epochs", "1", "--out", tmp_path / "x")
    assert status == 2 and "act_bits" in err and "arch 'residual'" in err


def test_teacher_of_the_other_arch_and_resume_with_another_arch(capsys, teacher, plain_run,
                                                                tmp_path):
    chain_fp = train("fp", epochs=1, batch_size=16, train_count=16, val_count=0,
                     widths=[8, 8, 16, 16, 16], out_dir=tmp_path / "chain_fp", progress=False,
                     threads=1)
    status, _out, err = _cli(capsys, "train", "--arch", "residual", "--method", "ida",
                             "--teacher", chain_fp.checkpoint, "--epochs", "1", *TINY,
                             "--out", tmp_path / "x")
    assert status == 2 and "arch 'chain'" in err and "student's arch is 'residual'" in err
    status, _out, err = _cli(capsys, "train", "--method", "ida", "--teacher", teacher,
                             "--epochs", "1", *TINY, "--out", tmp_path / "y")
    assert status == 2 and "arch 'residual', the student's arch is 'chain'" in err
    status, _out, err = _cli(capsys, "train", "--resume", plain_run / "last.pt", "--arch",
                             "chain", "--out", tmp_path / "z")
    assert status == 2 and "keeps the checkpoint's arch 'residual'" in err
    with pytest.raises(TrainingError, match="unknown arch 'dense'"):
        train("plain", arch="dense", out_dir=tmp_path / "w")
