# amaranth: UnusedElaboratable=no
"""``bitdet sim layer``: one layer through the top-level RTL from the command line (a real
Verilator run of the tiny config), a bundle's layer, the trace, and the user errors (one
``bitdet: error:`` line, exit status 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")

from bitdet.core import golden
from bitdet.core.bundle import Bundle
from bitdet.sim.runner import fst_available
from bitdet.sw.cli import main


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    """Binary layers: 3×3, 1×1, and 3×3 with a 2×2 max-pool; 1-bit outputs."""
    rng = np.random.default_rng(0)

    def layer(c, o, k, **kw):
        w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(o, c, k, k)))
        t = torch.from_numpy(rng.integers(c * k * k // 2 - 3, c * k * k // 2 + 4, size=(o, 1)))
        return golden.BinaryConvLayer(w, t, **kw)

    bundle = Bundle([layer(6, 9, 3, padding=1), layer(9, 5, 1),
                     layer(5, 4, 3, padding=1, pool=(2, 2))], input_shape=(6, 5, 4))
    return bundle.save(tmp_path_factory.mktemp("sim") / "net.bitdet")


def test_random_layer_matches(capsys):
    status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", "--cin", 7,
                               "--cout", 5, "--hw", 5, 4, "--kernel", 3, "--stride", 2,
                               "--seed", 3, "--idle", 0.2, "--backpressure", 0.2)
    assert status == 0, err
    result = json.loads(out)
    assert result["match"] is True and result["mismatches"] == 0
    assert "first_mismatch" not in result
    # 3×2 output pixels in groups of rows = 2, ceil(5 / cols) tiles, 9 taps × 1 word
    assert result["ideal_cycles"] == 3 * 3 * 9
    assert result["cycles"] - result["stall_cycles"] == result["ideal_cycles"]
    assert result["utilization"] == pytest.approx(result["ideal_cycles"] / result["cycles"],
                                                  abs=1e-4)
    assert result["sim_seconds"] > 0 and result["link_cycles"] >= result["cycles"]


@pytest.mark.parametrize(("index", "shape"), [(1, "9x5x4->5 k1s1p0"),
                                              (2, "5x5x4->4 k3s1p1 pool2/2")])
def test_bundle_layer_matches(capsys, bundle_file, index, shape):
    """A 1×1 layer, and a 3×3 layer with a 2×2 max-pool (conv, then a pool pass)."""
    status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", "--bundle",
                               bundle_file, "--layer", index)
    assert status == 0, err
    result = json.loads(out)
    assert result["match"] is True and result["shape"] == shape
    assert ("pool_cycles" in result) == (index == 2)


@pytest.mark.skipif(shutil.which("iverilog") is None,
                    reason="Icarus not installed (apt-get install iverilog)")
def test_waves_icarus_fst(capsys, tmp_path):
    target = tmp_path / "trace.fst"
    status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", "--cin", 3,
                               "--cout", 2, "--hw", 3, 3, "--kernel", 1, "--simulator",
                               "icarus", "--waves", target)
    assert status == 0, err
    result = json.loads(out)
    assert result["match"] and result["waves"] == str(target.resolve())
    assert target.read_bytes()[:1] != b"$"             # FST is binary, a VCD starts with $
    assert target.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.skipif(not fst_available(), reason="no lz4 headers (apt-get install liblz4-dev)")
def test_waves_verilator_fst(capsys, tmp_path):
    """A traced Verilator build writes FST where the lz4 headers are present."""
    target = tmp_path / "trace"
    status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", "--cin", 3,
                               "--cout", 2, "--hw", 3, 3, "--kernel", 1, "--waves", target)
    assert status == 0, err
    result = json.loads(out)
    assert result["match"] and result["waves"] == str(target.with_suffix(".fst").resolve())
    trace = target.with_suffix(".fst").read_bytes()
    assert trace[:1] != b"$" and len(trace) > 1000


@pytest.mark.parametrize(("argv", "message"), [
    (["--cin", 4], "--cout, --hw, --kernel required"),
    (["--cin", 4, "--cout", 2, "--hw", 4, 4, "--kernel", 5], "exceeds max_kernel (3)"),
    (["--cin", 4, "--cout", 2, "--hw", 2, 2, "--kernel", 3, "--padding", 0],
     "larger than the padded"),
    (["--cin", 400, "--cout", 2, "--hw", 4, 4, "--kernel", 3], "max_channels"),
    (["--bundle", "missing.bitdet", "--layer", 0], "missing.bitdet"),
])
def test_user_errors(capsys, argv, message):
    status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", *argv)
    assert status == 2 and out == ""
    assert err.startswith("bitdet: error:") and message in err and err.count("\n") == 1, err


def test_bundle_user_errors(capsys, bundle_file):
    cases = ((["--layer", 3], "0 … 2"), ([], "--layer"))
    for argv, message in cases:
        status, out, err = run_cli(capsys, "sim", "layer", "--config", "tiny", "--bundle",
                                   bundle_file, *argv)
        assert status == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_unknown_config_and_bad_probability(capsys):
    status, _, err = run_cli(capsys, "sim", "layer", "--config", "nope", "--cin", 1)
    assert status == 2 and "no such config" in err
    with pytest.raises(SystemExit) as exc:
        main(["sim", "layer", "--config", "tiny", "--idle", "1.5"])
    assert exc.value.code == 2
