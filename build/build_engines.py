#!/usr/bin/env python3
"""Build TensorRT engines from the exported ONNX graphs, for a Jetson (edge) or the cloud (Triton).

One engine per graph with two optimization profiles: single-token decode (T = 1) and prefill/catch-up
blocks (T up to --max-block), past length up to the max context. fp16 by default, int8 with
calibration data, fp32 on request; the timing cache is reused across graphs and runs.

    # on the Jetson (JetPack's TensorRT):
    python build/build_engines.py --plan models/shakespeare-llama/partition_plan.json --target jetson
    # in the NGC Triton container (its TensorRT):
    python build/build_engines.py --plan models/shakespeare-llama/partition_plan.json --target cloud \\
        --timing-cache /work/trt-timing.cache
    # anywhere (no TensorRT needed): what would be built
    python build/build_engines.py --plan PLAN --target jetson --dry-run

Exit codes: 0 built, 1 build failed, 2 TensorRT missing or bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing


def parse_args(argv=None) -> argparse.Namespace:
    from plugin.export.engines import add_build_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_build_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from plugin.export.engine_manifest import import_tensorrt, TensorRTUnavailable
    from plugin.export.engines import build_engine, describe_plan, engine_graphs, engine_profiles, options_from_args, read_calibration_tokens, write_engine_manifest
    from plugin.export.manifest import ExportError, Manifest, default_onnx_dir, graph_path
    from plugin.split.plan import PartitionPlan

    try:
        opts = options_from_args(args)
    except ValueError as e:
        print(f"build_engines: {e}", file=sys.stderr)
        return 2
    trt = None
    if not args.dry_run:
        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as e:
            print(f"build_engines: {e}", file=sys.stderr)
            return 2
    plan = PartitionPlan.load(args.plan)
    onnx_dir = args.onnx_dir or default_onnx_dir(plan)
    try:
        manifest = Manifest.load(onnx_dir)
        manifest.check_plan(plan)
        if opts.onnx_precision not in manifest.precisions:
            raise ExportError(f"{onnx_dir} holds no {opts.onnx_precision} graphs")
    except ExportError as e:
        print(f"build_engines: {e}\nexport first: python build/export_onnx.py --plan {args.plan} --out {onnx_dir}",
              file=sys.stderr)
        return 2
    try:
        print(describe_plan(manifest, opts))
    except ValueError as e:
        print(f"build_engines: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0

    from tqdm import tqdm

    out = args.out or plan.checkpoint / "engines" / opts.target
    out.mkdir(parents=True, exist_ok=True)
    cache_bytes = opts.timing_cache.read_bytes() if opts.timing_cache and opts.timing_cache.is_file() else b""
    timing_cache = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config().create_timing_cache(cache_bytes)
    tokens = model = None
    if opts.precision == "int8":  # calibration runs the PyTorch layer loop: only int8 builds need torch
        from plugin.export.int8_calibration import calibration_feeds, entropy_calibrator
        from plugin.export.onnx import load_full_model

        tokens = read_calibration_tokens(opts.calib_data, plan.checkpoint, opts.calib_block)
        model = load_full_model(plan, "fp32")
    engines, t0 = {}, time.perf_counter()
    for spec in tqdm(engine_graphs(manifest, opts), desc=f"engines ({opts.target})", unit="engine", dynamic_ncols=True):
        profiles = engine_profiles(spec, manifest, opts)
        calibrator = None
        if tokens is not None and spec.kind != "exit_head":
            calibrator = entropy_calibrator(trt, calibration_feeds(model, spec, tokens), out / f"{spec.name}.calib")
        precision = opts if calibrator is not None or opts.precision != "int8" else _fp16(opts)
        try:
            data = build_engine(trt, graph_path(onnx_dir, spec, opts.onnx_precision), spec, profiles, precision,
                                timing_cache, calibrator)
        except RuntimeError as e:
            print(f"build_engines: {e}", file=sys.stderr)
            return 1
        (out / f"{spec.name}.plan").write_bytes(data)
        engines[spec.name] = {"file": f"{spec.name}.plan", "precision": precision.precision,
                              "profiles": [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                                           for p in profiles]}
    if opts.timing_cache:
        opts.timing_cache.write_bytes(bytes(timing_cache.serialize()))
    write_engine_manifest(out, manifest, opts, engines, trt.__version__)
    print(f"built {len(engines)} {opts.precision} engines for {opts.target} in {out} "
          f"(TensorRT {trt.__version__}, {time.perf_counter() - t0:.0f} s)")
    return 0


def _fp16(opts):
    """Exit heads are not calibrated (one row in, logits out): fp16 for them."""
    from dataclasses import replace

    return replace(opts, precision="fp16", calib_data=None)


if __name__ == "__main__":
    sys.exit(main())
