"""The bundle's host part: stem, head, decoding settings and one forward pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bitdet.core.bundle import BundleError
from bitdet.core.bundle import load as load_bundle
from bitdet.core.golden import run_network

DEFAULT = Path(__file__).resolve().parent.parent / "sw" / "assets" / "default.bitdet"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT)      # a missing shipped detector fails here, never skips


@pytest.fixture(scope="module")
def pixels(bundle):
    c, h, w = bundle.model["input"]
    return torch.randint(0, 256, (2, c, h, w), generator=torch.Generator().manual_seed(3))


def test_forward_is_stem_binary_layers_head(bundle, pixels):
    stem = bundle.stem(pixels)
    assert set(stem.unique().tolist()) <= {0, 1}
    maps = run_network(stem.to(torch.float32) * 2 - 1, bundle.binary_layers)
    last = maps[-1]
    if bundle.binary_layers[-1].thresholds is not None:
        last = last.to(torch.float32) * 2 - 1
    expected = bundle.host_layer("head").run(last)
    assert torch.equal(bundle.forward(pixels), expected)


def test_forward_takes_the_binary_layers_from_a_runner(bundle, pixels):
    seen = []

    def runner(bits):
        seen.append(bits)
        return bundle.run_binary(bits.to(torch.float32) * 2 - 1)

    assert torch.equal(bundle.forward(pixels, runner), bundle.forward(pixels))
    assert len(seen) == 1 and torch.equal(seen[0], bundle.stem(pixels))
    # the head reads what the runner returns: flipped bits (or shifted P) change the map
    thresholded = bundle.binary_layers[-1].thresholds is not None
    wrong = bundle.forward(pixels, lambda bits: [(1 - m) if thresholded else (m + 1)
                                                 for m in runner(bits)])
    assert not torch.equal(wrong, bundle.forward(pixels))


def test_host_layer_names_what_exists(bundle):
    with pytest.raises(BundleError, match=r"no host layer 'neck' \(has: stem, head\)"):
        bundle.host_layer("neck")


def test_decode_settings(bundle):
    settings = bundle.decode_settings()
    assert settings["stride"] == bundle.model["grid_stride"]
    no_grid = dataclasses.replace(bundle, model={k: v for k, v in bundle.model.items()
                                                 if k != "grid_stride"})
    with pytest.raises(BundleError, match="no valid 'grid_stride'"):
        no_grid.decode_settings()
    with_prior = dataclasses.replace(bundle, model={**bundle.model, "decode": {"prior": 8}})
    assert with_prior.decode_settings() == {"stride": settings["stride"], "prior": 8.0}
