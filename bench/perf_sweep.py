"""perf_analyzer over a concurrency sweep, for the `ce_collm` ensemble (collaborative and verified
sessions) and the `cloud_only` baseline.

    .venv/bin/python -m bench.perf_sweep                       # starts its own tritonserver
    .venv/bin/python -m bench.perf_sweep --url 127.0.0.1:8001  # against a running `ce-collm serve`

Each model gets real edge sessions as input data (bench/perf_inputs.py: one stream per sequence,
uploads and token requests as an edge sends them), then one perf_analyzer run per concurrency
(concurrent sequences), synchronous gRPC calls. Writes perf_analyzer.json to --out (the report of
`ce-collm bench` picks it up), perf_analyzer's CSV and console output to --out/raw/.

Two perf_analyzer 2.51 behaviours shape the recipe: it uses ONE sequence length for all streams
(so the streams are cut to one length and passed as --sequence-length with variation 0), and when
a concurrency level ends it hurries each still-open sequence to its END, skipping steps, which the
context manager rejects as position gaps, or in verified streams as stale rollbacks (stored context
intact, freed by TTL). Those are the
"Thread [i] had error: ... position gap" lines at the end of each level: they come after the
measurement (perf_analyzer's measured request count equals the server's success count);
`teardown_errors` counts them from the server's statistics.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Sequence

from bench.perf_inputs import record_sessions, write_input_data
from bench.args import DEFAULT_OUT, DEFAULT_PLAN
from bench.systems import load_prompts
from plugin.serving.repository import write_repository
from plugin.serving.server import find_perf_analyzer, perf_analyzer_env, TritonServer
from plugin.split.plan import PartitionPlan


# input set -> (the model it drives, sessions recorded in verified mode)
INPUT_SETS = {"ce_collm": ("ce_collm", False), "ce_collm-verified": ("ce_collm", True), "cloud_only": ("cloud_only", False)}


def _failures(http_url: str | None, model: str) -> int | None:
    if http_url is None:
        return None
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as resp:
        stats = json.loads(resp.read())
    return int(stats["model_stats"][0]["inference_stats"]["fail"]["count"])


def perf_command(model: str, url: str, data: Path, steps: int, concurrency: int, csv_path: Path,
                 interval_ms: int) -> list[str]:
    return [str(find_perf_analyzer()), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data),
            "--sequence-length", str(steps), "--sequence-length-variation", "0",
            "--concurrency-range", f"{concurrency}:{concurrency}", "--sync",
            "--measurement-interval", str(interval_ms), "--stability-percentage", "25", "--max-trials", "6",
            "-f", str(csv_path), "--verbose-csv"]


def parse_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    us = lambda k: float(row[k]) if row.get(k) not in (None, "") else None  # noqa: E731
    compute = [us(k) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")]
    return {"throughput": float(row["Inferences/Second"]), "p50_us": us("p50 latency"), "p90_us": us("p90 latency"),
            "p99_us": us("p99 latency"), "avg_us": us("Avg latency"), "server_queue_us": us("Server Queue"),
            "server_compute_us": sum(c for c in compute if c is not None) if any(c is not None for c in compute) else None}


def sweep(url: str, http_url: str | None, inputs: dict[str, dict], concurrency: Sequence[int], raw: Path,
          interval_ms: int = 3000) -> list[dict]:
    rows = []
    env = perf_analyzer_env()
    for name, info in inputs.items():
        model = INPUT_SETS[name][0]
        for c in concurrency:
            csv_path = raw / f"perf_{name}_c{c}.csv"
            cmd = perf_command(model, url, Path(info["path"]), info["steps_per_stream"], c, csv_path, interval_ms)
            failed_before = _failures(http_url, model)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            (raw / f"perf_{name}_c{c}.txt").write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
            failed_after = _failures(http_url, model)
            row = {"model": name, "concurrency": c, "returncode": proc.returncode,
                   "teardown_errors": None if failed_before is None else failed_after - failed_before,
                   "token_request_share": info["token_requests"] / info["steps"]}
            if proc.returncode == 0 and csv_path.is_file():
                row.update(parse_csv(csv_path))
                row["tokens_per_s"] = row["throughput"] * row["token_request_share"]
            else:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                row["error"] = " / ".join(tail)
                print(f"perf_analyzer {name} c={c} failed ({proc.returncode}): {row['error']}", file=sys.stderr)
            rows.append(row)
            if "throughput" in row:
                print(f"{name:17s} concurrency {c:3d}: {row['throughput']:8.1f} infer/s ({row['tokens_per_s']:7.1f} tokens/s)"
                      f"  p50 {row['p50_us'] / 1000:6.1f} ms  p99 {row['p99_us'] / 1000:6.1f} ms", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, metavar="FILE", help="(default: %(default)s)")
    p.add_argument("--url", default=None, metavar="HOST:PORT", help="gRPC of a running server (default: start one)")
    p.add_argument("--http-url", default=None, metavar="HOST:PORT", help="its HTTP endpoint, for failure counts")
    p.add_argument("--concurrency", default="1,2,4,8", metavar="N,N", help="(default: %(default)s)")
    p.add_argument("--sessions", type=int, default=8, metavar="N", help="recorded sessions = streams (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=16, metavar="N", help="tokens per recorded session (default: %(default)s)")
    p.add_argument("--interval-ms", type=int, default=3000, metavar="MS", help="measurement window (default: %(default)s)")
    p.add_argument("--server-threads", type=int, default=1, metavar="N",
                   help="OMP/MKL threads per model process of the server started here; 0: torch's default (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="(default: %(default)s)")
    args = p.parse_args(argv)
    plan = PartitionPlan.load(args.plan)
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prompts, _, _ = load_prompts(plan, args.sessions)
    inputs = {}
    for name, (model, verified) in INPUT_SETS.items():
        traces = record_sessions(plan, prompts, args.tokens, model, verified=verified)
        inputs[name] = write_input_data(raw / f"perf_inputs_{name}.json", traces, plan.split_layer)
        print(f"{name}: {inputs[name]['streams']} streams of {inputs[name]['steps_per_stream']} requests", flush=True)
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.url:
        rows = sweep(args.url, args.http_url, inputs, concurrency, raw, args.interval_ms)
    else:
        with tempfile.TemporaryDirectory(prefix="ce-collm-perf-repo-") as repo:
            write_repository(plan, Path(repo))
            if args.server_threads:  # as `ce-collm bench` does: one torch thread per model process
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    os.environ[var] = str(args.server_threads)
            with TritonServer(repo, log_file=raw / "tritonserver-perf.log", extra_args=["--exit-timeout-secs=5"]) as server:
                rows = sweep(server.grpc_url, server.http_url, inputs, concurrency, raw, args.interval_ms)
    result = {"command": "python -m bench.perf_sweep " + " ".join(sys.argv[1:] if argv is None else argv),
              "inputs": {m: {k: v for k, v in i.items() if k != "path"} for m, i in inputs.items()}, "rows": rows}
    (args.out / "perf_analyzer.json").write_text(json.dumps(result, indent=1) + "\n")
    if (args.out / "results.json").is_file():  # refresh the report with this section
        from bench.report import write_report

        write_report(json.loads((args.out / "results.json").read_text()), args.out)
    print(f"wrote {args.out / 'perf_analyzer.json'}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
