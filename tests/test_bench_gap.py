"""bench/plot_gap.py: reading scores, the gap table (means, standard deviations, gaps and
their standard errors), the user errors, and the PNG."""

import math

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def pg(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import plot_gap
    return plot_gap


def _csv(path, rows, header="group,run,mAP50,mAP"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


ROWS = [("bin", "b0", 0.80, 0.5), ("bin", "b1", 0.82, 0.5), ("teacher", "t0", 0.85, 0.6),
        ("fp", "f0", 0.84, 0.6), ("fp", "f1", 0.86, 0.6)]


def test_table_means_gaps_and_standard_errors(pg, tmp_path):
    groups = pg.read_scores(_csv(tmp_path / "s.csv", ROWS), "mAP50")
    assert list(groups) == ["bin", "teacher", "fp"]
    assert groups["fp"] == [("f0", 0.84), ("f1", 0.86)]
    lines = pg.gap_table(groups, "bin", "mAP@0.5")
    sd = math.sqrt(2 * 0.01 ** 2)                                   # stdev of 0.80, 0.82
    assert lines[0] == f"bin: 2 runs (0.8000, 0.8200), mAP@0.5 0.8100 ± {sd:.4f}"
    # one teacher run counts as exact: the error is the students' alone
    assert lines[1] == (f"teacher: 1 run, mAP@0.5 0.8500; +4.00 points over bin "
                        f"(standard error {100 * sd / math.sqrt(2):.2f})")
    assert lines[2].endswith(f"+4.00 points over bin (standard error {100 * sd:.2f})")


def test_user_errors_are_one_line(pg, tmp_path, capsys):
    out = tmp_path / "x.png"
    cases = [
        (tmp_path / "nope.csv", "no such file"),
        (_csv(tmp_path / "h.csv", ROWS, header="group,name,mAP50,mAP"), "missing: run"),
        (_csv(tmp_path / "e.csv", []), "at least one row"),
        (_csv(tmp_path / "n.csv", [("bin", "b0", "high", 0.5)]), "n.csv:2: mAP50 'high'"),
        (_csv(tmp_path / "p.csv", [("bin", "b0", 82.0, 0.5)]), "outside [0, 1]"),
        (_csv(tmp_path / "g.csv", [("fp", "f0", 0.8, 0.5)]), "no group 'bin' (groups: fp)"),
    ]
    for path, message in cases:
        assert pg.main([str(path), "--student", "bin", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("plot_gap: error:") and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        pg.main([str(cases[0][0]), "--student", "bin", "--target", "-1", "--out", str(out)])
    assert exc.value.code == 2
    assert not out.exists()


def test_plot_writes_png_and_prints_the_table(pg, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "img" / "gap.png"
    assert pg.main([str(_csv(tmp_path / "s.csv", ROWS)), "--student", "bin", "--metric",
                    "mAP", "--out", str(out), "--title", "t"]) == 0
    text = capsys.readouterr().out
    assert "fp: 2 runs (0.6000, 0.6000), mAP@[.5:.95] 0.6000 ± 0.0000; +10.00 points" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_gap_figure_data_gives_the_documented_gaps(pg):
    """docs/img/gap_32k.csv holds the scores docs/results.md quotes (32000 test images)."""
    lines = pg.gap_table(pg.read_scores(ROOT / "docs/img/gap_32k.csv", "mAP50"),
                         "students", "mAP@0.5")
    assert lines[0].endswith("mAP@0.5 0.9035 ± 0.0068")
    assert "+1.92 points over students" in lines[1]
    assert "+2.00 points over students" in lines[2]
    assert "+3.38 points over students" in lines[3]
    assert "+3.57 points over students" in lines[4]
