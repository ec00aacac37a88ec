"""XNOR-popcount processing element of the systolic array.

One PE multiplies one ``simd``-bit activation word with one ``simd``-bit weight word per
cycle (``P += popcount(XNOR(a, w))``, or for a bit-plane of an n-bit map ``A +=
popcount(XNOR(a, w)) << b``) and passes both words on to its neighbours through
registers: activations (with their control bits) to the right, weights downwards. The
padding convention of :mod:`bitdet.core.packing` (activation pad bits 0, weight pad bits 1)
makes the XNOR of padding 0, so no mask is needed.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.cycles import PE_LATENCY

from ._util import _check_positive
from .popcount import POPCOUNT_TREES, popcount, popcount_rows, popcount_stages, popcount_width

__all__ = ["MAX_INPUT_BITS", "PE_LATENCY", "XnorPopcountPE", "activation_layout",
           "valid_stream_signature"]

MAX_INPUT_BITS = 8
"""Most input planes a bit-serial PE weights (``shift`` 0 … 7); the configuration allows 4
(:attr:`~bitdet.core.config.AcceleratorConfig.max_input_bits`)."""


def _check_popcount(value) -> str:
    if value not in POPCOUNT_TREES:
        raise ValueError(f"popcount must be one of {', '.join(map(repr, POPCOUNT_TREES))}, "
                         f"not {value!r}")
    return value


def _check_input_bits(value) -> int:
    _check_positive("max_input_bits", value)
    if value > MAX_INPUT_BITS:
        raise ValueError(f"max_input_bits must be at most {MAX_INPUT_BITS}, not {value!r}")
    return value


def _carry_row_bits(bits: int) -> list[int]:
    """Weights at which the second carry-save row of :func:`~bitdet.hw.popcount.
    popcount_rows` of ``bits`` bits can hold a 1 (the columns left with two bits by its
    Wallace reduction; the other bits of the row are constant 0). For a power of two
    ``bits`` ≥ 2 this is ``[0]``: the row is a single bit of weight 1."""
    width = popcount_width(bits)
    heights = [bits] + [0] * (width - 1)
    while any(h > 2 for h in heights):
        reduced = [0] * width
        for weight, height in enumerate(heights):
            reduced[weight] += height // 3 + height % 3
            if weight + 1 < width:
                reduced[weight + 1] += height // 3
        heights = reduced
    return [weight for weight, height in enumerate(heights) if height == 2]


def valid_stream_signature(payload_shape) -> wiring.Signature:
    """Signature of a stream without back-pressure: ``payload`` and ``valid``, both ``Out``.

    The member names are those of :class:`amaranth.lib.stream.Signature`, so consumers
    read ``.valid`` and ``.payload`` alike; it has no ``ready`` at all (rather than
    ``always_ready=True``, whose constant ``ready`` member keeps a component from being
    converted to Verilog on its own with amaranth 0.5).
    """
    return wiring.Signature({"payload": Out(payload_shape), "valid": Out(1)})


def activation_layout(simd: int, max_input_bits: int = 1) -> data.StructLayout:
    """Layout of what travels along a row: one activation word and its control bits.

    ``word``
        ``simd`` activation bits (one K-word of the receptive field).
    ``valid``
        The word is part of a job (otherwise it is an idle slot and is ignored).
    ``first``
        First K-word of a job: the accumulator restarts from 0.
    ``last``
        Last K-word of a job: the final ``P`` is captured into the result register.
    ``shift``
        Only with ``max_input_bits`` > 1 (``range(max_input_bits)``): the input plane
        ``b`` the word belongs to; its count is added as ``P << b`` (bit-serial levels,
        ``A = Σ_b 2**b · P_b``).
    """
    _check_positive("simd", simd)
    fields = {"word": simd, "valid": 1, "first": 1, "last": 1}
    if _check_input_bits(max_input_bits) > 1:
        fields["shift"] = range(max_input_bits)
    return data.StructLayout(fields)


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

    **Bit-serial levels** (contract 2, ``max_input_bits`` > 1). ``a_in`` then carries
    ``shift``, the plane ``b`` of the word, through the same pipeline as ``valid`` /
    ``first`` / ``last``, and stage 3 adds the word's count weighted by it::

        acc ← acc + ((row0 + row1) << shift)

    so a job that streams the K words of every input plane of an n-bit map (``first``
    on the job's first word, ``last`` on its last, planes in any order) ends with
    ``A = Σ_b 2**b · P_b`` (:func:`bitdet.core.golden.level_conv2d`). The popcount logic
    is the same; the shift is a multiplexer in front of the accumulator's adder (the
    second row's one bit fills the vacated low bits and stays the carry-in, see
    :meth:`_plane_addends`), so the timing, :data:`PE_LATENCY` included, is unchanged.
    With ``max_input_bits`` 1 (every contract-1 config) nothing of this is generated:
    the Verilog is the PE's of contract 1, byte for byte.

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
    max_input_bits : int
        Most planes of an input level (1 … :data:`MAX_INPUT_BITS`; the config's
        ``max_input_bits``): ``shift`` is ``range(max_input_bits)``, absent for 1.

    Members
    -------
    a_in : ``In(activation_layout(simd, max_input_bits))``
        Activation word and control bits from the left neighbour (or the row skew).
    w_in : ``In(simd)``
        Weight word from the top neighbour (or the column skew).
    a_out : ``Out(activation_layout(simd, max_input_bits))``
        ``a_in`` delayed by one cycle, to the right neighbour.
    w_out : ``Out(simd)``
        ``w_in`` delayed by one cycle, to the bottom neighbour.
    result : ``Out(acc_width)``
        ``P`` (``A``) of the last finished job.
    result_valid : ``Out(1)``
        ``result`` was written in the previous cycle.

    Raises
    ------
    TypeError, ValueError
        If ``simd`` or ``acc_width`` is not a positive integer, ``popcount`` is not
        one of :data:`~bitdet.hw.popcount.POPCOUNT_TREES`, or ``max_input_bits`` is not
        an integer in 1 … :data:`MAX_INPUT_BITS`.
    """

    def __init__(self, *, simd: int, acc_width: int, popcount: str = "compressor",
                 max_input_bits: int = 1):
        self._simd = _check_positive("simd", simd)
        self._acc_width = _check_positive("acc_width", acc_width)
        self._popcount = _check_popcount(popcount)
        self._max_input_bits = _check_input_bits(max_input_bits)
        layout = activation_layout(simd, max_input_bits)
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

    @property
    def max_input_bits(self) -> int:
        return self._max_input_bits

    def _plane_addends(self, row0, row1, shift) -> list:
        """Stage 3 of a bit-serial PE (``max_input_bits`` > 1): the addends whose sum is
        ``(row0 + row1) << shift``, the registered count of the word weighted by its
        plane.

        The compressor's second row is (for a power-of-two ``simd``) one bit ``c`` of
        weight 1, the carry-in of the accumulator's adder; shifted, it would weigh
        ``2**shift``. Because the low ``shift`` bits of ``row0 << shift`` are 0,
        ``(row0 + c) << shift = ((row0 << shift) | c·(2**shift − 1)) + c``: ``c`` fills the
        vacated low bits and stays the carry-in, so the add keeps its three operands and
        the shift costs a multiplexer per bit of ``row0``. Bits of the second row above
        weight 1 (a ``simd`` that is not a power of two) are shifted and added as a
        fourth operand.
        """
        carry_bits = [] if self._popcount == "adder" else _carry_row_bits(self._simd)
        carry = row1[0] if 0 in carry_bits else Const(0, 1)
        low = row0
        for k in reversed(range(len(shift))):   # by 2**k where bit k of the shift is set
            low = Mux(shift[k], Cat(*([carry] * (1 << k)), low), low)
        low = low[:self._acc_width]
        addends = [low, carry]
        if any(w > 0 for w in carry_bits):
            high = Cat(Const(0, 1), row1[1:])
            addends.append((high << shift)[:self._acc_width])
        return addends

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
        if self._max_input_bits > 1:
            # the word's plane b travels with its control bits; P << b is added
            shift1 = Signal(range(self._max_input_bits))
            shift2 = Signal(range(self._max_input_bits))
            m.d.sync += [shift1.eq(a.shift), shift2.eq(shift1)]
            low, carry, *high = self._plane_addends(row0, row1, shift2)
            m.d.comb += total.eq(sum([acc + low + carry, *high]))
        else:
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
