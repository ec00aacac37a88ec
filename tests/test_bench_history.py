"""bench/plot_history.py: reading histories from checkpoints, the summary line, the user
errors, and the PNG."""

import pytest
import torch

from bitdet.sw.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def ph(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import plot_history
    return plot_history


def _run(folder, scores, losses=None):
    """A training folder whose last.pt holds a history with these validation scores."""
    losses = losses or [1.0 / (i + 1) for i in range(len(scores))]
    history = [{"epoch": i + 1, "lr": 0.001, "train_loss": loss, "val_mAP50": score,
                "val_mAP": score / 2, "seconds": 1.0}
               for i, (score, loss) in enumerate(zip(scores, losses, strict=True))]
    folder.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "method": "plain", "history": history}, folder / "last.pt")
    return folder


def test_series_from_folder_or_file_and_labels(ph, tmp_path):
    run = _run(tmp_path / "ida_s0", [0.5, 0.7, 0.6])
    assert ph.read_series(run, "val_mAP50") == ([1, 2, 3], [0.5, 0.7, 0.6])
    assert ph.read_series(run / "last.pt", "val_mAP") == ([1, 2, 3], [0.25, 0.35, 0.3])
    assert ph.default_label(run) == ph.default_label(run / "last.pt") == "ida_s0"


def test_summary_last_best_and_ties_to_the_later_epoch(ph):
    assert ph.summary("r", [1, 2, 3], [0.5, 0.7, 0.6], False) == \
        "r: 3 epochs, last 0.6000 (epoch 3), best 0.7000 (epoch 2)"
    assert "best 0.7000 (epoch 3)" in ph.summary("r", [1, 2, 3], [0.7, 0.5, 0.7], False)
    assert "best 0.2000 (epoch 3)" in ph.summary("r", [1, 2, 3], [0.9, 0.2, 0.2], True)


def test_user_errors_are_one_line(ph, tmp_path, capsys):
    run = _run(tmp_path / "r", [0.5])
    assert ph.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_history: error:") and "no such checkpoint" in err
    assert ph.main([str(run), "--metric", "val_map", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no 'val_map'" in err and "val_mAP50" in err and err.count("\n") == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert ph.main([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ph.main([str(run), "--label", "a", "b", "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert not (tmp_path / "x.png").exists()


def test_plot_writes_png_and_prints_the_table(ph, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _run(tmp_path / "a", [0.5, 0.7, 0.6])
    b = _run(tmp_path / "b", [0.4, 0.8])
    teacher = _run(tmp_path / "teacher", [0.8, 0.9])
    out = tmp_path / "img" / "curves.png"
    assert ph.main([str(a), str(b), "--label", "A", "B", "--ref", str(teacher),
                    "--out", str(out), "--title", "t"]) == 0
    text = capsys.readouterr().out
    assert "A: 3 epochs, last 0.6000 (epoch 3), best 0.7000 (epoch 2)" in text
    assert "B: 2 epochs, last 0.8000" in text
    assert "teacher (ref): 2 epochs, last 0.9000" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(out) as image:
        assert image.size == (770, 462)
