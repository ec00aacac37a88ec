"""The layer controller's output side: the threshold stage (array results to output bits,
or raw ``P``) and the output writer (bits packed into words, words into the write bank),
docs/hardware.md ("Layer controller")."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import THRESHOLD_PIPELINE

from .memory import threshold_layout
from .pe import valid_stream_signature
from .threshold import ThresholdUnit

__all__ = ["OutputWriter", "ThresholdStage"]


def _check_config(config):
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    return config


class ThresholdStage(wiring.Component):
    """``rows`` :class:`~bitdet.hw.threshold.ThresholdUnit` s behind one register stage:
    each result column's ``P`` of every row compared with threshold 0 of that column's
    entry, ``THRESHOLD_PIPELINE`` cycles later.

    The threshold memory's output word (every column's entry) and the result are
    registered side by side, so that the column multiplexer and the comparison start from
    flip-flops, not from the block RAM's slow clock-to-out.

    Parameters
    ----------
    config : AcceleratorConfig

    Members
    -------
    results : ``In(valid_stream_signature(result_layout))``
        ``column`` and ``p[r]`` of the array's result column.
    thresholds : ``In(ArrayLayout(threshold_layout, cols))``
        The threshold entry of the job whose results are on ``results`` (the threshold
        memory's read data, in the same cycle).
    raw : ``In(1)``
        Pass ``P`` through instead of comparing.
    o : ``Out(valid_stream_signature(output_layout))``
        ``value[r]``: row ``r``'s bit (``value[r][0]``) or ``P``.
    """

    def __init__(self, *, config: AcceleratorConfig):
        self._config = c = _check_config(config)
        self._result_layout = data.StructLayout({
            "p": data.ArrayLayout(c.acc_width, c.rows),
            "column": range(c.cols),
        })
        self._output_layout = data.StructLayout({
            "value": data.ArrayLayout(c.acc_width, c.rows),
        })
        super().__init__({
            "results": In(valid_stream_signature(self._result_layout)),
            "thresholds": In(data.ArrayLayout(threshold_layout(c), c.cols)),
            "raw": In(1),
            "o": Out(valid_stream_signature(self._output_layout)),
        })

    @property
    def latency(self) -> int:
        """Cycles from ``results`` to ``o``: ``THRESHOLD_PIPELINE``."""
        return THRESHOLD_PIPELINE

    def elaborate(self, platform):
        m = Module()
        c = self._config
        thr_word = Signal.like(self.thresholds)
        q_valid = Signal()
        q_column = Signal(range(c.cols))
        q_p = [Signal(c.acc_width, name=f"q_p{r}") for r in range(c.rows)]
        m.d.sync += [thr_word.eq(self.thresholds), q_valid.eq(self.results.valid),
                     q_column.eq(self.results.payload.column)]
        m.d.sync += [q_p[r].eq(self.results.payload.p[r]) for r in range(c.rows)]
        for r in range(c.rows):
            unit = m.submodules[f"threshold{r}"] = ThresholdUnit(acc_width=c.acc_width,
                                                                 output_bits=1)
            m.d.comb += [
                unit.i.valid.eq(q_valid),
                unit.i.payload.p.eq(q_p[r]),
                unit.i.payload.thresholds[0].eq(thr_word[q_column][0]),
                unit.i.payload.raw.eq(self.raw),
                self.o.payload.value[r].eq(unit.o.payload.value),
            ]
            if r == 0:
                m.d.comb += self.o.valid.eq(unit.o.valid)
        return m


class OutputWriter(wiring.Component):
    """Packs each row's output bits into ``simd``-bit words and writes a completed word of
    every real pixel, one per cycle.

    Each row keeps one word register; a transfer on ``i`` sets bit ``slot·cols + column``
    of every row's word to its bit. With ``word_done`` the words (with that bit) move to a
    shadow register and the writer stores them, one per cycle over ``rows`` cycles, at
    ``addr``, ``addr + step``, … — skipping the rows that ``row_valid`` marks as no real
    pixel. A word completes at most once per ``rows`` cycles (the controller's guard).

    Parameters
    ----------
    config : AcceleratorConfig

    Members
    -------
    i : ``In(valid_stream_signature(input_layout))``
        ``bits`` (bit ``r``: row ``r``'s output bit), ``slot``, ``column``,
        ``word_done``, ``addr`` (the word of row 0), ``row_valid``.
    step : ``In(range(max_words + 1))``
        Words between consecutive pixels' words (``ceil(O / simd)``).
    act_write : ``In(WritePort.Signature(addr_width=, shape=simd))``
        The activation buffer's write port.
    busy : ``Out(1)``
        Words are being written.
    """

    def __init__(self, *, config: AcceleratorConfig):
        self._config = c = _check_config(config)
        aw = max(1, (c.activation_depth - 1).bit_length())
        self._input_layout = data.StructLayout({
            "bits": c.rows,
            "slot": range(c.simd // c.cols),
            "column": range(c.cols),
            "word_done": 1,
            "addr": aw,
            "row_valid": c.rows,
        })
        super().__init__({
            "i": In(valid_stream_signature(self._input_layout)),
            "step": In(range(-(-c.max_channels // c.simd) + 1)),
            "act_write": In(WritePort.Signature(addr_width=aw, shape=c.simd)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        c = self._config
        rows, cols, simd = c.rows, c.cols, c.simd
        slots = simd // cols
        i = self.i.payload
        word = [Signal(simd, name=f"word{r}") for r in range(rows)]
        shadow = [Signal(simd, name=f"shadow{r}") for r in range(rows)]
        wr_count = Signal(range(rows + 1))
        wr_mask = Signal(rows)
        wr_addr = Signal(len(self.act_write.addr))
        slot_hot = Signal(slots)
        col_hot = Signal(cols)
        m.d.comb += [slot_hot.eq(Cat(i.slot == k for k in range(slots))),
                     col_hot.eq(Cat(i.column == j for j in range(cols)))]
        m.d.comb += self.busy.eq(wr_count != 0)
        with m.If(self.busy):                             # the writer's shift (below) …
            for r in range(rows - 1):
                m.d.sync += shadow[r].eq(shadow[r + 1])
        for r in range(rows):
            bit = i.bits[r]
            word_next = Cat(Mux(slot_hot[k // cols] & col_hot[k % cols], bit, word[r][k])
                            for k in range(simd))
            with m.If(self.i.valid):
                with m.If(i.word_done):                   # … yields to a new word
                    m.d.sync += [shadow[r].eq(word_next), word[r].eq(0)]
                with m.Else():
                    m.d.sync += word[r].eq(word_next)

        # the shadow words of the rows that are real pixels, one per cycle
        m.d.comb += [
            self.act_write.en.eq(self.busy & wr_mask[0]),
            self.act_write.addr.eq(wr_addr),
            self.act_write.data.eq(shadow[0]),
        ]
        with m.If(self.busy):
            m.d.sync += [wr_count.eq(wr_count - 1), wr_mask.eq(wr_mask >> 1),
                         wr_addr.eq(wr_addr + self.step)]
        # a word completes at most once per job, and jobs' last words are ≥ rows cycles
        # apart (the controller's guard), so the writer is at its last word (or done) here
        with m.If(self.i.valid & i.word_done):
            m.d.sync += [wr_count.eq(rows), wr_mask.eq(i.row_valid), wr_addr.eq(i.addr)]
        return m
