"""Imported Brevitas/QONNX models on the contract-2 RTL (``CommandExecutor`` under
Verilator, :class:`bitdet.sim.link.RtlLink` through ``Device.open("rtl", ...)``).

All slow tier (one Verilator build of :data:`CONFIG`, 1–2 minutes on an idle machine,
cached per Verilog text; then one simulator per module):

* every format-2 architecture of tests/test_import_v2.py (W1A2 with a head, W1A4 with a
  pool, signed W1A2, mixed 3/1/2 bits, residual streams of 1, 2 and 4 bits, 1×1 and
  stride 2, ``QuantEltwiseAdd``, a pooled and channel-repeated shortcut, a residual on
  the input map) imported, loaded on the RTL and run with every map read back: each
  quantized tensor equals qonnx's ``execute_onnx`` (mapped to values) on random inputs,
  and every map and every pass's busy and stall cycles equal the contract-2 emulator's;
* the docs example of docs/import.md ("A detection head": a Brevitas W1A2 residual
  detector trained on DigitScenes, imported with ``--head-config``): ``bitdet detect
  --backend rtl --config C.yaml`` prints the same detections as ``--backend emu`` and as
  the Brevitas model's quantized outputs imply, and ``Device.detect`` on the RTL gives the
  emulator's boxes, scores, labels, head map, every map and cycles.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")
with warnings.catch_warnings():            # brevitas warns about its own deprecations
    warnings.simplefilter("ignore")
    pytest.importorskip("brevitas", reason="the `import` extra (pip install -e '.[import]') "
                        "is not installed; CI installs it")
    pytest.importorskip("qonnx", reason="the `import` extra is not installed; CI installs it")
    import test_import_head as docs
    from test_import_v2 import ARCHS, FORMAT_1, INPUTS, export, qonnx_equal_everywhere

from bitdet.core.bundle import load
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.sw.cli import main
from bitdet.sw.driver import Device, RunStats
from bitdet.sw.qonnx_import import import_qonnx

pytestmark = pytest.mark.slow

#: one small contract-2 build for every model here: 4-bit maps and shortcuts (the W1A4
#: architectures), 4 slots of 2048 words (the docs detector's 8×32×32 2-bit input map)
CONFIG = AcceleratorConfig(
    name="v2-rtl-import", rows=4, cols=4, simd=32, weight_depth=512, threshold_depth=256,
    activation_depth=2048, max_channels=32, max_kernel=3, max_stride=2, output_bits=4,
    clock_hz=1_000_000, baud=62_500, contract=2, max_input_bits=4, max_shortcut_bits=4,
    activation_slots=4)
NAMES = [name for name in ARCHS if name not in FORMAT_1]


@pytest.fixture(scope="module")
def devices():
    """The RTL (one simulator for the module) and the emulator of :data:`CONFIG`."""
    with Device.open("rtl", CONFIG) as rtl, Device.open("emu", CONFIG) as emu:
        yield rtl, emu


def layer_cycles(stats: RunStats) -> list[tuple]:
    return [(x["name"], x["busy"], x["stall"]) for x in stats.layers]


@pytest.mark.parametrize("name", NAMES)
def test_imported_brevitas_model_on_rtl_equals_qonnx_and_emu(devices, name, tmp_path):
    rtl, emu = devices
    path = export(ARCHS[name](), tmp_path / f"{name}.onnx", INPUTS.get(name, (1, 8, 8)),
                  seed=list(ARCHS).index(name) + 11)          # test_import_v2's seeds
    result = import_qonnx(path)
    bundle = result.bundle
    assert bundle.format_version == 2 and rtl.fit_problems(bundle) == []
    rtl.load(bundle)
    emu.load(bundle)
    runs = []

    def on_rtl(levels):
        """The RTL's maps of one input, checked against the emulator's (maps, cycles)."""
        stats = {"rtl": RunStats(), "emu": RunStats()}
        got = rtl.run_graph(levels, trace=True, stats=stats["rtl"])
        want = emu.run_graph(levels, trace=True, stats=stats["emu"])
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
        assert layer_cycles(stats["rtl"]) == layer_cycles(stats["emu"])
        runs.append(got)
        return got

    compared = qonnx_equal_everywhere(result, bundle, on_rtl, seed=7, inputs=2)
    quantized = [ref for ref in result.tensors.values() if ref.node != "input"]
    assert len(runs) == 2 and compared == 2 * len(quantized) >= 2
    # not vacuous: some map of the run uses more than one level
    assert any(len(torch.unique(m)) > 1 for m in runs[0].values())


def test_docs_example_detects_the_same_on_rtl(devices, tmp_path, capsys, monkeypatch):
    """docs/import.md's detector (300 steps, as written) on the RTL: the same detections
    as on the emulator and as the Brevitas model's last quantized map implies."""
    rtl, emu = devices
    namespace = docs.run_docs_example(tmp_path, 300, monkeypatch)
    _, head = docs.docs_blocks()
    (tmp_path / "head.yaml").write_text(head)
    assert main(["import", "digits.onnx", "--out", "digits.bitdet", "--head-config",
                 "head.yaml"]) == 0
    assert "wrote digits.bitdet" in capsys.readouterr().out
    bundle = load(tmp_path / "digits.bitdet")
    files, pixels = docs.scenes(tmp_path, 64, count=4)
    levels, _ = docs.last_levels_and_head(namespace["model"].eval(), pixels)
    threshold = 0.1
    fixed, expected = docs.implied_detections(bundle, levels, threshold)

    # the command of docs/import.md, "On the RTL": a YAML config, --backend rtl
    config_yaml = tmp_path / "rtl.yaml"
    config_yaml.write_text(yaml.safe_dump(CONFIG.to_dict()))
    assert load_config(config_yaml).config_hash() == CONFIG.config_hash()
    reports = {}
    for backend in ("emu", "rtl"):
        capsys.readouterr()
        assert main(["detect", *map(str, files), "--bundle", "digits.bitdet", "--backend",
                     backend, "--config", str(config_yaml), "--out", f"annotated-{backend}",
                     "--json", "--score-threshold", str(threshold)]) == 0
        reports[backend] = json.loads(capsys.readouterr().out)
        assert reports[backend]["backend"] == backend
        assert reports[backend]["config"] == CONFIG.name
    got = {b: [image["detections"] for image in r["images"]] for b, r in reports.items()}
    assert got["rtl"] == got["emu"] == expected
    assert sum(map(len, expected)) >= 1
    assert reports["rtl"]["device"]["layers"] == reports["emu"]["device"]["layers"]

    # the driver on the module's RTL device: tensors, head map, every map, every cycle
    rtl.load(bundle)
    emu.load(bundle)
    for i, image in enumerate(np.asarray(pixels[:, 0], dtype=np.uint8)):
        out = {device: device.detect(image, score_threshold=threshold, trace=True)
               for device in (rtl, emu)}
        a, b = out[rtl], out[emu]
        for key in ("boxes", "scores", "labels", "head"):
            assert torch.equal(a[key], b[key]), (i, key)
        assert torch.equal(a["head"], fixed[i:i + 1])      # the Brevitas model's implied head
        assert torch.equal(a["maps"][-1].to(torch.int32), levels[i:i + 1])
        assert len(a["maps"]) == len(b["maps"]) == len(bundle.nodes())
        for x, y in zip(a["maps"], b["maps"], strict=True):
            assert torch.equal(x, y)
        assert layer_cycles(a["stats"]) == layer_cycles(b["stats"])
