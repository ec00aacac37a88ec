"""Reading an image file for detection, within bounds.

:func:`read_image` is the one place a user's image file becomes pixels for ``bitdet
detect``. It differs from a bare ``PIL.Image.open`` in three documented ways:

* an image larger than :data:`MAX_IMAGE_PIXELS` is refused in one line (PIL's own
  decompression-bomb guard would end in a traceback, or only warn below twice its limit)
  before any pixel is decoded;
* transparency is not ignored: an image with an alpha channel (RGBA, LA, a palette with a
  transparent entry) is composited over **black**, the background of DigitScenes, so a
  fully transparent image is a black image (and shows no digits);
* 16-bit grayscale is scaled to 8 bits by its maximum.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["MAX_IMAGE_PIXELS", "read_image"]

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest image (width × height) :func:`read_image` decodes: 64 Mi pixels, e.g. 8192 ×
8192 (a detector's input is 64 × 64; larger photos are letterboxed down anyway)."""


def read_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """The image file ``path`` as uint8 ``H × W`` (``channels`` 1) or ``H × W × 3``.

    Raises ``ImageError`` (:class:`bitdet.sw.driver.errors.ImageError`) in one line naming the
    file: missing, not an image, or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    from .driver.errors import ImageError  # a ValueError
    path = Path(path)
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                width, height = pil.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{path}: image of {width}×{height} = {width * height} pixels is over "
                        f"the limit of {MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS); scale it "
                        "down first")
                pil.load()
                if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(pil, dtype=np.float64)
                    top = arr.max() if arr.size and arr.max() > 0 else 1
                    pil = Image.fromarray((arr * 255 / top).astype(np.uint8))
                if pil.mode == "P" and "transparency" in pil.info:
                    pil = pil.convert("RGBA")
                if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                    rgba = pil.convert("RGBA")
                    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                    pil = Image.alpha_composite(black, rgba)
                return np.asarray(pil.convert(mode))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: image over the limit of {MAX_IMAGE_PIXELS} pixels "
                         f"(MAX_IMAGE_PIXELS; {e})") from None
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
