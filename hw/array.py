"""Output-stationary systolic array of XNOR-popcount PEs, with input skew and result drain.

Geometry (``rows = 2``, ``cols = 3``)::

               weights[0]  weights[1]  weights[2]      (same cycle for K-word j)
                   |           |           |
                   |          [D]         [D]          column skew: column c delayed c
                   |           |          [D]
    act[0] ------>PE00 ----->PE01 ----->PE02 --> (load marker of row 0: PE02's
                   |           |           |      result_valid)
    act[1] -[D]-->PE10 ----->PE11 ----->PE12 --> (load marker of row 1)
     row skew: row r delayed r (its valid/first/last too)
    (all of operands passes one input register [R] before the skews)

    drain, per row, shifting right to left:  out[r] <-[d0]<-[d1]<-[d2]
                                              |
                              row de-skew: row r delayed rows-1-r cycles

Row ``r`` computes output pixel ``r`` of a tile and column ``c`` output channel ``c``.
Activations (with their control bits) travel right and weights travel down through the
PEs' registers; the K-word ``j`` of row ``r`` meets the K-word ``j`` of column ``c`` in
PE ``(r, c)`` ``1 + r + c`` cycles after it was accepted (the input register, then the
skews). docs/hardware.md has the timing diagram.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.cycles import ARRAY_PIPELINE

from ._util import _check_positive, delayed
from .pe import (
    XnorPopcountPE,
    _check_input_bits,
    _check_popcount,
    valid_stream_signature,
)

__all__ = ["ARRAY_PIPELINE", "SystolicArray"]



class SystolicArray(wiring.Component):
    """``rows × cols`` output-stationary XNOR-popcount array.

    **Input.** One ``operands`` transfer (``valid & ready``) carries K-word ``j`` of a job
    for every row (``activations[r]``: K-word ``j`` of output pixel ``r``'s receptive
    field) and every column (``weights[c]``: K-word ``j`` of output channel ``c``), plus
    ``first`` (``j = 0``) and ``last`` (``j = K − 1``) for the whole job. The array skews
    them itself. Idle cycles (``valid = 0``) may appear anywhere, also inside a job.

    **Output.** A job's ``rows × cols`` results leave as ``cols`` column vectors on the
    ``results`` stream (no back-pressure), column 0 first: ``results.payload.p[r]`` is
    ``P`` of row ``r``, ``results.payload.column`` is ``c`` and ``results.payload.last``
    marks ``c = cols − 1``. If the job's ``last`` word was accepted in cycle ``t``, column
    ``c`` is valid in cycle ``t + 3 + rows + cols + c`` (the 3: :data:`ARRAY_PIPELINE`,
    the input register and the PEs' two popcount registers). With no idle cycles, a job of
    ``K`` words whose first word was accepted in cycle ``t0`` delivers its final column in
    cycle ``t0 + K + 1 + rows + 2·cols``.

    **Drain.** Each PE keeps its finished ``P`` in its result register. When the last PE
    of row ``r`` has written a job's result (its ``result_valid``; the row's other PEs
    are then done too),
    the row's drain registers load the row's results in parallel and then shift one place
    towards column 0 per cycle, so row ``r`` emits ``P(r, 0), P(r, 1), ...`` on
    consecutive cycles; the rows are then de-skewed (row ``r`` delayed ``rows − 1 − r``
    cycles) into one column vector per cycle. No multiplexer spans more than one PE.

    **Bit-serial levels** (contract 2, ``max_input_bits`` > 1). Every transfer also
    carries ``shift``, the input plane ``b`` of its words (all rows and columns are in the
    same plane), skewed with ``first`` / ``last``; each PE adds its count ``<< b``
    (:class:`~bitdet.hw.pe.XnorPopcountPE`). A job over an n-bit map streams the K words
    of each plane in turn, ``n·K`` transfers from ``first`` to ``last``, and ``p[r]`` is
    ``A = Σ_b 2**b · P_b``; the timing above holds with ``n·K`` for ``K``. With
    ``max_input_bits`` 1 there is no ``shift`` and the Verilog is contract 1's.

    **Back to back.** Two jobs' ``last`` words must be accepted at least ``cols`` cycles
    apart (the drain of a row takes ``cols`` cycles). Jobs of ``K ≥ cols`` words therefore
    stream without any bubble. ``operands.ready`` enforces the rule for shorter jobs: it
    is low only while a word with ``last`` is offered fewer than ``cols`` cycles after the
    previous accepted ``last`` (words without ``last`` are always accepted). At most one
    job finishes per ``cols`` cycles, which is also the drain's bandwidth.

    Parameters
    ----------
    rows, cols : int
        Array size: output pixels × output channels computed at once.
    simd : int
        Bits per K-word.
    acc_width : int
        Accumulator and result width; ``P`` wraps beyond ``2**acc_width − 1``.
    popcount : str
        The PEs' popcount structure, ``"compressor"`` (default) or ``"adder"``
        (:class:`~bitdet.hw.pe.XnorPopcountPE`); same results and timing.
    max_input_bits : int
        Most planes of an input level (the config's ``max_input_bits``); 1 (default):
        1-bit maps only, no ``shift``.

    Members
    -------
    operands : ``In(stream.Signature(operand_layout))``
        ``activations`` (``rows`` words), ``weights`` (``cols`` words), ``first``,
        ``last`` (and ``shift``, ``range(max_input_bits)``, if ``max_input_bits`` > 1).
    results : ``Out(valid_stream_signature(result_layout))``
        ``p`` (``rows`` values of ``acc_width`` bits), ``column``, ``last``.

    Raises
    ------
    TypeError, ValueError
        If a parameter is not a positive integer, ``popcount`` is not a known
        structure, or ``max_input_bits`` is above :data:`~bitdet.hw.pe.MAX_INPUT_BITS`.
    """

    def __init__(self, *, rows: int, cols: int, simd: int, acc_width: int,
                 popcount: str = "compressor", max_input_bits: int = 1):
        self._rows = _check_positive("rows", rows)
        self._cols = _check_positive("cols", cols)
        self._simd = _check_positive("simd", simd)
        self._acc_width = _check_positive("acc_width", acc_width)
        self._popcount = _check_popcount(popcount)
        self._max_input_bits = _check_input_bits(max_input_bits)
        operand_fields = {
            "activations": data.ArrayLayout(simd, rows),
            "weights": data.ArrayLayout(simd, cols),
            "first": 1,
            "last": 1,
        }
        if max_input_bits > 1:
            operand_fields["shift"] = range(max_input_bits)
        self._operand_layout = data.StructLayout(operand_fields)
        self._result_layout = data.StructLayout({
            "p": data.ArrayLayout(acc_width, rows),
            "column": range(cols),
            "last": 1,
        })
        super().__init__({
            "operands": In(stream.Signature(self._operand_layout)),
            "results": Out(valid_stream_signature(self._result_layout)),
        })

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def cols(self) -> int:
        return self._cols

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

    @property
    def operand_layout(self) -> data.StructLayout:
        return self._operand_layout

    @property
    def result_layout(self) -> data.StructLayout:
        return self._result_layout

    def result_cycle(self, last_cycle: int, column: int) -> int:
        """Cycle in which ``column`` of the job whose ``last`` word was accepted in
        ``last_cycle`` is on ``results``."""
        return last_cycle + ARRAY_PIPELINE + self._rows + self._cols + column

    def latency(self, k_words: int) -> int:
        """Cycles from accepting a job's first word to its final result column, when its
        ``k_words`` words are accepted on consecutive cycles: ``K + 1 + rows + 2·cols``."""
        return k_words - 1 + self.result_cycle(0, self._cols - 1)

    def elaborate(self, platform):
        m = Module()
        rows, cols, simd = self._rows, self._cols, self._simd
        operands = self.operands
        payload = operands.payload

        pes = [[XnorPopcountPE(simd=simd, acc_width=self._acc_width,
                               popcount=self._popcount,
                               max_input_bits=self._max_input_bits) for _ in range(cols)]
               for _ in range(rows)]
        for r in range(rows):
            for c in range(cols):
                m.submodules[f"pe_{r}_{c}"] = pes[r][c]

        self._handshake(m)

        # -- input register: an accepted transfer enters the array one cycle later ---------
        # (nothing in front of PE (0, 0) then: the path from the memories' read data
        # through the window multiplexer ends here)
        control_fields = {"valid": 1, "first": 1, "last": 1}
        if self._max_input_bits > 1:
            control_fields["shift"] = range(self._max_input_bits)
        control_layout = data.StructLayout(control_fields)
        control = Signal(control_layout)
        activations = Signal(data.ArrayLayout(simd, rows))
        weights = Signal(data.ArrayLayout(simd, cols))
        m.d.sync += [
            control.valid.eq(operands.valid & operands.ready),
            control.first.eq(payload.first),
            control.last.eq(payload.last),
            activations.eq(payload.activations),
            weights.eq(payload.weights),
        ]
        if self._max_input_bits > 1:
            m.d.sync += control.shift.eq(payload.shift)

        # -- row skew: row r's word and control bits are delayed r cycles -------------------
        for r in range(rows):
            west = pes[r][0].a_in
            m.d.comb += [
                west.word.eq(delayed(m, activations[r], simd, r, f"act{r}")),
                west.valid.eq(control.valid),
                west.first.eq(control.first),
                west.last.eq(control.last),
            ]
            if self._max_input_bits > 1:
                m.d.comb += west.shift.eq(control.shift)
            if r + 1 < rows:
                # one control shift register down the west edge serves every row
                control_next = Signal(control_layout, name=f"control{r + 1}")
                m.d.sync += control_next.eq(control)
                control = control_next

        # -- column skew: column c's weight word is delayed c cycles -------------------------
        for c in range(cols):
            m.d.comb += pes[0][c].w_in.eq(
                delayed(m, weights[c], simd, c, f"weight{c}"))

        # -- neighbour links: one register per hop (inside each PE) --------------------------
        for r in range(rows):
            for c in range(cols):
                if c > 0:
                    m.d.comb += pes[r][c].a_in.eq(pes[r][c - 1].a_out)
                if r > 0:
                    m.d.comb += pes[r][c].w_in.eq(pes[r - 1][c].w_out)

        self._drain(m, pes)
        return m

    def _handshake(self, m: Module):
        """The input handshake: keep `last` words at least `cols` cycles apart."""
        cols = self._cols
        operands = self.operands
        payload = operands.payload
        if cols > 1:
            since_last = Signal(range(cols), init=cols - 1)
            can_last = Signal()
            m.d.comb += can_last.eq(since_last == cols - 1)
            m.d.comb += operands.ready.eq(~payload.last | can_last)
            with m.If(operands.valid & operands.ready & payload.last):
                m.d.sync += since_last.eq(0)
            with m.Elif(~can_last):
                m.d.sync += since_last.eq(since_last + 1)
        else:
            m.d.comb += operands.ready.eq(1)

    def _drain(self, m: Module, pes):
        """The drain (per-row parallel load, then shift towards column 0), the row
        de-skew and the ``results`` stream."""
        rows, cols = self._rows, self._cols
        # -- drain: per-row parallel load, then shift towards column 0 -----------------------
        row_outputs = []
        loads = []
        for r in range(rows):
            # the row's last PE has just written the job's result (its result_valid);
            # the row's other PEs did so before
            load = Signal(name=f"drain_load{r}")
            m.d.comb += load.eq(pes[r][cols - 1].result_valid)
            loads.append(load)
            drain = [Signal(self._acc_width, name=f"drain{r}_{c}") for c in range(cols)]
            for c in range(cols):
                with m.If(load):
                    m.d.sync += drain[c].eq(pes[r][c].result)
                if c + 1 < cols:
                    with m.Else():
                        m.d.sync += drain[c].eq(drain[c + 1])
            row_outputs.append(
                delayed(m, drain[0], self._acc_width, rows - 1 - r, f"deskew{r}"))

        # -- output valid / column index, timed by the last row (which has no de-skew) -------
        busy = Signal()
        column = Signal(range(cols))
        with m.If(loads[rows - 1]):
            m.d.sync += [busy.eq(1), column.eq(0)]
        with m.Elif(busy):
            m.d.sync += column.eq(column + 1)
            with m.If(column == cols - 1):
                m.d.sync += busy.eq(0)

        results = self.results
        m.d.comb += [
            results.valid.eq(busy),
            results.payload.column.eq(column),
            results.payload.last.eq(column == cols - 1),
        ]
        for r in range(rows):
            m.d.comb += results.payload.p[r].eq(row_outputs[r])
