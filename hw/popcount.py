"""Popcount: a carry-save compressor tree or a balanced adder tree.

:func:`popcount` returns a combinational :class:`~amaranth.hdl.Value` holding the number of
1 bits of its operand, ``popcount_width(n)`` bits wide for an ``n``-bit operand. Two
structures are available (``tree=``):

``"compressor"`` (the PE's default)
    A carry-save (Wallace) tree of full adders reduces the ``n`` bits to two rows
    (:func:`popcount_rows`, which adds the full adders to a module), which one
    carry-propagate adder sums. Every full adder is
    ``s = a ^ b ^ c`` and ``carry = maj(a, b, c)``: two 3-input functions, i.e. one LUT4 each
    (fewer when the logic mapper merges an XNOR of the operand into them), and only the
    final adder uses a carry chain. This is the cheapest structure that yosys' LUT mapping
    produced for the XNOR-popcount of the PE (``bench/bench_area.py``): callers that add
    more operands (the PE's accumulator) take the two rows from :func:`popcount_rows` and
    add everything in one ``+``, so the rows never go through an adder of their own.
``"adder"`` (the default of :func:`popcount`: a pure expression, no module needed)
    The earlier structure of the PE: the bits are split in halves recursively and the
    two counts added; every node is only as wide as the largest count it can hold, so the depth is
    ``ceil(log2(n))`` adders. Yosys turns such a chain of ``+`` into one multi-operand add.

:func:`popcount` is purely combinational; :func:`popcount_rows` can register the tree
after any of its full-adder stages (``register_after``), which the PE uses to split the
tree into two pipeline stages.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, Value, ValueCastable

__all__ = ["POPCOUNT_TREES", "popcount", "popcount_rows", "popcount_stages", "popcount_width"]

#: The structures :func:`popcount` can build (its ``tree`` argument).
POPCOUNT_TREES = ("compressor", "adder")


def popcount_width(bits: int) -> int:
    """Width of :func:`popcount` of a ``bits``-wide operand: ``bits.bit_length()``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an integer, not {bits!r}")
    if bits < 0:
        raise ValueError(f"bits must be non-negative, not {bits!r}")
    return bits.bit_length()


def _cast(value) -> Value:
    if not isinstance(value, (Value, ValueCastable, int)) or isinstance(value, bool):
        raise TypeError(f"popcount needs a value-castable operand, not {value!r}")
    return Value.cast(value).as_unsigned()


def _check_tree(tree) -> str:
    if tree not in POPCOUNT_TREES:
        raise ValueError(f"tree must be one of {', '.join(map(repr, POPCOUNT_TREES))}, "
                         f"not {tree!r}")
    return tree


def _adder_tree(value: Value, lo: int, hi: int) -> Value:
    """Count of the 1 bits of ``value[lo:hi]``, exactly ``(hi - lo).bit_length()`` wide."""
    n = hi - lo
    if n == 1:
        return value[lo]
    mid = lo + n // 2
    total = _adder_tree(value, lo, mid) + _adder_tree(value, mid, hi)
    # `+` widens by one bit; the count of n leaves never needs more than n.bit_length().
    return total[:n.bit_length()]


def _register(m: Module, columns: list[list[Value]], name: str) -> list[list[Value]]:
    """Every bit of ``columns`` through a flip-flop of ``m``'s sync domain."""
    registered = []
    for weight, column in enumerate(columns):
        flops = []
        for i, bit in enumerate(column):
            flop = Signal(name=f"{name}_r_{weight}_{i}")
            m.d.sync += flop.eq(bit)
            flops.append(flop)
        registered.append(flops)
    return registered


def popcount_stages(bits: int) -> int:
    """Full-adder stages of the carry-save tree of a ``bits``-wide operand (the depth of
    :func:`popcount_rows`; 9 for 64 bits)."""
    width = popcount_width(bits)
    columns = [bits] + [0] * max(0, width - 1)
    stages = 0
    while any(count > 2 for count in columns):
        reduced = [0] * width
        for weight, count in enumerate(columns):
            reduced[weight] += count // 3 + count % 3
            if weight + 1 < width:
                reduced[weight + 1] += count // 3
        columns = reduced
        stages += 1
    return stages


def _carry_save(m: Module, bits: list[Value], width: int, name: str,
                register_after: int | None = None):
    """Reduce 1-bit ``bits`` (all of weight 1) to two rows of ``width`` bits, as lists of
    1-bit values (``None`` for a constant 0), whose sum is the count modulo ``2**width``.
    With ``register_after = k``, the bits left after stage ``k`` (``0``: the operand
    bits themselves) are registered before stage ``k + 1`` (at the end if the tree has
    ``k`` stages or fewer).

    Wallace reduction with full adders only: in every stage each column (bits of one
    weight) is cut into groups of three, each group becomes a sum bit (same column) and a
    carry bit (next column), and the one or two bits left over pass on unchanged; stages
    repeat until no column holds more than two bits. Bits of weight ``2**width`` and
    above are dropped (the count is below ``2**width``). Every full-adder output is a
    signal driven in ``m``'s comb domain (an expression used twice would be written out
    twice in the Verilog, and a tree of them grows exponentially).
    """
    columns: list[list[Value]] = [list(bits)] + [[] for _ in range(width - 1)]
    stage = 0
    registered = False
    while any(len(column) > 2 for column in columns):
        if stage == register_after:
            columns, registered = _register(m, columns, name), True
        reduced: list[list[Value]] = [[] for _ in range(width)]
        for weight, column in enumerate(columns):
            full = len(column) - len(column) % 3
            for i in range(0, full, 3):
                a, b, c = column[i:i + 3]
                index = f"{name}_{stage}_{weight}_{i // 3}"
                total = Signal(name=f"{index}_s")
                m.d.comb += total.eq(a ^ b ^ c)
                reduced[weight].append(total)
                if weight + 1 < width:
                    carry = Signal(name=f"{index}_c")
                    m.d.comb += carry.eq((a & b) | (a & c) | (b & c))
                    reduced[weight + 1].append(carry)
            reduced[weight].extend(column[full:])
        columns = reduced
        stage += 1
    if register_after is not None and not registered:
        columns = _register(m, columns, name)
    return ([column[0] if len(column) > 0 else None for column in columns],
            [column[1] if len(column) > 1 else None for column in columns])


def _row(bits: list) -> Value:
    return Cat(Const(0, 1) if bit is None else bit for bit in bits)


def popcount_rows(m: Module, value, *, name: str = "csa", register_after: int | None = None
                  ) -> tuple[Value, Value]:
    """Two addends whose sum is the number of 1 bits of ``value`` (carry-save form).

    ``register_after`` (``None``: purely combinational) registers the tree's bits after
    that many full-adder stages (``0``: the operand itself; see :func:`popcount_stages`),
    so the rows belong to the ``value`` of the previous cycle: a pipeline stage inside
    the tree (the PE's, docs/hardware.md).

    The full adders of the compressor tree are added to ``m`` (comb domain, signals named
    ``{name}_{stage}_{weight}_{n}_s`` / ``_c``). The rows are what the ``"compressor"``
    tree of :func:`popcount` adds in its final carry-propagate adder; a caller that adds
    the count to something else (an accumulator) adds both rows in the same ``+``
    instead.

    Returns
    -------
    tuple of Value
        Two unsigned values, each ``popcount_width(len(value))`` bits wide; their sum is
        the count (it never exceeds ``2**popcount_width(len(value)) − 1``).

    Raises
    ------
    TypeError
        If ``m`` is not a :class:`~amaranth.hdl.Module` or ``value`` is not
        value-castable.
    """
    if not isinstance(m, Module):
        raise TypeError(f"popcount_rows needs the Module to add its logic to, not {m!r}")
    value = _cast(value)
    width = popcount_width(len(value))
    if width == 0:
        return Const(0, 0), Const(0, 0)
    if register_after is not None and (isinstance(register_after, bool)
                                       or not isinstance(register_after, int)
                                       or register_after < 0):
        raise ValueError(f"register_after must be a non-negative integer or None, "
                         f"not {register_after!r}")
    row0, row1 = _carry_save(m, [value[i] for i in range(len(value))], width, name,
                             register_after)
    return _row(row0), _row(row1)


def popcount(value, *, tree: str = "adder", module: Module | None = None) -> Value:
    """Number of 1 bits of ``value`` (any value-castable).

    Parameters
    ----------
    value : value-castable
        The operand; its bits are counted regardless of its signedness.
    tree : str
        ``"adder"`` (balanced tree of minimal-width adders, the default: a pure
        expression) or ``"compressor"`` (carry-save tree and one final adder; needs
        ``module``); see the module docstring.
    module : Module or None
        Where the ``"compressor"`` tree adds its full adders (see
        :func:`popcount_rows`).

    Returns
    -------
    Value
        Unsigned, ``popcount_width(len(value))`` bits wide (``C(0, 0)`` for an empty
        operand).

    Raises
    ------
    TypeError
        If ``value`` is not value-castable.
    ValueError
        If ``tree`` is not one of :data:`POPCOUNT_TREES`, or is ``"compressor"`` without
        a ``module``.
    """
    _check_tree(tree)
    if tree == "compressor" and not isinstance(module, Module):
        raise ValueError("the compressor tree needs module= (the Module to add its full "
                         "adders to)")
    value = _cast(value)
    width = popcount_width(len(value))
    if width == 0:
        return Const(0, 0)
    if tree == "adder" or len(value) < 3:
        return _adder_tree(value, 0, len(value))
    row0, row1 = popcount_rows(module, value)
    return (row0 + row1)[:width]
