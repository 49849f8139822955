"""`ce-collm-edge`: the edge side's command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from edge_runtime.app import EdgeApp, ModelMissing
from edge_runtime.link import CloudUnreachable
from edge_runtime.parts import SessionOptions
from edge_runtime.policy import LatencyPolicy, Mode
from edge_runtime.session import network_mode, SESSION_MODES
from edge_runtime.verified import DraftLength, VerifiedSession
from edge_runtime.runners import RUNNERS
from plugin.export.engine_manifest import TensorRTUnavailable
from plugin.export.manifest import ExportError
from plugin.paths import DEMO_PLAN
from plugin.protocol.codec import CODEC_DTYPES
from plugin.protocol.errors import ProtocolError
from plugin.split.plan import check_threshold, PlanError

DESCRIPTION = """\
Generate text on the edge with early exits, asking a CE-CoLLM Triton server only when no edge exit
is confident. Modes:
  collaborative  exit when confident, else the cloud answers (accuracy of the full model)
  standalone     never waits on the network: the last edge exit always answers (--url not needed)
  latency-aware  collaborative, but answer on the edge while the measured cloud round trip breaks
                 --latency-budget-ms or the cloud is unreachable; re-sync when it returns
  cloud-only     the baseline: token ids to the whole model on the server
  verified       the edge's exits draft up to gamma tokens, the server checks them in one request and
                 the output is the full model's (greedy: token for token; sampling: its distribution)
  verified-latency-aware
                 verified, but the drafts are the output, marked unverified, while the server is
                 unreachable or its round trip breaks --latency-budget-ms
Tokens are coloured by where they came from on a terminal (legend on stderr). Every error ends as
one line on stderr saying what happened and what to do (--debug adds the traceback).
"""


UINT64_MAX = (1 << 64) - 1  # the largest Triton sequence id and sampling seed


def _text(text: str) -> str:
    """argparse type of --prompt: bytes that are not UTF-8 reach Python as lone surrogates (PEP 383), which
    the tokenizer refuses with a TypeError mid-generation; refuse them here, before any work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"not UTF-8 text (undecodable bytes from character {e.start} on); "
                                         "give the prompt in UTF-8, e.g. through `iconv -t UTF-8`") from None
    return text


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (a negative count or id is a typo, and argparse took it)."""
    bounds = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return value
    return parse


def _number(low: float, high: float | None = None, above_low: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number >= low (> low with above_low), <= high if given; float() takes nan and inf."""
    bounds = (f"a number in {'(' if above_low else '['}{low:g}, {high:g}]" if high is not None
              else f"a finite number {'>' if above_low else '>='} {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        below = value <= low if above_low else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return value
    return parse


def _threshold(text: str) -> float:
    """argparse type of --threshold: the partition plan's own rule for it (check_threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_threshold(value)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=_text, required=True, help="text to continue (UTF-8)")
    p.add_argument("--url", metavar="HOST:PORT", help="Triton gRPC endpoint, e.g. 127.0.0.1:8001 (all modes but standalone)")
    p.add_argument("--max-new-tokens", type=_integer(1), default=64, metavar="N", help="(default: %(default)s)")
    p.add_argument("--mode", choices=SESSION_MODES, default="collaborative", help="(default: %(default)s)")
    p.add_argument("--threshold", type=_threshold, metavar="T",
                   help="exit when max softmax probability >= T; 1.0 never exits, and with --codec fp32 gives the "
                        "full model's greedy tokens exactly (default: the plan's)")
    p.add_argument("--codec", choices=sorted(CODEC_DTYPES),
                   help="how layer-k hidden states travel (default: the plan's). fp32 is lossless: the only codec "
                        "that keeps threshold 1.0 exact; fp16, fp16s, int8 and int8g round the rows the cloud "
                        "resumes from, and a near-tie can then flip a token (README, \"Exactness, tested\")")
    p.add_argument("--runner", choices=RUNNERS, default="auto",
                   help="edge segment runner: onnx (ONNX Runtime over the files of build/export_onnx.py), torch "
                        "(PyTorch layer loop), tensorrt (engines of build/build_engines.py); auto: onnx when the "
                        "plan's graphs are exported, else torch (default: %(default)s)")
    p.add_argument("--threads", type=_integer(1), metavar="N",
                   help="the edge runner's CPU threads (default: the CPUs this process may run on)")
    p.add_argument("--onnx-dir", type=Path, metavar="DIR", help="exported segments (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--engine-dir", type=Path, metavar="DIR", help="TensorRT engines (default: <checkpoint>/engines/jetson)")
    p.add_argument("--plan", type=Path, default=DEMO_PLAN, metavar="FILE",
                   help="partition plan naming the checkpoint, split and exits (default: the demo model's)")
    p.add_argument("--temperature", type=_number(0.0), default=0.0,
                   help="0 decodes greedily; above 0 samples with --top-p (default: %(default)s)")
    p.add_argument("--top-p", type=_number(0.0, 1.0, above_low=True), default=0.9,
                   help="nucleus size when sampling (default: %(default)s)")
    p.add_argument("--seed", type=_integer(0, UINT64_MAX), default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--latency-budget-ms", type=_number(0.0), default=250.0,
                   help="latency-aware: per-token budget for a cloud round trip (default: %(default)s)")
    p.add_argument("--sequence-id", type=_integer(1, UINT64_MAX), help="Triton sequence id (default: a random one)")
    p.add_argument("--sync-uploads", action="store_true", help="upload rows in the foreground (default: background)")
    p.add_argument("--no-speculate", action="store_true",
                   help="collaborative, latency-aware: do not compute the next position on the edge's best guess while a cloud "
                        "request is out (greedy decoding speculates by default; tokens are the same either way)")
    p.add_argument("--exit-fidelity", action="store_true",
                   help="collaborative, latency-aware: each token request also asks the full model's token after the "
                        "rows of the edge's own tokens (per-exit agreement in the summary and --json; verified modes "
                        "always have it)")
    p.add_argument("--max-gamma", type=_integer(0), default=8, metavar="N",
                   help="verified modes: at most N drafts per request (gamma adapts below it to the acceptance rate, "
                        "the link, the edge's step and the cloud's pass time) (default: %(default)s)")
    p.add_argument("--gamma", type=_integer(0), metavar="N", help="verified modes: exactly N drafts per request")
    p.add_argument("--lookup-below", type=_number(0.0, 1.0), metavar="C",
                   help="verified modes: a draft whose exit is less confident than C becomes the token that followed "
                        "the last earlier occurrence of the sequence's last two tokens, where there is one; the full "
                        "model checks it as any draft; 0 never (default: the plan's lookup_below, else 0)")
    p.add_argument("--patience", type=_number(0.0), default=30.0, metavar="S",
                   help="collaborative, verified: keep retrying an unreachable cloud this long before giving up "
                        "(the latency-aware modes never wait: they answer on the edge) (default: %(default)s)")
    p.add_argument("--ssl", action="store_true", help="TLS to a server started with --grpc-use-ssl")
    p.add_argument("--root-cert", type=Path, metavar="PEM", help="CA certificate that signed the server's (with --ssl)")
    p.add_argument("--client-key", type=Path, metavar="PEM", help="client key, for mutual TLS")
    p.add_argument("--client-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS")
    p.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="gRPC header sent with every request (e.g. an authenticating proxy's token); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-color", action="store_true", help="no colours even on a terminal")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error before its one-line summary")


def _options(args: argparse.Namespace) -> SessionOptions:
    """The session's options from the command line."""
    from plugin.model.sampling import Greedy, TopP

    return SessionOptions(
        threshold=args.threshold, codec=args.codec, sequence_id=args.sequence_id,
        sampler=Greedy() if args.temperature == 0 else TopP(args.temperature, args.top_p, args.seed),
        async_uploads=not args.sync_uploads, latency=LatencyPolicy(budget_s=args.latency_budget_ms / 1000),
        speculate=not args.no_speculate, fidelity=args.exit_fidelity,
        draft_length=DraftLength.fixed(args.gamma) if args.gamma is not None else DraftLength(max_gamma=args.max_gamma),
        lookup_below=args.lookup_below)


def _generate(args: argparse.Namespace) -> int:
    from edge_runtime.display import TokenPrinter

    if args.mode != "standalone" and not args.url:
        print(f"error: --url HOST:PORT is needed in {args.mode} mode (start a server with `ce-collm serve`)",
              file=sys.stderr)
        return 2
    try:  # a missing or bad plan, checkpoint, export, TensorRT or certificate: nothing generated yet
        app = EdgeApp.load(args.plan, args.runner, **_runner_options(args))
        session = app.session(args.mode, _link(args), _options(args))
    except Exception as e:
        return _fail(e, args, 2)
    printer = TokenPrinter(app.tokenizer, app.plan.exit_layers, colour=False if args.no_color else None)
    records, error = [], None
    if not args.json:
        if printer.legend():
            print(printer.legend(), file=sys.stderr)
        sys.stdout.write(args.prompt)
    try:
        for record in session.stream(app.encode(args.prompt), args.max_new_tokens):
            records.append(record)
            if not args.json:
                printer.add(record)
    except Exception as e:  # the tokens so far and the statistics are still printed
        error = e
    ids = [r.token_id for r in records]
    s = session.stats
    result = {
        "text": app.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
        "exits": [r.exit for r in records], "tokens_per_exit": dict(Counter(r.exit for r in records)),
        "cloud_requests": s.cloud_requests, "uploads": s.uploads, "resyncs": s.resyncs, "resumes": s.resumes,
        "fallbacks": s.fallbacks,
        "bytes_up": s.bytes_up, "bytes_down": s.bytes_down, "edge_s": round(s.edge_s, 4),
        "cloud_wait_s": round(s.cloud_wait_s, 4), "cloud_pass_s": round(s.cloud_pass_s, 4),
        "speculated": s.speculated, "speculation_hits": s.speculation_hits,
        "speculation_s": round(s.speculation_s, 4), "wall_s": round(s.wall_s, 4), "mode": args.mode,
        "runner": app.edge.runner.kind, "threshold": None if args.mode == "cloud-only" else session.threshold,
        "codec": None if args.mode == "cloud-only" else session.codec, "sequence_id": session.sequence_id,
        "exit_agreement": s.exit_agreement(), "unverified": s.unverified,
    }
    verified = isinstance(session, VerifiedSession)
    if verified:
        result["verified"] = {**s.verified_summary(len(ids)), "drafts_sent": s.drafts_sent,
                              "drafts_accepted": s.drafts_accepted}
    if error:
        result["error"] = f"{type(error).__name__}: {error}"
    if args.json:
        print(json.dumps(result))
    else:
        print()
        per_exit = ", ".join(f"{k}: {v}" for k, v in sorted(result["tokens_per_exit"].items()))
        print(f"[{len(ids)} tokens in {s.wall_s:.2f} s ({app.edge.runner.kind}) | {per_exit} | cloud requests {s.cloud_requests}, "
              f"uploads {s.uploads} | up {s.bytes_up:,} B, down {s.bytes_down:,} B | edge {s.edge_s:.2f} s, "
              f"waiting on cloud {s.cloud_wait_s:.2f} s | guesses kept {s.speculation_hits}/{s.speculated}]",
              file=sys.stderr)
        if s.drafts_checked:
            print("[exits agreeing with the full model: " + ", ".join(
                f"{k} {v['agreed']}/{v['checked']}" for k, v in result["exit_agreement"].items()) + "]", file=sys.stderr)
        if verified:
            v = result["verified"]
            print(f"[verified: acceptance {v['acceptance_rate']:.0%}, {v['tokens_per_round_trip']:.2f} tokens per "
                  f"round trip, gamma {v['gamma']:.1f}, unverified {s.unverified}]", file=sys.stderr)
    if error:
        return _fail(error, args, 1, f"after {len(ids)} tokens, ")
    return 0


def _runner_options(args: argparse.Namespace) -> dict:
    if args.runner == "tensorrt":
        return {"engine_dir": args.engine_dir}
    return {"onnx_dir": args.onnx_dir, "threads": args.threads}


def _link(args: argparse.Namespace):
    """The cloud link of the mode (None in standalone): gRPC to the server, retried within --patience."""
    if args.mode == "standalone":
        return None
    from edge_runtime.reconnect import ReconnectingLink
    from edge_runtime.triton_link import TritonLink

    read = lambda path: path.read_text() if path else None  # noqa: E731
    mode = network_mode(args.mode)
    link = TritonLink(args.url, "cloud_only" if mode is Mode.CLOUD_ONLY else "ce_collm", ssl=args.ssl,
                      root_certificates=read(args.root_cert), private_key=read(args.client_key),
                      certificate_chain=read(args.client_cert),
                      headers=dict(h.split("=", 1) for h in args.header) or None)
    return ReconnectingLink(link, patience_s=0.0 if mode.falls_back else args.patience)


def _fail(error: Exception, args: argparse.Namespace, code: int, when: str = "") -> int:
    """Print `error` as one line (what happened, what to do) on stderr, its traceback first with --debug."""
    if args.debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {when}{_explain(error, args)}", file=sys.stderr)
    return code


def _explain(e: Exception, args: argparse.Namespace) -> str:
    """One line for the errors a user meets, each with what to do about it."""
    if isinstance(e, CloudUnreachable):
        return (f"the server at {args.url} did not answer ({_one_line(e)}); start it with `ce-collm serve`, "
                "check --url, or run --mode standalone (no server) or latency-aware (answers on the edge meanwhile)")
    if isinstance(e, ProtocolError):
        return (f"the server refused a request: {_one_line(e)}; check that it serves configs made from this plan "
                f"(`ce-collm configs --check --plan {args.plan}`)")
    if isinstance(e, TensorRTUnavailable):
        return ("TensorRT is not installed here (`import tensorrt` failed); use --runner onnx or --runner torch, "
                "or run on a device with TensorRT (--debug shows where to get it)")
    if isinstance(e, (ModelMissing, ExportError)):
        return _one_line(e)
    if isinstance(e, FileNotFoundError) and Path(e.filename or "") == args.plan:
        return f"no partition plan at {args.plan}; give --plan FILE (default: the demo model's)"
    if isinstance(e, (PlanError, json.JSONDecodeError)) or type(e).__module__.startswith("yaml"):
        return f"bad partition plan {args.plan}: {_one_line(e)}; fix it (README, \"The partition plan\")"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror}: {e.filename}; check the path"
    return f"{type(e).__name__}: {_one_line(e)} (--debug shows the traceback)"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ce-collm-edge", description="CE-CoLLM edge runtime.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("generate", help="generate text with early exits and the cloud's help", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _generate_arguments(p)
    p.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:  # whatever the commands did not foresee still ends as one line
        return _fail(e, args, 1)


if __name__ == "__main__":
    sys.exit(main())
