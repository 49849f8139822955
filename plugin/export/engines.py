"""TensorRT engines from the exported ONNX graphs: presets, optimization profiles, the build itself.

Everything but `build_engine` (and the int8 calibrator) runs without TensorRT, so the shapes an
engine will accept are decided, printed (`build/build_engines.py --dry-run`) and tested here.
TensorRT itself is imported lazily: where it is missing, `import_tensorrt` (engine_manifest.py) raises
`TensorRTUnavailable` with what to install and where to run the build.

Profiles (one engine per graph, two profiles each, the order the runners rely on):
  0 "decode"    T = 1                       past in [0, max_context - 1]
  1 "block"     T in [1, max_block]         past in [0, max_context - 1]  (prefill and catch-up)
              (cloud: T from 0, an upload-only request carries no rows)
Exit-head graphs take one row per sequence and get one profile.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from plugin.export.engine_manifest import ENGINE_FORMAT, ENGINE_MANIFEST
from plugin.export.manifest import GraphSpec, Manifest

PRECISIONS = ("fp16", "fp32", "int8")

@dataclass(frozen=True)
class EnginePreset:
    """Where engines run and the shapes they must accept there."""

    target: str
    graph_kinds: tuple[str, ...]  # which graphs of the manifest this target builds
    max_batch: int  # sequences per execution
    max_block: int  # rows per prefill/catch-up block
    opt_block: int  # the block length TensorRT tunes for
    opt_past: int  # the past length TensorRT tunes for
    context_cap: int  # max context = min(this, the checkpoint's max_position_embeddings) unless given
    workspace_gib: float
    note: str


PRESETS = {
    "jetson": EnginePreset(
        "jetson", ("edge", "exit_head"), max_batch=1, max_block=256, opt_block=32, opt_past=256, context_cap=2048,
        workspace_gib=1.0,
        note="edge segments + exit heads; one sequence; memory shared with the CPU, so a small workspace",
    ),
    "cloud": EnginePreset(
        "cloud", ("cloud",), max_batch=1, max_block=1024, opt_block=16, opt_past=512, context_cap=4096,
        workspace_gib=8.0,
        note="the cloud partition for the tensorrt_plan variant; implicit-state KV differs in length per "
             "sequence, so one sequence per execution (scale with instance_group count)",
    ),
}


@dataclass(frozen=True)
class BuildOptions:
    target: str = "jetson"
    precision: str = "fp16"  # fp16 (default), fp32, or int8 (with fp16 fallback; needs calibration data)
    max_context: int | None = None  # default: min(preset.context_cap, checkpoint's max positions)
    max_block: int | None = None  # default: the preset's
    max_batch: int | None = None  # default: the preset's
    calib_data: Path | None = None
    calib_block: int = 64  # rows per calibration block
    timing_cache: Path | None = None
    workspace_gib: float | None = None

    def __post_init__(self) -> None:
        if self.target not in PRESETS:
            raise ValueError(f"--target must be one of {sorted(PRESETS)}, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "int8" and self.calib_data is None:
            raise ValueError("--int8 needs --calib-data FILE (token ids .npy, or text the checkpoint's tokenizer reads)")
        if self.calib_data is not None and self.precision != "int8":
            raise ValueError("--calib-data is only used with --int8")
        for name in ("max_context", "max_block", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @property
    def preset(self) -> EnginePreset:
        p = PRESETS[self.target]
        return replace(p, max_block=self.max_block or p.max_block, max_batch=self.max_batch or p.max_batch,
                       workspace_gib=self.workspace_gib or p.workspace_gib)

    def context(self, manifest: Manifest) -> int:
        """Longest context an engine accepts: the checkpoint's positions capped by the preset, or as given."""
        limit = manifest.max_positions
        if self.max_context is not None:
            if self.max_context > limit:
                raise ValueError(f"--max-context {self.max_context} exceeds the checkpoint's {limit} positions")
            return self.max_context
        return min(self.preset.context_cap, limit)

    @property
    def onnx_precision(self) -> str:
        """fp16 graphs keep the KV cache (engine I/O) in fp16; fp32 engines are built from fp32 graphs."""
        return "fp32" if self.precision == "fp32" else "fp16"


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


def engine_graphs(manifest: Manifest, opts: BuildOptions) -> list[GraphSpec]:
    return [s for s in manifest.specs() if s.kind in opts.preset.graph_kinds]


def engine_profiles(spec: GraphSpec, manifest: Manifest, opts: BuildOptions) -> list[Profile]:
    """The optimization profiles of one graph's engine: decode (T = 1) and prefill/catch-up blocks."""
    preset, ctx = opts.preset, opts.context(manifest)
    B, H, Dh, D = preset.max_batch, manifest.num_kv_heads, manifest.head_dim, manifest.hidden_size
    if spec.kind == "exit_head":
        return [Profile("rows", {"hidden": ((1, D), (1, D), (B, D))})]
    max_block = min(preset.max_block, ctx)
    opt_block = min(preset.opt_block, max_block)
    opt_past = min(preset.opt_past, ctx - 1)
    past = ((1, H, 0, Dh), (1, H, opt_past, Dh), (B, H, ctx - 1, Dh))
    min_block = 0 if spec.kind == "cloud" else 1

    def rows(t_min: int, t_opt: int, t_max: int):
        if spec.first_layer == 0:
            return (1, t_min), (1, t_opt), (B, t_max)
        return (1, t_min, D), (1, t_opt, D), (B, t_max, D)

    profiles = []
    for name, t in (("decode", (1, 1, 1)), ("block", (min_block, opt_block, max_block))):
        shapes = {spec.inputs[0]: rows(*t), "start_pos": ((1, 1), (1, 1), (B, 1))}
        shapes.update({n: past for n in spec.inputs if n.startswith("past_")})
        profiles.append(Profile(name, shapes))
    return profiles


def describe_plan(manifest: Manifest, opts: BuildOptions) -> str:
    """What --dry-run prints: every engine and its profiles."""
    preset = opts.preset
    ctx = opts.context(manifest)
    lines = [f"target {preset.target}: {preset.note}",
             f"precision {opts.precision} (from {opts.onnx_precision} ONNX), max context {ctx}, "
             f"max block {min(preset.max_block, ctx)}, max batch {preset.max_batch}, "
             f"workspace {preset.workspace_gib:g} GiB"]
    for spec in engine_graphs(manifest, opts):
        lines.append(f"  {spec.name}.plan")
        for p in engine_profiles(spec, manifest, opts):
            first = spec.inputs[0]
            lo, opt, hi = p.shapes[first]
            past = next((s for n, s in p.shapes.items() if n.startswith("past_")), None)
            past_txt = f", past {past[0][2]}..{past[2][2]} (opt {past[1][2]})" if past else ""
            lines.append(f"    profile {p.name:<7} {first} {lo}..{hi} (opt {opt}){past_txt}")
    return "\n".join(lines)


# -- command line (build/build_engines.py) ------------------------------------------------------------
def add_build_arguments(p) -> None:
    p.add_argument("--plan", type=Path, required=True, metavar="FILE", help="partition plan (JSON or YAML)")
    p.add_argument("--target", choices=sorted(PRESETS), required=True,
                   help="jetson: edge segments + exit heads; cloud: the cloud partition for Triton's tensorrt_plan")
    p.add_argument("--onnx-dir", type=Path, metavar="DIR", help="exported graphs (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--out", type=Path, metavar="DIR", help="engine folder (default: <checkpoint>/engines/<target>)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="int8 with fp16 fallback; needs --calib-data")
    precision.add_argument("--fp32", action="store_true", help="no reduced precision (default: fp16)")
    p.add_argument("--calib-data", type=Path, metavar="FILE",
                   help="int8 calibration tokens: a .npy of token ids, or text for the checkpoint's tokenizer")
    p.add_argument("--calib-block", type=int, default=64, metavar="T", help="rows per calibration block (default: %(default)s)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="longest context (past + block) an engine accepts (default: the checkpoint's "
                        "max_position_embeddings, capped at 2048 on jetson, 4096 on cloud)")
    p.add_argument("--max-block", type=int, metavar="T", help="rows per prefill/catch-up block (default: 256 jetson, 1024 cloud)")
    p.add_argument("--max-batch", type=int, metavar="B", help="sequences per execution (default: 1)")
    p.add_argument("--workspace-gib", type=float, metavar="G", help="builder workspace (default: 1 jetson, 8 cloud)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="reuse (and update) this TensorRT timing cache across builds and graphs")
    p.add_argument("--dry-run", action="store_true", help="print the engines and profiles; build nothing (no TensorRT needed)")


def options_from_args(args) -> BuildOptions:
    """BuildOptions from parsed arguments; ValueError says what is wrong."""
    precision = "int8" if args.int8 else "fp32" if args.fp32 else "fp16"
    return BuildOptions(target=args.target, precision=precision, max_context=args.max_context,
                        max_block=args.max_block, max_batch=args.max_batch, calib_data=args.calib_data,
                        calib_block=args.calib_block, timing_cache=args.timing_cache, workspace_gib=args.workspace_gib)


# -- calibration data (int8): token blocks; each graph's inputs come from int8_calibration.py ----------
def read_calibration_tokens(path: Path, checkpoint: Path, block: int, max_blocks: int = 64) -> np.ndarray:
    """Token blocks [N, block] int64 from a .npy of token ids or a text file (checkpoint's tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path} not found")
    if path.suffix == ".npy":
        ids = np.load(path).astype(np.int64).reshape(-1)
    else:
        tokenizer_file = Path(checkpoint) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{path} is text but {tokenizer_file} is missing: give token ids as .npy instead")
        from tokenizers import Tokenizer

        ids = np.array(Tokenizer.from_file(str(tokenizer_file)).encode(path.read_text()).ids, np.int64)
    n = min(len(ids) // block, max_blocks)
    if n == 0:
        raise ValueError(f"calibration data {path} holds {len(ids)} tokens, fewer than one block of {block}")
    return ids[: n * block].reshape(n, block)


# -- the build (needs TensorRT) -------------------------------------------------------------------------
def build_engine(trt, onnx_path: Path, spec: GraphSpec, profiles: list[Profile], opts: BuildOptions,
                 timing_cache=None, calibrator=None) -> bytes:
    """Parse one ONNX graph and build its serialized engine (TensorRT 8.5+ and 10.x APIs). int8 needs a
    `calibrator` (int8_calibration.entropy_calibrator)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.preset.workspace_gib * (1 << 30)))
    if opts.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    if opts.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calib_profile = builder.create_optimization_profile()  # calibration runs at one fixed shape
        for name, value in calibrator.feeds[0].items():
            calib_profile.set_shape(name, value.shape, value.shape, value.shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return bytes(serialized)


def write_engine_manifest(out_dir: Path, manifest: Manifest, opts: BuildOptions, engines: dict[str, dict],
                          tensorrt_version: str) -> Path:
    path = Path(out_dir) / ENGINE_MANIFEST
    info = {"format": ENGINE_FORMAT, "target": opts.target, "precision": opts.precision,
            "max_context": opts.context(manifest), "tensorrt_version": tensorrt_version,
            "onnx_manifest": asdict(manifest), "engines": engines}
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
