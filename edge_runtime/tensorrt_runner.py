"""The TensorRT segment runner: engines built by build/build_engines.py, past K/V kept on the GPU between steps.

Its device buffers are PyTorch CUDA tensors (on a Jetson, JetPack's torch wheel): a rewind slices a layer's cache
along positions, which TensorRT's own bindings cannot do on the device. Everything else it shares with the ONNX
Runtime runner (`runners._GraphRunner`); rows and logits come back to the host as numpy arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.runners import _GraphRunner, TENSORRT_RUNNER_HINT
from plugin.export.engine_manifest import ENGINE_MANIFEST, import_tensorrt, load_engine_manifest, TensorRTUnavailable
from plugin.export.manifest import GraphSpec, kv_names, Manifest
from plugin.split.plan import PartitionPlan

try:
    import torch
except ImportError:
    raise TensorRTUnavailable("the TensorRT runner keeps its buffers in PyTorch CUDA tensors and PyTorch is not "
                              f"installed here (on a Jetson: JetPack's torch wheel).\n{TENSORRT_RUNNER_HINT}") from None


class TensorRTRunner(_GraphRunner):
    """TensorRT engines built by build/build_engines.py; past K/V as CUDA tensors per layer.

    Each engine has an optimization profile for single-token decode (profile 0) and one for
    prefill/catch-up blocks (profile 1); a context per profile. Not runnable on machines without
    TensorRT and a GPU (this project's CI): the constructor says so and names the runners that work.
    """

    kind = "tensorrt"

    def __init__(self, plan: PartitionPlan, engine_dir: str | Path | None = None, device: str = "cuda"):
        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as e:
            raise TensorRTUnavailable(f"{e}\n{TENSORRT_RUNNER_HINT}") from None
        engine_dir = Path(engine_dir) if engine_dir is not None else plan.checkpoint / "engines" / "jetson"
        info = load_engine_manifest(engine_dir)
        super().__init__(Manifest(**info["onnx_manifest"]), plan)
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._trt, self._engines, self._contexts = trt, {}, {}
        for spec in [*self.segments.values(), *self.heads.values()]:
            entry = info["engines"].get(spec.name)
            if entry is None:
                raise FileNotFoundError(f"{engine_dir / ENGINE_MANIFEST} lists no engine for {spec.name}: rebuild")
            engine = runtime.deserialize_cuda_engine((engine_dir / entry["file"]).read_bytes())
            contexts = []
            for p in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(p, self._stream.cuda_stream)
                contexts.append(ctx)
            self._engines[spec.name], self._contexts[spec.name] = engine, contexts
        first = next(iter(self.segments.values()))
        name = kv_names("past", first.layers, self.num_layers)[0]
        self._kv_dtype = _torch_dtype(trt, self._engines[first.name].get_tensor_dtype(name))
        self._kv_shape = (1, self.manifest.num_kv_heads, 0, self.manifest.head_dim)

    def _empty_kv(self) -> torch.Tensor:
        return torch.empty(self._kv_shape, dtype=self._kv_dtype, device=self.device)

    def _execute(self, spec: GraphSpec, feeds: dict) -> dict:
        trt, engine = self._trt, self._engines[spec.name]
        contexts = self._contexts[spec.name]
        block = 1 if spec.kind == "exit_head" else feeds.get("input_ids", feeds.get("hidden_in")).shape[1]
        ctx = contexts[0] if block == 1 or len(contexts) == 1 else contexts[1]  # decode, else prefill/catch-up
        keep = []  # buffers alive until the stream is done
        for name, value in feeds.items():
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            t = t.to(self.device, _torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            keep.append(t)
            ctx.set_tensor_address(name, _address(t, keep, self.device))
        out = {}
        for name in spec.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            t = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, _address(t, keep, self.device))
            out[name] = t
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {spec.name} failed")
        self._stream.synchronize()
        return {name: t if name.startswith("present") else t.cpu().numpy() for name, t in out.items()}  # K/V stay


def _address(t: torch.Tensor, keep: list, device) -> int:
    """Empty tensors (a first block's past K/V) have no storage; give TensorRT a valid address anyway."""
    if t.numel():
        return t.data_ptr()
    dummy = torch.empty(1, dtype=t.dtype, device=device)
    keep.append(dummy)
    return dummy.data_ptr()


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32, trt.bool: torch.bool}[dtype]
