"""Training (bitdet.sw.train), bundle evaluation and the train/export/eval CLI, on tiny runs."""

import hashlib
import json

import pytest
import torch

from bitdet.core.bundle import load
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes
from bitdet.sw.evaluate import evaluate_predictions, predict_bundle, predict_model, run_bundle
from bitdet.sw.files import OutputExists
from bitdet.sw.models import BinaryDetector, RealDetector
from bitdet.sw.train import (
    METHODS,
    CheckpointError,
    TrainingError,
    best_epoch,
    export_checkpoint,
    load_checkpoint,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: much faster than two oversubscribed ones on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = {"batch_size": 16, "train_count": 32, "val_count": 0, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run, and the same run resumed from its epoch-1 checkpoint (an interrupted
    run), plus a 1-epoch run."""
    root = tmp_path_factory.mktemp("train")
    straight = train("plain", epochs=2, seed=5, out_dir=root / "straight", **TINY)
    resumed = train(resume=root / "straight" / "epoch_001.pt", out_dir=root / "resumed", **TINY)
    first = train("plain", epochs=1, seed=5, out_dir=root / "first", **TINY)
    return root, straight, first, resumed


@pytest.fixture(scope="module")
def test_images():
    return make_digitscenes("test", count=6, seed=0)


def test_checkpoints_every_epoch(runs):
    root, straight, first, _ = runs
    assert sorted(p.name for p in (root / "straight").iterdir()) == [
        "epoch_001.pt", "epoch_002.pt", "last.pt"]
    ckpt = torch.load(straight.checkpoint, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["method"] == "plain"
    assert ckpt["config"]["seed"] == 5 and ckpt["config"]["train_count"] == 32
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "config", "history"}
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert len(first.history) == 1 and first.history[0]["train_loss"] > 0
    assert sorted(p.name for p in (root / "resumed").iterdir()) == ["epoch_002.pt", "last.pt"]
    assert not any("val_mAP50" in h for h in straight.history)  # no validation, no best.pt


def test_best_epoch_is_the_highest_validation_map_ties_to_the_later():
    def history(*scores):
        return [{"epoch": i + 1, "train_loss": 1.0,
                 **({} if v is None else {"val_mAP50": v})} for i, v in enumerate(scores)]

    assert best_epoch(history(0.5, 0.7, 0.6)) == 2
    assert best_epoch(history(0.5, 0.7, 0.7, 0.6)) == 3
    assert best_epoch(history(0.0, 0.0)) == 2
    assert best_epoch(history(0.9, 0.1, 0.2)) == 1
    assert best_epoch(history(None, None)) is None
    assert best_epoch([]) is None


def test_best_checkpoint_follows_the_validation_history(tmp_path, monkeypatch):
    """With validation images, best.pt is the epoch best_epoch() names, in the same format;
    a resumed run writes it only for a new epoch that is the history's best. The validation
    scores are scripted (a tiny run scores 0 every epoch, which would only test ties)."""
    import bitdet.sw.evaluate as evaluate

    scores = []
    monkeypatch.setattr(evaluate, "evaluate_predictions",
                        lambda *_: {"mAP50": scores.pop(0), "mAP": 0.0})
    run = dict(TINY, val_count=4)
    scores[:] = [0.3, 0.5, 0.4]
    result = train("plain", epochs=3, seed=3, out_dir=tmp_path / "a", **run)
    assert [h["val_mAP50"] for h in result.history] == [0.3, 0.5, 0.4]
    assert best_epoch(result.history) == 2
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    same = torch.load(tmp_path / "a" / "epoch_002.pt", weights_only=True)
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 3 and best["history"] == same["history"]
    assert all(torch.equal(best["model"][k], same["model"][k]) for k in same["model"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    _, loaded = load_checkpoint(tmp_path / "a" / "best.pt")
    assert loaded["epoch"] == 2

    scores[:] = [0.4]  # the history's best (epoch 2) came before the resume: no best.pt
    train(resume=tmp_path / "a" / "epoch_002.pt", out_dir=tmp_path / "b", **run)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["epoch_003.pt", "last.pt"]
    scores[:] = [0.5, 0.4]  # epoch 2 is new and ties nothing earlier
    train(resume=tmp_path / "a" / "epoch_001.pt", out_dir=tmp_path / "c", **run)
    assert torch.load(tmp_path / "c" / "best.pt", weights_only=True)["epoch"] == 2


def test_resume_reproduces_the_uninterrupted_run(runs):
    _, straight, _, resumed = runs
    losses = [{k: v for k, v in h.items() if k.startswith("train_")} for h in straight.history]
    assert [{k: v for k, v in h.items() if k.startswith("train_")}
            for h in resumed.history] == losses
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_exported_bundle_predicts_exactly_like_the_float_model(runs, test_images, tmp_path):
    _, straight, _, _ = runs
    path = export_checkpoint(straight.checkpoint, tmp_path / "m.bitdet")
    bundle = load(path)
    assert bundle.model["training"]["method"] == "plain"
    assert bundle.model["decode"]["prior"] == 16.0
    model, _ = load_checkpoint(straight.checkpoint)
    pixels = torch.from_numpy(test_images.images).to(torch.float32)[:, None]
    with torch.no_grad():
        assert torch.equal(model(pixels), run_bundle(bundle, pixels))
    # every cell passes a zero threshold, so all predictions are compared
    floats = predict_model(model, test_images, score_threshold=0.0)
    folded = predict_bundle(bundle, test_images, score_threshold=0.0)
    assert sum(len(p["boxes"]) for p in floats) > 0
    for f, g in zip(floats, folded, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(f[key], g[key]), key
    assert (evaluate_predictions(predict_model(model, test_images), test_images)
            == evaluate_predictions(predict_bundle(bundle, test_images), test_images))


def test_fp_method_trains_but_does_not_export(tmp_path):
    result = train("fp", epochs=1, batch_size=8, train_count=8, val_count=4,
                   out_dir=tmp_path, progress=False, threads=1)
    assert isinstance(result.model, RealDetector)
    assert 0.0 <= result.history[0]["val_mAP50"] <= 1.0
    with pytest.raises(CheckpointError, match="cannot be exported"):
        export_checkpoint(result.checkpoint, tmp_path / "x.bitdet")
    assert not (tmp_path / "x.bitdet").exists()
    with pytest.raises(CheckpointError, match="'fp' checkpoint, not 'plain'"):
        train("plain", resume=result.checkpoint, out_dir=tmp_path, progress=False)


def test_widths_option_builds_exports_and_guards_the_teacher(capsys, tmp_path):
    wide = [8, 16, 16, 32, 24]
    result = train("plain", epochs=1, widths=wide, out_dir=tmp_path / "w", **TINY)
    assert [b.conv.weight.shape[0] for b in result.model.blocks] == wide[1:]
    assert result.config.model["widths"] == wide
    bundle = load(export_checkpoint(result.checkpoint, tmp_path / "w.bitdet"))
    assert [layer.weights.shape[0] for layer in bundle.binary_layers] == wide[1:]
    assert bundle.input_shape[0] == wide[0]
    # a teacher of the default widths does not fit a wide student, and says why
    teacher = train("fp", epochs=1, out_dir=tmp_path / "t", **TINY)
    with pytest.raises(CheckpointError, match="teacher's widths"):
        train("ida", epochs=1, widths=wide, teacher=teacher.checkpoint, out_dir=tmp_path / "i",
              **TINY)
    with pytest.raises(TrainingError, match="cannot change them"):
        train(resume=result.checkpoint, epochs=2, widths=[16, 32, 64, 128, 128],
              out_dir=tmp_path / "w", **TINY)
    for bad, message in (([8, 16], "needs 5 values"), ([8, 16, 0, 32, 24], "from 1 to"),
                         ([8, 16, 2.5, 32, 24], "from 1 to"), (7, "sequence of integers")):
        with pytest.raises(TrainingError, match=message):
            train("plain", epochs=1, widths=bad, out_dir=tmp_path / "bad", **TINY)
    _one_line_error(*_cli(capsys, "train", "--method", "plain", "--widths", "8,16",
                          "--out", tmp_path / "c"), "needs 5 values")
    with pytest.raises(SystemExit):
        main(["train", "--method", "plain", "--widths", "8,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_init_from_copies_the_teachers_conv_signs(tmp_path):
    teacher = train("fp", epochs=1, seed=3, out_dir=tmp_path / "t", **TINY)
    result = train("plain", epochs=1, seed=4, init_from=teacher.checkpoint, out_dir=tmp_path / "s",
                   lr=1e-12, **TINY)         # a negligible step: the weights stay the copies
    t_model = teacher.model
    convs = [(result.model.stem.weight, t_model.stem[0].weight)] + [
        (b.conv.weight, t[0].weight)
        for b, t in zip(result.model.blocks, t_model.blocks, strict=True)]
    for mine, theirs in convs:
        assert torch.equal(torch.sign(mine), torch.sign(theirs))
        assert abs(float(mine.detach().std()) - 0.1) < 1e-3
    assert result.config.init_from == str(teacher.checkpoint)
    random_start = train("plain", epochs=1, seed=4, out_dir=tmp_path / "r", lr=1e-12, **TINY)
    assert not torch.equal(random_start.model.blocks[0].conv.weight,
                           result.model.blocks[0].conv.weight)
    with pytest.raises(TrainingError, match="SearchedBinaryConv2d"):
        train("lws", epochs=1, teacher=teacher.checkpoint, init_from=teacher.checkpoint,
              out_dir=tmp_path / "l", **TINY)
    with pytest.raises(TrainingError, match="dup 2"):
        train("plain", epochs=1, init_from=teacher.checkpoint, model_options={"dup": 2},
              out_dir=tmp_path / "d", **TINY)
    # fp: a warm start from every weight of the checkpoint (lr 0: the parameters stay)
    warm = train("fp", epochs=1, seed=5, init_from=teacher.checkpoint, out_dir=tmp_path / "f",
                 lr=0.0, **TINY)
    theirs = dict(t_model.named_parameters())
    for name, param in warm.model.named_parameters():
        assert torch.equal(param, theirs[name]), name
    cold = train("fp", epochs=1, seed=5, out_dir=tmp_path / "g", lr=0.0, **TINY)
    assert not torch.equal(cold.model.stem[0].weight, t_model.stem[0].weight)
    with pytest.raises(TrainingError, match="new run only"):
        train(resume=result.checkpoint, init_from=teacher.checkpoint, out_dir=tmp_path / "s",
              **TINY)
    with pytest.raises(CheckpointError, match="the --init-from checkpoint must be an 'fp'"):
        train("plain", epochs=1, init_from=result.checkpoint, out_dir=tmp_path / "p", **TINY)


def test_real_detector_matches_the_binary_topology():
    real, binary = RealDetector(), BinaryDetector()
    pixels = torch.rand(2, 1, 64, 64) * 255
    assert real(pixels).shape == binary(pixels).shape == (2, 15, 8, 8)
    assert real.stride == binary.stride == 8
    assert len(real.intermediates(pixels)) == len(binary.intermediates(pixels))


def test_methods_registry_and_user_errors(tmp_path):
    assert {"plain", "fp", "lws"} <= set(METHODS)
    assert METHODS["plain"].exportable and not METHODS["fp"].exportable
    with pytest.raises(TrainingError, match="unknown method"):
        train("xnor++", epochs=1, out_dir=tmp_path, **TINY)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="cuda"):
            train("plain", epochs=1, device="cuda", out_dir=tmp_path, **TINY)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
        load_checkpoint(bad)
    assert "weights_only" not in str(err.value)  # not torch's advice to load unsafely
    assert "tensors-only" in str(err.value)
    with pytest.raises(CheckpointError, match="a deployment bundle, not a training checkpoint"):
        load_checkpoint(_default_asset()[0])
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bitdet training checkpoint"):
        export_checkpoint(tmp_path / "other.pt", tmp_path / "o.bitdet")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(resume=tmp_path / "missing.pt", out_dir=tmp_path)


# ----------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _one_line_error(status, out, err, fragment):
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitdet: error: "), err
    assert fragment in lines[0], err


def test_cli_train_export_eval(capsys, tmp_path):
    status, out, err = _cli(capsys, "train", "--method", "plain", "--epochs", "1",
                            "--train-images", "16", "--val-images", "4", "--batch-size", "8",
                            "--threads", "1", "--out", tmp_path / "run")
    assert status == 0, err
    assert "epoch 1/1" in out and "val mAP@0.5" in out and "last.pt" in out
    ckpt = tmp_path / "run" / "last.pt"
    status, out, err = _cli(capsys, "export", ckpt, "--out", tmp_path / "m.bitdet")
    assert status == 0, err
    assert "bconv1" in out and (tmp_path / "m.bitdet").is_file()
    status, out, err = _cli(capsys, "eval", "--bundle", tmp_path / "m.bitdet", "--images", "4",
                            "--json")
    assert status == 0, err
    from_bundle = json.loads(out)
    assert from_bundle["images"] == 4 and from_bundle["split"] == "test"
    status, out, err = _cli(capsys, "eval", "--checkpoint", ckpt, "--images", "4", "--json")
    assert status == 0, err
    from_ckpt = json.loads(out)
    assert (from_ckpt["mAP50"], from_ckpt["mAP"]) == (from_bundle["mAP50"], from_bundle["mAP"])
    status, out, err = _cli(capsys, "eval", "--checkpoint", ckpt, "--images", "2")
    assert status == 0 and "mAP@0.5" in out and "mAP@[.5:.95]" in out
    # resume to a longer run
    status, out, err = _cli(capsys, "train", "--resume", ckpt, "--epochs", "2",
                            "--threads", "1", "--out", tmp_path / "run")
    assert status == 0, err
    assert "epoch 2/2" in out and (tmp_path / "run" / "epoch_002.pt").is_file()


def test_cli_user_errors(capsys, tmp_path):
    status, _out, err = _cli(capsys, "train", "--method", "fp", "--epochs", "1",
                            "--train-images", "4", "--val-images", "0", "--threads", "1",
                            "--out", tmp_path)
    assert status == 0, err
    _one_line_error(*_cli(capsys, "export", tmp_path / "last.pt", "--out", tmp_path / "f.bitdet"),
                    "cannot be exported")
    _one_line_error(*_cli(capsys, "export", tmp_path / "nope.pt", "--out", tmp_path / "f.bitdet"),
                    "no such checkpoint")
    _one_line_error(*_cli(capsys, "eval", "--bundle", tmp_path / "nope.bitdet"),
                    "no such bundle")
    _one_line_error(*_cli(capsys, "train", "--epochs", "1"), "--method is required")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--bundle", "a", "--checkpoint", "b"])
    assert exc.value.code == 2
    capsys.readouterr()


# ------------------------------------------------------------------ shipped default detector


def _default_asset():
    from importlib.resources import files
    folder = files("bitdet.sw") / "assets"
    return folder / "default.bitdet", json.loads((folder / "default.json").read_text())


def _eval_default(images):
    path, record = _default_asset()
    bundle = load(path)
    dataset = make_digitscenes(record["test"]["split"], count=images, seed=record["test"]["seed"])
    return record, evaluate_predictions(predict_bundle(bundle, dataset), dataset)


def test_default_bundle_loads_fits_icebreaker_and_is_described():
    from bitdet.core.config import load_config
    path, record = _default_asset()
    bundle = load(path)
    assert path.stat().st_size == record["bundle_bytes"] < 64 * 1024
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["bundle_sha256"]
    assert bundle.model["classes"] == [str(i) for i in range(10)]
    assert bundle.model["input"] == [1, 64, 64]
    assert bundle.model["training"] == {"method": record["method"], "seed": record["seed"],
                                        "epoch": record["recipe"]["epochs"]}
    assert load_config("icebreaker").fit_problems(bundle.requirements()) == []
    for key in ("commands", "train_wall_seconds", "versions"):
        assert record[key]
    assert record["versions"]["torch"]


def test_default_bundle_reproduces_its_recorded_subset_map():
    images = _default_asset()[1]["test_subset"]["images"]
    record, scores = _eval_default(images)
    assert scores["images"] == images
    assert scores["mAP50"] == pytest.approx(record["test_subset"]["bundle"]["mAP50"], abs=1e-9)
    assert scores["mAP"] == pytest.approx(record["test_subset"]["bundle"]["mAP"], abs=1e-9)
    # the export is exact: the bundle measured now scores what its float checkpoint scored
    # when it was trained (the checkpoint is not shipped; its figures are in default.json)
    assert scores["mAP50"] == pytest.approx(record["test_subset"]["checkpoint"]["mAP50"],
                                            abs=1e-9)
    assert scores["mAP"] == pytest.approx(record["test_subset"]["checkpoint"]["mAP"], abs=1e-9)


@pytest.mark.slow
def test_default_bundle_reproduces_its_recorded_test_map():
    record, scores = _eval_default(_default_asset()[1]["test"]["images"])
    assert scores["mAP50"] == pytest.approx(record["test"]["bundle"]["mAP50"], abs=1e-9)
    assert scores["mAP"] == pytest.approx(record["test"]["bundle"]["mAP"], abs=1e-9)


# ------------------------------------------------------------ nothing lost, nothing silent


def test_export_refuses_its_own_input_and_an_existing_bundle(runs, capsys, tmp_path):
    root, *_ = runs
    ckpt = root / "first" / "last.pt"
    before = ckpt.read_bytes()
    _one_line_error(*_cli(capsys, "export", ckpt, "--out", ckpt), "is the input")
    _one_line_error(*_cli(capsys, "export", ckpt, "--out", ckpt, "--force"), "is the input")
    assert ckpt.read_bytes() == before
    out = tmp_path / "m.bitdet"
    out.write_bytes(b"precious")
    _one_line_error(*_cli(capsys, "export", ckpt, "--out", out), "already exists (pass --force")
    assert out.read_bytes() == b"precious"
    status, _out, err = _cli(capsys, "export", ckpt, "--out", out, "--force")
    assert status == 0, err
    assert load(out).binary_layers and sorted(p.name for p in tmp_path.iterdir()) == ["m.bitdet"]


def test_train_refuses_a_folder_that_holds_a_run(runs, capsys):
    root, *_ = runs
    _one_line_error(*_cli(capsys, "train", "--method", "plain", "--epochs", "1",
                          "--train-images", "4", "--val-images", "0", "--out", root / "first"),
                    "the run folder already holds files (choose a new folder, or pass --force")
    with pytest.raises(OutputExists, match="already holds files"):
        train("plain", epochs=1, out_dir=root / "straight", **TINY)


def test_resume_continues_in_the_checkpoints_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train("plain", epochs=1, seed=5, out_dir=run, **TINY)
    monkeypatch.chdir(tmp_path)                     # ./runs/train must stay untouched
    result = train(resume=run / "last.pt", epochs=2, **TINY)
    assert result.checkpoint == run / "last.pt"
    assert sorted(p.name for p in run.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert not (tmp_path / "runs").exists()
    # resuming from epoch 1 again would overwrite epoch_002.pt of the continued run
    with pytest.raises(OutputExists, match=r"resuming from epoch 1 would overwrite "
                                            r"epoch_002\.pt"):
        train(resume=run / "epoch_001.pt", epochs=2, **TINY)
    train(resume=run / "epoch_001.pt", epochs=2, force=True, **TINY)


@pytest.mark.parametrize(("option", "value", "name"), [
    ("--seed", "6", "--seed 5"), ("--train-images", "64", "--train-images 32"),
    ("--batch-size", "8", "--batch-size 16"), ("--lr", "0.01", "--lr 0.002"),
    ("--val-images", "4", "--val-images 0")])
def test_resume_refuses_a_differing_setting_naming_it(runs, capsys, option, value, name):
    root, *_ = runs
    _one_line_error(*_cli(capsys, "train", "--resume", root / "first" / "last.pt", "--epochs",
                          "2", option, value), f"keeps the checkpoint's {name}; cannot change")
