"""``bitdet detect``: run a deployment bundle on images through the host driver.

:func:`run_detect` opens a :class:`~bitdet.sw.device.Device` (emulator, RTL simulation or
a board), loads the bundle, runs :meth:`~bitdet.sw.device.Device.detect` on every image,
writes annotated PNGs and returns a JSON-ready report: the detections (boxes in the
original image's pixels), per-layer device cycles, link bytes per frame, the estimated
frame rate at the config's clock and the link-limited frame rate at its baud rate.
docs/driver.md describes the pipeline.

:func:`make_sample` writes ``sw/assets/sample.png`` (``python -m bitdet.sw.detect``): image
0 of ``make_digitscenes("test", count=1, image_size=64, seed=SAMPLE_SEED)``, a
DigitScenes test-split scene (digits the training split never saw).
"""

from __future__ import annotations

import math
from pathlib import Path

from .driver.device import Device, device_layer_count
from .driver.errors import BundleDoesNotFit, DriverError, ImageError
from .files import atomic_path

__all__ = ["AUTO_PRESETS", "AUTO_PRESETS_V2", "DEFAULT_BUNDLE", "SAMPLE_PATH", "SAMPLE_SEED",
           "annotated_targets", "check_score_threshold", "frame_rates", "list_images",
           "make_sample", "pick_config", "run_detect"]

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BUNDLE = ASSETS / "default.bitdet"
SAMPLE_PATH = ASSETS / "sample.png"
SAMPLE_SEED = 4
"""Seed of the DigitScenes test-split scene shipped as ``sample.png`` (three digits)."""
AUTO_PRESETS = ("icebreaker", "ulx3s")
"""Presets tried in order when no config is given (the first one the bundle fits)."""
AUTO_PRESETS_V2 = ("contract2",)
"""Presets tried for a bundle that uses contract v2 (n-bit maps, shortcuts, a graph): the
contract-2 builds, which run on the emulator."""
UART_BITS_PER_BYTE = 10


def make_sample(path: str | Path = SAMPLE_PATH) -> Path:
    """Write the sample image (64×64 grayscale PNG) deterministically; returns the path."""
    from PIL import Image

    from .data import make_digitscenes
    dataset = make_digitscenes("test", count=1, image_size=64, seed=SAMPLE_SEED)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(dataset.images[0]).save(path, optimize=True)
    return path


def list_images(paths) -> list[Path]:
    """Image files of ``paths`` (files, or folders searched for image extensions).

    Raises
    ------
    ImageError
        For a path that does not exist or a folder without images.
    """
    from .data import IMAGE_EXTENSIONS
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the "
                                 f"folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ImageError(f"{path}: no such image file or folder")
    return files


def pick_config(bundle, config=None):
    """The accelerator config to use: ``config`` if given, else the first of
    :data:`AUTO_PRESETS` (:data:`AUTO_PRESETS_V2` for a bundle that uses contract v2)
    that holds ``bundle`` resident, else the first that runs it with weights streamed per
    layer (raises :class:`BundleDoesNotFit` naming each preset's problems if none does)."""
    from bitdet.core.config import load_config
    if config is not None:
        return load_config(config) if isinstance(config, (str, Path)) else config
    presets = AUTO_PRESETS_V2 if bundle.uses_v2() else AUTO_PRESETS
    problems, streamed = [], None
    for name in presets:
        candidate = load_config(name)
        found = Device.fit_problems_for(candidate, bundle)
        if not found and not Device.fit_problems_for(candidate, bundle, mode="resident"):
            return candidate                   # the first preset that holds it resident
        if not found:
            streamed = streamed or candidate   # else the first that runs it streamed
        else:
            problems.append(f"{name}: {found[0]}")
    if streamed is not None:
        return streamed
    raise BundleDoesNotFit(problems, " or ".join(presets))


def frame_rates(config, busy_cycles: int, link_bytes: int,
                overlap_bytes: int | None = None) -> dict:
    """Frames/s of the device alone (``estimated_fps``: its cycles at the config's clock),
    of the link alone (``link_limited_fps``: the frame's bytes at the baud rate, 10 bits a
    byte on a UART), and of the two together (``fps``).

    Sequential (``overlap_bytes`` None; ``"overlap": False``): the protocol sends a frame's
    input, runs its passes, then reads its output, so link and device take turns and a
    frame takes the sum of the two times, ``1 / fps = T_compute + T_link``.

    Pipelined (contract 2, :meth:`~bitdet.sw.driver.device.Device.detect_many`;
    ``"overlap": True``): ``overlap_bytes`` of the frame's ``link_bytes`` (the next
    frame's input, its WRITE frames and their responses) cross the link while the device
    computes; the rest (the RUN, the CONFIGUREs, the output read) does not:
    ``1 / fps = max(T_compute, T_input) + T_rest``, each ``T`` the bytes' time at 10 bits
    a byte."""
    compute = config.clock_hz / busy_cycles if busy_cycles else math.inf
    rate = config.baud / UART_BITS_PER_BYTE                  # bytes per second
    link = rate / link_bytes if link_bytes else math.inf
    if overlap_bytes is None:
        period = 1 / compute + 1 / link
    else:
        overlap_bytes = min(overlap_bytes, link_bytes)
        period = max(1 / compute, overlap_bytes / rate) + (link_bytes - overlap_bytes) / rate
    return {"clock_hz": config.clock_hz, "baud": config.baud,
            "estimated_fps": compute, "link_limited_fps": link,
            "fps": 1 / period if period else math.inf, "overlap": overlap_bytes is not None}


def _annotate(result, scale_to: int = 512):
    from .data import draw_detections
    image = result["image"]
    scale = max(1, math.ceil(scale_to / max(image.shape[:2])))
    names = result["class_names"] or None
    return draw_detections(image, result["boxes"], result["labels"], result["scores"],
                           class_names=names, scale=scale)


def check_score_threshold(value) -> float:
    """``value`` as a score threshold: a number in [0, 1] (scores are probabilities);
    raises ``ValueError`` naming the bound otherwise (NaN included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score threshold must be a number in [0, 1], not {value!r}") from None
    if not 0.0 <= number <= 1.0:           # False for NaN too
        raise ValueError(f"score threshold must be in [0, 1], not {value!r}")
    return number


def annotated_targets(files, out_dir: str | Path, *, force: bool = False) -> list[Path]:
    """The annotated PNG of each of ``files`` in ``out_dir``: ``<stem>.detect.png``, made
    unique when stems collide (:func:`bitdet.sw.files.unique_names`). Raises
    :class:`~bitdet.sw.files.OutputExists` naming the first one that exists, unless
    ``force``."""
    from .files import check_new_file, unique_names
    targets = [Path(out_dir) / name for name in unique_names(files, ".detect.png")]
    for target in targets:
        check_new_file(target, force=force, inputs=files)
    return targets


def run_detect(paths, *, bundle=None, backend: str = "emu", config=None, port=None,
               out: str | Path | None = None, score_threshold: float | None = None,
               iou_threshold: float | None = None, max_detections: int | None = None,
               progress: bool | None = None, device: Device | None = None,
               force: bool = False, pipeline: bool | None = None) -> dict:
    """Detect objects in the images of ``paths`` (files or folders).

    Each image's annotated PNG is ``out/<stem>.detect.png`` (inputs with the same stem get
    unique names, :func:`annotated_targets`); an existing one is an error unless ``force``,
    checked before anything runs. With ``device`` (opened elsewhere) a ``config`` that
    differs from the device's is an error.

    ``score_threshold``, ``iou_threshold`` (NMS) and ``max_detections``: None (the default)
    takes the bundle's ``model["decode"]`` value (``bitdet import --head-config``), else
    0.25, 0.5 and 100 (:meth:`~bitdet.sw.driver.device.Device.decode_settings_for`); the
    thresholds must be in [0, 1], ``max_detections`` an integer >= 1. The bundle's
    detection head is checked right after it is loaded: a bundle without one raises
    :class:`~bitdet.core.bundle.BundleError` before a device opens, a frame runs or the
    ``out`` folder is made.

    Returns ``{"backend", "config", "bundle", "load_bytes", "decode": {"score_threshold",
    "iou_threshold", "max_detections"}, "images": [{"file", "width",
    "height", "detections": [{"label", "class", "score", "box"}], "annotated"}], "device":
    {"layers", "busy_cycles", "bytes_out", "bytes_in", "estimated_fps",
    "link_limited_fps", "fps", "overlap", ...}}`` (device statistics of the last frame:
    every frame of a bundle costs the same cycles and bytes, the first of a pipelined run
    excepted). On a contract-2 build with two slots for the input, several images are
    pipelined (:meth:`~bitdet.sw.driver.device.Device.detect_many`; ``pipeline``: None
    when it pays, True whenever the slots allow, False never) and ``fps`` is the
    pipelined rate (:func:`frame_rates`, ``"overlap": true``).
    """
    from tqdm import tqdm

    from bitdet.core.bundle import load as load_bundle

    from .images import read_image
    if score_threshold is not None:
        score_threshold = check_score_threshold(score_threshold)
    bundle_path = Path(bundle) if bundle is not None else DEFAULT_BUNDLE
    loaded = load_bundle(bundle_path)
    settings = Device.decode_settings_for(        # no detection head: BundleError, here
        loaded, score_threshold=score_threshold, iou_threshold=iou_threshold,
        max_detections=max_detections)
    limits = {key: settings[key] for key in Device.DECODE_DEFAULTS}
    files = list_images(paths)
    out_dir = Path(out) if out is not None else None
    targets = annotated_targets(files, out_dir, force=force) if out_dir is not None else None
    if device is not None and config is not None:
        wanted = pick_config(loaded, config)
        if wanted.config_hash() != device.config.config_hash():
            raise DriverError(f"config {wanted.name!r} ({wanted.config_hash()}) given, but the "
                              f"device was opened with {device.config.name!r} "
                              f"({device.config.config_hash()})")
    in_channels = (loaded.model.get("input") or [1])[0]
    own = device is None
    if own:
        device = Device.open(backend, pick_config(loaded, config), port=port)
    try:
        sent = device.bytes_out + device.bytes_in
        device.load(loaded)
        load_bytes = device.bytes_out + device.bytes_in - sent
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        images, stats = [], None
        disable = True if progress is False or len(files) < 2 else \
            (None if progress is None else False)          # None: only on a terminal
        shown = tqdm(files, desc="detect", unit="image", disable=disable)
        results = device.detect_many((read_image(path, in_channels) for path in shown),
                                     pipeline=pipeline, **limits)
        for k, (path, result) in enumerate(zip(files, results, strict=True)):
            stats = result["stats"]
            names = result["class_names"]
            detections = [
                {"label": int(label), "class": names[label] if label < len(names) else str(
                    int(label)), "score": round(float(score), 4),
                 "box": [round(float(v), 2) for v in box]}
                for box, score, label in zip(result["boxes"], result["scores"],
                                             result["labels"].tolist(), strict=True)]
            entry = {"file": str(path), "width": int(result["image"].shape[1]),
                     "height": int(result["image"].shape[0]), "detections": detections}
            if targets is not None:
                target = targets[k]
                with atomic_path(target) as tmp:
                    _annotate(result).save(tmp, format="PNG")
                entry["annotated"] = str(target)
            images.append(entry)
        per_frame = stats.as_dict()
        bundle = device.bundle
        per_frame["host_layers"] = bundle.layer_names[device_layer_count(bundle):]
        per_frame.update(frame_rates(device.config, stats.busy_cycles,
                                     stats.bytes_out + stats.bytes_in,
                                     stats.input_bytes if stats.overlap else None))
        return {"backend": backend, "config": device.config.name,
                "config_hash": device.config.config_hash(), "bundle": str(bundle_path),
                "load_bytes": load_bytes, "decode": limits, "images": images,
                "device": per_frame}
    finally:
        if own:
            device.close()


def format_report(report: dict) -> str:
    """A human-readable table of :func:`run_detect`'s report."""
    lines = [f"backend {report['backend']}, config {report['config']} "
             f"({report['config_hash']}), bundle {report['bundle']}"]
    if "decode" in report:
        limits = report["decode"]
        lines.append(f"score ≥ {limits['score_threshold']:g}, NMS IoU "
                     f"{limits['iou_threshold']:g}, at most {limits['max_detections']} "
                     "detections")
    for image in report["images"]:
        found = image["detections"]
        lines.append(f"{image['file']} ({image['width']}×{image['height']}): "
                     f"{len(found)} detection{'s' if len(found) != 1 else ''}"
                     + (f" → {image['annotated']}" if "annotated" in image else ""))
        for det in found:
            x1, y1, x2, y2 = det["box"]
            lines.append(f"  {det['class']:>8}  {det['score']:.2f}  "
                         f"[{x1:6.1f} {y1:6.1f} {x2:6.1f} {y2:6.1f}]")
    dev = report["device"]
    lines.append("per frame on the device:")
    lines.append(f"  {'layer':<14}{'kind':<6}{'busy':>10}{'stall':>10}")
    for layer in dev["layers"]:
        lines.append(f"  {layer['name']:<14}{layer['kind']:<6}{layer['busy']:>10}"
                     f"{layer['stall']:>10}")
    lines.append(f"  {'total':<20}{dev['busy_cycles']:>10}")
    for name in dev.get("host_layers", []):
        lines.append(f"  {name:<14}raw P on the host (golden model; the device has no "
                     "READ_RESULTS)")
    lines.append(f"link bytes per frame: {dev['bytes_out']} out, {dev['bytes_in']} in "
                 f"(bundle load: {report['load_bytes']})")
    if dev.get("mode") == "streamed":
        streamed = [layer["name"] for layer in dev["layers"] if layer.get("weight_bytes")]
        lines.append(f"weights streamed per layer (they do not fit resident): "
                     f"{dev['weight_bytes']} of the {dev['bytes_out']} bytes out per frame, for "
                     f"{', '.join(streamed) or 'no layer after the first frame'}")
    lines.append(f"estimated {dev['estimated_fps']:.1f} frames/s at {dev['clock_hz'] / 1e6:g} "
                 f"MHz; link-limited {dev['link_limited_fps']:.1f} frames/s at "
                 f"{dev['baud']} Bd; {dev['fps']:.1f} frames/s the two together "
                 + ("(the next frame's input crosses the link while the device computes)"
                    if dev.get("overlap") else "(the link and the device take turns)"))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(make_sample())
