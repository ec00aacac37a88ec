"""bitdet.sw.files: atomic writes, the refusal rule and unique output names."""

from __future__ import annotations

import pytest

from bitdet.sw.files import (
    OutputExists,
    atomic_path,
    atomic_write,
    check_new_file,
    check_new_folder,
    unique_names,
)


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_refusal_rule(tmp_path):
    existing = tmp_path / "x.bitdet"
    existing.write_text("x")
    with pytest.raises(OutputExists, match=r"x\.bitdet: already exists \(pass --force"):
        check_new_file(existing)
    assert check_new_file(existing, force=True) == existing
    with pytest.raises(OutputExists, match="is the input"):
        check_new_file(tmp_path / "." / "x.bitdet", force=True, inputs=[existing])
    check_new_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_new_folder(tmp_path / "empty")
    with pytest.raises(OutputExists, match="already holds files"):
        check_new_folder(tmp_path)
    check_new_folder(tmp_path, force=True)


def test_unique_names():
    assert unique_names(["a.png", "b.jpg"], ".detect.png") == ["a.detect.png", "b.detect.png"]
    assert unique_names(["d1/scene.png", "d2/scene.png", "d1/scene.jpg"], ".detect.png") == [
        "d1-scene.png.detect.png", "d2-scene.png.detect.png", "scene.jpg.detect.png"]
    assert unique_names(["a.png", "a.png"], ".d.png") == ["a.d.png", "a-2.d.png"]
