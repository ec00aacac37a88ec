# amaranth: UnusedElaboratable=no
"""Tier 2 for contract 2: the contract-2 top level (``CommandExecutor``'s Verilog) under
cocotb, over the byte protocol (:class:`bitdet.sim.link.RtlLink`), against the golden
model and the cycle model.

The fast tier runs one Verilator build of a small contract-2 config with idle cycles and
back-pressure: layers at every corner of the bit widths (n-bit input and output levels,
shortcut rows, padding at a level, a pool over levels), each read back plane by plane and
compared with :func:`bitdet.core.golden.run_layer` bit for bit, and every pass's busy and
stall counts with :func:`bitdet.core.cycles.pass_cycles`. The slow tier sweeps 32 random
shapes over two contract-2 configs (:mod:`bitdet.sim.sweep`) and runs a trained residual
W1A2 detector on ``rtl`` and ``emu``.
"""

import pytest

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")

import numpy as np
import torch

from bitdet.core import golden
from bitdet.sim.layer import random_case, run_case
from bitdet.sim.link import RtlLink
from bitdet.sim.sweep import SWEEP_CONFIGS, V2_CONFIGS

CONFIG = SWEEP_CONFIGS["v2-3x2x8"]()   # rows 3, cols 2, simd 8; 4-bit levels and shortcuts

# (cin, cout, (h, w), kernel, stride, in_bits, out_bits, shortcut_bits, pad_level, pool)
LAYERS = [
    (11, 7, (5, 6), 3, 1, 2, 2, 1, 3, None),
    (9, 5, (6, 5), 3, 2, 4, 1, 0, 9, None),
    (13, 6, (4, 4), 1, 1, 1, 4, 4, 0, None),
    (5, 9, (6, 6), 3, 1, 3, 3, 2, 0, (2, 2)),
    (17, 3, (3, 7), 3, 1, 1, 1, 0, 1, None),
]


@pytest.fixture(scope="module")
def link():
    """One simulation with random idle cycles on ``i`` and back-pressure on ``o``."""
    with RtlLink(CONFIG, seed=3, idle=0.3, backpressure=0.3) as link:
        yield link


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_v2_layer_matches_golden_and_the_cycle_model(link, index):
    cin, cout, hw, kernel, stride, n, m, s, pad, pool = LAYERS[index]
    case = random_case(cin=cin, cout=cout, hw=hw, kernel=kernel, stride=stride, in_bits=n,
                       out_bits=m, shortcut_bits=s, pad_level=pad, pool=pool, seed=index)
    result = run_case(link, CONFIG, case)
    assert result["match"], result.get("first_mismatch")
    assert result["cycles_match"], (result["cycles"], result["model_cycles"])
    assert result["cycles"] - result["stall_cycles"] == result["ideal_cycles"]
    # not a vacuous comparison: the output map uses several levels
    out = golden.run_layer(case.x, case.layer, case.shortcut)
    assert len(torch.unique(out)) > 1


def test_v2_case_on_a_contract_1_config_is_one_line():
    from bitdet.core.config import load_config
    case = random_case(cin=3, cout=3, hw=(4, 4), kernel=3, in_bits=2)
    with pytest.raises(ValueError, match="needs a contract-2 build"):
        run_case(None, load_config("tiny"), case)


@pytest.mark.slow
def test_sweep_32_v2_shapes_two_configs():
    """32 random contract-2 layers over two configs (two Verilator builds): bit widths
    1 … 4 / 1 … 2, shortcuts, pools over levels, strides, odd channels; every map equals
    the golden model and every pass's counters the cycle model's."""
    from bitdet.sim.sweep import sweep
    rows = sweep(V2_CONFIGS, 32, seed=0, log=lambda line: None)
    assert len(rows) == 32
    bad = [row for row in rows if not (row["match"] and row["cycles_match"])]
    assert not bad, bad
    assert {row["shape"].split(" a")[-1][:1] for row in rows} >= {"1", "2", "3", "4"}


@pytest.mark.slow
def test_trained_residual_detector_on_rtl_equals_emu(tmp_path):
    """The briefly trained residual W1A2 detector on the contract-2 RTL and on the
    emulator: identical detections, head map, every map and every pass's cycles; then two
    frames pipelined (the second input written while the first runs) on both."""
    from bitdet.core.config import AcceleratorConfig
    from bitdet.sw.driver import Device
    from bitdet.sw.train import tiny_residual_detector
    _model, bundle = tiny_residual_detector(0)
    config = AcceleratorConfig(
        name="v2-rtl-residual", rows=4, cols=4, simd=32, weight_depth=512,
        threshold_depth=256, activation_depth=2048, max_channels=32, max_kernel=3,
        max_stride=2, output_bits=2, clock_hz=1_000_000, baud=62_500, contract=2,
        max_input_bits=2, max_shortcut_bits=2, activation_slots=6)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    frames = [rng.integers(0, 256, size=(64, 64), dtype=np.uint8) for _ in range(2)]
    results, many = {}, {}
    for backend in ("emu", "rtl"):
        with Device.open(backend, config) as device:
            device.load(bundle)
            results[backend] = device.detect(image, score_threshold=0.05, trace=True)
            # two frames pipelined: the second one's input written during the first run
            assert device.concurrent_writes and device.overlap_gain() > 0
            many[backend] = list(device.detect_many(frames, score_threshold=0.05))
    assert [r["stats"].overlap for r in many["rtl"]] == [False, True]
    for a, b in zip(many["emu"], many["rtl"], strict=True):
        for key in ("boxes", "scores", "labels", "head"):
            assert torch.equal(a[key], b[key]), key
    emu, rtl = results["emu"], results["rtl"]
    for key in ("boxes", "scores", "labels", "head"):
        assert torch.equal(emu[key], rtl[key]), key
    assert len(emu["maps"]) == len(rtl["maps"]) > 1
    for a, b in zip(emu["maps"], rtl["maps"], strict=True):
        assert torch.equal(a, b)
    for key in ("name", "busy", "stall"):
        assert [x[key] for x in emu["stats"].layers] == [x[key] for x in rtl["stats"].layers]
