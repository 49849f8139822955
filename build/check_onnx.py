#!/usr/bin/env python3
"""Check exported ONNX graphs against the PyTorch layer loop with ONNX Runtime.

For every graph (edge segments, exit heads, the cloud partition) and precision: a prefill block
from an empty cache, a catch-up block, a single-token decode step with past, and for the cloud an
upload-only block of 0 rows; max |onnx - torch| per output, against the fp32 PyTorch model.
Exits 1 when any output is above tolerance (fp32: 1e-4 + 1e-5 * max|ref|; fp16: 1e-2 + 1e-2 * max|ref|)
or a token differs where the reference is not a near tie.

    .venv/bin/python build/check_onnx.py --plan models/shakespeare-llama/partition_plan.json
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
    p.add_argument("--onnx-dir", type=Path, metavar="DIR", help="exported graphs (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "fp16"),
                   help="precisions to check (default: every precision the manifest lists)")
    p.add_argument("--batch", type=int, default=2, metavar="N", help="sequences per block (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=7, metavar="T", help="prefill block rows (default: %(default)s)")
    p.add_argument("--catch-up", type=int, default=3, metavar="T", help="catch-up block rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random token ids (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnx
    from tqdm import tqdm

    from plugin.export.manifest import ExportError, Manifest, default_onnx_dir, graph_path
    from plugin.export.parity import check_parity, parity_summary, parity_table
    from plugin.export.onnx import load_full_model
    from plugin.split.plan import PartitionPlan

    plan = PartitionPlan.load(args.plan)
    onnx_dir = args.onnx_dir or default_onnx_dir(plan)
    try:
        manifest = Manifest.load(onnx_dir)
        manifest.check_plan(plan)
    except ExportError as e:
        print(f"check_onnx: {e}\nexport first: .venv/bin/python build/export_onnx.py --plan {args.plan} --out {onnx_dir}",
              file=sys.stderr)
        return 2
    precisions = args.precision or manifest.precisions
    t0 = time.perf_counter()
    for precision in precisions:  # structure first: every graph is valid ONNX with consistent shapes
        for spec in manifest.specs():
            onnx.checker.check_model(str(graph_path(onnx_dir, spec, precision)), full_check=True)
    reference = load_full_model(plan, "fp32")
    results = []
    for precision in tqdm(precisions, desc="parity", dynamic_ncols=True):
        results += check_parity(plan, onnx_dir, precision, reference, prefill=args.prefill, catch_up=args.catch_up,
                                batch=args.batch, seed=args.seed)
    print(parity_table(results))
    ok, line = parity_summary(results)
    print(f"{line} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
