"""Bit packing between the host and the device: the one implementation of the layout.

Layout (docs/packing.md has the pictures):

* A binary value is a bit: 1 means +1, 0 means −1.
* **Activations** are stored pixel by pixel in row-major order (``N, H, W``). Each pixel's
  channels are packed innermost into ``word_bits``-wide words: channel ``c`` is bit
  ``c % word_bits`` of word ``c // word_bits``. Words are little-endian (bit 0 is the least
  significant bit of the word's first byte), so a packed pixel is also a little-endian
  bit string of its channels, and the same bytes can be read as 8-, 16-, 32- or 64-bit words.
* **Weights** of a binary conv ``O×C×kh×kw`` are packed per output channel in the order the
  window generator delivers the receptive field: taps ``(ky, kx)`` row-major, each tap one
  packed pixel of ``C`` channels. With ``cols`` > 1 (an array of ``cols`` output columns),
  output channels are grouped into tiles of ``cols``; the array consumes, for each tile,
  each K-word, the ``cols`` weight words side by side.
* **Padding.** When ``C`` is not a multiple of ``word_bits`` the last word of every pixel
  is padded. Activation padding bits are 0 and weight padding bits are 1, so
  ``XNOR(pad_a, pad_w) = 0``: padding never adds to the popcount ``P``, and ``P`` always
  counts exactly the ``K = C·kh·kw`` real products. Output channels added to fill the last
  tile of ``cols`` have weights of all 1s; the threshold compiler gives them ``T = K + 1``
  so they output 0, which is again valid activation padding for the next layer.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "ACTIVATION_PAD_BIT",
    "WEIGHT_PAD_BIT",
    "bits_to_pm1",
    "pack_activations",
    "pack_bits",
    "pack_levels",
    "pack_thresholds",
    "pack_weights",
    "packed_width",
    "pm1_to_bits",
    "unpack_activations",
    "unpack_bits",
    "unpack_levels",
    "unpack_weights",
]

#: Value of the padding bits of an activation word (see the module docstring).
ACTIVATION_PAD_BIT = 0
#: Value of the padding bits of a weight word; XNOR with activation padding gives 0.
WEIGHT_PAD_BIT = 1


def _check_word_bits(word_bits: int) -> int:
    if isinstance(word_bits, bool) or not isinstance(word_bits, (int, np.integer)):
        raise TypeError(f"word_bits must be an integer, not {word_bits!r}")
    if word_bits <= 0 or word_bits % 8:
        raise ValueError(f"word_bits must be a positive multiple of 8, not {word_bits!r}")
    return int(word_bits)


def packed_width(channels: int, word_bits: int) -> int:
    """Bytes one packed pixel (or one weight tap) of ``channels`` bits takes."""
    word_bits = _check_word_bits(word_bits)
    if channels < 0:
        raise ValueError(f"channels must be non-negative, not {channels!r}")
    return -(-channels // word_bits) * (word_bits // 8)


def _as_bit_array(bits, name: str = "bits") -> np.ndarray:
    if isinstance(bits, torch.Tensor):
        bits = bits.detach().cpu().numpy()
    array = np.asarray(bits)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must hold 0/1 values, not dtype {array.dtype}")
    if array.size and not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))].ravel()[0]
        raise ValueError(f"{name} must hold only 0 and 1, found {bad!r}")
    return array.astype(np.uint8, copy=False)


def pack_bits(bits, *, word_bits: int = 32, pad_bit: int = ACTIVATION_PAD_BIT) -> np.ndarray:
    """Pack the last axis of a 0/1 array into little-endian ``word_bits``-wide words.

    Parameters
    ----------
    bits : array-like of 0/1 (numpy, torch or bool), shape ``(..., C)``
        Bit 1 means +1 and bit 0 means −1 (use :func:`pm1_to_bits` for ±1 tensors).
    word_bits : int
        Word width, a positive multiple of 8 (the accelerator's SIMD width).
    pad_bit : 0 or 1
        Value of the padding bits when ``C`` is not a multiple of ``word_bits``:
        :data:`ACTIVATION_PAD_BIT` for activations, :data:`WEIGHT_PAD_BIT` for weights.

    Returns
    -------
    numpy.ndarray of uint8, shape ``(..., packed_width(C, word_bits))``
    """
    word_bits = _check_word_bits(word_bits)
    if pad_bit not in (0, 1):
        raise ValueError(f"pad_bit must be 0 or 1, not {pad_bit!r}")
    array = _as_bit_array(bits)
    if array.ndim == 0:
        raise ValueError("bits must have at least one axis (the channel axis)")
    return _pack(array, word_bits, pad_bit)


def _pack(array: np.ndarray, word_bits: int, pad_bit: int) -> np.ndarray:
    """pack_bits on a uint8 0/1 array that is known to be valid."""
    channels = array.shape[-1]
    padded = -(-channels // word_bits) * word_bits
    if padded != channels:
        pad = np.full((*array.shape[:-1], padded - channels), pad_bit, dtype=np.uint8)
        array = np.concatenate([array, pad], axis=-1)
    # packbits is much faster on a contiguous last axis; the result is contiguous too, so
    # callers can write it to files and links as it is
    return np.packbits(np.ascontiguousarray(array), axis=-1, bitorder="little")


def unpack_bits(packed, channels: int, *, word_bits: int = 32,
                pad_bit: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 ``(..., bytes)`` → 0/1 uint8 ``(..., channels)``.

    If ``pad_bit`` is given, the padding bits are checked to hold that value and a
    :class:`ValueError` is raised otherwise (a corrupted or mislabelled buffer).
    """
    word_bits = _check_word_bits(word_bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be a uint8 array, not dtype {packed.dtype}")
    expected = packed_width(channels, word_bits)
    if packed.ndim == 0 or packed.shape[-1] != expected:
        got = packed.shape[-1] if packed.ndim else "a scalar"
        raise ValueError(
            f"{channels} channels in {word_bits}-bit words take {expected} bytes per pixel, "
            f"but the packed array has {got}")
    bits = np.unpackbits(packed, axis=-1, bitorder="little")
    if pad_bit is not None and bits.shape[-1] > channels:
        pad = bits[..., channels:]
        if not (pad == pad_bit).all():
            raise ValueError(f"padding bits after channel {channels} must all be {pad_bit}")
    return bits[..., :channels]


def pm1_to_bits(x) -> np.ndarray:
    """±1 values (torch or numpy) → 0/1 uint8, with ``sign(0) = +1`` (bit 1)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return (np.asarray(x) >= 0).astype(np.uint8)


def bits_to_pm1(bits, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 bits → a ±1 torch tensor."""
    return _to_pm1(_as_bit_array(bits), dtype)


def _to_pm1(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """bits_to_pm1 on a uint8 0/1 array that is known to be valid."""
    pm1 = array.astype(np.float32)
    pm1 *= 2
    pm1 -= 1
    return torch.from_numpy(pm1).to(dtype)


def pack_activations(x, *, word_bits: int = 32) -> np.ndarray:
    """Pack an ``N×C×H×W`` feature map (±1 torch/numpy) → uint8 ``N×H×W×bytes``.

    This is the byte stream that crosses the link for a feature map: pixels row-major,
    channels innermost.
    """
    bits = pm1_to_bits(x)
    if bits.ndim != 4:
        raise ValueError(f"activations must be N×C×H×W, got shape {tuple(bits.shape)}")
    return _pack(np.moveaxis(bits, 1, -1), _check_word_bits(word_bits), ACTIVATION_PAD_BIT)


def unpack_activations(packed, channels: int, *, word_bits: int = 32,
                       check_padding: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_activations`: uint8 ``N×H×W×bytes`` → ±1 ``N×C×H×W``."""
    packed = np.asarray(packed)
    if packed.ndim != 4:
        raise ValueError(f"packed activations must be N×H×W×bytes, got shape {packed.shape}")
    bits = unpack_bits(packed, channels, word_bits=word_bits,
                       pad_bit=ACTIVATION_PAD_BIT if check_padding else None)
    return _to_pm1(np.ascontiguousarray(np.moveaxis(bits, -1, 1)), torch.float32)


def _check_level_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], not {bits!r}")
    return int(bits)


def pack_levels(levels, bits: int, *, word_bits: int = 32) -> np.ndarray:
    """Pack an n-bit level map ``N×C×H×W`` (integers in ``[0, 2**bits − 1]``) as bit-planes.

    Returns uint8 ``bits×N×H×W×B`` (``B = packed_width(C, word_bits)``), **planes first**:
    ``[b]`` is plane ``b`` (bit ``b`` of every level, ``b = 0`` least significant) packed
    exactly like a 1-bit map, i.e. ``pack_activations`` of that plane as ±1. For
    ``bits = 1``, ``[0]`` is ``pack_activations(2·levels − 1)``.
    """
    bits = _check_level_bits(bits)
    if isinstance(levels, torch.Tensor):
        levels = levels.detach().cpu().numpy()
    array = np.asarray(levels)
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise TypeError(f"levels must hold integers, not dtype {array.dtype}")
    if array.ndim != 4:
        raise ValueError(f"levels must be N×C×H×W, got shape {tuple(array.shape)}")
    top = (1 << bits) - 1
    if array.size and (array.min() < 0 or array.max() > top):
        bad = array[(array < 0) | (array > top)].ravel()[0]
        raise ValueError(f"levels must lie in [0, {top}] for {bits} bits, found {int(bad)}")
    word_bits = _check_word_bits(word_bits)
    pixels = np.moveaxis(array.astype(np.int64), 1, -1)                    # N, H, W, C
    planes = ((pixels[None] >> np.arange(bits).reshape(-1, 1, 1, 1, 1)) & 1).astype(np.uint8)
    return _pack(planes, word_bits, ACTIVATION_PAD_BIT)


def unpack_levels(packed, channels: int, *, word_bits: int = 32,
                  check_padding: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: uint8 ``bits×N×H×W×B`` → int32 levels ``N×C×H×W``."""
    packed = np.asarray(packed)
    if packed.ndim != 5:
        raise ValueError(f"packed levels must be bits×N×H×W×bytes, got shape {packed.shape}")
    _check_level_bits(packed.shape[0])
    planes = unpack_bits(packed, channels, word_bits=word_bits,
                         pad_bit=ACTIVATION_PAD_BIT if check_padding else None)
    weights = (1 << np.arange(packed.shape[0], dtype=np.int32)).reshape(-1, 1, 1, 1, 1)
    levels = (planes.astype(np.int32) * weights).sum(axis=0, dtype=np.int32)  # N, H, W, C
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(levels, -1, 1)))


def pack_weights(w, *, word_bits: int = 32, cols: int = 1) -> np.ndarray:
    """Pack ``O×C×kh×kw`` binary weights (±1) in the order the array consumes them.

    Returns uint8 of shape ``(tiles, kh·kw·words, cols, word_bits // 8)`` where
    ``tiles = ceil(O / cols)`` and ``words = ceil(C / word_bits)``: for tile ``t`` and
    K-word ``j``, ``[t, j, c]`` is the word that column ``c`` (output channel
    ``t·cols + c``) multiplies with K-word ``j`` of the receptive field. Output channels
    beyond ``O`` and channel padding are filled with :data:`WEIGHT_PAD_BIT`.
    """
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols <= 0:
        raise ValueError(f"cols must be a positive integer, not {cols!r}")
    word_bits = _check_word_bits(word_bits)
    bits = pm1_to_bits(w)
    if bits.ndim != 4:
        raise ValueError(f"weights must be O×C×kh×kw, got shape {tuple(bits.shape)}")
    out_channels = bits.shape[0]
    taps = _pack(np.transpose(bits, (0, 2, 3, 1)), word_bits, WEIGHT_PAD_BIT)  # O,kh,kw,bytes
    word_bytes = word_bits // 8
    words = taps.reshape(out_channels, -1, word_bytes)            # O, K-words, word bytes
    tiles = -(-out_channels // cols)
    if tiles * cols != out_channels:
        fill = np.full((tiles * cols - out_channels, *words.shape[1:]), 0xFF, dtype=np.uint8)
        words = np.concatenate([words, fill], axis=0)
    return np.ascontiguousarray(
        words.reshape(tiles, cols, -1, word_bytes).transpose(0, 2, 1, 3))


def unpack_weights(packed, shape: tuple[int, int, int, int], *, word_bits: int = 32,
                   check_padding: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_weights` → ±1 ``O×C×kh×kw`` float tensor."""
    word_bits = _check_word_bits(word_bits)
    out_channels, channels, kh, kw = (int(s) for s in shape)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 4:
        raise ValueError("packed weights must be a 4-D uint8 array (tiles, K-words, cols, bytes)"
                         f", got {packed.dtype} of shape {packed.shape}")
    tiles, _k_words, cols, _word_bytes = packed.shape
    words_per_tap = -(-channels // word_bits)
    expected = (-(-out_channels // cols), kh * kw * words_per_tap, cols, word_bits // 8)
    if packed.shape != expected:
        raise ValueError(f"weights {shape} in {word_bits}-bit words for {cols} columns pack to "
                         f"{expected}, not {packed.shape}")
    words = packed.transpose(0, 2, 1, 3).reshape(tiles * cols, kh, kw, -1)
    if check_padding and tiles * cols > out_channels and not (words[out_channels:] == 0xFF).all():
        raise ValueError(f"weights of the padding output channels (≥ {out_channels}) must be 1s")
    bits = unpack_bits(words[:out_channels], channels, word_bits=word_bits,
                       pad_bit=WEIGHT_PAD_BIT if check_padding else None)
    return _to_pm1(np.ascontiguousarray(np.transpose(bits, (0, 3, 1, 2))), torch.float32)


def pack_thresholds(thresholds, k: int, *, cols: int = 1, in_bits: int = 1) -> np.ndarray:
    """Lay out ``(O, L)`` thresholds (or an ``(O, R, L)`` shortcut table) per column as the
    array consumes them.

    Returns int64 ``(tiles, cols, L)`` — or ``(tiles, cols, R, L)`` for a table — where
    ``[t, c]`` holds the thresholds of output channel ``t·cols + c`` (``[t, c, r]`` its row
    for shortcut level ``r``). Thresholds lie in ``[0, Amax + 1]`` with
    ``Amax = (2**in_bits − 1)·K`` (``K`` for 1-bit input). The fill channels of the last tile
    get ``Amax + 1`` (never reached) in every row, so they output 0 — valid activation
    padding for the next layer.
    """
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols <= 0:
        raise ValueError(f"cols must be a positive integer, not {cols!r}")
    if (isinstance(in_bits, bool) or not isinstance(in_bits, (int, np.integer))
            or not 1 <= in_bits <= 8):
        raise ValueError(f"in_bits must be an integer in [1, 8], not {in_bits!r}")
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().cpu().numpy()
    t = np.asarray(thresholds)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim not in (2, 3) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError("thresholds must be integer (O,), (O, L) or (O, R, L), not "
                         f"{t.dtype} {t.shape}")
    never = ((1 << int(in_bits)) - 1) * k + 1
    if t.size and (t.min() < 0 or t.max() > never):
        bound = "K + 1" if in_bits == 1 else f"(2**{in_bits} − 1)·K + 1"
        raise ValueError(f"thresholds must lie in [0, {bound} = {never}]")
    out_channels = t.shape[0]
    tiles = -(-out_channels // cols)
    out = np.full((tiles * cols, *t.shape[1:]), never, dtype=np.int64)
    out[:out_channels] = t
    return out.reshape(tiles, cols, *t.shape[1:])
