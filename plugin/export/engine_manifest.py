"""An engine directory's manifest, and TensorRT's import, without PyTorch: what a device that runs the engines
needs (the edge's TensorRT runner); building them (engines.py) needs the layer loop."""
from __future__ import annotations

from pathlib import Path

from plugin.export.manifest import ExportError, read_manifest

ENGINE_MANIFEST = "engines.json"
ENGINE_FORMAT = "ce-collm-engines/1"

TENSORRT_INSTALL_HINT = """\
TensorRT is not installed here ({reason}). Engines are built on the machine (GPU and TensorRT version)
that will run them:
  Jetson:  JetPack ships TensorRT and its Python bindings (`sudo apt install nvidia-jetpack`, or
           `sudo apt install python3-libnvinfer`); create the venv with --system-site-packages so
           `import tensorrt` works, then run this command there with --target jetson.
  cloud:   on the serving GPU, with the TensorRT of the Triton container that will serve the engines:
           the NGC TensorRT container of the same release ships it,
           `docker run --gpus all -v $PWD:/work -w /work nvcr.io/nvidia/tensorrt:<yy.mm>-py3`
           (same <yy.mm> as nvcr.io/nvidia/tritonserver:<yy.mm>-py3), or, inside the Triton
           container, `pip install tensorrt==<its TensorRT version>`; then run this command there
           with --target cloud.
The ONNX files (build/export_onnx.py) and `--runner onnx` / `--runner torch` work without TensorRT."""


class TensorRTUnavailable(RuntimeError):
    """`import tensorrt` failed: the message says what to install and where to build."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 (lazy on purpose)
    except Exception as e:  # ImportError, or a stub wheel that fails while importing
        raise TensorRTUnavailable(TENSORRT_INSTALL_HINT.format(reason=f"import tensorrt: {e}")) from None
    return trt


def load_engine_manifest(engine_dir: Path) -> dict:
    return read_manifest(Path(engine_dir) / ENGINE_MANIFEST, ENGINE_FORMAT, ExportError,
                         ": build the engines with build/build_engines.py on this device", "rebuild")
