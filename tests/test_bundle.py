"""Tests of the deployment bundle (bitdet.core.bundle): round trips, corrupt files, host layers.

The corruption tests edit a saved bundle byte by byte or rewrite its ZIP with an edited
manifest or replaced members (:func:`rewrite`); every such file must be rejected by
``load`` with a :class:`BundleError` that says what is wrong, and never with another
exception type. The host-layer references are explicit loops over output pixels with the
padding filled in by index checks, independent of ``fixed_point_conv2d``.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdet.core import packing
from bitdet.core.bundle import (
    FORMAT,
    FORMAT_VERSION,
    Bundle,
    BundleError,
    HostLayer,
    Requirements,
    load,
)
from bitdet.core.golden import BinaryConvLayer
from bitdet.sw.demo import build_demo

# Geometry of the demo bundle (bitdet.sw.demo.DEMO_LAYERS on a 13×32×32 input).
DEMO_K = [117, 216, 297, 40]
DEMO_MEMBERS = [
    "manifest.json",
    "binary/0/weights.npy", "binary/0/thresholds.npy",
    "binary/1/weights.npy", "binary/1/thresholds.npy",
    "binary/2/weights.npy", "binary/2/thresholds.npy",
    "binary/3/weights.npy", "binary/3/thresholds.npy",
    "host/0/weight.npy", "host/0/thresholds.npy", "host/0/sign.npy",
    "host/1/weight.npy", "host/1/bias.npy", "host/1/scale.npy",
]


# --------------------------------------------------------------------------- helpers


def random_pm1(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.float32)


def random_thresholds(gen: torch.Generator, out_channels: int, k: int, bits: int):
    """Sorted int64 thresholds in [0, K + 1], with constant channels (0 and K + 1)."""
    t = torch.randint(0, k + 2, (out_channels, 2 ** bits - 1), generator=gen)
    t[0] = 0
    t[-1] = k + 1
    return t.sort(dim=1).values


def npy_bytes(a: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=allow_pickle)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, *, manifest=None, members=None, drop=(),
            raw_manifest: bytes | str | None = None) -> Path:
    """Copy the bundle ZIP ``src`` to ``dst`` with edits.

    ``manifest``: a function that edits the parsed manifest dict in place; ``members``:
    name → new content (bytes, or an array saved with ``np.save``), replacing or adding
    members; ``drop``: members left out; ``raw_manifest``: the manifest's bytes verbatim.
    """
    members = dict(members or {})
    with zipfile.ZipFile(src) as zin, \
            zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        names = [info.filename for info in zin.infolist()]
        for name in [*names, *(n for n in members if n not in names)]:
            if name in drop:
                continue
            if name == "manifest.json":
                if raw_manifest is not None:
                    data = raw_manifest
                else:
                    record = json.loads(zin.read(name))
                    if manifest is not None:
                        manifest(record)
                    data = json.dumps(record, indent=1)
            elif name in members:
                data = members[name]
                if isinstance(data, np.ndarray):
                    data = npy_bytes(data)
            else:
                data = zin.read(name)
            zout.writestr(name, data)
    return dst


def read_member(path: Path, name: str) -> np.ndarray:
    with zipfile.ZipFile(path) as zf:
        return np.load(io.BytesIO(zf.read(name)), allow_pickle=False)


def member_data_span(data: bytes, name: str) -> tuple[int, int]:
    """Byte range of a member's (compressed) data, from its local file header."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    offset = info.header_offset
    assert data[offset:offset + 4] == b"PK\x03\x04"
    name_length, extra_length = struct.unpack("<HH", data[offset + 26:offset + 30])
    start = offset + 30 + name_length + extra_length
    return start, start + info.compress_size


def central_directory_entries(data: bytes) -> dict[str, int]:
    """Member name → offset of its central directory header."""
    end = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack("<I", data[end + 16:end + 20])
    entries = {}
    while data[offset:offset + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[offset + 28:offset + 34])
        entries[data[offset + 46:offset + 46 + n].decode()] = offset
        offset += 46 + n + m + k
    return entries


def assert_layers_equal(a: BinaryConvLayer, b: BinaryConvLayer, where: str) -> None:
    assert torch.equal(a.weights, b.weights), where
    if a.thresholds is None:
        assert b.thresholds is None, where
    else:
        assert b.thresholds is not None, where
        assert not b.thresholds.dtype.is_floating_point, where
        assert torch.equal(a.thresholds.to(torch.int64), b.thresholds.to(torch.int64)), where
    assert (a.stride, a.padding, a.pad_value) == (b.stride, b.padding, b.pad_value), where
    assert a.pool == b.pool, where
    assert a.k == b.k and a.output_bits == b.output_bits, where


def assert_host_layers_equal(a: HostLayer, b: HostLayer, where: str) -> None:
    assert (a.name, a.kind, a.stride, a.padding) == (b.name, b.kind, b.stride, b.padding), where
    assert a.attrs == b.attrs, where
    assert a.arrays.keys() == b.arrays.keys(), where
    for name, array in a.arrays.items():
        other = b.arrays[name]
        assert other.dtype == array.dtype and other.shape == array.shape, f"{where} {name}"
        np.testing.assert_array_equal(other, array, err_msg=f"{where} {name}")


def assert_bundles_equal(a: Bundle, b: Bundle) -> None:
    assert a.input_shape == b.input_shape
    assert a.layer_names == b.layer_names
    assert a.model == b.model
    assert len(a.binary_layers) == len(b.binary_layers)
    for i, (la, lb) in enumerate(zip(a.binary_layers, b.binary_layers, strict=True)):
        assert_layers_equal(la, lb, f"binary layer {i}")
    assert len(a.host_layers) == len(b.host_layers)
    for i, (ha, hb) in enumerate(zip(a.host_layers, b.host_layers, strict=True)):
        assert_host_layers_equal(ha, hb, f"host layer {i}")
    assert a.requirements() == b.requirements()


def assert_same_outputs(a: Bundle, b: Bundle, *, seed: int = 0, methods=("fast",)) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = random_pm1(gen, 2, *a.input_shape)
    for method in methods:
        before = a.run_binary(x, method=method)
        after = b.run_binary(x, method=method)
        assert len(before) == len(after) == len(a.binary_layers)
        for i, (p, q) in enumerate(zip(before, after, strict=True)):
            assert p.dtype == q.dtype and torch.equal(p, q), f"{method} layer {i}"


def expect_error(path: Path, fragment: str) -> BundleError:
    """``load(path)`` must raise BundleError (and nothing else) matching ``fragment``."""
    try:
        load(path)
    except BundleError as e:
        assert re.search(fragment, str(e)), f"{fragment!r} not in {str(e)!r}"
        return e
    except Exception as e:           # the point is to report any other type
        pytest.fail(f"load raised {type(e).__name__}: {e} instead of BundleError")
    pytest.fail("load accepted the file")


def expect_error_or_identical(path: Path, fragment: str, reference: Bundle) -> None:
    """``load(path)`` raises BundleError matching ``fragment`` or returns ``reference``."""
    try:
        loaded = load(path)
    except BundleError as e:
        assert re.search(fragment, str(e)), f"{fragment!r} not in {str(e)!r}"
        return
    except Exception as e:           # the point is to report any other type
        pytest.fail(f"load raised {type(e).__name__}: {e} instead of BundleError")
    assert_bundles_equal(reference, loaded)


def small_bundle(last: str, *, host: bool = True, seed: int = 0) -> Bundle:
    """Three binary layers, channels 13 → 21 → 19 → 11 on a 13×9×11 input.

    ``last``: "raw" (thresholds None), "2bit" or "1bit" for the last layer.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = []
    specs = [  # (in, out, kernel, stride, padding, pad_value, pool)
        (13, 21, 3, 1, 1, 1, (2, 2)),
        (21, 19, 3, 2, 1, -1, None),
        (19, 11, 1, 1, 0, -1, None),
    ]
    for i, (c, o, k, s, p, v, pool) in enumerate(specs):
        w = random_pm1(gen, o, c, k, k)
        if i < len(specs) - 1 or last == "1bit":
            t = random_thresholds(gen, o, c * k * k, 1)
        elif last == "2bit":
            t = random_thresholds(gen, o, c * k * k, 2)
        else:
            t = None
        layers.append(BinaryConvLayer(w, t, stride=s, padding=p, pad_value=v, pool=pool))
    host_layers = []
    if host:
        rng = np.random.default_rng(seed)
        host_layers.append(HostLayer(
            name="head", kind="conv_affine", stride=1, padding=1, attrs={"note": [1, "two"]},
            arrays={"weight": rng.integers(-128, 128, (5, 11, 3, 3), dtype=np.int8),
                    "bias": rng.integers(-9999, 9999, 5, dtype=np.int32),
                    "scale": rng.random(5, dtype=np.float32)}))
    return Bundle(binary_layers=layers, input_shape=(13, 9, 11), host_layers=host_layers,
                  layer_names=["first", "second", "last"],
                  model={"classes": ["a", "b"], "nested": {"x": 1.5, "y": None}})


@pytest.fixture(scope="module")
def demo():
    """(stem, float blocks, bundle) of build_demo(0); do not mutate."""
    return build_demo(0)


@pytest.fixture(scope="module")
def demo_file(demo, tmp_path_factory) -> Path:
    return demo[2].save(tmp_path_factory.mktemp("bundle") / "demo.bitdet")


@pytest.fixture(scope="module")
def demo_loaded(demo_file) -> Bundle:
    return load(demo_file)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("seed", [0, 7])
def test_demo_round_trip(seed, tmp_path):
    stem, _blocks, bundle = build_demo(seed)
    path = bundle.save(tmp_path / "demo.bitdet")
    assert path == tmp_path / "demo.bitdet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.bitdet"]   # no .tmp left
    loaded = load(path)
    assert_bundles_equal(bundle, loaded)
    assert loaded.layer_names == ["bconv1", "bconv2", "bconv3", "bconv4"]
    assert [layer.k for layer in loaded.binary_layers] == DEMO_K
    assert [h.name for h in loaded.host_layers] == ["stem", "head"]
    assert loaded.model["seed"] == seed
    assert_same_outputs(bundle, loaded, seed=seed, methods=("fast", "reference"))
    # the host layers compute the same thing after the round trip
    pixels = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(stem.run(pixels), loaded.host_layers[0].run(pixels))
    bits = random_pm1(torch.Generator().manual_seed(2), 1, 70, 8, 8)
    assert torch.equal(bundle.host_layers[1].run(bits), loaded.host_layers[1].run(bits))


def test_demo_bundle_members_and_manifest(demo, demo_file):
    with zipfile.ZipFile(demo_file) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == DEMO_MEMBERS
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
        assert zf.testzip() is None
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == FORMAT == "bitdet-bundle"
    assert manifest["version"] == FORMAT_VERSION == 1
    assert manifest["weight_word_bits"] == 8
    assert manifest["input_shape"] == [13, 32, 32]
    bundle = demo[2]
    for i, (record, layer) in enumerate(zip(manifest["binary_layers"], bundle.binary_layers,
                                            strict=True)):
        o, c, kh, kw = layer.weights.shape
        assert record["in_channels"] == c and record["out_channels"] == o
        assert record["kernel"] == [kh, kw] and record["k"] == layer.k
        assert record["output"] == "bits" and record["output_bits"] == 1
        weights = read_member(demo_file, record["weights"])
        assert weights.dtype == np.uint8 and weights.shape == (o, kh, kw, -(-c // 8))
        expected = packing.pack_weights(layer.weights, word_bits=8).reshape(o, kh, kw, -1)
        np.testing.assert_array_equal(weights, expected)
        thresholds = read_member(demo_file, record["thresholds"])
        assert thresholds.dtype == np.int32
        np.testing.assert_array_equal(thresholds, layer.thresholds.numpy())
        assert record["weights"] == f"binary/{i}/weights.npy"
    assert manifest["host_layers"][0]["attrs"] == {"zero_point": 128}
    assert manifest["host_layers"][0]["arrays"] == {
        "weight": "host/0/weight.npy", "thresholds": "host/0/thresholds.npy",
        "sign": "host/0/sign.npy"}


def test_requirements_of_the_demo(demo_loaded):
    r = demo_loaded.requirements()
    assert isinstance(r, Requirements)
    assert (r.layers, r.max_in_channels, r.max_out_channels, r.max_k) == (4, 40, 70, 297)
    assert (r.max_kernel, r.max_stride, r.max_padding, r.max_pool_kernel) == (3, 2, 1, 2)
    assert (r.max_output_bits, r.raw_output, r.max_pixels) == (1, False, 32 * 32)
    assert r.layer_shapes == (
        (13, 24, 3, 3, (32, 32), (16, 16)),
        (24, 33, 3, 3, (16, 16), (16, 16)),
        (33, 40, 3, 3, (16, 16), (8, 8)),
        (40, 70, 1, 1, (8, 8), (8, 8)),
    )
    assert r.threshold_entries() == 24 + 33 + 40 + 70
    # words per tap: ceil(C / 32) with 32-bit words, ceil(C / 8) with 8-bit ones
    assert r.weight_words(32) == 24 * 9 * 1 + 33 * 9 * 1 + 40 * 9 * 2 + 70 * 1 * 2
    assert r.weight_words(8) == 24 * 9 * 2 + 33 * 9 * 3 + 40 * 9 * 5 + 70 * 1 * 5
    assert r.activation_words(32) == 32 * 32 * 1
    # layer 1 pools: its 32×32×24 conv map lands in a bank before the pool pass
    assert r.conv_shapes == ((32, 32), (16, 16), (8, 8), (8, 8))
    assert r.activation_words(8) == max(32 * 32 * 2, 32 * 32 * 3, 16 * 16 * 5, 8 * 8 * 9)
    assert demo_loaded.output_shape() == (70, 8, 8)


@pytest.mark.parametrize("last", ["raw", "2bit", "1bit"])
@pytest.mark.parametrize("host", [True, False])
def test_small_bundle_round_trip(last, host, tmp_path):
    bundle = small_bundle(last, host=host, seed=3)
    loaded = load(bundle.save(tmp_path / "small.bitdet"))
    assert_bundles_equal(bundle, loaded)
    assert_same_outputs(bundle, loaded, methods=("fast", "reference"))
    r = loaded.requirements()
    assert r.raw_output == (last == "raw")
    assert r.max_output_bits == {"raw": 1, "2bit": 2, "1bit": 1}[last]
    assert loaded.output_shape() == (11, 2, 3)
    assert r.layer_shapes == ((13, 21, 3, 3, (9, 11), (4, 5)),
                              (21, 19, 3, 3, (4, 5), (2, 3)),
                              (19, 11, 1, 1, (2, 3), (2, 3)))
    out = loaded.run_binary(random_pm1(torch.Generator().manual_seed(0), 1, 13, 9, 11))[-1]
    if last == "raw":
        assert loaded.binary_layers[-1].output_bits is None
        assert 0 <= int(out.min()) and int(out.max()) <= 19        # P in [0, K]
    elif last == "2bit":
        assert loaded.binary_layers[-1].output_bits == 2
        assert set(out.unique().tolist()) <= {0, 1, 2, 3}
    if host:
        x = random_pm1(torch.Generator().manual_seed(5), 2, 11, 2, 3)
        assert torch.equal(bundle.host_layers[0].run(x), loaded.host_layers[0].run(x))


def test_save_overwrites_and_default_names(tmp_path):
    small = small_bundle("raw", host=False)
    bundle = Bundle(binary_layers=small.binary_layers, input_shape=[13, 9, 11])
    assert bundle.input_shape == (13, 9, 11)
    assert bundle.layer_names == ["binary0", "binary1", "binary2"]
    path = tmp_path / "b.bitdet"
    path.write_bytes(b"old contents")
    bundle.save(str(path))
    assert load(path).layer_names == ["binary0", "binary1", "binary2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bitdet"]


def test_save_is_reproducible(tmp_path):
    """The same bundle writes the same bytes whenever it is saved (no clock in the zip)."""
    bundle = small_bundle("2bit", host=True, seed=3)
    a = bundle.save(tmp_path / "a.bitdet").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.bitdet") as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zf.infolist())
    assert bundle.save(tmp_path / "b.bitdet").read_bytes() == a
    assert load(tmp_path / "a.bitdet").save(tmp_path / "c.bitdet").read_bytes() == a


# --------------------------------------------------------------------------- Bundle.save refuses


def _replace_layer(bundle: Bundle, index: int, **changes) -> Bundle:
    bundle = copy.deepcopy(bundle)
    layer = bundle.binary_layers[index]
    fields = {"weights": layer.weights, "thresholds": layer.thresholds, "stride": layer.stride,
              "padding": layer.padding, "pad_value": layer.pad_value, "pool": layer.pool}
    fields.update(changes)
    bundle.binary_layers[index] = BinaryConvLayer(**fields)
    return bundle


def _invalid_bundles():
    base = small_bundle("2bit")
    t0 = base.binary_layers[0].thresholds.clone()
    too_high, too_low = t0.clone(), t0.clone()
    too_high[3, 0] = 13 * 9 + 2
    too_low[4, 0] = -1
    unsorted = base.binary_layers[2].thresholds.clone()
    unsorted[1] = torch.tensor([5, 3, 7])
    head = copy.deepcopy(base)
    head.host_layers[0].arrays["scale"] = np.full(5, np.nan, dtype=np.float32)
    kind = copy.deepcopy(base)
    kind.host_layers[0].kind = "conv_magic"
    names = copy.deepcopy(base)
    names.layer_names = ["only one"]
    return [
        ("threshold too high", _replace_layer(base, 0, thresholds=too_high),
         r"binary layer 0 \('first'\): threshold 119 out of range \[0, K \+ 1 = 118\]"),
        ("threshold negative", _replace_layer(base, 0, thresholds=too_low),
         r"threshold -1 out of range"),
        ("unsorted", _replace_layer(base, 2, thresholds=unsorted), r"must be sorted"),
        ("raw not last", _replace_layer(base, 1, thresholds=None),
         r"only the last layer may output raw P"),
        ("2-bit not last", _replace_layer(base, 0, thresholds=t0.repeat(1, 3)),
         r"must output 1 bit, not 2"),
        ("chain", _replace_layer(base, 1, weights=base.binary_layers[1].weights[:, :20]),
         r"takes 20 input channels but receives 21"),
        ("pad value", _replace_layer(base, 0, pad_value=0), r"pad_value ±1"),
        ("nan scale", head, r"'scale' must be finite"),
        ("unknown kind", kind, r"unknown host layer kind 'conv_magic'"),
        ("names", names, r"layer_names must name every binary layer"),
    ]


@pytest.mark.parametrize(("bundle", "fragment"),
                         [pytest.param(b, f, id=i) for i, b, f in _invalid_bundles()])
def test_save_refuses_invalid_bundle_and_writes_nothing(bundle, fragment, tmp_path):
    path = tmp_path / "bad.bitdet"
    with pytest.raises(BundleError, match=fragment):
        bundle.save(path)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(tmp_path):
    good = small_bundle("raw")
    path = good.save(tmp_path / "model.bitdet")
    before = path.read_bytes()
    bad = _replace_layer(good, 0, thresholds=torch.full((21, 1), -5))
    with pytest.raises(BundleError, match="out of range"):
        bad.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bitdet"]


def _unserializable_attrs() -> Bundle:
    bundle = small_bundle("1bit")
    bundle.host_layers[0].attrs = {"zero_point": np.int64(128)}   # not JSON-serializable
    return bundle


def _unserializable_model() -> Bundle:
    bundle = small_bundle("1bit")
    bundle.model = {"seed": np.int64(3)}
    return bundle


def _object_array() -> Bundle:
    bundle = small_bundle("1bit")
    bundle.host_layers[0].arrays["extra"] = np.array([None] * 5, dtype=object)
    return bundle


@pytest.mark.parametrize("make", [_unserializable_attrs, _unserializable_model, _object_array],
                         ids=["numpy attrs", "numpy model", "object array"])
def test_save_refuses_unwritable_bundle_and_leaves_no_file(make, tmp_path):
    """A bundle that cannot be written must raise BundleError before anything is on disk.

    Regression test: Bundle.validate once missed JSON-serializability and extra host arrays,
    so save failed half-way (TypeError/ValueError) and left ``<name>.tmp`` behind.
    """
    bundle = make()
    try:
        bundle.save(tmp_path / "x.bitdet")
    except Exception as e:           # any type here; checked below, after the leftovers
        error = e
    else:
        pytest.fail("save wrote a bundle that cannot be represented")
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [], f"save raised {type(error).__name__}: {error} and left {leftovers}"
    assert isinstance(error, BundleError), f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.bitdet", r"nope\.bitdet: no such bundle file")


def test_directory_is_not_a_bundle(tmp_path):
    expect_error(tmp_path, r"no such bundle file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bitdet"
    path.write_bytes(b"")
    expect_error(path, r"not a bitdet bundle \(wrong magic.*found b''\)")


def test_random_bytes(tmp_path):
    data = np.random.default_rng(12).bytes(5000)
    assert not data.startswith(b"PK")
    path = tmp_path / "random.bitdet"
    path.write_bytes(data)
    expect_error(path, r"wrong magic")


@pytest.mark.parametrize("magic", [b"\x7fELF", b"\x1f\x8b\x08\x00", b"PK\x05\x06", b"{\"fo"])
def test_wrong_magic(magic, demo_file, tmp_path):
    path = tmp_path / "magic.bitdet"
    path.write_bytes(magic + demo_file.read_bytes()[4:])
    expect_error(path, r"not a bitdet bundle \(wrong magic")


def test_zip_magic_then_garbage(tmp_path):
    path = tmp_path / "garbage.bitdet"
    path.write_bytes(b"PK\x03\x04" + np.random.default_rng(0).bytes(3000))
    expect_error(path, r"truncated or corrupt bundle")


TRUNCATIONS = [("fraction", f / 10) for f in range(10)] + [("keep", 3), ("minus", 1),
                                                           ("minus", 22)]


@pytest.mark.parametrize(("how", "amount"), TRUNCATIONS, ids=[f"{h}-{a}" for h, a in TRUNCATIONS])
def test_truncated(how, amount, demo_file, tmp_path):
    data = demo_file.read_bytes()
    n = {"fraction": int(len(data) * amount), "keep": amount, "minus": len(data) - amount}[how]
    path = tmp_path / "cut.bitdet"
    path.write_bytes(data[:n])
    expect_error(path, r"wrong magic" if n < 4 else r"truncated or corrupt bundle")


FLIPPED_MEMBERS = ["manifest.json", "binary/0/weights.npy", "binary/3/thresholds.npy",
                   "host/1/scale.npy"]


@pytest.mark.parametrize("member", FLIPPED_MEMBERS)
@pytest.mark.parametrize("where", [0.0, 0.25, 0.5, 0.75], ids=lambda f: f"at {f:.0%}")
def test_flipped_byte_in_member_data(member, where, demo_file, tmp_path):
    data = bytearray(demo_file.read_bytes())
    start, end = member_data_span(bytes(data), member)
    data[start + int((end - start) * where)] ^= 0xFF
    path = tmp_path / "flipped.bitdet"
    path.write_bytes(bytes(data))
    # inflating garbage gives a zlib error, an early end or a CRC mismatch: all BundleError
    expect_error(path, rf"member '{re.escape(member)}' is (truncated or )?corrupt")


@pytest.mark.parametrize("member", FLIPPED_MEMBERS)
def test_flipped_last_byte_of_member_data(member, demo, demo_file, tmp_path):
    """The deflate stream's last byte may only hold its end-of-block code: zipfile stops
    once it has the member's size in bytes and the CRC holds, so the bundle may load, but
    then it must be the original bundle."""
    data = bytearray(demo_file.read_bytes())
    _start, end = member_data_span(bytes(data), member)
    data[end - 1] ^= 0xFF
    path = tmp_path / "flipped.bitdet"
    path.write_bytes(bytes(data))
    expect_error_or_identical(path, rf"'{re.escape(member)}' is (truncated or )?corrupt",
                              demo[2])


def test_zeroed_member_data(demo_file, tmp_path):
    data = bytearray(demo_file.read_bytes())
    start, end = member_data_span(bytes(data), "binary/2/weights.npy")
    data[start:end] = bytes(end - start)
    path = tmp_path / "zeroed.bitdet"
    path.write_bytes(bytes(data))
    expect_error(path, r"'binary/2/weights\.npy' is (truncated or )?corrupt")


# Fields of a ZIP central directory header (offset within the header, XOR mask).
CENTRAL_DIRECTORY_FLIPS = {
    "version needed": (6, 0xFF),
    "flag: encrypted": (8, 0x01),
    "flag: patched data": (8, 0x20),
    "compression method": (10, 0x01),
    "compression method high byte": (11, 0xFF),
    "local header offset": (42, 0x01),
    "compressed size": (20, 0x10),
}


@pytest.mark.parametrize("member", ["binary/1/weights.npy"])
@pytest.mark.parametrize("field", list(CENTRAL_DIRECTORY_FLIPS))
def test_corrupt_central_directory_field(field, member, demo, demo_file, tmp_path):
    """A single flipped bit in the ZIP directory must still give BundleError.

    zipfile raises NotImplementedError (version needed, patched-data flag, compression
    method) or RuntimeError (encrypted flag) for these, which load does not catch.
    """
    data = bytearray(demo_file.read_bytes())
    offset, mask = CENTRAL_DIRECTORY_FLIPS[field]
    data[central_directory_entries(bytes(data))[member] + offset] ^= mask
    path = tmp_path / "directory.bitdet"
    path.write_bytes(bytes(data))
    # a flip that leaves the content readable (a larger compressed size) may load
    expect_error_or_identical(path, rf"{re.escape(member)}|corrupt", demo[2])


def _flip_outcomes(data: bytes, positions, masks, path: Path, reference: Bundle,
                   assert_equal=None) -> list[str]:
    """Load every single-byte corruption; list those that are neither equal (by
    ``assert_equal``, default :func:`assert_bundles_equal`) nor BundleError."""
    assert_equal = assert_bundles_equal if assert_equal is None else assert_equal
    problems = []
    for position, mask in itertools.product(positions, masks):
        corrupted = bytearray(data)
        corrupted[position] ^= mask
        path.write_bytes(bytes(corrupted))
        try:
            loaded = load(path)
        except BundleError:
            continue
        except Exception as e:       # collected and reported below
            problems.append(f"byte {position} ^ {mask:#04x}: {type(e).__name__}: {e}")
            continue
        try:                         # a harmless flip (timestamp, ...) must change nothing
            assert_equal(reference, loaded)
        except AssertionError as e:
            problems.append(f"byte {position} ^ {mask:#04x}: loaded a different bundle ({e})")
    return problems


def test_every_flipped_byte_of_the_zip_directory(demo_file, demo, tmp_path):
    data = demo_file.read_bytes()
    start = min(central_directory_entries(data).values())
    problems = _flip_outcomes(data, range(start, len(data)), (0xFF,),
                              tmp_path / "f.bitdet", demo[2])
    if problems:
        pytest.fail(f"{len(problems)} corruptions escape:\n" + "\n".join(problems[:20]))


def test_sampled_flipped_bytes_of_headers_and_data(demo_file, demo, tmp_path):
    data = demo_file.read_bytes()
    end = min(central_directory_entries(data).values())
    positions = np.random.default_rng(5).choice(end, size=150, replace=False).tolist()
    problems = _flip_outcomes(data, positions, (0xFF, 0x01), tmp_path / "f.bitdet", demo[2])
    if problems:
        pytest.fail(f"{len(problems)} corruptions escape:\n" + "\n".join(problems[:20]))


@pytest.mark.slow
def test_every_flipped_byte(demo_file, demo, tmp_path):
    data = demo_file.read_bytes()
    problems = _flip_outcomes(data, range(len(data)), (0xFF, 0x01, 0x80),
                              tmp_path / "f.bitdet", demo[2])
    if problems:
        pytest.fail(f"{len(problems)} corruptions escape:\n" + "\n".join(problems[:40]))


# --------------------------------------------------------------------------- the manifest


def _set(path: str, value):
    """Manifest editor: set a value at a '/'-separated path (list indices as integers)."""
    def edit(manifest):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = manifest
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _delete(path: str):
    def edit(manifest):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = manifest
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _edits(*edits):
    def edit(manifest):
        for e in edits:
            e(manifest)
    return edit


MANIFEST_EDITS = {
    # envelope
    "wrong format": (_set("format", "bitdet-bundel"),
                     r"not a bitdet bundle \(format 'bitdet-bundel', expected 'bitdet-bundle'\)"),
    "no format": (_delete("format"), r"not a bitdet bundle \(format None"),
    "newer version": (_set("version", 3),
                      r"bundle format version 3 is not supported \(this bitdet reads versions "
                      r"1 and 2\); upgrade bitdet"),
    "version 2 manifest of a chain": (_set("version", 2), r"manifest: missing field 'input_bits'"),
    "older version": (_set("version", 0), r"version 0 is not supported.*re-export the model"),
    "version string": (_set("version", "1"), r"bundle version must be an integer, not '1'"),
    "version float": (_set("version", 1.0), r"bundle version must be an integer, not 1\.0"),
    "version bool": (_set("version", True), r"bundle version must be an integer, not True"),
    "no version": (_delete("version"), r"bundle version must be an integer, not None"),
    "word bits": (_set("weight_word_bits", 32), r"weight_word_bits must be 8, not 32"),
    "input shape 2-D": (_set("input_shape", [13, 32]), r"input_shape must be three positive"),
    "input shape zero": (_set("input_shape", [13, 0, 32]), r"input_shape must be three"),
    "input channels": (_set("input_shape", [14, 32, 32]),
                       r"binary layer 0 \('bconv1'\): takes 13 input channels but receives 14"),
    "input size": (_set("input_shape", [13, 30, 32]), r"requirements disagree with its layers"),
    "tiny input": (_set("input_shape", [13, 1, 1]), r"pool 2×2 does not fit the output"),
    "no binary layers": (_set("binary_layers", []), r"manifest: no binary layers"),
    "binary layers not a list": (_set("binary_layers", {}), r"field 'binary_layers' must be list"),
    "layer not an object": (_set("binary_layers/1", "bconv2"),
                            r"binary layer 1: must be a JSON object"),
    "no host layers field": (_delete("host_layers"), r"missing field 'host_layers'"),
    "output_bits edited": (_set("binary_layers/0/output_bits", 2),
                           r"binary layer 0 \('bconv1'\): output_bits is 2 but its thresholds "
                           r"give 1"),
    "output_bits not an int": (_set("binary_layers/0/output_bits", "1"),
                               r"field 'output_bits' must be int or null"),
    "model not an object": (_set("model", ["x"]), r"field 'model' must be dict"),
    # binary layer geometry
    "in_channels (k mismatch)": (_set("binary_layers/0/in_channels", 14),
                                 r"binary layer 0 \('bconv1'\): k = 117 but C·kh·kw = 126"),
    "in_channels and k": (_edits(_set("binary_layers/0/in_channels", 14),
                                 _set("binary_layers/0/k", 126)),
                          r"binary layer 0 \('bconv1'\): takes 14 input channels but "
                          r"receives 13"),
    "in_channels (packed width)": (_set("binary_layers/0/in_channels", 17),
                                   r"weights array has shape \(24, 3, 3, 2\), but 24 output "
                                   r"channels, 17 input channels and a 3×3 kernel need "
                                   r"\(24, 3, 3, 3\)"),
    "in_channels zero": (_set("binary_layers/0/in_channels", 0),
                         r"channel counts must be positive"),
    "out_channels": (_set("binary_layers/1/out_channels", 32), r"weights array has shape"),
    "kernel": (_set("binary_layers/2/kernel", [1, 1]),
               r"binary layer 2 \('bconv3'\): weights array has shape \(40, 3, 3, 5\)"),
    "kernel not square": (_set("binary_layers/2/kernel", [3, 1]), r"weights array has shape"),
    "kernel 3 numbers": (_set("binary_layers/2/kernel", [3, 3, 1]), r"kernel must be \[kh, kw\]"),
    "kernel negative": (_set("binary_layers/2/kernel", [-3, 3]), r"kernel must be \[kh, kw\]"),
    "k": (_set("binary_layers/3/k", 41), r"k = 41 but C·kh·kw = 40"),
    "stride zero": (_set("binary_layers/1/stride", 0), r"stride must be ≥ 1"),
    "stride string": (_set("binary_layers/1/stride", "1"), r"field 'stride' must be int, not '1'"),
    "stride bool": (_set("binary_layers/1/stride", True), r"field 'stride' must be int"),
    "padding negative": (_set("binary_layers/1/padding", -1), r"padding ≥ 0"),
    "pad value": (_set("binary_layers/1/pad_value", 0), r"pad_value ±1; got 1, 1, 0"),
    "missing pad value": (_delete("binary_layers/1/pad_value"), r"missing field 'pad_value'"),
    "stride 2 (sizes)": (_set("binary_layers/1/stride", 2), r"requirements disagree"),
    "pool removed": (_set("binary_layers/0/pool", None), r"requirements disagree"),
    "pool shape": (_set("binary_layers/0/pool", [2]), r"pool must be \[kernel, stride\] or null"),
    "pool zero": (_set("binary_layers/0/pool", [0, 2]),
                  r"pool must be \[kernel, stride\] or null \(positive\), not \[0, 2\]"),
    "pool string": (_set("binary_layers/0/pool", "2x2"), r"field 'pool' must be list or null"),
    "name": (_set("binary_layers/0/name", 7), r"binary layer 0: field 'name' must be str"),
    "output kind": (_set("binary_layers/0/output", "float"),
                    r"output must be 'bits' or 'raw', not 'float'"),
    "raw not last": (_edits(_set("binary_layers/0/output", "raw"),
                            _set("binary_layers/0/thresholds", None),
                            _set("binary_layers/0/pool", None)),
                     r"binary layer 0 \('bconv1'\): only the last layer may output raw P"),
    "raw with thresholds": (_set("binary_layers/3/output", "raw"),
                            r"binary layer 3 \('bconv4'\): a raw layer has no thresholds"),
    "raw pooled": (_edits(_set("binary_layers/3/output", "raw"),
                          _set("binary_layers/3/thresholds", None),
                          _set("binary_layers/3/pool", [1, 1])),
                   r"a raw layer cannot be pooled"),
    "raw last (requirements)": (_edits(_set("binary_layers/3/output", "raw"),
                                       _set("binary_layers/3/thresholds", None)),
                                r"requirements disagree"),
    "bits without thresholds": (_set("binary_layers/2/thresholds", None),
                                r"field 'thresholds' must be str, not None"),
    "thresholds of another layer": (_set("binary_layers/2/thresholds",
                                         "binary/1/thresholds.npy"),
                                    r"thresholds must be \(O, 2\*\*n - 1\) = \(40, \.\.\.\), "
                                    r"not \(33, 1\)"),
    "weights of another layer": (_set("binary_layers/0/weights", "binary/1/weights.npy"),
                                 r"weights array has shape"),
    "weights member missing": (_set("binary_layers/0/weights", "binary/9/weights.npy"),
                               r"missing member 'binary/9/weights\.npy'"),
    "weights reference not a string": (_set("binary_layers/0/weights", 3),
                                       r"field 'weights' must be str"),
    "weights are the manifest": (_set("binary_layers/0/weights", "manifest.json"),
                                 r"'manifest\.json' is not a valid \.npy array"),
    # requirements
    "requirements max_k": (_set("requirements/max_k", 298), r"requirements disagree"),
    "requirements layers": (_set("requirements/layers", 5), r"requirements disagree"),
    "requirements raw": (_set("requirements/raw_output", True), r"requirements disagree"),
    "requirements shape": (_set("requirements/layer_shapes/0/4", [32, 31]),
                           r"requirements disagree"),
    "requirements missing": (_delete("requirements"), r"requirements disagree"),
    "requirements extra key": (_set("requirements/simd", 32), r"requirements disagree"),
    # host layers
    "host kind": (_set("host_layers/0/kind", "conv_magic"),
                  r"host layer 0 \('stem'\): unknown host layer kind 'conv_magic' "
                  r"\(known: conv_threshold, conv_affine\)"),
    "host kind swapped": (_set("host_layers/1/kind", "conv_threshold"),
                          r"host layer 1 \('head'\): missing array 'thresholds'"),
    "host missing array": (_delete("host_layers/0/arrays/sign"),
                           r"host layer 0 \('stem'\): missing array 'sign'"),
    "host missing member": (_set("host_layers/1/arrays/bias", "host/1/nothing.npy"),
                            r"missing member 'host/1/nothing\.npy'"),
    "host array of another kind": (_set("host_layers/1/arrays/bias", "host/0/sign.npy"),
                                   r"array 'bias' must be 1-D int32, not 1-D int8"),
    "host stride": (_set("host_layers/0/stride", 0), r"stride must be ≥ 1 and padding ≥ 0"),
    "host padding type": (_set("host_layers/0/padding", 1.0), r"field 'padding' must be int"),
    "host attrs": (_set("host_layers/0/attrs", None), r"field 'attrs' must be dict"),
    "host arrays": (_set("host_layers/0/arrays", ["host/0/weight.npy"]),
                    r"field 'arrays' must be dict"),
    "host array reference": (_set("host_layers/0/arrays/sign", 5),
                             r"array reference must be a member name, not 5"),
    "host layer not an object": (_set("host_layers/0", None), r"host layer 0: must be a JSON"),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_edited_manifest(edit, demo_file, tmp_path):
    change, fragment = MANIFEST_EDITS[edit]
    path = rewrite(demo_file, tmp_path / "edited.bitdet", manifest=change)
    error = expect_error(path, fragment)
    assert str(error).startswith(str(path)), "the message must name the file"


def test_rewrite_without_edits_loads(demo_file, demo, tmp_path):
    """The test helper itself produces loadable bundles."""
    path = rewrite(demo_file, tmp_path / "copy.bitdet")
    assert_bundles_equal(demo[2], load(path))


@pytest.mark.parametrize(("manifest", "fragment"), [
    (b"", r"manifest is not valid JSON"),
    (b"{\"format\": \"bitdet-bundle\", ", r"manifest is not valid JSON"),
    (b"\xff\xfe\x00\xff garbage", r"manifest is not valid JSON"),
    (b"\x89PNG\r\n", r"manifest is not valid JSON"),
    (b"[1, 2]", r"not a bitdet bundle \(format None"),
    (b"\"bitdet-bundle\"", r"not a bitdet bundle"),
    (b"null", r"not a bitdet bundle"),
], ids=["empty", "cut", "binary", "png", "list", "string", "null"])
def test_manifest_not_a_manifest(manifest, fragment, demo_file, tmp_path):
    path = rewrite(demo_file, tmp_path / "m.bitdet", raw_manifest=manifest)
    expect_error(path, fragment)


def test_deeply_nested_manifest(demo_file, tmp_path):
    """Valid JSON nested past the recursion limit: json raises RecursionError."""
    path = rewrite(demo_file, tmp_path / "deep.bitdet",
                   raw_manifest="[" * 100_000 + "]" * 100_000)
    expect_error(path, r"manifest")


def test_missing_manifest(demo_file, tmp_path):
    path = rewrite(demo_file, tmp_path / "nomanifest.bitdet", drop={"manifest.json"})
    expect_error(path, r"missing member 'manifest\.json'")


def test_plain_zip_is_not_a_bundle(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    expect_error(path, r"missing member 'manifest\.json'")


# --------------------------------------------------------------------------- replaced arrays


def _demo_array(demo, member: str) -> np.ndarray:
    """The array the demo bundle stores as ``member`` (computed, not read)."""
    bundle = demo[2]
    kind, index, name = member.split("/")
    if kind == "host":
        return bundle.host_layers[int(index)].arrays[name.removesuffix(".npy")].copy()
    layer = bundle.binary_layers[int(index)]
    if name == "thresholds.npy":
        return layer.thresholds.numpy().astype(np.int32)
    o, _c, kh, kw = layer.weights.shape
    return packing.pack_weights(layer.weights, word_bits=8).reshape(o, kh, kw, -1)


def _modified(member: str, change):
    def make(demo):
        a = _demo_array(demo, member)
        out = change(a)
        return a if out is None else out
    return member, make


def _setitem(index, value):
    def change(a):
        a[index] = value
    return change


ARRAY_EDITS = {
    "threshold K + 2": (_modified("binary/0/thresholds.npy", _setitem((5, 0), 119)),
                        r"binary layer 0 \('bconv1'\): threshold 119 out of range "
                        r"\[0, K \+ 1 = 118\]"),
    "threshold K + 2 (last, 1x1)": (_modified("binary/3/thresholds.npy", _setitem((0, 0), 42)),
                                    r"threshold 42 out of range \[0, K \+ 1 = 41\]"),
    "threshold -1": (_modified("binary/2/thresholds.npy", _setitem((39, 0), -1)),
                     r"binary layer 2 \('bconv3'\): threshold -1 out of range"),
    "threshold int32 min": (_modified("binary/1/thresholds.npy",
                                      _setitem((0, 0), np.iinfo(np.int32).min)),
                            r"threshold -2147483648 out of range"),
    "2-bit unsorted (last)": (
        _modified("binary/3/thresholds.npy",
                  lambda a: np.concatenate([a, a + 1, a + 2], axis=1).clip(0, 41)[:, ::-1]
                  .copy()),
        r"binary layer 3 \('bconv4'\): thresholds of a channel must be sorted"),
    "2-bit sorted (last, stale requirements)": (
        _modified("binary/3/thresholds.npy",
                  lambda a: np.concatenate([a, a, a], axis=1)),
        r"requirements disagree"),
    "2-bit not last": (_modified("binary/1/thresholds.npy",
                                 lambda a: np.concatenate([a, a, a], axis=1)),
                       r"binary layer 1 \('bconv2'\): feeds another binary layer, so it must "
                       r"output 1 bit, not 2"),
    "3 levels": (_modified("binary/3/thresholds.npy", lambda a: np.concatenate([a, a], axis=1)),
                 r"binary layer 3 \('bconv4'\): thresholds must be \(O, 2\*\*n - 1\).*\(70, 2\)"),
    "thresholds 1-D": (_modified("binary/3/thresholds.npy", lambda a: a[:, 0].copy()),
                       r"thresholds must be \(O, 2\*\*n - 1\)"),
    "thresholds too few rows": (_modified("binary/3/thresholds.npy", lambda a: a[:-1].copy()),
                                r"= \(70, \.\.\.\), not \(69, 1\)"),
    "thresholds int64": (_modified("binary/0/thresholds.npy", lambda a: a.astype(np.int64)),
                         r"'binary/0/thresholds\.npy' must be int32, not int64"),
    "thresholds float": (_modified("binary/0/thresholds.npy", lambda a: a.astype(np.float32)),
                         r"must be int32, not float32"),
    "weights int8": (_modified("binary/0/weights.npy", lambda a: a.view(np.int8)),
                     r"binary layer 0 \('bconv1'\): 'binary/0/weights\.npy' must be uint8, "
                     r"not int8"),
    "weights uint16": (_modified("binary/1/weights.npy", lambda a: a.astype(np.uint16)),
                       r"must be uint8, not uint16"),
    "weights flat": (_modified("binary/1/weights.npy", lambda a: a.reshape(-1)),
                     r"weights array has shape \(891,\), but"),
    "weights row missing": (_modified("binary/2/weights.npy", lambda a: a[:-1].copy()),
                            r"weights array has shape \(39, 3, 3, 5\), but 40 output channels"),
    "weights transposed": (_modified("binary/3/weights.npy",
                                     lambda a: a.reshape(70, 5).T.reshape(5, 1, 1, 70).copy()),
                           r"weights array has shape \(5, 1, 1, 70\)"),
    # layer 0 has 13 input channels: bits 13..15 of each tap (bits 5..7 of byte 1) are pad
    "weights pad bit 0 (13 channels)": (_modified("binary/0/weights.npy",
                                                  _setitem((7, 2, 1, 1), 0x7F)),
                                        r"binary layer 0 \('bconv1'\): padding bits after "
                                        r"channel 13 must all be 1"),
    "weights pad bit 0 (33 channels)": (
        _modified("binary/2/weights.npy", lambda a: _clear_bit(a, (39, 0, 0, 4), 1)),
        r"padding bits after channel 33 must all be 1"),
    "host sign int16": (_modified("host/0/sign.npy", lambda a: a.astype(np.int16)),
                        r"host layer 0 \('stem'\): array 'sign' must be 1-D int8, not 1-D int16"),
    "host sign zero": (_modified("host/0/sign.npy", _setitem(3, 0)),
                       r"'sign' must hold only -1 and \+1"),
    "host weight 3-D": (_modified("host/0/weight.npy", lambda a: a[:, :, 0].copy()),
                        r"array 'weight' must be 4-D int8, not 3-D int8"),
    "host weight uint8": (_modified("host/1/weight.npy", lambda a: a.view(np.uint8)),
                          r"array 'weight' must be 4-D int8, not 4-D uint8"),
    "host thresholds unsorted": (_modified("host/0/thresholds.npy",
                                           lambda a: np.concatenate([a + 5, a, a], axis=1)),
                                 r"thresholds must be \(O, 2\*\*n - 1\) with sorted rows"),
    "host thresholds 2 levels": (_modified("host/0/thresholds.npy",
                                           lambda a: np.concatenate([a, a], axis=1)),
                                 r"thresholds must be \(O, 2\*\*n - 1\)"),
    "host bias rows": (_modified("host/1/bias.npy", lambda a: a[:-1].copy()),
                       r"array 'bias' has 14 rows but the weight has 15 output channels"),
    "host scale float64": (_modified("host/1/scale.npy", lambda a: a.astype(np.float64)),
                           r"array 'scale' must be 1-D float32, not 1-D float64"),
    "host scale inf": (_modified("host/1/scale.npy", _setitem(0, np.inf)),
                       r"'scale' must be finite"),
}


def _clear_bit(a: np.ndarray, index, bit_from_top: int) -> np.ndarray:
    a[index] &= 0xFF ^ (0x80 >> (bit_from_top - 1))
    return a


@pytest.mark.parametrize("edit", list(ARRAY_EDITS))
def test_replaced_array(edit, demo, demo_file, tmp_path):
    (member, make), fragment = ARRAY_EDITS[edit]
    path = rewrite(demo_file, tmp_path / "arrays.bitdet", members={member: make(demo)})
    expect_error(path, fragment)


def test_pad_bits_of_the_demo_are_ones(demo_file):
    """Sanity check for the pad-bit edits above: every pad bit of layers 0 and 2 is 1."""
    for member, channels in (("binary/0/weights.npy", 13), ("binary/2/weights.npy", 33)):
        bits = np.unpackbits(read_member(demo_file, member), axis=-1, bitorder="little")
        assert (bits[..., channels:] == 1).all()


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", r"'host/1/bias\.npy' is not a valid \.npy array"),
    (b"\x93NUMPY garbage", r"is not a valid \.npy array"),
    (npy_bytes(np.arange(15, dtype=np.int32))[:-7], r"is not a valid \.npy array"),
    (npy_bytes(np.array([None] * 15, dtype=object), allow_pickle=True),
     r"is not a valid \.npy array"),
    (json.dumps([1, 2, 3]).encode(), r"is not a valid \.npy array"),
], ids=["empty", "bad header", "short data", "pickled objects", "json"])
def test_member_not_an_npy_array(content, fragment, demo_file, tmp_path):
    path = rewrite(demo_file, tmp_path / "npy.bitdet", members={"host/1/bias.npy": content})
    expect_error(path, fragment)


@pytest.mark.parametrize("member", ["binary/0/weights.npy", "host/0/sign.npy"])
def test_member_that_is_an_npz_archive(member, demo_file, tmp_path):
    """np.load returns an NpzFile (not an array) for ZIP content, even with allow_pickle=False."""
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(3, dtype=np.uint8))
    path = rewrite(demo_file, tmp_path / "npz.bitdet", members={member: buffer.getvalue()})
    expect_error(path, re.escape(member))


def test_extra_scalar_host_array(demo_file, tmp_path):
    """An extra 0-d host array is a BundleError (it was an IndexError from a.shape[0])."""
    path = rewrite(demo_file, tmp_path / "scalar.bitdet",
                   manifest=_set("host_layers/0/arrays/extra", "host/0/extra.npy"),
                   members={"host/0/extra.npy": np.array(5, dtype=np.int32)})
    expect_error(path, r"host layer 0 \('stem'\): array 'extra'")


def test_extra_host_array_with_matching_rows_is_kept(demo_file, demo, tmp_path):
    extra = np.arange(13, dtype=np.int16)
    path = rewrite(demo_file, tmp_path / "extra.bitdet",
                   manifest=_set("host_layers/0/arrays/extra", "host/0/extra.npy"),
                   members={"host/0/extra.npy": extra})
    loaded = load(path)
    np.testing.assert_array_equal(loaded.host_layers[0].arrays["extra"], extra)
    expect_error(rewrite(demo_file, tmp_path / "extra2.bitdet",
                         manifest=_set("host_layers/0/arrays/extra", "host/0/extra.npy"),
                         members={"host/0/extra.npy": extra[:-1]}),
                 r"array 'extra' has 12 rows but the weight has 13 output channels")


def test_small_bundle_edits(tmp_path):
    """Edits on a bundle whose last layer is raw or 2-bit (channels 13, 21, 19, 11)."""
    raw = small_bundle("raw").save(tmp_path / "raw.bitdet")
    two = small_bundle("2bit").save(tmp_path / "two.bitdet")
    # a raw layer made "bits" needs a thresholds member
    expect_error(rewrite(raw, tmp_path / "a.bitdet", manifest=_set("binary_layers/2/output",
                                                                   "bits")),
                 r"binary layer 2 \('last'\): field 'thresholds' must be str, not None")
    # 2-bit thresholds out of range and unsorted
    t = read_member(two, "binary/2/thresholds.npy")
    assert t.shape == (11, 3)
    high = t.copy()
    high[4] = [1, 2, 21]
    expect_error(rewrite(two, tmp_path / "b.bitdet", members={"binary/2/thresholds.npy": high}),
                 r"threshold 21 out of range \[0, K \+ 1 = 20\]")
    unsorted = t.copy()
    unsorted[6] = [3, 9, 8]
    expect_error(rewrite(two, tmp_path / "c.bitdet",
                         members={"binary/2/thresholds.npy": unsorted}),
                 r"binary layer 2 \('last'\): thresholds of a channel must be sorted")
    # 2-bit → 1-bit: the requirements no longer match
    expect_error(rewrite(two, tmp_path / "d.bitdet",
                         members={"binary/2/thresholds.npy": t[:, :1].copy()}),
                 r"requirements disagree")
    # pad bits of the 21-channel layer 1 (bits 5..7 of its third byte)
    w = read_member(raw, "binary/1/weights.npy")
    assert w.shape == (19, 3, 3, 3)
    w[0, 1, 1, 2] &= 0xDF
    expect_error(rewrite(raw, tmp_path / "e.bitdet", members={"binary/1/weights.npy": w}),
                 r"binary layer 1 \('second'\): padding bits after channel 21 must all be 1")
    # out_channels of layer 0 no longer what layer 1 takes: rewrite layer 0 with 20 outputs
    bundle = small_bundle("raw")
    layer0 = bundle.binary_layers[0]
    o, _c, kh, kw = layer0.weights.shape
    packed = packing.pack_weights(layer0.weights[:20], word_bits=8).reshape(20, kh, kw, -1)
    thresholds = layer0.thresholds[:20].numpy().astype(np.int32)
    expect_error(rewrite(raw, tmp_path / "f.bitdet",
                         manifest=_set("binary_layers/0/out_channels", 20),
                         members={"binary/0/weights.npy": packed,
                                  "binary/0/thresholds.npy": thresholds}),
                 r"binary layer 1 \('second'\): takes 21 input channels but receives 20")
    assert o == 21


# --------------------------------------------------------------------------- host layers


def conv_loops(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Σ w·x per output pixel (int64), zero padding filled in by index checks."""
    n, c, h, wd = x.shape
    o, _c, kh, kw = w.shape
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for oy, ox in itertools.product(range(oh), range(ow)):
        window = np.zeros((n, c, kh, kw), dtype=np.int64)
        for ky, kx in itertools.product(range(kh), range(kw)):
            iy, ix = oy * stride - padding + ky, ox * stride - padding + kx
            if 0 <= iy < h and 0 <= ix < wd:
                window[:, :, ky, kx] = x[:, :, iy, ix]
        for b, oc in itertools.product(range(n), range(o)):
            out[b, oc, oy, ox] = int((window[b] * w[oc].astype(np.int64)).sum())
    return out


CONV_THRESHOLD_CASES = [
    # (channels, out, kernel, stride, padding, zero_point, levels)
    (3, 5, 3, 1, 1, 128, 1),
    (3, 4, 3, 2, 1, 128, 3),
    (1, 6, 5, 2, 2, 37, 1),
    (4, 3, 1, 1, 0, 0, 7),
    (2, 7, 3, 1, 0, 255, 3),
]


@pytest.mark.parametrize(("c", "o", "k", "stride", "padding", "zero_point", "levels"),
                         CONV_THRESHOLD_CASES)
def test_conv_threshold_run(c, o, k, stride, padding, zero_point, levels):
    rng = np.random.default_rng(100 * c + 10 * k + levels)
    weight = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    weight[0] = -128                                         # extreme weights
    sign = rng.choice(np.array([-1, 1], dtype=np.int8), o)
    sign[:2] = [1, -1]
    bound = 255 * 128 * c * k * k
    thresholds = np.sort(rng.integers(-bound // 8, bound // 8, (o, levels)), axis=1)
    thresholds = thresholds.astype(np.int32)
    layer = HostLayer(name="stem", kind="conv_threshold", stride=stride, padding=padding,
                      attrs={"zero_point": zero_point} if zero_point else {},
                      arrays={"weight": weight, "thresholds": thresholds, "sign": sign})
    pixels = rng.integers(0, 256, (2, c, 7, 6), dtype=np.uint8)
    pixels[0, :, 0, :] = 0
    pixels[1, :, :, 0] = 255
    acc = conv_loops(pixels.astype(np.int64) - zero_point, weight, stride, padding)
    signed = acc * sign.astype(np.int64)[None, :, None, None]
    expected = (signed[:, :, None] >= thresholds[None, :, :, None, None]).sum(axis=2)
    for x in (torch.from_numpy(pixels), torch.from_numpy(pixels.astype(np.int64))):
        out = layer.run(x)
        assert out.shape == expected.shape
        assert not out.dtype.is_floating_point
        np.testing.assert_array_equal(out.numpy(), expected)
    assert int(expected.max()) <= levels
    if levels == 1:
        assert set(np.unique(expected)) <= {0, 1}


def test_conv_threshold_at_the_threshold():
    """sign·acc equal to T reaches T; one below does not; padding is at the zero point."""
    weight = np.ones((2, 1, 3, 3), dtype=np.int8)
    sign = np.array([1, -1], dtype=np.int8)
    # all pixels at the zero point except the centre, so acc = centre − zero_point
    pixels = np.full((1, 1, 3, 3), 100, dtype=np.uint8)
    pixels[0, 0, 1, 1] = 103
    thresholds = np.array([[3], [-3]], dtype=np.int32)
    layer = HostLayer(name="t", kind="conv_threshold", padding=1, attrs={"zero_point": 100},
                      arrays={"weight": weight, "thresholds": thresholds, "sign": sign})
    out = layer.run(torch.from_numpy(pixels))
    # channel 0: acc = 3 (every window holds the centre) ≥ 3; channel 1: −3 ≥ −3
    np.testing.assert_array_equal(out.numpy(), np.ones((1, 2, 3, 3)))
    layer.arrays["thresholds"] = np.array([[4], [-2]], dtype=np.int32)
    np.testing.assert_array_equal(layer.run(torch.from_numpy(pixels)).numpy(),
                                  np.zeros((1, 2, 3, 3)))


CONV_AFFINE_CASES = [
    # (channels, out, kernel, stride, padding)
    (11, 5, 1, 1, 0),
    (7, 4, 3, 1, 1),
    (9, 3, 3, 2, 1),
    (70, 15, 1, 1, 0),
]


@pytest.mark.parametrize(("c", "o", "k", "stride", "padding"), CONV_AFFINE_CASES)
@pytest.mark.parametrize("pm1", [True, False], ids=["pm1", "integers"])
def test_conv_affine_run(c, o, k, stride, padding, pm1):
    rng = np.random.default_rng(10 * c + k)
    weight = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    bias = rng.integers(-100_000, 100_000, o, dtype=np.int32)
    scale = (rng.standard_normal(o) * 0.01).astype(np.float32)
    scale[0] = 1 / 256
    layer = HostLayer(name="head", kind="conv_affine", stride=stride, padding=padding,
                      arrays={"weight": weight, "bias": bias, "scale": scale})
    if pm1:
        x = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (2, c, 6, 5))
    else:
        x = rng.integers(-3, 4, (2, c, 6, 5)).astype(np.float32)
    acc = conv_loops(x.astype(np.int64), weight, stride, padding) + bias[None, :, None, None]
    assert np.abs(acc).max() < 2 ** 24                       # exact in float32
    expected = acc.astype(np.float32) * scale[None, :, None, None]   # float32 product
    out = layer.run(torch.from_numpy(x))
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), expected)
    reference = (acc.astype(np.float64) * scale.astype(np.float64)[None, :, None, None])
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-6)


def test_host_layer_run_validates_first():
    layer = HostLayer(name="bad", kind="conv_affine",
                      arrays={"weight": np.ones((2, 1, 1, 1), dtype=np.int8),
                              "bias": np.zeros(2, dtype=np.int64),
                              "scale": np.ones(2, dtype=np.float32)})
    with pytest.raises(BundleError, match=r"array 'bias' must be 1-D int32, not 1-D int64"):
        layer.run(torch.ones(1, 1, 2, 2))


def test_run_binary_checks_input_shape(demo):
    with pytest.raises(ValueError, match=r"take N×13×32×32 input"):
        demo[2].run_binary(torch.ones(1, 13, 16, 32))


def test_activation_words_count_the_map_before_its_pool():
    """The device writes a conv's full map into a bank before the pool pass reads it, so a
    pooled layer needs the pre-pool map's words, not the pooled map's."""
    gen = torch.Generator().manual_seed(5)
    weights = torch.where(torch.rand(32, 16, 3, 3, generator=gen) < 0.5, -1, 1)
    layer = BinaryConvLayer(weights=weights.to(torch.int8), thresholds=torch.full(
        (32, 1), 72, dtype=torch.int32), stride=1, padding=1, pool=(2, 2))
    bundle = Bundle(binary_layers=[layer], input_shape=(16, 32, 32), host_layers=[],
                    layer_names=["b"], model={})
    req = bundle.requirements()
    assert req.conv_shapes == ((32, 32),)
    assert req.layer_shapes[0][5] == (16, 16)
    # 32×32 pixels × 2 words of 16 bits before the pool; the input is 1 word per pixel
    assert req.activation_words(16) == 32 * 32 * 2


# --------------------------------------------------------------------------- contract v2 kept out


V1_REQUIREMENT_KEYS = {
    "layers", "max_in_channels", "max_out_channels", "max_k", "max_kernel", "max_stride",
    "max_padding", "max_pool_kernel", "max_output_bits", "raw_output", "max_pixels",
    "layer_shapes",
}


def test_a_v1_bundle_stays_version_1(demo, demo_file):
    """A chain of 1-bit layers is written as version 1 with exactly format 1's fields
    (tests/test_bundle_v2.py covers version 2)."""
    bundle = demo[2]
    assert not bundle.uses_v2() and bundle.format_version == FORMAT_VERSION == 1
    with zipfile.ZipFile(demo_file) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert set(manifest) == {"format", "version", "bitdet_version", "weight_word_bits",
                             "input_shape", "binary_layers", "host_layers", "model",
                             "requirements"}
    assert set(manifest["requirements"]) == V1_REQUIREMENT_KEYS
    requirements = load(demo_file).requirements()
    assert (requirements.max_input_bits, requirements.max_shortcut_bits,
            requirements.live_maps, requirements.format_version) == (1, 0, 2, 1)
