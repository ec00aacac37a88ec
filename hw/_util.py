"""Small gateware helpers the hw modules share (private): parameter checks, constant
arithmetic without multipliers, delay lines."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value

from .popcount import popcount

__all__ = ["_ceil_div", "_check_positive", "delayed", "mul_small"]


def _check_positive(name: str, value) -> int:
    """``value`` if it is a positive integer (``bool`` is not one); otherwise a
    ``TypeError`` / ``ValueError`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value!r}")
    return value


def _ceil_div(value, divisor: int, max_value: int):
    """``ceil(value / divisor)`` for a constant ``divisor``: a shift for a power of two,
    otherwise the number of multiples of ``divisor`` below ``value`` (constant compares)."""
    if divisor & (divisor - 1) == 0:
        return (value + divisor - 1) >> (divisor.bit_length() - 1)
    n = -(-max_value // divisor)
    return popcount(Cat(value > i * divisor for i in range(n)))


def mul_small(value, factor):
    """``value · factor`` (both unsigned) for a narrow ``factor`` (a stride, a padding, a kernel)
    as a sum of shifted copies of ``value``: a ``$mul`` cell of that size would take one of
    the iCE40's few DSP blocks (``synth_ice40 -dsp``), an adder or two is cheaper."""
    factor = Value.cast(factor)
    value = Value.cast(value)
    width = len(value) + len(factor)
    terms = [Mux(factor[i], value << i, 0) for i in range(len(factor))]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total[:width]


def delayed(m: Module, value, shape, cycles: int, name: str):
    """``value`` through ``cycles`` registers ``{name}_d1 … {name}_d{cycles}`` of ``shape``
    in ``m``'s sync domain (``value`` itself when ``cycles == 0``)."""
    for k in range(cycles):
        reg = Signal(shape, name=f"{name}_d{k + 1}")
        m.d.sync += reg.eq(value)
        value = reg
    return value
