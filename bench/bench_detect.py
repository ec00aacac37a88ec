"""Detection through the host driver: emulator speed, link traffic, device cycles and the
frame rates they imply at each preset's clock and baud rate, side by side.

For each preset (tiny, icebreaker, ulx3s) the bundle (default: the shipped detector) is
planned onto the device (``bitdet.sw.device.plan_bundle``) and its device cycles per frame
come from the cycle model (``bitdet.core.cycles.layer_cycles``, the RTL's exact counts).
Where the bundle fits, it is loaded into the emulator and ``Device.detect`` runs on
DigitScenes test images: emulator frames/s (host wall clock, the whole pipeline), link
bytes per frame each way, and the cycles the emulated device reported (checked equal to
the model). ``estimated fps = clock_hz / busy cycles``; ``link fps = baud / 10 / bytes``
(a UART byte is 10 bits); ``fps`` is what a board does with both: this protocol sends a
frame's input, runs it, then reads its output, so a frame takes the link's time plus the
device's (``1 / (1/est + 1/link)``).

Next to every preset the bundle fits, rows measure the same build with the weights
streamed per layer (``Device.load(mode="streamed")``: every conv's weights and thresholds
written before its pass, every frame) and, with ``--weight-depth N`` (default 512), with the
plan limited to ``N`` weight words per column (``Device.load(weight_depth=N)``: resident
if the bundle fits them, else partly streamed — what a build with that memory would do).
Cycles are the same; the link bytes, and so the link-limited rate, are not. In ``--json``
those rows are ``streamed_rows`` (``rows`` holds one row per preset).

``--rtl`` adds seconds per frame of the RTL simulation (``bitdet.sim.link.RtlLink``,
Verilator) on the first preset the bundle fits, when ``bitdet.sim.link`` is importable.

    python bench/bench_detect.py [--quick] [--frames N] [--bundle F] [--weight-depth N]
                                 [--rtl] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

from bitdet.core.bundle import load as load_bundle
from bitdet.core.config import load_config
from bitdet.core.cycles import layer_cycles, pool_cycles
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detect import DEFAULT_BUNDLE, frame_rates
from bitdet.sw.device import Device, plan_bundle

PRESETS = ("tiny", "icebreaker", "ulx3s")


def model_cycles(config, plan) -> int:
    total = 0
    for entry in plan:
        try:
            busy, _ = layer_cycles(config, entry.descriptor)
        except NotImplementedError:
            busy, _ = pool_cycles(config, entry.descriptor)
        total += busy
    return total


def measure(config, bundle, frames: list, *, backend="emu", load_args=None,
            **open_args) -> dict:
    device = Device.open(backend, config, **open_args)
    try:
        device.load(bundle, **(load_args or {}))
        device.detect(frames[0])                            # warm-up (and RTL start-up)
        start = time.perf_counter()
        for image in frames:
            result = device.detect(image)
        seconds = (time.perf_counter() - start) / len(frames)
    finally:
        device.close()
    stats = result["stats"]
    return {"seconds_per_frame": seconds, "bytes_out": stats.bytes_out,
            "bytes_in": stats.bytes_in, "busy_cycles": stats.busy_cycles,
            "weight_bytes": stats.weight_bytes, "mode": stats.mode,
            "streamed_layers": device.streamed_layers, "host_seconds": stats.host_seconds}


def main(argv=None) -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 frames per preset")
    parser.add_argument("--frames", type=int, default=20, help="frames per preset")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--weight-depth", type=int, default=512,
                        help="weight words per column for the limited-memory rows "
                             "(default: %(default)s; 0: no such rows)")
    parser.add_argument("--rtl", action="store_true", help="also time the RTL simulation")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    frames_n = 3 if args.quick else args.frames
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    side = bundle.model.get("input", [1, 64, 64])[1]
    frames = list(make_digitscenes("test", count=frames_n, image_size=side, seed=1).images)
    print(f"# bench_detect {datetime.datetime.now().isoformat(timespec='seconds')} "
          f"{platform.processor() or platform.machine()} python {platform.python_version()} "
          f"torch {torch.__version__}, 1 thread, {frames_n} frames, bundle {args.bundle}")
    rows, variants_rows, failed = [], [], False      # presets; the same builds streamed
    for name in PRESETS:
        config = load_config(name)
        plan = plan_bundle(config, bundle)
        cycles = model_cycles(config, plan)
        problems = Device.fit_problems_for(config, bundle)
        row = {"config": name, "clock_hz": config.clock_hz, "baud": config.baud,
               "busy_cycles": cycles, "fits": not problems,
               "estimated_fps": config.clock_hz / cycles, "mode": "resident", "preset": name}
        variants = [(row, {})]
        if problems:
            row["problem"] = problems[0]
            variants = []
        elif Device.fit_problems_for(config, bundle, mode="resident"):
            row["mode"] = "streamed"
        else:
            variants.append(({**row, "config": f"{name}, all", "mode": "streamed"},
                             {"mode": "streamed"}))
            if 0 < args.weight_depth < config.weight_depth:
                depth = args.weight_depth
                if not Device.fit_problems_for(config, bundle, weight_depth=depth):
                    variants.append(({**row, "config": f"{name}, w{depth}"},
                                     {"weight_depth": depth}))
        rows.append(row)
        for target, load_args in variants:
            numbers = measure(config, bundle, frames, load_args=load_args)
            if numbers["busy_cycles"] != cycles:
                print(f"MISMATCH {target['config']}: emulator reported "
                      f"{numbers['busy_cycles']} cycles, the model {cycles}", file=sys.stderr)
                failed = True
            target.update(numbers)
            target["emulator_fps"] = 1 / numbers["seconds_per_frame"]
            target.update(frame_rates(config, cycles,
                                      numbers["bytes_out"] + numbers["bytes_in"]))
            if target is not row:
                variants_rows.append(target)
    if args.rtl:
        try:
            import bitdet.sim.link  # noqa: F401
        except ImportError as e:
            print(f"--rtl: bitdet.sim.link is not available ({e})", file=sys.stderr)
        else:
            target = next((r for r in rows if r["fits"]), None)
            if target is None:
                print("--rtl: the bundle fits no preset", file=sys.stderr)
            else:
                numbers = measure(target["config"], bundle, frames[:1 if args.quick else 2],
                                  backend="rtl")
                target["rtl_seconds_per_frame"] = numbers["seconds_per_frame"]
                if numbers["busy_cycles"] != target["busy_cycles"]:
                    failed = True
                    print("MISMATCH: RTL cycles differ from the emulator's", file=sys.stderr)

    header = (f"{'config':<18}{'weights':<10}{'clock':>6}{'baud':>9}{'cycles/frame':>14}"
              f"{'est fps':>10}{'B out/frame':>13}{'of it W':>9}{'B in/frame':>12}"
              f"{'link fps':>10}{'fps':>8}{'emu fps':>9}{'rtl s/frame':>13}")
    print(header)
    table = [r for preset in rows
             for r in [preset] + [v for v in variants_rows if v["preset"] == preset["config"]]]
    for r in table:
        fits = r["fits"]
        print(f"{r['config']:<18}{r['mode'] if fits else '-':<10}{r['clock_hz'] / 1e6:>5g}M"
              f"{r['baud']:>9}{r['busy_cycles']:>14}{r['estimated_fps']:>10.1f}"
              + (f"{r['bytes_out']:>13}{r['weight_bytes']:>9}{r['bytes_in']:>12}"
                 f"{r['link_limited_fps']:>10.1f}{r['fps']:>8.1f}{r['emulator_fps']:>9.1f}"
                 if fits else f"{'-':>13}{'-':>9}{'-':>12}{'-':>10}{'-':>8}{'-':>9}")
              + (f"{r['rtl_seconds_per_frame']:>13.1f}" if "rtl_seconds_per_frame" in r
                 else f"{'-':>13}"))
    for r in table:
        if not r["fits"]:
            print(f"  {r['config']}: does not fit — {r['problem']} (cycles from the model)")
        elif r["mode"] == "streamed":
            print(f"  {r['config']}: weights of {', '.join(r['streamed_layers'])} streamed "
                  f"every frame ({r['weight_bytes']} B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"frames": frames_n, "bundle": args.bundle, "rows": rows,
                       "streamed_rows": variants_rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
