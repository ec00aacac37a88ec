"""Threshold unit: ``P`` → n-bit activation level (count of thresholds reached), or raw ``P``.

Numerics (docs/numerics.md, :func:`bitdet.core.golden.threshold`): an n-bit output uses
``2**n − 1`` sorted thresholds ``T_j`` and outputs ``#{j : P ≥ T_j}``; a 1-bit output is
``P ≥ T``. A constant channel is ``T = 0`` (always reached) or ``T = K + 1`` (never).
Because ``K`` may be as large as ``2**acc_width − 1``, ``K + 1`` needs one bit more than
``P``: thresholds are ``acc_width + 1`` bits wide (:attr:`ThresholdUnit.threshold_width`).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ._util import _check_positive
from .pe import valid_stream_signature
from .popcount import popcount

__all__ = ["ThresholdUnit"]


class ThresholdUnit(wiring.Component):
    """Compare ``P`` with ``2**output_bits − 1`` thresholds; one register stage.

    The input is accepted every cycle; its result is on ``o`` in the next cycle
    (``o.valid`` is ``i.valid`` delayed by one). ``value`` is the number of thresholds with
    ``P ≥ T_j`` (zero-extended), or ``P`` itself when ``raw`` is set (the raw mode of a
    layer whose output goes to the host's real-valued head). The count does not need the
    thresholds to be sorted, but the compiler sorts them (the count then is the level of a
    thermometer code).

    Parameters
    ----------
    acc_width : int
        Width of ``P``.
    output_bits : int
        Bits of a thresholded output (1 for binary, at most 8).

    Members
    -------
    i : ``In(valid_stream_signature(input_layout))``
        ``p`` (``acc_width`` bits), ``thresholds`` (``2**output_bits − 1`` values of
        ``threshold_width`` bits), ``raw``.
    o : ``Out(valid_stream_signature(output_layout))``
        ``value`` (``max(acc_width, output_bits)`` bits).

    Raises
    ------
    TypeError, ValueError
        If a parameter is not a positive integer, or ``output_bits`` is above 8.
    """

    def __init__(self, *, acc_width: int, output_bits: int):
        self._acc_width = _check_positive("acc_width", acc_width)
        self._output_bits = _check_positive("output_bits", output_bits)
        if output_bits > 8:
            raise ValueError(f"output_bits must be at most 8, not {output_bits!r}")
        self._input_layout = data.StructLayout({
            "p": acc_width,
            "thresholds": data.ArrayLayout(self.threshold_width, self.threshold_count),
            "raw": 1,
        })
        self._output_layout = data.StructLayout({"value": max(acc_width, output_bits)})
        super().__init__({
            "i": In(valid_stream_signature(self._input_layout)),
            "o": Out(valid_stream_signature(self._output_layout)),
        })

    @property
    def acc_width(self) -> int:
        return self._acc_width

    @property
    def output_bits(self) -> int:
        return self._output_bits

    @property
    def threshold_count(self) -> int:
        """Thresholds per output channel: ``2**output_bits − 1``."""
        return (1 << self._output_bits) - 1

    @property
    def threshold_width(self) -> int:
        """Bits per threshold: ``acc_width + 1``, so that ``T = K + 1`` always fits."""
        return self._acc_width + 1

    @property
    def input_layout(self) -> data.StructLayout:
        return self._input_layout

    @property
    def output_layout(self) -> data.StructLayout:
        return self._output_layout

    def elaborate(self, platform):
        m = Module()
        p = self.i.payload.p
        thresholds = self.i.payload.thresholds
        reached = Cat(p >= thresholds[j] for j in range(self.threshold_count))
        level = popcount(reached)
        m.d.sync += [
            self.o.valid.eq(self.i.valid),
            self.o.payload.value.eq(Mux(self.i.payload.raw, p, level)),
        ]
        return m
