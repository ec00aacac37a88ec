"""XNOR-popcount processing element of the systolic array.

One PE multiplies one ``simd``-bit activation word with one ``simd``-bit weight word per
cycle (``P += popcount(XNOR(a, w))``) and passes both words on to its neighbours through
registers: activations (with their control bits) to the right, weights downwards. The
padding convention of :mod:`bitdet.core.packing` (activation pad bits 0, weight pad bits 1)
makes the XNOR of padding 0, so no mask is needed.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.cycles import PE_LATENCY

from ._util import _check_positive
from .popcount import POPCOUNT_TREES, popcount, popcount_rows, popcount_stages, popcount_width

__all__ = ["PE_LATENCY", "XnorPopcountPE", "activation_layout", "valid_stream_signature"]


def _check_popcount(value) -> str:
    if value not in POPCOUNT_TREES:
        raise ValueError(f"popcount must be one of {', '.join(map(repr, POPCOUNT_TREES))}, "
                         f"not {value!r}")
    return value


def valid_stream_signature(payload_shape) -> wiring.Signature:
    """Signature of a stream without back-pressure: ``payload`` and ``valid``, both ``Out``.

    The member names are those of :class:`amaranth.lib.stream.Signature`, so consumers
    read ``.valid`` and ``.payload`` alike; it has no ``ready`` at all (rather than
    ``always_ready=True``, whose constant ``ready`` member keeps a component from being
    converted to Verilog on its own with amaranth 0.5).
    """
    return wiring.Signature({"payload": Out(payload_shape), "valid": Out(1)})


def activation_layout(simd: int) -> data.StructLayout:
    """Layout of what travels along a row: one activation word and its control bits.

    ``word``
        ``simd`` activation bits (one K-word of the receptive field).
    ``valid``
        The word is part of a job (otherwise it is an idle slot and is ignored).
    ``first``
        First K-word of a job: the accumulator restarts from 0.
    ``last``
        Last K-word of a job: the final ``P`` is captured into the result register.
    """
    _check_positive("simd", simd)
    return data.StructLayout({"word": simd, "valid": 1, "first": 1, "last": 1})


class XnorPopcountPE(wiring.Component):
    """One output-stationary XNOR-popcount PE with a double-buffered result.

    Every cycle, ``a_out`` ← ``a_in`` and ``w_out`` ← ``w_in`` (one register per hop). The
    accumulation is a three-stage pipeline: in the cycle a word is presented, the XNOR
    and the first half of the popcount tree's full-adder stages run
    (:func:`~bitdet.hw.popcount.popcount_stages` ``// 2``: 4 of 9 for 64 bits) and the
    bits they leave are registered; in the next cycle the rest of the tree reduces them
    to its two carry-save rows, which are registered, each stage with the word's
    ``valid`` / ``first`` / ``last``; in the cycle after that, for a valid word::

        acc ← acc + row0 + row1        (row0 + row1 = popcount(~(word ^ w)))

    where ``acc`` is 0 for a ``first`` word: it is cleared (a synchronous reset) in the
    cycle before, while the ``first`` word is in the second stage, so a job's ``P`` never
    depends on what came before it. For a valid ``last`` word the same sum is also
    written to ``result``, so the
    next job may start (``first``) in the very next cycle while ``result`` keeps the
    finished ``P`` until the next job's ``last``. ``result_valid`` is 1 for the one cycle
    after ``result`` was written. Timing: the word presented in cycle ``t`` is counted in
    ``result`` from cycle ``t + 3`` (:data:`PE_LATENCY`), and ``result_valid`` of a
    ``last`` word presented in cycle ``t`` is 1 in cycle ``t + 3``. The two registers
    split the path from the operands to the accumulator (XNOR, tree, carry chain) in
    three for fmax (docs/fpga.md, ``bench/bench_array_fmax.py``). ``acc`` wraps modulo
    ``2**acc_width``; the configuration (:class:`~bitdet.core.config.AcceleratorConfig`)
    sizes ``acc_width`` so that it never does.

    Parameters
    ----------
    simd : int
        Bits per word (XNORs per cycle).
    acc_width : int
        Bits of the accumulator and of ``result``.
    popcount : str
        Structure of the XNOR-popcount: ``"compressor"`` (default; a carry-save tree of
        full adders whose two rows are added to the accumulator in one adder, see
        :func:`~bitdet.hw.popcount.popcount_rows`) or ``"adder"`` (the earlier balanced
        adder tree, then the accumulator add). Same results and timing (with ``adder`` the
        count itself is registered twice); only the
        area differs (``bench/bench_area.py``).

    Members
    -------
    a_in : ``In(activation_layout(simd))``
        Activation word and control bits from the left neighbour (or the row skew).
    w_in : ``In(simd)``
        Weight word from the top neighbour (or the column skew).
    a_out : ``Out(activation_layout(simd))``
        ``a_in`` delayed by one cycle, to the right neighbour.
    w_out : ``Out(simd)``
        ``w_in`` delayed by one cycle, to the bottom neighbour.
    result : ``Out(acc_width)``
        ``P`` of the last finished job.
    result_valid : ``Out(1)``
        ``result`` was written in the previous cycle.

    Raises
    ------
    TypeError, ValueError
        If ``simd`` or ``acc_width`` is not a positive integer, or ``popcount`` is not
        one of :data:`~bitdet.hw.popcount.POPCOUNT_TREES`.
    """

    def __init__(self, *, simd: int, acc_width: int, popcount: str = "compressor"):
        self._simd = _check_positive("simd", simd)
        self._acc_width = _check_positive("acc_width", acc_width)
        self._popcount = _check_popcount(popcount)
        layout = activation_layout(simd)
        super().__init__({
            "a_in": In(layout),
            "w_in": In(simd),
            "a_out": Out(layout),
            "w_out": Out(simd),
            "result": Out(acc_width),
            "result_valid": Out(1),
        })

    @property
    def simd(self) -> int:
        return self._simd

    @property
    def acc_width(self) -> int:
        return self._acc_width

    @property
    def popcount(self) -> str:
        return self._popcount

    def elaborate(self, platform):
        m = Module()

        acc = Signal(self._acc_width)
        a = self.a_in
        matches = ~(a.word ^ self.w_in)
        # stages 1 and 2: XNOR and the popcount tree, up to the carry-save rows (or, for
        # the adder tree, the count), registered with the word's control bits. The tree
        # has a register after half of its full-adder stages (4 of 9 for 64 bits: the
        # whole tree in one cycle had been the array's critical path on the ECP5,
        # bench/bench_array_fmax.py); the adder tree's count is delayed instead.
        width = popcount_width(self._simd)
        row0 = Signal(width)
        row1 = Signal(width)
        if self._popcount == "adder":
            count = Signal(width)
            m.d.sync += [count.eq(popcount(matches, tree="adder")), row0.eq(count),
                         row1.eq(0)]
        else:
            rows = popcount_rows(m, matches,
                                 register_after=popcount_stages(self._simd) // 2)
            m.d.sync += [row0.eq(rows[0]), row1.eq(rows[1])]
        control = Signal(3)
        valid = Signal()
        first = Signal()    # not used (the clear below is a cycle earlier); dropping it
        last = Signal()     # from the source made yosys 0.70 map the PE to 165 LUT4, not 158
        m.d.sync += [control.eq(Cat(a.valid, a.first, a.last)),
                     Cat(valid, first, last).eq(control)]

        # stage 3: one three-operand add, instead of the popcount's own adder and then the
        # accumulator's (yosys: the compressor's row1 holds one bit, the carry-in of the
        # accumulator's carry chain). A job restarts from 0 because the accumulator is
        # cleared while its first word is in stage 2: a synchronous reset of the flip-flops
        # (free on ECP5 and iCE40), where a `first ? 0 : acc` in front of the adder cost a
        # LUT4 per accumulator bit (bench/bench_area.py)
        total = Signal(self._acc_width)
        m.d.comb += total.eq(acc + row0 + row1)
        with m.If(valid):
            m.d.sync += acc.eq(total)
            with m.If(last):
                m.d.sync += self.result.eq(total)
        m.d.sync += [
            self.result_valid.eq(valid & last),
            self.a_out.eq(a),
            self.w_out.eq(self.w_in),
        ]
        with m.If(control[0] & control[1]):     # stage 2 holds a valid first word
            m.d.sync += acc.eq(0)
        return m
