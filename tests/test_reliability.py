"""Reliability suite (slow tier): random corruptions of what users hand to bitdet.

Each part is bounded in time and prints its counts (``pytest -m slow -s`` shows them):

* the shipped bundle under random bit flips, multi-bit flips and truncations: each
  corrupted file is rejected with a ``BundleError`` or loads a bundle identical to the
  original (a harmless flip, e.g. in a zip timestamp) — nothing else;
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bitdet.core.bundle import Bundle, BundleError
from bitdet.core.bundle import load as load_bundle

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "sw" / "assets" / "default.bitdet"
BUDGET_S = 120.0


def _saved_bytes(bundle: Bundle, path: Path) -> bytes:
    """The bytes ``bundle`` saves to (Bundle.save writes the same bytes for the same
    content, so equal bytes mean an identical bundle)."""
    bundle.save(path)
    return path.read_bytes()


def _mutations(data: bytes, rng: np.random.Generator):
    """``(kind, corrupted bytes)``: single-bit flips, 2–8 bit flips, truncations."""
    n = len(data)
    while True:
        kind = rng.choice(["flip1", "flipN", "truncate"], p=[0.5, 0.3, 0.2])
        corrupted = bytearray(data)
        if kind == "truncate":
            yield kind, bytes(corrupted[:int(rng.integers(0, n))])
            continue
        for _ in range(1 if kind == "flip1" else int(rng.integers(2, 9))):
            corrupted[int(rng.integers(0, n))] ^= 1 << int(rng.integers(0, 8))
        yield kind, bytes(corrupted)


@pytest.mark.slow
def test_corrupted_bundles_are_rejected_or_identical(tmp_path):
    data = DEFAULT.read_bytes()
    reference = _saved_bytes(load_bundle(DEFAULT), tmp_path / "reference.bitdet")
    rng = np.random.default_rng(20261207)
    counts = {"rejected": 0, "identical": 0}
    escapes = []
    start = time.monotonic()
    path = tmp_path / "corrupt.bitdet"
    for i, (kind, corrupted) in enumerate(_mutations(data, rng)):
        if i >= 3000 or time.monotonic() - start > BUDGET_S:
            break
        path.write_bytes(corrupted)
        try:
            loaded = load_bundle(path)
        except BundleError:
            counts["rejected"] += 1
            continue
        except Exception as e:           # collected, reported below
            escapes.append(f"{kind} #{i}: {type(e).__name__}: {e}")
            continue
        if _saved_bytes(loaded, tmp_path / "again.bitdet") == reference:
            counts["identical"] += 1
        else:
            escapes.append(f"{kind} #{i}: loaded a different bundle")
    total = sum(counts.values()) + len(escapes)
    print(f"\nbundle corruptions: {total} tried in {time.monotonic() - start:.1f} s, "
          f"{counts['rejected']} rejected, {counts['identical']} loaded identical, "
          f"{len(escapes)} escaped")
    assert total >= 600, f"only {total} corruptions in {BUDGET_S} s"
    assert not escapes, "\n".join(escapes[:20])
