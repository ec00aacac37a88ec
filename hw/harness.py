"""A :class:`~bitdet.hw.controller.LayerController` with the memories it reads and writes,
for simulations of one layer (the hw tests, tests/test_cycles.py, bench/bench_cycles.py)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux
from amaranth.lib import wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import Out

from bitdet.core.config import AcceleratorConfig

from .controller import LayerController
from .memory import activation_buffer, threshold_memory, weight_memory

__all__ = ["ControllerHarness"]


class ControllerHarness(wiring.Component):
    """The controller, the activation buffer (with one extra read port, ``probe``), the
    weight and the threshold memory, joined as :class:`~bitdet.hw.top.CommandExecutor`
    joins them.

    The testbench drives the controller's ``layer`` / ``start`` (``ctrl``), the memories'
    write ports (``weights.write``, ``thresholds.write``), the buffer's ``select``
    (``buf.select``), and reads its counters; ``load`` writes the buffer (bank
    ``1 − select``) while the controller is idle, ``probe`` reads bank ``select``.

    Parameters
    ----------
    config : AcceleratorConfig

    Members
    -------
    load : ``Out(WritePort.Signature(addr_width=, shape=simd))``
    probe : ``Out(ReadPort.Signature(addr_width=, shape=simd))``
    """

    def __init__(self, config: AcceleratorConfig):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self.config = config
        self.ctrl = LayerController(config=config)
        self.buf = activation_buffer(config, read_ports=config.rows + 1)
        self.weights = weight_memory(config)
        self.thresholds = threshold_memory(config)
        super().__init__({
            "load": Out(WritePort.Signature(addr_width=self.buf.addr_width,
                                            shape=config.simd)),
            "probe": Out(ReadPort.Signature(addr_width=self.buf.addr_width,
                                            shape=config.simd)),
        })

    def elaborate(self, platform):
        m = Module()
        ctrl, buf = self.ctrl, self.buf
        m.submodules.ctrl, m.submodules.buf = ctrl, buf
        m.submodules.weights, m.submodules.thresholds = self.weights, self.thresholds
        for r in range(self.config.rows):
            wiring.connect(m, ctrl.act_read[r], buf.read[r])
        wiring.connect(m, wiring.flipped(self.probe), buf.read[self.config.rows])
        wiring.connect(m, ctrl.weights, self.weights.read)
        wiring.connect(m, ctrl.thresholds, self.thresholds.read)
        m.d.comb += [
            buf.write.en.eq(ctrl.act_write.en | self.load.en),
            buf.write.addr.eq(Mux(self.load.en, self.load.addr, ctrl.act_write.addr)),
            buf.write.data.eq(Mux(self.load.en, self.load.data, ctrl.act_write.data)),
        ]
        return m
