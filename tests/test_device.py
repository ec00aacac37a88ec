"""Host driver (sw/device.py): the emu pipeline equals the integer reference
(sw/evaluate.run_bundle) map for map; the serial backend through a pseudo-terminal gives
the same; weights streamed per layer when the bundle does not fit resident give the same
maps and detections as the resident run; typed errors (timeout naming the port, config
mismatch, device status codes, a bundle that does not fit — found before anything is
streamed, naming the layer —, unreadable images)."""

from __future__ import annotations

import dataclasses
import functools
import os
import select
import threading
import tty
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdet.core.bundle import load as load_bundle
from bitdet.core.config import load_config
from bitdet.core.protocol import ErrorCode, Opcode, decode_layer_entry
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import decode
from bitdet.sw.device import (
    BundleDoesNotFit,
    ConfigMismatch,
    Device,
    DeviceError,
    DriverError,
    EmuLink,
    ImageError,
    LinkTimeout,
    NotConfiguredError,
    fit_image,
)
from bitdet.sw.emulator import Emulator
from bitdet.sw.evaluate import bundle_decode_settings, run_bundle
from bitdet.sw.models import BinaryDetector

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
    stem = bundle.stem(pixels)
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


def _require_rtl():
    """Skip unless the sim extra (cocotb and the RTL link) is installed."""
    pytest.importorskip("cocotb")
    pytest.importorskip("bitdet.sim.link", reason="bitdet.sim.link is not available")


@pytest.mark.slow
def test_rtl_equals_emu():
    """The same driver over the RTL simulation (Verilator) gives the same maps,
    detections and cycle counts as the emulator."""
    _require_rtl()
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


# -- streaming weights per layer ---------------------------------------------------------------

class RecordingLink(EmuLink):
    """Remembers the opcode (and payload) of every command frame written."""

    def __init__(self, emulator):
        super().__init__(emulator)
        self.commands = []

    def write(self, data):
        from bitdet.core.protocol import FrameParser
        self.commands += [(f.opcode, f.payload)
                          for f in FrameParser(payload_limits=None).feed(bytes(data))]
        super().write(data)


def narrow(preset, **fields):
    """A preset with smaller memories (another build: another config hash)."""
    config = load_config(preset)
    return dataclasses.replace(config, name=f"{config.name}-narrow", **fields)


def test_resident_bundle_runs_as_one_network():
    """All passes resident and no trace: one RUN_NETWORK instead of a RUN_LAYER per pass;
    the per-pass cycles (from the cycle model) equal what RUN_LAYER reports pass by pass,
    the detections are the same and fewer bytes cross the link."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    config = load_config("ulx3s")
    link = RecordingLink(Emulator(config))
    with Device(link, config) as device:
        device.load(bundle)
        image = images(1, 64, seed=3)[0]
        traced = device.detect(image, trace=True, score_threshold=0.25)
        link.commands.clear()
        fast = device.detect(image, score_threshold=0.25)
        ops = [op for op, _ in link.commands]
        assert ops.count(Opcode.RUN_NETWORK) == 1 and Opcode.RUN_LAYER not in ops
        for key in ("busy", "stall", "name"):
            assert [x[key] for x in fast["stats"].layers] == \
                [x[key] for x in traced["stats"].layers]
        for key in ("boxes", "scores", "labels", "head"):
            assert torch.equal(fast[key], traced[key])
        assert fast["stats"].bytes_out < traced["stats"].bytes_out
        # a device whose sums differ from the cycle model is caught, not reported
        emulator = link.emulator
        run = emulator._run
        emulator._run = lambda d: (lambda busy, stall: (busy + 1, stall))(*run(d))
        with pytest.raises(DriverError, match=r"the device ran the network in \d+ busy / "
                                              r"\d+ stall cycles, the cycle model says"):
            device.detect(image)


def test_streamed_default_bundle_equals_resident():
    """ulx3s with a weight memory of 320 words per column: the shipped detector's 540 do
    not fit, its largest layer (bconv4, 288) does. Every layer is streamed through one
    slot; maps, head and detections equal the resident run on ulx3s bit for bit, and only
    the first input and the last output cross the link besides the weights."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    config = narrow("ulx3s", weight_depth=320)
    with pytest.raises(BundleDoesNotFit, match="resident weights need 540 words per column, "
                                                "weight_depth is 320"):
        Device(EmuLink(Emulator(config)), config).load(bundle, mode="resident")
    link = RecordingLink(Emulator(config))
    with Device.open("emu", "ulx3s") as resident, Device(link, config) as streamed:
        resident.load(bundle)
        assert resident.mode == "resident" and resident.stream_bytes_per_frame == 0
        plan = streamed.load(bundle)
        assert streamed.mode == "streamed"
        assert streamed.streamed_layers == ["bconv1", "bconv2", "bconv3", "bconv4"]
        assert all(p.descriptor["weight_base"] == 0 for p in plan)
        assert streamed.stream_bytes_per_frame == sum(p.stream_bytes for p in plan) > 0
        for image in images(2, 64, seed=3):
            link.commands.clear()
            a = check_detect(streamed, bundle, image, score_threshold=0.25)
            b = resident.detect(image, trace=True, score_threshold=0.25)
            assert len(a["boxes"]) > 0
            for key in ("boxes", "scores", "labels", "head"):
                assert torch.equal(a[key], b[key])
            assert all(torch.equal(x, y) for x, y in zip(a["maps"], b["maps"], strict=True))
            sa, sb = a["stats"], b["stats"]
            assert (sa.mode, sb.mode) == ("streamed", "resident")
            assert [x["busy"] for x in sa.layers] == [x["busy"] for x in sb.layers]
            assert sa.weight_bytes == streamed.stream_bytes_per_frame and sb.weight_bytes == 0
            assert sa.bytes_out == sb.bytes_out + sa.weight_bytes
            assert sa.as_dict()["weight_bytes"] == sa.weight_bytes
            assert [x["weight_bytes"] > 0 for x in sa.layers] == \
                [p.kind == "conv" for p in plan]
            ops = [op for op, _ in link.commands]
            assert Opcode.CONFIGURE_LAYER not in ops and Opcode.RESET not in ops
            # the first binary input once (16×32×32 bits in 64-bit words), nothing else
            written = [len(p) - 4 for op, p in link.commands if op == Opcode.WRITE_ACTIVATIONS]
            assert sum(written) == 32 * 32 * 8
            assert ops.index(Opcode.RUN_LAYER) > max(
                i for i, op in enumerate(ops) if op == Opcode.WRITE_ACTIVATIONS)
            assert ops.count(Opcode.RUN_LAYER) == len(plan)
            assert ops.count(Opcode.WRITE_THRESHOLDS) == 4          # one per conv
        # without trace only the last map comes back
        link.commands.clear()
        streamed.detect(images(1, 64, seed=3)[0])
        reads = [op for op, _ in link.commands if op == Opcode.READ_ACTIVATIONS]
        assert len(reads) == 1


def test_partly_resident_plan_streams_the_fewest_bytes():
    """With 512 weight words per column the shipped detector (layers of 36, 72, 144, 288
    words) keeps bconv3 and bconv4 resident and streams bconv1 and bconv2 through a 72-word
    slot after them: the fewest bytes per frame of all plans that fit. Same results."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    config = narrow("ulx3s", weight_depth=512)
    link = RecordingLink(Emulator(config))
    with Device(link, config) as device, Device.open("emu", "ulx3s") as resident:
        plan = device.load(bundle)
        resident.load(bundle)
        convs = {p.name: p for p in plan if p.kind == "conv"}
        assert {n: p.residency for n, p in convs.items()} == {
            "bconv1": "streamed", "bconv2": "streamed", "bconv3": "resident",
            "bconv4": "resident"}
        bases = {n: p.descriptor["weight_base"] for n, p in convs.items()}
        assert bases == {"bconv1": 432, "bconv2": 432, "bconv3": 0, "bconv4": 144}
        assert 432 + 72 <= config.weight_depth
        # the configured table is what the device holds
        table = dict(decode_layer_entry(payload) for op, payload in link.commands
                     if op == Opcode.CONFIGURE_LAYER)
        assert [table[i]["weight_base"] for i in sorted(table)] == \
            [p.descriptor["weight_base"] for p in plan]
        assert device.stream_bytes_per_frame == convs["bconv1"].stream_bytes + \
            convs["bconv2"].stream_bytes
        everything = sum(p.stream_bytes for p in convs.values())
        assert device.stream_bytes_per_frame < everything / 4
        image = images(1, 64, seed=8)[0]
        a = check_detect(device, bundle, image, score_threshold=0.25)
        b = resident.detect(image, trace=True, score_threshold=0.25)
        assert all(torch.equal(x, y) for x, y in zip(a["maps"], b["maps"], strict=True))
        assert a["stats"].weight_bytes == device.stream_bytes_per_frame


def test_layer_that_does_not_fit_alone_is_refused_by_name():
    """small_bundle's second conv needs 144 weight words per column on tiny (16 → 16
    channels, 3×3, 2 columns): with 100 words it cannot run even streamed. Nothing is sent;
    the message names the layer, the quantity and the limit. A plan may also be limited to
    the first entries of the memories."""
    bundle = small_bundle()
    config = narrow("tiny", weight_depth=100)
    with Device(EmuLink(Emulator(config)), config) as device:
        sent = device.bytes_out
        with pytest.raises(BundleDoesNotFit) as info:
            device.load(bundle)
        assert device.bytes_out == sent
        name = bundle.layer_names[1]
        assert info.value.problems == [f"layer {name!r}'s weights alone need 144 words per "
                                       f"column, weight_depth is 100"]
        assert name in str(info.value) and "tiny-narrow" in str(info.value)
    with Device.open("emu", "tiny") as device:
        with pytest.raises(BundleDoesNotFit, match=r"weights alone need 144 words per column, "
                                                   r"the plan may use 100 of weight_depth 512"):
            device.load(bundle, weight_depth=100)
        device.load(bundle, weight_depth=144)             # 72 + 144 > 144: both streamed
        assert device.streamed_layers == bundle.layer_names[:2]
        device.load(bundle)
        assert device.mode == "resident"
        with pytest.raises(ValueError, match="weight_depth must be"):
            device.load(bundle, weight_depth=513)


@pytest.mark.slow
def test_rtl_streamed_equals_emu():
    """Streaming on the RTL (Verilator, tiny): small_bundle with its weights limited to
    150 words per column streams both convs each frame; maps, detections and cycles equal
    the emulator's resident run."""
    _require_rtl()
    bundle = small_bundle(seed=3)
    with Device.open("rtl", "tiny") as rtl, Device.open("emu", "tiny") as emu:
        rtl.load(bundle, weight_depth=150)
        emu.load(bundle)
        assert rtl.mode == "streamed" and emu.mode == "resident"
        for image in images(2, 32, seed=9):
            a = check_detect(rtl, bundle, image)
            b = emu.detect(image, trace=True, score_threshold=0.05)
            assert all(torch.equal(x, y) for x, y in zip(a["maps"], b["maps"], strict=True))
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(a[key], b[key])
            assert [x["busy"] for x in a["stats"].layers] == \
                [x["busy"] for x in b["stats"].layers]
            assert a["stats"].weight_bytes == rtl.stream_bytes_per_frame > 0


def test_detect_report_says_weights_are_streamed(tmp_path):
    """`bitdet detect`'s report has one line on the streamed weights, only when streamed."""
    from bitdet.sw.detect import format_report, run_detect
    bundle = small_bundle()
    path = tmp_path / "bundle.bitdet"
    bundle.save(path)
    image = tmp_path / "scene.png"
    from PIL import Image
    Image.fromarray(images(1, 32, seed=4)[0]).save(image)
    config = narrow("tiny", weight_depth=150)
    with Device(EmuLink(Emulator(config)), config) as device:
        report = run_detect([image], bundle=path, device=device, progress=False)
        assert device.mode == "streamed"
    text = format_report(report)
    line = [s for s in text.splitlines() if s.startswith("weights streamed per layer")]
    assert len(line) == 1
    assert f"{report['device']['weight_bytes']} of the {report['device']['bytes_out']} " \
           f"bytes out per frame" in line[0]
    assert all(name in line[0] for name in bundle.layer_names[:2])
    assert report["device"]["mode"] == "streamed" and report["device"]["weight_bytes"] > 0
    with Device.open("emu", "tiny") as device:
        report = run_detect([image], bundle=path, device=device, progress=False)
    assert report["device"]["mode"] == "resident" and report["device"]["weight_bytes"] == 0
    assert "streamed" not in format_report(report)


def test_raw_last_layer_runs_on_the_host():
    """A bundle whose last layer outputs raw P: the device runs the layers before it, the
    driver computes P on the host (golden model) and the head map equals the reference."""
    torch.manual_seed(3)
    model = BinaryDetector(widths=(8, 16, 16), pools=(True, False), image_size=32,
                           raw_last=True)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (8, 1, 32, 32)).float())
    bundle = model.eval().export_bundle()
    assert bundle.binary_layers[-1].thresholds is None
    assert Device.fit_problems_for(load_config("tiny"), bundle) == []
    with Device.open("emu", "tiny") as device:
        plan = device.load(bundle)
        assert [p.kind for p in plan] == ["conv", "pool"]      # bconv2 runs on the host
        for image in images(2, 32):
            result = check_detect(device, bundle, image)
            assert result["maps"][-1].max() > 1               # P, not bits
            assert torch.equal(result["head"], model(torch.from_numpy(
                np.array(image)[None, None]).float()))
