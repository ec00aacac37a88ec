"""Host driver (sw/device.py): the emu pipeline equals the integer reference
(sw/evaluate.run_bundle) map for map; the serial backend through a pseudo-terminal gives
the same; typed errors (timeout naming the port, config mismatch, device status codes, a
bundle that does not fit — found before anything is streamed —, unreadable images)."""

from __future__ import annotations

import functools
import os
import select
import threading
import tty
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdet.hw.config import load_config
from bitdet.sw.bundle import load as load_bundle
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import decode
from bitdet.sw.device import (
    BundleDoesNotFit,
    ConfigMismatch,
    Device,
    DeviceError,
    EmuLink,
    ImageError,
    LinkTimeout,
    NotConfiguredError,
    fit_image,
)
from bitdet.sw.emulator import Emulator
from bitdet.sw.evaluate import _host_layer, bundle_decode_settings, run_bundle
from bitdet.sw.models import BinaryDetector
from bitdet.sw.protocol import ErrorCode, Opcode

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "sw" / "assets" / "default.bitdet"


@functools.lru_cache(maxsize=4)
def small_bundle(seed=0):
    """A small random BinaryDetector (32×32 input, conv → pool → conv) with trained-looking
    BatchNorm statistics, folded: fits the ``tiny`` preset."""
    torch.manual_seed(seed)
    model = BinaryDetector(widths=(8, 16, 16), pools=(True, False), image_size=32)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (8, 1, 32, 32)).float())
    model.eval()
    return model.export_bundle()


def images(count, size, seed=0):
    return make_digitscenes("test", count=count, image_size=size, seed=seed).images


def reference(bundle, image, score_threshold):
    pixels = torch.from_numpy(np.array(image)[None, None]).to(torch.int64)
    stem = _host_layer(bundle, "stem").run(pixels)
    maps = bundle.run_binary(stem.to(torch.float32) * 2 - 1)
    head = run_bundle(bundle, pixels)
    settings = {**bundle_decode_settings(bundle), "score_threshold": score_threshold}
    return maps, head, decode(head, **settings)[0]


def check_detect(device, bundle, image, score_threshold=0.05):
    result = device.detect(image, trace=True, score_threshold=score_threshold)
    maps, head, found = reference(bundle, image, score_threshold)
    assert len(result["maps"]) == len(maps)
    for mine, theirs in zip(result["maps"], maps, strict=True):
        assert torch.equal(mine, theirs.to(torch.int32))
    assert torch.equal(result["head"], head)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(result[key], found[key])
    return result


@pytest.mark.parametrize("preset", ["tiny", "icebreaker"])
def test_emu_pipeline_equals_reference(preset):
    bundle = small_bundle()
    with Device.open("emu", preset) as device:
        plan = device.load(bundle)
        assert [p.kind for p in plan] == ["conv", "pool", "conv"]
        n_found = 0
        for image in images(2, 32):
            result = check_detect(device, bundle, image)
            n_found += len(result["boxes"])
            stats = result["stats"]
            assert [layer["name"] for layer in stats.layers] == [p.name for p in plan]
            assert all(layer["busy"] > layer["stall"] >= 0 for layer in stats.layers)
            assert stats.bytes_out > 0 and stats.bytes_in > 0
        assert any(0 < int(m.sum()) < m.numel() for m in result["maps"])


def test_default_bundle_on_the_emulator():
    if not DEFAULT_BUNDLE.exists():
        pytest.skip("sw/assets/default.bitdet is not shipped yet")
    bundle = load_bundle(DEFAULT_BUNDLE)
    with Device.open("emu", "ulx3s") as device:
        device.load(bundle)
        for image in images(2, 64, seed=3):
            check_detect(device, bundle, image, score_threshold=0.25)


def test_letterbox_maps_boxes_back():
    """An image of another size and aspect is letterboxed into the model input; boxes
    found there come back in the original image's pixels."""
    bundle = small_bundle()
    scene = images(1, 96, seed=2)[0]
    wide = np.ascontiguousarray(scene[24:72])                      # 48 × 96
    fitted, scale, (left, top) = fit_image(wide, (32, 32))
    assert fitted.shape == (32, 32) and scale == pytest.approx(1 / 3) and (left, top) == (0, 8)
    with Device.open("emu", "tiny") as device:
        device.load(bundle)
        direct = device.detect(fitted, score_threshold=0.01)
        mapped = device.detect(wide, score_threshold=0.01)
    assert mapped["image"].shape == (48, 96) and len(direct["boxes"]) > 0
    expected = (direct["boxes"] - torch.tensor([0.0, 8.0, 0.0, 8.0])) * 3
    expected = torch.minimum(expected.clamp(min=0), torch.tensor([96.0, 48.0, 96.0, 48.0]))
    assert torch.allclose(mapped["boxes"], expected, atol=1e-4)
    assert torch.equal(mapped["labels"], direct["labels"])


def _serve(master: int, emulator: Emulator, stop: threading.Event) -> None:
    while not stop.is_set():
        ready, _, _ = select.select([master], [], [], 0.05)
        if not ready:
            continue
        try:
            data = os.read(master, 4096)
        except OSError:
            return
        reply = emulator.feed(data)
        if reply:
            os.write(master, reply)


@pytest.fixture
def pty_device():
    """A pseudo-terminal: an emulator thread on the master side; yields the slave path."""
    pytest.importorskip("serial")
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    stop = threading.Event()
    emulator = Emulator(load_config("tiny"))
    thread = threading.Thread(target=_serve, args=(master, emulator, stop), daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(2)
    os.close(master)
    os.close(slave)


def test_serial_through_a_pty_equals_emu(pty_device):
    bundle = small_bundle(seed=1)
    with Device.open("serial", "tiny", port=pty_device, timeout=5) as device, \
            Device.open("emu", "tiny") as emu:
        device.load(bundle)
        emu.load(bundle)
        for image in images(2, 32, seed=5):
            a = check_detect(device, bundle, image)
            b = emu.detect(image, trace=True, score_threshold=0.05)
            assert all(torch.equal(x, y) for x, y in zip(a["maps"], b["maps"], strict=True))
            assert [layer["busy"] for layer in a["stats"].layers] == \
                [layer["busy"] for layer in b["stats"].layers]
            assert a["stats"].bytes_out == b["stats"].bytes_out


def test_silent_pty_times_out_naming_the_port():
    pytest.importorskip("serial")
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        with pytest.raises(LinkTimeout, match=path):
            Device.open("serial", "tiny", port=path, timeout=0.3)
    finally:
        os.close(master)
        os.close(slave)


def test_config_mismatch_names_both():
    link = EmuLink(Emulator(load_config("tiny")))
    with pytest.raises(ConfigMismatch) as info:
        Device(link, "icebreaker")
    message = str(info.value)
    assert load_config("tiny").config_hash() in message
    assert load_config("icebreaker").config_hash() in message


def test_bundle_that_does_not_fit_streams_nothing():
    if not DEFAULT_BUNDLE.exists():
        pytest.skip("sw/assets/default.bitdet is not shipped yet")
    with Device.open("emu", "tiny") as device:
        sent = device.bytes_out
        with pytest.raises(BundleDoesNotFit) as info:
            device.load(DEFAULT_BUNDLE)
        assert device.bytes_out == sent
        assert any("max_channels" in p for p in info.value.problems)
    # a detector whose first binary layer writes 32×32×64 bits before its pool: 4096 words
    # of 16 bits, twice icebreaker's bank (its pooled 16×16 map would fit)
    wide = BinaryDetector(widths=(16, 64, 64, 128, 128)).eval().export_bundle()
    with Device.open("emu", "icebreaker") as device:
        sent = device.bytes_out
        with pytest.raises(BundleDoesNotFit, match="4096 words"):
            device.load(wide)
        assert device.bytes_out == sent
    with Device.open("emu", "icebreaker") as device:
        device.load(DEFAULT_BUNDLE)                       # the shipped detector fits


def test_device_errors_are_typed():
    with Device.open("emu", "tiny") as device:
        with pytest.raises(NotConfiguredError) as info:
            device.command(Opcode.RUN_LAYER, b"\x05")
        assert isinstance(info.value, DeviceError)
        assert info.value.code == ErrorCode.NOT_CONFIGURED
        assert info.value.opcode == Opcode.RUN_LAYER
        with pytest.raises(DeviceError, match="BAD_ADDRESS"):
            device.read_activations(device.config.activation_depth - 1, 4)
        with pytest.raises(Exception, match="no bundle loaded"):
            device.detect(np.zeros((32, 32), dtype=np.uint8))


class NoisyLink(EmuLink):
    """Flips one bit of the first ``damaged`` frames written (link noise)."""

    def __init__(self, emulator, damaged):
        super().__init__(emulator)
        self.damaged = damaged

    def write(self, data):
        if self.damaged:
            self.damaged -= 1
            data = bytearray(data)
            data[-1] ^= 0x10
        super().write(bytes(data))


def test_damaged_frames_are_resent_then_reported():
    config = load_config("tiny")
    device = Device(NoisyLink(Emulator(config), damaged=2), config)      # IDENTIFY resent
    assert device.identify().config_hash == config.config_hash()
    device.link.damaged = 3                                              # more than retries
    with pytest.raises(DeviceError) as info:
        device.reset()
    assert info.value.code == ErrorCode.BAD_CRC


def test_unreadable_images(tmp_path):
    bundle = small_bundle()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with Device.open("emu", "tiny") as device:
        device.load(bundle)
        with pytest.raises(ImageError, match=r"bad\.png"):
            device.detect(bad)
        with pytest.raises(ImageError, match="no such"):
            device.detect(tmp_path / "missing.png")
        with pytest.raises(ImageError, match="shape"):
            device.detect(np.zeros((2, 3, 4, 5)))


@pytest.mark.slow
def test_rtl_equals_emu():
    """The same driver over the RTL simulation (Verilator) gives the same maps,
    detections and cycle counts as the emulator."""
    pytest.importorskip("cocotb")
    try:
        from bitdet.sim.link import RtlLink  # noqa: F401
    except ImportError:
        pytest.skip("bitdet.sim.link is not available")
    bundle = small_bundle(seed=2)
    with Device.open("rtl", "tiny") as rtl, Device.open("emu", "tiny") as emu:
        rtl.load(bundle)
        emu.load(bundle)
        for image in images(3, 32, seed=7):         # a few DigitScenes test images
            a = check_detect(rtl, bundle, image)    # RTL = the PyTorch integer path
            b = emu.detect(image, trace=True, score_threshold=0.05)
            assert all(torch.equal(x, y) for x, y in zip(a["maps"], b["maps"], strict=True))
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(a[key], b[key])
            assert a["stats"].layers == b["stats"].layers
