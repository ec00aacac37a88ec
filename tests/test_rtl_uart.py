# amaranth: UnusedElaboratable=no
"""Tier 2: the UART PHY's Verilog at the bit level (cocotb drives and samples the serial
lines; the receiver's stream is looped back into the transmitter), at the configured
baud rates of the presets (integer and fractional divisors)."""

import shutil

import pytest

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")

from bitdet.core.config import load_config
from bitdet.hw.uart import uart_divisor
from bitdet.sim.runner import run_cocotb
from bitdet.sim.tb_uart import loopback_verilog

ICARUS = pytest.mark.skipif(shutil.which("iverilog") is None,
                            reason="Icarus not installed (apt-get install iverilog)")


@pytest.mark.parametrize(("preset", "simulator"), [
    ("tiny", "verilator"),                                  # 50 cycles per bit
    pytest.param("ulx3s", "icarus", marks=ICARUS),          # 20 cycles per bit (30 MHz, 1.5 Mbaud)
    pytest.param("icebreaker", "icarus", marks=ICARUS),     # 24 cycles per bit
])
def test_uart_loopback_bit_level(preset, simulator, tmp_path):
    config = load_config(preset)
    divisor = uart_divisor(config.clock_hz, config.baud)
    run = run_cocotb(loopback_verilog(divisor), toplevel="uart_loopback",
                     test_module="bitdet.sim.tb_uart", simulator=simulator, test_dir=tmp_path,
                     extra_env={"BITDET_UART_DIVISOR": str(divisor), "BITDET_SEED": "4",
                                "BITDET_UART_BYTES": "24"})
    assert run.tests == 3
    assert run.passed, f"{run.failures} of {run.tests} cocotb tests failed: {run.messages}"
