#!/usr/bin/env python3
"""Export the partition plan's graphs to ONNX: each edge segment with its exit head, each exit head
alone, and the cloud partition, in fp32 and fp16, with past/present K/V and dynamic batch, block and
past axes (plugin/export/onnx.py says what every graph takes and returns).

    .venv/bin/python build/export_onnx.py --plan models/shakespeare-llama/partition_plan.json --out DIR
    .venv/bin/python build/export_onnx.py --plan PLAN --check     # then ONNX Runtime vs PyTorch parity

Writes DIR/manifest.json, DIR/fp32/*.onnx and DIR/fp16/*.onnx; DIR defaults to <checkpoint>/onnx/<plan>,
where `--runner onnx` and build/build_engines.py look for them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--plan", type=Path, required=True, metavar="FILE", help="partition plan (JSON or YAML)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"],
                   help="graph precisions to export (default: fp32 fp16)")
    p.add_argument("--check", action="store_true",
                   help="after exporting, run the ONNX Runtime parity check (build/check_onnx.py) and exit 1 on failure")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from plugin.model.checkpoint import read_config
    from plugin.export.parity import check_parity, parity_summary, parity_table
    from plugin.export.manifest import default_onnx_dir, graph_specs
    from plugin.export.onnx import export_plan
    from plugin.split.plan import PartitionPlan

    plan = PartitionPlan.load(args.plan)
    out = args.out or default_onnx_dir(plan)
    n_graphs = len(graph_specs(plan, read_config(plan.checkpoint).num_layers))
    t0 = time.perf_counter()
    with tqdm(total=n_graphs * len(args.precision), desc="export", unit="graph", dynamic_ncols=True) as bar:
        def progress(spec, precision):
            bar.set_postfix_str(f"{precision}/{spec.name}")
            bar.update()
        export_plan(plan, out, tuple(args.precision), progress=progress)
    print(f"exported {n_graphs} graphs x {len(args.precision)} precisions ({', '.join(args.precision)}) "
          f"to {out} in {time.perf_counter() - t0:.1f} s")
    if not args.check:
        return 0
    results = []
    for precision in tqdm(args.precision, desc="parity", dynamic_ncols=True):
        results += check_parity(plan, out, precision)
    print(parity_table(results))
    ok, line = parity_summary(results)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
