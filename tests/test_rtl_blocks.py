# amaranth: UnusedElaboratable=no
"""Tier 2 per block: the PE, threshold units, pool engine and window generator on their
generated Verilog (one design, ``sim/tb_blocks.py``'s ``BlockBench``, one build), each
compared with the golden model by its cocotb test."""

import functools
import json
import shutil
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")

from amaranth.back import verilog

from bitdet.core.config import load_config
from bitdet.sim.link import icarus_time_zero_fix
from bitdet.sim.runner import run_cocotb
from bitdet.sim.tb_blocks import BLOCK_TESTS, TOPLEVEL, BlockBench

SIMULATORS = ["verilator", pytest.param("icarus", marks=pytest.mark.skipif(
    shutil.which("iverilog") is None, reason="Icarus not installed (apt-get install iverilog)"))]

# the least each testbench must have compared (what its report says), so that a
# testbench that stops early cannot pass
MINIMUM = {"pe": {"pe.result": 60, "words": 400},
           "threshold": {"thr1.value": 300, "thrc.value": 300, "thr3.value": 300,
                         "thrw.value": 300},
           "pool": {"pool.write": 150, "passes": 14},
           "window": {"window.words": 500, "popcounts": 150, "layers": 12}}


@functools.cache
def _converted() -> str:
    return verilog.convert(BlockBench(load_config("tiny")), name=TOPLEVEL)


def bench_verilog(simulator: str) -> str:
    text = _converted()
    return icarus_time_zero_fix(text) if simulator == "icarus" else text


@pytest.fixture(scope="module", params=SIMULATORS)
def block_run(request, tmp_path_factory):
    """One simulation of all block testbenches: ``(RtlRun, {test: failure or None}, reports)``."""
    simulator = request.param
    test_dir = tmp_path_factory.mktemp(f"blocks-{simulator}")
    run = run_cocotb(bench_verilog(simulator), toplevel=TOPLEVEL,
                     test_module="bitdet.sim.tb_blocks", simulator=simulator,
                     test_dir=test_dir, extra_env={
                         "BITDET_CONFIG": "tiny", "BITDET_SEED": "7",
                         "BITDET_REPORT": str(test_dir),
                         # cocotb's default ("*.py") has pytest rewrite the asserts of every
                         # module the testbench imports, torch included: 15 s per start
                         "COCOTB_REWRITE_ASSERTION_FILES": "tb_blocks.py"})
    outcomes = {}
    for case in ET.parse(run.results_xml).getroot().iter("testcase"):
        problems = [(p.get("message") or p.text or p.tag) for p in case
                    if p.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = "; ".join(problems) or None
    reports = {block: json.loads((test_dir / f"{block}.json").read_text())
               for block in BLOCK_TESTS if (test_dir / f"{block}.json").exists()}
    return run, outcomes, reports


def test_every_block_testbench_ran(block_run):
    run, outcomes, _ = block_run
    assert sorted(outcomes) == sorted(BLOCK_TESTS.values())
    assert run.tests == len(BLOCK_TESTS)


@pytest.mark.parametrize("block", list(BLOCK_TESTS))
def test_block_rtl_matches_golden(block_run, block):
    _, outcomes, reports = block_run
    name = BLOCK_TESTS[block]
    assert name in outcomes, f"cocotb did not run {name}"
    assert outcomes[name] is None, f"{name}: {outcomes[name]}"
    for key, least in MINIMUM[block].items():
        assert reports[block][key] >= least, (block, key, reports[block])
