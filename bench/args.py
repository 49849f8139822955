"""The `ce-collm bench` command line, kept free of heavy imports (torch, tritonclient) so that
`ce-collm --help` stays fast; bench/run.py does the work."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from plugin.paths import REPO_ROOT, DEMO_PLAN as DEFAULT_PLAN

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DEFAULT_LINKS = "0/1000,20/100,60/20"  # RTT ms / Mbit per second


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, metavar="FILE",
                   help="partition plan of the model to benchmark (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="where results.json, report.md and the plots go (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a small run (3 prompts x 12 tokens, 2 links, thresholds 0.8 and 1.0, fp16, 1 and 4 clients)")
    p.add_argument("--links", default=None, metavar="L,L",
                   help=f"links as RTT_MS/MBIT[/JITTER_MS], comma-separated (default: {DEFAULT_LINKS})")
    p.add_argument("--thresholds", default=None, metavar="T,T", help="collaborative thresholds (default: 0.8,0.9,1.0)")
    p.add_argument("--codecs", default=None, metavar="C,C", help="hidden-state codecs (default: fp16,int8)")
    p.add_argument("--verified-thresholds", default=None, metavar="T,T",
                   help="verified mode (the exits draft, the full model checks) with drafts exiting at each threshold, "
                        "first codec; empty string skips it (default: the threshold of --verified-plan, else of --plan)")
    p.add_argument("--verified-plan", type=Path, metavar="FILE",
                   help="partition plan of the verified systems: --plan's checkpoint, split at or after its split, "
                        "its own exit heads and threshold (default: --plan)")
    p.add_argument("--verified-target", type=float, metavar="X",
                   help="verified mode's target at 20 ms RTT: time per token at most X times cloud-only's (default: "
                        "the demo model's, 0.4 at 20 ms and 0.35 at 60 ms)")
    p.add_argument("--max-gamma", type=int, default=8, metavar="N",
                   help="verified mode: drafts per request at most (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=None, metavar="N", help="held-out prompts (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="tokens per generation (default: 96)")
    p.add_argument("--clients", default=None, metavar="N,N",
                   help="concurrent edge sessions in the many-clients sweep; empty string skips it (default: 1,4,16,32)")
    p.add_argument("--client-tokens", type=int, default=None, metavar="N", help="tokens per session in the sweep (default: 16)")
    p.add_argument("--long-tokens", type=int, default=None, metavar="N",
                   help="also measure bytes up of naive split vs collaborative over N-token generations; 0 skips "
                        "(default: 256)")
    p.add_argument("--sessions-per-client", type=int, default=2, metavar="N", help="(default: %(default)s)")
    p.add_argument("--p99-slo-ms", type=float, default=None, metavar="MS",
                   help="p99 time per token that defines how many clients a server carries "
                        "(default: 2 x the worst single-client p99 of the two systems)")
    p.add_argument("--edge-runner", choices=["onnx", "torch"], default="onnx",
                   help="how the edge computes its layers: onnx (ONNX Runtime over fp32 graphs the bench exports "
                        "into OUT/raw/onnx, as a device without TensorRT runs them) or torch (default: %(default)s)")
    p.add_argument("--edge-threads", type=int, default=1, metavar="N", help="torch threads of the edge (default: %(default)s)")
    p.add_argument("--server-threads", type=int, default=1, metavar="N",
                   help="OMP/MKL threads of each python-backend model process of the bench's own server; 0 keeps "
                        "torch's default (default: %(default)s)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the edge (this process) and the bench's server to separate CPU cores (by default "
                        "with at least 2: two devices, the edge one core and the cloud one core); both share every core")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def write_json(path: Path, data: dict) -> None:
    """A bench's result file, its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
