"""Popcount as a balanced adder tree with minimal widths.

:func:`popcount` returns a combinational :class:`~amaranth.hdl.Value` holding the number of
1 bits of its operand. The tree splits the bits in halves recursively, so its depth is
``ceil(log2(n))`` adders, and every node is only as wide as the largest count it can hold
(``bit_length`` of the number of leaves under it): an ``n``-bit operand gives a result of
``popcount_width(n)`` bits. Nothing is registered; a pipelined variant is not provided.
"""

from __future__ import annotations

from amaranth.hdl import Const, Value, ValueCastable

__all__ = ["popcount", "popcount_width"]


def popcount_width(bits: int) -> int:
    """Width of :func:`popcount` of a ``bits``-wide operand: ``bits.bit_length()``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an integer, not {bits!r}")
    if bits < 0:
        raise ValueError(f"bits must be non-negative, not {bits!r}")
    return bits.bit_length()


def _tree(value: Value, lo: int, hi: int) -> Value:
    """Count of the 1 bits of ``value[lo:hi]``, exactly ``(hi - lo).bit_length()`` wide."""
    n = hi - lo
    if n == 1:
        return value[lo]
    mid = lo + n // 2
    total = _tree(value, lo, mid) + _tree(value, mid, hi)
    # `+` widens by one bit; the count of n leaves never needs more than n.bit_length().
    return total[:n.bit_length()]


def popcount(value) -> Value:
    """Number of 1 bits of ``value`` (any value-castable), as an unsigned adder tree.

    Parameters
    ----------
    value : value-castable
        The operand; its bits are counted regardless of its signedness.

    Returns
    -------
    Value
        Unsigned, ``popcount_width(len(value))`` bits wide (``C(0, 0)`` for an empty
        operand).

    Raises
    ------
    TypeError
        If ``value`` is not value-castable.
    """
    if not isinstance(value, (Value, ValueCastable, int)) or isinstance(value, bool):
        raise TypeError(f"popcount needs a value-castable operand, not {value!r}")
    value = Value.cast(value).as_unsigned()
    if len(value) == 0:
        return Const(0, 0)
    return _tree(value, 0, len(value))
