"""Tests of the ``bitdet`` command line (bitdet.sw.cli), in-process through ``main``.

User mistakes must end with exit status 2 and one ``bitdet: error:`` line on stderr,
never a traceback; argparse errors exit with status 2 through SystemExit.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bitdet.core.bundle import FORMAT, _requirements_json, load
from bitdet.sw.cli import main
from bitdet.sw.demo import build_demo


@pytest.fixture(scope="module")
def demo_bundle():
    return build_demo(0)[2]


@pytest.fixture(scope="module")
def bundle_file(demo_bundle, tmp_path_factory) -> Path:
    return demo_bundle.save(tmp_path_factory.mktemp("cli") / "model.bitdet")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, out: str, err: str, fragment: str) -> None:
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bitdet: error: "), err
    assert fragment in lines[0], err


# --------------------------------------------------------------------------- demo


def test_demo_writes_a_valid_bundle(capsys, tmp_path):
    out_path = tmp_path / "x.bitdet"
    status, out, err = run_cli(capsys, "demo", "--out", out_path)
    assert status == 0, out + err
    assert err == ""
    assert "all layers bit-exact" in out
    assert str(out_path) in out
    for name in ("bconv1", "bconv2", "bconv3", "bconv4"):
        assert name in out
    assert "DIFFER" not in out
    assert out_path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x.bitdet"]
    loaded = load(out_path)
    assert loaded.model["seed"] == 0
    assert loaded.layer_names == ["bconv1", "bconv2", "bconv3", "bconv4"]


def test_demo_seed_and_images(capsys, tmp_path):
    out_path = tmp_path / "seeded.bitdet"
    status, out, _err = run_cli(capsys, "demo", "--out", out_path, "--seed", "5",
                                "--images", "1")
    assert status == 0
    assert "seed 5" in out and "1 random images" in out
    assert "all layers bit-exact" in out
    assert load(out_path).model["seed"] == 5


@pytest.mark.parametrize("images", ["0", "-3", "two"])
def test_demo_images_must_be_positive(images, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(tmp_path / "x.bitdet"), "--images", images])
    assert info.value.code == 2
    _out, err = capsys.readouterr()
    assert "--images" in err and "expected a positive integer" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_into_a_missing_directory(capsys, tmp_path):
    status, out, err = run_cli(capsys, "demo", "--out", tmp_path / "no" / "such" / "x.bitdet")
    assert status == 2
    assert "Traceback" not in err
    assert err.startswith("bitdet: error: ") and len(err.strip().splitlines()) == 1
    assert "all layers bit-exact" not in out


# --------------------------------------------------------------------------- bundle info


def test_bundle_info_table(capsys, bundle_file):
    status, out, err = run_cli(capsys, "bundle", "info", bundle_file)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{bundle_file}: model 'bitdet-demo', binary input 13×32×32"
    assert lines[1].split()[:3] == ["host", "stem", "conv_threshold"]
    assert lines[1].endswith("weight 13×3×3×3")
    assert lines[2].split()[:3] == ["host", "head", "conv_affine"]
    binary = [line.split() for line in lines if line.lstrip().startswith("binary ")]
    assert [b[1] for b in binary] == ["bconv1", "bconv2", "bconv3", "bconv4"]
    assert binary[0][2:5] == ["13×32×32", "→", "24×16×16"]
    assert "K=117" in binary[0] and "1-bit" in binary[0] and "2/2" in binary[0]
    assert binary[2][2:5] == ["33×16×16", "→", "40×8×8"] and "3×3/s2" in binary[2]
    assert binary[3][2:5] == ["40×8×8", "→", "70×8×8"] and "K=40" in binary[3]
    assert lines[-1].startswith("requirements: max K 297, max in/out channels 40/70")


def test_bundle_info_raw_last_layer(capsys, demo_bundle, tmp_path):
    from bitdet.core.bundle import Bundle
    from bitdet.core.golden import BinaryConvLayer
    last = demo_bundle.binary_layers[-1]
    layers = [*demo_bundle.binary_layers[:-1],
              BinaryConvLayer(last.weights, None, stride=last.stride, padding=last.padding,
                              pad_value=last.pad_value)]
    path = Bundle(binary_layers=layers, input_shape=demo_bundle.input_shape).save(
        tmp_path / "raw.bitdet")
    status, out, _err = run_cli(capsys, "bundle", "info", path)
    assert status == 0
    assert "model '?'" in out.splitlines()[0]
    assert "raw P" in next(line for line in out.splitlines() if "binary3" in line)


def test_bundle_info_json(capsys, bundle_file, demo_bundle):
    status, out, err = run_cli(capsys, "bundle", "info", "--json", bundle_file)
    assert status == 0 and err == ""
    info = json.loads(out)
    assert info["requirements"] == _requirements_json(demo_bundle.requirements())
    assert info["requirements"]["max_k"] == 297
    assert info["requirements"]["layer_shapes"][0] == [13, 24, 3, 3, [32, 32], [16, 16]]
    assert info["layers"] == ["bconv1", "bconv2", "bconv3", "bconv4"]
    assert info["host_layers"] == ["stem", "head"]
    assert info["input_shape"] == [13, 32, 32]
    assert info["model"]["name"] == "bitdet-demo"
    # the same as the manifest's requirements
    with zipfile.ZipFile(bundle_file) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == FORMAT
    assert info["requirements"] == manifest["requirements"]


def _flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    corrupted = bytearray(data)
    corrupted[position] ^= mask
    return bytes(corrupted)


def _member_data_start(data: bytes, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        offset = zf.getinfo(name).header_offset
    n, m = struct.unpack("<HH", data[offset + 26:offset + 30])
    return offset + 30 + n + m


def _central_directory_offset(data: bytes, name: str) -> int:
    end = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack("<I", data[end + 16:end + 20])
    while data[offset:offset + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[offset + 28:offset + 34])
        if data[offset + 46:offset + 46 + n].decode() == name:
            return offset
        offset += 46 + n + m + k
    raise KeyError(name)


def _with_member(data: bytes, name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename,
                          content if info.filename == name else zin.read(info.filename))
    return out.getvalue()


def _manifest(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read("manifest.json")


def _npy(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


BAD_FILES = {
    "garbage": (lambda data: np.random.default_rng(3).bytes(2000), "wrong magic"),
    "empty": (lambda data: b"", "wrong magic"),
    "truncated": (lambda data: data[: len(data) // 2], "truncated or corrupt bundle"),
    "last byte cut": (lambda data: data[:-1], "truncated or corrupt bundle"),
    "CRC": (lambda data: _flip(data, _member_data_start(data, "binary/1/weights.npy") + 40),
            "'binary/1/weights.npy'"),
    "version 3": (lambda data: _with_member(data, "manifest.json",
                                            _manifest(data).replace(b'"version": 1',
                                                                    b'"version": 3')),
                  "upgrade bitdet"),
    "threshold out of range": (lambda data: _with_member(
        data, "binary/3/thresholds.npy", _npy(np.full((70, 1), 42, dtype=np.int32))),
        "threshold 42 out of range"),
    # the two below once ended in a traceback (load bugs, fixed; tests/test_bundle.py)
    "encrypted flag in the ZIP directory": (
        lambda data: _flip(data, _central_directory_offset(data, "manifest.json") + 8, 0x01),
        "manifest.json"),
    "thresholds with 3 levels": (lambda data: _with_member(
        data, "binary/3/thresholds.npy", _npy(np.zeros((70, 2), dtype=np.int32))),
        "thresholds"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bundle_info_bad_file(case, capsys, bundle_file, tmp_path):
    make, fragment = BAD_FILES[case]
    path = tmp_path / "bad.bitdet"
    path.write_bytes(make(bundle_file.read_bytes()))
    try:
        status, out, err = run_cli(capsys, "bundle", "info", path)
    except Exception as e:           # what the user would see as a traceback
        pytest.fail(f"bitdet bundle info crashed with {type(e).__name__}: {e}")
    assert_one_line_error(status, out, err, fragment)
    assert str(path) in err


@pytest.mark.parametrize("json_flag", [False, True])
def test_bundle_info_missing_file(json_flag, capsys, tmp_path):
    path = tmp_path / "missing.bitdet"
    argv = ["bundle", "info", *(["--json"] if json_flag else []), path]
    status, out, err = run_cli(capsys, *argv)
    assert_one_line_error(status, out, err, "no such bundle file")
    assert str(path) in err


def test_bundle_info_on_a_directory(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "bundle", "info", tmp_path), "no such bundle file")


@pytest.mark.parametrize("argv", [
    [], ["bundle"], ["bundle", "info"], ["frobnicate"], ["bundle", "info", "a", "b"],
    ["demo", "--seed", "x"],
], ids=["nothing", "bundle", "info without file", "unknown", "two files", "seed"])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _out, err = capsys.readouterr()
    assert "usage: bitdet" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("bitdet ")


# --------------------------------------------------------------------------- console script


def _console_script() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "bitdet"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("bitdet")
    if found is None:
        pytest.fail("the bitdet console script is not installed (pip install -e .)")
    return found


def test_console_script_help():
    result = subprocess.run([_console_script(), "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bitdet")
    assert "demo" in result.stdout and "bundle" in result.stdout


def test_console_script_error_exit_status(tmp_path):
    result = subprocess.run([_console_script(), "bundle", "info", str(tmp_path / "no.bitdet")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("bitdet: error: ") and "Traceback" not in result.stderr


def test_python_m_cli():
    """The module runs as a script too: ``python -m bitdet.sw.cli``."""
    result = subprocess.run([sys.executable, "-m", "bitdet.sw.cli", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "bundle" in result.stdout


# ----------------------------------------------------------- nothing lost, nothing silent


def test_demo_refuses_to_replace_without_force(capsys, tmp_path):
    out_path = tmp_path / "x.bitdet"
    out_path.write_bytes(b"precious")
    status, out, err = run_cli(capsys, "demo", "--out", out_path)
    assert_one_line_error(status, out, err, "already exists (pass --force")
    assert out_path.read_bytes() == b"precious"
    status, out, err = run_cli(capsys, "demo", "--out", out_path, "--force")
    assert status == 0, err
    assert load(out_path).model["name"] == "bitdet-demo"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bitdet"]


def test_hw_verilog_refuses_to_replace_without_force(capsys, tmp_path):
    pytest.importorskip("amaranth")
    (tmp_path / "bitdet_top.v").write_text("// mine\n")
    status, out, err = run_cli(capsys, "hw", "verilog", "--config", "tiny", "--out", tmp_path)
    assert_one_line_error(status, out, err, "bitdet_top.v: already exists (pass --force")
    assert (tmp_path / "bitdet_top.v").read_text() == "// mine\n"
    assert not (tmp_path / "config.json").exists()


def test_help_does_not_import_torch():
    """`bitdet --help` answers at once: the parser imports neither torch nor numpy."""
    code = ("import sys; from bitdet.sw.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_method_help_is_the_registry():
    from bitdet.sw.cli import METHOD_HELP
    from bitdet.sw.train import METHODS
    assert METHOD_HELP == {m.name: m.description for m in METHODS.values()}


def test_default_threads_is_half_the_cores(monkeypatch):
    import os

    from bitdet.sw import cli
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert cli.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert cli.default_threads() == 8
    assert "half the CPU cores" in cli.build_parser()._subparsers._group_actions[0].choices[
        "train"].format_help()


def test_commands_name_their_extra_in_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cocotb", None)       # the sim extra is missing
    status, out, err = run_cli(capsys, "detect", "x.png", "--backend", "rtl")
    assert_one_line_error(status, out, err, 'pip install -e ".[sim]"')


def test_rtl_backend_says_that_it_builds(capsys, monkeypatch):
    pytest.importorskip("cocotb")
    from bitdet.sw import detect
    from bitdet.sw.driver.errors import DriverError

    def stop(*args, **kwargs):
        raise DriverError("stopped here")
    monkeypatch.setattr(detect, "run_detect", stop)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)     # on a terminal
    status, _out, err = run_cli(capsys, "detect", "x.png", "--backend", "rtl")
    assert status == 2
    assert err.splitlines()[0].startswith("bitdet: building the RTL simulation with Verilator")
