"""What the LM head costs the cloud per request, by the rows it runs on: the price of checking drafts.

A token request runs the head on its last row; a request with r drafts (verified mode, --exit-fidelity)
runs it on r rows. This times what cloud_partition does with those rows (plugin/split/cloud.py: final
hidden rows x the model's head, `VocabHead`, log-softmax, top-K) on random weights of a given shape, nothing downloaded: the
demo model's head and Gemma 3 270M's (262,144 x 640) by default.

    .venv/bin/python -m bench.head_rows
    .venv/bin/python -m bench.head_rows --shape 262144x640 --rows 1,2,5,9,17 --dtype bfloat16 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import torch

from plugin.model.decoder import VocabHead
from plugin.protocol.tensors import TOP_K

SHAPES = {"demo model (shakespeare-llama)": (4096, 256), "Gemma 3 270M": (262144, 640)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def head_ms(vocab: int, hidden: int, rows: int, dtype: torch.dtype, repeats: int) -> float:
    """Median milliseconds of one head pass over `rows` rows, as the cloud partition runs it."""
    head = VocabHead(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
    head.weight.copy_(torch.randn(vocab, hidden, dtype=dtype) * 0.02)  # [V, D]
    x = torch.randn(rows, hidden, dtype=dtype)  # [r, D]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logprobs = torch.log_softmax(head(x).float(), dim=-1)  # [r, V]
        logprobs.topk(TOP_K, dim=-1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.head_rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", metavar="VxD", help="vocabulary x hidden size (default: the two above)")
    p.add_argument("--rows", default="1,2,5,9,17", metavar="N,N", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="median of N passes (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = {s: tuple(int(x) for x in s.lower().split("x")) for s in args.shape} if args.shape else SHAPES
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    print(f"| head | {args.dtype}, {args.threads} thread(s) | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows) + " |")
    print("| --- | --- |" + " ---: |" * len(rows))
    for name, (vocab, hidden) in shapes.items():
        ms = [head_ms(vocab, hidden, r, DTYPES[args.dtype], args.repeats) for r in rows]
        print(f"| {name} | {vocab} x {hidden} | " + " | ".join(f"{m:.2f} ms ({m / ms[0]:.1f}x)" for m in ms) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
